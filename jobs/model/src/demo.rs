//! `cnclip demo`: the whole of cnclip on the embedded synthetic corpus, offline, on a CPU —
//! synthesize the corpus, build its LMDB splits, train a small CLIP from scratch, extract the
//! test split's features, retrieve the top-10 images per caption, score recall@1/5/10 and
//! zero-shot accuracy, and write a report (HTML and Markdown, with SVG plots of the training
//! curves and the result tables next to chance).
//!
//! Every step is the subcommand a user would type: the demo calls its job with typed options and
//! prints them first as that command line (each job builds its own pipeline); the demo only
//! chains them and reads back their outputs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int64Type};

use crate::report::{Plot, Report, Series, Table};
use cnclip_data_jobs::evaluation_engine::Engine;
use cnclip_data_jobs::{build_lmdb, command_line, evaluation, synth};

use crate::model_args::ModelArgs;
use crate::{convert, extract, knn, train, zeroshot};
use cnclip_operators::storage;

#[derive(clap::Args)]
pub struct Args {
    /// Where everything goes (corpus, LMDBs, logs, checkpoint, features, results, report).
    #[arg(long, default_value = "cnclip-demo")]
    out: PathBuf,
    /// Training pairs to synthesize.
    #[arg(long, default_value_t = 3000)]
    train: u64,
    /// Test pairs (the retrieval gallery: chance R@1 is 1/test).
    #[arg(long, default_value_t = 100)]
    test: u64,
    /// Training epochs.
    #[arg(long, default_value_t = 6)]
    epochs: u64,
    /// Training batch size (train's --batch-size).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Peak learning rate, after 50 warmup steps and before the cosine decay (train's --lr).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Decode/preprocess threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    num_workers: usize,
    /// Seed of the corpus and the training.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The small CLIP the demo trains: a 4-layer ViT on 64 px images, a 2-layer text encoder.
const MODEL: &str = r#"{
  "embed_dim": 128, "image_resolution": 64, "vision_layers": 4, "vision_width": 192, "vision_patch_size": 8,
  "vocab_size": 21128, "text_attention_probs_dropout_prob": 0.0, "text_hidden_act": "gelu",
  "text_hidden_dropout_prob": 0.0, "text_hidden_size": 192, "text_initializer_range": 0.02,
  "text_intermediate_size": 384, "text_max_position_embeddings": 64, "text_num_attention_heads": 3,
  "text_num_hidden_layers": 2, "text_type_vocab_size": 2
}"#;

/// Zero-shot prompts that read like the corpus's captions.
const TEMPLATES: &str = "{}\n一个{}\n图中有一个{}\n";

const CONTEXT_LENGTH: usize = 32;

/// Runs the demo's steps in order, timing each and keeping its command line for the report.
struct Steps {
    total: usize,
    done: usize,
    ran: Vec<(String, f64)>,
}

impl Steps {
    /// Runs `job` on `options`, after printing the command line a user would type for it.
    fn run<A: clap::Args + serde::Serialize, T>(
        &mut self,
        what: &str,
        name: &str,
        options: A,
        job: impl FnOnce(A) -> Result<T>,
    ) -> Result<T> {
        self.done += 1;
        let line = format!("cnclip {name} {}", command_line::render(&options)?.join(" "));
        eprintln!("\n[{}/{}] {what}\n$ {line}", self.done, self.total);
        let start = Instant::now();
        let result = job(options).with_context(|| format!("step {} ({what})", self.done))?;
        self.ran.push((line, start.elapsed().as_secs_f64()));
        Ok(result)
    }
}

fn strings(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// Top-k of the demo's retrieval step (as cn_clip's evaluation scores it: recall@1/5/10).
const TOP_K: u64 = 10;

/// Every argument checked before any step runs, naming the flag.
fn check(args: &Args) -> Result<()> {
    let mut problems = Vec::new();
    if args.test < TOP_K {
        problems.push(format!(
            "--test {}: the retrieval step ranks the top {TOP_K} images of each caption, so the test split needs at \
             least {TOP_K} images",
            args.test
        ));
    }
    if args.train == 0 {
        problems.push("--train 0: training needs at least one pair".to_string());
    }
    if args.epochs == 0 {
        problems.push("--epochs 0: training needs at least one epoch".to_string());
    }
    if args.batch_size == 0 {
        problems.push("--batch-size 0: a batch needs at least one pair".to_string());
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        problems.push(format!("--lr {}: a learning rate is a positive number", args.lr));
    }
    if problems.is_empty() { Ok(()) } else { Err(cnclip_operators::Problems(problems).into()) }
}

pub fn run(args: Args) -> Result<()> {
    check(&args)?;
    let started = Instant::now();
    let out = &args.out;
    storage::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = |p: &str| out.join(p);
    let mut steps = Steps { total: 8, done: 0, ran: Vec::new() };
    let plan = Plan::new(&args);
    steps.run(
        "synthesize the corpus (captioned shapes, cn_clip's TSV/JSONL layout, a zero-shot set)",
        "synth",
        plan.synth,
        synth::run,
    )?;
    steps.run("build cn_clip's LMDB splits", "build-lmdb", plan.build_lmdb, build_lmdb::run)?;
    let model = path("model.json");
    storage::write(&model, MODEL).with_context(|| format!("writing {}", model.display()))?;
    // Start afresh: a previous demo's checkpoints would otherwise be resumed.
    let _ = storage::remove_dir_all(out.join("logs/demo"));
    steps.run(
        "train a small CLIP from scratch (cn_clip's training loop; log and checkpoints in logs/demo)",
        "train",
        plan.train,
        |options| train::run(Box::new(options)),
    )?;
    steps.run(
        "convert the last checkpoint to a self-describing .safetensors",
        "convert",
        plan.convert,
        convert::run,
    )?;
    storage::create_dir_all(out.join("features"))?;
    steps.run("extract the test split's image and text features", "extract-features", plan.extract, extract::run)?;
    storage::create_dir_all(out.join("results"))?;
    steps.run(
        "retrieve the top-10 images of every caption (FAISS, exact)",
        "make-topk-predictions",
        plan.knn,
        |options| knn::run(options, false),
    )?;
    let recall_json = plan.evaluation.out_path.display().to_string();
    steps.run("score recall@1/5/10 (cn_clip's evaluation)", "evaluation", plan.evaluation, |options| {
        evaluation::run(options, false)
    })?;
    storage::write(path("templates.txt"), TEMPLATES)?;
    let zeroshot = steps.run(
        "zero-shot classification of the shape/colour set",
        "zeroshot-evaluation",
        plan.zeroshot,
        zeroshot::run_with,
    )?;

    // The report.
    let recall: serde_json::Value = serde_json::from_str(
        &storage::read_to_string(&recall_json).with_context(|| format!("reading {recall_json}"))?,
    )?;
    // A result that is not a number is an error, never a headline.
    let score = |k: &str| {
        recall["scoreJson"][k]
            .as_f64()
            .filter(|x| x.is_finite())
            .with_context(|| format!("{recall_json}: no `{k}` score (the evaluation said: {})", recall["errorMessage"]))
    };
    let (r1, r5, r10, mean) = (score("r1")?, score("r5")?, score("r10")?, score("mean_recall")?);
    let gallery = args.test as f64;
    let chance = |k: f64| 100.0 * (k / gallery).min(1.0);
    let classes = storage::read_to_string(out.join("corpus/zeroshot/label_cn.txt"))?.lines().count() as f64;
    let curves = training_curves(&out.join("logs/demo/metrics.parquet"))?;
    let seconds = started.elapsed().as_secs_f64();
    let headline = format!(
        "text→image R@1 {r1:.1}% on {} test images (chance {:.1}%, {:.1}× chance); zero-shot top-1 {:.1}% over {classes} classes (chance {:.1}%)",
        args.test,
        chance(1.0),
        r1 / chance(1.0),
        zeroshot.top1 * 100.0,
        100.0 / classes
    );
    let report = Report {
        title: "cnclip demo: a CLIP trained from scratch on the synthetic corpus".into(),
        summary: vec![
            headline.clone(),
            format!(
                "{} training pairs, {} epochs of batch {}, learning rate {} (warmup 50, cosine); the model: {}",
                args.train,
                args.epochs,
                args.batch_size,
                args.lr,
                MODEL.split_whitespace().collect::<Vec<_>>().join(" ")
            ),
            format!("Whole demo: {seconds:.0} s on this machine; every step below is a command you can rerun."),
        ],
        plots: vec![
            Plot {
                file_stem: "loss".into(),
                title: "Contrastive loss".into(),
                x_label: "step".into(),
                y_label: "loss".into(),
                series: vec![
                    Series { name: "training batch".into(), points: curves.train_loss },
                    Series { name: "validation".into(), points: curves.valid_loss },
                ],
            },
            Plot {
                file_stem: "accuracy".into(),
                title: "Validation in-batch accuracy (batch of 100; chance 1%)".into(),
                x_label: "step".into(),
                y_label: "accuracy %".into(),
                series: vec![
                    Series { name: "image→text".into(), points: curves.valid_i2t },
                    Series { name: "text→image".into(), points: curves.valid_t2i },
                ],
            },
        ],
        tables: vec![
            Table {
                title: format!("Text→image retrieval on the test split ({} images)", args.test),
                header: strings(&["metric", "cnclip-trained model", "chance"]),
                rows: vec![
                    vec!["R@1".into(), format!("{r1:.2}%"), format!("{:.2}%", chance(1.0))],
                    vec!["R@5".into(), format!("{r5:.2}%"), format!("{:.2}%", chance(5.0))],
                    vec!["R@10".into(), format!("{r10:.2}%"), format!("{:.2}%", chance(10.0))],
                    vec![
                        "mean recall".into(),
                        format!("{mean:.2}%"),
                        format!("{:.2}%", (chance(1.0) + chance(5.0) + chance(10.0)) / 3.0),
                    ],
                ],
            },
            Table {
                title: format!("Zero-shot classification ({classes} colour × shape classes)"),
                header: strings(&["metric", "cnclip-trained model", "chance"]),
                rows: vec![
                    vec!["top-1".into(), format!("{:.2}%", zeroshot.top1 * 100.0), format!("{:.2}%", 100.0 / classes)],
                    vec![
                        "top-5".into(),
                        format!("{:.2}%", zeroshot.top5 * 100.0),
                        format!("{:.2}%", 100.0 * (5.0 / classes).min(1.0)),
                    ],
                    vec![
                        "mean per-class recall".into(),
                        format!("{:.2}%", zeroshot.mean_per_class_recall * 100.0),
                        format!("{:.2}%", 100.0 / classes),
                    ],
                ],
            },
            Table {
                title: "What ran".into(),
                header: strings(&["step", "command", "seconds"]),
                rows: steps
                    .ran
                    .iter()
                    .enumerate()
                    .map(|(i, (line, s))| vec![(i + 1).to_string(), line.clone(), format!("{s:.1}")])
                    .collect(),
            },
        ],
    };
    let html = crate::report::write(&out.join("report"), &report)?;
    eprintln!("\ncnclip demo: done in {seconds:.0} s\n  {headline}\n  report: {}", html.display());
    Ok(())
}

/// Every step's options, as typed values (the command lines shown are written from them).
pub(crate) struct Plan {
    pub(crate) synth: synth::Args,
    pub(crate) build_lmdb: build_lmdb::Args,
    pub(crate) train: train::Args,
    pub(crate) convert: convert::Args,
    pub(crate) extract: extract::Args,
    pub(crate) knn: knn::Args,
    pub(crate) evaluation: evaluation::Args,
    pub(crate) zeroshot: zeroshot::Args,
}

impl Plan {
    pub(crate) fn new(args: &Args) -> Plan {
        let path = |p: &str| args.out.join(p);
        let text = |p: &str| path(p).display().to_string();
        let model = path("model.json");
        let checkpoint = path("model.safetensors");
        let (image_feats, text_feats) =
            (path("features/test_imgs.img_feat.jsonl"), path("features/test_texts.txt_feat.jsonl"));
        let predictions = path("results/test_predictions.jsonl");
        Plan {
            synth: synth::Args {
                out: path("corpus"),
                train: args.train,
                valid: 200,
                test: args.test,
                zeroshot_per_class: 5,
                seed: args.seed,
            },
            build_lmdb: build_lmdb::Args::new(path("corpus"), "train,valid,test".into()),
            train: train::Args {
                val_data: Some(path("corpus/lmdb/valid")),
                model: ModelArgs { model_config: Some(model.clone()), ..ModelArgs::default() },
                batch_size: args.batch_size,
                valid_batch_size: 100,
                max_epochs: args.epochs,
                lr: Some(args.lr),
                beta1: Some(0.9),
                beta2: Some(0.98),
                eps: Some(1e-6),
                wd: 0.1,
                warmup: 50,
                context_length: CONTEXT_LENGTH,
                num_workers: args.num_workers,
                logs: text("logs"),
                name: "demo".into(),
                log_interval: 10,
                report_training_batch_acc: true,
                seed: args.seed,
                save_epoch_frequency: 0,
                ..train::Args::new(path("corpus/lmdb/train"))
            },
            convert: convert::Args {
                input: path("logs/demo/checkpoints/epoch_latest.pt"),
                output: checkpoint.clone(),
                model: ModelArgs { vision_model: None, text_model: None, model_config: Some(model) },
                format: None,
                precision: cnclip_operators::options::Precision::Fp32,
            },
            extract: extract::Args {
                extract_image_feats: true,
                extract_text_feats: true,
                image_data: vec![text("corpus/lmdb/test/imgs")],
                text_data: Some(text("corpus/test_texts.jsonl")),
                image_feat_output_path: Some(image_feats.clone()),
                text_feat_output_path: Some(text_feats.clone()),
                context_length: CONTEXT_LENGTH,
                num_workers: args.num_workers,
                ..extract::Args::new(checkpoint.clone())
            },
            knn: knn::Args {
                image_feats: Some(image_feats.display().to_string()),
                text_feats: Some(text_feats.display().to_string()),
                top_k: TOP_K as usize,
                ..knn::Args::new(predictions.clone())
            },
            evaluation: evaluation::Args {
                engine: Engine::Direct,
                standard_path: path("corpus/test_texts.jsonl"),
                submit_path: predictions,
                out_path: path("results/test_recall.json"),
                cluster: None,
            },
            zeroshot: zeroshot::Args {
                templates: Some(path("templates.txt")),
                dataset: "synth-shapes".into(),
                save_dir: text("results"),
                context_length: CONTEXT_LENGTH,
                num_workers: args.num_workers,
                ..zeroshot::Args::new(path("corpus/zeroshot/test"), path("corpus/zeroshot/label_cn.txt"), checkpoint)
            },
        }
    }
}

/// The training run's curves from its metrics table.
struct Curves {
    train_loss: Vec<(f64, f64)>,
    valid_loss: Vec<(f64, f64)>,
    valid_i2t: Vec<(f64, f64)>,
    valid_t2i: Vec<(f64, f64)>,
}

fn training_curves(path: &Path) -> Result<Curves> {
    let file = storage::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut curves = Curves { train_loss: vec![], valid_loss: vec![], valid_i2t: vec![], valid_t2i: vec![] };
    for batch in reader {
        let batch = batch?;
        let column = |name: &str| batch.column_by_name(name).with_context(|| format!("{}: no {name}", path.display()));
        let kind = column("kind")?.as_string::<i32>().clone();
        let step = column("step")?.as_primitive::<Int64Type>().clone();
        let loss = column("loss")?.as_primitive::<Float64Type>().clone();
        let i2t = column("i2t_acc")?.as_primitive::<Float64Type>().clone();
        let t2i = column("t2i_acc")?.as_primitive::<Float64Type>().clone();
        for i in 0..batch.num_rows() {
            let x = step.value(i) as f64;
            if kind.value(i) == "valid" {
                curves.valid_loss.push((x, loss.value(i)));
                curves.valid_i2t.push((x, 100.0 * i2t.value(i)));
                curves.valid_t2i.push((x, 100.0 * t2i.value(i)));
            } else if kind.is_valid(i) {
                curves.train_loss.push((x, loss.value(i)));
            }
        }
    }
    Ok(curves)
}

#[cfg(test)]
pub(crate) mod tests {
    /// The demo's steps for a demo writing under `out`, with its default flags.
    pub(crate) fn plan(out: &std::path::Path) -> super::Plan {
        let args = super::Args {
            out: out.to_path_buf(),
            train: 3000,
            test: 100,
            epochs: 6,
            batch_size: 64,
            lr: 2e-3,
            num_workers: 0,
            seed: 0,
        };
        super::Plan::new(&args)
    }
}
