//! Training and validation data given in other layouts than cn_clip's LMDB split.
//!
//! Read in place, through a small index made once per run directory (`{logs}/{name}/data/
//! {flag}/`) and reused while the inputs' sizes and modification times or ETags hold:
//! - cn_clip's `{split}_imgs.tsv` + `{split}_texts.jsonl` (what `build_lmdb_dataset.py` reads),
//!   local or in an object store: the images' `locations` (where each line's base64 field lies)
//!   and the texts kept, each made by a pipeline (`tsv` → `write_parquet`; `jsonl` →
//!   `require_images` → `write_parquet`) that quarantine what `build-lmdb` quarantines
//!   (`quarantine-images.jsonl`, `quarantine-texts.jsonl` beside them). Training reads each pair's image by a ranged read, in
//!   the `pairs` order `build-lmdb` would write: the same samples as the LMDB split.
//! - WebDataset shards (`.tar` files, globs or brace patterns, local or in an object store):
//!   their `locations` index (where each sample's image and text lie, samples without both
//!   quarantined beside it); training reads the shards through it (the `train_shards`
//!   source), by ranged reads in cn_clip's sampler order or as a shuffled stream
//!   (`--shuffle-buffer`).
//! - Parquet files in another project's layout (img2dataset, Hugging Face; `--image-column`,
//!   `--text-column`, `--id-column`), a file a shard and a row a sample, counted from their
//!   footers: nothing is made first.
//!
//! Our own Parquet tables (`{split}_images.parquet` + `{split}_pairs.parquet` or
//! `_texts.parquet`) are serialized once into an LMDB split there by `export --format lmdb`
//! (images in a Parquet row group are not one ranged read each), and trained on as cn_clip's
//! `LMDBDataset` reads it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::log::Log;
use cnclip_data_jobs::{command_line, import};
use cnclip_operators::fingerprint::{self, Stamp};
use cnclip_operators::quarantine::OnError;
use cnclip_operators::sinks::lmdb::LmdbWriterKind;
use cnclip_operators::sinks::parquet::WriteParquetConfig;
use cnclip_operators::sources::jsonl::JsonlConfig;
use cnclip_operators::sources::lmdb::counts;
use cnclip_operators::sources::train_parquet::{Columns, samples_in};
use cnclip_operators::sources::train_tsv::pairs_in;
use cnclip_operators::sources::tsv::{TsvConfig, TsvTable};
use cnclip_operators::sources::webdataset::{WebDatasetConfig, WebDatasetTable, is_shard_path};
use cnclip_operators::spec::{JobSettings, NodeDef, Planner};
use cnclip_operators::storage;
use cnclip_operators::transforms::require_images::RequireImagesConfig;

/// What a run trains or validates on.
#[derive(Debug, Clone)]
pub enum TrainData {
    /// A cn_clip LMDB split (given, or serialized from another layout).
    Lmdb(PathBuf),
    /// WebDataset shards as given, with their `locations` index and its sample count.
    Shards { shards: String, index: PathBuf, samples: usize },
    /// Parquet files in another project's layout, read by their columns in place.
    Parquet { files: String, columns: Columns, samples: usize },
    /// cn_clip's TSV image file with its images' `locations` and the `texts` table kept.
    Tsv { images: String, locations: PathBuf, texts: PathBuf, samples: usize },
}

impl TrainData {
    /// Its samples (`pairs` of an LMDB split).
    pub fn samples(&self) -> Result<usize> {
        match self {
            TrainData::Lmdb(split) => {
                let (_, pairs) = counts(split).with_context(|| format!("{}", split.display()))?;
                Ok(pairs as usize)
            }
            TrainData::Shards { samples, .. } | TrainData::Parquet { samples, .. } | TrainData::Tsv { samples, .. } => {
                Ok(*samples)
            }
        }
    }

    /// Where it is, for messages.
    pub fn describe(&self) -> String {
        match self {
            TrainData::Lmdb(split) => split.display().to_string(),
            TrainData::Shards { shards, .. } => shards.clone(),
            TrainData::Parquet { files, .. } => files.clone(),
            TrainData::Tsv { images, .. } => images.clone(),
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
    if text.ends_with("_imgs.tsv") {
        return tsv_index(given, cache, flag, log);
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
    let fingerprint = stamped(given, &files, flag)?;
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

/// What `files` (given as `given`) are now: their paths, sizes and modification times or ETags,
/// as JSON; an index made from them is reused while this is unchanged.
fn stamped(given: &str, files: &[PathBuf], flag: &str) -> Result<String> {
    let stamps: Vec<Stamp> = files.iter().map(|f| Stamp::of(f, false)).collect();
    if let Some(bad) = stamps.iter().find(|s| s.error.is_some()) {
        bail!("{flag} {given}: {} cannot be read ({})", bad.path.display(), bad.error.as_deref().unwrap_or_default());
    }
    Ok(serde_json::json!({ "given": given, "files": stamps }).to_string())
}

/// Indexes cn_clip's `{split}_imgs.tsv` `given` and the `{split}_texts.jsonl` beside it (once
/// while they are unchanged) by two pipelines: the images' `locations` (`tsv` → `write_parquet`),
/// then the texts whose images are there (`jsonl` → `require_images` against those locations →
/// `write_parquet`), quarantining what `build-lmdb` quarantines.
fn tsv_index(given: &Path, cache: &Path, flag: &str, log: &mut Log) -> Result<TrainData> {
    let name = given.to_string_lossy().into_owned();
    let split = name.strip_suffix("_imgs.tsv").expect("checked by the caller");
    let jsonl = PathBuf::from(format!("{split}_texts.jsonl"));
    let fingerprint = stamped(&name, &[given.to_path_buf(), jsonl.clone()], flag)?;
    let out = cache.join(flag.trim_start_matches('-'));
    let (locations, texts, marker) =
        (out.join("locations.parquet"), out.join("texts.parquet"), out.join("source.json"));
    let reused = texts.is_file() && storage::read_to_string(&marker).is_ok_and(|m| m == fingerprint);
    if !reused {
        let _ = storage::remove_dir_all(&out);
        storage::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        log.info(&format!(
            "{flag}: indexing {name} and {} in place → {}, {}",
            jsonl.display(),
            locations.display(),
            texts.display()
        ));
        let registry = crate::registry();
        let mut quarantined = 0;
        let images = TsvConfig {
            paths: vec![name.clone()],
            table: TsvTable::Locations,
            dedupe: true,
            max_record_bytes: cnclip_operators::sources::MAX_RECORD_BYTES,
        };
        let kept = RequireImagesConfig { images: vec![locations.display().to_string()], ..Default::default() };
        let jsonl_source = JsonlConfig {
            paths: vec![jsonl.display().to_string()],
            dedupe: true,
            max_record_bytes: cnclip_operators::sources::MAX_RECORD_BYTES,
        };
        // Each pipeline's quarantine file of its own (a job's quarantine file is its records).
        let quarantines = [out.join("quarantine-images.jsonl"), out.join("quarantine-texts.jsonl")];
        let plans = [
            vec![
                NodeDef::new("images", None, images),
                NodeDef::new("locations", Some("images"), WriteParquetConfig { path: locations.clone() }),
            ],
            vec![
                NodeDef::new("texts_in", None, jsonl_source),
                NodeDef::new("kept", Some("texts_in"), kept),
                NodeDef::new("texts", Some("kept"), WriteParquetConfig { path: texts.clone() }),
            ],
        ];
        for (defs, quarantine) in plans.into_iter().zip(&quarantines) {
            let settings = JobSettings { quarantine: quarantine.clone(), ..JobSettings::default() };
            quarantined += Planner::new(&registry).plan(settings, defs)?.run()?.quarantined;
        }
        if quarantined > 0 {
            log.info(&format!(
                "{flag}: {quarantined} lines or image references left out, as build-lmdb leaves them (see {} and {})",
                quarantines[0].display(),
                quarantines[1].display()
            ));
        }
        cnclip_operators::write_atomically(&marker, |f| std::io::Write::write_all(f, fingerprint.as_bytes()))?;
    }
    let samples = pairs_in(&texts).with_context(|| format!("{flag}: {}", texts.display()))?;
    if reused {
        log.info(&format!("{flag}: reusing the index {} of {name} ({samples} pairs)", out.display()));
    }
    Ok(TrainData::Tsv { images: name, locations, texts, samples })
}

/// The LMDB split to train on for `--train-data`/`--val-data` `given`, serializing it under
/// `cache` first when it is not one already.
fn lmdb_split(given: &Path, cache: &Path, flag: &str, log: &mut Log) -> Result<PathBuf> {
    if cnclip_operators::sources::lmdb::is_split(given) {
        return Ok(given.to_path_buf());
    }
    let name = given.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = given.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (split, inputs) = if let Some(split) = name.strip_suffix("_images.parquet") {
        let texts =
            ["pairs", "texts"].iter().map(|t| parent.join(format!("{split}_{t}.parquet"))).find(|p| p.is_file());
        let texts = texts.unwrap_or_else(|| parent.join(format!("{split}_pairs.parquet")));
        (split.to_string(), vec![given.to_path_buf(), texts])
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
    cnclip_operators::write_atomically(&marker, |f| std::io::Write::write_all(f, fingerprint.as_bytes()))?;
    Ok(lmdb)
}
