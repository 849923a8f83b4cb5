//! Building a FAISS IVF index (`IVF…,PQ…`, `IVF…,SQ8`, `IVF…,Flat`) over a feature table, the
//! way billion-vector indexes are built: trained once on a sample, filled shard by shard (each
//! shard a copy of the trained index, so shards can be built apart and resumed), then the
//! shards' inverted lists merged into one index. The layout and the manifest are
//! [`super::built`]'s; a `knn` node (`make-topk-predictions --index-path DIR`) searches it.
//! `cnclip build-index` is this module behind its flags.
//!
//! The table (`table.rs`: a Parquet feature table, a directory of parts, or cn_clip feature JSON
//! lines) is read through a pipeline, twice:
//!
//! 1. the training sample (`sample.rs`): a uniform random sample of `train_sample` rows without
//!    replacement, seeded by `seed`, so the same table and seed give the same trained index;
//! 2. the shards (`shards.rs`): shard N is rows [N·R, (N+1)·R) (`shard_rows` R) in table order,
//!    added to a copy of the trained index with the table's ids as FAISS ids, written to
//!    `shard-NNNNN.index` atomically and recorded in `manifest.json` before the next begins.
//!
//! A rerun with the same options keeps the trained index and every recorded shard whose file is
//! intact, and builds only what is missing; other settings start over (another table, index,
//! sample or seed) or rebuild the shards only (another `shard_rows`). The merge reads the
//! shards one at a time into a copy of the trained index (memory: the merged index plus one
//! shard); `no_merge` leaves the shards apart for searches to go through in turn.
//!
//! A factory string ending in `,RFlat` (`IVF4096,PQ64np,RFlat`) adds FAISS's refinement stage
//! with the vectors on disk instead of in memory ([`super::refine`]): each shard also writes its
//! exact vectors and an id → row map, and a search re-scores `k_factor · k` candidates of the
//! compressed index with them. The codes are what memory holds; the recall is nearly the exact
//! search's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cnclip_operators::storage;

use super::built::{self, BuiltIndex, IndexFile, Manifest, Refine, Training};
use super::ivf::IvfIndex;
use super::refine::{self, Ids, RefineStore};

pub mod error;
mod sample;
mod shards;
mod table;

pub use error::{BuildError, Result};
use table::Table;

/// Where progress lines go (one line each, without a trailing newline).
pub type Log<'a> = &'a dyn Fn(&str);

/// What to build, from what: `cnclip build-index`'s flags, typed (each field says its flag).
#[derive(Debug, Clone, PartialEq)]
pub struct BuildOptions {
    /// `--features`: a Parquet file, a directory of Parquet parts, or cn_clip feature JSON lines.
    pub features: String,
    /// `--id-column`: the id column (Parquet: `id`, else `image_id` or `text_id`, whichever is
    /// there) or the id key of JSON lines (`image_id`); int64, not negative.
    pub id_column: Option<String>,
    /// `--index`: the FAISS factory string of an IVF index, optionally ending in `,RFlat`.
    pub index: String,
    /// `--k-factor`: with `,RFlat`, candidates per result a search re-ranks (`k_factor · k`).
    pub k_factor: usize,
    /// `--train-sample`: vectors the index is trained on.
    pub train_sample: usize,
    /// `--index-path`: the output directory.
    pub index_path: PathBuf,
    /// `--shard-rows`: rows per shard.
    pub shard_rows: u64,
    /// `--nprobe`: inverted lists a search visits unless it says otherwise.
    pub nprobe: usize,
    /// `--no-merge`: keep the shards apart instead of merging them.
    pub no_merge: bool,
    /// `--seed`: the training sample's seed.
    pub seed: u64,
}

/// What a build did: the manifest as written, and what was built now or kept.
#[derive(Debug, Clone)]
pub struct BuildReport {
    pub manifest: Manifest,
    /// Whether the index was trained by this run (else a previous run's was kept).
    pub trained_now: bool,
    /// Shards built by this run, and those kept from a previous one.
    pub built_now: usize,
    pub kept: usize,
    /// Seconds in FAISS `add`, and in the merge (`None`: not merged now).
    pub add_seconds: f64,
    pub merge_seconds: Option<f64>,
    /// The id map written because the shards' id ranges overlap (`,RFlat` only): its bytes.
    pub id_map_bytes: Option<u64>,
}

/// Builds (or finishes) the index directory `options.index_path`, logging each step to `log`.
///
/// # Errors
/// A setting or the table refused (naming the flag, the file and the row), FAISS refusing the
/// sample, an IO error on the directory, or the table's pipeline failing or interrupted
/// ([`BuildError::Pipeline`]). What was recorded before the error is kept for a rerun.
pub fn build(options: &BuildOptions, log: Log<'_>) -> Result<BuildReport> {
    for (flag, value) in [
        ("--shard-rows", options.shard_rows),
        ("--train-sample", options.train_sample as u64),
        ("--k-factor", options.k_factor as u64),
    ] {
        if value == 0 {
            return Err(BuildError::Zero { flag });
        }
    }
    let dir = options.index_path.clone();
    if dir.exists() && !dir.is_dir() {
        return Err(BuildError::IndexPathIsFile { path: dir });
    }
    let table = Table::open(&options.features, options.id_column.as_deref(), &dir)?;
    // The index string first: a bad or non-IVF one stops the job before any data is read.
    let (ivf, refine_kind) = refine::split(&options.index).map_err(BuildError::Index)?;
    let nlist = IvfIndex::new(table.dim, &ivf).map_err(BuildError::Index)?.nlist();
    let refine = refine_kind.map(|kind| Refine { kind: kind.into(), k_factor: options.k_factor, id_map: None });
    if polysemous(&ivf) {
        log(&format!(
            "note: `{}` trains polysemous PQ codes (seconds per codebook; they serve a Hamming pre-filter cnclip's \
             search does not use): append `np` to the PQ part (`PQ64np`) to skip that",
            options.index
        ));
    }
    storage::create_dir_all(&dir).map_err(|source| BuildError::CreateDir { path: dir.clone(), source })?;

    let training_fingerprint = serde_json::json!({
        "files": table.fingerprint()?,
        "id_column": table.json_key.as_ref().unwrap_or(&table.id_column),
        "index": ivf,
        "dim": table.dim,
        "metric": built::METRIC,
        "train_sample": options.train_sample,
        "seed": options.seed,
    })
    .to_string();
    // The refinement files are made with the shards: adding or dropping `,RFlat` rebuilds the
    // shards, not the training. (No `refine` key without one: directories built before there
    // was a refinement stage keep their shards.)
    let mut shards_fingerprint = serde_json::json!({ "shard_rows": options.shard_rows });
    if let Some(kind) = refine_kind {
        shards_fingerprint["refine"] = kind.into();
    }
    let shards_fingerprint = shards_fingerprint.to_string();

    // What a previous run left that still holds.
    let mut trained_now = false;
    let mut manifest = match Manifest::read(&dir) {
        Ok(m) if m.training.fingerprint == training_fingerprint && m.training.file.intact(&dir) => m,
        found => {
            trained_now = true;
            if found.is_ok() {
                log(&format!("{} was built from another table or settings: starting over", dir.display()));
            }
            remove_index_files(&dir)?;
            // Dropped: every run, fresh or resumed, copies its shards from the file.
            let (trained, training) = train(options, &ivf, &table, nlist, &dir, training_fingerprint, log)?;
            drop(trained);
            Manifest {
                format: built::FORMAT.into(),
                index: options.index.clone(),
                dim: table.dim,
                metric: built::METRIC.into(),
                nlist,
                nprobe: options.nprobe,
                training,
                shard_rows: options.shard_rows,
                shards_fingerprint: shards_fingerprint.clone(),
                shards: Vec::new(),
                total_rows: None,
                merged: None,
                refine: None,
            }
        }
    };
    manifest.nprobe = options.nprobe.min(nlist).max(1);
    manifest.index = options.index.clone();
    // The global id map of a previous run, kept only if no shard is rebuilt (below).
    let previous_map = manifest.refine.as_ref().and_then(|r| r.id_map.clone()).filter(|f| f.intact(&dir));
    manifest.refine = refine;
    if manifest.shards_fingerprint != shards_fingerprint {
        log("--shard-rows or the refinement changed: keeping the trained index, rebuilding the shards");
        for shard in &manifest.shards {
            let _ = storage::remove_file(dir.join(&shard.file.file));
            for file in shard.refine.iter().flat_map(|r| [&r.vectors, &r.ids]) {
                let _ = storage::remove_file(dir.join(&file.file));
            }
        }
        manifest.shards.clear();
        manifest.total_rows = None;
        manifest.merged = None;
        manifest.shard_rows = options.shard_rows;
        manifest.shards_fingerprint = shards_fingerprint;
    }
    let before = manifest.shards.len();
    manifest.shards.retain(|s| s.intact(&dir));
    if manifest.shards.len() < before {
        log(&format!("{} recorded shard(s) missing or damaged: rebuilding them", before - manifest.shards.len()));
        manifest.merged = None;
    }
    write_manifest(&manifest, &dir)?;
    let trained = IvfIndex::read(&dir.join(built::TRAINED))?;

    let kept = manifest.shards.len();
    let (mut built_now, mut add_seconds) = (0, 0.0);
    if !manifest.complete() {
        if kept > 0 {
            log(&format!("resuming: {kept} shard(s) kept"));
        }
        manifest.merged = None;
        (built_now, add_seconds) = shards::add_shards(options, &table, &trained, &dir, &mut manifest, log)?;
    }
    let total = manifest.total_rows.unwrap_or(0);
    let mut id_map_bytes = None;
    if manifest.refine.is_some() {
        let kept_map = previous_map.filter(|_| built_now == 0);
        let id_map = match kept_map {
            Some(map) => Some(map),
            None => match RefineStore::open(&dir, &manifest)?.check_ids(&dir)? {
                Ids::Disjoint => None,
                Ids::Mapped(map) => {
                    id_map_bytes = Some(map.bytes);
                    log(&format!(
                        "the shards' id ranges overlap: wrote the global id map {} ({} bytes)",
                        refine::ID_MAP,
                        map.bytes
                    ));
                    Some(map)
                }
                Ids::Duplicate { id, first, second } => {
                    // Not finished: a search would not know which vector the id names.
                    manifest.total_rows = None;
                    manifest.merged = None;
                    write_manifest(&manifest, &dir)?;
                    return Err(BuildError::DuplicateAcrossShards { id, first, second });
                }
            },
        };
        if let Some(refine) = &mut manifest.refine {
            refine.id_map = id_map;
        }
        write_manifest(&manifest, &dir)?;
    } else {
        let _ = storage::remove_file(dir.join(refine::ID_MAP));
    }

    let merged_path = dir.join(built::MERGED);
    let mut merge_seconds = None;
    if options.no_merge {
        if manifest.merged.take().is_some() || merged_path.exists() {
            remove_if_there(&merged_path)?;
        }
        write_manifest(&manifest, &dir)?;
    } else if manifest.merged.as_ref().is_none_or(|m| !m.intact(&dir)) {
        let merging = Instant::now();
        let mut merged = trained.try_clone().map_err(BuildError::Copy)?;
        for shard in &manifest.shards {
            let path = dir.join(&shard.file.file);
            let mut index = IvfIndex::read(&path)?;
            merged.merge_from(&mut index).map_err(|source| BuildError::Merge { path, source })?;
        }
        if merged.ntotal() != total {
            return Err(BuildError::MergedCount { merged: merged.ntotal(), total });
        }
        let bytes = merged.write_atomically(&merged_path)?;
        manifest.merged = Some(IndexFile { file: built::MERGED.into(), bytes });
        write_manifest(&manifest, &dir)?;
        merge_seconds = Some(merging.elapsed().as_secs_f64());
    }
    // The directory as a search will see it.
    BuiltIndex::open(&dir)?;
    Ok(BuildReport { manifest, trained_now, built_now, kept, add_seconds, merge_seconds, id_map_bytes })
}

/// Draws the training sample (one pass over the table), trains the index and writes
/// `trained.index`.
fn train(
    options: &BuildOptions,
    ivf: &str,
    table: &Table,
    nlist: usize,
    dir: &Path,
    fingerprint: String,
    log: Log<'_>,
) -> Result<(IvfIndex, Training)> {
    let start = Instant::now();
    let mut reservoir = sample::Reservoir::new(options.train_sample, table.dim, options.seed);
    let mut stream = table.stream()?;
    for batch in stream.by_ref() {
        let batch = batch?;
        let (_, vectors) = table.rows(&batch, reservoir.seen())?;
        reservoir.offer(&vectors);
    }
    let total = reservoir.seen();
    if total == 0 {
        return Err(BuildError::NoRows { features: options.features.clone() });
    }
    let sample = reservoir.into_sample();
    let drawn = sample.len() / table.dim;
    if drawn < nlist {
        return Err(BuildError::SampleTooSmall {
            sample: options.train_sample,
            drawn,
            total,
            index: options.index.clone(),
            nlist,
        });
    }
    log(&format!("training `{ivf}` on {drawn} of {total} vectors (seed {}) …", options.seed));
    let mut index = IvfIndex::new(table.dim, ivf).map_err(BuildError::Index)?;
    index.train(&sample).map_err(|source| BuildError::Train { ivf: ivf.to_string(), drawn, source })?;
    let bytes = index.write_atomically(&dir.join(built::TRAINED))?;
    let training = Training {
        fingerprint,
        sample: options.train_sample,
        rows: drawn,
        seed: options.seed,
        seconds: start.elapsed().as_secs_f64(),
        file: IndexFile { file: built::TRAINED.into(), bytes },
    };
    Ok((index, training))
}

/// Writes `dir/manifest.json` atomically.
fn write_manifest(manifest: &Manifest, dir: &Path) -> Result<()> {
    manifest.write(dir).map_err(|source| BuildError::WriteManifest { path: dir.join(built::MANIFEST), source })
}

/// Whether FAISS's factory makes the PQ of `description` with polysemous training: a `PQ<M>`
/// or `PQ<M>x<bits>` part without FAISS's `np` suffix (fast-scan `…fs` PQs train none).
fn polysemous(description: &str) -> bool {
    description.split(',').any(|part| {
        part.strip_prefix("PQ").is_some_and(|rest| {
            rest.starts_with(|c: char| c.is_ascii_digit()) && !rest.ends_with("np") && !rest.contains("fs")
        })
    })
}

/// Removes `path`; one already gone is fine.
fn remove_if_there(path: &Path) -> Result<()> {
    match storage::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(BuildError::Remove { path: path.to_path_buf(), source: e })
        }
        _ => Ok(()),
    }
}

/// Removes what a build writes in `dir` (and nothing else).
fn remove_index_files(dir: &Path) -> Result<()> {
    let entries = storage::read_dir(dir).map_err(|source| BuildError::ReadDir { path: dir.to_path_buf(), source })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // A killed build's temporary files too (`.cnclip-tmp-PID-shard-…`).
        let file = name.strip_prefix(".cnclip-tmp-").and_then(|rest| rest.split_once('-')).map_or(&*name, |(_, f)| f);
        let ours = [built::MANIFEST, built::TRAINED, built::MERGED, refine::ID_MAP].contains(&file)
            || (file.starts_with("shard-")
                && [".index", ".vectors", ".ids"].iter().any(|extension| file.ends_with(extension)));
        if ours {
            remove_if_there(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polysemous_training_is_spotted_in_pq_parts_without_np() {
        for yes in ["IVF4096,PQ64", "IVF1024,PQ16x8", "IVF16,PQ8", "IVF16,PQ8x4"] {
            assert!(polysemous(yes), "{yes}");
        }
        for no in ["IVF4096,PQ64np", "IVF16,PQ8x4np", "IVF1024,SQ8", "IVF256,Flat", "IVF16,PQ8x4fs"] {
            assert!(!polysemous(no), "{no}");
        }
    }
}
