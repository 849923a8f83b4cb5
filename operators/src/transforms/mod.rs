//! Transforms: batch → batch functions (base64 and image decoding, preprocessing, tokenizing,
//! and the model encoders other crates add). Rows a transform cannot process come back as
//! [`Rejected`] and the rest of the batch goes on. Each transform says how it runs
//! ([`Transform::execution`]): in small pieces on the CPU worker pool (the default, for these
//! cheap per-row functions), or on device threads that each own a [`TransformReplica`].

pub mod augment;
pub mod base64;
pub mod exclude_ids;
pub mod preprocess;
pub mod require_images;
pub mod tokenize;
pub mod tokenizer;

use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

pub use cnclip_pipeline::Execution;

use crate::error::Result;
use crate::quarantine::Rejected;

/// A batch and the rows it could not carry.
pub struct Output {
    pub batch: RecordBatch,
    pub rejected: Vec<Rejected>,
}

/// Why a transform (or a sink) cannot take an input's schema: which columns it needs. Planning
/// collects one per node, before anything runs, and names the node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// Column `name` is missing; `columns` lists the input's (`columns a, b` or `no columns`).
    #[error("needs a `{name}` column ({data_type}); the input has {columns}")]
    MissingColumn { name: String, data_type: DataType, columns: String },
    #[error("needs column `{name}` to be {expected}, the input's is {found}")]
    ColumnType { name: String, expected: DataType, found: DataType },
    /// The column it adds is there already.
    #[error("the input already has a `{name}` column")]
    ColumnExists { name: String },
    /// Any other mismatch, in the transform's own words (what it needs, what the input has):
    /// transforms outside this crate check what only they know (a model's resolution).
    #[error("{0}")]
    Mismatch(String),
}

pub trait Transform: Send + Sync + 'static {
    /// The schema of its output for an input of `input`.
    ///
    /// # Errors
    /// Which columns it needs.
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, InputError>;

    /// Transforms one batch on the CPU. `source` names where the rows came from, for rejected
    /// records. Every transform that runs on the worker pool (the default [`execution`]) gives
    /// one. A device-only transform (an encoder, `knn`), whose work is done by the replica
    /// [`open_replica`] gives each device, leaves it out: the wiring calls `apply` under
    /// [`Execution::Devices`] only when `open_replica` gives no replica, so the default body,
    /// an error naming the mistake, is never reached by a transform that gives one.
    ///
    /// [`execution`]: Transform::execution
    /// [`open_replica`]: Transform::open_replica
    ///
    /// # Errors
    /// Faults that are not one row's (they stop the job).
    fn apply(&self, batch: &RecordBatch, source: &str) -> Result<Output> {
        let _ = (batch, source);
        Err(crate::Error::Internal(
            "a transform without a CPU apply was run on the CPU (it must give device replicas)".into(),
        ))
    }

    /// How the runtime runs it: by default in pieces of ≤ 32 rows on the CPU worker pool.
    fn execution(&self) -> Execution {
        Execution::default()
    }

    /// Under [`Execution::Devices`], the state device `device` owns (a model moved to it),
    /// built on that device's thread. `None` (the default): [`Transform::apply`] of the shared
    /// transform runs on each device thread.
    ///
    /// # Errors
    /// A device that cannot be used (the job stops naming the replica).
    fn open_replica(&self, device: &str) -> Result<Option<Box<dyn TransformReplica>>> {
        let _ = device;
        Ok(None)
    }
}

/// One device's share of a transform under [`Execution::Devices`]: owned by that device's
/// thread for the whole job, so it may hold state that is `Send` but not `Sync` (tch tensors).
pub trait TransformReplica: Send {
    /// Transforms one batch of at most the execution's `batch_rows` rows.
    ///
    /// # Errors
    /// As [`Transform::apply`].
    fn apply(&mut self, batch: &RecordBatch, source: &str) -> Result<Output>;
}

/// The index of column `name` in `schema` if it has type `data_type`.
pub(crate) fn require(schema: &Schema, name: &str, data_type: &DataType) -> Result<usize, InputError> {
    match schema.index_of(name) {
        Err(_) => Err(InputError::MissingColumn {
            name: name.to_string(),
            data_type: data_type.clone(),
            columns: column_list(schema),
        }),
        Ok(i) if schema.field(i).data_type() != data_type => Err(InputError::ColumnType {
            name: name.to_string(),
            expected: data_type.clone(),
            found: schema.field(i).data_type().clone(),
        }),
        Ok(i) => Ok(i),
    }
}

pub(crate) fn column_list(schema: &Schema) -> String {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    if names.is_empty() { "no columns".into() } else { format!("columns {}", names.join(", ")) }
}

/// `input` with column `index` replaced by `field` (other columns and metadata kept).
pub(crate) fn replace_field(input: &Schema, index: usize, field: Field) -> SchemaRef {
    let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields[index] = field;
    Arc::new(Schema::new_with_metadata(fields, input.metadata().clone()))
}

/// Keeps the rows of `batch` at `keep` (ascending) and puts `column` at `index`.
pub(crate) fn rebuild(
    batch: &RecordBatch,
    schema: SchemaRef,
    index: usize,
    keep: &[u32],
    column: ArrayRef,
) -> Result<RecordBatch> {
    let all_kept = keep.len() == batch.num_rows();
    let indices = arrow::array::UInt32Array::from(keep.to_vec());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (i, array) in batch.columns().iter().enumerate() {
        if i == index {
            columns.push(column.clone());
        } else if all_kept {
            columns.push(array.clone());
        } else {
            columns.push(arrow::compute::take(array, &indices, None)?);
        }
    }
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// The rejection of image row `row` of `batch`: located by its file when the rows came from
/// files (an image folder's `path`, relative to the folder), else by its `image_id`.
pub(crate) fn reject_image(batch: &RecordBatch, row: usize, source: &str, reason: String) -> Rejected {
    let column = |name: &str| batch.schema().index_of(name).ok().map(|i| batch.column(i).clone());
    let id = column(cnclip_schemas::columns::IMAGE_ID)
        .and_then(|ids| ids.as_any().downcast_ref::<arrow::array::Int64Array>().map(|ids| ids.value(row).to_string()));
    let path = column(cnclip_schemas::columns::PATH).and_then(|paths| {
        paths.as_any().downcast_ref::<arrow::array::StringArray>().map(|paths| paths.value(row).to_string())
    });
    let location = match path {
        Some(path) => path,
        None => format!("image {}", id.as_deref().unwrap_or("?")),
    };
    Rejected { source: source.to_string(), location, id, reason }
}
