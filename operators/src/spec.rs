//! Pipelines described in TOML, validated as a whole, and run on the `pipeline` runtime.
//!
//! ```toml
//! [job]                              # every key optional
//! on_error = "skip"                  # or "fail"
//! quarantine = "out/quarantine.jsonl"
//! shard = "0/1"                      # this job's share of every source: record k if k mod n = i
//! batch_rows = 256
//! threads = 0                        # worker threads for decoding; 0 = one per core
//!
//! [nodes.images]                     # a node named `images`
//! kind = "tsv"
//! paths = ["data/train_imgs.tsv", "data/more/*_imgs.tsv"]
//!
//! [nodes.decoded]
//! kind = "decode_base64"
//! input = "images"
//!
//! [nodes.pixels]
//! kind = "preprocess"
//! input = "decoded"
//! resolution = 224
//!
//! [nodes.out]
//! kind = "write_parquet"
//! input = "pixels"
//! path = "out/train_pixels.parquet"
//! ```
//!
//! Kinds — sources: `tsv`, `jsonl`, `lmdb` (`database = "imgs" | "pairs"`), `image_folder`,
//! `parquet`; transforms: `decode_base64`, `preprocess` (`resolution`, `order`), `tokenize`
//! (`context_length`, `preprocess`); sinks: `write_parquet`, `write_jsonl`
//! (`rename = { id = "image_id" }`), `write_tsv`, `write_lmdb` (`database`). Relative paths are
//! relative to the pipeline file. [`Pipeline::parse`] reports every problem it finds at once:
//! unknown kinds and keys, missing or unknown inputs, cycles, unused outputs, files that do not
//! exist, globs that match nothing, and columns a node needs that its input lacks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use cnclip_pipeline::bridge::{consume_on_thread, map_on_pool, produce_on_thread};
use cnclip_pipeline::{BoxError, Capacity, Graph, NodeContext, NodeSummary, Progress, WorkerPool};
use serde::Deserialize;

use crate::error::Error;
use crate::quarantine::{OnError, Quarantine};
use crate::sinks::jsonl::JsonlSink;
use crate::sinks::lmdb::LmdbSink;
use crate::sinks::parquet::ParquetSink;
use crate::sinks::tsv::TsvSink;
use crate::sinks::{Sink, Staged, Written};
use crate::sources::folder::ImageFolderSource;
use crate::sources::jsonl::JsonlSource;
use crate::sources::lmdb::{Database, LmdbSource};
use crate::sources::parquet::ParquetSource;
use crate::sources::tsv::TsvSource;
use crate::sources::{ReadContext, Shard, Source, expand_paths};
use crate::transforms::Transform;
use crate::transforms::base64::DecodeBase64;
use crate::transforms::preprocess::{Order, Preprocess};
use crate::transforms::tokenize::Tokenize;

/// Job-wide settings (`[job]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSettings {
    pub on_error: OnError,
    pub quarantine: PathBuf,
    pub shard: String,
    pub batch_rows: usize,
    pub threads: usize,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            on_error: OnError::Skip,
            quarantine: "quarantine.jsonl".into(),
            shard: "0/1".into(),
            batch_rows: 256,
            threads: 0,
        }
    }
}

impl<'de> Deserialize<'de> for OnError {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "fail" => Ok(OnError::Fail),
            "skip" => Ok(OnError::Skip),
            other => Err(serde::de::Error::custom(format!("on_error is `{other}`, expected `fail` or `skip`"))),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilesConfig {
    paths: Vec<String>,
    #[serde(default = "yes")]
    dedupe: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LmdbConfig {
    path: PathBuf,
    database: Database,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FolderConfig {
    path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParquetConfig {
    paths: Vec<String>,
    /// A contract (`images`, `texts`, `pairs`, …) the files must match.
    table: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreprocessConfig {
    #[serde(default = "default_resolution")]
    resolution: usize,
    #[serde(default = "default_max_pixels")]
    max_pixels: u64,
    #[serde(default)]
    order: Order,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeConfig {
    #[serde(default = "default_context_length")]
    context_length: usize,
    #[serde(default)]
    preprocess: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathConfig {
    path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonlSinkConfig {
    path: PathBuf,
    #[serde(default)]
    rename: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LmdbSinkConfig {
    path: PathBuf,
    database: Database,
}

fn yes() -> bool {
    true
}
fn default_resolution() -> usize {
    224
}
fn default_context_length() -> usize {
    crate::transforms::tokenizer::DEFAULT_CONTEXT_LENGTH
}
fn default_max_pixels() -> u64 {
    crate::decoders::image::DEFAULT_MAX_PIXELS
}

/// The kinds a node may have.
pub const SOURCE_KINDS: [&str; 5] = ["tsv", "jsonl", "lmdb", "image_folder", "parquet"];
pub const TRANSFORM_KINDS: [&str; 3] = ["decode_base64", "preprocess", "tokenize"];
pub const SINK_KINDS: [&str; 4] = ["write_parquet", "write_jsonl", "write_tsv", "write_lmdb"];

/// A validated node, ready to build.
enum Op {
    Source(Box<dyn Source>),
    Transform(Arc<dyn Transform>),
    Sink(SinkConfig),
}

enum SinkConfig {
    Parquet(PathBuf),
    Jsonl(PathBuf, BTreeMap<String, String>),
    Tsv(PathBuf),
    Lmdb(PathBuf, Database),
}

impl SinkConfig {
    fn path(&self) -> &Path {
        match self {
            SinkConfig::Parquet(p) | SinkConfig::Jsonl(p, _) | SinkConfig::Tsv(p) | SinkConfig::Lmdb(p, _) => p,
        }
    }

    fn accepts(&self, schema: &SchemaRef) -> Result<(), Vec<String>> {
        match self {
            SinkConfig::Parquet(_) => Ok(()),
            SinkConfig::Jsonl(_, rename) => JsonlSink::accepts(schema, rename),
            SinkConfig::Tsv(_) => TsvSink::accepts(schema).map_err(|e| vec![e]),
            SinkConfig::Lmdb(_, database) => LmdbSink::accepts(schema, *database).map_err(|e| vec![e]),
        }
    }

    fn open(&self, schema: &SchemaRef) -> crate::Result<Box<dyn Sink>> {
        Ok(match self {
            SinkConfig::Parquet(path) => {
                let table = path.file_stem().unwrap_or_default().to_string_lossy();
                Box::new(ParquetSink::create(path, &table, schema.clone())?)
            }
            SinkConfig::Jsonl(path, rename) => Box::new(JsonlSink::create(path, schema, rename)?),
            SinkConfig::Tsv(path) => Box::new(TsvSink::create(path)?),
            SinkConfig::Lmdb(path, database) => Box::new(LmdbSink::create(path, *database, Default::default())?),
        })
    }
}

struct PlannedNode {
    name: String,
    input: Option<String>,
    op: Op,
}

/// A validated pipeline.
pub struct Pipeline {
    pub settings: JobSettings,
    pub shard: Shard,
    nodes: Vec<PlannedNode>,
    /// Each node's output schema (sinks: their input's).
    schemas: BTreeMap<String, SchemaRef>,
    /// Where each node's rows come from, for quarantine records.
    origins: BTreeMap<String, String>,
}

/// A node as a caller builds it in code (the TOML form, parsed).
pub struct NodeDef {
    pub name: String,
    pub kind: String,
    pub input: Option<String>,
    pub config: toml::Table,
}

impl NodeDef {
    pub fn new(name: &str, kind: &str, input: Option<&str>, config: toml::Table) -> Self {
        NodeDef { name: name.into(), kind: kind.into(), input: input.map(Into::into), config }
    }
}

/// `path` relative to `base` (the pipeline file's directory), with `.` and `..` folded
/// lexically so messages show `demo/x.tsv`, not `examples/pipelines/../../demo/x.tsv`.
fn resolve(base: &Path, path: &Path) -> PathBuf {
    use std::path::Component;
    let joined = if path.is_absolute() { path.to_path_buf() } else { base.join(path) };
    let mut out = PathBuf::new();
    for part in joined.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
}

fn resolve_patterns(base: &Path, patterns: &[String]) -> Vec<String> {
    patterns.iter().map(|p| resolve(base, Path::new(p)).to_string_lossy().into_owned()).collect()
}

impl Pipeline {
    /// Parses and validates a pipeline file; relative paths are taken from `base`.
    ///
    /// # Errors
    /// Every problem found, one line each.
    pub fn parse(text: &str, base: &Path) -> Result<Self, Vec<String>> {
        let table: toml::Table =
            text.parse().map_err(|e: toml::de::Error| vec![e.to_string().trim_end().to_string()])?;
        let mut problems = Vec::new();
        let mut settings = JobSettings::default();
        let mut defs = Vec::new();
        for (key, value) in table {
            match (key.as_str(), value) {
                ("job", toml::Value::Table(job)) => {
                    // Key by key, so one bad key does not hide the others' problems.
                    const KEYS: [&str; 5] = ["on_error", "quarantine", "shard", "batch_rows", "threads"];
                    let mut good = toml::Table::new();
                    for (key, value) in job {
                        if !KEYS.contains(&key.as_str()) {
                            problems.push(format!("[job]: unknown key `{key}` (expected one of {})", KEYS.join(", ")));
                            continue;
                        }
                        let one: toml::Table = [(key.clone(), value.clone())].into_iter().collect();
                        match toml::Value::Table(one).try_into::<JobSettings>() {
                            Ok(_) => {
                                good.insert(key, value);
                            }
                            Err(e) => {
                                problems.push(format!("[job]: {key}: {}", e.to_string().trim_end().replace('\n', " ")))
                            }
                        }
                    }
                    settings = toml::Value::Table(good).try_into().expect("every key checked");
                }
                ("job", _) => problems.push("`job` must be a table ([job])".into()),
                ("nodes", toml::Value::Table(nodes)) => {
                    for (name, node) in nodes {
                        let toml::Value::Table(mut config) = node else {
                            problems.push(format!("node `{name}`: expected a table ([nodes.{name}])"));
                            continue;
                        };
                        let kind = match config.remove("kind") {
                            Some(toml::Value::String(kind)) => kind,
                            Some(other) => {
                                problems.push(format!("node `{name}`: kind must be a string, not {other}"));
                                continue;
                            }
                            None => {
                                problems.push(format!("node `{name}`: missing `kind`"));
                                continue;
                            }
                        };
                        let input = match config.remove("input") {
                            None => None,
                            Some(toml::Value::String(input)) => Some(input),
                            Some(other) => {
                                problems.push(format!("node `{name}`: input must be a node name, not {other}"));
                                continue;
                            }
                        };
                        defs.push(NodeDef { name, kind, input, config });
                    }
                }
                ("nodes", _) => problems.push("`nodes` must be a table of [nodes.NAME] tables".into()),
                (other, _) => {
                    problems.push(format!("unknown top-level key `{other}` (expected [job] and [nodes.NAME])"))
                }
            }
        }
        if defs.is_empty() && problems.is_empty() {
            problems.push("no nodes: define at least a source and a sink as [nodes.NAME] tables".into());
        }
        match Self::plan(settings, defs, base) {
            Ok(pipeline) if problems.is_empty() => Ok(pipeline),
            Ok(_) => Err(problems),
            Err(more) => {
                problems.extend(more);
                Err(problems)
            }
        }
    }

    /// Validates nodes built in code (as `cnclip import`/`export` do).
    ///
    /// # Errors
    /// Every problem found, one line each.
    pub fn plan(settings: JobSettings, defs: Vec<NodeDef>, base: &Path) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let shard = settings.shard.parse::<Shard>().map_err(|e| vec![format!("[job]: {e}")]).unwrap_or_else(|e| {
            problems.extend(e);
            Shard::ALL
        });
        if settings.batch_rows == 0 {
            problems.push("[job]: batch_rows must be at least 1".into());
        }
        let mut nodes = Vec::new();
        let names: BTreeSet<&str> = defs.iter().map(|d| d.name.as_str()).collect();
        for def in &defs {
            let name = &def.name;
            let mut problem = |p: String| problems.push(format!("node `{name}`: {p}"));
            let is_source = SOURCE_KINDS.contains(&def.kind.as_str());
            let known =
                is_source || TRANSFORM_KINDS.contains(&def.kind.as_str()) || SINK_KINDS.contains(&def.kind.as_str());
            if !known {
                problem(format!(
                    "unknown kind `{}` (sources: {}; transforms: {}; sinks: {})",
                    def.kind,
                    SOURCE_KINDS.join(", "),
                    TRANSFORM_KINDS.join(", "),
                    SINK_KINDS.join(", ")
                ));
                continue;
            }
            match (&def.input, is_source) {
                (Some(_), true) => problem(format!("a `{}` source takes no input", def.kind)),
                (None, false) => problem(format!("missing `input` (the node whose output `{}` reads)", def.kind)),
                (Some(input), false) if input == name => problem("reads from itself".into()),
                (Some(input), false) if !names.contains(input.as_str()) => {
                    problem(format!("reads from unknown node `{input}`"))
                }
                _ => {}
            }
            match build_op(&def.kind, &def.config, base) {
                Ok(op) => nodes.push(PlannedNode { name: name.clone(), input: def.input.clone(), op }),
                Err(errors) => errors.into_iter().for_each(&mut problem),
            }
        }
        // Who reads whom: sinks must not be read, everything else must be.
        for def in &defs {
            let readers = defs.iter().filter(|d| d.input.as_deref() == Some(def.name.as_str())).count();
            let is_sink = SINK_KINDS.contains(&def.kind.as_str());
            let produces = SOURCE_KINDS.contains(&def.kind.as_str()) || TRANSFORM_KINDS.contains(&def.kind.as_str());
            if is_sink && readers > 0 {
                problems.push(format!("node `{}` is a sink: nothing can read from it", def.name));
            } else if produces && readers == 0 {
                problems.push(format!(
                    "node `{}`: nothing reads its output (add a sink with input = \"{}\")",
                    def.name, def.name
                ));
            }
        }
        let mut seen_outputs = BTreeMap::new();
        for node in &nodes {
            if let Op::Sink(sink) = &node.op
                && let Some(other) = seen_outputs.insert(sink.path().to_path_buf(), node.name.clone())
            {
                problems.push(format!("nodes `{other}` and `{}` both write {}", node.name, sink.path().display()));
            }
        }
        // Schemas, in dependency order; a cycle leaves nodes unresolved.
        let mut schemas: BTreeMap<String, SchemaRef> = BTreeMap::new();
        let mut origins: BTreeMap<String, String> = BTreeMap::new();
        // Nodes that failed to build count as failed inputs (their readers are not checked again).
        let mut failed: BTreeSet<String> =
            defs.iter().filter(|d| !nodes.iter().any(|n| n.name == d.name)).map(|d| d.name.clone()).collect();
        loop {
            let mut progressed = false;
            for node in &nodes {
                if schemas.contains_key(&node.name) || failed.contains(&node.name) {
                    continue;
                }
                let (input_schema, origin) = match (&node.input, &node.op) {
                    (None, Op::Source(source)) => (None, source.origin()),
                    (None, _) => (None, node.name.clone()),
                    (Some(input), _) if failed.contains(input) || !names.contains(input.as_str()) => {
                        failed.insert(node.name.clone());
                        progressed = true;
                        continue;
                    }
                    (Some(input), _) => match schemas.get(input) {
                        Some(schema) => (Some(schema.clone()), origins[input].clone()),
                        None => continue, // not resolved yet
                    },
                };
                let result = match (&node.op, input_schema) {
                    (Op::Source(source), _) => Ok(source.schema()),
                    (Op::Transform(t), Some(schema)) => t.output_schema(&schema).map_err(|e| vec![e]),
                    (Op::Sink(sink), Some(schema)) => sink.accepts(&schema).map(|()| schema),
                    (_, None) => Err(vec![]),
                };
                progressed = true;
                match result {
                    Ok(schema) => {
                        schemas.insert(node.name.clone(), schema);
                        origins.insert(node.name.clone(), origin);
                    }
                    Err(errors) => {
                        let input = node.input.as_deref().unwrap_or("?");
                        for e in errors {
                            problems.push(format!("node `{}` (reading `{input}`): {e}", node.name));
                        }
                        failed.insert(node.name.clone());
                    }
                }
            }
            if !progressed {
                break;
            }
        }
        let cyclic: Vec<&str> = nodes
            .iter()
            .filter(|n| !schemas.contains_key(&n.name) && !failed.contains(&n.name))
            .map(|n| n.name.as_str())
            .collect();
        if !cyclic.is_empty() {
            problems.push(format!("the graph has a cycle through {}", cyclic.join(", ")));
        }
        if problems.is_empty() {
            let settings = JobSettings { quarantine: resolve(base, &settings.quarantine), ..settings };
            Ok(Pipeline { settings, shard, nodes, schemas, origins })
        } else {
            Err(problems)
        }
    }

    /// Runs the pipeline to completion on a fresh runtime.
    ///
    /// # Errors
    /// The first node error (naming the node and the record), or a structural fault.
    pub fn run(self) -> Result<Report, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cnclip-runtime")
            .enable_time()
            .build()
            .map_err(|e| Error::Internal(e.to_string()))?;
        runtime.block_on(self.run_async())
    }

    /// Runs the pipeline on the current tokio runtime.
    ///
    /// # Errors
    /// As [`Pipeline::run`].
    pub async fn run_async(self) -> Result<Report, Error> {
        let pool = Arc::new(WorkerPool::new(self.settings.threads));
        let quarantine = Arc::new(Quarantine::new(self.settings.on_error, self.settings.quarantine.clone()));
        let read_ctx =
            ReadContext { shard: self.shard, batch_rows: self.settings.batch_rows, quarantine: quarantine.clone() };
        let written: Arc<Mutex<Vec<(String, Written, Staged)>>> = Arc::default();
        // Progress counts the records the sources read; the total (for an ETA) is known when
        // every source can estimate its own.
        let estimates: Option<u64> = self
            .nodes
            .iter()
            .filter_map(|n| match &n.op {
                Op::Source(source) => Some(source.estimated_records()),
                _ => None,
            })
            .sum();
        let progress = Arc::new(Progress::new("cnclip", estimates.map(|total| total.div_ceil(self.shard.count))));
        let mut graph: Graph<RecordBatch> = Graph::new();
        let capacity = Capacity { rows: 4 * self.settings.batch_rows.max(64), bytes: 64 << 20 };
        for node in self.nodes {
            let name = node.name.clone();
            let inputs: Vec<&str> = node.input.as_deref().into_iter().collect();
            match node.op {
                Op::Source(source) => {
                    let (read_ctx, progress) = (read_ctx.clone(), progress.clone());
                    graph.add(&name, &inputs, capacity, move |ctx: NodeContext<RecordBatch>| async move {
                        produce_on_thread(&ctx, move |emit| {
                            let mut emit = |batch: RecordBatch| {
                                progress.add(batch.num_rows() as u64);
                                emit(batch).map_err(|_| Error::Stopped)
                            };
                            match source.read(&read_ctx, &mut emit) {
                                Ok(()) | Err(Error::Stopped) => Ok(()),
                                Err(e) => Err(e.into()),
                            }
                        })
                        .await
                    });
                }
                Op::Transform(transform) => {
                    let (pool, quarantine) = (pool.clone(), quarantine.clone());
                    let origin = self.origins[&name].clone();
                    let workers = pool.size();
                    graph.add(&name, &inputs, capacity, move |mut ctx: NodeContext<RecordBatch>| async move {
                        // Pieces of ~32 rows keep every worker busy and the output arriving steadily.
                        let split = move |batch: RecordBatch| {
                            let piece = batch.num_rows().div_ceil(workers).clamp(1, 32);
                            (0..batch.num_rows())
                                .step_by(piece)
                                .map(|at| batch.slice(at, piece.min(batch.num_rows() - at)))
                                .collect()
                        };
                        let apply: Arc<
                            dyn Fn(RecordBatch) -> Result<crate::transforms::Output, BoxError> + Send + Sync,
                        > = Arc::new(move |batch: RecordBatch| transform.apply(&batch, &origin).map_err(Into::into));
                        map_on_pool(&mut ctx, &pool, 2 * workers, split, apply, |output| {
                            for rejected in output.rejected {
                                quarantine.reject(rejected)?;
                            }
                            Ok((output.batch.num_rows() > 0).then_some(output.batch))
                        })
                        .await
                    });
                }
                Op::Sink(config) => {
                    let schema = self.schemas[&name].clone();
                    let (written, sink_name) = (written.clone(), name.clone());
                    graph.add(&name, &inputs, capacity, move |mut ctx: NodeContext<RecordBatch>| async move {
                        let sink = config.open(&schema)?;
                        let done = consume_on_thread(
                            &mut ctx,
                            sink,
                            move |sink, batch: RecordBatch| sink.write(&batch).map_err(Into::into),
                            |sink| sink.finish().map_err(Into::into),
                        )
                        .await?;
                        let (done, staged) = done;
                        written.lock().unwrap_or_else(|e| e.into_inner()).push((sink_name, done, staged));
                        Ok(())
                    });
                }
            }
        }
        drop(read_ctx);
        let summaries = graph.start().map_err(|e| Error::Internal(e.to_string()))?.wait().await;
        progress.finish();
        let summaries = summaries.map_err(|e| Error::Pipeline(e.to_string()))?;
        let quarantined = quarantine.count();
        let quarantine = Arc::try_unwrap(quarantine).map_err(|_| Error::Internal("quarantine still shared".into()))?;
        let quarantine_file = quarantine.finish()?;
        // Every node succeeded: now, and only now, the outputs move into place.
        let staged = std::mem::take(&mut *written.lock().unwrap_or_else(|e| e.into_inner()));
        let mut written = Vec::new();
        for (name, done, staged) in staged {
            staged.commit()?;
            written.push((name, done));
        }
        Ok(Report { nodes: summaries, written, quarantined, quarantine_file })
    }
}

/// What a finished pipeline did.
#[derive(Debug)]
pub struct Report {
    pub nodes: Vec<(String, NodeSummary)>,
    /// Each sink's output, in the order they finished.
    pub written: Vec<(String, Written)>,
    pub quarantined: usize,
    pub quarantine_file: Option<PathBuf>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, s) in &self.nodes {
            writeln!(
                f,
                "  {name:<16} {:>10} rows in {:>10} rows out  {:>9.0} rows/s  busy {:>7.2} s  queue ≤ {} rows",
                s.rows_in,
                s.rows_out,
                s.rows_per_second,
                s.busy.as_secs_f64(),
                s.max_queued_rows
            )?;
        }
        for (name, w) in &self.written {
            writeln!(f, "  {name}: {} rows → {}", w.rows, w.path.display())?;
        }
        match &self.quarantine_file {
            Some(path) => write!(f, "  {} records quarantined → {}", self.quarantined, path.display()),
            None => write!(f, "  0 records quarantined"),
        }
    }
}

fn config<T: serde::de::DeserializeOwned>(config: &toml::Table) -> Result<T, Vec<String>> {
    T::deserialize(toml::Value::Table(config.clone())).map_err(|e| vec![e.to_string().trim_end().replace('\n', " ")])
}

fn build_op(kind: &str, table: &toml::Table, base: &Path) -> Result<Op, Vec<String>> {
    let files = |paths: &[String]| expand_paths(&resolve_patterns(base, paths));
    let dir = |path: &Path, what: &str| -> Result<PathBuf, Vec<String>> {
        let path = resolve(base, path);
        if path.is_dir() { Ok(path) } else { Err(vec![format!("{what} {} is not a directory", path.display())]) }
    };
    Ok(match kind {
        "tsv" => {
            let c: FilesConfig = config(table)?;
            Op::Source(Box::new(TsvSource { paths: files(&c.paths)?, dedupe: c.dedupe }))
        }
        "jsonl" => {
            let c: FilesConfig = config(table)?;
            Op::Source(Box::new(JsonlSource { paths: files(&c.paths)?, dedupe: c.dedupe }))
        }
        "lmdb" => {
            let c: LmdbConfig = config(table)?;
            let path = dir(&c.path, "LMDB split")?;
            let db = path.join(match c.database {
                Database::Imgs => "imgs",
                Database::Pairs => "pairs",
            });
            if !db.join("data.mdb").is_file() {
                return Err(vec![format!("{} is not an LMDB (no data.mdb)", db.display())]);
            }
            Op::Source(Box::new(LmdbSource { dir: path, database: c.database }))
        }
        "image_folder" => {
            let c: FolderConfig = config(table)?;
            let root = dir(&c.path, "image folder")?;
            Op::Source(Box::new(ImageFolderSource::open(root).map_err(|e| vec![e.to_string()])?))
        }
        "parquet" => {
            let c: ParquetConfig = config(table)?;
            let contract = match c.table.as_deref() {
                None => None,
                Some(name) => {
                    Some((name, contract(name).ok_or_else(|| vec![format!("unknown table contract `{name}`")])?))
                }
            };
            Op::Source(Box::new(ParquetSource::open(files(&c.paths)?, contract)?))
        }
        "decode_base64" => {
            let _: Empty = config(table)?;
            Op::Transform(Arc::new(DecodeBase64))
        }
        "preprocess" => {
            let c: PreprocessConfig = config(table)?;
            if !(1..=4096).contains(&c.resolution) {
                return Err(vec![format!("resolution {} is not between 1 and 4096", c.resolution)]);
            }
            Op::Transform(Arc::new(Preprocess { resolution: c.resolution, max_pixels: c.max_pixels, order: c.order }))
        }
        "tokenize" => {
            let c: TokenizeConfig = config(table)?;
            if !(2..=4096).contains(&c.context_length) {
                return Err(vec![format!("context_length {} is not between 2 and 4096", c.context_length)]);
            }
            Op::Transform(Arc::new(Tokenize { context_length: c.context_length, preprocess: c.preprocess }))
        }
        "write_parquet" => Op::Sink(SinkConfig::Parquet(resolve(base, &config::<PathConfig>(table)?.path))),
        "write_tsv" => Op::Sink(SinkConfig::Tsv(resolve(base, &config::<PathConfig>(table)?.path))),
        "write_jsonl" => {
            let c: JsonlSinkConfig = config(table)?;
            Op::Sink(SinkConfig::Jsonl(resolve(base, &c.path), c.rename))
        }
        "write_lmdb" => {
            let c: LmdbSinkConfig = config(table)?;
            Op::Sink(SinkConfig::Lmdb(resolve(base, &c.path), c.database))
        }
        other => return Err(vec![format!("unknown kind `{other}`")]),
    })
}

/// The contract schema called `name`, for tables without parameters.
pub fn contract(name: &str) -> Option<SchemaRef> {
    Some(match name {
        "images" => cnclip_schemas::images(),
        "images_base64" => cnclip_schemas::images_base64(),
        "labeled_images" => cnclip_schemas::labeled_images(),
        "texts" => cnclip_schemas::texts(),
        "pairs" => cnclip_schemas::pairs(),
        "predictions" => cnclip_schemas::predictions(),
        "quarantine" => cnclip_schemas::quarantine(),
        _ => return None,
    })
}
