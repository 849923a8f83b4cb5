//! Pipelines that stream out: the caller consumes a node's output batches instead of a file
//! sink writing them — a trainer's data loader, a notebook, a test. The contract is
//! DataFusion's `SendableRecordBatchStream`'s: nothing is buffered beyond one batch (a caller
//! that stops reading holds the graph back like a slow sink), an error comes as an `Err` item
//! and ends the stream, and dropping the stream cancels the whole graph and leaves no output
//! behind. File sinks and the quarantine of a streamed pipeline are committed when the stream
//! has been read to its end.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;

use super::plan::Pipeline;
use super::report::Report;
use super::wire::runtime;
use crate::error::{Error, Result};

type Completion = Pin<Box<dyn Future<Output = Result<Report>> + Send>>;

/// A running pipeline's streamed output, on the caller's tokio runtime: a
/// [`futures_core::Stream`] of `Result<RecordBatch>`.
pub struct RecordBatchStream {
    schema: SchemaRef,
    batches: mpsc::Receiver<RecordBatch>,
    /// The graph's completion (every node done, outputs committed) until it has resolved.
    completion: Option<Completion>,
    report: Option<Report>,
    ended: bool,
}

impl RecordBatchStream {
    /// The schema of every batch.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// What the pipeline did, once the stream has ended without an error.
    pub fn report(&self) -> Option<&Report> {
        self.report.as_ref()
    }
}

impl futures_core::Stream for RecordBatchStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        // A caught Ctrl-C or SIGTERM ends the stream at its next batch, whatever the consumer
        // does between batches (a training step), so no job polls for signals by hand.
        if let Some(signal) = crate::signals::interrupted() {
            this.ended = true;
            return Poll::Ready(Some(Err(Error::Interrupted { signal })));
        }
        // The graph's end first: a failing node ends the stream at once, even while batches
        // from other branches are still queued.
        if let Some(completion) = this.completion.as_mut()
            && let Poll::Ready(result) = completion.as_mut().poll(cx)
        {
            this.completion = None;
            match result {
                Ok(report) => this.report = Some(report),
                Err(e) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
        match this.batches.poll_recv(cx) {
            Poll::Ready(Some(batch)) => Poll::Ready(Some(Ok(batch))),
            // Every batch is out; the end is reported once the graph has completed.
            Poll::Ready(None) if this.completion.is_none() => {
                this.ended = true;
                // A signal that came while the last batches were awaited: the consumer must not
                // take the stream for whole and go on to write its results.
                match crate::signals::interrupted() {
                    Some(signal) => Poll::Ready(Some(Err(Error::Interrupted { signal }))),
                    None => Poll::Ready(None),
                }
            }
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

/// A running pipeline's streamed output for code without a runtime (a training loop's
/// thread): an iterator of `Result<RecordBatch>` that owns the runtime the graph runs on.
/// Dropped early, it cancels the graph and returns once every one of its threads has been
/// joined and its staged outputs removed.
pub struct PipelineStream {
    // Dropped first: the graph is cancelled, then the runtime shut down (joining every task).
    stream: RecordBatchStream,
    runtime: tokio::runtime::Runtime,
}

impl PipelineStream {
    pub fn schema(&self) -> SchemaRef {
        self.stream.schema()
    }

    /// What the pipeline did, once the stream has ended without an error.
    pub fn report(&self) -> Option<&Report> {
        self.stream.report()
    }
}

impl Iterator for PipelineStream {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let stream = &mut self.stream;
        self.runtime.block_on(std::future::poll_fn(|cx| futures_core::Stream::poll_next(Pin::new(&mut *stream), cx)))
    }
}

impl Pipeline {
    /// Starts the pipeline on the current tokio runtime; the node named by
    /// [`Planner::stream`](super::Planner::stream) comes out as the returned stream.
    ///
    /// # Errors
    /// When the pipeline streams no node, or it cannot start.
    pub fn stream_async(self) -> Result<RecordBatchStream> {
        let schema = self
            .stream_schema()
            .ok_or_else(|| Error::Internal("the pipeline streams no node (plan it with Planner::stream)".into()))?;
        let (tx, batches) = mpsc::channel(1);
        let started = self.start(Some(tx))?;
        Ok(RecordBatchStream {
            schema,
            batches,
            completion: Some(Box::pin(started.complete())),
            report: None,
            ended: false,
        })
    }

    /// Starts the pipeline on a runtime of its own and returns its streamed node's batches as
    /// an iterator.
    ///
    /// # Errors
    /// As [`Pipeline::stream_async`].
    pub fn stream(self) -> Result<PipelineStream> {
        let runtime = runtime()?;
        let stream = {
            let _entered = runtime.enter();
            self.stream_async()?
        };
        Ok(PipelineStream { stream, runtime })
    }
}
