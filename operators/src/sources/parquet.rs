//! Parquet tables (ours or a notebook's) as a source. All files must share one schema; when a
//! contract is named, that schema is checked against it before anything is read (columns the
//! file declares nullable but the contract wants non-null are accepted, and checked per batch).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, BooleanArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::{Emit, ReadContext, Source};
use crate::error::{Error, Result, io};
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use crate::storage;
use schemars::JsonSchema;
use serde::Deserialize;

pub(super) fn parquet_err(path: &Path, source: parquet::errors::ParquetError) -> Error {
    Error::Parquet { path: path.display().to_string(), source }
}

pub(super) fn arrow_err(path: &Path, source: arrow::error::ArrowError) -> Error {
    Error::ArrowFile { path: path.display().to_string(), source }
}

/// The Arrow schema of a Parquet file, from its footer.
///
/// # Errors
/// A missing file or one that is not Parquet.
pub fn file_schema(path: &Path) -> Result<SchemaRef> {
    // Opening a FIFO blocks until something writes to it: only regular files are opened.
    if let Ok(meta) = storage::metadata(path)
        && !meta.is_file()
    {
        return Err(Error::Format {
            path: path.display().to_string(),
            reason: format!("{}, not a regular file", super::parts::kind_of(&meta)),
        });
    }
    let file = storage::open_chunks(path).map_err(io(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_err(path, e))?;
    Ok(builder.schema().clone())
}

/// The rows the footers of `paths` declare (`None` if one cannot be read).
pub(super) fn rows_in(paths: &[PathBuf]) -> Option<u64> {
    let rows = |path: &PathBuf| -> Option<u64> {
        let builder = ParquetRecordBatchReaderBuilder::try_new(storage::open_chunks(path).ok()?).ok()?;
        Some(builder.metadata().file_metadata().num_rows() as u64)
    };
    paths.iter().map(rows).sum()
}

pub struct ParquetSource {
    pub paths: Vec<PathBuf>,
    /// The schema of the first file; every other must match it.
    pub schema: SchemaRef,
    /// Rows whose id repeats one read before are quarantined: the id column and what its
    /// rows are ("image", "text"), or `None` to pass every row.
    pub dedupe: Option<(&'static str, &'static str)>,
}

impl ParquetSource {
    /// Opens the footers of `paths`, checking they share one schema (and, if `contract` names
    /// a table, that it matches that contract).
    ///
    /// # Errors
    /// Every file whose schema differs, or the contract mismatch.
    pub fn open(paths: Vec<PathBuf>, contract: Option<(&str, SchemaRef)>) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut schema: Option<SchemaRef> = None;
        for path in &paths {
            match file_schema(path) {
                Err(e) => problems.push(e.to_string()),
                Ok(found) => match &schema {
                    None => schema = Some(found),
                    Some(first) if first.fields() != found.fields() => problems.push(format!(
                        "{}: its columns differ from {}'s ({} vs {})",
                        path.display(),
                        paths[0].display(),
                        describe(&found),
                        describe(first)
                    )),
                    Some(_) => {}
                },
            }
        }
        // pyarrow marks every column nullable unless told otherwise: a column the contract
        // wants non-null is taken as such, and each batch is checked to hold no null instead.
        if let (Some(found), Some((table, expected))) = (&mut schema, contract) {
            let fields: Vec<Field> = found
                .fields()
                .iter()
                .map(|f| match expected.field_with_name(f.name()) {
                    Ok(wanted) if f.is_nullable() && !wanted.is_nullable() => f.as_ref().clone().with_nullable(false),
                    _ => f.as_ref().clone(),
                })
                .collect();
            *found = Arc::new(Schema::new_with_metadata(fields, found.metadata().clone()));
            if let Err(e) = cnclip_schemas::check(table, &expected, found) {
                problems.push(format!("{}: {e}", paths[0].display()));
            }
        }
        match schema {
            Some(schema) if problems.is_empty() => Ok(ParquetSource { paths, schema, dedupe: None }),
            _ => Err(problems),
        }
    }
}

/// The rows of `batch` whose `column` id was not seen before; the others are quarantined.
fn first_of_each_id(
    batch: RecordBatch,
    column: &str,
    what: &str,
    path: &Path,
    seen: &mut super::SeenIds,
    ctx: &ReadContext,
) -> Result<RecordBatch> {
    let ids = batch
        .column_by_name(column)
        .and_then(|ids| ids.as_any().downcast_ref::<arrow::array::Int64Array>())
        .ok_or_else(|| Error::Internal(format!("dedupe: no int64 column `{column}`")))?;
    let mut keep = Vec::with_capacity(ids.len());
    for id in ids.values() {
        match seen.duplicate(*id, path, what) {
            None => keep.push(true),
            Some(rejected) => {
                ctx.quarantine.reject(rejected)?;
                keep.push(false);
            }
        }
    }
    if keep.iter().all(|&k| k) {
        return Ok(batch);
    }
    Ok(filter_record_batch(&batch, &BooleanArray::from(keep))?)
}

fn describe(schema: &SchemaRef) -> String {
    schema.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ")
}

impl ParquetSource {
    /// `batch` with the source's schema; a null in a column the schema holds non-null (one the
    /// file declared nullable) is a fault of the file, named with its column.
    fn conform(&self, path: &Path, batch: RecordBatch) -> Result<RecordBatch> {
        for (field, column) in self.schema.fields().iter().zip(batch.columns()) {
            if !field.is_nullable() && column.null_count() > 0 {
                return Err(Error::Format {
                    path: path.display().to_string(),
                    reason: format!("column `{}` holds a null, which its table does not allow", field.name()),
                });
            }
        }
        RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec()).map_err(|e| arrow_err(path, e))
    }
}

impl Source for ParquetSource {
    fn origin(&self) -> String {
        super::describe_paths(&self.paths)
    }

    fn estimated_records(&self) -> Option<u64> {
        rows_in(&self.paths)
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()> {
        let mut ordinal = 0u64;
        let mut seen = super::SeenIds::new(self.dedupe.is_some());
        for path in &self.paths {
            let file = storage::open_chunks(path).map_err(io(path))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| b.with_batch_size(ctx.batch_rows.max(1)).build())
                .map_err(|e| parquet_err(path, e))?;
            for batch in reader {
                let batch = batch.map_err(|e| arrow_err(path, e))?;
                let rows = batch.num_rows() as u64;
                let batch = if ctx.shard.count == 1 {
                    batch
                } else {
                    let mask: BooleanArray =
                        (0..batch.num_rows() as u64).map(|r| Some(ctx.shard.owns(ordinal + r))).collect();
                    filter_record_batch(&batch, &mask)?
                };
                ordinal += rows;
                let batch = self.conform(path, batch)?;
                let batch = match self.dedupe {
                    Some((column, what)) => first_of_each_id(batch, column, what, path, &mut seen, ctx)?,
                    None => batch,
                };
                if batch.num_rows() > 0 {
                    emit(batch)?;
                }
            }
        }
        Ok(())
    }
}

/// Parquet files sharing one schema → their rows.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    /// Files and globs.
    pub paths: Vec<String>,
    /// A contract the files must match: `images`, `texts`, `pairs`, ….
    pub table: Option<String>,
    /// Quarantine a row whose id repeats an earlier row's, for `table` images or texts.
    ///
    /// The id is the `image_id` of an `images` table, the `text_id` of a `texts` table, as the
    /// TSV and JSONL sources dedupe.
    #[serde(default)]
    pub dedupe: bool,
    /// Read another project's layout (img2dataset, Hugging Face): the column holding ids or string keys, e.g. `key`.
    ///
    /// With `image_column` (an `images` table) or `text_column` (a `texts` table); rows keep their key in a `key` column (see `sources/img2dataset.rs` for the int64 ids).
    #[serde(default)]
    pub id_column: Option<String>,
    /// The column of image bytes, base64 text, or `{bytes, path}` structs, e.g. `jpg` or `image`.
    #[serde(default)]
    pub image_column: Option<String>,
    /// The column of texts, e.g. `caption` or `text`.
    #[serde(default)]
    pub text_column: Option<String>,
}

impl ParquetConfig {
    /// Plain Parquet files as `table` (a contract name), deduplicated or not.
    pub fn new(paths: Vec<String>, table: Option<String>, dedupe: bool) -> Self {
        ParquetConfig { paths, table, dedupe, id_column: None, image_column: None, text_column: None }
    }

    /// The mapped source, when a column mapping is given.
    fn mapped(&self, cx: &BuildContext) -> Option<Result<Operator, Vec<String>>> {
        use super::img2dataset::MappedParquetSource;
        use super::webdataset::WebDatasetTable;
        if self.id_column.is_none() && self.image_column.is_none() && self.text_column.is_none() {
            return None;
        }
        let build = || -> Result<Operator, Vec<String>> {
            let id_column = self
                .id_column
                .clone()
                .ok_or_else(|| vec!["`image_column`/`text_column` need `id_column`".to_string()])?;
            let (table, value_column) = match (&self.image_column, &self.text_column, self.table.as_deref()) {
                (Some(image), None, None | Some("images")) => (WebDatasetTable::Images, image.clone()),
                (None, Some(text), None | Some("texts")) => (WebDatasetTable::Texts, text.clone()),
                (Some(_), Some(_), _) => {
                    return Err(vec![
                        "give `image_column` or `text_column`, not both: a node reads one table (use two nodes)".into(),
                    ]);
                }
                (None, None, _) => return Err(vec!["`id_column` needs `image_column` or `text_column`".into()]),
                (_, _, Some(other)) => {
                    return Err(vec![format!("a column mapping makes an `images` or `texts` table, not `{other}`")]);
                }
            };
            if id_column == value_column {
                return Err(vec![format!("`id_column` and the value column are both `{id_column}`")]);
            }
            let source = MappedParquetSource {
                paths: cx.files(&self.paths)?,
                table,
                id_column,
                value_column,
                dedupe: self.dedupe,
            };
            source.check()?;
            Ok(Operator::Source(Box::new(source)))
        };
        Some(build())
    }
}

impl NodeConfig for ParquetConfig {
    const KIND: &'static str = "parquet";
    const ROLE: Role = Role::Source;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        use cnclip_schemas::columns::{IMAGE_ID, TEXT_ID};
        if let Some(mapped) = self.mapped(cx) {
            return mapped;
        }
        let contract = match self.table.as_deref() {
            None => None,
            Some(name) => Some((
                name,
                crate::spec::contract(name).ok_or_else(|| vec![format!("unknown table contract `{name}`")])?,
            )),
        };
        let dedupe = match (self.dedupe, self.table.as_deref()) {
            (false, _) => None,
            (true, Some("images")) => Some((IMAGE_ID, "image")),
            (true, Some("texts")) => Some((TEXT_ID, "text")),
            (true, _) => return Err(vec!["`dedupe` needs `table = \"images\"` or `table = \"texts\"`".into()]),
        };
        let mut source = ParquetSource::open(cx.files(&self.paths)?, contract)?;
        source.dedupe = dedupe;
        Ok(Operator::Source(Box::new(source)))
    }
}
