//! `discard`: a sink that counts its rows and writes nothing — `> /dev/null` for a pipeline.
//! What a job's upstream nodes cost is then measured without an output format's encoding in
//! it (the benchmarks that compare cnclip's reading and decoding with another reader's), and a
//! pipeline can be run for its quarantine alone.

use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use schemars::JsonSchema;
use serde::Deserialize;

use super::{Sink, Staged, Written};
use crate::error::Result;
use crate::spec::{BuildContext, NodeConfig, Operator, Role, SinkSpec};

/// Where a discarding sink "writes": nothing is opened there.
const NOWHERE: &str = "/dev/null";

struct Discard {
    rows: u64,
}

impl Sink for Discard {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(Written, Staged)> {
        let written = Written { rows: self.rows, path: PathBuf::from(NOWHERE) };
        // Nothing to move into place.
        Ok((written, Staged::with_publish(PathBuf::new(), PathBuf::from(NOWHERE), |_| Ok(()))))
    }
}

/// any table → nothing: its rows are counted (in the job's summary) and dropped.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscardConfig {}

impl NodeConfig for DiscardConfig {
    const KIND: &'static str = "discard";
    const ROLE: Role = Role::Sink;
    fn build(self, _: &BuildContext) -> Result<Operator, Vec<String>> {
        Ok(Operator::Sink(Box::new(self)))
    }
}

impl SinkSpec for DiscardConfig {
    fn path(&self) -> &Path {
        Path::new(NOWHERE)
    }
    fn accepts(&self, _: &SchemaRef) -> Result<(), Vec<String>> {
        Ok(())
    }
    fn open(&self, _: &SchemaRef) -> Result<Box<dyn Sink>> {
        Ok(Box::new(Discard { rows: 0 }))
    }
}
