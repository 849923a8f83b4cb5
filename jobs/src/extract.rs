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

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cnclip_models::checkpoint::{Format, architecture};
use cnclip_models::encoders::{EncodeImageConfig, EncodeTextConfig, EncoderConfig};
use cnclip_operators::quarantine::OnError;
use cnclip_operators::sinks::parquet::ParquetSink;
use cnclip_operators::sources::lmdb::Database;
use cnclip_operators::spec::builtin::{
    DecodeBase64Config, ExcludeIdsConfig, ImageFolderConfig, JsonlConfig, LmdbConfig, ParquetConfig, PreprocessConfig,
    TokenizeConfig, TsvConfig, WriteJsonlConfig, WriteParquetConfig,
};
use cnclip_operators::spec::{JobSettings, NodeDef, Planner};
use cnclip_operators::transforms::preprocess::Order;
use serde::{Deserialize, Serialize};

use crate::registry;

#[derive(clap::Args)]
pub struct Args {
    /// Extract image features.
    #[arg(long)]
    extract_image_feats: bool,
    /// Extract text features.
    #[arg(long)]
    extract_text_feats: bool,
    /// Images: an LMDB `imgs` directory (cn_clip's), TSV shards (globs), a Parquet images table
    /// or an image folder.
    #[arg(long, num_args = 1..)]
    image_data: Vec<String>,
    /// Texts: a cn_clip JSONL file or a Parquet texts table.
    #[arg(long)]
    text_data: Option<String>,
    /// Image features output (`.jsonl`: cn_clip's lines; `.parquet`: a feature table).
    #[arg(long)]
    image_feat_output_path: Option<PathBuf>,
    /// Text features output (`.jsonl` or `.parquet`).
    #[arg(long)]
    text_feat_output_path: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    img_batch_size: usize,
    #[arg(long, default_value_t = 64)]
    text_batch_size: usize,
    #[arg(long, default_value_t = 52)]
    context_length: usize,
    /// The checkpoint (cn_clip .pt, cnclip .safetensors or a Hugging Face directory).
    #[arg(long)]
    resume: PathBuf,
    /// amp (cn_clip's default: fp16 on a GPU, fp32 on the CPU), fp16, fp32 or bf16.
    #[arg(long, default_value = "amp")]
    precision: String,
    /// Vision tower of a cn_clip .pt (default ViT-B-16, as cn_clip's script).
    #[arg(long)]
    vision_model: Option<String>,
    /// Text tower of a cn_clip .pt (default RoBERTa-wwm-ext-base-chinese).
    #[arg(long)]
    text_model: Option<String>,
    /// Accepted for cn_clip compatibility (set RUST_LOG=debug for more logging).
    #[arg(long)]
    debug: bool,
    /// Devices, one model replica each: cpu, cuda, cuda:0,cuda:1, cpu,cpu.
    #[arg(long, default_value = "cpu")]
    devices: String,
    /// Decode/preprocess threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    num_workers: usize,
    /// This job's share `i/n` of the input.
    #[arg(long, default_value = "0/1")]
    shard: String,
    #[arg(long, value_enum, default_value_t = OnError::Skip)]
    on_error: OnError,
    /// Rows per part (a crash loses at most one part's work).
    #[arg(long, default_value_t = 50_000)]
    part_rows: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tower {
    Image,
    Text,
}

impl Tower {
    fn id_column(self) -> &'static str {
        match self {
            Tower::Image => "image_id",
            Tower::Text => "text_id",
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
    let encoder = EncoderConfig {
        checkpoint: args.resume.clone(),
        vision_model: vision,
        text_model: text,
        precision: args.precision.clone(),
        batch_size: 0,
        devices: args.devices.clone(),
    };
    // cn_clip does texts first, then images.
    if args.extract_text_feats {
        let data = args.text_data.as_deref().context("--extract-text-feats needs --text-data")?;
        let output = match &args.text_feat_output_path {
            Some(path) => path.clone(),
            None => PathBuf::from(format!("{}.txt_feat.jsonl", data.strip_suffix(".jsonl").unwrap_or(data))),
        };
        let encoder = EncoderConfig { batch_size: args.text_batch_size, ..encoder.clone() };
        extract(&args, Tower::Text, &output, &config, encoder)?;
    }
    if args.extract_image_feats {
        if args.image_data.is_empty() {
            bail!("--extract-image-feats needs --image-data");
        }
        let output = match &args.image_feat_output_path {
            Some(path) => path.clone(),
            None => {
                // cn_clip's default: beside the texts, `{split}_imgs.img_feat.jsonl`.
                let texts = args.text_data.as_deref().context("give --image-feat-output-path (or --text-data)")?;
                PathBuf::from(format!("{}.img_feat.jsonl", texts.replace("_texts.jsonl", "_imgs")))
            }
        };
        let encoder = EncoderConfig { batch_size: args.img_batch_size, ..encoder };
        extract(&args, Tower::Image, &output, &config, encoder)?;
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

fn parts_dir(output: &Path) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    output.with_file_name(format!("{name}.cnclip-parts"))
}

fn quarantine_path(output: &Path) -> PathBuf {
    output.with_extension("quarantine.jsonl")
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
    let mut defs = Vec::new();
    match tower {
        Tower::Text => {
            let data = args.text_data.clone().expect("checked by run");
            if data.ends_with(".parquet") {
                defs.push(NodeDef::new(
                    "texts",
                    None,
                    ParquetConfig { paths: vec![data], table: Some("texts".into()), dedupe: true },
                ));
            } else {
                defs.push(NodeDef::new(
                    "texts",
                    None,
                    JsonlConfig {
                        paths: vec![data],
                        dedupe: true,
                        max_record_bytes: cnclip_operators::sources::MAX_RECORD_BYTES,
                    },
                ));
            }
            defs.push(NodeDef::new("todo", Some("texts"), exclude()));
            defs.push(NodeDef::new(
                "tokens",
                Some("todo"),
                TokenizeConfig { context_length: args.context_length, preprocess: true },
            ));
            defs.push(NodeDef::new("features", Some("tokens"), EncodeTextConfig(encoder)));
        }
        Tower::Image => {
            let first = Path::new(&args.image_data[0]);
            let lmdb_split = if first.join("data.mdb").is_file() {
                first.parent().map(Path::to_path_buf)
            } else if first.join("imgs").join("data.mdb").is_file() {
                Some(first.to_path_buf())
            } else {
                None
            };
            let (decoded, order) = if let Some(split) = lmdb_split {
                if args.image_data.len() > 1 {
                    bail!("--image-data: give one LMDB directory");
                }
                defs.push(NodeDef::new("images", None, LmdbConfig { path: split, database: Database::Imgs }));
                defs.push(NodeDef::new("todo", Some("images"), exclude()));
                defs.push(NodeDef::new("decoded", Some("todo"), DecodeBase64Config {}));
                ("decoded", Order::ResizeThenConvert)
            } else if first.is_dir() {
                defs.push(NodeDef::new("images", None, ImageFolderConfig { path: first.to_path_buf() }));
                defs.push(NodeDef::new("todo", Some("images"), exclude()));
                // torchvision's ImageFolder loader converts to RGB before the transform resizes.
                ("todo", Order::ConvertThenResize)
            } else if args.image_data.iter().all(|p| p.ends_with(".parquet")) {
                defs.push(NodeDef::new(
                    "images",
                    None,
                    ParquetConfig { paths: args.image_data.clone(), table: Some("images".into()), dedupe: true },
                ));
                defs.push(NodeDef::new("todo", Some("images"), exclude()));
                ("todo", Order::ResizeThenConvert)
            } else {
                defs.push(NodeDef::new(
                    "images",
                    None,
                    TsvConfig {
                        paths: args.image_data.clone(),
                        dedupe: true,
                        max_record_bytes: cnclip_operators::sources::MAX_RECORD_BYTES,
                    },
                ));
                defs.push(NodeDef::new("todo", Some("images"), exclude()));
                defs.push(NodeDef::new("decoded", Some("todo"), DecodeBase64Config {}));
                ("decoded", Order::ResizeThenConvert)
            };
            defs.push(NodeDef::new(
                "pixels",
                Some(decoded),
                PreprocessConfig {
                    resolution,
                    order,
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
    output: &Path,
    config: &cnclip_models::ClipConfig,
    encoder: EncoderConfig,
) -> Result<()> {
    let start = std::time::Instant::now();
    let dir = parts_dir(output);
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
        quarantine: quarantine_path(output),
        shard: args.shard.clone(),
        threads: args.num_workers,
        ..JobSettings::default()
    };
    let resolution = config.vision.image_resolution as usize;
    let defs = nodes(args, tower, &done, resolution, encoder)?;
    let registry = registry();
    let pipeline = Planner::new(&registry)
        .stream("features")
        .plan(settings, defs)
        .map_err(|problems| anyhow::anyhow!("{}", problems.join("; ")))?;
    let mut stream = pipeline.stream()?;
    let mut parts = PartWriter { dir: &dir, manifest_path: &manifest_path, schema: stream.schema(), open: None };
    for batch in stream.by_ref() {
        if let Some(signal) = cnclip_operators::signals::interrupted() {
            return Err(cnclip_operators::Error::Interrupted { signal }.into());
        }
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
    let sink = if output.extension().is_some_and(|e| e == "parquet") {
        NodeDef::new("output", Some("parts"), WriteParquetConfig { path: output.to_path_buf() })
    } else {
        let rename = [("id".to_string(), tower.id_column().to_string())].into_iter().collect();
        NodeDef::new("output", Some("parts"), WriteJsonlConfig { path: output.to_path_buf(), rename })
    };
    let join = Planner::new(&registry)
        .plan(
            JobSettings { quarantine: dir.join("join-quarantine.jsonl"), ..JobSettings::default() },
            vec![NodeDef::new("parts", None, ParquetConfig { paths: parts, table: None, dedupe: false }), sink],
        )
        .map_err(|problems| anyhow::anyhow!("{}", problems.join("; ")))?;
    join.run()?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    let what = if tower == Tower::Image { "image" } else { "text" };
    eprintln!(
        "cnclip extract-features: {rows} {what} features, {quarantined} quarantined{} → {} ({:.1} s)",
        if quarantined > 0 { format!(" (see {})", quarantine_path(output).display()) } else { String::new() },
        output.display(),
        start.elapsed().as_secs_f64()
    );
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

/// What the parts depend on: the checkpoint's bytes and every setting that changes a row.
fn fingerprint(args: &Args, tower: Tower, encoder: &EncoderConfig) -> Result<String> {
    let (size, modified) = std::fs::metadata(&args.resume)
        .map(|m| (m.len(), m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())))
        .with_context(|| format!("{}", args.resume.display()))?;
    Ok(serde_json::json!({
        "tower": if tower == Tower::Image { "image" } else { "text" },
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
