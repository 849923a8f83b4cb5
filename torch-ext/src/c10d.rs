//! libtorch's c10d: what data-parallel training over processes and machines needs. A
//! rendezvous through c10d's `TCPStore` ([`Store`]), a Gloo process group over it
//! ([`ProcessGroup`]), and the group's collectives on tch tensors: all-reduce (one tensor, or
//! several coalesced), all-gather, broadcast and a barrier that names the ranks that did not
//! come. Each collective can be started and waited for later ([`Work`]), as DDP overlaps its
//! gradient buckets with the backward pass. Gloo runs on CPU tensors; NCCL (in
//! `libtorch_cuda`) is for a later step.

use std::ffi::c_int;
use std::time::Duration;

use tch::Tensor;

use crate::{Error, Result, c_string, check, ffi};

fn millis(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
}

/// A c10d `TCPStore`: the key-value store the ranks meet at. Rank 0 runs the server
/// ([`Store::server`]); the others connect to it ([`Store::client`]).
pub struct Store {
    raw: *mut ffi::CnStore,
}

// SAFETY: a TCPStore is used from any thread in torch (its client serialises requests on its
// socket under a lock); the holder is only read or dropped through `&self`/`self`.
unsafe impl Send for Store {}
// SAFETY: as above: c10d's Store methods are thread-safe.
unsafe impl Sync for Store {}

impl Store {
    /// The server, listening on `host:port` (`port` 0: any free port, see [`Store::port`]) for
    /// `world_size` ranks in all, itself a client too.
    ///
    /// # Errors
    /// The port cannot be bound.
    pub fn server(host: &str, port: u16, world_size: usize, timeout: Duration) -> Result<Store> {
        Self::open(host, port, world_size, true, timeout)
    }

    /// A client of the server at `host:port`, retrying the connection until `timeout`.
    ///
    /// # Errors
    /// No server answered within `timeout`.
    pub fn client(host: &str, port: u16, world_size: usize, timeout: Duration) -> Result<Store> {
        Self::open(host, port, world_size, false, timeout)
    }

    fn open(host: &str, port: u16, world_size: usize, server: bool, timeout: Duration) -> Result<Store> {
        let what = if server { "starting the rendezvous store" } else { "connecting to the rendezvous store" };
        let host = c_string(what, host)?;
        let world_size = u32::try_from(world_size).map_err(|_| Error { what, message: "too many ranks".into() })?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `host` outlives the call; `raw` is written only on success.
        check(what, unsafe {
            ffi::cnclip_c10d_tcp_store(host.as_ptr(), port, world_size, server, millis(timeout), &mut raw)
        })?;
        Ok(Store { raw })
    }

    /// The port the server listens on (the one it picked, for port 0).
    pub fn port(&self) -> u16 {
        // SAFETY: `raw` is a live store.
        unsafe { ffi::cnclip_c10d_store_port(self.raw) }
    }

    /// Sets `key` to `value`.
    ///
    /// # Errors
    /// The server cannot be reached.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let key = c_string("setting a store key", key)?;
        // SAFETY: the key and value outlive the call.
        check("setting a store key", unsafe {
            ffi::cnclip_c10d_store_set(self.raw, key.as_ptr(), value.as_ptr(), value.len())
        })
    }

    /// The value of `key`, waiting for another rank to set it (up to the store's timeout).
    ///
    /// # Errors
    /// The key was not set within the timeout, or the server cannot be reached.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let key = c_string("reading a store key", key)?;
        let (mut data, mut len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: the outputs are written only on success.
        check("reading a store key", unsafe {
            ffi::cnclip_c10d_store_get(self.raw, key.as_ptr(), &mut data, &mut len)
        })?;
        // SAFETY: on success `data` is a malloc'd buffer of `len` bytes (at least 1 allocated).
        let value = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
        // SAFETY: freed once, by the allocator that made it.
        unsafe { ffi::cnclip_ext_free(data.cast()) };
        Ok(value)
    }

    /// Adds `value` to the counter `key` (0 when unset) and returns the sum.
    ///
    /// # Errors
    /// The server cannot be reached.
    pub fn add(&self, key: &str, value: i64) -> Result<i64> {
        let key = c_string("adding to a store key", key)?;
        let mut out = 0;
        // SAFETY: `out` is written only on success.
        check("adding to a store key", unsafe { ffi::cnclip_c10d_store_add(self.raw, key.as_ptr(), value, &mut out) })?;
        Ok(out)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: dropped once; the process groups made over it hold their own reference.
        unsafe { ffi::cnclip_c10d_store_drop(self.raw) }
    }
}

/// A reduction of [`ProcessGroup::all_reduce`] (c10d's `ReduceOp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Min,
    Max,
}

impl ReduceOp {
    fn code(self) -> c_int {
        // c10d::ReduceOp::RedOpType
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Min => 3,
            ReduceOp::Max => 4,
        }
    }
}

/// A Gloo process group: `size` ranks, this process (or thread) being `rank`. Collectives
/// must be called in the same order on every rank, as in torch. Started collectives write into
/// their tensors until waited for ([`Work::wait`]): read them only after.
pub struct ProcessGroup {
    /// The shim's group, which holds a lock while a collective is issued: Gloo numbers its
    /// collectives with a plain counter (`ProcessGroupGloo::nextTag`), which two threads
    /// issuing at once would race on (autograd issues from its threads too).
    raw: *mut ffi::CnGroup,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup").field("rank", &self.rank()).field("size", &self.size()).finish()
    }
}

// SAFETY: c10d backends are called from any thread (DDP's reducer calls them from autograd's);
// Gloo queues the work on threads of its own.
unsafe impl Send for ProcessGroup {}
// SAFETY: every call that issues a collective holds the shim group's lock; the others read
// fixed fields.
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// Joins the Gloo group of `size` ranks meeting at `store`, as `rank`. Its device binds
    /// `hostname` (an address of this machine, e.g. `127.0.0.1`) when given, else as torch
    /// does (`GLOO_SOCKET_IFNAME`, or this host's name). Returns once all ranks have joined;
    /// `timeout` bounds that and every collective.
    ///
    /// # Errors
    /// Not every rank joined within `timeout`; the device cannot bind.
    pub fn gloo(
        store: &Store,
        rank: usize,
        size: usize,
        timeout: Duration,
        hostname: Option<&str>,
    ) -> Result<ProcessGroup> {
        Self::gloo_under(store, None, rank, size, timeout, hostname)
    }

    /// [`ProcessGroup::gloo`] with the group's store keys under `prefix/` (a store that outlives
    /// one attempt of a run, as torchrun's agent store: each attempt its own prefix).
    ///
    /// # Errors
    /// As [`ProcessGroup::gloo`].
    pub fn gloo_under(
        store: &Store,
        prefix: Option<&str>,
        rank: usize,
        size: usize,
        timeout: Duration,
        hostname: Option<&str>,
    ) -> Result<ProcessGroup> {
        const WHAT: &str = "joining the Gloo process group";
        let too_many = || Error { what: WHAT, message: format!("rank {rank} of {size}: too many ranks") };
        let (rank, size) =
            (c_int::try_from(rank).map_err(|_| too_many())?, c_int::try_from(size).map_err(|_| too_many())?);
        if rank >= size {
            return Err(Error { what: WHAT, message: format!("rank {rank} is not below the world size {size}") });
        }
        let hostname = hostname.map(|h| c_string(WHAT, h)).transpose()?;
        let prefix = prefix.map(|p| c_string(WHAT, p)).transpose()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: the store is live for the call (the group keeps its own reference to it);
        // `hostname` is null or outlives the call; `raw` is written only on success.
        check(WHAT, unsafe {
            ffi::cnclip_c10d_gloo(
                store.raw,
                rank,
                size,
                millis(timeout),
                hostname.as_ref().map_or(std::ptr::null(), |h| h.as_ptr()),
                prefix.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
                &mut raw,
            )
        })?;
        Ok(ProcessGroup { raw })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        // SAFETY: `raw` is a live group.
        unsafe { ffi::cnclip_c10d_group_rank(self.raw) as usize }
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        // SAFETY: `raw` is a live group.
        unsafe { ffi::cnclip_c10d_group_size(self.raw) as usize }
    }

    /// Starts reducing `tensors` in place over the ranks: one tensor, or several of one dtype
    /// (coalesced into one Gloo operation). CPU tensors, contiguous.
    ///
    /// # Errors
    /// Gloo refuses the tensors (device, dtype, layout).
    pub fn start_all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<Work> {
        let pointers: Vec<ffi::TensorPtr> = tensors.iter().map(|t| ffi::tensor_ptr(t)).collect();
        let mut raw = std::ptr::null_mut();
        // SAFETY: the tensors are live for the call, and the work holds its own references to
        // them (c10d keeps them until it completes).
        check("all-reduce", unsafe {
            ffi::cnclip_c10d_all_reduce(self.raw, pointers.as_ptr(), pointers.len(), op.code(), &mut raw)
        })?;
        Ok(Work { raw, what: "all-reduce" })
    }

    /// [`ProcessGroup::start_all_reduce`] and wait.
    ///
    /// # Errors
    /// As there, or the collective failed (a rank gone, the timeout).
    pub fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
        self.start_all_reduce(tensors, op)?.wait()
    }

    /// The sum over the ranks of `input`, as a new tensor on its device, differentiable as
    /// `torch.distributed.nn.functional.all_reduce`: in backward, the input's gradient is the
    /// sum over the ranks of the result's gradients (a collective each rank's backward issues,
    /// in the same order on every rank). The group must outlive the graph.
    ///
    /// # Errors
    /// The collective failed (a rank gone, the timeout).
    pub fn all_reduce_sum_autograd(&self, input: &Tensor) -> Result<Tensor> {
        let mut out: ffi::TensorPtr = std::ptr::null_mut();
        // SAFETY: `input` is live for the call; `out` is written only on success, with a new
        // `at::Tensor*` the returned Tensor owns.
        check("all-reduce", unsafe {
            ffi::cnclip_c10d_all_reduce_sum_autograd(self.raw, ffi::tensor_ptr(input), &mut out)
        })?;
        // SAFETY: a new tensor handle the shim allocated for us.
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }

    /// Gathers `input` from every rank into `outputs` (one tensor of its shape per rank, rank
    /// order), and waits.
    ///
    /// # Errors
    /// Shapes that do not match; the collective failed.
    pub fn all_gather(&self, outputs: &[&Tensor], input: &Tensor) -> Result<()> {
        let pointers: Vec<ffi::TensorPtr> = outputs.iter().map(|t| ffi::tensor_ptr(t)).collect();
        let mut raw = std::ptr::null_mut();
        // SAFETY: as in start_all_reduce.
        check("all-gather", unsafe {
            ffi::cnclip_c10d_all_gather(self.raw, pointers.as_ptr(), pointers.len(), ffi::tensor_ptr(input), &mut raw)
        })?;
        Work { raw, what: "all-gather" }.wait()
    }

    /// Copies `tensor` from rank `root` to every rank, in place, and waits.
    ///
    /// # Errors
    /// The collective failed.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        let root =
            c_int::try_from(root).map_err(|_| Error { what: "broadcast", message: "root out of range".into() })?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: as in start_all_reduce.
        check("broadcast", unsafe { ffi::cnclip_c10d_broadcast(self.raw, ffi::tensor_ptr(tensor), root, &mut raw) })?;
        Work { raw, what: "broadcast" }.wait()
    }

    /// Waits until every rank has called it. On rank 0 a failure names the ranks that did not
    /// come within the timeout (c10d's monitored barrier).
    ///
    /// # Errors
    /// A rank did not come, or rank 0 did not answer.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: `raw` is a live group.
        check("barrier", unsafe { ffi::cnclip_c10d_barrier(self.raw) })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: dropped once. c10d's destructor waits for the group's queued work.
        unsafe { ffi::cnclip_c10d_group_drop(self.raw) }
    }
}

/// A collective in flight; [`Work::wait`] for it. Dropping it without waiting leaves the
/// collective to finish on Gloo's threads.
#[must_use = "a collective's result is known only once waited for"]
pub struct Work {
    raw: *mut ffi::CnWork,
    what: &'static str,
}

// SAFETY: c10d's Work is waited for from any thread (torch's futures do).
unsafe impl Send for Work {}

impl Work {
    /// Waits until the collective is done (its group's timeout at most).
    ///
    /// # Errors
    /// The collective failed: a rank closed its connection, or the timeout passed.
    pub fn wait(self) -> Result<()> {
        // SAFETY: `raw` is live until this work is dropped, after the call.
        check(self.what, unsafe { ffi::cnclip_c10d_work_wait(self.raw) })
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: dropped once.
        unsafe { ffi::cnclip_c10d_work_drop(self.raw) }
    }
}
