//! `cnclip-torch`: the `cnclip` commands that run a model, linked with libtorch. Users type
//! `cnclip COMMAND …`; `cnclip` execs this binary for these commands, so the model-free ones
//! never pay libtorch's start-up (~0.2 s) or its ~120 MB of mapped code.

// Doc comments on clap arguments are `--help` text, where `[job]` and `[CLS]` are literal.
#![allow(rustdoc::broken_intra_doc_links)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cnclip_data_jobs::{process, run};
use cnclip_model_jobs::{
    bench_suite, benchmark, build_index, convert, demo, extract, init_model, knn, registry, similarity, train, zeroshot,
};

/// mimalloc instead of glibc's malloc: the pipelines allocate and free many ~100 KB–5 MB
/// buffers across threads, which glibc's per-thread arenas and dynamic mmap threshold keep as
/// fragmented heap, so peak memory crept up with the length of a job.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cnclip", version, about = "Chinese-CLIP model commands (run as `cnclip COMMAND`)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    progress: process::ProgressArgs,
    #[command(flatten)]
    storage: process::StorageArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Image–text similarity with a checkpoint: cn_clip's README quick start as a command.
    Similarity(similarity::Args),
    /// Convert checkpoints between cn_clip's .pt and cnclip's self-describing .safetensors.
    Convert(convert::Args),
    /// Extract image and/or text features (cn_clip's extract_features.py), resumable.
    #[command(name = "extract-features", alias = "extract")]
    ExtractFeatures(extract::Args),
    /// Top-k images for each text (cn_clip's make_topk_predictions.py).
    #[command(name = "make-topk-predictions", alias = "knn")]
    MakeTopkPredictions(knn::Args),
    /// Top-k texts for each image (cn_clip's make_topk_predictions_tr.py).
    #[command(name = "make-topk-predictions-tr")]
    MakeTopkPredictionsTr(knn::Args),
    /// Zero-shot classification of an image folder (cn_clip's zeroshot_evaluation.py).
    #[command(name = "zeroshot-evaluation", alias = "zeroshot")]
    ZeroshotEvaluation(zeroshot::Args),
    /// Scheduled benchmark evaluation: checkpoint × dataset × task runs, results as JSON and Parquet.
    #[command(name = "bench-suite")]
    BenchSuite(bench_suite::Args),
    /// A randomly initialised model as a cnclip checkpoint (for trying the job chain offline).
    #[command(name = "init-model")]
    InitModel(init_model::Args),
    /// Run a pipeline; `cnclip run` hands over pipelines that use a kind only this binary has.
    Run(run::Args),
    /// Contrastive fine-tuning (cn_clip's training/main.py), on one or several replicas, resumable.
    Train(Box<train::Args>),
    /// The whole of cnclip on the synthetic corpus: train from scratch, extract, retrieve, score, report.
    Demo(demo::Args),
    /// Measure encode throughput (model only, random weights), e.g. against scripts/bench/encode.py.
    #[command(subcommand)]
    Benchmark(BenchmarkCommand),
    /// A FAISS index (IVF…,PQ…) from a feature table, built in shards and merged, saved to disk.
    #[command(name = "build-index")]
    BuildIndex(build_index::Args),
}

#[derive(Subcommand)]
enum BenchmarkCommand {
    /// Image and text encode throughput of one model on one device.
    Encode(benchmark::Args),
    /// Decode + preprocess throughput on one thread (base64, image decode, resize, normalise).
    Preprocess(benchmark::PreprocessArgs),
}

/// Training keeps the decode pipeline and libtorch's OpenMP threads busy at once on the same
/// cores; OpenMP's default (active) waiting spins between parallel regions and takes the cores
/// from the pipeline (measured on 2 cores: 4.2 steps/s, 7.8 with passive waiting). libgomp reads
/// `OMP_WAIT_POLICY` when it is loaded, so `train` and `demo` re-execute themselves once with
/// `OMP_WAIT_POLICY=PASSIVE` unless the variable is already set (a user's choice wins).
fn wait_passively_in_training() {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next();
    let args: Vec<_> = args.collect();
    let training = args.first().is_some_and(|a| a == "train" || a == "demo");
    if !training || std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = arg0 {
        command.arg0(arg0);
    }
    // Only returns if the exec failed: then run here, with active waiting.
    let _ = command.args(args).env("OMP_WAIT_POLICY", "PASSIVE").exec();
}

fn main() -> ExitCode {
    wait_passively_in_training();
    process::init_logging();
    let cli = Cli::parse();
    cli.progress.configure();
    cli.storage.configure();
    let result = match cli.command {
        Command::Similarity(args) => similarity::run(args),
        Command::Convert(args) => convert::run(args),
        Command::ExtractFeatures(args) => extract::run(args),
        Command::MakeTopkPredictions(args) => knn::run(args, false),
        Command::ZeroshotEvaluation(args) => zeroshot::run(args),
        Command::BenchSuite(args) => bench_suite::run(args),
        Command::InitModel(args) => init_model::run(args),
        Command::Train(args) => train::run(args),
        Command::Demo(args) => demo::run(args),
        Command::MakeTopkPredictionsTr(args) => knn::run(args, true),
        Command::BuildIndex(args) => build_index::run(args),
        // The built-in kinds and the model kinds (the encoders).
        Command::Run(args) => run::run(args, &registry()),
        Command::Benchmark(BenchmarkCommand::Encode(args)) => benchmark::run(args),
        Command::Benchmark(BenchmarkCommand::Preprocess(args)) => benchmark::run_preprocess(args),
    };
    process::exit_code(result)
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_argument_has_help() {
        let missing = cnclip_data_jobs::process::arguments_without_help(&Cli::command());
        assert!(missing.is_empty(), "{} arguments have no --help text:\n{}", missing.len(), missing.join("\n"));
    }
}
