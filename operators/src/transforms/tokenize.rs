//! `tokenize`: adds a `token_ids` column — `cn_clip.clip.tokenize` of the `text` column
//! (`[CLS]`, WordPiece ids, `[SEP]`, zero padding to `context_length`), optionally after the
//! text preprocessing cn_clip's datasets apply (`preprocess = true`: lower-case, curly quotes).
//! Other columns pass through; tokenizing cannot fail, so no row is rejected.

use std::sync::Arc;

use super::tokenizer::{Tokenizer, preprocess_text};
use arrow::array::{Array, FixedSizeListArray, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use cnclip_schemas::columns::{TEXT, TOKEN_IDS};

use super::{InputError, Output, Transform, require};
use crate::error::{Error, Result};
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use schemars::JsonSchema;
use serde::Deserialize;

pub struct Tokenize {
    pub context_length: usize,
    pub preprocess: bool,
}

impl Transform for Tokenize {
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, InputError> {
        require(input, TEXT, &DataType::Utf8)?;
        if input.index_of(TOKEN_IDS).is_ok() {
            return Err(InputError::ColumnExists { name: TOKEN_IDS.to_string() });
        }
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(TOKEN_IDS, cnclip_schemas::token_ids_type(self.context_length), false));
        Ok(Arc::new(Schema::new_with_metadata(fields, input.metadata().clone())))
    }

    fn apply(&self, batch: &RecordBatch, _source: &str) -> Result<Output> {
        let schema = self.output_schema(&batch.schema()).map_err(|e| Error::Internal(e.to_string()))?;
        let texts = batch.column(batch.schema().index_of(TEXT).expect("checked"));
        let texts =
            texts.as_any().downcast_ref::<StringArray>().ok_or_else(|| Error::Internal("text is not Utf8".into()))?;
        let tokenizer = Tokenizer::chinese();
        let mut ids = vec![0i64; texts.len() * self.context_length];
        for (row, out) in ids.chunks_exact_mut(self.context_length).enumerate() {
            let text = texts.value(row);
            let text = if self.preprocess { std::borrow::Cow::Owned(preprocess_text(text)) } else { text.into() };
            tokenizer.encode_into(&text, out)?;
        }
        let DataType::FixedSizeList(item, _) = cnclip_schemas::token_ids_type(self.context_length) else {
            unreachable!()
        };
        let column =
            FixedSizeListArray::try_new(item, self.context_length as i32, Arc::new(Int64Array::from(ids)), None)?;
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(column));
        let batch = RecordBatch::try_new(schema, columns)?;
        Ok(Output { batch, rejected: Vec::new() })
    }
}

/// text → + token_ids, as `cn_clip.clip.tokenize`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    /// Token ids per text, `[CLS]` and `[SEP]` included, from 2 to 4096; longer texts are cut.
    #[serde(default = "default_context_length")]
    pub context_length: usize,
    /// Lower-case and straighten curly quotes first, as cn_clip's datasets do.
    #[serde(default)]
    pub preprocess: bool,
}

fn default_context_length() -> usize {
    super::tokenizer::DEFAULT_CONTEXT_LENGTH
}

impl NodeConfig for TokenizeConfig {
    const KIND: &'static str = "tokenize";
    const ROLE: Role = Role::Transform;
    fn build(self, _: &BuildContext) -> Result<Operator, Vec<String>> {
        if !(2..=4096).contains(&self.context_length) {
            return Err(vec![format!("context_length {} is not between 2 and 4096", self.context_length)]);
        }
        Ok(Operator::Transform(Arc::new(Tokenize { context_length: self.context_length, preprocess: self.preprocess })))
    }
}
