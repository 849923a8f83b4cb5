//! Pipeline operators: sources (TSV shards, JSONL, cn_clip LMDB, image folders, Parquet),
//! decoders (base64, images, pickles), transforms (preprocess, tokenize) and sinks (Parquet,
//! cn_clip JSONL, TSV, LMDB), plus `spec`, which builds pipelines of them from TOML.
//!
//! One file per format under `sources/`, `decoders/`, `transforms/` and `sinks/`; a file that
//! implements a pipeline node kind also holds its config (`sources/tsv.rs`: `TsvConfig` →
//! `TsvSource`), whose `///` comments are the kind's `--kinds` docs. Record-level faults never
//! stop a source: they come back as [`quarantine::Rejected`] and the job's
//! [`quarantine::OnError`] policy decides.
//!
//! This crate links no libtorch (a test checks its dependency tree), so the `cnclip` binary,
//! built on it, starts in milliseconds. Encoders, which run CLIP with tch, belong in
//! `cnclip_models` as [`transforms::Transform`] implementations.

pub mod decoders;
pub mod error;
pub mod fingerprint;
pub mod lmdb_file;
pub mod options;
pub mod quarantine;
pub mod signals;
pub mod sinks;
pub mod sources;
pub mod spec;
pub mod storage;
pub mod transforms;

pub use error::{Error, Problems, Result};

pub use storage::write_atomically;
