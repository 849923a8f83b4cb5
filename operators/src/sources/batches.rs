//! `batches`: rows a job already holds in memory, as a pipeline source — zero-shot's prompts
//! (every template of every class), a test's input — so they go through the same nodes as
//! rows read from files, without a temporary file to write and read back.
//!
//! A job builds the node from typed values ([`BatchesConfig`] with
//! [`NodeDef::new`](crate::spec::NodeDef::new)); it is not registered, since a pipeline file
//! cannot hold the rows. Rows are cut into batches of the pipeline's `batch_rows`, and with
//! `--shard i/n` a shard emits rows `i, i+n, …` as every source does.

use arrow::array::{RecordBatch, UInt64Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::SchemaRef;
use serde::de::Error as _;

use super::{Emit, ReadContext, ShardFilter, Source};
use crate::error::Result;
use crate::spec::{BuildContext, NodeConfig, Operator, Role};

/// rows a job holds in memory → those rows (a job's node: no pipeline file can hold them).
///
/// The rows, all of one schema, and a name for where they come from (quarantine records). Its
/// fields are no pipeline keys (`#[schemars(skip)]`): no pipeline file can give them.
#[derive(Debug, Clone, schemars::JsonSchema)]
pub struct BatchesConfig {
    /// The rows' schema.
    #[schemars(skip)]
    pub schema: SchemaRef,
    /// The rows.
    #[schemars(skip)]
    pub batches: Vec<RecordBatch>,
    /// Where the rows come from, as quarantine records name it.
    #[schemars(skip)]
    pub origin: String,
}

impl<'de> serde::Deserialize<'de> for BatchesConfig {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> std::result::Result<Self, D::Error> {
        Err(D::Error::custom("in-memory batches are handed over by a job: a pipeline file cannot hold them"))
    }
}

impl NodeConfig for BatchesConfig {
    const KIND: &'static str = "batches";
    const ROLE: Role = Role::Source;

    fn build(self, _: &BuildContext) -> std::result::Result<Operator, Vec<String>> {
        let problems: Vec<String> = self
            .batches
            .iter()
            .enumerate()
            .filter(|(_, batch)| batch.schema() != self.schema)
            .map(|(i, batch)| {
                format!("{}: batch {i} has the schema {:?}, not the source's", self.origin, batch.schema())
            })
            .collect();
        if problems.is_empty() { Ok(Operator::Source(Box::new(self))) } else { Err(problems) }
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(self.schema.clone())
    }
}

impl Source for BatchesConfig {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn origin(&self) -> String {
        self.origin.clone()
    }

    fn estimated_records(&self) -> Option<u64> {
        Some(self.batches.iter().map(|b| b.num_rows() as u64).sum())
    }

    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()> {
        let mut shard = ShardFilter::new(ctx.shard);
        let mut rows: Vec<u64> = Vec::new();
        for batch in &self.batches {
            rows.clear();
            rows.extend((0..batch.num_rows() as u64).filter(|_| shard.mine()));
            let mine = if rows.len() == batch.num_rows() {
                batch.clone()
            } else {
                take_record_batch(batch, &UInt64Array::from(rows.clone()))?
            };
            let step = ctx.batch_rows.max(1);
            for start in (0..mine.num_rows()).step_by(step) {
                emit(mine.slice(start, step.min(mine.num_rows() - start)))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    use super::*;
    use crate::quarantine::Quarantine;
    use crate::sources::Shard;

    fn ids(values: std::ops::Range<i64>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(values))]).unwrap()
    }

    fn read(config: BatchesConfig, shard: Shard, batch_rows: usize) -> Vec<Vec<i64>> {
        let ctx = ReadContext {
            shard,
            batch_rows,
            quarantine: Arc::new(Quarantine::new(crate::quarantine::OnError::Fail, "unused".into())).node(0),
        };
        let mut out = Vec::new();
        Box::new(config)
            .read(&ctx, &mut |batch| {
                out.push(batch.column(0).as_primitive::<Int64Type>().values().to_vec());
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn rows_come_in_order_in_batches_of_the_pipelines_size_and_by_shard() {
        let config =
            BatchesConfig { schema: ids(0..1).schema(), batches: vec![ids(0..5), ids(5..7)], origin: "t".into() };
        assert_eq!(read(config.clone(), Shard::ALL, 2), [vec![0, 1], vec![2, 3], vec![4], vec![5, 6]]);
        // Ordinals run across batches: rows 1 and 4 of the first; none of 5 and 6.
        assert_eq!(read(config, Shard { index: 1, count: 3 }, 10), [vec![1, 4]]);
    }
}
