//! Training and validation data given in other layouts than cn_clip's LMDB split, read in
//! place (nothing is serialized into an LMDB), local or in an object store. What an index needs
//! is made once per run directory (`{logs}/{name}/data/{flag}/`) and reused while the inputs'
//! sizes and modification times or ETags hold:
//! - texts that refer to images by id — cn_clip's `{split}_imgs.tsv` + `{split}_texts.jsonl`
//!   (what `build_lmdb_dataset.py` reads), or cnclip's `{split}_images.parquet` + `_texts` or
//!   `_pairs`: a TSV's `locations` (where each line's base64 field lies) and the texts or pairs
//!   kept, each made by a pipeline (`tsv` → `write_parquet`; `jsonl`/`parquet` →
//!   `require_images` → `write_parquet`) that quarantines what `build-lmdb` and `export
//!   --format lmdb` quarantine (`quarantine-images.jsonl`, `quarantine-texts.jsonl` beside
//!   them). Training reads each pair's image by a ranged read of the TSV or from its row group,
//!   in the `pairs` order an LMDB split of the same files has: the same samples.
//! - WebDataset shards (`.tar` files, globs or brace patterns): their `locations` index (where
//!   each sample's image and text lie, samples without both quarantined beside it); training
//!   reads the shards through it (the `train_shards` source), by ranged reads in cn_clip's
//!   sampler order or as a shuffled stream (`--shuffle-buffer`).
//! - Parquet files in another project's layout (img2dataset, Hugging Face; `--image-column`,
//!   `--text-column`, `--id-column`), a file a shard and a row a sample, counted from their
//!   footers: nothing is made first.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::log::Log;
use cnclip_operators::fingerprint::{self, Stamp};
use cnclip_operators::quarantine::{OnError, Quarantine};
use cnclip_operators::sinks::parquet::WriteParquetConfig;
use cnclip_operators::sources::jsonl::JsonlConfig;
use cnclip_operators::sources::lmdb::counts;
use cnclip_operators::sources::parquet::ParquetConfig;
use cnclip_operators::sources::train_pairs::{pairs_in, repeated_images};
use cnclip_operators::sources::train_parquet::{Columns, samples_in};
use cnclip_operators::sources::tsv::{TsvConfig, TsvTable};
use cnclip_operators::sources::webdataset::{WebDatasetConfig, WebDatasetTable, is_shard_path};
use cnclip_operators::spec::{JobSettings, NodeDef, Planner};
use cnclip_operators::storage;
use cnclip_operators::transforms::require_images::RequireImagesConfig;

/// What a run trains or validates on.
#[derive(Debug, Clone)]
pub enum TrainData {
    /// A cn_clip LMDB split, as given.
    Lmdb(PathBuf),
    /// WebDataset shards as given, with their `locations` index and its sample count.
    Shards { shards: String, index: PathBuf, samples: usize },
    /// Parquet files in another project's layout, read by their columns in place.
    Parquet { files: String, columns: Columns, samples: usize },
    /// Images by id — cn_clip's TSV image file (with its images' `locations`) or an images
    /// table — and the texts or pairs kept.
    Pairs { images: String, locations: Option<PathBuf>, texts: PathBuf, samples: usize },
}

impl TrainData {
    /// Its samples (`pairs` of an LMDB split).
    pub fn samples(&self) -> Result<usize> {
        match self {
            TrainData::Lmdb(split) => {
                let (_, pairs) = counts(split).with_context(|| format!("{}", split.display()))?;
                Ok(pairs as usize)
            }
            TrainData::Shards { samples, .. }
            | TrainData::Parquet { samples, .. }
            | TrainData::Pairs { samples, .. } => Ok(*samples),
        }
    }

    /// Where it is, for messages.
    pub fn describe(&self) -> String {
        match self {
            TrainData::Lmdb(split) => split.display().to_string(),
            TrainData::Shards { shards, .. } => shards.clone(),
            TrainData::Parquet { files, .. } => files.clone(),
            TrainData::Pairs { images, .. } => images.clone(),
        }
    }
}

/// What to train on for `--train-data`/`--val-data` `given`: an LMDB split as it is, any other
/// layout in place, through its index (made under `cache` when missing or stale) where it needs
/// one.
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
    if cnclip_operators::sources::lmdb::is_split(given) {
        return Ok(TrainData::Lmdb(given.to_path_buf()));
    }
    if text.ends_with("_imgs.tsv") || text.ends_with("_images.parquet") {
        return pairs_index(given, cache, flag, log);
    }
    bail!(
        "{flag} {text}: not a cn_clip LMDB split (with imgs/ and pairs/), a {{split}}_imgs.tsv (with \
         {{split}}_texts.jsonl beside it), a {{split}}_images.parquet (with {{split}}_texts.parquet or \
         {{split}}_pairs.parquet), WebDataset shards (.tar files, globs or brace patterns) or Parquet files with \
         --image-column and --text-column"
    )
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

/// Indexes a corpus whose texts refer to images by id (once while its files are unchanged):
/// cn_clip's `{split}_imgs.tsv` `given` with the `{split}_texts.jsonl` beside it, or cnclip's
/// `{split}_images.parquet` with `_texts` (or `_pairs`). Pipelines make what training reads: a
/// TSV's `locations` (`tsv` → `write_parquet`), then the texts or pairs whose images are there
/// (`jsonl` or `parquet` → `require_images` → `write_parquet`), quarantining what `build-lmdb`
/// and `export --format lmdb` quarantine. An images table needs no index.
fn pairs_index(given: &Path, cache: &Path, flag: &str, log: &mut Log) -> Result<TrainData> {
    let name = given.to_string_lossy().into_owned();
    let exists = |path: &Path| storage::metadata(path).is_ok();
    let (texts_in, source): (PathBuf, NodeDef) = match name.strip_suffix("_imgs.tsv") {
        Some(split) => {
            let jsonl = PathBuf::from(format!("{split}_texts.jsonl"));
            let max_record_bytes = cnclip_operators::sources::MAX_RECORD_BYTES;
            let config = JsonlConfig { paths: vec![jsonl.display().to_string()], dedupe: true, max_record_bytes };
            (jsonl, NodeDef::new("texts_in", None, config))
        }
        None => {
            let split = name.strip_suffix("_images.parquet").expect("checked by the caller");
            let table = |table: &str| PathBuf::from(format!("{split}_{table}.parquet"));
            // As `export` chooses: the texts table, or the pairs table when there is none.
            let kind = if exists(&table("texts")) || !exists(&table("pairs")) { "texts" } else { "pairs" };
            let config =
                ParquetConfig::new(vec![table(kind).display().to_string()], Some(kind.into()), kind != "pairs");
            (table(kind), NodeDef::new("texts_in", None, config))
        }
    };
    let tsv = name.ends_with(".tsv");
    let fingerprint = stamped(&name, &[given.to_path_buf(), texts_in.clone()], flag)?;
    let out = cache.join(flag.trim_start_matches('-'));
    let (locations, texts, marker) =
        (out.join("locations.parquet"), out.join("texts.parquet"), out.join("source.json"));
    let reused = texts.is_file() && storage::read_to_string(&marker).is_ok_and(|m| m == fingerprint);
    if !reused {
        let _ = storage::remove_dir_all(&out);
        storage::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        log.info(&format!("{flag}: indexing {name} and {} in place → {}", texts_in.display(), out.display()));
        let registry = crate::registry();
        let mut plans = Vec::new();
        // Each pipeline's quarantine file of its own (a job's quarantine file is its records).
        if tsv {
            let images = TsvConfig {
                paths: vec![name.clone()],
                table: TsvTable::Locations,
                dedupe: true,
                max_record_bytes: cnclip_operators::sources::MAX_RECORD_BYTES,
            };
            let defs = vec![
                NodeDef::new("images", None, images),
                NodeDef::new("locations", Some("images"), WriteParquetConfig { path: locations.clone() }),
            ];
            plans.push((defs, out.join("quarantine-images.jsonl")));
        }
        let images = if tsv { locations.display().to_string() } else { name.clone() };
        // Quarantine reasons name the images file the user gave, not the index standing for it.
        let kept = RequireImagesConfig { images: vec![images], name: Some(name.clone()), ..Default::default() };
        let defs = vec![
            source,
            NodeDef::new("kept", Some("texts_in"), kept),
            NodeDef::new("texts", Some("kept"), WriteParquetConfig { path: texts.clone() }),
        ];
        plans.push((defs, out.join("quarantine-texts.jsonl")));
        let mut quarantined = Vec::new();
        if !tsv {
            // Rows repeating an image id: the first is read, the others listed as export lists them.
            let repeated = repeated_images(vec![given.to_path_buf()])?;
            if !repeated.is_empty() {
                let path = out.join("quarantine-images.jsonl");
                let quarantine = Quarantine::new(OnError::Skip, path.clone());
                for rejected in repeated {
                    quarantine.reject(rejected)?;
                }
                quarantine.finish()?;
                quarantined.push(path.display().to_string());
            }
        }
        for (defs, quarantine) in plans {
            let settings = JobSettings { quarantine: quarantine.clone(), ..JobSettings::default() };
            if Planner::new(&registry).plan(settings, defs)?.run()?.quarantined > 0 {
                quarantined.push(quarantine.display().to_string());
            }
        }
        if !quarantined.is_empty() {
            log.info(&format!(
                "{flag}: lines or image references left out, as build-lmdb leaves them: see {}",
                quarantined.join(" and ")
            ));
        }
        cnclip_operators::write_atomically(&marker, |f| std::io::Write::write_all(f, fingerprint.as_bytes()))?;
    }
    let samples = pairs_in(&texts).with_context(|| format!("{flag}: {}", texts.display()))?;
    if reused {
        log.info(&format!("{flag}: reusing the index {} of {name} ({samples} pairs)", out.display()));
    }
    let locations = tsv.then_some(locations);
    Ok(TrainData::Pairs { images: name, locations, texts, samples })
}
