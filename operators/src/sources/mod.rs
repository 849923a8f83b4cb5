//! Sources: read records from cn_clip's files.

pub mod jsonl;
pub mod synth;
pub mod tsv;
