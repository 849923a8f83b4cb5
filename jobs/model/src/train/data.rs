//! Training and validation data given in other layouts than cn_clip's LMDB split: cn_clip's
//! `{split}_imgs.tsv` + `{split}_texts.jsonl` (what `build_lmdb_dataset.py` reads) or our
//! Parquet tables (`{split}_images.parquet` + `{split}_pairs.parquet` or `_texts.parquet`).
//! They are serialized once into an LMDB split under the run's directory by the same jobs
//! users run (`build-lmdb`, `export --format lmdb`), and reused while the inputs are
//! unchanged: training then reads every layout as cn_clip's `LMDBDataset` reads, with its
//! random access by pair index and the same pairs order. Bad records are quarantined there
//! (`{split}/quarantine.jsonl`), as `build-lmdb` does.
//!
//! WebDataset shards (`.tar` files, globs or brace patterns, local or in an object store) are
//! not copied: one pass writes their `locations` index (where each sample's image and text lie,
//! `{flag}/locations.parquet`, samples without both quarantined beside it) and training reads
//! the shards through it (the `train_shards` source), by ranged reads in cn_clip's sampler
//! order or as a shuffled stream (`--shuffle-buffer`). Parquet files in another project's layout
//! (img2dataset, Hugging Face; `--image-column`, `--text-column`, `--id-column`) are read in
//! place the same way, a file a shard and a row a sample, counted from their footers.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::log::Log;
use cnclip_data_jobs::{build_lmdb, command_line, import};
use cnclip_operators::fingerprint::{self, Stamp};
use cnclip_operators::quarantine::OnError;
use cnclip_operators::sinks::lmdb::LmdbWriterKind;
use cnclip_operators::sinks::parquet::WriteParquetConfig;
use cnclip_operators::sources::lmdb::counts;
use cnclip_operators::sources::train_parquet::{Columns, samples_in};
use cnclip_operators::sources::webdataset::{WebDatasetConfig, WebDatasetTable, is_shard_path};
use cnclip_operators::spec::{JobSettings, NodeDef, Planner};
use cnclip_operators::storage;

/// What a run trains or validates on.
#[derive(Debug, Clone)]
pub enum TrainData {
    /// A cn_clip LMDB split (given, or serialized from another layout).
    Lmdb(PathBuf),
    /// WebDataset shards as given, with their `locations` index and its sample count.
    Shards { shards: String, index: PathBuf, samples: usize },
    /// Parquet files in another project's layout, read by their columns in place.
    Parquet { files: String, columns: Columns, samples: usize },
}

impl TrainData {
    /// Its samples (`pairs` of an LMDB split).
    pub fn samples(&self) -> Result<usize> {
        match self {
            TrainData::Lmdb(split) => {
                let (_, pairs) = counts(split).with_context(|| format!("{}", split.display()))?;
                Ok(pairs as usize)
            }
            TrainData::Shards { samples, .. } | TrainData::Parquet { samples, .. } => Ok(*samples),
        }
    }

    /// Where it is, for messages.
    pub fn describe(&self) -> String {
        match self {
            TrainData::Lmdb(split) => split.display().to_string(),
            TrainData::Shards { shards, .. } => shards.clone(),
            TrainData::Parquet { files, .. } => files.clone(),
        }
    }
}

/// What to train on for `--train-data`/`--val-data` `given`: an LMDB split as it is, shards
/// through their index (made under `cache` when missing or stale), any other layout serialized
/// into an LMDB split under `cache`.
pub fn prepare(given: &Path, columns: Option<&Columns>, cache: &Path, flag: &str, log: &mut Log) -> Result<TrainData> {
    let text = given.to_string_lossy();
    if let Some(columns) = columns {
        if !text.ends_with(".parquet") {
            bail!("{flag} {text}: --image-column and --text-column read Parquet files (.parquet, globs of them)");
        }
        let samples = samples_in(&[text.to_string()], columns).with_context(|| format!("{flag} {text}"))?;
        log.info(&format!("{flag}: reading the Parquet files {text} in place by their columns ({samples} rows)"));
        return Ok(TrainData::Parquet { files: text.to_string(), columns: columns.clone(), samples });
    }
    if is_shard_path(&text) {
        return shard_index(&text, cache, flag, log);
    }
    lmdb_split(given, cache, flag, log).map(TrainData::Lmdb)
}

/// Indexes the WebDataset shards `given` (once while they are unchanged: their sizes and
/// modification times or ETags are the fingerprint) through a pipeline: the `webdataset`
/// source's `locations` table → `write_parquet`.
fn shard_index(given: &str, cache: &Path, flag: &str, log: &mut Log) -> Result<TrainData> {
    let files = fingerprint::files_of(&[given.to_string()]);
    if files.is_empty() {
        bail!("{flag} {given}: no shards match");
    }
    let stamps: Vec<Stamp> = files.iter().map(|f| Stamp::of(f, false)).collect();
    if let Some(bad) = stamps.iter().find(|s| s.error.is_some()) {
        bail!("{flag} {given}: {} cannot be read ({})", bad.path.display(), bad.error.as_deref().unwrap_or_default());
    }
    let fingerprint = serde_json::json!({ "shards": given, "files": stamps }).to_string();
    let out = cache.join(flag.trim_start_matches('-'));
    let (index, marker) = (out.join("locations.parquet"), out.join("source.json"));
    let samples = |index: &Path| -> Result<usize> {
        let file = storage::open(index)?;
        let meta = parquet::file::reader::FileReader::metadata(
            &parquet::file::serialized_reader::SerializedFileReader::new(file)?,
        )
        .file_metadata()
        .num_rows();
        Ok(meta as usize)
    };
    if index.is_file() && storage::read_to_string(&marker).is_ok_and(|m| m == fingerprint) {
        let samples = samples(&index)?;
        log.info(&format!("{flag}: reusing the index {} of {given} ({samples} samples)", index.display()));
        return Ok(TrainData::Shards { shards: given.to_string(), index, samples });
    }
    let _ = storage::remove_dir_all(&out);
    storage::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    log.info(&format!("{flag}: indexing the WebDataset shards {given} ({} files) → {}", files.len(), index.display()));
    let quarantine = out.join("quarantine.jsonl");
    let defs = vec![
        NodeDef::new("shards", None, WebDatasetConfig::new(vec![given.to_string()], WebDatasetTable::Locations)),
        NodeDef::new("index", Some("shards"), WriteParquetConfig { path: index.clone() }),
    ];
    let settings = JobSettings { quarantine: quarantine.clone(), ..JobSettings::default() };
    let registry = crate::registry();
    let report = Planner::new(&registry).plan(settings, defs)?.run()?;
    let samples = samples(&index)?;
    if report.quarantined > 0 {
        log.info(&format!(
            "{flag}: {} samples without an image or a text member left out (see {})",
            report.quarantined,
            quarantine.display()
        ));
    }
    cnclip_operators::write_atomically(&marker, |f| std::io::Write::write_all(f, fingerprint.as_bytes()))?;
    Ok(TrainData::Shards { shards: given.to_string(), index, samples })
}

/// The LMDB split to train on for `--train-data`/`--val-data` `given`, serializing it under
/// `cache` first when it is not one already.
fn lmdb_split(given: &Path, cache: &Path, flag: &str, log: &mut Log) -> Result<PathBuf> {
    if cnclip_operators::sources::lmdb::is_split(given) {
        return Ok(given.to_path_buf());
    }
    let name = given.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = given.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (split, inputs, layout) = if let Some(split) = name.strip_suffix("_imgs.tsv") {
        let texts = parent.join(format!("{split}_texts.jsonl"));
        (split.to_string(), vec![given.to_path_buf(), texts], Layout::Tsv)
    } else if let Some(split) = name.strip_suffix("_images.parquet") {
        let texts =
            ["pairs", "texts"].iter().map(|t| parent.join(format!("{split}_{t}.parquet"))).find(|p| p.is_file());
        let texts = texts.unwrap_or_else(|| parent.join(format!("{split}_pairs.parquet")));
        (split.to_string(), vec![given.to_path_buf(), texts], Layout::Parquet)
    } else {
        bail!(
            "{flag} {}: not a cn_clip LMDB split (with imgs/ and pairs/), a {{split}}_imgs.tsv (with \
             {{split}}_texts.jsonl beside it), a {{split}}_images.parquet (with {{split}}_pairs.parquet or \
             {{split}}_texts.parquet) or WebDataset shards (.tar files, globs or brace patterns)",
            given.display()
        );
    };
    let mut fingerprint = Vec::new();
    for input in &inputs {
        let meta = storage::metadata(input).with_context(|| format!("{flag}: {}", input.display()))?;
        let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        fingerprint.push(serde_json::json!({
            "path": storage::canonicalize(input).unwrap_or_else(|_| input.clone()),
            "bytes": meta.len(),
            "modified_ns": modified.map(|d| d.as_nanos().to_string()),
        }));
    }
    let fingerprint = serde_json::Value::Array(fingerprint).to_string();
    let out = cache.join(flag.trim_start_matches('-'));
    let lmdb = out.join(&split);
    let marker = out.join("source.json");
    if lmdb.join("pairs/data.mdb").is_file() && storage::read_to_string(&marker).is_ok_and(|m| m == fingerprint) {
        log.info(&format!("{flag}: reusing {} (made from {})", lmdb.display(), given.display()));
        return Ok(lmdb);
    }
    let _ = storage::remove_dir_all(&out);
    storage::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    match layout {
        Layout::Tsv => {
            let options = build_lmdb::Args {
                lmdb_dir: Some(out.clone()),
                ..build_lmdb::Args::new(parent.to_path_buf(), split.clone())
            };
            let line = command_line::render(&options)?.join(" ");
            log.info(&format!("{flag}: serializing {} into an LMDB split: cnclip build-lmdb {line}", given.display()));
            build_lmdb::run(options)?;
        }
        Layout::Parquet => {
            let options = import::ExportArgs {
                parquet_dir: parent.to_path_buf(),
                splits: split.clone(),
                out: out.clone(),
                format: import::Format::Lmdb,
                writer: LmdbWriterKind::Bulk,
                on_error: OnError::Skip,
            };
            let line = command_line::render(&options)?.join(" ");
            log.info(&format!("{flag}: serializing {} into an LMDB split: cnclip export {line}", given.display()));
            import::export(options)?;
        }
    }
    cnclip_operators::write_atomically(&marker, |f| std::io::Write::write_all(f, fingerprint.as_bytes()))?;
    Ok(lmdb)
}

enum Layout {
    Tsv,
    Parquet,
}
