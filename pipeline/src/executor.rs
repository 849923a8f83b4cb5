//! Executors: *how* a transform's work runs, decided by the transform, carried out by the runtime.
//!
//! Two shapes of work meet in one graph. Decoding and resizing are cheap per row and want every
//! core: [`Execution::Pool`] cuts each batch into small pieces for the shared [`WorkerPool`]
//! ([`map_on_pool`]). A model wants the opposite: large batches, on a thread that owns its device
//! for the whole job (libtorch tensors are `Send` but not `Sync`, and a CUDA context belongs to
//! a thread). [`Execution::Devices`] gives each device one thread holding a [`Replica`] built on
//! that thread, feeds them from one bounded queue with batches rebatched to a target row count,
//! and puts the results back in input order ([`map_on_devices`]). Either way a slow stage holds
//! back its input edge (backpressure), an error or a panic stops the graph naming the node (and
//! the replica), and dropping the node's future joins every thread it started.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;

use crate::edge::Batch;
use crate::error::{BoxError, Error};
use crate::graph::NodeContext;
use crate::pool::WorkerPool;

/// How a transform runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Execution {
    /// Pieces of at most `piece_rows` rows on the shared CPU worker pool (decode, resize,
    /// tokenize): every core busy, output arriving steadily.
    Pool { piece_rows: usize },
    /// One thread per device (`"cuda:0"`, `"cpu"`, …), each owning a replica built on it, fed
    /// batches of `batch_rows` rows (the last may be smaller) from one bounded queue.
    Devices { devices: Vec<String>, batch_rows: usize },
}

impl Default for Execution {
    fn default() -> Self {
        Execution::Pool { piece_rows: 32 }
    }
}

/// Batches that can be cut and joined, so an executor can rebatch a stream to the size a
/// device wants.
pub trait Rebatch: Batch + Clone {
    /// Rows `offset..offset + len`.
    fn slice(&self, offset: usize, len: usize) -> Self;
    /// The rows of `parts`, in order, as one batch (`parts` is never empty).
    ///
    /// # Errors
    /// Parts that cannot be joined (different schemas).
    fn concat(parts: Vec<Self>) -> Result<Self, BoxError>;
}

impl Rebatch for RecordBatch {
    fn slice(&self, offset: usize, len: usize) -> Self {
        RecordBatch::slice(self, offset, len)
    }

    fn concat(mut parts: Vec<Self>) -> Result<Self, BoxError> {
        if parts.len() == 1 {
            return Ok(parts.pop().expect("one part"));
        }
        Ok(arrow::compute::concat_batches(&parts[0].schema(), &parts)?)
    }
}

/// The state one device owns for a whole job (a model replica, a CUDA stream), built on the
/// device's own thread and used only there.
pub trait Replica<T, U>: Send {
    /// Processes one batch of at most the target batch size.
    ///
    /// # Errors
    /// A fault that stops the job (row-level problems belong in `U`).
    fn process(&mut self, batch: T) -> Result<U, BoxError>;
}

impl<T, U, F: FnMut(T) -> Result<U, BoxError> + Send> Replica<T, U> for F {
    fn process(&mut self, batch: T) -> Result<U, BoxError> {
        self(batch)
    }
}

/// Builds the replica for device number `index` (named `device`), on that device's thread.
pub type OpenReplica<T, U> = Arc<dyn Fn(usize, &str) -> Result<Box<dyn Replica<T, U>>, BoxError> + Send + Sync>;

/// What a replica thread sends back: that it started, the result of job `seq`, or its failure.
enum Done<U> {
    Started,
    Job(u64, U),
    Failed(usize, BoxError),
}

/// Runs `open`'s replicas, one thread per entry of `devices`, over input `0` of the node: rows
/// are rebatched to `batch_rows`, each batch goes to whichever replica is free, and `after` sees
/// the results in input order (on the node's task) and returns what to send downstream. At most
/// two batches per replica are queued, in work or waiting for an earlier one to finish; past
/// that the node stops reading its input (so a stuck replica holds everything back, boundedly).
///
/// # Errors
/// [`Error::Replica`] naming the replica and device whose `open` or `process` failed or
/// panicked, or the first error of `after`. Every replica thread is joined before it returns,
/// and also when the future is dropped (a replica finishes the batch in hand first).
pub async fn map_on_devices<T, U>(
    ctx: &mut NodeContext<T>,
    devices: &[String],
    batch_rows: usize,
    open: OpenReplica<T, U>,
    mut after: impl FnMut(U) -> Result<Option<T>, BoxError>,
) -> Result<(), BoxError>
where
    T: Rebatch,
    U: Send + 'static,
{
    if devices.is_empty() {
        return Err(format!("node `{}` has no device to run on", ctx.name).into());
    }
    let batch_rows = batch_rows.max(1);
    // Batches handed out and not yet sent on, counting results that wait for an earlier one:
    // a stuck replica stops the others after this many, so memory stays bounded.
    let window = 2 * devices.len() as u64;
    let (jobs_tx, jobs_rx) = crossbeam::channel::unbounded::<(u64, T)>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done<U>>();
    let stop = Arc::new(AtomicBool::new(false));
    let mut replicas = Replicas { jobs: Some(jobs_tx), stop: stop.clone(), threads: Vec::new() };
    for (index, device) in devices.iter().enumerate() {
        let (jobs, done, stop, open, device) =
            (jobs_rx.clone(), done_tx.clone(), stop.clone(), open.clone(), device.clone());
        let thread = std::thread::Builder::new()
            .name(format!("cnclip-{}-{index}", ctx.name))
            .spawn(move || run_replica(index, &device, open, jobs, done, stop))?;
        replicas.threads.push(thread);
    }
    drop((jobs_rx, done_tx));
    let fail = |index: usize, source: BoxError| -> BoxError {
        Box::new(Error::Replica { replica: index, device: devices[index].clone(), source })
    };
    // Every replica must start (load its model, claim its device) before any work is handed
    // out: a device that cannot start fails the job whatever the others could have done.
    for _ in devices {
        match done_rx.recv().await {
            Some(Done::Started) => {}
            Some(Done::Failed(index, source)) => return Err(fail(index, source)),
            Some(Done::Job(..)) | None => return Err(format!("node `{}`: a replica stopped", ctx.name).into()),
        }
    }

    let mut buffered: VecDeque<T> = VecDeque::new();
    let mut buffered_rows = 0;
    let mut input_open = true;
    let (mut next_job, mut next_out) = (0u64, 0u64);
    let mut finished: BTreeMap<u64, U> = BTreeMap::new();
    loop {
        while let Some(result) = finished.remove(&next_out) {
            next_out += 1;
            if let Some(out) = after(result)?
                && ctx.send(out).await.is_err()
            {
                return Ok(()); // every consumer has stopped
            }
        }
        while next_job - next_out < window && (buffered_rows >= batch_rows || (!input_open && buffered_rows > 0)) {
            let batch = take_rows(&mut buffered, &mut buffered_rows, batch_rows)?;
            let jobs = replicas.jobs.as_ref().expect("open until the end");
            if jobs.send((next_job, batch)).is_err() {
                break; // every replica is gone: its reason is on `done_rx`
            }
            next_job += 1;
        }
        if !input_open && buffered_rows == 0 && next_job == next_out {
            break;
        }
        tokio::select! {
            batch = ctx.recv(0), if input_open && buffered_rows < batch_rows => match batch {
                Some(batch) => {
                    buffered_rows += batch.rows();
                    buffered.push_back(batch);
                }
                None => input_open = false,
            },
            done = done_rx.recv() => match done {
                Some(Done::Job(seq, result)) => {
                    finished.insert(seq, result);
                }
                Some(Done::Failed(index, source)) => return Err(fail(index, source)),
                Some(Done::Started) | None => return Err(format!("node `{}`: every replica stopped", ctx.name).into()),
            },
        }
    }
    replicas.close();
    Ok(())
}

/// Cuts the first `rows` rows (or all that are left) off the front of `buffered`, as one batch.
fn take_rows<T: Rebatch>(buffered: &mut VecDeque<T>, buffered_rows: &mut usize, rows: usize) -> Result<T, BoxError> {
    let mut parts = Vec::new();
    let mut taken = 0;
    while taken < rows {
        let Some(front) = buffered.pop_front() else { break };
        let want = rows - taken;
        if front.rows() > want {
            parts.push(front.slice(0, want));
            buffered.push_front(front.slice(want, front.rows() - want));
            taken += want;
        } else {
            taken += front.rows();
            parts.push(front);
        }
    }
    *buffered_rows -= taken;
    T::concat(parts)
}

/// One replica's thread: build the replica, then process jobs until the queue closes or the
/// node stops. A panic in `open` or `process` is caught and reported like an error.
fn run_replica<T, U>(
    index: usize,
    device: &str,
    open: OpenReplica<T, U>,
    jobs: crossbeam::channel::Receiver<(u64, T)>,
    done: mpsc::UnboundedSender<Done<U>>,
    stop: Arc<AtomicBool>,
) {
    let mut replica = match catch_unwind(AssertUnwindSafe(|| open(index, device))) {
        Ok(Ok(replica)) => replica,
        Ok(Err(e)) => {
            let _ = done.send(Done::Failed(index, format!("could not start: {e}").into()));
            return;
        }
        Err(panic) => {
            let reason = format!("panicked while starting: {}", panic_message(&panic));
            let _ = done.send(Done::Failed(index, reason.into()));
            return;
        }
    };
    if done.send(Done::Started).is_err() {
        return;
    }
    for (seq, batch) in jobs {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let result = match catch_unwind(AssertUnwindSafe(|| replica.process(batch))) {
            Ok(Ok(out)) => Done::Job(seq, out),
            Ok(Err(e)) => Done::Failed(index, e),
            Err(panic) => Done::Failed(index, format!("panicked: {}", panic_message(&panic)).into()),
        };
        let failed = matches!(result, Done::Failed(..));
        if done.send(result).is_err() || failed {
            break;
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "(no message)".into(),
    }
}

/// The replica threads of a running node. Dropped (the node finished, failed or was
/// cancelled), it tells them to stop, closes their queue and joins them.
struct Replicas<T> {
    jobs: Option<crossbeam::channel::Sender<(u64, T)>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl<T> Replicas<T> {
    fn close(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.jobs.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl<T> Drop for Replicas<T> {
    fn drop(&mut self) {
        self.close();
    }
}

type Pending<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Maps each batch of input `0` through `f` on `pool`, keeping up to `in_flight` batches in
/// work at once, and sends the results downstream *in input order*. `split` first cuts each
/// input batch into the pieces that go to the workers (so one large batch still keeps every
/// worker busy). `after` sees each result before it is sent (on the node's task, in order —
/// e.g. to quarantine rejected rows deterministically) and returns what to send, if anything.
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
        if let Some(next) = pending.pop_front()
            && let Some(out) = after(next.await?)?
            && ctx.send(out).await.is_err()
        {
            return Ok(()); // every consumer has stopped
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;
    use crate::edge::Capacity;
    use crate::graph::Graph;

    /// A test batch of consecutive row numbers `start..start + len`.
    #[derive(Debug, Clone, PartialEq)]
    struct Span {
        start: usize,
        len: usize,
    }

    impl Batch for Span {
        fn rows(&self) -> usize {
            self.len
        }
        fn bytes(&self) -> usize {
            self.len * 8
        }
    }

    impl Rebatch for Span {
        fn slice(&self, offset: usize, len: usize) -> Self {
            Span { start: self.start + offset, len }
        }
        fn concat(parts: Vec<Self>) -> Result<Self, BoxError> {
            for pair in parts.windows(2) {
                if pair[0].start + pair[0].len != pair[1].start {
                    return Err("parts are not consecutive".into());
                }
            }
            Ok(Span { start: parts[0].start, len: parts.iter().map(|p| p.len).sum() })
        }
    }

    const CAP: Capacity = Capacity { rows: 16, bytes: 1 << 20 };

    /// Counters a test reads while and after the graph runs.
    #[derive(Default)]
    struct Seen {
        produced: AtomicUsize,
        out: Mutex<Vec<Span>>,
        /// The most rows read from the source but not yet out of the encoder.
        worst_held: AtomicUsize,
        /// Which replica processed each batch, by its first row.
        by_replica: Mutex<Vec<(usize, usize)>>,
        /// Rows the source had sent when a stalled replica woke up.
        produced_at_wake: AtomicUsize,
    }

    /// source (`rows` rows in batches of 5) → `encode` on two fake slow "devices" (batches of
    /// 8; replica 1 is slower, may `stall` on its first batch, and `fault` may strike one row)
    /// → sink.
    fn graph(
        rows: Option<usize>,
        fault: Option<(usize, bool)>,
        seen: Arc<Seen>,
        alive: Arc<()>,
        sink_delay: Duration,
    ) -> Graph<Span> {
        stalling_graph(rows, fault, seen, alive, sink_delay, Duration::ZERO)
    }

    fn stalling_graph(
        rows: Option<usize>,
        fault: Option<(usize, bool)>,
        seen: Arc<Seen>,
        alive: Arc<()>,
        sink_delay: Duration,
        stall: Duration,
    ) -> Graph<Span> {
        let mut graph = Graph::new();
        let s = seen.clone();
        graph.add("source", &[], CAP, move |ctx: NodeContext<Span>| async move {
            let mut start = 0;
            while rows.is_none_or(|n| start < n) {
                let len = rows.map_or(5, |n| 5.min(n - start));
                ctx.send(Span { start, len }).await?;
                s.produced.fetch_max(start + len, Ordering::SeqCst);
                start += len;
            }
            Ok(())
        });
        let s = seen.clone();
        graph.add("encode", &["source"], CAP, move |mut ctx: NodeContext<Span>| async move {
            let devices = vec!["cpu:0".to_string(), "cpu:1".to_string()];
            let (seen, alive) = (s.clone(), alive.clone());
            let open: OpenReplica<Span, Span> = Arc::new(move |index, _device| {
                let (seen, alive) = (seen.clone(), alive.clone());
                let mut stall = if index == 1 { stall } else { Duration::ZERO };
                Ok(Box::new(move |batch: Span| {
                    let _held = &alive; // dropped with the replica, on its thread
                    if !stall.is_zero() {
                        std::thread::sleep(std::mem::take(&mut stall));
                        seen.produced_at_wake.store(seen.produced.load(Ordering::SeqCst), Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(if index == 1 { 3 } else { 1 }));
                    if let Some((row, panic)) = fault
                        && (batch.start..batch.start + batch.len).contains(&row)
                    {
                        if panic {
                            panic!("row {row} melted the device");
                        }
                        return Err(format!("row {row} is not a tensor").into());
                    }
                    seen.by_replica.lock().unwrap().push((batch.start, index));
                    Ok(batch)
                }) as Box<dyn Replica<Span, Span>>)
            });
            let s = s.clone();
            map_on_devices(&mut ctx, &devices, 8, open, move |batch: Span| {
                let held = s.produced.load(Ordering::SeqCst).saturating_sub(batch.start + batch.len);
                s.worst_held.fetch_max(held, Ordering::SeqCst);
                Ok(Some(batch))
            })
            .await
        });
        graph.add("sink", &["encode"], CAP, move |mut ctx: NodeContext<Span>| async move {
            while let Some(batch) = ctx.recv(0).await {
                tokio::time::sleep(sink_delay).await;
                seen.out.lock().unwrap().push(batch);
            }
            Ok(())
        });
        graph
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn devices_keep_input_order_and_rebatch() {
        let (seen, alive) = (Arc::new(Seen::default()), Arc::new(()));
        graph(Some(203), None, seen.clone(), alive.clone(), Duration::ZERO).start().unwrap().wait().await.unwrap();
        let out = seen.out.lock().unwrap().clone();
        // Batches of 8 rows (the last one short), every row once, in input order.
        let expected: Vec<Span> = (0..203).step_by(8).map(|start| Span { start, len: 8.min(203 - start) }).collect();
        assert_eq!(out, expected);
        // Both replicas took work, and their threads are gone with their state.
        let replicas: std::collections::BTreeSet<usize> =
            seen.by_replica.lock().unwrap().iter().map(|(_, r)| *r).collect();
        assert_eq!(replicas, [0, 1].into());
        assert_eq!(Arc::strong_count(&alive), 1, "a replica outlived its node");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_sink_holds_back_the_devices_and_the_source() {
        let (seen, alive) = (Arc::new(Seen::default()), Arc::new(()));
        graph(Some(2000), None, seen.clone(), alive, Duration::from_millis(2)).start().unwrap().wait().await.unwrap();
        assert_eq!(seen.out.lock().unwrap().iter().map(|s| s.len).sum::<usize>(), 2000);
        // Read from the source and not yet through the encoder: its input edge (16 rows), rows
        // being assembled into a batch (< 8, plus one input batch of 5) and the window of four
        // batches of 8 queued, in work or waiting for an earlier one.
        let worst = seen.worst_held.load(Ordering::SeqCst);
        assert!(worst <= 16 + 12 + 32, "{worst} rows were held");
    }

    /// One replica stuck on a batch: the other finishes what the window allows, then the node
    /// stops reading, and the source waits — nothing piles up behind the stuck batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_replica_holds_back_the_other_and_the_source() {
        let (seen, alive) = (Arc::new(Seen::default()), Arc::new(()));
        let graph = stalling_graph(Some(3000), None, seen.clone(), alive, Duration::ZERO, Duration::from_millis(300));
        graph.start().unwrap().wait().await.unwrap();
        assert_eq!(seen.out.lock().unwrap().iter().map(|s| s.len).sum::<usize>(), 3000);
        // The stuck batch is at most the second; behind it: the window (32 rows), rows being
        // assembled (12), the input edge (16) and the source's batch in hand (5).
        let at_wake = seen.produced_at_wake.load(Ordering::SeqCst);
        assert!(at_wake > 0 && at_wake <= 16 + 32 + 12 + 16 + 5, "the source sent {at_wake} rows meanwhile");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_error_or_a_panic_names_the_node_and_the_replica() {
        for panic in [false, true] {
            let (seen, alive) = (Arc::new(Seen::default()), Arc::new(()));
            let running = graph(None, Some((100, panic)), seen, alive.clone(), Duration::ZERO).start().unwrap();
            let err =
                tokio::time::timeout(Duration::from_secs(10), running.wait()).await.expect("no hang").unwrap_err();
            let message = err.to_string();
            let replica = seen_replica(&message);
            let expected = if panic {
                format!("node `encode`: replica {replica} (cpu:{replica}): panicked: row 100 melted the device")
            } else {
                format!("node `encode`: replica {replica} (cpu:{replica}): row 100 is not a tensor")
            };
            assert_eq!(message, expected);
            assert_eq!(Arc::strong_count(&alive), 1, "a replica thread outlived the failed graph");
        }
    }

    fn seen_replica(message: &str) -> usize {
        message.split("replica ").nth(1).and_then(|s| s.split(' ').next()).and_then(|s| s.parse().ok()).unwrap_or(9)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_graph_joins_every_replica_thread() {
        let (seen, alive) = (Arc::new(Seen::default()), Arc::new(()));
        let running = graph(None, None, seen.clone(), alive.clone(), Duration::ZERO).start().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(seen.produced.load(Ordering::SeqCst) > 0);
        drop(running);
        // Aborted tasks are dropped on the runtime's threads; the encoder's drop joins its
        // replicas, which drop their state (`alive`) on their way out.
        for _ in 0..100 {
            if Arc::strong_count(&alive) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(Arc::strong_count(&alive), 1, "a replica thread kept its state");
        let after = seen.out.lock().unwrap().len();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(seen.out.lock().unwrap().len(), after, "the graph kept running");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_that_cannot_start_is_named() {
        let mut graph = Graph::new();
        graph.add("source", &[], CAP, |ctx: NodeContext<Span>| async move {
            ctx.send(Span { start: 0, len: 3 }).await?;
            Ok(())
        });
        graph.add("encode", &["source"], CAP, |mut ctx: NodeContext<Span>| async move {
            let devices = vec!["cpu".to_string(), "cuda:7".to_string()];
            let open: OpenReplica<Span, Span> =
                Arc::new(
                    |_, device| {
                        if device == "cuda:7" { Err("no such device".into()) } else { Ok(Box::new(|b: Span| Ok(b))) }
                    },
                );
            map_on_devices(&mut ctx, &devices, 4, open, |b| Ok(Some(b))).await
        });
        graph.add("sink", &["encode"], CAP, |mut ctx: NodeContext<Span>| async move {
            while ctx.recv(0).await.is_some() {}
            Ok(())
        });
        let err = graph.start().unwrap().wait().await.unwrap_err();
        assert_eq!(err.to_string(), "node `encode`: replica 1 (cuda:7): could not start: no such device");
    }

    #[test]
    fn rebatching_cuts_and_joins_batches() {
        let mut buffered: VecDeque<Span> = [Span { start: 0, len: 3 }, Span { start: 3, len: 10 }].into();
        let mut rows = 13;
        assert_eq!(take_rows(&mut buffered, &mut rows, 8).unwrap(), Span { start: 0, len: 8 });
        assert_eq!(rows, 5);
        assert_eq!(take_rows(&mut buffered, &mut rows, 8).unwrap(), Span { start: 8, len: 5 });
        assert_eq!((rows, buffered.len()), (0, 0));
    }
}
