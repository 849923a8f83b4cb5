//! Bounded edges: channels whose capacity is counted in rows *and* bytes, since batch sizes
//! vary (a batch of 16 decoded 336² images is not a batch of 16 captions).
//!
//! A sender waits until both budgets have room for its batch — that wait is the backpressure
//! that travels up the graph from a slow stage. A batch larger than a whole budget is let
//! through alone (it takes the full budget) rather than blocking forever. The receiver gives
//! the budget back as it takes each batch.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

/// What an edge carries: anything that can say how many rows and bytes it holds.
pub trait Batch: Send + 'static {
    fn rows(&self) -> usize;
    fn bytes(&self) -> usize;
}

impl Batch for arrow::record_batch::RecordBatch {
    fn rows(&self) -> usize {
        self.num_rows()
    }
    fn bytes(&self) -> usize {
        self.get_array_memory_size()
    }
}

/// An edge's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub rows: usize,
    pub bytes: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity { rows: 8192, bytes: 256 << 20 }
    }
}

struct Budget {
    rows: Semaphore,
    bytes: Semaphore,
    capacity: Capacity,
}

/// Semaphore permits are u32; budgets are counted in units that fit.
fn units(n: usize, cap: usize) -> u32 {
    n.min(cap).min(u32::MAX as usize >> 4) as u32
}

pub struct Sender<T> {
    tx: mpsc::UnboundedSender<(T, u32, u32)>,
    budget: Arc<Budget>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender { tx: self.tx.clone(), budget: self.budget.clone() }
    }
}

pub struct Receiver<T> {
    rx: mpsc::UnboundedReceiver<(T, u32, u32)>,
    budget: Arc<Budget>,
}

/// The receiver is gone: the graph is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the downstream node has stopped")]
pub struct Closed;

pub fn channel<T: Batch>(capacity: Capacity) -> (Sender<T>, Receiver<T>) {
    let capacity = Capacity { rows: capacity.rows.max(1), bytes: capacity.bytes.max(1) };
    let budget = Arc::new(Budget {
        rows: Semaphore::new(units(capacity.rows, capacity.rows) as usize),
        bytes: Semaphore::new(units(capacity.bytes, capacity.bytes) as usize),
        capacity,
    });
    let (tx, rx) = mpsc::unbounded_channel();
    (Sender { tx, budget: budget.clone() }, Receiver { rx, budget })
}

impl<T: Batch> Sender<T> {
    /// Sends `batch`, waiting while the edge is full.
    ///
    /// # Errors
    /// [`Closed`] when the receiver has been dropped.
    pub async fn send(&self, batch: T) -> Result<(), Closed> {
        let rows = units(batch.rows(), self.budget.capacity.rows);
        let bytes = units(batch.bytes(), self.budget.capacity.bytes);
        // Rows first, then bytes; every sender takes them in this order, so no deadlock.
        let r = self.budget.rows.acquire_many(rows).await.map_err(|_| Closed)?;
        let b = self.budget.bytes.acquire_many(bytes).await.map_err(|_| Closed)?;
        r.forget();
        b.forget();
        self.tx.send((batch, rows, bytes)).map_err(|_| {
            self.budget.rows.add_permits(rows as usize);
            self.budget.bytes.add_permits(bytes as usize);
            Closed
        })
    }
}

impl<T> Receiver<T> {
    /// The next batch, or `None` when every sender is gone and the edge is drained.
    pub async fn recv(&mut self) -> Option<T> {
        let (batch, rows, bytes) = self.rx.recv().await?;
        self.budget.rows.add_permits(rows as usize);
        self.budget.bytes.add_permits(bytes as usize);
        Some(batch)
    }

    /// Rows waiting in the edge (its queue depth).
    pub fn queued_rows(&self) -> usize {
        self.budget.capacity.rows.min(u32::MAX as usize >> 4) - self.budget.rows.available_permits()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Wake blocked senders: they see Closed instead of waiting forever.
        self.budget.rows.close();
        self.budget.bytes.close();
    }
}
