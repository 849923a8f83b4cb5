//! `cnclip bench-suite SUITE.toml`: scheduled benchmark evaluation. A suite lists runs
//! (checkpoint × dataset × task); each run is carried out by the jobs users run by hand —
//! `extract-features`, `make-topk-predictions` (both directions) and `evaluation` for
//! `retrieval`, `zeroshot-evaluation` for `zeroshot` — and leaves one CLIP_benchmark-style JSON
//! (`{out}/{run}.json`: `dataset`, `model`, `pretrained`, `task`, `metrics`) and a row in
//! `{out}/results.parquet` (every run's metrics, for SQL and notebooks). A rerun skips the
//! runs whose JSON is there, made from the same settings and the same files — the checkpoint's
//! by sha256, the data's by size and modification time (`cnclip_made_from` in the JSON) — so a
//! suite on a schedule (or one stopped halfway) does only what is new, and a checkpoint
//! replaced at the same path is evaluated again instead of keeping its predecessor's numbers.
//!
//! ```toml
//! [suite]
//! out = "bench"                  # results directory
//! devices = "cpu"                # as --devices
//!
//! [[runs]]
//! name = "rn50-valid"
//! task = "retrieval"             # or "zeroshot"
//! checkpoint = "rn50.pt"
//! vision_model = "RN50"          # for a cn_clip .pt
//! text_model = "RBT3-chinese"
//! dataset = "valid"
//! images = "lmdb/valid/imgs"     # retrieval: --image-data
//! texts = "data/valid_texts.jsonl"  # retrieval: --text-data and the ground truth
//! # zeroshot: datapath = "…", label_file = "…" (dataset picks the templates)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cnclip_data_jobs::command_line;
use cnclip_operators::options::{Devices, Precision};
use cnclip_operators::sinks::parquet::ParquetSink;
use cnclip_operators::storage;
use serde::Deserialize;

#[derive(clap::Args)]
pub struct Args {
    /// The suite file.
    suite: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Suite {
    suite: Settings,
    runs: Vec<Run>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    out: PathBuf,
    #[serde(default)]
    devices: Devices,
    #[serde(default = "amp")]
    precision: Precision,
}

fn amp() -> Precision {
    Precision::Amp
}

#[derive(Deserialize, serde::Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct Run {
    name: String,
    task: String,
    checkpoint: PathBuf,
    vision_model: Option<String>,
    text_model: Option<String>,
    dataset: String,
    images: Option<String>,
    texts: Option<String>,
    datapath: Option<PathBuf>,
    label_file: Option<PathBuf>,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

pub fn run(args: Args) -> Result<()> {
    let base = args.suite.parent().unwrap_or(Path::new("")).to_path_buf();
    let text = cnclip_operators::sources::read_text(&args.suite, cnclip_operators::sources::MAX_TEXT_BYTES)
        .with_context(|| format!("reading {}", args.suite.display()))?;
    let suite: Suite = toml::from_str(&text).with_context(|| format!("{}", args.suite.display()))?;
    let resolve = |p: &Path| if p.is_absolute() || storage::is_url(p) { p.to_path_buf() } else { base.join(p) };
    // Results in an object store are written in a spool copy of `out` (what the store holds of
    // it, so that finished runs are skipped) and uploaded after each run.
    let given_out = resolve(&suite.suite.out);
    let remote = storage::is_remote(&given_out).then(|| given_out.clone());
    let out = match &remote {
        Some(url) => storage::fetch::local_dir_for(url).with_context(|| format!("out = {}", url.display()))?,
        None => given_out.clone(),
    };
    let upload = |what: &str| -> Result<()> {
        match &remote {
            Some(url) => {
                storage::fetch::upload_dir(&out, url).with_context(|| format!("uploading {what} to {}", url.display()))
            }
            None => Ok(()),
        }
    };
    storage::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut names = std::collections::BTreeSet::new();
    for run in &suite.runs {
        // A run's name becomes file names under `out`: a path there would write elsewhere.
        if run.name.is_empty() || run.name.starts_with('.') || run.name.contains(['/', '\\', '\0']) {
            bail!(
                "{}: run name `{}` must be a plain file name (no `/`, not starting with `.`): results are written as \
                 {{out}}/{{name}}.json",
                args.suite.display(),
                run.name
            );
        }
        if !names.insert(&run.name) {
            bail!("{}: two runs are named `{}`", args.suite.display(), run.name);
        }
        if !matches!(run.task.as_str(), "retrieval" | "zeroshot") {
            bail!("run `{}`: task `{}` is not retrieval or zeroshot", run.name, run.task);
        }
    }
    let mut rows = Vec::new();
    for run in &suite.runs {
        let json_path = out.join(format!("{}.json", run.name));
        let settings =
            serde_json::json!({"run": run, "devices": suite.suite.devices, "precision": suite.suite.precision});
        let made_from = made_from(run, &resolve);
        if let Ok(done) = storage::read_to_string(&json_path)
            && let Ok(done) = serde_json::from_str::<serde_json::Value>(&done)
            && done["cnclip_settings"] == settings
        {
            let was: Option<MadeFrom> = serde_json::from_value(done["cnclip_made_from"].clone()).ok();
            match was.as_ref().map(|was| was.difference(&made_from)) {
                Some(None) => {
                    eprintln!("cnclip bench-suite: {}: done already, skipped", run.name);
                    rows.push(done);
                    continue;
                }
                Some(Some(why)) => {
                    eprintln!("cnclip bench-suite: {}: {why} since its result: running it again", run.name)
                }
                None => eprintln!(
                    "cnclip bench-suite: {}: its result does not record what it was made from: running it again",
                    run.name
                ),
            }
        }
        let work = out.join(&run.name);
        storage::create_dir_all(&work)?;
        let checkpoint_path = resolve(&run.checkpoint);
        let checkpoint = s(&checkpoint_path);
        let named = run.vision_model.clone().zip(run.text_model.clone());
        // Each job is called with typed options; its command line goes to the log first.
        let show = |name: &str, line: Vec<String>| {
            eprintln!("cnclip bench-suite: {}: $ cnclip {name} {}", run.name, line.join(" "))
        };
        let metrics = match run.task.as_str() {
            "retrieval" => {
                let images = run.images.as_ref().context("a retrieval run needs `images`")?;
                let texts = run.texts.as_ref().context("a retrieval run needs `texts`")?;
                let (images, texts) = (s(&resolve(Path::new(images))), resolve(Path::new(texts)));
                let (img, txt) = (work.join("img_feat.jsonl"), work.join("txt_feat.jsonl"));
                let (vision_model, text_model) = named.clone().unzip();
                let extract = crate::extract::Args {
                    extract_image_feats: true,
                    extract_text_feats: true,
                    image_data: vec![images],
                    text_data: Some(s(&texts)),
                    image_feat_output_path: Some(img.clone()),
                    text_feat_output_path: Some(txt.clone()),
                    devices: suite.suite.devices.clone(),
                    precision: suite.suite.precision,
                    model: crate::model_args::ModelArgs { vision_model, text_model, model_config: None },
                    ..crate::extract::Args::new(checkpoint_path.clone())
                };
                show("extract-features", command_line::render(&extract)?);
                crate::extract::run(extract)?;
                let knn = |output: &Path| crate::knn::Args {
                    image_feats: Some(s(&img)),
                    text_feats: Some(s(&txt)),
                    top_k: 10,
                    ..crate::knn::Args::new(output.to_path_buf())
                };
                let (t2i, i2t) = (work.join("t2i.jsonl"), work.join("i2t.jsonl"));
                for (output, tr, name) in
                    [(&t2i, false, "make-topk-predictions"), (&i2t, true, "make-topk-predictions-tr")]
                {
                    let options = knn(output);
                    show(name, command_line::render(&options)?);
                    crate::knn::run(options, tr)?;
                }
                let truth_tr = work.join("truth.tr.jsonl");
                cnclip_data_jobs::evaluation::transpose(&texts, &truth_tr)?;
                let image_retrieval = cnclip_data_jobs::evaluation::recall(&texts, &t2i, false)
                    .with_context(|| format!("run `{}`", run.name))?;
                let text_retrieval = cnclip_data_jobs::evaluation::recall(&truth_tr, &i2t, true)
                    .with_context(|| format!("run `{}`", run.name))?;
                let mut m = serde_json::Map::new();
                for (k, (a, b)) in [1, 5, 10].iter().zip(image_retrieval.iter().zip(&text_retrieval)) {
                    m.insert(format!("image_retrieval_recall@{k}"), serde_json::json!(a / 100.0));
                    m.insert(format!("text_retrieval_recall@{k}"), serde_json::json!(b / 100.0));
                }
                serde_json::Value::Object(m)
            }
            _ => {
                let datapath = run.datapath.as_ref().context("a zeroshot run needs `datapath`")?;
                let label_file = run.label_file.as_ref().context("a zeroshot run needs `label_file`")?;
                let mut zeroshot =
                    crate::zeroshot::Args::new(resolve(datapath), resolve(label_file), checkpoint_path.clone());
                zeroshot.dataset = run.dataset.clone();
                zeroshot.save_dir = s(&work);
                zeroshot.devices = suite.suite.devices.clone();
                zeroshot.precision = suite.suite.precision;
                if let Some((vision_model, text_model)) = named.clone() {
                    (zeroshot.vision_model, zeroshot.text_model) = (vision_model, text_model);
                }
                show("zeroshot-evaluation", command_line::render(&zeroshot)?);
                let m = crate::zeroshot::run_with(zeroshot)?;
                serde_json::json!({"acc1": m.top1, "acc5": m.top5, "mean_per_class_recall": m.mean_per_class_recall})
            }
        };
        let model_name = match (&run.vision_model, &run.text_model) {
            (Some(v), Some(t)) => format!("{v}@{t}"),
            _ => "cnclip".into(),
        };
        let result = serde_json::json!({
            "dataset": run.dataset,
            "model": model_name,
            "pretrained": checkpoint,
            "task": if run.task == "retrieval" { "zeroshot_retrieval" } else { "zeroshot_classification" },
            "metrics": metrics,
            "cnclip_settings": settings,
            "cnclip_made_from": made_from,
        });
        let text = serde_json::to_string_pretty(&result)?;
        cnclip_operators::write_atomically(&json_path, |f| std::io::Write::write_all(f, text.as_bytes()))?;
        eprintln!("cnclip bench-suite: {}: {}", run.name, result["metrics"]);
        upload(&format!("the result of run `{}`", run.name))?;
        rows.push(result);
    }
    write_results(&out.join("results.parquet"), &rows)?;
    upload("results.parquet")
}

/// What a run's result was made from: its checkpoint's files with their sha256 (a checkpoint
/// replaced at the same path must not keep last week's numbers), and its data's files by size
/// and modification time.
#[derive(Deserialize, serde::Serialize, PartialEq)]
struct MadeFrom {
    checkpoint: Vec<cnclip_operators::fingerprint::Stamp>,
    data: Vec<cnclip_operators::fingerprint::Stamp>,
}

impl MadeFrom {
    fn difference(&self, now: &MadeFrom) -> Option<String> {
        use cnclip_operators::fingerprint::difference;
        difference(&self.checkpoint, &now.checkpoint)
            .map(|d| format!("the checkpoint {d}"))
            .or_else(|| difference(&self.data, &now.data).map(|d| format!("the data {d}")))
    }
}

fn made_from(run: &Run, resolve: &impl Fn(&Path) -> PathBuf) -> MadeFrom {
    use cnclip_operators::fingerprint::stamps;
    let given = |p: &Path| s(&resolve(p));
    let data: Vec<String> = [run.images.as_deref().map(Path::new), run.texts.as_deref().map(Path::new)]
        .into_iter()
        .chain([run.datapath.as_deref(), run.label_file.as_deref()])
        .flatten()
        .map(given)
        .collect();
    MadeFrom { checkpoint: stamps(&[given(&run.checkpoint)], true), data: stamps(&data, false) }
}

/// Every run's metrics as one table: run order, one row per (run, metric).
fn write_results(path: &Path, rows: &[serde_json::Value]) -> Result<()> {
    use arrow::array::{Float64Array, StringArray};
    let (mut run, mut dataset, mut model, mut task, mut metric, mut value) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        if let Some(metrics) = row["metrics"].as_object() {
            for (name, v) in metrics {
                run.push(row["cnclip_settings"]["run"]["name"].as_str().unwrap_or_default().to_string());
                dataset.push(row["dataset"].as_str().unwrap_or_default().to_string());
                model.push(row["model"].as_str().unwrap_or_default().to_string());
                task.push(row["task"].as_str().unwrap_or_default().to_string());
                metric.push(name.clone());
                value.push(v.as_f64().unwrap_or(f64::NAN));
            }
        }
    }
    let schema = cnclip_schemas::bench_results();
    let batch = arrow::record_batch::RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(run)),
            Arc::new(StringArray::from(dataset)),
            Arc::new(StringArray::from(model)),
            Arc::new(StringArray::from(task)),
            Arc::new(StringArray::from(metric)),
            Arc::new(Float64Array::from(value)),
        ],
    )?;
    // Through the Parquet sink (checked against the contract, staged and moved into place),
    // uncompressed as the table always was.
    let mut sink = ParquetSink::create_uncompressed(path, "bench_results", schema)?;
    sink.write(&batch)?;
    sink.finish()?;
    Ok(())
}
