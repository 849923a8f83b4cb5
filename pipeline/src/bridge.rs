//! Bridges between async nodes and blocking work: a source reading files on its own thread, a
//! sink writing on its own thread, and an ordered map over a [`WorkerPool`].
//!
//! Each bridge is owned by its node's future. When the graph is dropped or stops on an error,
//! the node's end of the bridge is dropped, and the thread notices at its next hand-over
//! ([`Closed`]) and returns: nothing outlives the graph by more than one batch of work.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::edge::{Batch, Closed};
use crate::error::BoxError;
use crate::graph::NodeContext;
use crate::pool::WorkerPool;

/// Runs `produce` on a thread of its own; every batch it emits goes to the node's outputs.
/// `emit` returns [`Closed`] once nobody downstream wants more: `produce` should then return
/// (its `Ok` is fine — the graph is shutting down).
///
/// # Errors
/// `produce`'s error, or a panic on its thread.
pub async fn produce_on_thread<T, F>(ctx: &NodeContext<T>, produce: F) -> Result<(), BoxError>
where
    T: Batch + Clone,
    F: FnOnce(&mut dyn FnMut(T) -> Result<(), Closed>) -> Result<(), BoxError> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<T>(2);
    let (done_tx, done) = oneshot::channel();
    let thread = std::thread::Builder::new().name(format!("cnclip-{}", ctx.name)).spawn(move || {
        let mut emit = |batch: T| tx.blocking_send(batch).map_err(|_| Closed);
        let result = produce(&mut emit);
        let _ = done_tx.send(result);
    })?;
    while let Some(batch) = rx.recv().await {
        if ctx.send(batch).await.is_err() {
            break; // every consumer has stopped
        }
    }
    drop(rx);
    let result = done.await;
    let _ = thread.join();
    match result {
        Ok(result) => result,
        Err(_) => Err(format!("node `{}`: its reader thread panicked", ctx.name).into()),
    }
}

/// Consumes the node's input `0` on a thread of its own: `consume` is called with each batch
/// in order, then `finish` once the input is exhausted. If the graph stops first, `finish` is
/// never called (a sink then leaves no output behind).
///
/// # Errors
/// The first error of `consume` or `finish`, or a panic on the thread.
pub async fn consume_on_thread<T, S, R>(
    ctx: &mut NodeContext<T>,
    mut state: S,
    consume: impl FnMut(&mut S, T) -> Result<(), BoxError> + Send + 'static,
    finish: impl FnOnce(S) -> Result<R, BoxError> + Send + 'static,
) -> Result<R, BoxError>
where
    T: Batch + Clone,
    S: Send + 'static,
    R: Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<T>(1);
    let (done_tx, mut done) = oneshot::channel();
    let mut consume = consume;
    let thread = std::thread::Builder::new().name(format!("cnclip-{}", ctx.name)).spawn(move || {
        let result = (|| {
            while let Some(batch) = rx.blocking_recv() {
                consume(&mut state, batch)?;
            }
            finish(state)
        })();
        let _ = done_tx.send(result);
    })?;
    let name = ctx.name.clone();
    let panicked = move |_| -> Result<R, BoxError> { Err(format!("node `{name}`: its writer thread panicked").into()) };
    loop {
        // Either side may end first: the input, or the writer with an error.
        let batch = tokio::select! {
            result = &mut done => { let _ = thread.join(); return result.unwrap_or_else(panicked) }
            batch = ctx.recv(0) => batch,
        };
        let Some(batch) = batch else { break };
        tokio::select! {
            result = &mut done => { let _ = thread.join(); return result.unwrap_or_else(panicked) }
            sent = tx.send(batch) => if sent.is_err() { break },
        }
    }
    drop(tx);
    let result = done.await;
    let _ = thread.join();
    result.unwrap_or_else(panicked)
}

type Pending<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Maps each batch of input `0` through `f` on `pool`, keeping up to `in_flight` batches in
/// work at once, and sends the results downstream *in input order*. `split` first cuts each
/// input batch into the pieces that go to the workers (so one large batch still keeps every
/// worker busy). `after` sees each result
/// before it is sent (on the node's task, in order — e.g. to quarantine rejected rows
/// deterministically) and returns what to send, if anything.
///
/// # Errors
/// The first error of `f` or `after`.
pub async fn map_on_pool<T, U>(
    ctx: &mut NodeContext<T>,
    pool: &WorkerPool,
    in_flight: usize,
    mut split: impl FnMut(T) -> Vec<T>,
    f: Arc<dyn Fn(T) -> Result<U, BoxError> + Send + Sync>,
    mut after: impl FnMut(U) -> Result<Option<T>, BoxError>,
) -> Result<(), BoxError>
where
    T: Batch + Clone,
    U: Send + 'static,
{
    let mut pending: VecDeque<Pending<Result<U, BoxError>>> = VecDeque::new();
    let mut pieces: VecDeque<T> = VecDeque::new();
    let in_flight = in_flight.max(1);
    let mut input_open = true;
    while input_open || !pending.is_empty() || !pieces.is_empty() {
        if pending.len() < in_flight {
            if let Some(piece) = pieces.pop_front() {
                let f = f.clone();
                pending.push_back(Box::pin(pool.run(move || f(piece))));
                continue;
            }
            if input_open {
                match ctx.recv(0).await {
                    Some(batch) => pieces.extend(split(batch)),
                    None => input_open = false,
                }
                continue;
            }
        }
        if let Some(next) = pending.pop_front() {
            if let Some(out) = after(next.await?)? {
                if ctx.send(out).await.is_err() {
                    return Ok(()); // every consumer has stopped
                }
            }
        }
    }
    Ok(())
}
