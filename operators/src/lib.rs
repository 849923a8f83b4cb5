//! Pipeline operators: sources (TSV shards, JSONL, cn_clip LMDB, image folders, Parquet),
//! decoders (base64, images), transforms (preprocess, tokenize, batch), encoders (CLIP on CPU or
//! GPUs) and sinks (Parquet, cn_clip JSONL, LMDB).
//!
//! Each component is a serde config with `build()` and the runtime operator it builds, one file
//! per format under `sources/`, `decoders/`, `transforms/`, `encoders/` and `sinks/`. Record-level
//! faults never stop a source: they come back as [`quarantine::Rejected`] and the job's
//! [`quarantine::OnError`] policy decides.

pub mod decoders;
pub mod error;
pub mod quarantine;
pub mod sinks;
pub mod sources;
pub mod spec;
pub mod transforms;

pub use error::{Error, Result};
