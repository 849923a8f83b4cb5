//! The DAG: named nodes joined by bounded edges, started as one [`RunningGraph`] that owns
//! every task.
//!
//! Contract (DataFusion's): errors travel up as `Err` and stop the whole graph, naming the node;
//! dropping the running graph cancels every task (they live in its `JoinSet`; nothing is
//! spawned detached). Validation reports every configuration problem at once.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::edge::{self, Batch, Capacity, Closed, Receiver, Sender};
use crate::error::{BoxError, Error};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Per-node counters, readable while the graph runs.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    pub rows_in: AtomicU64,
    pub rows_out: AtomicU64,
    pub batches_out: AtomicU64,
    /// Time spent waiting on input or on a full output edge.
    pub waiting_ns: AtomicU64,
    /// Rows waiting in this node's input edges when it last took a batch (its queue depth),
    /// and the most seen.
    pub queued_rows: AtomicU64,
    pub max_queued_rows: AtomicU64,
}

/// A finished node's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSummary {
    pub rows_in: u64,
    pub rows_out: u64,
    pub busy: Duration,
    pub rows_per_second: f64,
    /// The deepest its input queue got, in rows.
    pub max_queued_rows: u64,
}

/// What a running node sees: its inputs, its outputs (fanned out to every consumer), metrics.
pub struct NodeContext<T> {
    pub name: String,
    inputs: Vec<Receiver<T>>,
    outputs: Vec<Sender<T>>,
    metrics: Arc<NodeMetrics>,
}

impl<T: Batch + Clone> NodeContext<T> {
    /// The next batch from input `i`, or `None` when it is exhausted.
    pub async fn recv(&mut self, i: usize) -> Option<T> {
        let start = Instant::now();
        let input = self.inputs.get_mut(i)?;
        let depth = input.queued_rows() as u64;
        let batch = input.recv().await;
        self.metrics.waiting_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.metrics.queued_rows.store(depth, Ordering::Relaxed);
        self.metrics.max_queued_rows.fetch_max(depth, Ordering::Relaxed);
        if let Some(b) = &batch {
            self.metrics.rows_in.fetch_add(b.rows() as u64, Ordering::Relaxed);
        }
        batch
    }

    pub fn input_count(&self) -> usize {
        self.inputs.len()
    }

    /// Sends `batch` to every consumer, waiting while any edge is full.
    ///
    /// # Errors
    /// [`Closed`] once every consumer has stopped (there is no one left to work for).
    pub async fn send(&self, batch: T) -> Result<(), Closed> {
        let start = Instant::now();
        let rows = batch.rows() as u64;
        let mut delivered = 0;
        if let Some((last, rest)) = self.outputs.split_last() {
            for out in rest {
                delivered += out.send(batch.clone()).await.is_ok() as usize;
            }
            delivered += last.send(batch).await.is_ok() as usize;
        }
        self.metrics.waiting_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if delivered == 0 && !self.outputs.is_empty() {
            return Err(Closed);
        }
        self.metrics.rows_out.fetch_add(rows, Ordering::Relaxed);
        self.metrics.batches_out.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A node: consumes its context and runs to completion.
pub trait Node<T>: Send + 'static {
    fn run(self: Box<Self>, ctx: NodeContext<T>) -> BoxFuture<Result<(), BoxError>>;
}

impl<T, F, Fut> Node<T> for F
where
    T: 'static,
    F: FnOnce(NodeContext<T>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    fn run(self: Box<Self>, ctx: NodeContext<T>) -> BoxFuture<Result<(), BoxError>> {
        Box::pin((*self)(ctx))
    }
}

struct NodeSpec<T> {
    name: String,
    inputs: Vec<String>,
    capacity: Capacity,
    node: Box<dyn Node<T>>,
}

/// A graph under construction.
pub struct Graph<T> {
    nodes: Vec<NodeSpec<T>>,
}

impl<T: Batch + Clone> Default for Graph<T> {
    fn default() -> Self {
        Graph { nodes: Vec::new() }
    }
}

impl<T: Batch + Clone> Graph<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds node `name` reading from `inputs` (names of other nodes), each through an edge
    /// of `capacity`.
    pub fn add(&mut self, name: &str, inputs: &[&str], capacity: Capacity, node: impl Node<T>) -> &mut Self {
        self.nodes.push(NodeSpec {
            name: name.to_string(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            capacity,
            node: Box::new(node),
        });
        self
    }

    fn validate(&self) -> Result<(), Error> {
        let mut problems = Vec::new();
        let mut seen = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.name.is_empty() {
                problems.push(format!("node #{i} has an empty name"));
            }
            if seen.insert(node.name.as_str(), i).is_some() {
                problems.push(format!("node `{}` is defined twice", node.name));
            }
        }
        for node in &self.nodes {
            for input in &node.inputs {
                if input == &node.name {
                    problems.push(format!("node `{}` reads from itself", node.name));
                } else if !seen.contains_key(input.as_str()) {
                    problems.push(format!("node `{}` reads from unknown node `{input}`", node.name));
                }
            }
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        // Cycles (Kahn's algorithm), once names are unique and every edge is known.
        let mut indegree: BTreeMap<&str, usize> = self.nodes.iter().map(|n| (n.name.as_str(), 0)).collect();
        for node in &self.nodes {
            *indegree.get_mut(node.name.as_str()).expect("inserted") += node.inputs.len();
        }
        let mut ready: Vec<&str> = indegree.iter().filter(|(_, d)| **d == 0).map(|(n, _)| *n).collect();
        let mut visited = 0;
        while let Some(done) = ready.pop() {
            visited += 1;
            for node in &self.nodes {
                let edges = node.inputs.iter().filter(|i| *i == done).count();
                if edges == 0 {
                    continue;
                }
                let d = indegree.get_mut(node.name.as_str()).expect("inserted");
                *d -= edges;
                if *d == 0 {
                    ready.push(node.name.as_str());
                }
            }
        }
        if visited < indegree.len() {
            let cyclic: Vec<&str> = indegree.iter().filter(|(_, d)| **d > 0).map(|(n, _)| *n).collect();
            problems.push(format!("the graph has a cycle through {}", cyclic.join(", ")));
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::Config(problems)) }
    }

    /// Validates the graph and starts every node on the current tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`] listing every problem (duplicate or unknown names, cycles).
    pub fn start(self) -> Result<RunningGraph, Error> {
        self.validate()?;
        let mut outputs: HashMap<String, Vec<Sender<T>>> = HashMap::new();
        let mut inputs: HashMap<String, Vec<Receiver<T>>> = HashMap::new();
        for node in &self.nodes {
            for input in &node.inputs {
                let (tx, rx) = edge::channel(node.capacity);
                outputs.entry(input.clone()).or_default().push(tx);
                inputs.entry(node.name.clone()).or_default().push(rx);
            }
        }
        let mut tasks = JoinSet::new();
        let mut names = HashMap::new();
        let mut metrics = Vec::new();
        for spec in self.nodes {
            let node_metrics = Arc::new(NodeMetrics::default());
            metrics.push((spec.name.clone(), node_metrics.clone()));
            let ctx = NodeContext {
                name: spec.name.clone(),
                inputs: inputs.remove(&spec.name).unwrap_or_default(),
                outputs: outputs.remove(&spec.name).unwrap_or_default(),
                metrics: node_metrics,
            };
            let name = spec.name.clone();
            let handle = tasks.spawn(async move {
                let start = Instant::now();
                let result = spec.node.run(ctx).await;
                (result, start.elapsed())
            });
            names.insert(handle.id(), name);
        }
        Ok(RunningGraph { tasks, names, metrics, elapsed: HashMap::new() })
    }
}

/// A started graph. Dropping it cancels every node.
pub struct RunningGraph {
    tasks: JoinSet<(Result<(), BoxError>, Duration)>,
    names: HashMap<tokio::task::Id, String>,
    metrics: Vec<(String, Arc<NodeMetrics>)>,
    elapsed: HashMap<String, Duration>,
}

impl RunningGraph {
    /// Live metrics of every node, in definition order.
    pub fn metrics(&self) -> &[(String, Arc<NodeMetrics>)] {
        &self.metrics
    }

    /// Cancels every node and waits until each has been dropped (so their threads are joined
    /// and their unfinished outputs removed before the error is reported).
    async fn stop(&mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Runs the graph to completion.
    ///
    /// # Errors
    /// The first node error or panic, naming the node; every other node is cancelled. A node
    /// that stopped only because everything downstream had stopped ([`Closed`]) is a
    /// consequence, not a cause: it is reported only if no other node failed.
    pub async fn wait(mut self) -> Result<Vec<(String, NodeSummary)>, Error> {
        let mut downstream_closed = None;
        while let Some(joined) = self.tasks.join_next_with_id().await {
            match joined {
                Ok((id, (Ok(()), elapsed))) => {
                    let name = self.names.get(&id).cloned().unwrap_or_default();
                    self.elapsed.insert(name, elapsed);
                }
                Ok((id, (Err(source), _))) if source.downcast_ref::<Closed>().is_some() => {
                    let node = self.names.get(&id).cloned().unwrap_or_default();
                    downstream_closed.get_or_insert(Error::Node { node, source });
                }
                Ok((id, (Err(source), _))) => {
                    let node = self.names.get(&id).cloned().unwrap_or_default();
                    self.stop().await;
                    return Err(Error::Node { node, source });
                }
                Err(e) => {
                    let node = self.names.get(&e.id()).cloned().unwrap_or_default();
                    self.stop().await;
                    return Err(Error::Panicked { node, message: e.to_string() });
                }
            }
        }
        if let Some(error) = downstream_closed {
            return Err(error);
        }
        Ok(self
            .metrics
            .iter()
            .map(|(name, m)| {
                let elapsed = self.elapsed.get(name).copied().unwrap_or_default();
                let busy = elapsed.saturating_sub(Duration::from_nanos(m.waiting_ns.load(Ordering::Relaxed)));
                let rows_out = m.rows_out.load(Ordering::Relaxed);
                let rows_per_second = if elapsed.is_zero() { 0.0 } else { rows_out as f64 / elapsed.as_secs_f64() };
                let max_queued_rows = m.max_queued_rows.load(Ordering::Relaxed);
                (
                    name.clone(),
                    NodeSummary {
                        rows_in: m.rows_in.load(Ordering::Relaxed),
                        rows_out,
                        busy,
                        rows_per_second,
                        max_queued_rows,
                    },
                )
            })
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A test batch: only its size matters.
    #[derive(Debug, Clone)]
    pub(crate) struct Rows(pub(crate) usize);

    impl Batch for Rows {
        fn rows(&self) -> usize {
            self.0
        }
        fn bytes(&self) -> usize {
            self.0 * 100
        }
    }

    fn cap(rows: usize) -> Capacity {
        Capacity { rows, bytes: usize::MAX / 2 }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_sink_bounds_what_is_held_upstream() {
        let produced = Arc::new(AtomicUsize::new(0));
        let consumed = Arc::new(AtomicUsize::new(0));
        let worst = Arc::new(AtomicUsize::new(0));
        let mut graph = Graph::new();
        let p = produced.clone();
        graph.add("source", &[], cap(1), move |ctx: NodeContext<Rows>| async move {
            for _ in 0..300 {
                ctx.send(Rows(10)).await?;
                p.fetch_add(10, Ordering::SeqCst);
            }
            Ok(())
        });
        let (c, p, w) = (consumed.clone(), produced.clone(), worst.clone());
        graph.add("slow_sink", &["source"], cap(50), move |mut ctx: NodeContext<Rows>| async move {
            while let Some(batch) = ctx.recv(0).await {
                tokio::time::sleep(Duration::from_micros(200)).await;
                let done = c.fetch_add(batch.0, Ordering::SeqCst) + batch.0;
                w.fetch_max(p.load(Ordering::SeqCst).saturating_sub(done), Ordering::SeqCst);
            }
            Ok(())
        });
        let summary = graph.start().unwrap().wait().await.unwrap();
        assert_eq!(consumed.load(Ordering::SeqCst), 3000);
        // The edge holds at most 50 rows; the source may hold one more batch in hand.
        assert!(worst.load(Ordering::SeqCst) <= 60, "{} rows were in flight", worst.load(Ordering::SeqCst));
        assert_eq!((summary[0].1.rows_out, summary[1].1.rows_in), (3000, 3000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_a_running_graph_stops_every_task() {
        let sent = Arc::new(AtomicUsize::new(0));
        let token = Arc::new(());
        let mut graph = Graph::new();
        let (s, t) = (sent.clone(), token.clone());
        graph.add("endless", &[], cap(1), move |ctx: NodeContext<Rows>| async move {
            let _held = t;
            loop {
                ctx.send(Rows(1)).await?;
                s.fetch_add(1, Ordering::SeqCst);
            }
        });
        let t = token.clone();
        graph.add("sink", &["endless"], cap(16), move |mut ctx: NodeContext<Rows>| async move {
            let _held = t;
            while ctx.recv(0).await.is_some() {
                tokio::task::yield_now().await;
            }
            Ok(())
        });
        let running = graph.start().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(sent.load(Ordering::SeqCst) > 0);
        drop(running);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let after_drop = sent.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(sent.load(Ordering::SeqCst), after_drop, "a task kept running");
        assert_eq!(Arc::strong_count(&token), 1, "a task still holds its state");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_error_names_its_node_and_stops_the_others() {
        let mut graph = Graph::new();
        graph.add("endless", &[], cap(8), |ctx: NodeContext<Rows>| async move {
            loop {
                ctx.send(Rows(1)).await?;
            }
        });
        graph.add("decode", &["endless"], cap(8), |mut ctx: NodeContext<Rows>| async move {
            let mut n = 0;
            while let Some(batch) = ctx.recv(0).await {
                n += 1;
                if n == 5 {
                    return Err("record 5 is not an image".into());
                }
                ctx.send(batch).await?;
            }
            Ok(())
        });
        graph.add("sink", &["decode"], cap(8), |mut ctx: NodeContext<Rows>| async move {
            while ctx.recv(0).await.is_some() {}
            Ok(())
        });
        let err = tokio::time::timeout(Duration::from_secs(5), graph.start().unwrap().wait())
            .await
            .expect("no hang")
            .unwrap_err();
        assert_eq!(err.to_string(), "node `decode`: record 5 is not an image");
    }

    /// The producer learns first that its consumer is gone (its send fails) and stops with
    /// `Closed`; the consumer's own error, which arrives later, is the one reported.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cause_is_reported_not_the_closed_edge_it_left() {
        let mut graph = Graph::new();
        graph.add("endless", &[], cap(8), |ctx: NodeContext<Rows>| async move {
            loop {
                ctx.send(Rows(1)).await?;
            }
        });
        graph.add("encode", &["endless"], cap(8), |mut ctx: NodeContext<Rows>| async move {
            ctx.recv(0).await;
            drop(ctx); // the input edge closes now; the error comes later
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err("the device fell off the bus".into())
        });
        let err = graph.start().unwrap().wait().await.unwrap_err();
        assert_eq!(err.to_string(), "node `encode`: the device fell off the bus");
    }

    #[tokio::test]
    async fn a_panic_names_its_node() {
        let mut graph = Graph::new();
        graph.add("boom", &[], cap(8), |_ctx: NodeContext<Rows>| async move {
            if true {
                panic!("kaboom");
            }
            Ok(())
        });
        let err = graph.start().unwrap().wait().await.unwrap_err();
        assert!(matches!(err, Error::Panicked { ref node, .. } if node == "boom"), "{err}");
    }

    #[tokio::test]
    async fn fan_out_delivers_every_batch_to_every_consumer() {
        let totals = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let mut graph = Graph::new();
        graph.add("source", &[], cap(1), |ctx: NodeContext<Rows>| async move {
            for i in 1..=10 {
                ctx.send(Rows(i)).await?;
            }
            Ok(())
        });
        for (i, name) in ["parquet", "jsonl"].into_iter().enumerate() {
            let totals = totals.clone();
            graph.add(name, &["source"], cap(4), move |mut ctx: NodeContext<Rows>| async move {
                while let Some(b) = ctx.recv(0).await {
                    totals[i].fetch_add(b.0, Ordering::SeqCst);
                }
                Ok(())
            });
        }
        graph.start().unwrap().wait().await.unwrap();
        assert_eq!((totals[0].load(Ordering::SeqCst), totals[1].load(Ordering::SeqCst)), (55, 55));
    }

    #[tokio::test]
    async fn validation_reports_every_problem_at_once() {
        let noop = |_ctx: NodeContext<Rows>| async move { Ok(()) };
        let mut graph = Graph::new();
        graph.add("a", &[], cap(1), noop).add("a", &[], cap(1), noop).add("b", &["nope", "b"], cap(1), noop);
        let Err(Error::Config(problems)) = graph.start() else { panic!("invalid graph started") };
        assert_eq!(
            problems,
            ["node `a` is defined twice", "node `b` reads from unknown node `nope`", "node `b` reads from itself"]
        );
        let mut cyclic = Graph::new();
        cyclic.add("x", &["y"], cap(1), noop).add("y", &["x"], cap(1), noop);
        let Err(err) = cyclic.start() else { panic!("cyclic graph started") };
        assert_eq!(err.to_string(), "invalid pipeline: the graph has a cycle through x, y");
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_edge_passes_alone() {
        let (tx, mut rx) = edge::channel::<Rows>(cap(10));
        tx.send(Rows(1000)).await.unwrap(); // would never fit: takes the whole budget instead
        assert_eq!(rx.queued_rows(), 10);
        assert_eq!(rx.recv().await.unwrap().0, 1000);
        assert_eq!(rx.queued_rows(), 0);
        drop(rx);
        assert_eq!(tx.send(Rows(1)).await, Err(Closed));
    }

    #[tokio::test]
    async fn worker_pool_runs_jobs_off_the_reactor() {
        let pool = crate::WorkerPool::new(2);
        let name = pool.run(|| std::thread::current().name().map(str::to_string)).await;
        assert!(name.unwrap().starts_with("cnclip-worker-"));
        let sums: Vec<u64> = futures_join(&pool).await;
        assert_eq!(sums, (0..8u64).map(|i| (0..=i * 1000).sum()).collect::<Vec<u64>>());
    }

    async fn futures_join(pool: &crate::WorkerPool) -> Vec<u64> {
        let futures: Vec<_> = (0..8u64).map(|i| pool.run(move || (0..=i * 1000).sum::<u64>())).collect();
        let mut out = Vec::new();
        for f in futures {
            out.push(f.await);
        }
        out
    }
}
