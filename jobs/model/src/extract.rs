//! `cnclip extract-features` (`extract`): cn_clip's `eval/extract_features.py`, with its flags,
//! as pipelines: images (an LMDB `imgs` directory as cn_clip takes, or TSV shards, a Parquet
//! images table, an image folder) → decode → preprocess → `encode_image`; texts (JSONL or a
//! Parquet texts table) → tokenize → `encode_text`, each pipeline ending in the resumable
//! `write_parts` sink (`operators/src/sinks/parts.rs`).
//!
//! Resumable: rows are written to `{output}.cnclip-parts/part-NNNNN.parquet`, each part synced
//! and recorded in `manifest.json` (with a fingerprint of the checkpoint and the settings)
//! before the next begins. A rerun of the same command keeps the recorded parts, skips their
//! ids at the source (`exclude_ids`, before any decoding: this job calls `parts::resume` before
//! planning and hands the sink a `Prepared`) and goes on; when the input is done, the sink
//! joins the parts, in order, into the output — cn_clip's JSON lines
//! (`{"image_id": …, "feature": […]}`) for `.jsonl`, a feature table for `.parquet` — written
//! atomically, and the parts are removed. Since rows come out in input order, the result equals
//! an uninterrupted run's. Bad images are quarantined to `{output stem}.quarantine.jsonl` (or
//! stop the job with `--on-error fail`).
//!
//! Sharded (`--shard i/n` given, as an array task runs it): the output path is a directory, a
//! table of parts, and this job writes its share as `part-{i:05}-of-{n:05}.parquet` (the feature
//! table, the shard's rows in input order) plus its manifest entry `part-{i:05}-of-{n:05}.json`
//! (the layout is the sink's; `cnclip manifest check` verifies it). The resumable
//! parts live in the hidden `.part-{i:05}-of-{n:05}.cnclip-parts/` inside the directory, the
//! finished part is renamed from there over its previous version and its entry written after
//! it: a rerun replaces its own part and entry, nothing else, whatever the other shards are
//! doing. A rerun of a shard that finished — the whole array resubmitted after a few tasks
//! failed — keeps its part when the entry says it was made by the same cnclip version from the
//! same checkpoint, settings and input files (sizes and modification times), with no record
//! quarantined, and the part has the size and sha256 the entry records; anything else extracts
//! the shard again.
//!
//! One writer per output: a run first claims its output (`staging::WriterLock`, a lock file
//! beside it), so a second run on the same output or shard while the first still runs (an
//! array submitted twice, a task requeued from an unresponsive node) fails at once, naming the
//! first, instead of both writing one work directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cnclip_models::checkpoint::{Checkpoint, Format};
use cnclip_models::encoders::{EncodeImageConfig, EncodeTextConfig, EncoderConfig};
use cnclip_operators::options::{Devices, Precision};
use cnclip_operators::quarantine::OnError;
use cnclip_operators::sinks::parts::{self, Prepared, Target, Tower, WritePartsConfig};
use cnclip_operators::sources::Shard;
use cnclip_operators::spec::{JobSettings, NodeDef, Planner};
use cnclip_operators::transforms::base64::DecodeBase64Config;
use cnclip_operators::transforms::exclude_ids::ExcludeIdsConfig;
use cnclip_operators::transforms::preprocess::PreprocessConfig;
use cnclip_operators::transforms::tokenize::TokenizeConfig;

use crate::model_args::ModelArgs;
use crate::registry;
use cnclip_data_jobs::manifest;
use cnclip_operators::storage;

#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize)]
pub struct Args {
    /// Extract image features.
    #[arg(long)]
    pub extract_image_feats: bool,
    /// Extract text features.
    #[arg(long)]
    pub extract_text_feats: bool,
    /// Images: an LMDB `imgs` directory (cn_clip's), TSV shards (globs), a Parquet images table,
    /// an image folder, or WebDataset `.tar` shards (globs, `{000..099}` patterns, s3:// URLs).
    #[arg(long, num_args = 1..)]
    pub image_data: Vec<String>,
    /// Texts: a cn_clip JSONL file, a Parquet texts table, or WebDataset `.tar` shards (their `.txt` members).
    #[arg(long)]
    pub text_data: Option<String>,
    /// Image features output (`.jsonl`: cn_clip's lines; `.parquet`: a feature table; with
    /// `--shard`, a directory of Parquet parts).
    #[arg(long)]
    pub image_feat_output_path: Option<PathBuf>,
    /// Text features output (`.jsonl`, `.parquet`, or with `--shard` a directory).
    #[arg(long)]
    pub text_feat_output_path: Option<PathBuf>,
    /// Parquet data in another layout (img2dataset, Hugging Face): the column of ids or string keys, e.g. `key`; the features then carry a `key` column.
    #[arg(long)]
    pub id_column: Option<String>,
    /// With --id-column: the image column of --image-data (bytes, base64, or `{bytes, path}` structs), e.g. `jpg` or `image`.
    #[arg(long, requires = "id_column")]
    pub image_column: Option<String>,
    /// With --id-column: the text column of --text-data, e.g. `caption`.
    #[arg(long, requires = "id_column")]
    pub text_column: Option<String>,
    /// Images per encoder batch, on each device (cn_clip's --img-batch-size).
    #[arg(long, default_value_t = 64)]
    pub img_batch_size: usize,
    /// Texts per encoder batch, on each device (cn_clip's --text-batch-size).
    #[arg(long, default_value_t = 64)]
    pub text_batch_size: usize,
    /// Sequence length, [CLS] and [SEP] included (cn_clip's --context-length).
    #[arg(long, default_value_t = 52)]
    pub context_length: usize,
    /// The checkpoint (cn_clip .pt, cnclip .safetensors or a Hugging Face directory).
    #[arg(long)]
    pub resume: PathBuf,
    /// amp (cn_clip's default: fp16 on a GPU, fp32 on the CPU), fp16, fp32 or bf16.
    #[arg(long, value_enum, default_value_t = Precision::Amp)]
    pub precision: Precision,
    /// The architecture of a cn_clip .pt: `--vision-model` and `--text-model` (cn_clip's script's
    /// defaults ViT-B-16 and RoBERTa-wwm-ext-base-chinese), or `--model-config` for other sizes.
    /// cnclip and Hugging Face checkpoints carry their own.
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    /// Accepted for cn_clip compatibility (set RUST_LOG=debug for more logging).
    #[arg(long)]
    pub debug: bool,
    /// Devices, one model replica each: cpu, cuda, cuda:0,cuda:1, cpu,cpu.
    #[arg(long, default_value_t = Devices::cpu())]
    pub devices: Devices,
    /// Decode/preprocess threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub num_workers: usize,
    /// This job's share `i/n` of the input (record k where k mod n = i), as an array task
    /// (`$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`, `$JOB_COMPLETION_INDEX/N`) runs it. The
    /// output paths are then directories: the job writes `part-{i:05}-of-{n:05}.parquet` and
    /// its entry `.json` there (`cnclip manifest check DIR` verifies the whole).
    #[arg(long)]
    pub shard: Option<Shard>,
    /// What to do with a bad image or text: skip it into a quarantine file beside the output, or fail.
    #[arg(long, value_enum, default_value_t = OnError::Skip)]
    pub on_error: OnError,
    /// Rows per part (a crash loses at most one part's work).
    #[arg(long, default_value_t = 50_000)]
    pub part_rows: usize,
}

impl Args {
    /// The options a command line with only the required flags gives (each flag's default).
    pub fn new(resume: PathBuf) -> Self {
        Args {
            extract_image_feats: false,
            extract_text_feats: false,
            image_data: Vec::new(),
            text_data: None,
            image_feat_output_path: None,
            text_feat_output_path: None,
            id_column: None,
            image_column: None,
            text_column: None,
            img_batch_size: 64,
            text_batch_size: 64,
            context_length: 52,
            resume,
            precision: Precision::Amp,
            model: ModelArgs::default(),
            debug: false,
            devices: Devices::cpu(),
            num_workers: 0,
            shard: None,
            on_error: OnError::Skip,
            part_rows: 50_000,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    if !args.extract_image_feats && !args.extract_text_feats {
        bail!("--extract-image-feats and --extract-text-feats cannot both be False!");
    }
    if args.part_rows == 0 {
        bail!("--part-rows must be at least 1");
    }
    let shard = args.shard;
    let sharded_output = |flag: &str, path: &Option<PathBuf>| -> Result<()> {
        match path {
            None if shard.is_some() => {
                bail!("--shard writes a directory of Parquet parts: give {flag} DIR")
            }
            Some(p) if shard.is_some() && p.extension().is_some_and(|e| e == "jsonl") => bail!(
                "{flag} {}: with --shard the output is a directory of Parquet parts (a table), not JSON lines",
                p.display()
            ),
            Some(p) if shard.is_some() && p.exists() && !p.is_dir() => {
                bail!("{flag} {}: with --shard the output is a directory, and this is a file", p.display())
            }
            _ => Ok(()),
        }
    };
    if args.extract_text_feats {
        sharded_output("--text-feat-output-path", &args.text_feat_output_path)?;
    }
    if args.extract_image_feats {
        sharded_output("--image-feat-output-path", &args.image_feat_output_path)?;
    }
    if shard.is_some()
        && args.extract_image_feats
        && args.extract_text_feats
        && args.image_feat_output_path == args.text_feat_output_path
    {
        bail!("--shard: image and text features are two tables, give them two directories");
    }
    cnclip_operators::signals::catch_interrupts()?;
    // cn_clip's defaults apply to its own checkpoints, which do not record their architecture.
    let given = &args.model;
    let cn_clip_defaults = ModelArgs {
        vision_model: Some("ViT-B-16".to_string()),
        text_model: Some("RoBERTa-wwm-ext-base-chinese".to_string()),
        model_config: None,
    };
    let named_by_user = given.config()?;
    let named_for_cn_clip = match given {
        ModelArgs { vision_model: None, text_model: None, model_config: None } => cn_clip_defaults.config()?,
        _ => named_by_user.clone(),
    };
    // Opened once: the towers' encoder nodes take it as it is (and read its weights once).
    // A checkpoint in an object store is opened from its copy in the spool.
    let local = storage::fetch::local_copy(&args.resume).with_context(|| format!("{}", args.resume.display()))?;
    let checkpoint = Checkpoint::open(&local, |format| match format {
        Format::CnClip => named_for_cn_clip,
        _ => named_by_user,
    })
    .with_context(|| format!("{}", args.resume.display()))?;
    let (vision, text) = match (given, checkpoint.format()) {
        (ModelArgs { vision_model: None, text_model: None, model_config: None }, Format::CnClip) => {
            (cn_clip_defaults.vision_model, cn_clip_defaults.text_model)
        }
        _ => (given.vision_model.clone(), given.text_model.clone()),
    };
    let config = checkpoint.config().clone();
    let positions = config.text.text_max_position_embeddings;
    if args.extract_text_feats && (args.context_length == 0 || args.context_length as i64 > positions) {
        bail!("--context-length {}: the model's text tower takes from 1 to {positions} tokens", args.context_length);
    }
    let encoder = EncoderConfig {
        checkpoint: args.resume.clone(),
        vision_model: vision,
        text_model: text,
        model_config: given.model_config.clone(),
        precision: args.precision.to_string(),
        batch_size: 0,
        devices: args.devices.to_string(),
        loaded: Some(std::sync::Arc::new(checkpoint)),
    };
    // The outputs, cn_clip's defaults filled in, checked against each other and the inputs
    // before anything is written: one path for both towers would have the images overwrite
    // the texts, and an output on an input would overwrite the data.
    let text_output = if args.extract_text_feats {
        let data = args.text_data.as_deref().context("--extract-text-feats needs --text-data")?;
        Some(match &args.text_feat_output_path {
            Some(path) => path.clone(),
            None => PathBuf::from(format!("{}.txt_feat.jsonl", data.strip_suffix(".jsonl").unwrap_or(data))),
        })
    } else {
        None
    };
    let image_output = if args.extract_image_feats {
        if args.image_data.is_empty() {
            bail!("--extract-image-feats needs --image-data");
        }
        Some(match &args.image_feat_output_path {
            Some(path) => path.clone(),
            None => {
                // cn_clip's default: beside the texts, `{split}_imgs.img_feat.jsonl`.
                let texts = args.text_data.as_deref().context("give --image-feat-output-path (or --text-data)")?;
                PathBuf::from(format!("{}.img_feat.jsonl", texts.replace("_texts.jsonl", "_imgs")))
            }
        })
    } else {
        None
    };
    check_outputs(&args, text_output.as_deref(), image_output.as_deref())?;
    // cn_clip does texts first, then images.
    if let Some(output) = text_output {
        let encoder = EncoderConfig { batch_size: args.text_batch_size, ..encoder.clone() };
        extract(&args, Tower::Text, &target(&output, shard), &config, encoder)?;
    }
    if let Some(output) = image_output {
        let encoder = EncoderConfig { batch_size: args.img_batch_size, ..encoder };
        extract(&args, Tower::Image, &target(&output, shard), &config, encoder)?;
    }
    Ok(())
}

/// Refuses outputs that would destroy something: the two towers' outputs on one path (the
/// images would overwrite the texts), or an output on an input or the checkpoint.
fn check_outputs(args: &Args, text: Option<&Path>, image: Option<&Path>) -> Result<()> {
    use storage::staging::same_path;
    if let (Some(text), Some(image)) = (text, image)
        && same_path(text, image)
    {
        bail!(
            "the text and image features would both be written to {}: the images would overwrite the texts; give \
             --text-feat-output-path and --image-feat-output-path two paths",
            text.display()
        );
    }
    let inputs: Vec<(&str, PathBuf)> = args
        .text_data
        .iter()
        .map(|t| ("--text-data", PathBuf::from(t)))
        .chain(args.image_data.iter().map(|i| ("--image-data", PathBuf::from(i))))
        .chain([("--resume", args.resume.clone())])
        .collect();
    for (flag, output) in [("--text-feat-output-path", text), ("--image-feat-output-path", image)] {
        let Some(output) = output else { continue };
        for (input_flag, input) in &inputs {
            if same_path(output, input) {
                bail!(
                    "{flag} {} is also {input_flag}: writing the features would overwrite the input; give another \
                     output path",
                    output.display()
                );
            }
        }
    }
    Ok(())
}

fn target(output: &Path, shard: Option<Shard>) -> Target {
    match shard {
        Some(shard) => Target::Shard { dir: output.to_path_buf(), shard },
        None => Target::File(output.to_path_buf()),
    }
}

/// A tower's input, as given.
fn data(args: &Args, tower: Tower) -> Vec<String> {
    match tower {
        Tower::Text => args.text_data.iter().cloned().collect(),
        Tower::Image => args.image_data.clone(),
    }
}

/// The sources and transforms of one tower, up to the encoder, skipping the ids in `done`.
fn nodes(
    args: &Args,
    tower: Tower,
    done: &[PathBuf],
    resolution: usize,
    encoder: EncoderConfig,
) -> Result<Vec<NodeDef>> {
    let exclude = || ExcludeIdsConfig {
        column: tower.id_column().into(),
        tables: done.iter().map(|p| p.display().to_string()).collect(),
    };
    let columns = manifest::Columns {
        id: args.id_column.clone(),
        value: match tower {
            Tower::Image => args.image_column.clone(),
            Tower::Text => args.text_column.clone(),
        },
    };
    let source = manifest::source_with(tower, &data(args, tower), &columns)?;
    let mut defs = vec![source.node, NodeDef::new("todo", Some("source"), exclude())];
    match tower {
        Tower::Text => {
            defs.push(NodeDef::new(
                "tokens",
                Some("todo"),
                TokenizeConfig { context_length: args.context_length, preprocess: true },
            ));
            defs.push(NodeDef::new("features", Some("tokens"), EncodeTextConfig(encoder)));
        }
        Tower::Image => {
            let decoded = if source.base64 {
                defs.push(NodeDef::new("decoded", Some("todo"), DecodeBase64Config {}));
                "decoded"
            } else {
                "todo"
            };
            defs.push(NodeDef::new(
                "pixels",
                Some(decoded),
                PreprocessConfig {
                    resolution,
                    order: source.order,
                    max_pixels: cnclip_operators::decoders::image::DEFAULT_MAX_PIXELS,
                },
            ));
            defs.push(NodeDef::new("features", Some("pixels"), EncodeImageConfig(encoder)));
        }
    }
    Ok(defs)
}

fn extract(
    args: &Args,
    tower: Tower,
    target: &Target,
    config: &cnclip_models::ClipConfig,
    encoder: EncoderConfig,
) -> Result<()> {
    let start = std::time::Instant::now();
    target.prepare()?;
    // One writer at a time: a second run on this output (an array task submitted twice) fails
    // here, naming the first, instead of sharing its work directory.
    let _writer = storage::staging::WriterLock::acquire(&target.output())?;
    let made_from = match target {
        Target::Shard { dir, shard } => {
            let made_from = made_from(args, tower, &encoder)?;
            if let Some(entry) = target.finished(&made_from) {
                eprintln!(
                    "cnclip extract-features: shard {shard} is done: {} ({} {} features, made {}) was made from the same \
                     checkpoint, settings and input; kept (delete it to extract the shard again)",
                    dir.join(&entry.part).display(),
                    entry.rows,
                    tower.name(),
                    entry.created
                );
                return Ok(());
            }
            Some(made_from)
        }
        Target::File(_) => None,
    };
    let fingerprint = fingerprint(args, tower, &encoder)?;
    // The kept parts' ids are skipped at the source, before any decoding.
    let resumed = parts::resume(target, &fingerprint, Some("cnclip extract-features"))?;
    let done = resumed.done();
    let settings = JobSettings {
        on_error: args.on_error,
        quarantine: target.quarantine_path(),
        shard: args.shard.unwrap_or(Shard::ALL).to_string(),
        threads: args.num_workers,
        ..JobSettings::default()
    };
    let resolution = config.vision.image_resolution as usize;
    let (vision_model, text_model) = (args.model.vision_model.clone(), args.model.text_model.clone());
    let mut defs = nodes(args, tower, &done, resolution, encoder)?;
    let (path, sharded) = match target {
        Target::File(output) => (output.clone(), false),
        Target::Shard { dir, .. } => (dir.clone(), true),
    };
    let sink = WritePartsConfig {
        path,
        part_rows: args.part_rows,
        tower,
        sharded: Some(sharded),
        checkpoint: Some(args.resume.display().to_string()),
        source: data(args, tower),
        prepared: Some(Prepared { fingerprint, made_from, vision_model, text_model }),
    };
    defs.push(NodeDef::new("output", Some("features"), sink));
    let registry = registry();
    let report = Planner::new(&registry).plan(settings, defs)?.run()?;
    let quarantined = report.quarantined;
    let rows: u64 = report.written.iter().map(|(_, written)| written.rows).sum();
    eprintln!(
        "cnclip extract-features: {rows} {} features, {quarantined} quarantined{} → {} ({:.1} s){}",
        tower.name(),
        if quarantined > 0 { format!(" (see {})", target.quarantine_path().display()) } else { String::new() },
        target.output().display(),
        start.elapsed().as_secs_f64(),
        if report.storage_requests > 0 {
            format!(
                "; object storage: {} requests, {} failed attempts retried",
                report.storage_requests, report.storage_retries
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// What a shard's part is made from, hashed: this cnclip's version, the tower's own settings,
/// and the checkpoint's and the tower's input files with their sizes and modification times
/// (an LMDB by its `data.mdb`, whose `lock.mdb` changes on every read; a directory by every
/// file under it, symbolic links to directories not followed). A file that cannot be read is
/// recorded as such (the job quarantines or fails on it, as the settings say).
fn made_from(args: &Args, tower: Tower, encoder: &EncoderConfig) -> Result<String> {
    use sha2::Digest;
    let stamps = |given: &[String]| -> Vec<serde_json::Value> {
        cnclip_operators::fingerprint::stamps(given, false)
            .into_iter()
            .map(|s| match s.error {
                None => serde_json::json!([s.path, s.bytes, s.modified]),
                Some(error) => serde_json::json!([s.path, error]),
            })
            .collect()
    };
    let checkpoint = storage::canonicalize(&args.resume).unwrap_or_else(|_| args.resume.clone());
    let mut text = serde_json::json!({
        "cnclip_version": env!("CARGO_PKG_VERSION"),
        "tower": tower.name(),
        "checkpoint": stamps(&[checkpoint.display().to_string()]),
        "vision_model": encoder.vision_model,
        "text_model": encoder.text_model,
        "precision": encoder.precision,
        "devices_kind": encoder.devices.contains("cuda"),
        "context_length": (tower == Tower::Text).then_some(args.context_length),
        "input": stamps(&data(args, tower)),
        "shard": args.shard,
        "on_error": format!("{:?}", args.on_error),
    });
    if let Some(id) = &args.id_column {
        text["columns"] = serde_json::json!([id, args.image_column, args.text_column]);
    }
    Ok(format!("{:x}", sha2::Sha256::digest(text.to_string().as_bytes())))
}

/// What the parts depend on: the checkpoint's bytes and every setting that changes a row.
fn fingerprint(args: &Args, tower: Tower, encoder: &EncoderConfig) -> Result<String> {
    // Size and modification time (an object: size and ETag).
    let stamp = cnclip_operators::fingerprint::Stamp::of(&args.resume, false);
    if let Some(error) = &stamp.error {
        bail!("{}: {error}", args.resume.display());
    }
    let mut fingerprint = serde_json::json!({
        "tower": tower.name(),
        "checkpoint": storage::canonicalize(&args.resume).unwrap_or_else(|_| args.resume.clone()),
        "checkpoint_size": stamp.bytes,
        "checkpoint_modified": stamp.modified,
        "vision_model": encoder.vision_model,
        "text_model": encoder.text_model,
        "precision": encoder.precision,
        "devices_kind": encoder.devices.contains("cuda"),
        "image_data": args.image_data,
        "text_data": args.text_data,
        "context_length": args.context_length,
        "shard": args.shard,
        "on_error": format!("{:?}", args.on_error),
    });
    // Only when given, so the fingerprints of runs without them are those of earlier builds.
    if let Some(id) = &args.id_column {
        fingerprint["columns"] = serde_json::json!([id, args.image_column, args.text_column]);
    }
    if let Some(config) = &encoder.model_config {
        let text = cnclip_operators::sources::read_text(config, cnclip_operators::sources::MAX_TEXT_BYTES)
            .map_err(crate::quoted("--model-config"))?;
        fingerprint["model_config"] = text.into();
    }
    Ok(fingerprint.to_string())
}
