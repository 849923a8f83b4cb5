//! cnclip's one integration test binary (ripgrep style): each module is one area.
//!
//! Tests that compare against cn_clip run the reference harness in the project venv
//! (`scripts/setup.sh` makes it); they fail, not skip, when it is missing.

mod augment;
mod bad_eval;
mod bad_extract;
mod bad_knn;
mod bad_lmdb;
mod bad_tables;
mod bad_train;
mod bad_zeroshot;
mod bench_suite;
mod build_index;
mod checkpoints;
mod cli;
mod cluster;
mod decode;
mod deploy;
mod evaluation;
mod extract;
mod hostile_pickle;
mod knn;
mod lmdb;
mod manifest;
mod models;
mod object_store;
mod object_store_faults;
mod object_store_folders;
mod object_store_lmdb;
mod object_store_models;
mod pipeline;
mod preprocess;
mod progress;
mod runtime;
mod signals;
mod smoke;
mod sql;
mod tokenizer;
mod train;
mod train_cli;
mod train_ranks;
mod train_shards;
mod webdataset;
mod zeroshot;
