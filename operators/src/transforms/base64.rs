//! `decode_base64`: `images_base64` (cn_clip's TSV and LMDB form) → `images` (the encoded image
//! bytes). Other columns pass through.

use std::sync::Arc;

use arrow::array::{Array, BinaryArray, BinaryBuilder};
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use cnclip_schemas::columns::{IMAGE, IMAGE_BASE64, IMAGE_ID};

use super::{Output, Transform, id_text, rebuild, replace_field, require};
use crate::decoders::base64::decode_into;
use crate::error::Result;
use crate::quarantine::Rejected;

pub struct DecodeBase64;

impl Transform for DecodeBase64 {
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, String> {
        let index = require(input, IMAGE_BASE64, &DataType::Binary)?;
        Ok(replace_field(input, index, Field::new(IMAGE, DataType::Binary, false)))
    }

    fn apply(&self, batch: &RecordBatch, source: &str) -> Result<Output> {
        let schema = self.output_schema(&batch.schema()).map_err(crate::error::Error::Internal)?;
        let index = batch.schema().index_of(IMAGE_BASE64).expect("checked by output_schema");
        let id_column = batch.schema().index_of(IMAGE_ID).ok();
        let values = batch.column(index).as_any().downcast_ref::<BinaryArray>().expect("checked by output_schema");
        let mut out = BinaryBuilder::with_capacity(values.len(), values.value_data().len() / 4 * 3);
        let (mut scratch, mut decoded) = (Vec::new(), Vec::new());
        let (mut keep, mut rejected) = (Vec::with_capacity(values.len()), Vec::new());
        for row in 0..values.len() {
            match decode_into(values.value(row), &mut scratch, &mut decoded) {
                Ok(()) if !decoded.is_empty() => {
                    out.append_value(&decoded);
                    keep.push(row as u32);
                }
                result => {
                    let id = id_text(batch, id_column, row);
                    rejected.push(Rejected {
                        source: source.to_string(),
                        location: format!("image {}", id.as_deref().unwrap_or("?")),
                        id,
                        reason: result.err().unwrap_or_else(|| "empty image value".into()),
                    });
                }
            }
        }
        let batch = rebuild(batch, schema, index, &keep, Arc::new(out.finish()))?;
        Ok(Output { batch, rejected })
    }
}
