//! Sinks: write records in cn_clip's formats and as Parquet tables.

pub mod lmdb;
pub mod parquet;
