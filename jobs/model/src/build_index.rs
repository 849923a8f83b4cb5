//! `cnclip build-index`: a FAISS IVF index (`IVF…,PQ…`, `IVF…,SQ8`, `IVF…,Flat`) over a feature
//! table, built the way billion-vector indexes are: trained once on a sample, filled shard by
//! shard (each shard a copy of the trained index, so shards can be built apart and resumed),
//! then the shards' inverted lists merged into one index. The layout and the manifest are
//! [`cnclip_models::retrieval::built`]'s; `make-topk-predictions --index-path DIR` searches it.
//!
//! The table (a Parquet feature table, a directory of parts, or cn_clip feature JSON lines) is
//! read through a pipeline, twice, as every job reads its data:
//!
//! 1. the training sample: a uniform random sample of `--train-sample` rows without
//!    replacement (reservoir sampling, Vitter's algorithm R, over the rows in table order, drawn
//!    from a SplitMix64 stream seeded by `--seed`), so the same table and seed give the same
//!    sample and hence the same trained index. Reservoir sampling needs no row count up front
//!    (JSON lines have none); the cost is one read of the table.
//! 2. the shards: shard N is rows [N·R, (N+1)·R) (`--shard-rows` R) in table order, added to a
//!    copy of the trained index with the table's ids as FAISS ids, written to
//!    `shard-NNNNN.index` atomically and recorded in `manifest.json` before the next begins.
//!
//! A rerun of the same command keeps the trained index and every recorded shard whose file is
//! intact, and builds only what is missing; other settings start over (another table, index,
//! sample or seed) or rebuild the shards only (another `--shard-rows`). The merge reads the
//! shards one at a time into a copy of the trained index (memory: the merged index plus one
//! shard); `--no-merge` leaves the shards apart for searches to go through in turn.
//!
//! A factory string ending in `,RFlat` (`IVF4096,PQ64np,RFlat`) adds FAISS's refinement stage
//! with the vectors on disk instead of in memory ([`cnclip_models::retrieval::refine`]): each
//! shard also writes its exact vectors and an id → row map, and a search re-scores
//! `k_factor · k` candidates of the compressed index with them. The codes are what memory
//! holds; the recall is nearly the exact search's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float32Type, Int64Type};
use arrow::record_batch::RecordBatch;
use cnclip_models::retrieval::built::{self, BuiltIndex, IndexFile, Manifest, Refine, Shard, ShardRefine, Training};
use cnclip_models::retrieval::ivf::IvfIndex;
use cnclip_models::retrieval::refine::{self, Ids, RefineStore, RefineWriter};
use cnclip_operators::quarantine::OnError;
use cnclip_operators::sources::features::FeatureJsonlConfig;
use cnclip_operators::sources::parquet::ParquetConfig;
use cnclip_operators::spec::{JobSettings, NodeDef, Planner};

use crate::registry;
use cnclip_operators::storage;

#[derive(clap::Args)]
pub struct Args {
    /// The feature table: a Parquet file, a directory of Parquet parts, or cn_clip feature JSON
    /// lines.
    #[arg(long)]
    features: String,
    /// The id column (Parquet: `id`, else `image_id` or `text_id`, whichever is there) or the
    /// id key of JSON lines (default `image_id`); int64, not negative.
    #[arg(long)]
    id_column: Option<String>,
    /// FAISS factory string of an IVF index: IVF4096,PQ64np · IVF1024,SQ8 · IVF256,Flat (`np`:
    /// no polysemous training, see below); `…,RFlat` adds a refinement stage (the exact vectors
    /// on disk re-rank the candidates).
    #[arg(long)]
    index: String,
    /// With `,RFlat`: candidates per result a search re-ranks (`k_factor · k`) unless it says
    /// otherwise (recorded in the manifest).
    #[arg(long, default_value_t = 4)]
    k_factor: usize,
    /// Vectors the index is trained on (a seeded uniform sample of the table).
    #[arg(long, default_value_t = 100_000)]
    train_sample: usize,
    /// The output directory (manifest.json, trained.index, shard-NNNNN.index, merged.index).
    #[arg(long)]
    index_path: PathBuf,
    /// Rows per shard.
    #[arg(long, default_value_t = 1_000_000)]
    shard_rows: u64,
    /// Inverted lists a search visits unless it says otherwise (recorded in the manifest).
    #[arg(long, default_value_t = 16)]
    nprobe: usize,
    /// Keep the shards apart (searched in turn) instead of merging them.
    #[arg(long)]
    no_merge: bool,
    /// Seed of the training sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Rows given to one FAISS `add` (FAISS parallelises within a call).
const ADD_ROWS: usize = 65_536;

pub fn run(args: Args) -> Result<()> {
    if args.shard_rows == 0 {
        bail!("--shard-rows must be at least 1");
    }
    if args.train_sample == 0 {
        bail!("--train-sample must be at least 1");
    }
    if args.k_factor == 0 {
        bail!("--k-factor must be at least 1");
    }
    cnclip_operators::signals::catch_interrupts()?;
    let start = Instant::now();
    let dir = args.index_path.clone();
    if dir.exists() && !dir.is_dir() {
        bail!("--index-path {}: a file; build-index writes a directory", dir.display());
    }
    let table = Table::open(&args)?;
    // The index string first: a bad or non-IVF one stops the job before any data is read.
    let (ivf, refine_kind) = refine::split(&args.index).map_err(crate::quoted("--index"))?;
    let nlist = IvfIndex::new(table.dim, &ivf).map_err(crate::quoted("--index"))?.nlist();
    let refine = refine_kind.map(|kind| Refine { kind: kind.into(), k_factor: args.k_factor, id_map: None });
    if polysemous(&ivf) {
        eprintln!(
            "cnclip build-index: note: `{}` trains polysemous PQ codes (seconds per codebook; they serve a Hamming \
             pre-filter cnclip's search does not use): append `np` to the PQ part (`PQ64np`) to skip that",
            args.index
        );
    }
    storage::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let training_fingerprint = serde_json::json!({
        "files": table.fingerprint()?,
        "id_column": table.json_key.as_ref().unwrap_or(&table.id_column),
        "index": ivf,
        "dim": table.dim,
        "metric": built::METRIC,
        "train_sample": args.train_sample,
        "seed": args.seed,
    })
    .to_string();
    // The refinement files are made with the shards: adding or dropping `,RFlat` rebuilds the
    // shards, not the training. (No `refine` key without one: directories built before there
    // was a refinement stage keep their shards.)
    let mut shards_fingerprint = serde_json::json!({ "shard_rows": args.shard_rows });
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
                eprintln!(
                    "cnclip build-index: {} was built from another table or settings: starting over",
                    dir.display()
                );
            }
            remove_index_files(&dir)?;
            // Dropped: every run, fresh or resumed, copies its shards from the file.
            let (trained, training) = train(&args, &ivf, &table, nlist, &dir, training_fingerprint)?;
            drop(trained);
            Manifest {
                format: built::FORMAT.into(),
                index: args.index.clone(),
                dim: table.dim,
                metric: built::METRIC.into(),
                nlist,
                nprobe: args.nprobe,
                training,
                shard_rows: args.shard_rows,
                shards_fingerprint: shards_fingerprint.clone(),
                shards: Vec::new(),
                total_rows: None,
                merged: None,
                refine: None,
            }
        }
    };
    manifest.nprobe = args.nprobe.min(nlist).max(1);
    manifest.index = args.index.clone();
    // The global id map of a previous run, kept only if no shard is rebuilt (below).
    let previous_map = manifest.refine.as_ref().and_then(|r| r.id_map.clone()).filter(|f| f.intact(&dir));
    manifest.refine = refine;
    if manifest.shards_fingerprint != shards_fingerprint {
        eprintln!(
            "cnclip build-index: --shard-rows or the refinement changed: keeping the trained index, rebuilding the \
             shards"
        );
        for shard in &manifest.shards {
            let _ = storage::remove_file(dir.join(&shard.file.file));
            for file in shard.refine.iter().flat_map(|r| [&r.vectors, &r.ids]) {
                let _ = storage::remove_file(dir.join(&file.file));
            }
        }
        manifest.shards.clear();
        manifest.total_rows = None;
        manifest.merged = None;
        manifest.shard_rows = args.shard_rows;
        manifest.shards_fingerprint = shards_fingerprint;
    }
    let before = manifest.shards.len();
    manifest.shards.retain(|s| s.intact(&dir));
    if manifest.shards.len() < before {
        eprintln!(
            "cnclip build-index: {} recorded shard(s) missing or damaged: rebuilding them",
            before - manifest.shards.len()
        );
        manifest.merged = None;
    }
    manifest.write(&dir)?;
    let trained = IvfIndex::read(&dir.join(built::TRAINED))?;

    let kept = manifest.shards.len();
    let (mut built_now, mut add_seconds) = (0, 0.0);
    if !manifest.complete() {
        if kept > 0 {
            eprintln!("cnclip build-index: resuming: {kept} shard(s) kept");
        }
        manifest.merged = None;
        (built_now, add_seconds) = add_shards(&args, &table, &trained, &dir, &mut manifest)?;
    }
    let total = manifest.total_rows.unwrap_or(0);
    if manifest.refine.is_some() {
        let kept_map = previous_map.filter(|_| built_now == 0);
        let id_map = match kept_map {
            Some(map) => Some(map),
            None => {
                let store = RefineStore::open(&dir, &manifest)?;
                match store.check_ids(&dir)? {
                    Ids::Disjoint => None,
                    Ids::Mapped(map) => {
                        eprintln!(
                            "cnclip build-index: the shards' id ranges overlap: wrote the global id map {} ({} bytes)",
                            refine::ID_MAP,
                            map.bytes
                        );
                        Some(map)
                    }
                    Ids::Duplicate { id, first, second } => {
                        // Not finished: a search would not know which vector the id names.
                        manifest.total_rows = None;
                        manifest.merged = None;
                        manifest.write(&dir)?;
                        bail!(
                            "id {id} is in shard {first} and shard {second}: a refined index (…,RFlat) looks vectors \
                             up by id, so ids must be unique (or build without ,RFlat)"
                        );
                    }
                }
            }
        };
        if let Some(refine) = &mut manifest.refine {
            refine.id_map = id_map;
        }
        manifest.write(&dir)?;
    } else {
        let _ = storage::remove_file(dir.join(refine::ID_MAP));
    }

    let merged_path = dir.join(built::MERGED);
    let mut merge_seconds = None;
    if args.no_merge {
        if manifest.merged.take().is_some() || merged_path.exists() {
            storage::remove_file(&merged_path).or_else(ignore_missing)?;
        }
        manifest.write(&dir)?;
    } else if manifest.merged.as_ref().is_none_or(|m| !m.intact(&dir)) {
        let merging = Instant::now();
        let mut merged = trained.try_clone().context("copying the trained index")?;
        for shard in &manifest.shards {
            let path = dir.join(&shard.file.file);
            let mut index = IvfIndex::read(&path)?;
            merged.merge_from(&mut index).with_context(|| format!("merging {}", path.display()))?;
        }
        if merged.ntotal() != total {
            bail!("the merged index holds {} vectors, the shards {total}", merged.ntotal());
        }
        let bytes = merged.write_atomically(&merged_path)?;
        manifest.merged = Some(IndexFile { file: built::MERGED.into(), bytes });
        manifest.write(&dir)?;
        merge_seconds = Some(merging.elapsed().as_secs_f64());
    }
    // The directory as a search will see it.
    BuiltIndex::open(&dir)?;

    let shard_bytes: u64 = manifest.shards.iter().map(|s| s.file.bytes).sum();
    let (what, bytes) = match &manifest.merged {
        Some(m) => (format!("{}", dir.join(&m.file).display()), m.bytes),
        None => (format!("{} shards in {}", manifest.shards.len(), dir.display()), shard_bytes),
    };
    eprintln!(
        "cnclip build-index: {total} vectors of {} values, `{}` ({} lists, nprobe {}), {} shard(s) ({} built now, \
         {kept} kept) → {what}: {bytes} bytes, {:.1} bytes/vector; {}, added in {add_seconds:.1} s{} ({:.1} s in \
         all)",
        manifest.dim,
        manifest.index,
        manifest.nlist,
        manifest.nprobe,
        manifest.shards.len(),
        built_now,
        bytes as f64 / total.max(1) as f64,
        if trained_now {
            format!("trained on {} vectors in {:.1} s", manifest.training.rows, manifest.training.seconds)
        } else {
            "trained index kept".to_string()
        },
        merge_seconds.map_or(String::new(), |s| format!(", merged in {s:.1} s")),
        start.elapsed().as_secs_f64()
    );
    if let Some(refine) = &manifest.refine {
        let on_disk: u64 =
            manifest.shards.iter().flat_map(|s| s.refine.iter()).map(|r| r.vectors.bytes + r.ids.bytes).sum::<u64>()
                + refine.id_map.as_ref().map_or(0, |m| m.bytes);
        eprintln!(
            "cnclip build-index: refinement: exact vectors and id map on disk, {on_disk} bytes ({:.1} bytes/vector, \
             memory-mapped by a search), k_factor {}",
            on_disk as f64 / total.max(1) as f64,
            refine.k_factor
        );
    }
    Ok(())
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

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }
}

/// Removes what build-index writes in `dir` (and nothing else).
fn remove_index_files(dir: &Path) -> Result<()> {
    for entry in storage::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // A killed build's temporary files too (`.cnclip-tmp-PID-shard-…`).
        let file = name.strip_prefix(".cnclip-tmp-").and_then(|rest| rest.split_once('-')).map_or(&*name, |(_, f)| f);
        let ours = [built::MANIFEST, built::TRAINED, built::MERGED, refine::ID_MAP].contains(&file)
            || (file.starts_with("shard-")
                && [".index", ".vectors", ".ids"].iter().any(|extension| file.ends_with(extension)));
        if ours {
            storage::remove_file(entry.path()).or_else(ignore_missing)?;
        }
    }
    Ok(())
}

/// The feature table: its files, id column and dimension.
struct Table {
    /// The files, in reading order.
    files: Vec<PathBuf>,
    /// The id key of JSON lines (their source names the column `id`); `None` for Parquet.
    json_key: Option<String>,
    /// The id column of the streamed batches.
    id_column: String,
    dim: usize,
    /// Where the pipeline would quarantine bad records: it never does, as a bad record stops
    /// the job (an index missing rows is not what was asked for).
    quarantine: PathBuf,
}

impl Table {
    fn open(args: &Args) -> Result<Table> {
        let path = Path::new(&args.features);
        let jsonl = cnclip_operators::sources::features::is_jsonl(path);
        let files = if path.is_dir() {
            cnclip_operators::sources::parts::check_complete(path).map_err(crate::quoted("--features"))?;
            let mut parts: Vec<PathBuf> = storage::read_dir(path)
                .with_context(|| format!("--features {}", path.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                .collect();
            parts.sort();
            if parts.is_empty() {
                bail!("--features {}: a directory with no .parquet part", path.display());
            }
            parts
        } else if path.is_file() {
            vec![path.to_path_buf()]
        } else {
            match storage::metadata(path) {
                Ok(meta) => bail!(
                    "--features {}: {}, not a regular file",
                    path.display(),
                    cnclip_operators::sources::parts::kind_of(&meta)
                ),
                Err(_) => bail!("--features {}: no such file or directory", path.display()),
            }
        };
        let (json_key, id_column, dim) = if jsonl {
            let key = args.id_column.clone().unwrap_or_else(|| "image_id".into());
            let source = cnclip_operators::sources::features::FeatureJsonlSource::open(
                files.clone(),
                &key,
                cnclip_operators::sources::MAX_RECORD_BYTES,
            )
            .with_context(|| format!("--features {}", path.display()))?;
            // The source names its id column `id` whatever the key.
            (Some(key), "id".to_string(), source.dim)
        } else {
            let schema = cnclip_operators::sources::parquet::file_schema(&files[0])
                .with_context(|| format!("--features {}", files[0].display()))?;
            let id_column = match &args.id_column {
                Some(column) => column.clone(),
                None => ["id", "image_id", "text_id"]
                    .into_iter()
                    .find(|c| schema.field_with_name(c).is_ok())
                    .unwrap_or("id")
                    .to_string(),
            };
            match schema.field_with_name(&id_column).map(|f| f.data_type()) {
                Ok(DataType::Int64) => {}
                Ok(other) => bail!("{}: id column `{id_column}` is {other}, not int64", files[0].display()),
                Err(_) => bail!(
                    "{}: no id column `{id_column}` (columns: {}; name it with --id-column)",
                    files[0].display(),
                    schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
                ),
            }
            let dim = match schema.field_with_name(cnclip_schemas::columns::FEATURE).map(|f| f.data_type()) {
                Ok(DataType::FixedSizeList(item, d)) if item.data_type() == &DataType::Float32 => *d as usize,
                // Variable-length lists: the dimension is the first row's (every row is checked).
                Ok(DataType::List(item) | DataType::LargeList(item)) if item.data_type() == &DataType::Float32 => 0,
                _ => bail!("{}: no `feature` column of float32 vectors", files[0].display()),
            };
            (None, id_column, dim)
        };
        let quarantine = args.index_path.join("quarantine.jsonl");
        let mut table = Table { files, json_key, id_column, dim, quarantine };
        if table.dim == 0 {
            table.dim = table.first_dim()?;
        }
        Ok(table)
    }

    /// The dimension of a table of variable-length lists: its first row's.
    fn first_dim(&self) -> Result<usize> {
        let mut stream = self.stream()?;
        for batch in stream.by_ref() {
            let batch = batch?;
            if batch.num_rows() > 0 {
                let features = batch.column_by_name(cnclip_schemas::columns::FEATURE).context("feature column")?;
                let first = match features.data_type() {
                    DataType::LargeList(_) => features.as_list::<i64>().value(0).len(),
                    _ => features.as_list::<i32>().value(0).len(),
                };
                if first == 0 {
                    bail!("{}: the first feature vector is empty", self.files[0].display());
                }
                return Ok(first);
            }
        }
        bail!("--features: the table has no rows")
    }

    /// The files' sizes and modification times: another table (or a rewritten one) is another
    /// fingerprint.
    fn fingerprint(&self) -> Result<serde_json::Value> {
        let mut files = Vec::new();
        for file in &self.files {
            let meta = storage::metadata(file).with_context(|| format!("{}", file.display()))?;
            let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            files.push(serde_json::json!({
                "path": storage::canonicalize(file).unwrap_or_else(|_| file.clone()),
                "bytes": meta.len(),
                "modified": modified.map(|d| d.as_nanos().to_string()),
            }));
        }
        Ok(serde_json::Value::Array(files))
    }

    /// The table's rows through a pipeline (source → this job), in table order.
    fn stream(&self) -> Result<cnclip_operators::spec::PipelineStream> {
        let paths: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
        let source = if let Some(id_key) = self.json_key.clone() {
            NodeDef::new(
                "features",
                None,
                FeatureJsonlConfig { paths, id_key, max_record_bytes: cnclip_operators::sources::MAX_RECORD_BYTES },
            )
        } else {
            NodeDef::new("features", None, ParquetConfig { paths, table: None, dedupe: false })
        };
        let settings = JobSettings {
            on_error: OnError::Fail,
            quarantine: self.quarantine.clone(),
            batch_rows: 8192,
            ..JobSettings::default()
        };
        let registry = registry();
        let pipeline = Planner::new(&registry).stream("features").plan(settings, vec![source])?;
        Ok(pipeline.stream()?)
    }
}

/// One batch's ids and vectors (back to back), checked: int64 ids ≥ 0, `dim` floats per row.
fn rows(batch: &RecordBatch, table: &Table, first_row: u64) -> Result<(Vec<i64>, Vec<f32>)> {
    let where_ = || {
        format!("{} (rows from {first_row})", table.files.first().map_or(String::new(), |f| f.display().to_string()))
    };
    let ids = batch
        .column_by_name(&table.id_column)
        .and_then(|c| c.as_primitive_opt::<Int64Type>())
        .with_context(|| format!("{}: no int64 id column `{}`", where_(), table.id_column))?;
    if ids.null_count() > 0 {
        bail!("{}: a null id", where_());
    }
    if let Some(at) = ids.values().iter().position(|&id| id < 0) {
        bail!(
            "row {}: id {} is negative; FAISS reserves negative ids (-1 stands for no result)",
            first_row + at as u64,
            ids.value(at)
        );
    }
    let column = batch
        .column_by_name(cnclip_schemas::columns::FEATURE)
        .with_context(|| format!("{}: no `feature` column", where_()))?;
    if column.null_count() > 0 {
        bail!("{}: a null feature vector", where_());
    }
    let bad_length = |row: usize, len: usize| {
        anyhow::anyhow!(
            "row {}: a feature vector of {len} values, the table's have {}",
            first_row + row as u64,
            table.dim
        )
    };
    let features: Vec<f32> = match column.data_type() {
        DataType::FixedSizeList(_, d) if *d as usize == table.dim => {
            let lists = column.as_fixed_size_list();
            let values = lists.values().as_primitive_opt::<Float32Type>().context("feature values are not float32")?;
            let range = lists.offset() * table.dim..(lists.offset() + lists.len()) * table.dim;
            if values.slice(range.start, range.len()).null_count() > 0 {
                bail!("{}: a null feature value", where_());
            }
            values.values()[range].to_vec()
        }
        DataType::FixedSizeList(_, d) => return Err(bad_length(0, *d as usize)),
        DataType::List(_) | DataType::LargeList(_) => {
            let (offsets, values): (Vec<usize>, _) = match column.data_type() {
                DataType::List(_) => {
                    let lists = column.as_list::<i32>();
                    (lists.value_offsets().iter().map(|&o| o as usize).collect(), lists.values().clone())
                }
                _ => {
                    let lists = column.as_list::<i64>();
                    (lists.value_offsets().iter().map(|&o| o as usize).collect(), lists.values().clone())
                }
            };
            let values = values.as_primitive_opt::<Float32Type>().context("feature values are not float32")?;
            if values.null_count() > 0 {
                bail!("{}: a null feature value", where_());
            }
            for (row, pair) in offsets.windows(2).enumerate() {
                if pair[1] - pair[0] != table.dim {
                    return Err(bad_length(row, pair[1] - pair[0]));
                }
            }
            values.values()[offsets[0]..offsets[offsets.len() - 1]].to_vec()
        }
        other => bail!("{}: `feature` is {other}, not float32 vectors", where_()),
    };
    for (row, feature) in features.chunks(table.dim.max(1)).enumerate() {
        if let Err(reason) = cnclip_operators::sources::features::check_finite(feature) {
            bail!("{}: row {} (id {}): {reason}", where_(), first_row + row as u64, ids.value(row));
        }
    }
    Ok((ids.values().to_vec(), features))
}

/// SplitMix64 (Steele, Lea and Flood 2014): a fixed, seedable stream for the training sample.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (Lemire's multiply-shift; the bias is below 2⁻³² for any table).
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(bound)) >> 64) as u64
    }
}

/// Reservoir sampling (algorithm R): `size` rows drawn uniformly without replacement from a
/// stream of unknown length, in one pass; the sample comes out in table order.
struct Reservoir {
    size: usize,
    dim: usize,
    seen: u64,
    rng: SplitMix64,
    /// Table row of each slot, and the slots' vectors back to back.
    rows: Vec<u64>,
    vectors: Vec<f32>,
}

impl Reservoir {
    fn new(size: usize, dim: usize, seed: u64) -> Reservoir {
        Reservoir { size, dim, seen: 0, rng: SplitMix64(seed), rows: Vec::new(), vectors: Vec::new() }
    }

    fn offer(&mut self, vectors: &[f32]) {
        for vector in vectors.chunks_exact(self.dim) {
            if self.rows.len() < self.size {
                self.rows.push(self.seen);
                self.vectors.extend_from_slice(vector);
            } else {
                let slot = self.rng.below(self.seen + 1) as usize;
                if slot < self.size {
                    self.rows[slot] = self.seen;
                    self.vectors[slot * self.dim..(slot + 1) * self.dim].copy_from_slice(vector);
                }
            }
            self.seen += 1;
        }
    }

    /// The sample's vectors in table order.
    fn into_sample(self) -> Vec<f32> {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.sort_by_key(|&slot| self.rows[slot]);
        order.iter().flat_map(|&slot| self.vectors[slot * self.dim..(slot + 1) * self.dim].iter().copied()).collect()
    }
}

/// Draws the training sample (one pass over the table), trains the index and writes
/// `trained.index`.
fn train(
    args: &Args,
    ivf: &str,
    table: &Table,
    nlist: usize,
    dir: &Path,
    fingerprint: String,
) -> Result<(IvfIndex, Training)> {
    let start = Instant::now();
    let mut reservoir = Reservoir::new(args.train_sample, table.dim, args.seed);
    let mut stream = table.stream()?;
    for batch in stream.by_ref() {
        if let Some(signal) = cnclip_operators::signals::interrupted() {
            return Err(cnclip_operators::Error::Interrupted { signal }.into());
        }
        let batch = batch?;
        let (_, vectors) = rows(&batch, table, reservoir.seen)?;
        reservoir.offer(&vectors);
    }
    let total = reservoir.seen;
    if total == 0 {
        bail!("--features {}: the table has no rows", args.features);
    }
    let sample = reservoir.into_sample();
    let drawn = sample.len() / table.dim;
    if drawn < nlist {
        bail!(
            "--train-sample {}: {drawn} training vectors{}, but `{}` has {nlist} inverted lists and k-means needs at \
             least one vector per list (FAISS advises 39 per list: {}); use a larger sample or fewer lists",
            args.train_sample,
            if (drawn as u64) < args.train_sample as u64 {
                format!(" (the table has {total} rows)")
            } else {
                String::new()
            },
            args.index,
            39 * nlist
        );
    }
    eprintln!("cnclip build-index: training `{ivf}` on {drawn} of {total} vectors (seed {}) …", args.seed);
    let mut index = IvfIndex::new(table.dim, ivf).map_err(crate::quoted("--index"))?;
    index.train(&sample).with_context(|| format!("training `{ivf}` on {drawn} vectors"))?;
    let bytes = index.write_atomically(&dir.join(built::TRAINED))?;
    let training = Training {
        fingerprint,
        sample: args.train_sample,
        rows: drawn,
        seed: args.seed,
        seconds: start.elapsed().as_secs_f64(),
        file: IndexFile { file: built::TRAINED.into(), bytes },
    };
    Ok((index, training))
}

/// The shard being filled.
struct OpenShard {
    number: usize,
    first_row: u64,
    index: IvfIndex,
    /// The exact vectors, with `,RFlat`.
    refine: Option<RefineWriter>,
    rows: u64,
    min_id: Option<i64>,
    max_id: Option<i64>,
    pending_ids: Vec<i64>,
    pending: Vec<f32>,
    start: Instant,
    add_seconds: f64,
}

impl OpenShard {
    fn push(&mut self, ids: &[i64], vectors: &[f32]) -> Result<()> {
        for &id in ids {
            self.min_id = Some(self.min_id.map_or(id, |m| m.min(id)));
            self.max_id = Some(self.max_id.map_or(id, |m| m.max(id)));
        }
        if let Some(refine) = &mut self.refine {
            refine.push(ids, vectors)?;
        }
        self.pending_ids.extend_from_slice(ids);
        self.pending.extend_from_slice(vectors);
        self.rows += ids.len() as u64;
        if self.pending_ids.len() >= ADD_ROWS { self.flush() } else { Ok(()) }
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending_ids.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        self.index
            .add_with_ids(&self.pending, &self.pending_ids)
            .with_context(|| format!("adding to shard {}", self.number))?;
        self.add_seconds += start.elapsed().as_secs_f64();
        self.pending_ids.clear();
        self.pending.clear();
        Ok(())
    }

    /// Writes the shard atomically and records it.
    fn finish(mut self, dir: &Path, manifest: &mut Manifest) -> Result<f64> {
        self.flush()?;
        // The refinement files first: the shard counts once its index is written and recorded.
        let refine = match self.refine.take() {
            Some(writer) => {
                let (vectors, ids) = writer.finish(self.first_row)?;
                Some(ShardRefine { vectors, ids })
            }
            None => None,
        };
        let file = built::shard_file(self.number);
        let bytes = self.index.write_atomically(&dir.join(&file))?;
        let seconds = self.start.elapsed().as_secs_f64();
        eprintln!(
            "cnclip build-index: shard {}: rows {}..{} (ids {}..={}) → {file} ({bytes} bytes, {seconds:.1} s)",
            self.number,
            self.first_row,
            self.first_row + self.rows,
            self.min_id.unwrap_or(0),
            self.max_id.unwrap_or(0),
        );
        let shard = Shard {
            number: self.number,
            first_row: self.first_row,
            rows: self.rows,
            min_id: self.min_id,
            max_id: self.max_id,
            seconds,
            file: IndexFile { file, bytes },
            refine,
        };
        let at = manifest.shards.partition_point(|s| s.number < shard.number);
        manifest.shards.insert(at, shard);
        manifest.write(dir)?;
        Ok(self.add_seconds)
    }
}

/// Streams the table and builds every shard the manifest lacks; returns how many were built
/// and the seconds spent in FAISS `add`.
fn add_shards(
    args: &Args,
    table: &Table,
    trained: &IvfIndex,
    dir: &Path,
    manifest: &mut Manifest,
) -> Result<(usize, f64)> {
    let kept: std::collections::BTreeSet<usize> = manifest.shards.iter().map(|s| s.number).collect();
    let mut stream = table.stream()?;
    let (mut row, mut built_now, mut add_seconds) = (0u64, 0, 0.0);
    let mut open: Option<OpenShard> = None;
    for batch in stream.by_ref() {
        if let Some(signal) = cnclip_operators::signals::interrupted() {
            return Err(cnclip_operators::Error::Interrupted { signal }.into());
        }
        let batch = batch?;
        let (ids, vectors) = rows(&batch, table, row)?;
        let mut at = 0;
        while at < ids.len() {
            let number = (row / args.shard_rows) as usize;
            let end = (number as u64 + 1) * args.shard_rows;
            let take = (ids.len() - at).min((end - row) as usize);
            if !kept.contains(&number) {
                let shard = match &mut open {
                    Some(shard) => shard,
                    None => open.insert(OpenShard {
                        number,
                        first_row: row,
                        index: trained.try_clone().context("copying the trained index")?,
                        refine: match &manifest.refine {
                            Some(_) => Some(RefineWriter::create(dir, number, table.dim)?),
                            None => None,
                        },
                        rows: 0,
                        min_id: None,
                        max_id: None,
                        pending_ids: Vec::new(),
                        pending: Vec::new(),
                        start: Instant::now(),
                        add_seconds: 0.0,
                    }),
                };
                shard.push(&ids[at..at + take], &vectors[at * table.dim..(at + take) * table.dim])?;
            }
            row += take as u64;
            at += take;
            if row == end
                && let Some(shard) = open.take()
            {
                add_seconds += shard.finish(dir, manifest)?;
                built_now += 1;
            }
        }
    }
    if let Some(shard) = open.take() {
        add_seconds += shard.finish(dir, manifest)?;
        built_now += 1;
    }
    if row == 0 {
        bail!("--features {}: the table has no rows", args.features);
    }
    // Shards past the table's end cannot be (the table is the one the manifest was made from),
    // but a manifest edited by hand could hold them.
    manifest.shards.retain(|s| s.first_row < row);
    manifest.total_rows = Some(row);
    manifest.write(dir)?;
    if !manifest.complete() {
        bail!(
            "{}: the shards do not cover the table's {row} rows (manifest edited?); delete it and rerun",
            dir.display()
        );
    }
    Ok((built_now, add_seconds))
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

    #[test]
    fn the_reservoir_draws_the_same_uniform_sample_for_a_seed() {
        let draw = |seed: u64, batches: &[usize]| {
            let mut reservoir = Reservoir::new(100, 1, seed);
            let mut next = 0.0f32;
            for &n in batches {
                let chunk: Vec<f32> = (0..n).map(|i| next + i as f32).collect();
                next += n as f32;
                reservoir.offer(&chunk);
            }
            reservoir.into_sample()
        };
        let a = draw(7, &[1000, 3000, 6000]);
        // Batch boundaries do not matter, the seed does.
        assert_eq!(a, draw(7, &[10_000]));
        assert_ne!(a, draw(8, &[10_000]));
        assert_eq!(a.len(), 100);
        assert!(a.windows(2).all(|w| w[0] < w[1]), "in table order, no repeats");
        // Spread over the whole stream: roughly a tenth in each tenth.
        let mut counts = [0; 10];
        for &v in &a {
            counts[(v / 1000.0) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (2..=20).contains(&c)), "{counts:?}");
        // A table smaller than the sample: all of it.
        assert_eq!(draw(1, &[30]).len(), 30);
    }
}
