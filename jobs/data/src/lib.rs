//! The `cnclip` jobs that run no model: one module per subcommand, named after the cn_clip
//! script it replaces, with that script's flag names.
//!
//! Nothing in this crate's dependency graph links libtorch, so the `cnclip` binary built on it
//! starts in milliseconds and runs where torch is not installed. The model jobs
//! (`cnclip-model-jobs`) build on these: `demo` runs `synth` and `build-lmdb`, training prepares
//! its data with `build-lmdb` and `export`, `bench-suite` scores with `evaluation`.

// Doc comments on clap arguments are `--help` text, where `[job]` and `[CLS]` are literal.
#![allow(rustdoc::broken_intra_doc_links)]

pub mod build_lmdb;
pub mod cluster;
pub mod command_line;
pub mod evaluation;
pub mod evaluation_engine;
pub mod import;
pub mod manifest;
pub mod process;
pub mod run;
pub mod sql;
pub mod stores;
pub mod synth;
pub mod tokenize;
