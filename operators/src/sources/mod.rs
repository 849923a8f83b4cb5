//! Sources: read records from cn_clip's files.

pub mod jsonl;
pub mod lmdb;
pub mod synth;
pub mod tsv;
