//! The operators crate's error type: structural faults that stop a job. Record-level faults are
//! not errors here — they become [`crate::quarantine::Rejected`] records under the job's policy.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("LMDB {path}: {source}")]
    Lmdb { path: String, source: lmdb::Error },
    /// A bad record under `--on-error fail` (the binary adds that hint).
    #[error("{location}: {reason}")]
    Record { location: String, reason: String },
    /// A file that is not what it should be (a wrong table schema, a corrupt Parquet footer).
    #[error("{path}: {reason}")]
    Format { path: String, reason: String },
    /// An LMDB file we wrote does not read back as the tree it should be (the bulk loader's
    /// end-of-job check): `problem` says what is wrong where.
    #[error("{path}: the LMDB file written fails its check: {problem}")]
    LmdbCheck { path: String, problem: crate::lmdb_file::VerifyError },
    /// An LMDB input that cannot be read safely (truncated, corrupted): LMDB would trust it
    /// and crash, so it is refused, naming `path` (its `data.mdb`) and what is wrong where.
    #[error("{path}: corrupt or truncated LMDB file, not read: {problem}")]
    LmdbCorrupt { path: String, problem: crate::lmdb_file::VerifyError },
    /// Everything downstream has stopped; a source or operator returns quietly.
    #[error("the pipeline stopped")]
    Stopped,
    /// The runtime: a node failed (naming it), or the graph could not start.
    #[error(transparent)]
    Runtime(#[from] cnclip_pipeline::Error),
    /// Arrow refused a batch we built (a bug, or a value past Arrow's limits).
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    /// Arrow failed on a batch read from or written to `path`.
    #[error("{path}: {source}")]
    ArrowFile { path: String, source: arrow::error::ArrowError },
    /// A Parquet file could not be read or written.
    #[error("{path}: {source}")]
    Parquet { path: String, source: parquet::errors::ParquetError },
    #[error(transparent)]
    Tokenizer(#[from] crate::transforms::tokenizer::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Another process is writing the same output (see [`crate::storage::staging::WriterLock`]).
    #[error(
        "{target}: another job is writing it ({holder}; its lock is {lock}): two writers would mix their work; \
         wait for that job, or stop it, and run again"
    )]
    Busy { target: String, lock: String, holder: String },
    /// A sharded output directory holds parts of another split (another `n`): writing shard
    /// `shard` there would mix two splits in one table.
    #[error(
        "{dir} holds parts of another split ({other}, …): --shard {shard} would mix two splits in one table; remove \
         them or use the same n"
    )]
    MixedSplits { dir: String, other: String, shard: crate::sources::Shard },
    /// SIGINT or SIGTERM stopped the job (its outputs were removed).
    #[error("interrupted by {signal}: nothing was written")]
    Interrupted { signal: &'static str },
    /// Starting the async runtime.
    #[error("starting the runtime: {0}")]
    Start(#[source] std::io::Error),
    /// A model or an index could not be built or used on its device (a checkpoint's weights, a
    /// FAISS index that cannot be trained on the data given): the model crate's error, which
    /// says which. Bad input or settings, unlike [`Error::Internal`].
    #[error(transparent)]
    Model(cnclip_pipeline::BoxError),
    /// A table a transform reads once, when its first batch arrives (`require_images`' image
    /// ids), could not be read: `what` says what was being read; every batch after fails with
    /// the same error. Bad input, unlike [`Error::Internal`].
    #[error("{what}: {source}")]
    Lookup { what: &'static str, source: std::sync::Arc<Error> },
    /// A bug in cnclip, never bad input or settings.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

/// Every problem a validation found, reported at once rather than the first alone (as Vector's
/// topology builder and DataFusion's `Collection` do): one sentence each, shown on one line
/// joined by `; `. What planning a pipeline, checking a build-index directory or checking a
/// job's arguments returns, so a job passes them on with `?`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(pub Vec<String>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

impl std::error::Error for Problems {}

impl From<Vec<String>> for Problems {
    fn from(problems: Vec<String>) -> Self {
        Problems(problems)
    }
}

impl std::ops::Deref for Problems {
    type Target = [String];

    fn deref(&self) -> &[String] {
        &self.0
    }
}

impl IntoIterator for Problems {
    type Item = String;
    type IntoIter = std::vec::IntoIter<String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
