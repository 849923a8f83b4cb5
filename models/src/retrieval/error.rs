//! Retrieval's error: FAISS factory strings, indexes and their files, build-index directories,
//! galleries. Each variant carries what it is about (the file, the factory string, the id) and
//! keeps the error it wraps. Where a message quotes FAISS in its own words ([`words`]: the C++
//! signature and source location cut off), the FAISS error is kept beside the message rather than
//! as its source, since the shortened text no longer contains the full one and a printed chain
//! would repeat FAISS's message whole.

use std::path::PathBuf;

use super::factory::{MAX_SIZE, words};

/// What retrieval can fail on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("an empty FAISS factory string (e.g. Flat, IVF1024,Flat, HNSW32, IVF4096,PQ64)")]
    EmptyFactory,
    /// A size in a factory string that is 0 or past [`MAX_SIZE`] (FAISS would crash on it).
    #[error(
        "`{description}`: `{component}` asks for a size of {size}: sizes in a FAISS factory string go from 1 to \
         {MAX_SIZE}"
    )]
    FactorySize { description: String, component: String, size: String },
    #[error("`{description}` is not a factory string FAISS accepts for {dim}-value vectors ({})", words(.faiss))]
    Factory { description: String, dim: usize, faiss: faiss::error::Error },
    #[error(
        "`{description}` is not an IVF index: build-index merges shards by their inverted lists, so it builds \
         `IVF…` indexes (IVF4096,PQ64; IVF1024,SQ8; IVF256,Flat; IVF65536_HNSW32,PQ64 with an HNSW coarse \
         quantizer), without a pre-transform (OPQ…, PCA…) or a refinement (…,RFlat); for other indexes use \
         `make-topk-predictions --index … --index-path FILE`"
    )]
    NotIvf { description: String },
    #[error("{}: not an IVF index", .path.display())]
    NotIvfFile { path: PathBuf },
    #[error("`{description}`: a refinement needs an index before it")]
    RefinementAlone { description: String },
    #[error(
        "`{description}`: build-index refines with the exact float32 vectors only (`,RFlat` or `,Refine(Flat)`), \
         kept on disk"
    )]
    RefinementKind { description: String },
    /// FAISS failed a call: its message as it gives it.
    #[error(transparent)]
    Faiss(faiss::error::Error),
    /// FAISS refused the data or the settings (a sample smaller than a k-means it runs): in its
    /// own words.
    #[error("{}", words(.0))]
    FaissRefused(faiss::error::Error),
    /// FAISS's C API failed (a merge of incompatible indexes): its message, in its own words.
    #[error("{message}")]
    FaissCall { message: String },
    #[error("id {id} is negative; FAISS reserves negative ids")]
    NegativeId { id: i64 },
    #[error("{}: a path with a NUL byte", .path.display())]
    NulInPath { path: PathBuf },
    #[error("{}: not a FAISS index that can be memory-mapped: {message}", .path.display())]
    NotMappable { path: PathBuf, message: String },
    #[error("only IVF indexes can be merged")]
    MergeNotIvf,
    #[error("{}: not a readable FAISS index: {source}", .path.display())]
    Unreadable { path: PathBuf, source: faiss::error::Error },
    #[error("writing {}: {source}", .path.display())]
    WriteIndex { path: PathBuf, source: faiss::error::Error },
    #[error("writing {}: {source}", .path.display())]
    Write { path: PathBuf, source: std::io::Error },
    /// A file of `path` that cannot be read (opened, stat'ed, hashed).
    #[error("{}: {source}", .path.display())]
    File { path: PathBuf, source: std::io::Error },
    #[error("mapping {}: {source}", .path.display())]
    Map { path: PathBuf, source: std::io::Error },
    /// An IO error that names its file itself.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A file of a build-index directory is missing.
    #[error("{}: {source} (rerun `cnclip build-index` to rebuild it)", .path.display())]
    Missing { path: PathBuf, source: std::io::Error },
    /// A file of a build-index directory is not the size build-index wrote.
    #[error(
        "{}: {bytes} bytes, but build-index wrote {written} (damaged since; rerun `cnclip build-index` after \
         deleting it)",
        .path.display()
    )]
    Damaged { path: PathBuf, bytes: u64, written: u64 },
    #[error(
        "{}: {source} ({} is not an index directory made by `cnclip build-index`)",
        .path.display(),
        .dir.display()
    )]
    NoManifest { path: PathBuf, dir: PathBuf, source: std::io::Error },
    #[error("{}: not a build-index manifest: {source}", .path.display())]
    ManifestJson { path: PathBuf, source: serde_json::Error },
    #[error("{}: format `{format}`, this cnclip reads `{}`", .path.display(), super::built::FORMAT)]
    ManifestFormat { path: PathBuf, format: String },
    #[error(
        "{}: an index of {d}-value vectors{}, the manifest says {dim}-value vectors",
        .path.display(),
        if *.trained { "" } else { " (untrained)" }
    )]
    IndexShape { path: PathBuf, d: u32, trained: bool, dim: usize },
    #[error("{}: shard {shard} has no refinement vectors (rerun `cnclip build-index`)", .dir.display())]
    NoRefinement { dir: PathBuf, shard: usize },
    #[error(
        "id {id} is on rows {first} and {second} of the table: a refined index (…,RFlat) looks vectors up by id, so \
         ids must be unique (or build without ,RFlat)"
    )]
    DuplicateId { id: i64, first: u64, second: u64 },
    #[error("{}: id {id} is mapped to shard {shard}, which is not there", super::refine::ID_MAP)]
    MappedShard { id: i64, shard: u32 },
    #[error("{}: id {id} is mapped to row {row} of a shard of {rows} rows (damaged; rebuild the index)", .path.display())]
    MappedRow { path: PathBuf, id: i64, row: u64, rows: usize },
    #[error("id {id} is in the index but in no shard's refinement vectors (rebuild the index)")]
    NotRefined { id: i64 },
    #[error("{}: {bytes} bytes, but its shard's rows need {expected} (rebuild the index)", .path.display())]
    ShardSize { path: PathBuf, bytes: u64, expected: u64 },
    /// A gallery or query file read through the operators crate (its error names the file).
    #[error(transparent)]
    Operators(#[from] cnclip_operators::Error),
    #[error("{}: no `feature` column of float32 vectors", .path.display())]
    NoFeatureColumn { path: PathBuf },
    #[error("{}: features of {d} values, expected {dim}", .path.display())]
    GalleryDim { path: PathBuf, d: usize, dim: usize },
    #[error("{}: {source}", .path.display())]
    Parquet { path: PathBuf, source: parquet::errors::ParquetError },
    #[error("{}: {source}", .path.display())]
    Arrow { path: PathBuf, source: arrow::error::ArrowError },
    /// A gallery file that is not a feature table.
    #[error("{}: {source}", .path.display())]
    Features { path: PathBuf, source: cnclip_operators::sources::features::FeatureError },
    /// Rows of a gallery file that cannot be searched (`count` in the batch of the first).
    #[error(
        "{}: row {row}{}: {reason}; {count} row(s) of this batch cannot be searched (a gallery must be whole: fix \
         or drop them)",
        .path.display(),
        .id.map_or_else(String::new, |id| format!(" (id {id})"))
    )]
    BadGalleryRow { path: PathBuf, row: usize, id: Option<i64>, reason: String, count: usize },
    #[error(
        "gallery id {id} appears twice (rows {first} and {second} of {files}): every gallery item needs its own id"
    )]
    DuplicateGalleryId { id: i64, first: usize, second: usize, files: String },
    #[error("FAISS index `{index}`: {}", words(.faiss))]
    Index { index: String, faiss: faiss::error::Error },
    #[error("FAISS index `{index}`: `k_factor` applies to an index with a refinement stage (…,RFlat): {source}")]
    KFactor { index: String, source: faiss::error::Error },
    #[error(
        "{}: not a saved index's record ({source}); remove it and {} to build the index again",
        .record.display(),
        .path.display()
    )]
    Record { record: PathBuf, path: PathBuf, source: serde_json::Error },
    #[error(
        "{}: a saved index without its record {} of what it was built from (saved by another tool or an older \
         cnclip): it may hold another gallery; remove it to build it again, or give another --index-path",
        .path.display(),
        .record.display()
    )]
    NoRecord { path: PathBuf, record: PathBuf },
    #[error("{}: not a FAISS index FAISS can read ({})", .path.display(), words(.faiss))]
    SavedUnreadable { path: PathBuf, faiss: faiss::error::Error },
    #[error("{}: an index of {ntotal} vectors of {d} values, the gallery has {rows} of {dim}", .path.display())]
    SavedShape { path: PathBuf, ntotal: u64, d: u32, rows: usize, dim: usize },
    #[error("{}: {source}", .path.display())]
    Save { path: PathBuf, source: faiss::error::Error },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error("FAISS GPU resources: {0}")]
    GpuResources(#[source] faiss::error::Error),
    #[error("FAISS index to cuda:{ordinal}: {source}")]
    ToGpu { ordinal: usize, source: faiss::error::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
