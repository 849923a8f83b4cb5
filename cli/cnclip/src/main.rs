//! `cnclip`: Chinese-CLIP's scripts as one fast, streaming command.
//!
//! Each subcommand is a job of `cnclip-data-jobs` or `cnclip-model-jobs`, named after the
//! cn_clip script it replaces, with the same flag names. This binary holds every command that needs no model — data
//! preparation, pipelines, tokenizing — and links no libtorch, so those start in milliseconds
//! and run where torch is not installed. Commands that run a model (`similarity`, `convert`,
//! `benchmark`, …) are carried out by its sibling `cnclip-torch`, which it `exec`s with the same
//! arguments; users only ever type `cnclip`.

// Doc comments on clap arguments are `--help` text, where `[job]` and `[CLS]` are literal.
#![allow(rustdoc::broken_intra_doc_links)]

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use cnclip_operators::spec::Registry;

use cnclip_data_jobs::{build_lmdb, cluster, evaluation, import, manifest, process, run, sql, synth, tokenize};

/// mimalloc instead of glibc's malloc: the pipelines allocate and free many ~100 KB–5 MB
/// buffers across threads, which glibc's per-thread arenas and dynamic mmap threshold keep as
/// fragmented heap, so peak memory crept up with the length of a job.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cnclip", version, about = "Chinese-CLIP feature extraction, retrieval and fine-tuning, streaming")]
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
    /// Recall@1/5/10 of text → image predictions, as cn_clip's evaluation.py (same JSON).
    #[command(alias = "eval")]
    Evaluation(evaluation::Args),
    /// Recall of image → text predictions, as cn_clip's evaluation_tr.py.
    #[command(name = "evaluation-tr")]
    EvaluationTr(evaluation::Args),
    /// Turn a text → image annotation file into image → text (transform_ir_annotation_to_tr.py).
    #[command(name = "transform-ir-annotation-to-tr")]
    TransformIrAnnotationToTr(evaluation::TransformArgs),
    /// SQL (DataFusion) over Parquet tables, with dot() and cosine_similarity() on feature columns.
    Sql(sql::Args),
    /// Write a deterministic synthetic Chinese image–caption corpus in cn_clip's layout.
    Synth(synth::Args),
    /// Image–text similarity with a checkpoint: cn_clip's README quick start as a command.
    #[command(disable_help_flag = true)]
    Similarity(ModelCommand),
    /// Convert checkpoints between cn_clip's .pt and cnclip's self-describing .safetensors.
    #[command(disable_help_flag = true)]
    Convert(ModelCommand),
    /// Extract image and/or text features with a checkpoint (cn_clip's extract_features.py), resumable.
    #[command(name = "extract-features", alias = "extract", disable_help_flag = true)]
    ExtractFeatures(ModelCommand),
    /// Top-k images per text from feature files (cn_clip's make_topk_predictions.py).
    #[command(name = "make-topk-predictions", alias = "knn", disable_help_flag = true)]
    MakeTopkPredictions(ModelCommand),
    /// Top-k texts per image (cn_clip's make_topk_predictions_tr.py).
    #[command(name = "make-topk-predictions-tr", disable_help_flag = true)]
    MakeTopkPredictionsTr(ModelCommand),
    /// Zero-shot classification of an image folder (cn_clip's zeroshot_evaluation.py).
    #[command(name = "zeroshot-evaluation", alias = "zeroshot", disable_help_flag = true)]
    ZeroshotEvaluation(ModelCommand),
    /// Scheduled benchmark evaluation from a suite file (checkpoint × dataset × task).
    #[command(name = "bench-suite", disable_help_flag = true)]
    BenchSuite(ModelCommand),
    /// A randomly initialised model as a cnclip checkpoint (for trying the job chain offline).
    #[command(name = "init-model", disable_help_flag = true)]
    InitModel(ModelCommand),
    /// Contrastive fine-tuning (cn_clip's training/main.py), on one or several replicas, resumable.
    #[command(disable_help_flag = true)]
    Train(ModelCommand),
    /// The whole of cnclip on the synthetic corpus: train from scratch, extract, retrieve, score, report.
    #[command(disable_help_flag = true)]
    Demo(ModelCommand),
    /// Measure encode or preprocess throughput (`benchmark encode|preprocess`).
    #[command(disable_help_flag = true)]
    Benchmark(ModelCommand),
    /// A FAISS index (IVF…,PQ…) from a feature table, built in shards and merged, saved to disk.
    #[command(name = "build-index", disable_help_flag = true)]
    BuildIndex(ModelCommand),
    /// Check a sharded output directory (`manifest check DIR`): every shard once, consistent, complete.
    #[command(subcommand)]
    Manifest(manifest::Command),
    /// A Ballista cluster for the SQL jobs: `cluster scheduler` and `cluster executor`.
    #[command(subcommand)]
    Cluster(cluster::Command),
}

/// The arguments of a model command, handed to `cnclip-torch` untouched (`--help` included).
#[derive(clap::Args)]
struct ModelCommand {
    /// The command's arguments, handed to cnclip-torch (its --help lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<OsString>,
}

/// `cnclip-torch`, installed beside this binary.
fn torch_binary() -> Result<std::path::PathBuf> {
    Ok(std::env::current_exe().context("locating the cnclip binary")?.with_file_name("cnclip-torch"))
}

/// Replaces this process with `cnclip-torch SUBCOMMAND ARGS…`, handing on the progress and
/// storage flags given before the subcommand (those after it are among `args`) in `environment`.
fn exec_torch(
    subcommand: &str,
    args: impl IntoIterator<Item = OsString>,
    environment: &[(&'static str, String)],
) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = torch_binary()?;
    if !exe.is_file() {
        bail!(
            "`cnclip {subcommand}` runs a model and needs {}, which is missing (install cnclip-torch beside cnclip)",
            exe.display()
        );
    }
    let error = std::process::Command::new(&exe)
        .arg0("cnclip")
        .arg(subcommand)
        .args(args)
        .envs(environment.iter().cloned())
        .exec();
    Err(error).with_context(|| format!("starting {}", exe.display()))
}

/// Whether the pipeline file names a node kind that `registry` lacks (then another binary
/// may know it). A file that cannot be read or parsed says no: [`run`] reports it.
fn needs_other_kinds(pipeline: &std::path::Path, registry: &Registry) -> bool {
    let Ok(text) = cnclip_operators::sources::read_text(pipeline, cnclip_operators::sources::MAX_TEXT_BYTES) else {
        return false;
    };
    let Ok(table) = text.parse::<toml::Table>() else { return false };
    let Some(toml::Value::Table(nodes)) = table.get("nodes") else { return false };
    nodes.values().any(|node| match node.get("kind") {
        Some(toml::Value::String(kind)) => registry.get(kind).is_none(),
        _ => false,
    })
}

fn main() -> ExitCode {
    process::init_logging();
    let cli = Cli::parse();
    cli.progress.configure();
    cli.storage.configure();
    let environment: Vec<_> = cli.progress.environment().into_iter().chain(cli.storage.environment()).collect();
    let progress = environment.as_slice();
    let result = match cli.command {
        Command::Tokenize(args) => tokenize::run(args),
        Command::BuildLmdb(args) => build_lmdb::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Sql(args) => sql::run(args),
        Command::Evaluation(args) => evaluation::run(args, false),
        Command::EvaluationTr(args) => evaluation::run(args, true),
        Command::TransformIrAnnotationToTr(args) => evaluation::transform(args),
        Command::Import(args) => import::import(args),
        Command::Export(args) => import::export(args),
        Command::Run(args) => {
            let registry = Registry::builtin();
            // A kind only the model binary knows (an encoder): it runs the whole pipeline.
            if args.pipeline.as_deref().is_some_and(|p| needs_other_kinds(p, &registry))
                && torch_binary().is_ok_and(|exe| exe.is_file())
            {
                exec_torch("run", std::env::args_os().skip(1).skip_while(|arg| arg != "run").skip(1), progress)
            } else {
                run::run(args, &registry)
            }
        }
        Command::Similarity(command) => exec_torch("similarity", command.args, progress),
        Command::Convert(command) => exec_torch("convert", command.args, progress),
        Command::Benchmark(command) => exec_torch("benchmark", command.args, progress),
        Command::ExtractFeatures(command) => exec_torch("extract-features", command.args, progress),
        Command::BenchSuite(command) => exec_torch("bench-suite", command.args, progress),
        Command::InitModel(command) => exec_torch("init-model", command.args, progress),
        Command::Train(command) => exec_torch("train", command.args, progress),
        Command::Demo(command) => exec_torch("demo", command.args, progress),
        Command::ZeroshotEvaluation(command) => exec_torch("zeroshot-evaluation", command.args, progress),
        Command::MakeTopkPredictions(command) => exec_torch("make-topk-predictions", command.args, progress),
        Command::MakeTopkPredictionsTr(command) => exec_torch("make-topk-predictions-tr", command.args, progress),
        Command::BuildIndex(command) => exec_torch("build-index", command.args, progress),
        Command::Manifest(command) => manifest::run(command),
        Command::Cluster(command) => cluster::run(command),
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
