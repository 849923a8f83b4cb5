//! The `cnclip` jobs that run a model (through libtorch): one module per subcommand, named
//! after the cn_clip script it replaces, with that script's flag names. The `cnclip-torch`
//! binary carries them out; `cnclip` execs it for these commands.

// Doc comments on clap arguments are `--help` text, where `[job]` and `[CLS]` are literal.
#![allow(rustdoc::broken_intra_doc_links)]

use cnclip_operators::spec::Registry;

pub mod bench_suite;
pub mod benchmark;
pub mod build_index;
pub mod convert;
pub mod demo;
pub mod extract;
pub mod init_model;
pub mod knn;
pub mod model_args;
/// The demo's report (HTML + SVG plots).
pub mod report;
pub mod similarity;
pub mod train;
pub mod zeroshot;

/// For `map_err`: `error` under the message `{prefix} {error}` (a flag and what is wrong with its
/// value: ``--index `IVF0,Flat`: …``), kept as its cause. The line the binary prints is that
/// message alone, since a cause whose text the message already holds is not repeated.
pub(crate) fn quoted<E>(prefix: impl std::fmt::Display) -> impl FnOnce(E) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |error| {
        let message = format!("{prefix} {error}");
        anyhow::Error::new(error).context(message)
    }
}

/// Every node kind the model jobs run: the built-in ones, the encoders and `knn`.
pub fn registry() -> Registry {
    let mut registry = Registry::builtin();
    cnclip_models::encoders::register(&mut registry);
    cnclip_models::retrieval::register(&mut registry);
    registry
}

/// The options jobs build for each other (`demo`, `bench-suite`, training's data preparation)
/// agree with their command lines: `new` gives each flag's default, and the line written from
/// any options parses back to them.
#[cfg(test)]
mod options {
    use std::path::PathBuf;

    use cnclip_data_jobs::command_line::{parse, render};

    fn round_trip<A>(name: &'static str, options: &A)
    where
        A: clap::Args + clap::FromArgMatches + serde::Serialize + PartialEq + std::fmt::Debug,
    {
        let line = render(options).unwrap();
        let parsed: A = parse(name, &line).unwrap_or_else(|e| panic!("cnclip {name} {}: {e}", line.join(" ")));
        assert_eq!(&parsed, options, "cnclip {name} {}", line.join(" "));
    }

    fn args(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn new_gives_each_flags_default() {
        let (p, q, r) = (PathBuf::from("p"), PathBuf::from("q"), PathBuf::from("r"));
        assert_eq!(
            parse::<crate::train::Args>("train", &args(&["--train-data", "p"])).unwrap(),
            crate::train::Args::new(p.clone())
        );
        assert_eq!(
            parse::<cnclip_data_jobs::build_lmdb::Args>("build-lmdb", &args(&["--data-dir", "p", "--splits", "train"]))
                .unwrap(),
            cnclip_data_jobs::build_lmdb::Args::new(p.clone(), "train".into())
        );
        assert_eq!(
            parse::<crate::extract::Args>("extract-features", &args(&["--resume", "p"])).unwrap(),
            crate::extract::Args::new(p.clone())
        );
        assert_eq!(
            parse::<crate::knn::Args>("make-topk-predictions", &args(&["--output", "p"])).unwrap(),
            crate::knn::Args::new(p.clone())
        );
        assert_eq!(
            parse::<crate::zeroshot::Args>(
                "zeroshot-evaluation",
                &args(&["--datapath", "p", "--label-file", "q", "--resume", "r"])
            )
            .unwrap(),
            crate::zeroshot::Args::new(p, q, r)
        );
    }

    #[test]
    fn the_demos_steps_parse_back_from_the_lines_it_prints() {
        let demo = crate::demo::tests::plan(std::path::Path::new("out dir"));
        round_trip("synth", &demo.synth);
        round_trip("build-lmdb", &demo.build_lmdb);
        round_trip("train", &demo.train);
        round_trip("convert", &demo.convert);
        round_trip("extract-features", &demo.extract);
        round_trip("make-topk-predictions", &demo.knn);
        round_trip("evaluation", &demo.evaluation);
        round_trip("zeroshot-evaluation", &demo.zeroshot);
    }

    #[test]
    fn options_with_every_kind_of_value_parse_back() {
        let mut train = crate::train::Args::new("d".into());
        (train.lr, train.eps, train.wd, train.save_step_frequency) = (Some(3e-4), Some(1e-8), 0.0, 7);
        (train.use_augment, train.kd_loss_weight, train.max_steps) = (true, 0.25, Some(9));
        train.devices = "cpu,cpu".parse().unwrap();
        round_trip("train", &train);
        let mut extract = crate::extract::Args::new("c.pt".into());
        extract.image_data = vec!["a.tsv".into(), "b.tsv".into()];
        (extract.on_error, extract.shard) = (cnclip_operators::quarantine::OnError::Fail, Some("1/4".parse().unwrap()));
        (extract.precision, extract.devices) =
            (cnclip_operators::options::Precision::Bf16, "cuda:0,cuda:1".parse().unwrap());
        round_trip("extract-features", &extract);
        let mut knn = crate::knn::Args::new("o.jsonl".into());
        (knn.backend, knn.nprobe, knn.mmap) = (cnclip_models::retrieval::Backend::Torch, Some(3), true);
        round_trip("make-topk-predictions", &knn);
        let mut export = cnclip_data_jobs::import::ExportArgs {
            parquet_dir: "t".into(),
            splits: "train".into(),
            out: "o".into(),
            format: cnclip_data_jobs::import::Format::Lmdb,
            writer: cnclip_operators::sinks::lmdb::LmdbWriterKind::Txn,
            on_error: cnclip_operators::quarantine::OnError::Skip,
        };
        round_trip("export", &export);
        export.format = cnclip_data_jobs::import::Format::Tsv;
        round_trip("export", &export);
    }
}
