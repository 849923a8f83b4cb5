//! Wiring and running: a validated [`Pipeline`] becomes a `Graph<RecordBatch>` on the runtime.
//! Sources read on threads of their own, transforms run as their [`Execution`] says (pieces on
//! the worker pool, or replicas on device threads), sinks write on threads of their own, and a
//! streamed node's batches go to the caller. Outputs are staged: only when every node has
//! succeeded are the quarantine and the sinks' files moved into place.

use std::sync::{Arc, Mutex};

use arrow::record_batch::RecordBatch;
use cnclip_pipeline::bridge::{consume_on_thread, produce_on_thread};
use cnclip_pipeline::executor::{map_on_devices, map_on_pool};
use cnclip_pipeline::{
    BoxError, Capacity, Execution, Graph, NodeContext, OpenReplica, Progress, RunningGraph, WorkerPool,
};
use tokio::sync::mpsc;

use super::plan::Pipeline;
use super::registry::{Operator, SinkContext, SinkSpec};
use super::report::Report;
use crate::error::{Error, Result};
use crate::quarantine::{NodeQuarantine, Quarantine};
use crate::sinks::{Committed, Staged, Written};
use crate::sources::ReadContext;
use crate::transforms::{Output, Transform};

/// Each finished sink's output, staged until the whole job has succeeded.
type Finished = Arc<Mutex<Vec<(String, Written, Staged)>>>;

/// A started pipeline: its graph, and what must be committed when it ends well.
pub(crate) struct Started {
    running: RunningGraph,
    quarantine: Arc<Quarantine>,
    finished: Finished,
    progress: Arc<Progress>,
}

impl Pipeline {
    /// Runs the pipeline to completion on a runtime of its own.
    ///
    /// # Errors
    /// The first node error (naming the node and the record), or a structural fault.
    ///
    /// Once the process catches SIGINT/SIGTERM ([`crate::signals::catch_interrupts`]), a signal
    /// cancels the graph: every task is dropped and every thread joined (so staged outputs and
    /// temporary files are gone) before [`Error::Interrupted`] is returned.
    pub fn run(self) -> Result<Report> {
        let runtime = runtime()?;
        let result = runtime.block_on(async move {
            if !crate::signals::catching() {
                return self.run_async().await;
            }
            tokio::select! {
                report = self.run_async() => report,
                signal = crate::signals::until_interrupted() => Err(Error::Interrupted { signal }),
            }
        });
        // Shutting the runtime down drops every cancelled task, which joins its threads.
        drop(runtime);
        result
    }

    /// Runs the pipeline on the current tokio runtime.
    ///
    /// # Errors
    /// As [`Pipeline::run`]; also when the pipeline streams a node (use [`Pipeline::stream`]).
    pub async fn run_async(self) -> Result<Report> {
        if let Some(node) = &self.stream {
            return Err(Error::Internal(format!("the pipeline streams node `{node}`: consume it with stream()")));
        }
        self.start(None)?.complete().await
    }

    /// Wires the graph and starts every node; `stream` receives the streamed node's batches.
    pub(crate) fn start(self, stream: Option<mpsc::Sender<RecordBatch>>) -> Result<Started> {
        let pool = Arc::new(WorkerPool::new(self.settings.threads));
        let (shard, batch_rows) = (self.shard, self.settings.batch_rows);
        let finished: Finished = Arc::default();
        // Progress counts the records the sources read; the total (for an ETA) is known when
        // every source can estimate its own.
        let estimates: Option<u64> = self
            .nodes
            .iter()
            .filter_map(|n| match &n.op {
                Operator::Source(source) => Some(source.estimated_records()),
                _ => None,
            })
            .sum();
        let progress = Arc::new(Progress::new("cnclip", estimates.map(|total| total.div_ceil(self.shard.count))));
        let quarantine = Quarantine::new(self.settings.on_error, self.settings.quarantine.clone());
        let quarantine = Arc::new(quarantine.reporting_to(progress.clone()));
        let mut graph: Graph<RecordBatch> = Graph::new();
        let capacity = Capacity { rows: 4 * self.settings.batch_rows.max(64), bytes: 64 << 20 };
        for (rank, node) in self.nodes.into_iter().enumerate() {
            let name = node.name.clone();
            let inputs: Vec<&str> = node.input.as_deref().into_iter().collect();
            match node.op {
                Operator::Source(source) => {
                    let read_ctx = ReadContext { shard, batch_rows, quarantine: quarantine.node(rank) };
                    let progress = progress.clone();
                    graph.add(&name, &inputs, capacity, move |ctx: NodeContext<RecordBatch>| async move {
                        produce_on_thread(&ctx, move |emit| {
                            let mut emit = |batch: RecordBatch| {
                                progress.add(batch.num_rows() as u64);
                                progress.add_bytes(data_bytes(&batch));
                                emit(batch).map_err(|_| Error::Stopped)
                            };
                            match source.read(&read_ctx, &mut emit) {
                                Ok(()) | Err(Error::Stopped) => Ok(()),
                                Err(e) => Err(e.into()),
                            }
                        })
                        .await
                    });
                }
                Operator::Transform(transform) => {
                    let run = TransformRun {
                        transform,
                        pool: pool.clone(),
                        quarantine: quarantine.node(rank),
                        origin: self.origins[&name].clone(),
                    };
                    graph.add(&name, &inputs, capacity, move |ctx: NodeContext<RecordBatch>| run.run(ctx));
                }
                Operator::Sink(spec) => {
                    let schema = self.schemas[&name].clone();
                    let (finished, sink_name) = (finished.clone(), name.clone());
                    let sink_cx = SinkContext { shard: self.shard };
                    graph.add(&name, &inputs, capacity, move |mut ctx: NodeContext<RecordBatch>| async move {
                        let (written, staged) = write(&mut ctx, spec.as_ref(), &schema, &sink_cx).await?;
                        finished.lock().unwrap_or_else(|e| e.into_inner()).push((sink_name, written, staged));
                        Ok(())
                    });
                }
            }
        }
        if let (Some(node), Some(tx)) = (&self.stream, stream) {
            // The caller's end: one batch in hand at most, so a caller that stops reading holds
            // the graph back like a slow sink.
            graph.add(&format!("{node} (stream)"), &[node], capacity, move |mut ctx: NodeContext<RecordBatch>| {
                async move {
                    while let Some(batch) = ctx.recv(0).await {
                        if tx.send(batch).await.is_err() {
                            break; // the caller dropped the stream
                        }
                    }
                    Ok(())
                }
            });
        }
        let running = graph.start()?;
        Ok(Started { running, quarantine, finished, progress })
    }
}

impl Started {
    /// Waits for every node, then moves the quarantine and every sink's output into place.
    pub(crate) async fn complete(self) -> Result<Report> {
        let Started { running, quarantine, finished, progress } = self;
        let summaries = running.wait().await;
        progress.finish();
        let summaries = summaries?;
        let quarantined = quarantine.count();
        let quarantine = Arc::try_unwrap(quarantine).map_err(|_| Error::Internal("quarantine still shared".into()))?;
        let quarantine_file = quarantine.finish()?;
        // Every node succeeded: now, and only now, the outputs move into place.
        let staged = std::mem::take(&mut *finished.lock().unwrap_or_else(|e| e.into_inner()));
        let mut written = Vec::new();
        let committed = Committed { quarantined: quarantined as u64 };
        for (name, done, staged) in staged {
            staged.commit_with(&committed)?;
            written.push((name, done));
        }
        let counters = &crate::storage::remote::COUNTERS;
        Ok(Report {
            nodes: summaries,
            written,
            quarantined,
            quarantine_file,
            storage_requests: counters.requests.load(std::sync::atomic::Ordering::Relaxed),
            storage_retries: counters.failed_attempts.load(std::sync::atomic::Ordering::Relaxed),
        })
    }
}

/// The bytes of `batch`'s rows (its arrays' data, not their buffers' capacity): what a source
/// read, for the progress lines' bytes/s.
fn data_bytes(batch: &RecordBatch) -> u64 {
    batch.columns().iter().map(|column| column.to_data().get_slice_memory_size().unwrap_or(0) as u64).sum()
}

/// The runtime a pipeline runs on when the caller has none.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cnclip-runtime")
        .enable_time()
        .build()
        .map_err(Error::Start)
}

/// A sink node: opens the output and writes its input on a thread of its own.
async fn write(
    ctx: &mut NodeContext<RecordBatch>,
    spec: &dyn SinkSpec,
    schema: &arrow::datatypes::SchemaRef,
    cx: &SinkContext,
) -> Result<(Written, Staged), BoxError> {
    let sink = spec.open_in(schema, cx)?;
    consume_on_thread(
        ctx,
        sink,
        move |sink, batch: RecordBatch| sink.write(&batch).map_err(Into::into),
        |sink| sink.finish().map_err(Into::into),
    )
    .await
}

/// A transform node and what it shares with the job.
struct TransformRun {
    transform: Arc<dyn Transform>,
    pool: Arc<WorkerPool>,
    quarantine: NodeQuarantine,
    origin: String,
}

impl TransformRun {
    async fn run(self, mut ctx: NodeContext<RecordBatch>) -> Result<(), BoxError> {
        let TransformRun { transform, pool, quarantine, origin } = self;
        // Rejected rows go to the quarantine in input order, on the node's task.
        let after = move |output: Output| -> Result<Option<RecordBatch>, BoxError> {
            for rejected in output.rejected {
                quarantine.reject(rejected)?;
            }
            Ok((output.batch.num_rows() > 0).then_some(output.batch))
        };
        match transform.execution() {
            Execution::Pool { piece_rows } => {
                let workers = pool.size();
                // Small pieces keep every worker busy and the output arriving steadily.
                let split = move |batch: RecordBatch| {
                    let piece = batch.num_rows().div_ceil(workers).clamp(1, piece_rows.max(1));
                    (0..batch.num_rows())
                        .step_by(piece)
                        .map(|at| batch.slice(at, piece.min(batch.num_rows() - at)))
                        .collect()
                };
                let apply: Arc<dyn Fn(RecordBatch) -> Result<Output, BoxError> + Send + Sync> =
                    Arc::new(move |batch: RecordBatch| transform.apply(&batch, &origin).map_err(Into::into));
                map_on_pool(&mut ctx, &pool, 2 * workers, split, apply, after).await
            }
            Execution::Devices { devices, batch_rows } => {
                let open: OpenReplica<RecordBatch, Output> = Arc::new(move |_, device| {
                    let origin = origin.clone();
                    Ok(match transform.open_replica(device)? {
                        Some(mut replica) => {
                            Box::new(move |batch: RecordBatch| replica.apply(&batch, &origin).map_err(Into::into))
                        }
                        None => {
                            let transform = transform.clone();
                            Box::new(move |batch: RecordBatch| transform.apply(&batch, &origin).map_err(Into::into))
                        }
                    })
                });
                map_on_devices(&mut ctx, &devices, batch_rows, open, after).await
            }
        }
    }
}
