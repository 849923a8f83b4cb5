//! `cnclip make-topk-predictions` (`knn`) and `make-topk-predictions-tr`: cn_clip's
//! `make_topk_predictions.py` (texts → their top-k images) and `make_topk_predictions_tr.py`
//! (images → their top-k texts), with the same flags, as a pipeline: query features (cn_clip
//! JSON lines or our Parquet tables, files or directories of parts) → `knn` over the gallery →
//! cn_clip's prediction lines (`{"text_id": …, "image_ids": […]}`) for `.jsonl`, or a
//! predictions table with scores for `.parquet`. Queries stream in batches; memory is the
//! gallery plus one batch.
//!
//! `--index-path DIR`, a directory made by `cnclip build-index`, searches that index instead:
//! its FAISS ids are the gallery's ids, so the gallery features (`--image-feats`, or
//! `--text-feats` for `-tr`) are not needed and, if given, not read; `--index` and
//! `--train-sample` do not apply, and `--nprobe` (and, for an index refined with exact vectors,
//! `--k-factor`) defaults to the one the build recorded; `--ef-search` sets how deep an HNSW
//! coarse quantizer (`IVF…_HNSW…`) is searched for the lists to probe.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cnclip_models::retrieval::{Backend, KnnConfig};
use cnclip_operators::sinks::jsonl::WriteJsonlConfig;
use cnclip_operators::sinks::parquet::WriteParquetConfig;
use cnclip_operators::sources::features::FeatureJsonlConfig;
use cnclip_operators::sources::parquet::ParquetConfig;
use cnclip_operators::spec::{JobSettings, NodeDef, Planner};

use crate::registry;
use cnclip_operators::storage;

#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize)]
pub struct Args {
    /// Image features: cn_clip JSON lines, or Parquet feature tables (files or directories).
    /// As the gallery, not needed with `--index-path DIR` from build-index.
    #[arg(long)]
    pub image_feats: Option<String>,
    /// Text features, likewise.
    #[arg(long)]
    pub text_feats: Option<String>,
    /// Results per query: images per text, or texts per image for -tr (cn_clip's --top-k).
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Gallery rows per matmul (torch backend), as cn_clip's.
    #[arg(long, default_value_t = 32768)]
    pub eval_batch_size: usize,
    /// `.jsonl` (cn_clip's lines) or `.parquet` (with scores).
    #[arg(long)]
    pub output: PathBuf,
    /// Search engine: a FAISS index on the CPU, or exact matmul + top-k in libtorch as cn_clip (CPU or CUDA).
    #[arg(long, value_enum, default_value_t = Backend::Faiss)]
    pub backend: Backend,
    /// FAISS factory string: Flat (exact), IVF…, HNSW…, …PQ….
    #[arg(long, default_value = "Flat")]
    pub index: String,
    /// Inverted lists an IVF index searches per query (FAISS's nprobe); default FAISS's, or the build's.
    #[arg(long)]
    pub nprobe: Option<usize>,
    /// HNSW search depth: of an `HNSW…` index, or, with `--index-path DIR`, of the coarse
    /// quantizer of an `IVF…_HNSW…` index (FAISS's default: max(16, nprobe)).
    #[arg(long)]
    pub ef_search: Option<usize>,
    /// With a refined index (build-index `…,RFlat`): candidates per result re-scored with the
    /// exact vectors (`k_factor · top_k`); default the one the build recorded.
    #[arg(long)]
    pub k_factor: Option<usize>,
    /// With a build-index directory: memory-map its inverted lists instead of loading them
    /// (FAISS's IO_FLAG_MMAP), for an index larger than memory.
    #[arg(long)]
    pub mmap: bool,
    /// Save the FAISS index here (or load it, if it exists); or a directory made by
    /// `cnclip build-index`, searched as it is.
    #[arg(long)]
    pub index_path: Option<PathBuf>,
    /// Vectors a trained index (IVF, PQ) learns from.
    #[arg(long, default_value_t = 100_000)]
    pub train_sample: usize,
    /// cpu, cuda or cuda:N (torch backend).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl Args {
    /// The options a command line with only the required flags gives (each flag's default).
    pub fn new(output: PathBuf) -> Self {
        Args {
            image_feats: None,
            text_feats: None,
            top_k: 10,
            eval_batch_size: 32768,
            output,
            backend: Backend::Faiss,
            index: "Flat".into(),
            nprobe: None,
            ef_search: None,
            k_factor: None,
            mmap: false,
            index_path: None,
            train_sample: 100_000,
            device: "cpu".into(),
        }
    }
}

/// The checkpoint (name, sha256) a Parquet feature table (a file, or a directory's first part)
/// says it was extracted with; `None` for JSON lines or a table without the metadata.
fn made_with(path: &str) -> Option<(String, String)> {
    let path = Path::new(path);
    let file = if path.is_dir() {
        cnclip_operators::sources::parts::parquet_files(path).ok()?.into_iter().next()?
    } else if path.extension().is_some_and(|e| e == "parquet") && path.is_file() {
        path.to_path_buf()
    } else {
        return None;
    };
    let schema = cnclip_operators::sources::parquet::file_schema(&file).ok()?;
    let meta = schema.metadata();
    let sha = meta.get(cnclip_schemas::metadata::CHECKPOINT_SHA256)?.clone();
    let name = meta.get(cnclip_schemas::metadata::CHECKPOINT).cloned().unwrap_or_default();
    Some((name, sha))
}

/// Texts → images (`false`) or images → texts (`true`, the `-tr` script).
pub fn run(mut args: Args, image_to_text: bool) -> Result<()> {
    cnclip_operators::signals::catch_interrupts()?;
    // A build-index directory in an object store is searched from its copy in the spool.
    if let Some(path) = args.index_path.clone().filter(|p| storage::is_remote(p)) {
        if storage::size(&path).is_ok() {
            bail!(
                "--index-path {}: a saved FAISS index file is kept on a local disk; in an object store, give a \
                 directory made by `cnclip build-index --index-path URL`",
                path.display()
            );
        }
        let local = storage::fetch::local_dir_copy(&path).with_context(|| {
            format!(
                "--index-path {}: no build-index directory there (make one with cnclip build-index)",
                path.display()
            )
        })?;
        args.index_path = Some(local);
    }
    let start = std::time::Instant::now();
    let (queries, query_key, gallery, gallery_key, neighbours_key) = if image_to_text {
        (&args.image_feats, "image_id", &args.text_feats, "text_id", "text_ids")
    } else {
        (&args.text_feats, "text_id", &args.image_feats, "image_id", "image_ids")
    };
    let (query_flag, gallery_flag) =
        if image_to_text { ("--image-feats", "--text-feats") } else { ("--text-feats", "--image-feats") };
    let Some(queries) = queries else { bail!("{query_flag} is required (the queries)") };
    let built_index = args.index_path.as_ref().filter(|p| p.is_dir());
    let gallery = match (gallery, built_index) {
        (Some(_), Some(dir)) => {
            eprintln!(
                "cnclip make-topk-predictions: {} is a build-index directory, whose ids are the gallery's: \
                 {gallery_flag} is not read",
                dir.display()
            );
            Vec::new()
        }
        (None, Some(_)) => Vec::new(),
        (Some(gallery), None) => vec![gallery.clone()],
        (None, None) => {
            bail!("{gallery_flag} is required (the gallery), unless --index-path names a build-index directory")
        }
    };
    if let (Some(ours), Some(theirs)) = (made_with(queries), gallery.first().and_then(|g| made_with(g)))
        && ours.1 != theirs.1
    {
        eprintln!(
            "cnclip make-topk-predictions: warning: the queries ({query_flag}) were extracted with {} (sha256 {}) and \
             the gallery ({gallery_flag}) with {} (sha256 {}): features of two checkpoints are not comparable",
            ours.0, ours.1, theirs.0, theirs.1
        );
    }
    for (flag, input) in [("--text-feats", &args.text_feats), ("--image-feats", &args.image_feats)] {
        if let Some(input) = input
            && storage::staging::within(&args.output, Path::new(input))
        {
            bail!("--output {} would overwrite {flag} {input}: give another output path", args.output.display());
        }
    }
    let jsonl = match args.output.extension().and_then(|e| e.to_str()) {
        Some("parquet") => false,
        Some("jsonl" | "json" | "txt") | None => true,
        Some(other) => bail!("--output {}: use .jsonl or .parquet (not .{other})", args.output.display()),
    };
    let source = if cnclip_operators::sources::features::is_jsonl(Path::new(queries)) {
        NodeDef::new(
            "queries",
            None,
            FeatureJsonlConfig {
                paths: vec![queries.clone()],
                id_key: query_key.into(),
                max_record_bytes: cnclip_operators::sources::MAX_RECORD_BYTES,
            },
        )
    } else {
        let path = if Path::new(queries).is_dir() {
            cnclip_operators::sources::parts::check_complete(Path::new(queries)).map_err(crate::quoted(query_flag))?;
            format!("{queries}/*.parquet")
        } else {
            queries.clone()
        };
        NodeDef::new("queries", None, ParquetConfig::new(vec![path], None, false))
    };
    let knn = KnnConfig {
        gallery,
        gallery_id: gallery_key.into(),
        top_k: args.top_k,
        backend: args.backend,
        index: args.index.clone(),
        nprobe: args.nprobe,
        ef_search: args.ef_search,
        k_factor: args.k_factor,
        mmap: args.mmap,
        index_path: args.index_path.clone(),
        train_sample: args.train_sample,
        device: args.device.clone(),
        eval_batch_size: args.eval_batch_size,
        query_batch: 1024,
        scores: !jsonl,
    };
    let sink = if jsonl {
        let rename = [("query_id", query_key), ("neighbour_ids", neighbours_key)]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        NodeDef::new("output", Some("neighbours"), WriteJsonlConfig { path: args.output.clone(), rename })
    } else {
        NodeDef::new("output", Some("neighbours"), WriteParquetConfig { path: args.output.clone() })
    };
    let settings = JobSettings { quarantine: args.output.with_extension("quarantine.jsonl"), ..JobSettings::default() };
    let registry = registry();
    let pipeline =
        Planner::new(&registry).plan(settings, vec![source, NodeDef::new("neighbours", Some("queries"), knn), sink])?;
    let report = pipeline.run()?;
    let rows = report.written.first().map_or(0, |(_, w)| w.rows);
    let quarantined = match &report.quarantine_file {
        Some(path) if report.quarantined > 0 => {
            format!("; {} quarantined → {}", report.quarantined, path.display())
        }
        _ => String::new(),
    };
    eprintln!(
        "cnclip make-topk-predictions: top-{} of {rows} queries → {}{quarantined} ({:.1} s)",
        args.top_k,
        args.output.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
