//! `cnclip extract-features` (`extract`): cn_clip's `eval/extract_features.py`, with its flags,
//! as pipelines: images (an LMDB `imgs` directory as cn_clip takes, or TSV shards, a Parquet
//! images table, an image folder) → decode → preprocess → `encode_image`; texts (JSONL or a
//! Parquet texts table) → tokenize → `encode_text`. The encoder's output is streamed to this
//! job, which writes it in parts.
//!
//! Resumable: rows are written to `{output}.cnclip-parts/part-NNNNN.parquet`, each part synced
//! and recorded in `manifest.json` (with a fingerprint of the checkpoint and the settings)
//! before the next begins. A rerun of the same command keeps the recorded parts, skips their
//! ids at the source (`exclude_ids`, before any decoding) and goes on; when the input is done,
//! a second pipeline joins the parts, in order, into the output — cn_clip's JSON lines
//! (`{"image_id": …, "feature": […]}`) for `.jsonl`, a feature table for `.parquet` — written
//! atomically, and the parts are removed. Since rows come out in input order, the result equals
//! an uninterrupted run's. Bad images are quarantined to `{output stem}.quarantine.jsonl` (or
//! stop the job with `--on-error fail`).
//!
//! Sharded (`--shard i/n` given, as an array task runs it): the output path is a directory, a
//! table of parts, and this job writes its share as `part-{i:05}-of-{n:05}.parquet` (the feature
//! table, the shard's rows in input order) plus its manifest entry `part-{i:05}-of-{n:05}.json`
//! (see `manifest.rs`, which defines the layout and `cnclip manifest check`). The resumable
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
use cnclip_models::checkpoint::{Format, architecture};
use cnclip_models::encoders::{EncodeImageConfig, EncodeTextConfig, EncoderConfig};
use cnclip_operators::options::{Devices, Precision};
use cnclip_operators::quarantine::OnError;
use cnclip_operators::sinks::parquet::ParquetSink;
use cnclip_operators::sources::Shard;
use cnclip_operators::spec::builtin::{
    DecodeBase64Config, ExcludeIdsConfig, ParquetConfig, PreprocessConfig, TokenizeConfig, WriteJsonlConfig,
    WriteParquetConfig,
};
use cnclip_operators::spec::{JobSettings, NodeDef, Planner};
use cnclip_schemas::metadata;
use serde::{Deserialize, Serialize};

use crate::registry;
use cnclip_data_jobs::manifest::{self, Tower};

#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize)]
pub struct Args {
    /// Extract image features.
    #[arg(long)]
    pub extract_image_feats: bool,
    /// Extract text features.
    #[arg(long)]
    pub extract_text_feats: bool,
    /// Images: an LMDB `imgs` directory (cn_clip's), TSV shards (globs), a Parquet images table
    /// or an image folder.
    #[arg(long, num_args = 1..)]
    pub image_data: Vec<String>,
    /// Texts: a cn_clip JSONL file or a Parquet texts table.
    #[arg(long)]
    pub text_data: Option<String>,
    /// Image features output (`.jsonl`: cn_clip's lines; `.parquet`: a feature table; with
    /// `--shard`, a directory of Parquet parts).
    #[arg(long)]
    pub image_feat_output_path: Option<PathBuf>,
    /// Text features output (`.jsonl`, `.parquet`, or with `--shard` a directory).
    #[arg(long)]
    pub text_feat_output_path: Option<PathBuf>,
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
    /// Vision tower of a cn_clip .pt (default ViT-B-16, as cn_clip's script).
    #[arg(long)]
    pub vision_model: Option<String>,
    /// Text tower of a cn_clip .pt (default RoBERTa-wwm-ext-base-chinese).
    #[arg(long)]
    pub text_model: Option<String>,
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
    pub shard: Option<String>,
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
            img_batch_size: 64,
            text_batch_size: 64,
            context_length: 52,
            resume,
            precision: Precision::Amp,
            vision_model: None,
            text_model: None,
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
    let shard = args.shard.as_deref().map(str::parse::<Shard>).transpose().context("--shard")?;
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
    let (vision, text) = match (&args.vision_model, &args.text_model, Format::detect(&args.resume)) {
        (None, None, Format::CnClip) => {
            (Some("ViT-B-16".to_string()), Some("RoBERTa-wwm-ext-base-chinese".to_string()))
        }
        (v, t, _) => (v.clone(), t.clone()),
    };
    let named = match (&vision, &text) {
        (Some(v), Some(t)) => Some(cnclip_models::ClipConfig::from_name(&format!("{v}@{t}"))?),
        (None, None) => None,
        _ => bail!("--vision-model and --text-model go together"),
    };
    let config = architecture(&args.resume, named.as_ref()).with_context(|| format!("{}", args.resume.display()))?;
    let positions = config.text.text_max_position_embeddings;
    if args.extract_text_feats && (args.context_length == 0 || args.context_length as i64 > positions) {
        bail!("--context-length {}: the model's text tower takes from 1 to {positions} tokens", args.context_length);
    }
    let encoder = EncoderConfig {
        checkpoint: args.resume.clone(),
        vision_model: vision,
        text_model: text,
        precision: args.precision.to_string(),
        batch_size: 0,
        devices: args.devices.to_string(),
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

/// What a part directory was made with: a rerun with anything else starts over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    fingerprint: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Part {
    file: String,
    rows: u64,
    first_id: Option<i64>,
    last_id: Option<i64>,
}

/// Where a tower's features go: one file, or a shard's part of a directory.
enum Target {
    File(PathBuf),
    Shard { dir: PathBuf, shard: Shard },
}

/// Refuses outputs that would destroy something: the two towers' outputs on one path (the
/// images would overwrite the texts), or an output on an input or the checkpoint.
fn check_outputs(args: &Args, text: Option<&Path>, image: Option<&Path>) -> Result<()> {
    use cnclip_operators::staging::same_path;
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

impl Target {
    /// The resumable parts' directory.
    fn parts_dir(&self) -> PathBuf {
        match self {
            Target::File(output) => {
                let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                output.with_file_name(format!("{name}.cnclip-parts"))
            }
            Target::Shard { dir, shard } => manifest::work_dir(dir, *shard),
        }
    }

    fn quarantine_path(&self) -> PathBuf {
        match self {
            Target::File(output) => output.with_extension("quarantine.jsonl"),
            Target::Shard { dir, shard } => manifest::quarantine_path(dir, *shard),
        }
    }

    /// What the parts are joined into: the output, or the shard's part, in its work directory
    /// until [`publish`] moves it into place.
    fn joined(&self) -> PathBuf {
        match self {
            Target::File(output) => output.clone(),
            Target::Shard { shard, .. } => self.parts_dir().join(format!("{}.parquet", manifest::part_stem(*shard))),
        }
    }

    /// Where the features end up.
    fn output(&self) -> PathBuf {
        match self {
            Target::File(output) => output.clone(),
            Target::Shard { dir, shard } => dir.join(format!("{}.parquet", manifest::part_stem(*shard))),
        }
    }
}

/// A sharded output directory, ready for shard `shard`: created if need be, and holding no
/// other split's parts (a table is one split; mixing `n` would leave ids twice or never).
fn prepare_shard_dir(dir: &Path, shard: Shard) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let others: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            manifest::parse_name(name).is_some_and(|(s, kind)| {
                s.count != shard.count && matches!(kind, manifest::FileKind::Part | manifest::FileKind::Entry)
            })
        })
        .collect();
    if let Some(other) = others.first() {
        bail!(
            "{} holds parts of another split ({other}, …): --shard {shard} would mix two splits in one table; \
             remove them or use the same n",
            dir.display()
        );
    }
    Ok(())
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
    let source = manifest::source(tower, &data(args, tower))?;
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
    match target {
        Target::Shard { dir, shard } => prepare_shard_dir(dir, *shard)?,
        Target::File(output) => {
            if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
        }
    }
    // One writer at a time: a second run on this output (an array task submitted twice) fails
    // here, naming the first, instead of sharing its work directory.
    let _writer = cnclip_operators::staging::WriterLock::acquire(&target.output())?;
    let made_from = match target {
        Target::Shard { dir, shard } => {
            let made_from = made_from(args, tower, &encoder)?;
            if let Some(entry) = finished(dir, *shard, &made_from) {
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
    let dir = target.parts_dir();
    let fingerprint = fingerprint(args, tower, &encoder)?;
    let manifest_path = dir.join("manifest.json");
    let mut manifest =
        match std::fs::read(&manifest_path).ok().and_then(|b| serde_json::from_slice::<Manifest>(&b).ok()) {
            Some(m) if m.fingerprint == fingerprint && m.parts.iter().all(|p| dir.join(&p.file).is_file()) => m,
            found => {
                if found.is_some() {
                    eprintln!("cnclip extract-features: {} was made with other settings: starting over", dir.display());
                }
                let _ = std::fs::remove_dir_all(&dir);
                Manifest { fingerprint: fingerprint.clone(), parts: Vec::new() }
            }
        };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Files in the directory that no recorded part names are a crashed run's partial part.
    for entry in std::fs::read_dir(&dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "manifest.json" && !manifest.parts.iter().any(|p| p.file == name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let done: Vec<PathBuf> = manifest.parts.iter().map(|p| dir.join(&p.file)).collect();
    let resumed = manifest.parts.iter().map(|p| p.rows).sum::<u64>();
    if resumed > 0 {
        eprintln!("cnclip extract-features: resuming after {} parts ({resumed} rows)", manifest.parts.len());
    }
    let settings = JobSettings {
        on_error: args.on_error,
        quarantine: target.quarantine_path(),
        shard: args.shard.clone().unwrap_or_else(|| Shard::ALL.to_string()),
        threads: args.num_workers,
        ..JobSettings::default()
    };
    let resolution = config.vision.image_resolution as usize;
    let defs = nodes(args, tower, &done, resolution, encoder)?;
    let registry = registry();
    let pipeline = Planner::new(&registry).stream("features").plan(settings, defs)?;
    let mut stream = pipeline.stream()?;
    let mut parts = PartWriter { dir: &dir, manifest_path: &manifest_path, schema: stream.schema(), open: None };
    for batch in stream.by_ref() {
        let mut batch = batch?;
        // Each batch goes straight into the open part: memory stays one row group whatever the
        // part size or corpus.
        while batch.num_rows() > 0 {
            let written = parts.open.as_ref().map_or(0, |p| p.rows);
            let take = batch.num_rows().min(args.part_rows - written);
            parts.write(&batch.slice(0, take), &manifest)?;
            batch = batch.slice(take, batch.num_rows() - take);
            if written + take == args.part_rows {
                parts.finish(&mut manifest)?;
            }
        }
    }
    let quarantined = stream.report().map_or(0, |r| r.quarantined);
    drop(stream);
    if manifest.parts.is_empty() && parts.open.is_none() {
        // No rows at all: still one (empty) part, so the output exists with its schema.
        parts.write(&arrow::record_batch::RecordBatch::new_empty(parts.schema.clone()), &manifest)?;
    }
    parts.finish(&mut manifest)?;
    let rows: u64 = manifest.parts.iter().map(|p| p.rows).sum();

    // The parts, in order, into the output.
    let parts: Vec<String> = manifest.parts.iter().map(|p| dir.join(&p.file).display().to_string()).collect();
    let joined = target.joined();
    let sink = if joined.extension().is_some_and(|e| e == "parquet") {
        NodeDef::new("output", Some("parts"), WriteParquetConfig { path: joined.clone() })
    } else {
        let rename = [("id".to_string(), tower.id_column().to_string())].into_iter().collect();
        NodeDef::new("output", Some("parts"), WriteJsonlConfig { path: joined.clone(), rename })
    };
    let join = Planner::new(&registry).plan(
        JobSettings { quarantine: dir.join("join-quarantine.jsonl"), ..JobSettings::default() },
        vec![NodeDef::new("parts", None, ParquetConfig { paths: parts, table: None, dedupe: false }), sink],
    )?;
    join.run()?;
    if let Target::Shard { dir: output, shard } = target {
        let made_from = made_from.as_deref().unwrap_or_default();
        publish(args, tower, output, *shard, &joined, quarantined as u64, made_from)?;
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    eprintln!(
        "cnclip extract-features: {rows} {} features, {quarantined} quarantined{} → {} ({:.1} s)",
        tower.name(),
        if quarantined > 0 { format!(" (see {})", target.quarantine_path().display()) } else { String::new() },
        target.output().display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Moves a shard's finished part (`joined`, in its work directory) into `dir` over its previous
/// version, then writes its entry. The old entry goes first: at no moment does an entry vouch
/// for a part it does not describe, and a crash in between leaves a part without an entry,
/// which `manifest check` names (and a rerun repairs).
fn publish(
    args: &Args,
    tower: Tower,
    dir: &Path,
    shard: Shard,
    joined: &Path,
    quarantined: u64,
    made_from: &str,
) -> Result<()> {
    let part = manifest::inspect_part(joined).with_context(|| format!("reading back {}", joined.display()))?;
    let meta = |key: &str| part.metadata.get(key).cloned();
    let model = meta(metadata::MODEL).unwrap_or_default();
    let (vision_model, text_model) = match model.split_once('@') {
        Some((v, t)) => (Some(v.to_string()), Some(t.to_string())),
        None => (args.vision_model.clone(), args.text_model.clone()),
    };
    let stem = manifest::part_stem(shard);
    let entry = manifest::Entry {
        format: manifest::ENTRY_FORMAT.into(),
        shard: shard.to_string(),
        index: shard.index,
        count: shard.count,
        part: format!("{stem}.parquet"),
        rows: part.rows,
        first_id: part.ids.first().copied(),
        last_id: part.ids.last().copied(),
        min_id: part.ids.iter().min().copied(),
        max_id: part.ids.iter().max().copied(),
        bytes: part.bytes,
        sha256: part.sha256.clone(),
        tower,
        model,
        vision_model,
        text_model,
        precision: meta(metadata::PRECISION).unwrap_or_default(),
        dim: meta(metadata::DIM).and_then(|d| d.parse().ok()),
        checkpoint: args.resume.display().to_string(),
        checkpoint_sha256: meta(metadata::CHECKPOINT_SHA256).unwrap_or_default(),
        source: data(args, tower),
        quarantined,
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        cnclip_version: env!("CARGO_PKG_VERSION").into(),
        job: manifest::JOB_VARIABLES
            .iter()
            .filter_map(|var| std::env::var(var).ok().map(|value| (var.to_string(), value)))
            .collect(),
        made_from: Some(made_from.to_string()),
    };
    let (part_path, entry_path) = (dir.join(&entry.part), dir.join(format!("{stem}.json")));
    match std::fs::remove_file(&entry_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", entry_path.display()));
        }
        _ => {}
    }
    std::fs::rename(joined, &part_path).with_context(|| format!("moving {} into place", part_path.display()))?;
    let mut json = serde_json::to_vec_pretty(&entry)?;
    json.push(b'\n');
    cnclip_operators::write_atomically(&entry_path, |f| std::io::Write::write_all(f, &json))?;
    if quarantined == 0 {
        // A previous run's bad records, which this run no longer met.
        let _ = std::fs::remove_file(manifest::quarantine_path(dir, shard));
    }
    Ok(())
}

/// Rows per row group in a part: parts are read back in order by the final join, and a
/// writer buffers one group, so small groups keep memory flat.
const PART_ROW_GROUP_BYTES: usize = 8 << 20;

/// The part being written and where finished ones are recorded.
struct PartWriter<'a> {
    dir: &'a Path,
    manifest_path: &'a Path,
    schema: arrow::datatypes::SchemaRef,
    open: Option<OpenPart>,
}

struct OpenPart {
    file: String,
    sink: ParquetSink,
    rows: usize,
    first_id: Option<i64>,
    last_id: Option<i64>,
}

impl PartWriter<'_> {
    /// Appends `batch` to the open part, starting the next part if none is open.
    fn write(&mut self, batch: &arrow::record_batch::RecordBatch, manifest: &Manifest) -> Result<()> {
        if self.open.is_none() {
            let file = format!("part-{:05}.parquet", manifest.parts.len());
            let sink = ParquetSink::create_with_row_group_bytes(
                &self.dir.join(&file),
                "features",
                self.schema.clone(),
                PART_ROW_GROUP_BYTES,
            )?;
            self.open = Some(OpenPart { file, sink, rows: 0, first_id: None, last_id: None });
        }
        let part = self.open.as_mut().expect("opened above");
        part.sink.write(batch)?;
        let ids = batch.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().context("id column")?;
        if !ids.is_empty() {
            part.first_id = part.first_id.or(Some(ids.value(0)));
            part.last_id = Some(ids.value(ids.len() - 1));
        }
        part.rows += batch.num_rows();
        Ok(())
    }

    /// Closes the open part (synced, renamed into place) and records it in the manifest.
    fn finish(&mut self, manifest: &mut Manifest) -> Result<()> {
        let Some(part) = self.open.take() else { return Ok(()) };
        part.sink.finish()?;
        manifest.parts.push(Part {
            file: part.file,
            rows: part.rows as u64,
            first_id: part.first_id,
            last_id: part.last_id,
        });
        let json = serde_json::to_vec_pretty(manifest)?;
        cnclip_operators::write_atomically(self.manifest_path, |f| std::io::Write::write_all(f, &json))?;
        Ok(())
    }
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
    let checkpoint = std::fs::canonicalize(&args.resume).unwrap_or_else(|_| args.resume.clone());
    let text = serde_json::json!({
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
    })
    .to_string();
    Ok(format!("{:x}", sha2::Sha256::digest(text.as_bytes())))
}

/// Shard `shard`'s entry in `dir`, if it vouches for a part made from `made_from`, with no
/// record quarantined (a rerun retries those), that is there with the size and sha256 it
/// records (reading the part costs far less than extracting it again).
fn finished(dir: &Path, shard: Shard, made_from: &str) -> Option<manifest::Entry> {
    let stem = manifest::part_stem(shard);
    let entry: manifest::Entry = serde_json::from_slice(&std::fs::read(dir.join(format!("{stem}.json"))).ok()?).ok()?;
    let ours = entry.made_from.as_deref() == Some(made_from)
        && entry.quarantined == 0
        && entry.part == format!("{stem}.parquet")
        && std::fs::metadata(dir.join(&entry.part)).ok()?.len() == entry.bytes;
    if !ours {
        return None;
    }
    let (sha256, _) = manifest::sha256_file(&dir.join(&entry.part)).ok()?;
    (sha256 == entry.sha256).then_some(entry)
}

/// What the parts depend on: the checkpoint's bytes and every setting that changes a row.
fn fingerprint(args: &Args, tower: Tower, encoder: &EncoderConfig) -> Result<String> {
    let (size, modified) = std::fs::metadata(&args.resume)
        .map(|m| (m.len(), m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())))
        .with_context(|| format!("{}", args.resume.display()))?;
    Ok(serde_json::json!({
        "tower": tower.name(),
        "checkpoint": std::fs::canonicalize(&args.resume).unwrap_or_else(|_| args.resume.clone()),
        "checkpoint_size": size,
        "checkpoint_modified": modified.map(|d| d.as_nanos().to_string()),
        "vision_model": encoder.vision_model,
        "text_model": encoder.text_model,
        "precision": encoder.precision,
        "devices_kind": encoder.devices.contains("cuda"),
        "image_data": args.image_data,
        "text_data": args.text_data,
        "context_length": args.context_length,
        "shard": args.shard,
        "on_error": format!("{:?}", args.on_error),
    })
    .to_string())
}
