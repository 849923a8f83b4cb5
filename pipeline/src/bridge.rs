//! Bridges between async nodes and blocking work: a source reading files on its own thread and a
//! sink writing on its own thread (transforms run through [`crate::executor`]).
//!
//! Each bridge is owned by its node's future. When the graph is dropped or stops on an error,
//! the node's end of the bridge is dropped, and the thread notices at its next hand-over
//! ([`Closed`]) and returns: nothing outlives the graph by more than one batch of work.

use tokio::sync::{mpsc, oneshot};

use crate::edge::{Batch, Closed};
use crate::error::BoxError;
use crate::graph::NodeContext;

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
    let (tx, rx) = mpsc::channel::<T>(2);
    let (done_tx, done) = oneshot::channel();
    let thread = std::thread::Builder::new().name(format!("cnclip-{}", ctx.name)).spawn(move || {
        let mut emit = |batch: T| tx.blocking_send(batch).map_err(|_| Closed);
        let result = produce(&mut emit);
        let _ = done_tx.send(result);
    })?;
    // Owns the channel end and the thread: however this future ends (even dropped), the
    // channel closes first and the thread is joined.
    let mut guard = Joined { end: Some(rx), thread: Some(thread) };
    let rx = guard.end.as_mut().expect("set above");
    while let Some(batch) = rx.recv().await {
        if ctx.send(batch).await.is_err() {
            break; // every consumer has stopped
        }
    }
    drop(guard); // closes the channel: a producer still emitting sees Closed
    match done.await {
        Ok(result) => result,
        Err(_) => Err(format!("node `{}`: its reader thread panicked", ctx.name).into()),
    }
}

/// A channel end and the thread on its other side. Dropped, it closes the end, then joins the
/// thread — so no thread outlives the node that started it, even when the graph is aborted.
struct Joined<E> {
    end: Option<E>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<E> Drop for Joined<E> {
    fn drop(&mut self) {
        self.end.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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
    // `None` marks the end of the input: only then is `finish` called. A channel closed without
    // it means the graph was stopped, and the state is dropped unfinished.
    let (tx, mut rx) = mpsc::channel::<Option<T>>(1);
    let (done_tx, mut done) = oneshot::channel();
    let mut consume = consume;
    let thread = std::thread::Builder::new().name(format!("cnclip-{}", ctx.name)).spawn(move || {
        let result = (|| {
            loop {
                match rx.blocking_recv() {
                    Some(Some(batch)) => consume(&mut state, batch)?,
                    Some(None) => return finish(state).map(Some),
                    None => return Ok(None), // stopped: `state` is dropped unfinished
                }
            }
        })();
        let _ = done_tx.send(result);
    })?;
    let guard = Joined { end: Some(tx), thread: Some(thread) };
    let name = ctx.name.clone();
    let outcome = move |result: Result<Result<Option<R>, BoxError>, _>| -> Result<R, BoxError> {
        match result {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => Err(format!("node `{name}` stopped before its input ended").into()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("node `{name}`: its writer thread panicked").into()),
        }
    };
    loop {
        let tx = guard.end.as_ref().expect("set above");
        // Either side may end first: the input, or the writer with an error.
        let batch = tokio::select! {
            result = &mut done => { drop(guard); return outcome(result) }
            batch = ctx.recv(0) => batch,
        };
        let Some(batch) = batch else { break };
        tokio::select! {
            result = &mut done => { drop(guard); return outcome(result) }
            sent = tx.send(Some(batch)) => if sent.is_err() { break },
        }
    }
    let tx = guard.end.as_ref().expect("set above");
    let _ = tx.send(None).await;
    let result = done.await;
    drop(guard);
    outcome(result)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::WorkerPool;
    use crate::edge::Capacity;
    use crate::executor::map_on_pool;
    use crate::graph::Graph;
    use crate::graph::tests::Rows;

    const CAP: Capacity = Capacity { rows: 8, bytes: 1 << 20 };

    /// A reader thread, an ordered pool map and a writer thread, dropped mid-run: every thread
    /// stops, the writer's `finish` never runs, and the pool keeps the order on a full run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bridged_threads_stop_with_the_graph_and_only_a_complete_run_finishes() {
        let pool = Arc::new(WorkerPool::new(2));
        let build = |limit: Option<usize>,
                     produced: Arc<AtomicUsize>,
                     finished: Arc<AtomicBool>,
                     seen: Arc<std::sync::Mutex<Vec<usize>>>| {
            let mut graph = Graph::new();
            graph.add("reader", &[], CAP, move |ctx: NodeContext<Rows>| async move {
                produce_on_thread(&ctx, move |emit| {
                    let mut i = 0;
                    while limit.is_none_or(|n| i < n) {
                        i += 1;
                        if emit(Rows(i)).is_err() {
                            break;
                        }
                        produced.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                })
                .await
            });
            let pool = pool.clone();
            graph.add("map", &["reader"], CAP, move |mut ctx: NodeContext<Rows>| async move {
                // Later batches finish first: the output must still come in input order.
                let f: Arc<dyn Fn(Rows) -> Result<Rows, BoxError> + Send + Sync> = Arc::new(|r: Rows| {
                    std::thread::sleep(Duration::from_micros(((7 - r.0 % 7) * 50) as u64));
                    Ok(r)
                });
                map_on_pool(&mut ctx, &pool, 4, |b| vec![b], f, |r| Ok(Some(r))).await
            });
            graph.add("writer", &["map"], CAP, move |mut ctx: NodeContext<Rows>| async move {
                let finished = finished.clone();
                consume_on_thread(
                    &mut ctx,
                    seen,
                    |seen, batch: Rows| {
                        seen.lock().unwrap().push(batch.0);
                        Ok(())
                    },
                    move |_| {
                        finished.store(true, Ordering::SeqCst);
                        Ok(())
                    },
                )
                .await
            });
            graph
        };

        // A complete run: everything arrives, in order, and the writer finishes.
        let (produced, finished, seen) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)), Arc::default());
        build(Some(200), produced.clone(), finished.clone(), Arc::clone(&seen)).start().unwrap().wait().await.unwrap();
        assert_eq!(*seen.lock().unwrap(), (1..=200).collect::<Vec<_>>());
        assert!(finished.load(Ordering::SeqCst));

        // An endless run, dropped: the reader thread stops producing, the writer never finishes.
        let (produced, finished, seen) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)), Arc::default());
        let running = build(None, produced.clone(), finished.clone(), seen).start().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(produced.load(Ordering::SeqCst) > 0);
        drop(running);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = produced.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(produced.load(Ordering::SeqCst), after, "the reader thread kept running");
        assert!(!finished.load(Ordering::SeqCst), "a stopped writer must not finish its output");
        assert_eq!(Arc::strong_count(&produced), 1, "the reader thread still holds its state");
    }
}
