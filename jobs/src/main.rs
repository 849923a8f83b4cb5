//! `cnclip`: Chinese-CLIP's scripts as one fast, streaming binary.
//!
//! Each subcommand lives in its own module and is named after the cn_clip script it replaces,
//! with the same flag names. `main` owns exit codes: 0 on success (a closed stdout pipe, as in
//! `cnclip tokenize … | head`, counts as success), 1 with the error chain on stderr otherwise.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the pipelines allocate and free many ~100 KB–5 MB
/// buffers across threads, which glibc's per-thread arenas and dynamic mmap threshold keep as
/// fragmented heap, so peak memory crept up with the length of a job.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod benchmark;
mod build_lmdb;
mod convert;
mod import;
mod model_args;
mod run;
mod similarity;
mod synth;
mod tokenize;

#[derive(Parser)]
#[command(name = "cnclip", version, about = "Chinese-CLIP feature extraction, retrieval and fine-tuning, streaming")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize texts exactly as cn_clip.clip.tokenize: one text per stdin line, one JSON id array per line.
    Tokenize(tokenize::Args),
    /// Serialize TSV images and JSONL texts into cn_clip's LMDB layout (build_lmdb_dataset.py).
    BuildLmdb(build_lmdb::Args),
    /// Run a pipeline described in a TOML file (sources → decoders → preprocess → sinks).
    Run(run::Args),
    /// Import cn_clip TSV/JSONL or LMDB splits into Parquet tables (images, texts, pairs).
    Import(import::ImportArgs),
    /// Export Parquet tables to cn_clip's TSV/JSONL or LMDB layout.
    Export(import::ExportArgs),
    /// Write a deterministic synthetic Chinese image–caption corpus in cn_clip's layout.
    Synth(synth::Args),
    /// Image–text similarity with a checkpoint: cn_clip's README quick start as a command.
    Similarity(similarity::Args),
    /// Convert checkpoints between cn_clip's .pt and cnclip's self-describing .safetensors.
    Convert(convert::Args),
    /// Measure encode throughput (model only, random weights), e.g. against scripts/bench/encode.py.
    #[command(subcommand)]
    Benchmark(BenchmarkCommand),
}

#[derive(Subcommand)]
enum BenchmarkCommand {
    /// Image and text encode throughput of one model on one device.
    Encode(benchmark::Args),
    /// Decode + preprocess throughput on one thread (base64, image decode, resize, normalise).
    Preprocess(benchmark::PreprocessArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Tokenize(args) => tokenize::run(args),
        Command::Benchmark(BenchmarkCommand::Encode(args)) => benchmark::run(args),
        Command::Benchmark(BenchmarkCommand::Preprocess(args)) => benchmark::run_preprocess(args),
        Command::Convert(args) => convert::run(args),
        Command::BuildLmdb(args) => build_lmdb::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Import(args) => import::import(args),
        Command::Export(args) => import::export(args),
        Command::Run(args) => run::run(args),
        Command::Similarity(args) => similarity::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cnclip: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
