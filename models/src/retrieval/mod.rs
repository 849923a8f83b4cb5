//! `knn`: top-k retrieval as a pipeline node. Query features stream in (an `id` + `feature`
//! table); a gallery of features (cn_clip's feature JSON lines, or our Parquet feature tables:
//! files or directories of parts) is held in memory on one device replica; each query batch
//! comes out as its neighbours, best first (`query_id`, `neighbour_ids`, and `scores` when
//! asked for). Memory stays bounded by the gallery plus one batch.
//!
//! Two backends: `faiss` (default) builds any FAISS index from a factory string — `Flat` (exact
//! inner product, the default), `IVF…`, `HNSW…`, `…PQ…` for large galleries, trained on an
//! evenly spaced sample, searched with `nprobe` / `ef_search`, saved to and loaded from
//! `index_path`; `torch` is an exact matmul + top-k in libtorch, on the CPU or a CUDA device
//! (the GPU path on any machine), the gallery taken in chunks of `eval_batch_size` rows as
//! cn_clip's script does.
//!
//! `index_path` may also name a directory made by `cnclip build-index` ([`built`]): an IVF index
//! built in shards from a feature table, whose FAISS ids are the table's ids. The gallery is then
//! not read (the index holds it); the merged index is searched, or each shard in turn with the
//! per-query results merged, and `nprobe` defaults to the one the build recorded.
//!
//! FAISS on a GPU: a build with the `faiss-gpu` cargo feature (FAISS compiled against the CUDA
//! toolkit) moves the built index to `device` (`cuda:N`) for search — Flat, IVF-Flat, IVF-PQ and
//! IVF-SQ indexes; HNSW stays a CPU index in FAISS. Without the feature, a CUDA `device` with
//! the faiss backend is refused at planning and points at `backend = "torch"`, the exact GPU
//! search that needs no toolkit.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, Float32Builder, Int64Array, Int64Builder, ListBuilder};
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use cnclip_operators::spec::{BuildContext, NodeConfig, Operator, Role};
use cnclip_operators::transforms::{Execution, Output, Transform, TransformReplica};
use cnclip_schemas::columns::{FEATURE, ID, KEY, NEIGHBOUR_IDS, QUERY_ID, SCORES};
use faiss::Index as _;
use schemars::JsonSchema;
use serde::Deserialize;
use tch::{Kind, Tensor};

pub mod build;
pub mod built;
pub mod error;
pub mod factory;
pub mod ivf;
pub mod refine;

use built::BuiltIndex;
use cnclip_operators::storage;
use cnclip_operators::transforms::InputError;
pub use error::Error;

/// Which engine searches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum, serde::Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A FAISS index (CPU) from a factory string.
    #[default]
    Faiss,
    /// Exact matmul + top-k in libtorch (CPU or CUDA).
    Torch,
}

/// query features → query_id, neighbour_ids, scores: the top `top_k` of the `gallery`.
///
/// The `knn` node's keys: a FAISS index (`index`, `nprobe`, `ef_search`, `index_path`) or an
/// exact search in libtorch (`device`, `eval_batch_size`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KnnConfig {
    /// Feature JSON lines (`.jsonl`) or Parquet feature tables: files, globs, directories of parts.
    ///
    /// Not read (and may be empty) when `index_path` is a build-index directory.
    #[serde(default)]
    pub gallery: Vec<String>,
    /// The id key of gallery JSON lines: `image_id` or `text_id`.
    #[serde(default = "image_id")]
    pub gallery_id: String,
    /// Neighbours per query.
    #[serde(default = "ten")]
    pub top_k: usize,
    /// Which engine searches.
    #[serde(default)]
    pub backend: Backend,
    /// A FAISS factory string: `Flat`, `IVF1024,Flat`, `HNSW32`, `IVF4096,PQ64`, ….
    #[serde(default = "flat")]
    pub index: String,
    /// Inverted lists an IVF index visits per query.
    ///
    /// Default: the index's.
    pub nprobe: Option<usize>,
    /// Candidates an HNSW index keeps while searching.
    ///
    /// Default: the index's.
    pub ef_search: Option<usize>,
    /// Candidates per result re-scored by a refinement stage: `k_factor · top_k`.
    ///
    /// For a build-index directory made with `…,RFlat`, or a FAISS `…,RFlat` index. Default: the
    /// build's.
    #[serde(default)]
    pub k_factor: Option<usize>,
    /// Memory-map a build-index directory's inverted lists rather than load them.
    ///
    /// For an index larger than memory; the pages are shared between processes.
    #[serde(default)]
    pub mmap: bool,
    /// Where the FAISS index is saved, or a directory made by `cnclip build-index`.
    ///
    /// A saved index is built there if missing and loaded if present; a build-index directory is
    /// searched as it is (`index` is not used).
    pub index_path: Option<PathBuf>,
    /// Vectors the index is trained on, evenly spaced over the gallery.
    #[serde(default = "train_sample")]
    pub train_sample: usize,
    /// Where the torch backend searches (`cpu`, `cuda`, `cuda:N`), and a FAISS index in a
    /// `faiss-gpu` build.
    #[serde(default = "cpu")]
    pub device: String,
    /// Gallery rows per matmul of the torch backend, as cn_clip's `--eval-batch-size`.
    #[serde(default = "eval_batch_size")]
    pub eval_batch_size: usize,
    /// Queries per search.
    #[serde(default = "query_batch")]
    pub query_batch: usize,
    /// Output a `scores` column.
    #[serde(default = "yes")]
    pub scores: bool,
}

fn image_id() -> String {
    "image_id".into()
}
fn ten() -> usize {
    10
}
fn flat() -> String {
    "Flat".into()
}
fn train_sample() -> usize {
    100_000
}
fn cpu() -> String {
    "cpu".into()
}
fn eval_batch_size() -> usize {
    32768
}
fn query_batch() -> usize {
    1024
}
fn yes() -> bool {
    true
}

/// The files of a gallery list: directories stand for their `*.parquet` parts, in name order.
fn gallery_files(cx: &BuildContext, paths: &[String]) -> Result<Vec<PathBuf>, Vec<String>> {
    let mut files = Vec::new();
    let mut patterns = Vec::new();
    for path in paths {
        let resolved = cx.resolve(Path::new(path));
        if resolved.is_dir() {
            cnclip_operators::sources::parts::check_complete(&resolved).map_err(|e| vec![e.to_string()])?;
            let parts = cnclip_operators::sources::parts::parquet_files(&resolved)
                .map_err(|e| vec![format!("{}: {e}", resolved.display())])?;
            if parts.is_empty() {
                return Err(vec![format!("{} holds no .parquet part", resolved.display())]);
            }
            files.extend(parts);
        } else {
            patterns.push(path.clone());
        }
    }
    if !patterns.is_empty() {
        files.extend(cx.files(&patterns)?);
    }
    Ok(files)
}

/// The dimension of a gallery file's features, from its first line or its schema.
fn gallery_dim(path: &Path, id_key: &str) -> Result<usize, Error> {
    if cnclip_operators::sources::features::is_jsonl(path) {
        let source = cnclip_operators::sources::features::FeatureJsonlSource::open(
            vec![path.to_path_buf()],
            id_key,
            cnclip_operators::sources::MAX_RECORD_BYTES,
        )?;
        Ok(source.dim)
    } else {
        let schema = cnclip_operators::sources::parquet::file_schema(path)?;
        feature_dim(&schema).ok_or_else(|| Error::NoFeatureColumn { path: path.to_path_buf() })
    }
}

/// `D` of a `feature: FixedSizeList<Float32, D>` column.
fn feature_dim(schema: &Schema) -> Option<usize> {
    match schema.field_with_name(FEATURE).ok()?.data_type() {
        DataType::FixedSizeList(item, d) if item.data_type() == &DataType::Float32 => Some(*d as usize),
        _ => None,
    }
}

impl NodeConfig for KnnConfig {
    const KIND: &'static str = "knn";
    const ROLE: Role = Role::Transform;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let mut problems = Vec::new();
        if self.top_k == 0 {
            problems.push("`top_k` must be at least 1".to_string());
        }
        if self.k_factor == Some(0) {
            problems.push("`k_factor` must be at least 1".to_string());
        }
        // libtorch takes sizes as i64: past that a chunk size wraps negative and panics.
        if self.eval_batch_size == 0 || self.eval_batch_size > i64::MAX as usize {
            problems.push(format!("`eval_batch_size` {} must be from 1 to {}", self.eval_batch_size, i64::MAX));
        }
        if self.top_k > i64::MAX as usize {
            problems.push(format!("`top_k` {} must be at most {}", self.top_k, i64::MAX));
        }
        if self.backend == Backend::Faiss
            && let Err(e) = factory::check(&self.index)
        {
            problems.push(format!("`index` {e}"));
        }
        if self.k_factor.is_some() && self.backend == Backend::Torch {
            problems.push("`k_factor` re-ranks a FAISS index's candidates; the torch backend is exact".to_string());
        }
        if self.backend == Backend::Faiss && !cfg!(feature = "faiss-gpu") && self.device.trim() != "cpu" {
            problems.push(format!(
                "device `{}`: FAISS on a GPU needs cnclip built with `--features faiss-gpu` (and the CUDA \
                 toolkit); `backend = \"torch\"` (--backend torch) is an exact search on the GPU without it",
                self.device
            ));
        } else if let Err(e) = crate::device::device(&self.device) {
            problems.push(e.to_string());
        }
        let index_path = self.index_path.as_ref().map(|p| cx.resolve(p));
        if let Some(path) = &index_path
            && let Ok(meta) = storage::metadata(path)
            && !meta.is_file()
            && !meta.is_dir()
        {
            problems.push(format!(
                "`index_path` {} is {}, not a saved index or a build-index directory",
                path.display(),
                cnclip_operators::sources::parts::kind_of(&meta)
            ));
            return Err(problems);
        }
        if let Some(dir) = index_path.as_ref().filter(|p| p.is_dir()) {
            if self.backend != Backend::Faiss {
                problems.push(format!("{}: a build-index directory is searched with the faiss backend", dir.display()));
            } else if self.device.trim() != "cpu" {
                problems.push(format!("{}: a build-index directory is searched on the CPU", dir.display()));
            }
            let opened = BuiltIndex::open(dir);
            if let (Ok(built), Some(_)) = (&opened, self.k_factor)
                && built.manifest.refine.is_none()
            {
                problems.push(format!(
                    "{}: `k_factor` re-ranks with a refinement stage, which this index has none of (built without \
                     `,RFlat`)",
                    dir.display()
                ));
            }
            match opened {
                Ok(built) if problems.is_empty() => {
                    let dim = built.manifest.dim;
                    return Ok(Operator::Transform(Arc::new(Knn {
                        config: self,
                        files: Vec::new(),
                        dim,
                        index_path,
                        built: Some(built),
                    })));
                }
                Ok(_) => {}
                Err(more) => problems.extend(more),
            }
            return Err(problems);
        }
        if self.mmap {
            problems.push("`mmap` maps a directory made by `cnclip build-index` (`index_path`)".to_string());
        }
        let files = match gallery_files(cx, &self.gallery) {
            Ok(files) if problems.is_empty() => files,
            Ok(_) => return Err(problems),
            Err(more) => return Err(problems.into_iter().chain(more).collect()),
        };
        let mut dim = None;
        for file in &files {
            match gallery_dim(file, &self.gallery_id) {
                Ok(d) if dim.is_none_or(|first| first == d) => dim = Some(d),
                Ok(d) => {
                    problems.push(format!("{}: features of {d} values, the first file's have {dim:?}", file.display()))
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Operator::Transform(Arc::new(Knn { config: self, files, dim: dim.unwrap_or(0), index_path, built: None })))
    }
}

/// Adds the `knn` kind to `registry`.
pub fn register(registry: &mut cnclip_operators::spec::Registry) {
    registry.register::<KnnConfig>();
}

/// The `knn` node.
pub struct Knn {
    config: KnnConfig,
    files: Vec<PathBuf>,
    dim: usize,
    index_path: Option<PathBuf>,
    /// `index_path` is a build-index directory.
    built: Option<BuiltIndex>,
}

/// The predictions table (`scores` optional).
pub fn predictions_schema(scores: bool) -> SchemaRef {
    let full = cnclip_schemas::predictions();
    let fields: Vec<Field> =
        full.fields().iter().filter(|f| scores || f.name() != SCORES).map(|f| f.as_ref().clone()).collect();
    Arc::new(Schema::new(fields))
}

/// Whether the predictions of queries with `input`'s schema carry their `key`: a Parquet
/// predictions table (`scores`) of queries that have one (WebDataset, img2dataset features), so
/// users join back to their metadata. cn_clip's JSON lines keep their two keys.
fn carries_key(input: &Schema, scores: bool) -> bool {
    scores && input.field_with_name(KEY).is_ok_and(|f| f.data_type() == &DataType::Utf8)
}

/// `schema` with the query's `key` after its columns.
fn with_key(schema: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(KEY, DataType::Utf8, true));
    Arc::new(Schema::new(fields))
}

/// A gallery in memory: ids, and features back to back.
pub struct Gallery {
    pub ids: Vec<i64>,
    pub features: Vec<f32>,
    pub dim: usize,
}

impl Gallery {
    /// Reads every file (feature JSON lines with id key `id_key`, or Parquet feature tables).
    ///
    /// # Errors
    /// A file that cannot be read, a bad line, features of another dimension.
    pub fn read(files: &[PathBuf], id_key: &str, dim: usize) -> Result<Gallery, Error> {
        use cnclip_operators::sources::features::FeatureError;
        let mut gallery = Gallery { ids: Vec::new(), features: Vec::new(), dim };
        for file in files {
            let path = || file.to_path_buf();
            if cnclip_operators::sources::features::is_jsonl(file) {
                let (ids, features, d) = cnclip_operators::sources::features::read_all(file, id_key)?;
                if d != dim && !ids.is_empty() {
                    return Err(Error::GalleryDim { path: path(), d, dim });
                }
                gallery.ids.extend(ids);
                gallery.features.extend(features);
            } else {
                // A table in an object store is read by ranged GETs.
                let open = storage::open_chunks(file).map_err(|source| Error::File { path: path(), source })?;
                let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(open)
                    .and_then(|b| b.build())
                    .map_err(|source| Error::Parquet { path: path(), source })?;
                let mut first_row = 0;
                for batch in reader {
                    let batch = batch.map_err(|source| Error::Arrow { path: path(), source })?;
                    let bad = cnclip_operators::sources::features::bad_rows(&batch)
                        .map_err(|source| Error::Features { path: path(), source })?;
                    if let Some((row, id, reason)) = bad.first() {
                        return Err(Error::BadGalleryRow {
                            path: path(),
                            row: first_row + row,
                            id: *id,
                            reason: reason.clone(),
                            count: bad.len(),
                        });
                    }
                    first_row += batch.num_rows();
                    let (ids, features) = id_and_features(&batch)
                        .ok_or_else(|| Error::Features { path: path(), source: FeatureError::NotATable })?;
                    gallery.ids.extend_from_slice(ids.values());
                    gallery.features.extend_from_slice(features);
                }
            }
        }
        gallery.check_unique(files)?;
        Ok(gallery)
    }

    /// An id twice in a gallery would come back twice in one neighbour list (and count twice
    /// in a recall): refused, naming it and where its rows are.
    fn check_unique(&self, files: &[PathBuf]) -> Result<(), Error> {
        let mut order: Vec<usize> = (0..self.ids.len()).collect();
        order.sort_unstable_by_key(|&row| self.ids[row]);
        let Some(pair) = order.windows(2).find(|pair| self.ids[pair[0]] == self.ids[pair[1]]) else { return Ok(()) };
        let (first, second) = (pair[0].min(pair[1]), pair[0].max(pair[1]));
        let listed: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        Err(Error::DuplicateGalleryId { id: self.ids[first], first, second, files: listed.join(", ") })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The `id` column and the features (back to back) of a feature-table batch.
fn id_and_features(batch: &RecordBatch) -> Option<(&Int64Array, &[f32])> {
    let ids = batch.column_by_name(ID)?.as_primitive_opt::<Int64Type>()?;
    let lists = batch.column_by_name(FEATURE)?.as_fixed_size_list_opt()?;
    let d = lists.value_length() as usize;
    let values = lists.values().as_primitive_opt::<Float32Type>()?.values();
    Some((ids, &values[lists.offset() * d..(lists.offset() + lists.len()) * d]))
}

impl Transform for Knn {
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, InputError> {
        let names: Vec<&str> = input.fields().iter().map(|f| f.name().as_str()).collect();
        match (input.field_with_name(ID).map(|f| f.data_type().clone()), feature_dim(input)) {
            (Ok(DataType::Int64), Some(d)) if d == self.dim => {
                let schema = predictions_schema(self.config.scores);
                Ok(if carries_key(input, self.config.scores) { with_key(&schema) } else { schema })
            }
            (Ok(DataType::Int64), Some(d)) => Err(InputError::Mismatch(format!(
                "query features have {d} values, the {}'s {}",
                if self.built.is_some() { "index" } else { "gallery" },
                self.dim
            ))),
            _ => Err(InputError::Mismatch(format!(
                "needs a feature table (id int64, feature float32 vectors); the input has {}",
                names.join(", ")
            ))),
        }
    }

    fn execution(&self) -> Execution {
        Execution::Devices { devices: vec![self.config.device.clone()], batch_rows: self.config.query_batch.max(1) }
    }

    fn open_replica(&self, device: &str) -> cnclip_operators::Result<Option<Box<dyn TransformReplica>>> {
        let fail = |e: Error| cnclip_operators::Error::Model(Box::new(e));
        if let Some(built) = &self.built {
            let indexes = built.load(self.config.mmap).map_err(fail)?;
            let nprobe = self.config.nprobe.unwrap_or(built.manifest.nprobe);
            let space = faiss::index::autotune::ParameterSpace::new().map_err(|e| fail(Error::Faiss(e)))?;
            for index in &indexes {
                space.set_index_parameter(index, "nprobe", nprobe as f64).map_err(|e| fail(Error::Faiss(e)))?;
                // An HNSW coarse quantizer (`IVF…_HNSW…`, for millions of lists) is searched as
                // deep as `ef_search`; FAISS's own default is max(16, nprobe).
                if let Some(ef) = self.config.ef_search {
                    space.set_index_parameter(index, "quantizer_efSearch", ef as f64).map_err(|e| {
                        cnclip_operators::Error::Format {
                            path: built.dir.display().to_string(),
                            reason: format!(
                                "--ef-search {ef}: the index has no HNSW coarse quantizer (it applies to \
                                 `IVF…_HNSW…` indexes): {e}"
                            ),
                        }
                    })?;
                }
            }
            let gallery_len = built.manifest.total_rows.unwrap_or(0) as usize;
            let refine = match (built.refine_store().map_err(fail)?, &built.manifest.refine) {
                (Some(store), Some(recorded)) => Some((store, self.config.k_factor.unwrap_or(recorded.k_factor))),
                _ => None,
            };
            return Ok(Some(Box::new(KnnReplica {
                engine: Engine::Built { indexes, refine },
                ids: Vec::new(),
                gallery_len,
                top_k: self.config.top_k,
                scores: self.config.scores,
                schema: predictions_schema(self.config.scores),
                rows_seen: 0,
                short: 0,
            })));
        }
        let gallery = Gallery::read(&self.files, &self.config.gallery_id, self.dim).map_err(fail)?;
        if gallery.len() < self.config.top_k {
            // cn_clip's `topk` raises here; every query gets the whole gallery, said once.
            eprintln!(
                "cnclip knn: note: the gallery has {} rows, fewer than top_k {}: each query gets all {} of them",
                gallery.len(),
                self.config.top_k,
                gallery.len()
            );
        }
        let engine = match self.config.backend {
            Backend::Torch => {
                let device = crate::device::device(device).map_err(|e| cnclip_operators::Error::Model(Box::new(e)))?;
                let features = Tensor::from_slice(&gallery.features)
                    .view([gallery.len() as i64, self.dim as i64])
                    .to_device(device);
                Engine::Torch { features, device, chunk: self.config.eval_batch_size.max(1) }
            }
            Backend::Faiss => {
                let index =
                    build_index(&self.config, self.index_path.as_deref(), &gallery, &self.files).map_err(fail)?;
                match crate::device::device(device).map_err(|e| cnclip_operators::Error::Model(Box::new(e)))? {
                    tch::Device::Cpu => Engine::Faiss(index),
                    #[cfg(feature = "faiss-gpu")]
                    tch::Device::Cuda(ordinal) => Engine::FaissGpu(gpu::to_gpu(index, ordinal).map_err(fail)?),
                    other => {
                        let message = format!("knn: FAISS cannot search on {other:?} in this build");
                        return Err(cnclip_operators::Error::Model(message.into()));
                    }
                }
            }
        };
        Ok(Some(Box::new(KnnReplica {
            engine,
            gallery_len: gallery.len(),
            ids: gallery.ids,
            top_k: self.config.top_k,
            scores: self.config.scores,
            schema: predictions_schema(self.config.scores),
            rows_seen: 0,
            short: 0,
        })))
    }
}

/// What a FAISS index saved at `index_path` (a file) was built from, kept beside it as
/// `{index_path}.cnclip.json`: a saved index is loaded only when the gallery's files (path,
/// size, modification time and sha256), the id key and the index settings are the ones it was
/// built from. Counts and dimension alone would pass an index of another gallery of the same
/// shape, whose neighbours would then be silently wrong.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
struct SavedIndex {
    index: String,
    train_sample: usize,
    gallery_id: String,
    dim: usize,
    rows: usize,
    gallery: Vec<cnclip_operators::fingerprint::Stamp>,
    /// The index file written with this record: (bytes, sha256). A file replaced since (by hand,
    /// or by another run between its index and its record) does not match and is built again.
    #[serde(default)]
    file: Option<(u64, String)>,
}

impl SavedIndex {
    /// The (bytes, sha256) of an index file.
    fn stamp(path: &Path) -> Result<(u64, String), Error> {
        let file = |source| Error::File { path: path.to_path_buf(), source };
        let bytes = storage::metadata(path).map_err(file)?.len();
        let sha = cnclip_operators::fingerprint::sha256_file(path).map_err(file)?;
        Ok((bytes, sha))
    }

    fn record_path(index_path: &Path) -> PathBuf {
        let mut name = index_path.file_name().unwrap_or_default().to_os_string();
        name.push(".cnclip.json");
        index_path.with_file_name(name)
    }

    /// What differs from `now`, in a few words (`None`: the same).
    fn difference(&self, now: &SavedIndex) -> Option<String> {
        let without_file = |record: &SavedIndex| SavedIndex { file: None, ..record.clone() };
        if without_file(self) == without_file(now) {
            return None;
        }
        if self.index != now.index || self.train_sample != now.train_sample {
            return Some(format!(
                "it was built as `{}` (train_sample {}), this run asks for `{}` (train_sample {})",
                self.index, self.train_sample, now.index, now.train_sample
            ));
        }
        if self.gallery_id != now.gallery_id || self.dim != now.dim || self.rows != now.rows {
            return Some(format!(
                "it was built from a gallery of {} `{}` rows of {} values, this one has {} `{}` rows of {}",
                self.rows, self.gallery_id, self.dim, now.rows, now.gallery_id, now.dim
            ));
        }
        cnclip_operators::fingerprint::difference(&self.gallery, &now.gallery)
            .map(|d| format!("its gallery {d}"))
            .or_else(|| Some("its record differs".into()))
    }
}

/// Builds (or loads from `index_path`) the FAISS index of `gallery`, read from `files`. A saved
/// index is loaded only when its record ([`SavedIndex`]) matches this gallery and these settings;
/// one whose record differs is built again (and saved over it); one without a record (saved by
/// another tool, or by a cnclip before records) is refused, since nothing says what it holds.
fn build_index(
    config: &KnnConfig,
    index_path: Option<&Path>,
    gallery: &Gallery,
    files: &[PathBuf],
) -> Result<faiss::index::IndexImpl, Error> {
    let faiss_err = |faiss: faiss::error::Error| Error::Index { index: config.index.clone(), faiss };
    let record = index_path.map(|_| SavedIndex {
        index: config.index.clone(),
        train_sample: config.train_sample,
        gallery_id: config.gallery_id.clone(),
        dim: gallery.dim,
        rows: gallery.len(),
        file: None,
        gallery: files
            .iter()
            .map(|f| {
                cnclip_operators::fingerprint::Stamp::of(&storage::canonicalize(f).unwrap_or_else(|_| f.clone()), true)
            })
            .collect(),
    });
    let saved = match (index_path.filter(|p| p.exists()), &record) {
        (Some(path), Some(record)) => {
            let record_path = SavedIndex::record_path(path);
            let was: SavedIndex = match storage::read(&record_path) {
                Ok(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(was) => was,
                    Err(source) => return Err(Error::Record { record: record_path, path: path.to_path_buf(), source }),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::NoRecord { path: path.to_path_buf(), record: record_path });
                }
                Err(source) => return Err(Error::File { path: record_path, source }),
            };
            let file = SavedIndex::stamp(path)?;
            match was.difference(record) {
                None if was.file.as_ref() == Some(&file) => Some(path),
                None => {
                    eprintln!(
                        "cnclip knn: {}: the index file is not the one its record was written with (replaced since?): \
                         building it again",
                        path.display()
                    );
                    None
                }
                Some(why) => {
                    eprintln!("cnclip knn: {}: not this gallery's index ({why}): building it again", path.display());
                    None
                }
            }
        }
        _ => None,
    };
    let mut index = match saved {
        Some(path) => {
            let index = faiss::read_index(path.to_string_lossy())
                .map_err(|faiss| Error::SavedUnreadable { path: path.to_path_buf(), faiss })?;
            if index.ntotal() != gallery.len() as u64 || index.d() as usize != gallery.dim {
                return Err(Error::SavedShape {
                    path: path.to_path_buf(),
                    ntotal: index.ntotal(),
                    d: index.d(),
                    rows: gallery.len(),
                    dim: gallery.dim,
                });
            }
            index
        }
        None => {
            let mut index = faiss::index_factory(gallery.dim as u32, &config.index, faiss::MetricType::InnerProduct)
                .map_err(faiss_err)?;
            if !index.is_trained() {
                let n = gallery.len();
                let take = config.train_sample.clamp(1, n.max(1));
                let mut sample = Vec::with_capacity(take * gallery.dim);
                for i in 0..take {
                    let row = i * n / take;
                    sample.extend_from_slice(&gallery.features[row * gallery.dim..(row + 1) * gallery.dim]);
                }
                index.train(&sample).map_err(faiss_err)?;
            }
            index.add(&gallery.features).map_err(faiss_err)?;
            if let (Some(path), Some(record)) = (index_path, &record) {
                // The index goes to its temporary file, the record (naming that file's size and
                // sha256) beside the target, then the index into place: a crash in between
                // leaves a record that matches no index file, which is then built again.
                let tmp = storage::staging::temp_path(path);
                let saved = (|| {
                    faiss::write_index(&index, tmp.to_string_lossy())
                        .map_err(|source| Error::Save { path: path.to_path_buf(), source })?;
                    let record = SavedIndex { file: Some(SavedIndex::stamp(&tmp)?), ..record.clone() };
                    let json = serde_json::to_vec_pretty(&record)?;
                    let record_path = SavedIndex::record_path(path);
                    if let Err(source) =
                        cnclip_operators::write_atomically(&record_path, |f| std::io::Write::write_all(f, &json))
                    {
                        return Err(Error::File { path: record_path, source });
                    }
                    storage::rename(&tmp, path).map_err(|source| Error::File { path: path.to_path_buf(), source })
                })();
                if let Err(e) = saved {
                    let _ = storage::remove_file(&tmp);
                    return Err(e);
                }
            }
            index
        }
    };
    let space = faiss::index::autotune::ParameterSpace::new().map_err(faiss_err)?;
    if let Some(nprobe) = config.nprobe {
        space.set_index_parameter(&index, "nprobe", nprobe as f64).map_err(faiss_err)?;
    }
    if let Some(ef) = config.ef_search {
        space.set_index_parameter(&index, "efSearch", ef as f64).map_err(faiss_err)?;
    }
    if let Some(k_factor) = config.k_factor {
        // `k_factor_rf` is IndexRefine's (`…,RFlat`), `k_factor` IndexIVFPQR's (`…,PQ…+…`).
        space
            .set_index_parameter(&index, "k_factor_rf", k_factor as f64)
            .or_else(|_| space.set_index_parameter(&index, "k_factor", k_factor as f64))
            .map_err(|source| Error::KFactor { index: config.index.clone(), source })?;
    }
    let _ = &mut index;
    Ok(index)
}

enum Engine {
    Faiss(faiss::index::IndexImpl),
    /// A build-index directory: its merged index, or its shards in turn (labels are ids), and
    /// its refinement vectors with the `k_factor` searched.
    Built {
        indexes: Vec<faiss::index::IndexImpl>,
        refine: Option<(refine::RefineStore, usize)>,
    },
    #[cfg(feature = "faiss-gpu")]
    FaissGpu(faiss::GpuIndexImpl<'static, faiss::index::IndexImpl>),
    Torch {
        features: Tensor,
        device: tch::Device,
        chunk: usize,
    },
}

struct KnnReplica {
    engine: Engine,
    /// Gallery ids by row (empty for a build-index directory, whose labels are the ids).
    ids: Vec<i64>,
    gallery_len: usize,
    top_k: usize,
    scores: bool,
    schema: SchemaRef,
    /// Query rows seen so far (for the quarantine's row numbers).
    rows_seen: usize,
    /// Queries that got fewer than `min(top_k, gallery)` neighbours (an approximate index whose
    /// probed lists held fewer): said once, when the replica ends.
    short: usize,
}

impl Drop for KnnReplica {
    fn drop(&mut self) {
        if self.short > 0 {
            eprintln!(
                "cnclip knn: note: {} of {} queries got fewer than {} neighbours: the index's probed lists held \
                 fewer (probe more lists: --nprobe, or --ef-search)",
                self.short,
                self.rows_seen,
                self.top_k.min(self.gallery_len)
            );
        }
    }
}

impl KnnReplica {
    /// For each query: (gallery id, score) pairs, best first.
    fn search(&mut self, queries: &[f32], n: usize) -> Result<Vec<Vec<(i64, f32)>>, Error> {
        let k = self.top_k.min(self.gallery_len);
        if k == 0 || n == 0 {
            return Ok(vec![Vec::new(); n]);
        }
        let ids = &self.ids;
        let to_ids = |rows: Vec<Vec<(usize, f32)>>| -> Vec<Vec<(i64, f32)>> {
            rows.into_iter().map(|hits| hits.into_iter().map(|(row, score)| (ids[row], score)).collect()).collect()
        };
        match &mut self.engine {
            Engine::Faiss(index) => Ok(to_ids(hits(index.search(queries, k).map_err(Error::Faiss)?, n, k))),
            #[cfg(feature = "faiss-gpu")]
            Engine::FaissGpu(index) => Ok(to_ids(hits(index.search(queries, k).map_err(Error::Faiss)?, n, k))),
            Engine::Built { indexes, refine: None } => built::search(indexes, queries, queries.len() / n, k),
            Engine::Built { indexes, refine: Some((store, k_factor)) } => {
                built::search_refined(indexes, store, queries, queries.len() / n, k, *k_factor)
            }
            Engine::Torch { features, device, chunk } => tch::no_grad(|| {
                let d = features.size()[1];
                let q = Tensor::from_slice(queries).view([n as i64, d]).to_device(*device);
                let rows = features.size()[0];
                let (mut values, mut indices) = (Vec::new(), Vec::new());
                let mut start = 0;
                while start < rows {
                    let len = (*chunk as i64).min(rows - start);
                    let scores = q.matmul(&features.narrow(0, start, len).tr());
                    let (v, i) = scores.topk(k.min(len as usize) as i64, -1, true, true);
                    values.push(v);
                    indices.push(i + start);
                    start += len;
                }
                let (v, i) = if values.len() == 1 {
                    (values.pop().expect("one chunk"), indices.pop().expect("one chunk"))
                } else {
                    let (v, order) = Tensor::cat(&values, 1).topk(k as i64, -1, true, true);
                    (v, Tensor::cat(&indices, 1).gather(1, &order, false))
                };
                let v: Vec<f32> = Vec::try_from(v.to_device(tch::Device::Cpu).to_kind(Kind::Float).flatten(0, -1))?;
                let i: Vec<i64> = Vec::try_from(i.to_device(tch::Device::Cpu).flatten(0, -1))?;
                Ok((0..n).map(|q| (0..k).map(|j| (ids[i[q * k + j] as usize], v[q * k + j])).collect()).collect())
            }),
        }
    }
}

/// FAISS results as (gallery row, score) pairs per query; rows FAISS could not fill (-1) are
/// left out.
fn hits(found: faiss::index::SearchResult, n: usize, k: usize) -> Vec<Vec<(usize, f32)>> {
    (0..n)
        .map(|q| {
            (0..k)
                .filter_map(|j| {
                    let at = q * k + j;
                    found.labels[at].get().map(|row| (row as usize, found.distances[at]))
                })
                .collect()
        })
        .collect()
}

/// FAISS's GPU indexes (the `faiss-gpu` feature).
#[cfg(feature = "faiss-gpu")]
mod gpu {
    use faiss::gpu::StandardGpuResources;
    use faiss::index::IndexImpl;

    /// Moves `index` to CUDA device `ordinal`. The index borrows its `StandardGpuResources`
    /// (scratch memory and streams) for its whole life; a knn replica lives as long as its
    /// job's process, so the resources are leaked rather than tied to it.
    pub(super) fn to_gpu(
        index: IndexImpl,
        ordinal: usize,
    ) -> Result<faiss::GpuIndexImpl<'static, IndexImpl>, super::Error> {
        let resources = StandardGpuResources::new().map_err(super::Error::GpuResources)?;
        let resources: &'static StandardGpuResources = Box::leak(Box::new(resources));
        index.into_gpu(resources, ordinal as i32).map_err(|source| super::Error::ToGpu { ordinal, source })
    }
}

impl TransformReplica for KnnReplica {
    fn apply(&mut self, batch: &RecordBatch, _: &str) -> cnclip_operators::Result<Output> {
        let internal = cnclip_operators::Error::Internal;
        // Queries that are not numbers (null ids or features, NaN, inf) are quarantined, not
        // searched: FAISS returns nothing for them and a matmul ranks NaN first.
        let bad = cnclip_operators::sources::features::bad_rows(batch).map_err(|e| internal(e.to_string()))?;
        let kept;
        let (batch, rejected) = if bad.is_empty() {
            (batch, Vec::new())
        } else {
            let mut keep = vec![true; batch.num_rows()];
            let rejected = bad
                .into_iter()
                .map(|(row, id, reason)| {
                    keep[row] = false;
                    cnclip_operators::quarantine::Rejected {
                        source: "queries".into(),
                        location: format!("query row {}", self.rows_seen + row),
                        id: id.map(|id| id.to_string()),
                        reason,
                    }
                })
                .collect();
            kept = arrow::compute::filter_record_batch(batch, &arrow::array::BooleanArray::from(keep))?;
            (&kept, rejected)
        };
        self.rows_seen += batch.num_rows() + rejected.len();
        let (query_ids, features) =
            id_and_features(batch).ok_or_else(|| internal("knn: not a feature batch".into()))?;
        let found = self.search(features, query_ids.len()).map_err(|e| internal(e.to_string()))?;
        let want = self.top_k.min(self.gallery_len);
        self.short += found.iter().filter(|hits| hits.len() < want).count();
        let mut neighbours =
            ListBuilder::new(Int64Builder::new()).with_field(Arc::new(Field::new("item", DataType::Int64, true)));
        let mut scores =
            ListBuilder::new(Float32Builder::new()).with_field(Arc::new(Field::new("item", DataType::Float32, true)));
        for hits in &found {
            for &(id, score) in hits {
                neighbours.values().append_value(id);
                scores.values().append_value(score);
            }
            neighbours.append(true);
            scores.append(true);
        }
        let mut columns: Vec<arrow::array::ArrayRef> =
            vec![Arc::new(Int64Array::from(query_ids.values().to_vec())), Arc::new(neighbours.finish())];
        if self.scores {
            columns.push(Arc::new(scores.finish()));
        }
        let schema = match carries_key(&batch.schema(), self.scores) {
            true => {
                columns.push(batch.column_by_name(KEY).expect("checked by carries_key").clone());
                with_key(&self.schema)
            }
            false => self.schema.clone(),
        };
        let batch = RecordBatch::try_new(schema, columns)?;
        Ok(Output { batch, rejected })
    }
}

/// The name of the query id column of the predictions table.
pub const QUERY_COLUMN: &str = QUERY_ID;
/// The name of the neighbours column.
pub const NEIGHBOURS_COLUMN: &str = NEIGHBOUR_IDS;
