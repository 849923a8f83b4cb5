//! The `cnclip` jobs that run a model (through libtorch): one module per subcommand, named
//! after the cn_clip script it replaces, with that script's flag names. The `cnclip-torch`
//! binary carries them out; `cnclip` execs it for these commands.

// Doc comments on clap arguments are `--help` text, where `[job]` and `[CLS]` are literal.
#![allow(rustdoc::broken_intra_doc_links)]

use cnclip_operators::spec::Registry;

pub mod bench_suite;
pub mod benchmark;
pub mod build_index;
pub mod convert;
pub mod demo;
pub mod extract;
pub mod init_model;
pub mod knn;
pub mod model_args;
/// The demo's report (HTML + SVG plots).
pub mod report;
pub mod similarity;
pub mod train;
pub mod zeroshot;

/// Every node kind the model jobs run: the built-in ones, the encoders and `knn`.
pub fn registry() -> Registry {
    let mut registry = Registry::builtin();
    cnclip_models::encoders::register(&mut registry);
    cnclip_models::retrieval::register(&mut registry);
    registry
}
