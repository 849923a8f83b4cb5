//! `cnclip sql "QUERY" [--table name=PATH …]`: DataFusion over our Parquet tables (a file, a
//! glob's directory or a directory of parts each), with the vector UDFs `dot(a, b)` and
//! `cosine_similarity(a, b)` over feature columns (fixed-size or variable lists of float32 or
//! float64). The result prints as a table, or goes out as CSV, JSON lines or Parquet
//! (`--format`, `--output`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow::array::{Array, ArrayRef, AsArray, Float64Array};
use arrow::datatypes::{DataType, Float32Type, Float64Type};
use arrow::record_batch::RecordBatch;
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
    /// The query (DataFusion SQL).
    query: String,
    /// A table for the query: `name=PATH` (a Parquet file or a directory of parts), repeatable.
    #[arg(long = "table", value_name = "NAME=PATH")]
    tables: Vec<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Where to write (stdout when not given; required for parquet).
    #[arg(long)]
    output: Option<PathBuf>,
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

/// A session with cnclip's UDFs and `tables` (`name=PATH`) registered.
///
/// # Errors
/// A malformed `name=PATH`, or a path DataFusion cannot read as Parquet.
pub async fn context(tables: &[String]) -> Result<SessionContext> {
    let ctx = SessionContext::new();
    ctx.register_udf(ScalarUDF::new_from_impl(VectorUdf::new("dot", false)));
    ctx.register_udf(ScalarUDF::new_from_impl(VectorUdf::new("cosine_similarity", true)));
    for table in tables {
        let Some((name, path)) = table.split_once('=') else {
            bail!("--table {table}: use NAME=PATH");
        };
        let path = std::path::Path::new(path);
        if !path.exists() {
            bail!("--table {table}: {} does not exist", path.display());
        }
        let location = if path.is_dir() { format!("{}/", path.display()) } else { path.display().to_string() };
        ctx.register_parquet(name, &location, ParquetReadOptions::default())
            .await
            .with_context(|| format!("--table {table}"))?;
    }
    Ok(ctx)
}

/// Runs `query` on a session of `tables`.
///
/// # Errors
/// As [`context`], or the query's planning or execution error.
pub fn query(query: &str, tables: &[String]) -> Result<Vec<RecordBatch>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        let ctx = context(tables).await?;
        let frame = ctx.sql(query).await.context("planning the query")?;
        frame.collect().await.context("running the query")
    })
}

pub fn run(args: Args) -> Result<()> {
    let batches = query(&args.query, &args.tables)?;
    let mut out: Box<dyn std::io::Write> = match (&args.output, args.format) {
        (None, Format::Parquet) => bail!("--format parquet needs --output"),
        (Some(path), Format::Parquet) => {
            let schema =
                batches.first().map(|b| b.schema()).unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
            cnclip_operators::write_atomically(path, |file| {
                let mut writer =
                    parquet::arrow::ArrowWriter::try_new(file, schema, None).map_err(std::io::Error::other)?;
                for batch in &batches {
                    writer.write(batch).map_err(std::io::Error::other)?;
                }
                writer.finish().map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(())
            })?;
            return Ok(());
        }
        (Some(path), _) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        (None, _) => Box::new(std::io::stdout().lock()),
    };
    match args.format {
        Format::Table => writeln!(out, "{}", arrow::util::pretty::pretty_format_batches(&batches)?)?,
        Format::Csv => {
            let mut writer = arrow::csv::Writer::new(&mut out);
            for batch in &batches {
                writer.write(batch)?;
            }
        }
        Format::Jsonl => {
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
            for batch in &batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
        Format::Parquet => unreachable!("handled above"),
    }
    out.flush()?;
    Ok(())
}
