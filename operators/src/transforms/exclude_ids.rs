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
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use schemars::JsonSchema;
use serde::Deserialize;
use std::sync::Arc;

pub struct ExcludeIds {
    /// The input's id column: `image_id` or `text_id`.
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

/// any table → the rows whose `column` id is not in the `id` column of the Parquet `tables`.
///
/// A resumed job's finished parts are such tables.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExcludeIdsConfig {
    /// The input's id column (`image_id`, `text_id`).
    pub column: String,
    /// Parquet files (globs) with an int64 `id` column; none excludes nothing.
    pub tables: Vec<String>,
}

impl NodeConfig for ExcludeIdsConfig {
    const KIND: &'static str = "exclude_ids";
    const ROLE: Role = Role::Transform;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let tables = if self.tables.is_empty() { Vec::new() } else { cx.files(&self.tables)? };
        let exclude =
            ExcludeIds::open(&self.column, &tables, cnclip_schemas::columns::ID).map_err(|e| vec![e.to_string()])?;
        Ok(Operator::Transform(Arc::new(exclude)))
    }
}
