//! Sinks: write records in cn_clip's formats.

pub mod lmdb;
