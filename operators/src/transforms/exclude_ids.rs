//! `exclude_ids`: drops the rows whose id is already in some Parquet tables — what a resumed
//! job uses to skip the records its finished parts hold, before any of them is decoded. The
//! rows are dropped silently (they are done, not bad), and the order of the others is kept.

use std::path::PathBuf;

use arrow::array::{AsArray, BooleanArray};
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use arrow::record_batch::RecordBatch;
use rustc_hash::FxHashSet;

use super::require_images::read_ids;
use super::{InputError, Output, Transform, require};
use crate::error::Result;

pub struct ExcludeIds {
    /// The input's id column (`image_id`, `text_id`).
    pub column: String,
    ids: FxHashSet<i64>,
}

impl ExcludeIds {
    /// The ids of column `table_column` of every table in `tables`, excluded from the input's
    /// `column`.
    ///
    /// # Errors
    /// A table that cannot be read, or lacks the column, named.
    pub fn open(column: &str, tables: &[PathBuf], table_column: &str) -> Result<Self> {
        let mut ids = FxHashSet::default();
        for table in tables {
            read_ids(table, table_column, &mut ids)?;
        }
        Ok(ExcludeIds { column: column.to_string(), ids })
    }

    /// How many ids are excluded.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl Transform for ExcludeIds {
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, InputError> {
        require(input, &self.column, &DataType::Int64)?;
        Ok(input.clone())
    }

    fn apply(&self, batch: &RecordBatch, _: &str) -> Result<Output> {
        let ids = batch.column_by_name(&self.column).expect("checked by output_schema").as_primitive::<Int64Type>();
        let keep: BooleanArray = ids.values().iter().map(|id| Some(!self.ids.contains(id))).collect();
        let batch = arrow::compute::filter_record_batch(batch, &keep)?;
        Ok(Output { batch, rejected: Vec::new() })
    }
}
