//! cn_clip's image shards: `image_id<TAB>base64` lines. Encoded images (`images`) are written
//! with `base64.urlsafe_b64encode`'s alphabet and padding, as cn_clip's README makes them;
//! `images_base64` rows are written as they are.

use arrow::array::{Array, BinaryArray, Int64Array};
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE;
use cnclip_schemas::columns::{IMAGE, IMAGE_BASE64, IMAGE_ID};

use super::{AtomicFile, Sink, Staged, Written};
use crate::error::{Error, Result};
use crate::spec::{BuildContext, NodeConfig, Operator, Role, SinkSpec};
use crate::transforms::{InputError, require};
use arrow::datatypes::SchemaRef;
use schemars::JsonSchema;
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub struct TsvSink {
    file: AtomicFile,
    rows: u64,
    line: Vec<u8>,
}

/// Which image column a batch carries: `(index, already base64)`.
fn image_column(schema: &Schema) -> Result<(usize, bool), InputError> {
    match (schema.index_of(IMAGE), schema.index_of(IMAGE_BASE64)) {
        (Ok(_), _) => Ok((require(schema, IMAGE, &DataType::Binary)?, false)),
        (_, Ok(_)) => Ok((require(schema, IMAGE_BASE64, &DataType::Binary)?, true)),
        _ => Err(InputError::Mismatch(format!(
            "needs an `{IMAGE}` or `{IMAGE_BASE64}` column; the input has {}",
            crate::transforms::column_list(schema)
        ))),
    }
}

impl TsvSink {
    /// Checks that batches of `schema` can be written.
    ///
    /// # Errors
    /// Which columns are missing.
    pub fn accepts(schema: &Schema) -> Result<(), InputError> {
        require(schema, IMAGE_ID, &DataType::Int64)?;
        image_column(schema).map(|_| ())
    }

    /// # Errors
    /// IO errors creating the temporary file.
    pub fn create(path: &std::path::Path) -> Result<Self> {
        Ok(TsvSink { file: AtomicFile::create(path)?, rows: 0, line: Vec::new() })
    }
}

impl Sink for TsvSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let schema = batch.schema();
        let (index, encoded) = image_column(&schema).map_err(|e| Error::Internal(e.to_string()))?;
        let ids = batch.column(schema.index_of(IMAGE_ID)?);
        let ids =
            ids.as_any().downcast_ref::<Int64Array>().ok_or_else(|| Error::Internal("image_id is not Int64".into()))?;
        let values = batch
            .column(index)
            .as_any()
            .downcast_ref::<BinaryArray>()
            .ok_or_else(|| Error::Internal("image is not Binary".into()))?;
        for row in 0..batch.num_rows() {
            self.line.clear();
            self.line.extend_from_slice(ids.value(row).to_string().as_bytes());
            self.line.push(b'\t');
            if encoded {
                self.line.extend_from_slice(values.value(row));
            } else {
                let start = self.line.len();
                self.line.resize(start + values.value(row).len().div_ceil(3) * 4, 0);
                let n = URL_SAFE
                    .encode_slice(values.value(row), &mut self.line[start..])
                    .map_err(|e| Error::Internal(e.to_string()))?;
                self.line.truncate(start + n);
            }
            self.line.push(b'\n');
            self.file.write_all(&self.line)?;
        }
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(Written, Staged)> {
        let path = self.file.path.clone();
        Ok((Written { rows: self.rows, path }, self.file.finish()?))
    }
}

/// image or image_base64 → cn_clip's `image_id<TAB>base64` lines at `path` (URL-safe base64).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteTsvConfig {
    /// The output file.
    pub path: PathBuf,
}

impl NodeConfig for WriteTsvConfig {
    const KIND: &'static str = "write_tsv";
    const ROLE: Role = Role::Sink;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        Ok(Operator::Sink(Box::new(WriteTsvConfig { path: cx.resolve(&self.path) })))
    }
}

impl SinkSpec for WriteTsvConfig {
    fn path(&self) -> &Path {
        &self.path
    }
    fn accepts(&self, schema: &SchemaRef) -> Result<(), Vec<String>> {
        TsvSink::accepts(schema).map_err(|e| vec![e.to_string()])
    }
    fn open(&self, _: &SchemaRef) -> Result<Box<dyn Sink>> {
        Ok(Box::new(TsvSink::create(&self.path)?))
    }
}
