//! Parquet tables: zstd-compressed, row groups of a bounded number of rows, written to a
//! temporary file beside the target and renamed into place at [`ParquetSink::finish`], so a
//! reader (a notebook, DataFusion) never sees a half-written table. Every batch is checked
//! against the table's contract before it is written. The schema's metadata is also written as
//! Parquet key-value metadata, for readers that do not decode the Arrow schema.

use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use super::Sink;
use crate::error::{Error, Result, io};
use crate::spec::{BuildContext, NodeConfig, Operator, Role, SinkSpec};
use crate::storage;
use schemars::JsonSchema;
use serde::Deserialize;

/// Rows per row group: large enough for good compression and scans, small enough that a
/// writer's buffered group stays well under a gigabyte even for wide feature rows.
pub const ROW_GROUP_ROWS: usize = 64 * 1024;

/// A row group is also closed once this many bytes are buffered (64k rows of 224² pixels would
/// be 9.6 GB): memory stays bounded whatever the row width.
pub const ROW_GROUP_BYTES: usize = 64 << 20;

pub struct ParquetSink {
    writer: Option<ArrowWriter<std::fs::File>>,
    table: String,
    schema: SchemaRef,
    path: PathBuf,
    tmp: PathBuf,
    rows: usize,
}

impl ParquetSink {
    /// Starts table `table` (a contract name, for messages) with `schema` at `path`.
    ///
    /// # Errors
    /// IO errors creating the temporary file.
    pub fn create(path: &Path, table: &str, schema: SchemaRef) -> Result<Self> {
        Self::create_with_row_group_bytes(path, table, schema, ROW_GROUP_BYTES)
    }

    /// As [`ParquetSink::create`], closing row groups at `row_group_bytes` instead of
    /// [`ROW_GROUP_BYTES`]: a writer buffers one group, so this bounds its memory.
    ///
    /// # Errors
    /// IO errors creating the temporary file.
    pub fn create_with_row_group_bytes(
        path: &Path,
        table: &str,
        schema: SchemaRef,
        row_group_bytes: usize,
    ) -> Result<Self> {
        Self::create_with(path, table, schema, row_group_bytes, Compression::ZSTD(ZstdLevel::default()))
    }

    /// As [`ParquetSink::create`], with the column chunks compressed by `compression` (small
    /// tables written uncompressed, as they always were, stay byte for byte what they were).
    ///
    /// # Errors
    /// IO errors creating the temporary file.
    pub fn create_uncompressed(path: &Path, table: &str, schema: SchemaRef) -> Result<Self> {
        Self::create_with(path, table, schema, ROW_GROUP_BYTES, Compression::UNCOMPRESSED)
    }

    fn create_with(
        path: &Path,
        table: &str,
        schema: SchemaRef,
        row_group_bytes: usize,
        compression: Compression,
    ) -> Result<Self> {
        super::create_parent(path)?;
        let tmp = super::tmp_path(path);
        let file = storage::create(&tmp).map_err(io(&tmp))?;
        let props = WriterProperties::builder()
            .set_compression(compression)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_max_row_group_bytes(Some(row_group_bytes))
            .set_key_value_metadata(key_value_metadata(&schema))
            .build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| parquet_err(&tmp, e))?;
        Ok(ParquetSink {
            writer: Some(writer),
            table: table.to_string(),
            schema,
            path: path.to_path_buf(),
            tmp,
            rows: 0,
        })
    }

    /// Appends a batch.
    ///
    /// # Errors
    /// A batch that does not match the table's contract, or a write error.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        cnclip_schemas::check(&self.table, &self.schema, &batch.schema())
            .map_err(|e| Error::Record { location: self.path.display().to_string(), reason: e.to_string() })?;
        let writer = self.writer.as_mut().expect("not finished");
        writer.write(batch).map_err(|e| parquet_err(&self.tmp, e))?;
        self.rows += batch.num_rows();
        Ok(())
    }

    /// Closes the file and moves it into place; returns the rows written.
    ///
    /// # Errors
    /// Write or rename errors (the temporary file is removed).
    pub fn finish(self) -> Result<usize> {
        let rows = self.rows;
        self.close()?.commit()?;
        Ok(rows)
    }

    /// Closes and syncs the file at its temporary path.
    fn close(mut self) -> Result<super::Staged> {
        let staged = super::Staged::new(self.tmp.clone(), self.path.clone());
        let writer = self.writer.take().expect("closed once");
        let file = writer.into_inner().map_err(|e| parquet_err(&self.tmp, e))?;
        file.sync_all().map_err(io(&self.tmp))?;
        Ok(staged)
    }
}

/// The table's schema metadata (a feature table's `cnclip.model`, `cnclip.checkpoint`, …) as
/// Parquet key-value metadata too, sorted by key: the Arrow writer keeps it only inside the
/// serialized Arrow schema (`ARROW:schema`), which readers that are not Arrow-based (duckdb's
/// `parquet_kv_metadata`, parquet-tools, Spark) cannot see. `None` when there is none, so
/// tables without metadata are written as before.
fn key_value_metadata(schema: &SchemaRef) -> Option<Vec<KeyValue>> {
    let mut entries: Vec<KeyValue> =
        schema.metadata().iter().map(|(key, value)| KeyValue::new(key.clone(), value.clone())).collect();
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    (!entries.is_empty()).then_some(entries)
}

impl Drop for ParquetSink {
    fn drop(&mut self) {
        // Dropped unfinished (the job failed or was cancelled): leave nothing behind.
        if self.writer.take().is_some() {
            let _ = storage::remove_file(&self.tmp);
        }
    }
}

impl super::Sink for ParquetSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        ParquetSink::write(self, batch)
    }

    fn finish(self: Box<Self>) -> Result<(super::Written, super::Staged)> {
        let written = super::Written { rows: self.rows as u64, path: self.path.clone() };
        Ok((written, self.close()?))
    }
}

fn parquet_err(path: &Path, source: parquet::errors::ParquetError) -> Error {
    Error::Parquet { path: path.display().to_string(), source }
}

/// any table → a zstd Parquet file at `path` (row groups of at most 64k rows or 64 MiB).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteParquetConfig {
    /// The output file.
    pub path: PathBuf,
}

impl NodeConfig for WriteParquetConfig {
    const KIND: &'static str = "write_parquet";
    const ROLE: Role = Role::Sink;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        Ok(Operator::Sink(Box::new(WriteParquetConfig { path: cx.resolve(&self.path) })))
    }
}

impl SinkSpec for WriteParquetConfig {
    fn path(&self) -> &Path {
        &self.path
    }
    fn accepts(&self, _: &SchemaRef) -> Result<(), Vec<String>> {
        Ok(())
    }
    fn open(&self, schema: &SchemaRef) -> Result<Box<dyn Sink>> {
        let table = self.path.file_stem().unwrap_or_default().to_string_lossy();
        Ok(Box::new(ParquetSink::create(&self.path, &table, schema.clone())?))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{BinaryArray, Int64Array};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;

    fn images(ids: std::ops::Range<i64>) -> RecordBatch {
        let bytes: Vec<Vec<u8>> = ids.clone().map(|i| vec![i as u8; 10]).collect();
        RecordBatch::try_new(
            cnclip_schemas::images(),
            vec![Arc::new(Int64Array::from_iter_values(ids)), Arc::new(BinaryArray::from_iter_values(bytes.iter()))],
        )
        .unwrap()
    }

    #[test]
    fn writes_row_groups_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images.parquet");
        let mut sink = ParquetSink::create(&path, "images", cnclip_schemas::images()).unwrap();
        sink.write(&images(0..50_000)).unwrap();
        assert!(!path.exists(), "the table is visible before it is complete");
        sink.write(&images(50_000..100_000)).unwrap();
        assert_eq!(sink.finish().unwrap(), 100_000);
        let builder = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(builder.metadata().num_row_groups(), 2); // 64k + 36k rows
        let rows: usize = builder.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(rows, 100_000);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [std::ffi::OsString::from("images.parquet")]);
    }

    #[test]
    fn a_batch_off_contract_is_refused_with_the_difference() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = ParquetSink::create(&dir.path().join("t.parquet"), "texts", cnclip_schemas::texts()).unwrap();
        let err = sink.write(&images(0..3)).unwrap_err().to_string();
        assert!(err.contains("table `texts`") && err.contains("missing column `text_id`"), "{err}");
    }
}
