//! The streaming DAG runtime that every cnclip job runs on.
//!
//! Sources, operators and sinks are nodes joined by bounded edges (bounded by rows *and* bytes,
//! since batches vary), so a slow stage pushes back on everything upstream and memory stays
//! flat on billion-row corpora. A running graph owns all of its tasks: dropping it, or the first
//! fatal error, cancels them all. A transform says how it runs ([`Execution`]): in small pieces
//! on the CPU worker pool, or as one replica per device on threads that own them, with
//! batches rebatched to the size the device wants; CPU-heavy work never runs on the reactor.
//!
//! This crate knows nothing about tensors or indexes — it builds without libtorch and FAISS.

pub mod bridge;
pub mod edge;
pub mod error;
pub mod executor;
pub mod graph;
pub mod pool;
pub mod progress;

pub use edge::{Batch, Capacity, Closed};
pub use error::{BoxError, Error, Result};
pub use executor::{Execution, OpenReplica, Rebatch, Replica};
pub use graph::{Graph, Node, NodeContext, NodeSummary, RunningGraph};
pub use pool::WorkerPool;
pub use progress::{Progress, ProgressMode, ProgressSettings};
