//! `cnclip sql "QUERY" [--table name=PATH …] [--cluster df://HOST:PORT]`: DataFusion over our
//! Parquet tables (a file, a glob's directory or a directory of parts each), with the vector
//! UDFs `dot(a, b)` and `cosine_similarity(a, b)` over feature columns (fixed-size or variable
//! lists of float32 or float64), in this process or distributed on a Ballista cluster
//! (`cnclip cluster`, whose scheduler and executors register the same UDFs). The result prints
//! as a table, or goes out as CSV, JSON lines or Parquet (`--format`, `--output`).
//!
//! The evaluation jobs' SQL engines run through [`session`] and [`register_batch`] too: on a
//! cluster their in-memory inputs are written as Parquet to a scratch directory the executors
//! read (a shared path), since Ballista ships plans, not data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use arrow::array::{Array, ArrayRef, AsArray, Float64Array};
use arrow::datatypes::{DataType, Float32Type, Float64Type};
use arrow::record_batch::RecordBatch;
use cnclip_operators::storage;
use datafusion::common::{DataFusionError, plan_err};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};
use datafusion::prelude::{ParquetReadOptions, SessionContext};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Jsonl,
    Parquet,
}

#[derive(clap::Args)]
pub struct Args {
    /// The query (DataFusion SQL; it may start with `--` comments, as `jobs/sql/*.sql` do).
    #[arg(allow_hyphen_values = true)]
    query: String,
    /// A table for the query: `name=PATH` (a Parquet file or a directory of parts), repeatable.
    #[arg(long = "table", value_name = "NAME=PATH")]
    tables: Vec<String>,
    /// How the result is written: a printed table, CSV, JSON lines, or Parquet (needs --output).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Where to write (stdout when not given; required for parquet).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Run on a Ballista cluster (`cnclip cluster scheduler`): `df://HOST:PORT`. Table paths
    /// must be readable by every executor at the same path.
    #[arg(long, value_name = "df://HOST:PORT")]
    cluster: Option<String>,
    /// With --cluster: seconds to wait for the query's first result before giving up (a
    /// scheduler without executors never answers); 0 waits for ever.
    #[arg(long, default_value_t = 600)]
    cluster_timeout: u64,
}

/// `dot(a, b)` or `cosine_similarity(a, b)` of two vector columns.
#[derive(Debug, PartialEq, Eq, Hash)]
struct VectorUdf {
    name: &'static str,
    cosine: bool,
    signature: Signature,
}

impl VectorUdf {
    fn new(name: &'static str, cosine: bool) -> Self {
        VectorUdf { name, cosine, signature: Signature::any(2, Volatility::Immutable) }
    }
}

/// Row `i` of a list column of floats, as f64s (`None` for a null row).
fn row(array: &ArrayRef, i: usize) -> Option<Vec<f64>> {
    if array.is_null(i) {
        return None;
    }
    let values: ArrayRef = match array.data_type() {
        DataType::FixedSizeList(..) => array.as_fixed_size_list().value(i),
        DataType::List(_) => array.as_list::<i32>().value(i),
        DataType::LargeList(_) => array.as_list::<i64>().value(i),
        _ => return None,
    };
    match values.data_type() {
        DataType::Float32 => {
            Some(values.as_primitive::<Float32Type>().iter().map(|v| v.map_or(f64::NAN, f64::from)).collect())
        }
        DataType::Float64 => Some(values.as_primitive::<Float64Type>().iter().map(|v| v.unwrap_or(f64::NAN)).collect()),
        _ => None,
    }
}

fn is_vector(data_type: &DataType) -> bool {
    match data_type {
        DataType::FixedSizeList(item, _) | DataType::List(item) | DataType::LargeList(item) => {
            matches!(item.data_type(), DataType::Float32 | DataType::Float64)
        }
        _ => false,
    }
}

/// A fixed-size list column of float32 without null values: (rows' validity, values, width).
type F32Rows<'a> = (Option<&'a arrow::buffer::NullBuffer>, &'a [f32], usize);

/// `array` as [`F32Rows`], when it is one (the feature tables' layout).
fn f32_rows(array: &ArrayRef) -> Option<F32Rows<'_>> {
    let list = array.as_fixed_size_list_opt()?;
    let values = list.values().as_primitive_opt::<Float32Type>()?;
    if values.null_count() > 0 {
        return None;
    }
    let width = list.value_length() as usize;
    let start = list.offset() * width;
    Some((list.nulls(), &values.values()[start..start + list.len() * width], width))
}

impl VectorUdf {
    /// The feature-table case without a copy per row; the same sums in the same order as the
    /// general path (each product in f64, left to right), so the same results bit for bit.
    fn fixed_f32(&self, x: F32Rows<'_>, y: F32Rows<'_>, rows: usize) -> datafusion::common::Result<ColumnarValue> {
        let ((x_nulls, xs, dx), (y_nulls, ys, dy)) = (x, y);
        if dx != dy {
            return Err(DataFusionError::Execution(format!("{}: vectors of {dx} and {dy} values", self.name)));
        }
        let valid = |nulls: Option<&arrow::buffer::NullBuffer>, i: usize| nulls.is_none_or(|n| n.is_valid(i));
        let dot = |p: &[f32], q: &[f32]| p.iter().zip(q).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>();
        let out: Float64Array = (0..rows)
            .map(|i| {
                if !valid(x_nulls, i) || !valid(y_nulls, i) {
                    return None;
                }
                let (p, q) = (&xs[i * dx..(i + 1) * dx], &ys[i * dx..(i + 1) * dx]);
                let d = dot(p, q);
                Some(if self.cosine { d / (dot(p, p).sqrt() * dot(q, q).sqrt()) } else { d })
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

impl ScalarUDFImpl for VectorUdf {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> datafusion::common::Result<DataType> {
        if args.len() != 2 || !args.iter().all(is_vector) {
            return plan_err!("{}(a, b) takes two lists of floats, got {args:?}", self.name);
        }
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::common::Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let (a, b) = (&arrays[0], &arrays[1]);
        if let (Some(x), Some(y)) = (f32_rows(a), f32_rows(b)) {
            return self.fixed_f32(x, y, args.number_rows);
        }
        let mut out = Vec::with_capacity(args.number_rows);
        for i in 0..args.number_rows {
            out.push(match (row(a, i), row(b, i)) {
                (Some(x), Some(y)) => {
                    if x.len() != y.len() {
                        return Err(DataFusionError::Execution(format!(
                            "{}: vectors of {} and {} values",
                            self.name,
                            x.len(),
                            y.len()
                        )));
                    }
                    let dot: f64 = x.iter().zip(&y).map(|(p, q)| p * q).sum();
                    if self.cosine {
                        let norm = |v: &[f64]| v.iter().map(|p| p * p).sum::<f64>().sqrt();
                        Some(dot / (norm(&x) * norm(&y)))
                    } else {
                        Some(dot)
                    }
                }
                _ => None,
            });
        }
        Ok(ColumnarValue::Array(Arc::new(Float64Array::from(out))))
    }
}

/// cnclip's SQL functions, registered in every session — and on every cluster process.
pub fn udfs() -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::new_from_impl(VectorUdf::new("dot", false)),
        ScalarUDF::new_from_impl(VectorUdf::new("cosine_similarity", true)),
    ]
}

/// A session with cnclip's UDFs: in this process, or a client of the Ballista scheduler at
/// `cluster` (`df://HOST:PORT`).
///
/// # Errors
/// A malformed cluster address.
pub async fn session(cluster: Option<&str>) -> Result<SessionContext> {
    // Tables in object stores are read through cnclip's stores ([`crate::stores`]).
    let ctx = match cluster {
        None => {
            SessionContext::new_with_config_rt(datafusion::prelude::SessionConfig::new(), crate::stores::runtime()?)
        }
        Some(url) => {
            use ballista::prelude::{SessionConfigExt, SessionContextExt};
            if !url.starts_with("df://") {
                bail!("--cluster {url}: use df://HOST:PORT");
            }
            let state = datafusion::execution::SessionStateBuilder::new()
                .with_default_features()
                .with_config(datafusion::prelude::SessionConfig::new_with_ballista())
                .with_runtime_env(crate::stores::runtime()?)
                .build();
            SessionContext::remote_with_state(url, state).await.with_context(|| format!("--cluster {url}"))?
        }
    };
    for udf in udfs() {
        ctx.register_udf(udf);
    }
    Ok(ctx)
}

/// Registers `batch` as table `name`: in memory, or — on a cluster, which ships plans and not
/// data — as a Parquet file written under `scratch`, a directory every executor reads.
///
/// # Errors
/// Writing the file, or a name already taken.
pub async fn register_batch(
    ctx: &SessionContext,
    name: &str,
    batch: RecordBatch,
    scratch: Option<&Path>,
) -> Result<()> {
    let Some(dir) = scratch else {
        ctx.register_batch(name, batch)?;
        return Ok(());
    };
    let path = std::path::absolute(dir.join(format!("{name}.parquet")))?;
    cnclip_operators::write_atomically(&path, |file| {
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).map_err(std::io::Error::other)?;
        writer.write(&batch).map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(())
    })
    .with_context(|| format!("writing {}", path.display()))?;
    ctx.register_parquet(name, path.display().to_string(), ParquetReadOptions::default()).await?;
    Ok(())
}

/// A scratch directory for [`register_batch`] on a cluster, next to `near` (a path the user
/// chose, so one the cluster shares); removed when dropped.
///
/// # Errors
/// The directory cannot be made.
pub fn scratch(near: &Path) -> Result<tempfile::TempDir> {
    Ok(storage::scratch_dir(Some(near), ".cnclip-sql-")?)
}

/// A session with cnclip's UDFs and `tables` (`name=PATH`) registered, local or on `cluster`.
///
/// # Errors
/// A malformed `name=PATH`, or a path DataFusion cannot read as Parquet.
pub async fn context(tables: &[String], cluster: Option<&str>) -> Result<SessionContext> {
    let ctx = session(cluster).await?;
    for table in tables {
        let Some((name, path)) = table.split_once('=') else {
            bail!("--table {table}: use NAME=PATH");
        };
        if cnclip_operators::storage::is_remote(Path::new(path)) {
            register_remote(&ctx, name, path).await.with_context(|| format!("--table {table}"))?;
            continue;
        }
        let path = std::path::Path::new(path);
        if !path.exists() {
            bail!("--table {table}: {} does not exist", path.display());
        }
        // Absolute: on a cluster, the executors resolve it, not this process.
        let path = &std::path::absolute(path)?;
        let location = if path.is_dir() {
            cnclip_operators::sources::parts::check_complete(path).with_context(|| format!("--table {table}"))?;
            format!("{}/", path.display())
        } else {
            path.display().to_string()
        };
        // Every file's footer read first, by the checked reader: DataFusion skips an empty file
        // (a table silently short of its rows) and panics on some damaged footers.
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut parts: Vec<PathBuf> = storage::read_dir(path)
                .with_context(|| format!("--table {table}"))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().is_some_and(|e| e == "parquet")
                        && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect();
            parts.sort();
            parts
        } else {
            vec![path.clone()]
        };
        for file in &files {
            cnclip_operators::sources::parquet::file_schema(file).with_context(|| format!("--table {table}"))?;
        }
        ctx.register_parquet(name, &location, ParquetReadOptions::default())
            .await
            .with_context(|| format!("--table {table}"))?;
    }
    Ok(ctx)
}

/// Registers the object, or the Parquet objects under the prefix, at `url` as table `name`
/// (every footer read first, as for local files). A prefix of shard parts must be complete.
async fn register_remote(ctx: &SessionContext, name: &str, url: &str) -> Result<()> {
    use cnclip_operators::storage;
    let url = url.trim_end_matches('/');
    // A prefix of Parquet objects (a table's parts), or else one object. (The prefix is looked
    // up first: a store may answer a HEAD of a "folder" with an error rather than 404.)
    let parts: Vec<String> = cnclip_operators::sources::parts::names_in(Path::new(url))?
        .into_iter()
        .filter(|name| name.ends_with(".parquet") && !name.starts_with('.'))
        .map(|name| format!("{url}/{name}"))
        .collect();
    let location = if parts.is_empty() {
        match storage::size(url) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("{url}: no such object, and no Parquet objects under it")
            }
            Err(e) => return Err(e.into()),
        }
        cnclip_operators::sources::parquet::file_schema(Path::new(url))?;
        url.to_string()
    } else {
        cnclip_operators::sources::parts::check_complete(Path::new(url))?;
        for part in &parts {
            cnclip_operators::sources::parquet::file_schema(Path::new(part.as_str()))?;
        }
        format!("{url}/")
    };
    ctx.register_parquet(name, &location, ParquetReadOptions::default()).await?;
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    if let Some(output) = &args.output {
        for table in &args.tables {
            let Some((_, path)) = table.split_once('=') else { continue };
            let path = Path::new(path);
            if storage::staging::within(output, path) {
                bail!(
                    "--output {} would overwrite --table {table} (or write into its directory) while the query reads \
                     it: give another output path",
                    output.display()
                );
            }
        }
    }
    if let (None, Format::Parquet) = (&args.output, args.format) {
        bail!("--format parquet needs --output");
    }
    cnclip_operators::signals::catch_interrupts()?;
    let runtime =
        Detached(tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?);
    let cluster = args.cluster.as_deref();
    let wait = (cluster.is_some() && args.cluster_timeout > 0).then(|| Duration::from_secs(args.cluster_timeout));
    // The stream and its first batch: on a cluster both wait on the executors, so both are
    // bounded by --cluster-timeout.
    let (mut stream, first) = runtime.block_on(interruptible(async {
        let ctx = context(&args.tables, cluster).await?;
        let frame = ctx.sql(&args.query).await.context("planning the query")?;
        let started = async {
            let mut stream = frame.execute_stream().await.context("running the query")?;
            let first = std::future::poll_fn(|cx| futures_core::Stream::poll_next(stream.as_mut(), cx)).await;
            anyhow::Ok((stream, first.transpose().context("running the query")?))
        };
        match wait {
            None => started.await,
            Some(limit) => tokio::time::timeout(limit, started).await.map_err(|_| {
                anyhow::anyhow!(
                    "no result from the cluster {} within {} s (--cluster-timeout): is an executor connected to its \
                     scheduler (`cnclip cluster executor --scheduler HOST:PORT`)?",
                    cluster.unwrap_or_default(),
                    limit.as_secs()
                )
            })?,
        }
    }))?;
    let schema = stream.schema();
    // One batch at a time from the stream to the output: memory stays at a batch, whatever the
    // size of the result (only `--format table` gathers it all, to size its columns).
    let mut first = Some(first);
    let mut next = || -> Result<Option<RecordBatch>> {
        if let Some(first) = first.take() {
            return Ok(first);
        }
        let batch = std::future::poll_fn(|cx| futures_core::Stream::poll_next(stream.as_mut(), cx));
        runtime.block_on(interruptible(async { batch.await.transpose().context("running the query") }))
    };
    let write =
        |out: &mut (dyn std::io::Write + Send), next: &mut dyn FnMut() -> Result<Option<RecordBatch>>| -> Result<()> {
            match args.format {
                Format::Table => {
                    let mut batches = Vec::new();
                    while let Some(batch) = next()? {
                        batches.push(batch);
                    }
                    writeln!(out, "{}", arrow::util::pretty::pretty_format_batches(&batches)?)?;
                }
                Format::Csv => {
                    let mut writer = arrow::csv::Writer::new(out);
                    while let Some(batch) = next()? {
                        writer.write(&batch)?;
                    }
                }
                Format::Jsonl => {
                    let mut writer = arrow::json::LineDelimitedWriter::new(out);
                    while let Some(batch) = next()? {
                        writer.write(&batch)?;
                    }
                    writer.finish()?;
                }
                Format::Parquet => {
                    let mut writer = parquet::arrow::ArrowWriter::try_new(out, schema.clone(), None)?;
                    while let Some(batch) = next()? {
                        writer.write(&batch)?;
                    }
                    writer.close()?;
                }
            }
            Ok(())
        };
    match &args.output {
        // A FIFO or a device (`/dev/stdout`) is written as it is: nothing to rename into place.
        Some(path) if storage::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) => {
            let file = storage::open_with(path, std::fs::OpenOptions::new().write(true))
                .with_context(|| format!("--output {}", path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            write(&mut out, &mut next)?;
            std::io::Write::flush(&mut out)?;
            Ok(())
        }
        Some(path) => cnclip_operators::write_atomically(path, |file| write(file, &mut next))
            .with_context(|| format!("--output {}", path.display())),
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout());
            write(&mut out, &mut next)?;
            std::io::Write::flush(&mut out)?;
            Ok(())
        }
    }
}

/// The query's runtime, shut down without waiting for its tasks when the job returns: a
/// signal ends the job while an operator may be in a long stretch of work that does not yield
/// (a join's inner loop), and waiting for it would keep the stopped job running for minutes.
/// The stream is dropped first (its tasks aborted), and the output is already committed or
/// removed by then.
struct Detached(tokio::runtime::Runtime);

impl std::ops::Deref for Detached {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        // A runtime that cannot start one is never built; a placeholder takes its place.
        let placeholder = tokio::runtime::Builder::new_current_thread().build();
        if let Ok(placeholder) = placeholder {
            std::mem::replace(&mut self.0, placeholder).shutdown_background();
        }
    }
}

/// `work`, or the interruption error as soon as SIGINT or SIGTERM arrives (the output's
/// temporary file is then removed as the error unwinds).
async fn interruptible<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        result = work => result,
        signal = cnclip_operators::signals::until_interrupted() => {
            Err(cnclip_operators::Error::Interrupted { signal }.into())
        }
    }
}
