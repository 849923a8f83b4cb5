//! `cnclip demo`: the whole of cnclip on the embedded synthetic corpus, offline, on a CPU —
//! synthesize the corpus, build its LMDB splits, train a small CLIP from scratch, extract the
//! test split's features, retrieve the top-10 images per caption, score recall@1/5/10 and
//! zero-shot accuracy, and write a report (HTML and Markdown, with SVG plots of the training
//! curves and the result tables next to chance).
//!
//! Every step is the subcommand a user would type, given the arguments printed before it runs
//! (each builds its own pipeline); the demo only chains them and reads back their outputs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int64Type};

use crate::report::{Plot, Report, Series, Table};
use cnclip_data_jobs::process::parse_args as parse;

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

const CONTEXT_LENGTH: &str = "32";

/// Runs the demo's steps in order, timing each and keeping its command line for the report.
struct Steps {
    total: usize,
    done: usize,
    ran: Vec<(String, f64)>,
}

impl Steps {
    fn run(
        &mut self,
        what: &str,
        name: &str,
        argv: Vec<String>,
        job: impl FnOnce(&[String]) -> Result<()>,
    ) -> Result<()> {
        self.done += 1;
        let line = format!("cnclip {name} {}", argv.join(" "));
        eprintln!("\n[{}/{}] {what}\n$ {line}", self.done, self.total);
        let start = Instant::now();
        job(&argv).with_context(|| format!("step {} ({what})", self.done))?;
        self.ran.push((line, start.elapsed().as_secs_f64()));
        Ok(())
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
    if problems.is_empty() { Ok(()) } else { bail!("{}", problems.join("; ")) }
}

pub fn run(args: Args) -> Result<()> {
    check(&args)?;
    let started = Instant::now();
    let out = &args.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = |p: &str| out.join(p).display().to_string();
    let mut steps = Steps { total: 8, done: 0, ran: Vec::new() };
    let (train, test, epochs, batch, lr, workers, seed) = (
        args.train.to_string(),
        args.test.to_string(),
        args.epochs.to_string(),
        args.batch_size.to_string(),
        args.lr.to_string(),
        args.num_workers.to_string(),
        args.seed.to_string(),
    );
    steps.run(
        "synthesize the corpus (captioned shapes, cn_clip's TSV/JSONL layout, a zero-shot set)",
        "synth",
        strings(&["--out", &path("corpus"), "--train", &train, "--valid", "200", "--test", &test, "--seed", &seed]),
        |a| cnclip_data_jobs::synth::run(parse("synth", a)?),
    )?;
    steps.run(
        "build cn_clip's LMDB splits",
        "build-lmdb",
        strings(&["--data-dir", &path("corpus"), "--splits", "train,valid,test"]),
        |a| cnclip_data_jobs::build_lmdb::run(parse("build-lmdb", a)?),
    )?;
    let model = out.join("model.json");
    std::fs::write(&model, MODEL).with_context(|| format!("writing {}", model.display()))?;
    // Start afresh: a previous demo's checkpoints would otherwise be resumed.
    let _ = std::fs::remove_dir_all(out.join("logs/demo"));
    steps.run(
        "train a small CLIP from scratch (cn_clip's training loop; log and checkpoints in logs/demo)",
        "train",
        strings(&[
            "--train-data",
            &path("corpus/lmdb/train"),
            "--val-data",
            &path("corpus/lmdb/valid"),
            "--model-config",
            &model.display().to_string(),
            "--batch-size",
            &batch,
            "--valid-batch-size",
            "100",
            "--max-epochs",
            &epochs,
            "--lr",
            &lr,
            "--beta1",
            "0.9",
            "--beta2",
            "0.98",
            "--eps",
            "1e-6",
            "--wd",
            "0.1",
            "--warmup",
            "50",
            "--context-length",
            CONTEXT_LENGTH,
            "--num-workers",
            &workers,
            "--logs",
            &path("logs"),
            "--name",
            "demo",
            "--log-interval",
            "10",
            "--report-training-batch-acc",
            "--seed",
            &seed,
            "--save-epoch-frequency",
            "0",
        ]),
        |a| crate::train::run(Box::new(parse("train", a)?)),
    )?;
    let checkpoint = path("model.safetensors");
    steps.run(
        "convert the last checkpoint to a self-describing .safetensors",
        "convert",
        strings(&[
            "--input",
            &path("logs/demo/checkpoints/epoch_latest.pt"),
            "--model-config",
            &model.display().to_string(),
            "--output",
            &checkpoint,
        ]),
        |a| crate::convert::run(parse("convert", a)?),
    )?;
    let (image_feats, text_feats) =
        (path("features/test_imgs.img_feat.jsonl"), path("features/test_texts.txt_feat.jsonl"));
    std::fs::create_dir_all(out.join("features"))?;
    steps.run(
        "extract the test split's image and text features",
        "extract-features",
        strings(&[
            "--extract-image-feats",
            "--extract-text-feats",
            "--image-data",
            &path("corpus/lmdb/test/imgs"),
            "--text-data",
            &path("corpus/test_texts.jsonl"),
            "--image-feat-output-path",
            &image_feats,
            "--text-feat-output-path",
            &text_feats,
            "--resume",
            &checkpoint,
            "--context-length",
            CONTEXT_LENGTH,
            "--num-workers",
            &workers,
        ]),
        |a| crate::extract::run(parse("extract-features", a)?),
    )?;
    let predictions = path("results/test_predictions.jsonl");
    std::fs::create_dir_all(out.join("results"))?;
    steps.run(
        "retrieve the top-10 images of every caption (FAISS, exact)",
        "make-topk-predictions",
        strings(&[
            "--image-feats",
            &image_feats,
            "--text-feats",
            &text_feats,
            "--top-k",
            "10",
            "--output",
            &predictions,
        ]),
        |a| crate::knn::run(parse("make-topk-predictions", a)?, false),
    )?;
    let recall_json = path("results/test_recall.json");
    steps.run(
        "score recall@1/5/10 (cn_clip's evaluation)",
        "evaluation",
        strings(&[&path("corpus/test_texts.jsonl"), &predictions, &recall_json]),
        |a| cnclip_data_jobs::evaluation::run(parse("evaluation", a)?, false),
    )?;
    let templates = out.join("templates.txt");
    std::fs::write(&templates, TEMPLATES)?;
    let mut zeroshot = None;
    steps.run(
        "zero-shot classification of the shape/colour set",
        "zeroshot-evaluation",
        strings(&[
            "--datapath",
            &path("corpus/zeroshot/test"),
            "--label-file",
            &path("corpus/zeroshot/label_cn.txt"),
            "--templates",
            &templates.display().to_string(),
            "--dataset",
            "synth-shapes",
            "--save-dir",
            &path("results"),
            "--resume",
            &checkpoint,
            "--context-length",
            CONTEXT_LENGTH,
            "--num-workers",
            &workers,
        ]),
        |a| {
            zeroshot = Some(crate::zeroshot::run_with(parse("zeroshot-evaluation", a)?)?);
            Ok(())
        },
    )?;
    let zeroshot = zeroshot.expect("the step ran");

    // The report.
    let recall: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&recall_json).with_context(|| format!("reading {recall_json}"))?,
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
    let classes = std::fs::read_to_string(out.join("corpus/zeroshot/label_cn.txt"))?.lines().count() as f64;
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

/// The training run's curves from its metrics table.
struct Curves {
    train_loss: Vec<(f64, f64)>,
    valid_loss: Vec<(f64, f64)>,
    valid_i2t: Vec<(f64, f64)>,
    valid_t2i: Vec<(f64, f64)>,
}

fn training_curves(path: &Path) -> Result<Curves> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
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
