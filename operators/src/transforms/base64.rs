//! `decode_base64`: `images_base64` (cn_clip's TSV and LMDB form) → `images` (the encoded image
//! bytes). Other columns pass through.

use std::sync::Arc;

use arrow::array::{Array, BinaryArray, BinaryBuilder};
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use cnclip_schemas::columns::{IMAGE, IMAGE_BASE64};

use super::{InputError, Output, Transform, rebuild, reject_image, replace_field, require};
use crate::decoders::base64::{Base64Error, decode_into};
use crate::error::Result;
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use schemars::JsonSchema;
use serde::Deserialize;

pub struct DecodeBase64;

impl Transform for DecodeBase64 {
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, InputError> {
        let index = require(input, IMAGE_BASE64, &DataType::Binary)?;
        Ok(replace_field(input, index, Field::new(IMAGE, DataType::Binary, false)))
    }

    fn apply(&self, batch: &RecordBatch, source: &str) -> Result<Output> {
        let schema = self.output_schema(&batch.schema()).map_err(|e| crate::error::Error::Internal(e.to_string()))?;
        let index = batch.schema().index_of(IMAGE_BASE64).expect("checked by output_schema");
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
                    let reason = result.err().unwrap_or(Base64Error::Empty);
                    rejected.push(reject_image(batch, row, source, reason.to_string()));
                }
            }
        }
        let batch = rebuild(batch, schema, index, &keep, Arc::new(out.finish()))?;
        Ok(Output { batch, rejected })
    }
}

/// image_base64 → image (either base64 alphabet, padded or not); bad base64 quarantined.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecodeBase64Config {}

impl NodeConfig for DecodeBase64Config {
    const KIND: &'static str = "decode_base64";
    const ROLE: Role = Role::Transform;
    fn build(self, _: &BuildContext) -> Result<Operator, Vec<String>> {
        Ok(Operator::Transform(Arc::new(DecodeBase64)))
    }
}
