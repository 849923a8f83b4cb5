//! `build-index`'s errors: the settings, the feature table and its rows, and each step of the
//! build (training, adding, merging). A message names the setting by its flag (`--features`,
//! `--index`), the file, and the row or id it is about; each variant keeps the error it wraps as
//! its source. Pipeline errors stay in the chain as themselves, so a caught signal is still
//! seen as an interruption (exit code 130/143) by whoever reports the error.

use std::path::PathBuf;

use arrow::datatypes::DataType;
use cnclip_operators::sources::features::FeatureError;
use cnclip_operators::sources::parts::PartsError;

/// What building an index can fail on.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A count among the settings that must be at least 1.
    #[error("{flag} must be at least 1")]
    Zero { flag: &'static str },
    #[error("--index-path {}: a file; build-index writes a directory", .path.display())]
    IndexPathIsFile { path: PathBuf },
    /// The factory string (or the index it describes) is refused.
    #[error("--index {0}")]
    Index(#[source] super::super::Error),

    // The feature table.
    #[error("--features {0}")]
    Parts(#[source] PartsError),
    #[error("--features {}", .path.display())]
    FeaturesDir { path: PathBuf, source: std::io::Error },
    #[error("--features {}: a directory with no .parquet part", .path.display())]
    NoParts { path: PathBuf },
    #[error("--features {}: {kind}, not a regular file", .path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("--features {}: no such file or directory", .path.display())]
    NoSuchFile { path: PathBuf },
    /// The table's first file cannot be opened as a feature table.
    #[error("--features {}", .path.display())]
    Open { path: PathBuf, source: cnclip_operators::Error },
    #[error("{}: id column `{column}` is {found}, not int64", .path.display())]
    IdType { path: PathBuf, column: String, found: DataType },
    #[error("{}: no id column `{column}` (columns: {columns}; name it with --id-column)", .path.display())]
    NoIdColumn { path: PathBuf, column: String, columns: String },
    #[error("{}: no `feature` column of float32 vectors", .path.display())]
    NoFeatureColumn { path: PathBuf },
    #[error("{}: the first feature vector is empty", .path.display())]
    EmptyFirstVector { path: PathBuf },
    #[error("--features {features}: the table has no rows")]
    NoRows { features: String },
    #[error("{}", .path.display())]
    Stat { path: PathBuf, source: std::io::Error },

    // The table's rows (`at`: the table and the first row of the batch).
    #[error("{at}: no int64 id column `{column}`")]
    RowsIdColumn { at: String, column: String },
    #[error("{at}: a null id")]
    NullId { at: String },
    #[error("row {row}: id {id} is negative; FAISS reserves negative ids (-1 stands for no result)")]
    NegativeId { row: u64, id: i64 },
    #[error("{at}: no `feature` column")]
    RowsFeatureColumn { at: String },
    #[error("{at}: a null feature vector")]
    NullFeature { at: String },
    #[error("{at}: a null feature value")]
    NullValue { at: String },
    #[error("{at}: feature values are not float32")]
    NotFloat32 { at: String },
    #[error("row {row}: a feature vector of {len} values, the table's have {dim}")]
    Length { row: u64, len: usize, dim: usize },
    #[error("{at}: `feature` is {found}, not float32 vectors")]
    FeatureType { at: String, found: DataType },
    #[error("{at}: row {row} (id {id}): {reason}")]
    NotFinite { at: String, row: u64, id: i64, reason: FeatureError },

    // The build.
    #[error(
        "--train-sample {sample}: {drawn} training vectors{}, but `{index}` has {nlist} inverted lists and k-means \
         needs at least one vector per list (FAISS advises 39 per list: {}); use a larger sample or fewer lists",
        if (*.drawn as u64) < *.sample as u64 { format!(" (the table has {} rows)", .total) } else { String::new() },
        39 * .nlist
    )]
    SampleTooSmall { sample: usize, drawn: usize, total: u64, index: String, nlist: usize },
    #[error("training `{ivf}` on {drawn} vectors")]
    Train { ivf: String, drawn: usize, source: super::super::Error },
    #[error("copying the trained index")]
    Copy(#[source] super::super::Error),
    #[error("adding to shard {shard}")]
    Add { shard: usize, source: super::super::Error },
    #[error("merging {}", .path.display())]
    Merge { path: PathBuf, source: super::super::Error },
    #[error("the merged index holds {merged} vectors, the shards {total}")]
    MergedCount { merged: u64, total: u64 },
    #[error(
        "id {id} is in shard {first} and shard {second}: a refined index (…,RFlat) looks vectors up by id, so ids \
         must be unique (or build without ,RFlat)"
    )]
    DuplicateAcrossShards { id: i64, first: usize, second: usize },
    #[error("{}: the shards do not cover the table's {rows} rows (manifest edited?); delete it and rerun", .dir.display())]
    Uncovered { dir: PathBuf, rows: u64 },

    // Files of the index directory.
    #[error("creating {}", .path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("reading {}", .path.display())]
    ReadDir { path: PathBuf, source: std::io::Error },
    #[error("removing {}", .path.display())]
    Remove { path: PathBuf, source: std::io::Error },
    #[error("writing {}", .path.display())]
    WriteManifest { path: PathBuf, source: std::io::Error },
    /// An index file, the manifest or the refinement files: the retrieval error names the file.
    #[error(transparent)]
    Retrieval(#[from] super::super::Error),
    /// The table's pipeline could not be planned.
    #[error(transparent)]
    Problems(#[from] cnclip_operators::Problems),
    /// The table's pipeline failed (or was interrupted): its error, kept as the source.
    #[error("{0}")]
    Pipeline(#[source] cnclip_operators::Error),
}

impl From<cnclip_operators::Error> for BuildError {
    fn from(error: cnclip_operators::Error) -> Self {
        BuildError::Pipeline(error)
    }
}

pub type Result<T, E = BuildError> = std::result::Result<T, E>;
