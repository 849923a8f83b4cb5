//! A worker pool for CPU-heavy stages (base64 and image decoding, resizing, tokenizing), so
//! they never run on the async reactor's threads. Sized to the cores by default; its threads
//! end when the pool is dropped.

use std::thread::JoinHandle;

use crossbeam::channel;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

pub struct WorkerPool {
    jobs: Option<channel::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// `threads` workers (0: one per available core).
    pub fn new(threads: usize) -> Self {
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let (tx, rx) = channel::unbounded::<Job>();
        let threads = (0..threads)
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("cnclip-worker-{i}"))
                    .spawn(move || {
                        for job in rx {
                            job();
                        }
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        WorkerPool { jobs: Some(tx), threads }
    }

    pub fn size(&self) -> usize {
        self.threads.len()
    }

    /// Runs `f` on a worker; the future resolves to its result. Dropping the future does not
    /// stop work already started (CPU work cannot be pre-empted), it only discards the result.
    pub fn run<R, F>(&self, f: F) -> impl std::future::Future<Output = R> + use<R, F>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.as_ref().expect("pool is alive").send(job).expect("workers are alive");
        async move { rx.await.expect("a worker panicked while running a job") }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.jobs.take(); // closes the queue: workers finish their job and exit
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
