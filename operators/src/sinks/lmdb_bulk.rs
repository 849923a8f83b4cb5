//! A bulk loader that writes LMDB's on-disk format directly, for databases built once from a
//! stream of unique keys (cn_clip's `imgs` and `pairs`).
//!
//! Going through LMDB's write transactions costs three user-space copies of every value (our
//! buffer, LMDB's dirty pages, the kernel's page cache) and a B-tree insert per key in random
//! order. Here a value too big for a leaf node is copied once, in arrival order, into the page
//! image of its overflow pages at the end of the file, and written by background threads (see
//! `Appender`: `O_DIRECT` where allowed, so the disk takes it straight from that buffer); only
//! keys, page numbers and the small values are kept, sorted (in memory, or in sorted runs
//! spilled to disk past [`RUN_BYTES`], so memory stays bounded for any corpus size), and turned
//! into full leaf pages and the branch levels above them at [`LmdbWriter::finish`]. The result
//! is an ordinary LMDB 0.9 environment (data version 1, 4 KiB pages, default database only, as
//! py-lmdb makes with `lmdb.open(path)`): py-lmdb and lmdb-rkv read it, and LMDB can keep
//! writing to it (both tested). The layout mirrors what LMDB itself leaves after its first commit: meta page 0 holds
//! the empty database (txn 0), meta page 1 the loaded one (txn 1), the free list is empty, and
//! `last_pg` is the last page written.
//!
//! Format constants are LMDB's (`mdb.c`, 64-bit): page header 16 bytes (`pgno u64, pad u16,
//! flags u16, lower u16, upper u16` or `pages u32` for overflow), nodes of 8 header bytes
//! (`lo u16, hi u16, flags u16, ksize u16`) + key + data, aligned to even sizes, placed from the
//! end of the page downwards with 2-byte offsets after the header.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::error::{Error, Result, io};

pub const PAGE: usize = 4096;
const HEADER: usize = 16;
const NODE_HEADER: usize = 8;
/// `me_nodemax`: a leaf node bigger than this puts its value on overflow pages.
const NODE_MAX: usize = (((PAGE - HEADER) / 2) & !1) - 2;
/// `mdb_env_get_maxkeysize` for this build of LMDB.
pub const MAX_KEY: usize = 511;
const P_BRANCH: u16 = 0x01;
const P_LEAF: u16 = 0x02;
const P_OVERFLOW: u16 = 0x04;
const P_META: u16 = 0x08;
const F_BIGDATA: u16 = 0x01;
const MDB_INTEGERKEY: u16 = 0x08;
const MAGIC: u32 = 0xBEEF_C0DE;
const DATA_VERSION: u32 = 1;
const INVALID: u64 = u64::MAX;
/// Pending records (keys, small values, page numbers) held before a sorted run is spilled.
pub const RUN_BYTES: usize = 64 << 20;
static ZEROS: [u8; PAGE] = [0; PAGE];

fn even(n: usize) -> usize {
    (n + 1) & !1
}

/// `OVPAGES`: pages taken by an overflow value of `len` bytes.
fn overflow_pages(len: usize) -> u64 {
    ((HEADER - 1 + len) / PAGE + 1) as u64
}

/// Where a key's value lives.
#[derive(Clone, Copy, Debug)]
enum Value<'a> {
    Inline(&'a [u8]),
    Overflow { pgno: u64, len: u32 },
}

/// A sort record: `[key len u16][key][0 + len u32 + value | 1 + len u32 + pgno u64]`.
fn encode(out: &mut Vec<u8>, key: &[u8], value: Value<'_>) {
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    match value {
        Value::Inline(v) => {
            out.push(0);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        Value::Overflow { pgno, len } => {
            out.push(1);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&pgno.to_le_bytes());
        }
    }
}

/// The key of the record starting at `at`, and the record's length.
fn record_key(buf: &[u8], at: usize) -> &[u8] {
    let klen = u16::from_le_bytes([buf[at], buf[at + 1]]) as usize;
    &buf[at + 2..at + 2 + klen]
}

fn decode(record: &[u8]) -> (&[u8], Value<'_>, usize) {
    let klen = u16::from_le_bytes([record[0], record[1]]) as usize;
    let key = &record[2..2 + klen];
    let at = 2 + klen;
    let len = u32::from_le_bytes(record[at + 1..at + 5].try_into().unwrap());
    if record[at] == 0 {
        let end = at + 5 + len as usize;
        (key, Value::Inline(&record[at + 5..end]), end)
    } else {
        let pgno = u64::from_le_bytes(record[at + 5..at + 13].try_into().unwrap());
        (key, Value::Overflow { pgno, len }, at + 13)
    }
}

/// Writes one LMDB environment (`data.mdb` + `lock.mdb`) into a directory.
pub struct LmdbWriter {
    dir: PathBuf,
    /// `data.mdb`, until the first overflow value starts the [`Appender`] that owns it.
    file: Option<File>,
    /// Overflow pages go to `data.mdb` through this; `None` before the first and once failed.
    appender: Option<Appender>,
    /// Try `O_DIRECT` writes (tests turn it off to cover the page-cache path).
    direct: bool,
    /// Next page to write: overflow values go here as they arrive.
    next_page: u64,
    overflow_pages: u64,
    /// Pending sort records and where each starts.
    pending: Vec<u8>,
    starts: Vec<usize>,
    /// Sorted runs spilled to `spill_path`: (offset, length).
    runs: Vec<(u64, u64)>,
    spill: Option<BufWriter<File>>,
    spill_path: PathBuf,
    spilled_bytes: u64,
    entries: u64,
    /// Pending bytes that trigger a spill ([`RUN_BYTES`] by default).
    run_bytes: usize,
    /// Bytes per write chunk ([`CHUNK`] by default).
    chunk: usize,
}

impl LmdbWriter {
    /// Creates the LMDB directory `path` (replacing a `data.mdb` there).
    ///
    /// # Errors
    /// IO errors naming `path`.
    pub fn create(path: &Path) -> Result<Self> {
        Self::create_with(path, true)
    }

    /// [`create`](Self::create), choosing whether to try `O_DIRECT` writes.
    fn create_with(path: &Path, direct: bool) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(io(path))?;
        let data = path.join("data.mdb");
        let _ = std::fs::remove_file(path.join("lock.mdb"));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&data).map_err(io(&data))?;
        Ok(LmdbWriter {
            dir: path.to_path_buf(),
            file: Some(file),
            appender: None,
            direct,
            next_page: 2,
            overflow_pages: 0,
            pending: Vec::new(),
            starts: Vec::new(),
            runs: Vec::new(),
            spill: None,
            spill_path: path.join(".cnclip-sort-runs"),
            spilled_bytes: 0,
            entries: 0,
            run_bytes: RUN_BYTES,
            chunk: CHUNK,
        })
    }

    /// Caps what this writer holds in memory at about `bytes` (default ~80 MiB: 64 MiB of
    /// pending keys and small values before a sorted run is spilled, and the write chunks), for
    /// jobs that keep many writers open at once (`build-lmdb --shards N`). At least 2 MiB.
    pub fn with_memory(mut self, bytes: usize) -> Self {
        let bytes = bytes.max(2 << 20);
        self.run_bytes = bytes * 4 / 5;
        self.chunk = ((bytes / 5 / CHUNKS) / PAGE * PAGE).clamp(16 * PAGE, CHUNK);
        self
    }

    fn data_path(&self) -> PathBuf {
        self.dir.join("data.mdb")
    }

    fn format_error(&self, reason: String) -> Error {
        Error::Format { path: self.dir.display().to_string(), reason }
    }

    /// Stores `value` under `key`. Keys must be unique within the database: a repeated key fails
    /// [`finish`](Self::finish) naming it (callers deduplicate and quarantine first).
    ///
    /// # Errors
    /// A key over 511 bytes or empty, a value of 4 GiB or more, IO errors.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(self.format_error(format!("LMDB keys are 1 to {MAX_KEY} bytes; got {} bytes", key.len())));
        }
        let Ok(len) = u32::try_from(value.len()) else {
            return Err(self.format_error(format!(
                "value of key {} is {} bytes; LMDB stores < 4 GiB",
                String::from_utf8_lossy(key),
                value.len()
            )));
        };
        if self.pending.capacity() == 0 {
            // Room for a whole run at once (plus the record that crosses the threshold): growing
            // by doubling would copy it and leave the old buffer behind, up to twice the budget.
            self.pending.reserve_exact(self.run_bytes + 2 * PAGE);
        }
        let start = self.pending.len();
        if NODE_HEADER + key.len() + value.len() > NODE_MAX {
            let pgno = self.next_page;
            self.write_overflow(pgno, value)?;
            encode(&mut self.pending, key, Value::Overflow { pgno, len });
        } else {
            encode(&mut self.pending, key, Value::Inline(value));
        }
        self.starts.push(start);
        self.entries += 1;
        if self.pending.len() + self.starts.len() * 8 >= self.run_bytes {
            self.spill_run()?;
        }
        Ok(())
    }

    /// Header, value and zero padding, appended to the file.
    fn write_overflow(&mut self, pgno: u64, value: &[u8]) -> Result<()> {
        let pages = overflow_pages(value.len());
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(&pgno.to_le_bytes());
        header[10..12].copy_from_slice(&P_OVERFLOW.to_le_bytes());
        header[12..16].copy_from_slice(&(pages as u32).to_le_bytes());
        let pad = pages as usize * PAGE - HEADER - value.len();
        if self.appender.is_none() {
            let file = self.file.take().ok_or_else(|| Error::Internal("LMDB writer used after an error".into()))?;
            self.appender =
                Some(Appender::new(file, &self.data_path(), self.next_page * PAGE as u64, self.direct, self.chunk));
        }
        let appender = self.appender.as_mut().expect("started");
        let sent = appender
            .append(&header)
            .and_then(|()| appender.append(value))
            .and_then(|()| appender.append(&ZEROS[..pad]));
        if sent.is_err() {
            // The writing thread stopped: its error says why.
            let error = self.appender.take().expect("checked").finish().err();
            let error = error.unwrap_or_else(|| std::io::Error::other("the writing thread stopped"));
            return Err(io(&self.data_path())(error));
        }
        self.next_page += pages;
        self.overflow_pages += pages;
        Ok(())
    }

    fn sort_pending(&mut self) {
        let pending = &self.pending;
        self.starts.sort_unstable_by(|&a, &b| record_key(pending, a).cmp(record_key(pending, b)));
    }

    /// Sorts the pending records and appends them to the spill file as one run.
    fn spill_run(&mut self) -> Result<()> {
        if self.starts.is_empty() {
            return Ok(());
        }
        self.sort_pending();
        if self.spill.is_none() {
            let file = File::create(&self.spill_path).map_err(io(&self.spill_path))?;
            self.spill = Some(BufWriter::with_capacity(1 << 20, file));
        }
        let spill = self.spill.as_mut().expect("just created");
        let start = self.spilled_bytes;
        for &at in &self.starts {
            let (_, _, len) = decode(&self.pending[at..]);
            spill.write_all(&self.pending[at..at + len]).map_err(io(&self.spill_path))?;
            self.spilled_bytes += len as u64;
        }
        self.runs.push((start, self.spilled_bytes - start));
        self.pending.clear();
        self.starts.clear();
        Ok(())
    }

    /// Writes the leaf and branch pages and the meta pages, syncs `data.mdb`, and opens the
    /// result with LMDB once (which creates `lock.mdb` and checks the entry count).
    ///
    /// # Errors
    /// A duplicate key (named), IO errors.
    pub fn finish(mut self) -> Result<()> {
        let data_path = self.data_path();
        let mut file = match (self.appender.take(), self.file.take()) {
            (Some(appender), _) => appender.finish().map_err(io(&data_path))?,
            (None, Some(mut file)) => {
                file.seek(SeekFrom::Start(self.next_page * PAGE as u64)).map_err(io(&data_path))?;
                file
            }
            (None, None) => return Err(Error::Internal("LMDB writer used after an error".into())),
        };
        let mut tree = TreeBuilder::new(self.next_page);
        let mut previous: Vec<u8> = Vec::new();
        let dir = self.dir.clone();
        // Records arrive in key order, from memory or from the merged runs.
        let mut add = |record: &[u8]| -> Result<()> {
            let (key, value, _) = decode(record);
            if !previous.is_empty() && previous == key {
                return Err(duplicate(&dir, key));
            }
            tree.add(&mut file, key, value).map_err(io(&data_path))?;
            previous.clear();
            previous.extend_from_slice(key);
            Ok(())
        };
        if self.runs.is_empty() {
            self.sort_pending();
            for &at in &self.starts {
                add(&self.pending[at..])?;
            }
        } else {
            self.spill_run()?;
            let mut spill = self.spill.take().expect("runs were spilled");
            // Merge FAN_IN runs at a time into longer ones (appended to the same file) until
            // few enough are left to merge into the tree: open files and buffers stay bounded.
            while self.runs.len() > FAN_IN {
                spill.flush().map_err(io(&self.spill_path))?;
                let group: Vec<_> = self.runs.drain(..FAN_IN).collect();
                let start = self.spilled_bytes;
                merge_runs(&self.spill_path, &group, |record| {
                    self.spilled_bytes += record.len() as u64;
                    spill.write_all(record).map_err(io(&self.spill_path))
                })?;
                self.runs.push((start, self.spilled_bytes - start));
            }
            spill.into_inner().map_err(|e| io(&self.spill_path)(e.into_error()))?;
            merge_runs(&self.spill_path, &self.runs, &mut add)?;
            let _ = std::fs::remove_file(&self.spill_path);
        }
        let main = tree.finish(&mut file, self.overflow_pages, self.entries).map_err(io(&data_path))?;
        let last_page = main.next_page - 1;
        let file_bytes = (last_page + 1) * PAGE as u64;
        let map_size = (file_bytes * 2 + (64 << 20)).next_power_of_two();
        let empty = Meta { txnid: 0, last_page: 1, map_size, main: Db::empty() };
        let loaded = Meta { txnid: 1, last_page, map_size, main: main.db };
        file.write_all_at(&empty.page(0), 0).map_err(io(&data_path))?;
        file.write_all_at(&loaded.page(1), PAGE as u64).map_err(io(&data_path))?;
        file.sync_data().map_err(io(&data_path))?;

        let env = lmdb::Environment::new()
            .set_flags(lmdb::EnvironmentFlags::READ_ONLY)
            .open(&self.dir)
            .map_err(|source| Error::Lmdb { path: self.dir.display().to_string(), source })?;
        let stat = env.stat().map_err(|source| Error::Lmdb { path: self.dir.display().to_string(), source })?;
        if stat.entries() as u64 != self.entries {
            return Err(Error::Internal(format!(
                "{}: LMDB reads {} entries, {} were written",
                self.dir.display(),
                stat.entries(),
                self.entries
            )));
        }
        Ok(())
    }
}

impl Drop for LmdbWriter {
    fn drop(&mut self) {
        if self.spill.take().is_some() || !self.runs.is_empty() {
            let _ = std::fs::remove_file(&self.spill_path);
        }
    }
}

/// Appends bytes to a file from threads of its own, in chunks (4 MiB by default), so writing
/// overlaps with producing the bytes (reading and checking the input): the job takes about as
/// long as the slower of the two, not the sum. At most [`CHUNKS`] chunks exist, so a slow disk
/// holds the producer back.
///
/// Where the filesystem allows it (Linux, not tmpfs), chunks are written with `O_DIRECT`: the
/// disk reads them straight from our buffer, with no copy into the page cache and no writeback
/// left for the final sync, which leaves the CPU to the reading side. Elsewhere they are
/// written through the page cache, with writeback started as they go.
struct Appender {
    current: Chunk,
    /// File offset of `current`'s first byte.
    offset: u64,
    file: Option<Arc<File>>,
    full: Option<SyncSender<Chunk>>,
    empty: Receiver<Chunk>,
    /// Chunks made so far (made as needed, up to [`CHUNKS`]: small databases allocate little).
    made: usize,
    threads: Vec<JoinHandle<std::io::Result<()>>>,
}

/// Default chunk size.
const CHUNK: usize = 4 << 20;
/// Chunks written at once: two requests in flight keep a fast disk busier than one.
const WRITERS: usize = 2;
const CHUNKS: usize = WRITERS + 2;

/// Up to `size` bytes starting at a page-aligned address, as `O_DIRECT` needs, and the file
/// offset they go to. (Filled by appending, so the buffer is never zeroed first.)
struct Chunk {
    raw: Vec<u8>,
    start: usize,
    size: usize,
    offset: u64,
}

impl Chunk {
    fn new(size: usize) -> Self {
        let mut raw: Vec<u8> = Vec::with_capacity(size + PAGE);
        let start = raw.as_ptr().align_offset(PAGE).min(PAGE);
        raw.resize(start, 0);
        Chunk { raw, start, size, offset: 0 }
    }

    fn is_full(&self) -> bool {
        self.len() == self.size
    }

    fn len(&self) -> usize {
        self.raw.len() - self.start
    }

    fn bytes(&self) -> &[u8] {
        &self.raw[self.start..]
    }

    /// Copies in as much of `bytes` as fits; returns how much.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = (self.size - self.len()).min(bytes.len());
        self.raw.extend_from_slice(&bytes[..n]);
        n
    }

    fn clear(&mut self) {
        self.raw.truncate(self.start);
    }
}

/// The writing threads stopped (their results say why).
struct Stopped;

/// Opens `path` again for direct writes, where the OS and filesystem support them.
fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        File::options().write(true).custom_flags(libc::O_DIRECT).open(path).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Writes `chunk` at its offset: directly while `direct` is there, through the page cache
/// (starting its writeback) otherwise or once the filesystem refuses a direct write.
fn write_chunk(chunk: &Chunk, direct: &mut Option<File>, file: &File) -> std::io::Result<()> {
    let bytes = chunk.bytes();
    if let Some(out) = direct.as_ref().filter(|_| bytes.len().is_multiple_of(PAGE)) {
        match out.write_all_at(bytes, chunk.offset) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => *direct = None,
            Err(e) => return Err(e),
        }
    }
    file.write_all_at(bytes, chunk.offset)?;
    start_writeback(file, chunk.offset, chunk.offset + bytes.len() as u64);
    Ok(())
}

impl Appender {
    /// Appends to `file` (at `path`) from `offset` in chunks of `chunk` bytes (a multiple of
    /// [`PAGE`]); [`finish`](Self::finish) hands `file` back with its cursor at the end.
    /// `direct`: try `O_DIRECT` writes.
    fn new(file: File, path: &Path, offset: u64, direct: bool, chunk: usize) -> Self {
        let file = Arc::new(file);
        let (full_tx, full_rx) = sync_channel::<Chunk>(CHUNKS);
        let (empty_tx, empty_rx) = sync_channel::<Chunk>(CHUNKS);
        let full_rx = Arc::new(std::sync::Mutex::new(full_rx));
        let threads = (0..WRITERS)
            .map(|_| {
                let (full_rx, empty_tx, file) = (full_rx.clone(), empty_tx.clone(), file.clone());
                let mut direct = if direct { open_direct(path) } else { None };
                std::thread::Builder::new()
                    .name("lmdb-writer".into())
                    .spawn(move || {
                        loop {
                            let next =
                                full_rx.lock().map_err(|_| std::io::Error::other("a writer thread panicked"))?.recv();
                            let Ok(mut chunk) = next else { return Ok(()) };
                            write_chunk(&chunk, &mut direct, &file)?;
                            chunk.clear();
                            let _ = empty_tx.send(chunk);
                        }
                    })
                    .expect("spawning an LMDB writer thread")
            })
            .collect();
        Appender {
            current: Chunk::new(chunk),
            offset,
            file: Some(file),
            full: Some(full_tx),
            empty: empty_rx,
            made: 1,
            threads,
        }
    }

    fn append(&mut self, mut bytes: &[u8]) -> Result<(), Stopped> {
        while !bytes.is_empty() {
            let n = self.current.fill(bytes);
            bytes = &bytes[n..];
            if self.current.is_full() {
                self.send()?;
            }
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), Stopped> {
        let next = match self.empty.try_recv() {
            Ok(chunk) => chunk,
            Err(_) if self.made < CHUNKS => {
                self.made += 1;
                Chunk::new(self.current.size)
            }
            Err(_) => self.empty.recv().map_err(|_| Stopped)?,
        };
        let mut full = std::mem::replace(&mut self.current, next);
        full.offset = self.offset;
        self.offset += full.len() as u64;
        self.full.as_ref().expect("not finished").send(full).map_err(|_| Stopped)
    }

    /// Writes what is left and hands the file back (cursor at the end), or a thread's error.
    fn finish(mut self) -> std::io::Result<File> {
        let sent = if self.current.len() == 0 { Ok(()) } else { self.send() };
        self.full = None;
        let mut result = Ok(());
        for thread in self.threads.drain(..) {
            let joined = thread.join().unwrap_or_else(|_| Err(std::io::Error::other("an LMDB writer thread panicked")));
            if result.is_ok() {
                result = joined;
            }
        }
        result?;
        if sent.is_err() {
            return Err(std::io::Error::other("the LMDB writer threads stopped early"));
        }
        let end = self.offset;
        let file = self.file.take().expect("finished once");
        let mut file = Arc::try_unwrap(file).map_err(|_| std::io::Error::other("the LMDB file is still shared"))?;
        file.seek(SeekFrom::Start(end))?;
        Ok(file)
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.full = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Asks the kernel to start writing back `from..to` (Linux), so the final sync has little left
/// to wait for and dirty pages stay few.
fn start_writeback(file: &File, from: u64, to: u64) {
    #[cfg(target_os = "linux")]
    if to > from {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; failing only loses the hint.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                from as libc::off64_t,
                (to - from) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, to);
}

/// Most runs merged at once.
const FAN_IN: usize = 64;

/// Calls `each` with every record of the sorted `runs` of `path`, in key order (equal keys in
/// run order).
fn merge_runs(path: &Path, runs: &[(u64, u64)], mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let mut heads = Vec::with_capacity(runs.len());
    for &(start, len) in runs {
        let mut file = File::open(path).map_err(io(path))?;
        file.seek(SeekFrom::Start(start)).map_err(io(path))?;
        heads.push(RunReader { reader: BufReader::with_capacity(256 << 10, file.take(len)), record: Vec::new() });
    }
    let mut heap = BinaryHeap::new();
    for (i, head) in heads.iter_mut().enumerate() {
        if head.next().map_err(io(path))? {
            heap.push(Reverse((head.key().to_vec(), i)));
        }
    }
    while let Some(Reverse((_, i))) = heap.pop() {
        each(&heads[i].record)?;
        if heads[i].next().map_err(io(path))? {
            heap.push(Reverse((heads[i].key().to_vec(), i)));
        }
    }
    Ok(())
}

fn duplicate(dir: &Path, key: &[u8]) -> Error {
    Error::Format {
        path: dir.display().to_string(),
        reason: format!("key {} was put twice", String::from_utf8_lossy(key)),
    }
}

/// One spilled run, read record by record.
struct RunReader {
    reader: BufReader<std::io::Take<File>>,
    record: Vec<u8>,
}

impl RunReader {
    /// Reads the next record; false at the end of the run.
    fn next(&mut self) -> std::io::Result<bool> {
        self.record.clear();
        let mut klen = [0u8; 2];
        match self.reader.read_exact(&mut klen) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        }
        let klen = u16::from_le_bytes(klen) as usize;
        self.record.extend_from_slice(&(klen as u16).to_le_bytes());
        self.record.resize(2 + klen + 5, 0);
        self.reader.read_exact(&mut self.record[2..])?;
        let kind = self.record[2 + klen];
        let len = u32::from_le_bytes(self.record[3 + klen..7 + klen].try_into().unwrap()) as usize;
        let rest = if kind == 0 { len } else { 8 };
        let at = self.record.len();
        self.record.resize(at + rest, 0);
        self.reader.read_exact(&mut self.record[at..])?;
        Ok(true)
    }

    fn key(&self) -> &[u8] {
        record_key(&self.record, 0)
    }
}

/// `MDB_db`.
#[derive(Clone, Copy)]
struct Db {
    depth: u16,
    branch_pages: u64,
    leaf_pages: u64,
    overflow_pages: u64,
    entries: u64,
    root: u64,
}

impl Db {
    fn empty() -> Self {
        Db { depth: 0, branch_pages: 0, leaf_pages: 0, overflow_pages: 0, entries: 0, root: INVALID }
    }

    fn write(&self, out: &mut Vec<u8>, pad: u32, flags: u16) {
        out.extend_from_slice(&pad.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.depth.to_le_bytes());
        for v in [self.branch_pages, self.leaf_pages, self.overflow_pages, self.entries, self.root] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// `MDB_meta` on its page.
struct Meta {
    txnid: u64,
    last_page: u64,
    map_size: u64,
    main: Db,
}

impl Meta {
    fn page(&self, pgno: u64) -> Vec<u8> {
        let mut page = Vec::with_capacity(PAGE);
        page.extend_from_slice(&pgno.to_le_bytes());
        page.extend_from_slice(&0u16.to_le_bytes());
        page.extend_from_slice(&P_META.to_le_bytes());
        page.extend_from_slice(&[0; 4]);
        page.extend_from_slice(&MAGIC.to_le_bytes());
        page.extend_from_slice(&DATA_VERSION.to_le_bytes());
        page.extend_from_slice(&0u64.to_le_bytes()); // mm_address
        page.extend_from_slice(&self.map_size.to_le_bytes());
        // The free database (empty; its md_pad is the page size, its flags the env's).
        Db::empty().write(&mut page, PAGE as u32, MDB_INTEGERKEY);
        self.main.write(&mut page, 0, 0);
        page.extend_from_slice(&self.last_page.to_le_bytes());
        page.extend_from_slice(&self.txnid.to_le_bytes());
        page.resize(PAGE, 0);
        page
    }
}

/// A page being filled with nodes.
struct PageBuf {
    page: Box<[u8; PAGE]>,
    count: usize,
    upper: usize,
}

impl PageBuf {
    fn new() -> Self {
        PageBuf { page: Box::new([0; PAGE]), count: 0, upper: PAGE }
    }

    fn room(&self) -> usize {
        self.upper - (HEADER + 2 * self.count)
    }

    /// Adds a node of `size` bytes (already even) made of `header` + `key` + `data`.
    fn push(&mut self, size: usize, header: [u16; 4], key: &[u8], data: &[u8]) {
        let at = self.upper - size;
        for (i, v) in header.iter().enumerate() {
            self.page[at + 2 * i..at + 2 * i + 2].copy_from_slice(&v.to_le_bytes());
        }
        self.page[at + NODE_HEADER..at + NODE_HEADER + key.len()].copy_from_slice(key);
        let data_at = at + NODE_HEADER + key.len();
        self.page[data_at..data_at + data.len()].copy_from_slice(data);
        let ptr = HEADER + 2 * self.count;
        self.page[ptr..ptr + 2].copy_from_slice(&(at as u16).to_le_bytes());
        self.count += 1;
        self.upper = at;
    }

    /// Finishes the header and hands the page out, leaving this buffer empty.
    fn take(&mut self, pgno: u64, flags: u16) -> Box<[u8; PAGE]> {
        let lower = (HEADER + 2 * self.count) as u16;
        self.page[..8].copy_from_slice(&pgno.to_le_bytes());
        self.page[8..10].copy_from_slice(&0u16.to_le_bytes());
        self.page[10..12].copy_from_slice(&flags.to_le_bytes());
        self.page[12..14].copy_from_slice(&lower.to_le_bytes());
        self.page[14..16].copy_from_slice(&(self.upper as u16).to_le_bytes());
        self.count = 0;
        self.upper = PAGE;
        std::mem::replace(&mut self.page, Box::new([0; PAGE]))
    }
}

/// Packs sorted entries into full leaf pages, then builds the branch levels.
struct TreeBuilder {
    next_page: u64,
    leaf: PageBuf,
    /// The first key of the leaf being filled.
    leaf_first: Vec<u8>,
    /// (first key, page) of every finished leaf: the level above's entries.
    leaves: Vec<(Vec<u8>, u64)>,
    out: Vec<u8>,
}

struct Built {
    db: Db,
    next_page: u64,
}

impl TreeBuilder {
    fn new(next_page: u64) -> Self {
        TreeBuilder {
            next_page,
            leaf: PageBuf::new(),
            leaf_first: Vec::new(),
            leaves: Vec::new(),
            out: Vec::with_capacity(1 << 20),
        }
    }

    fn add(&mut self, file: &mut File, key: &[u8], value: Value<'_>) -> std::io::Result<()> {
        let pgno_bytes;
        let (data, flags, len): (&[u8], u16, u32) = match value {
            Value::Inline(v) => (v, 0, v.len() as u32),
            Value::Overflow { pgno, len } => {
                pgno_bytes = pgno.to_le_bytes();
                (&pgno_bytes, F_BIGDATA, len)
            }
        };
        let size = even(NODE_HEADER + key.len() + data.len());
        if self.leaf.count > 0 && size + 2 > self.leaf.room() {
            self.close_leaf(file)?;
        }
        if self.leaf.count == 0 {
            self.leaf_first.clear();
            self.leaf_first.extend_from_slice(key);
        }
        self.leaf.push(size, [len as u16, (len >> 16) as u16, flags, key.len() as u16], key, data);
        Ok(())
    }

    fn close_leaf(&mut self, file: &mut File) -> std::io::Result<()> {
        let pgno = self.next_page;
        let page = self.leaf.take(pgno, P_LEAF);
        self.write_page(file, &page[..])?;
        self.leaves.push((std::mem::take(&mut self.leaf_first), pgno));
        Ok(())
    }

    fn write_page(&mut self, file: &mut File, page: &[u8]) -> std::io::Result<()> {
        self.out.extend_from_slice(page);
        self.next_page += 1;
        if self.out.len() >= 1 << 20 {
            file.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }

    fn finish(mut self, file: &mut File, overflow_pages: u64, entries: u64) -> std::io::Result<Built> {
        if self.leaf.count > 0 {
            self.close_leaf(file)?;
        }
        let mut db = Db { overflow_pages, entries, ..Db::empty() };
        if self.leaves.is_empty() {
            file.write_all(&self.out)?;
            return Ok(Built { db, next_page: self.next_page });
        }
        db.leaf_pages = self.leaves.len() as u64;
        db.depth = 1;
        let mut level = std::mem::take(&mut self.leaves);
        while level.len() > 1 {
            level = self.branch_level(file, &level)?;
            db.branch_pages += level.len() as u64;
            db.depth += 1;
        }
        db.root = level[0].1;
        file.write_all(&self.out)?;
        Ok(Built { db, next_page: self.next_page })
    }

    /// Writes branch pages over `children` (first key, page); returns this level's entries.
    /// Every page's first node has an empty key, as LMDB writes it; every page gets at least
    /// two children.
    fn branch_level(&mut self, file: &mut File, children: &[(Vec<u8>, u64)]) -> std::io::Result<Vec<(Vec<u8>, u64)>> {
        let size = |key_len: usize| even(NODE_HEADER + key_len) + 2;
        // Group greedily, then let the last page borrow a child if it was left with one.
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        let (mut start, mut used) = (0, 0);
        for (i, (key, _)) in children.iter().enumerate() {
            let need = if i == start { size(0) } else { size(key.len()) };
            if i > start && used + need > PAGE - HEADER {
                groups.push(start..i);
                (start, used) = (i, size(0));
            } else {
                used += need;
            }
        }
        groups.push(start..children.len());
        let n = groups.len();
        if n > 1 && groups[n - 1].len() == 1 {
            groups[n - 2].end -= 1;
            groups[n - 1].start -= 1;
        }
        let mut page = PageBuf::new();
        let mut level = Vec::with_capacity(n);
        for group in groups {
            for (j, (key, child)) in children[group.clone()].iter().enumerate() {
                let key: &[u8] = if j == 0 { &[] } else { key };
                let header = [*child as u16, (*child >> 16) as u16, (*child >> 32) as u16, key.len() as u16];
                page.push(even(NODE_HEADER + key.len()), header, key, &[]);
            }
            let pgno = self.next_page;
            let built = page.take(pgno, P_BRANCH);
            self.write_page(file, &built[..])?;
            level.push((children[group.start].0.clone(), pgno));
        }
        Ok(level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmdb::{Cursor, Transaction};

    fn read_all(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
        let env = lmdb::Environment::new().set_flags(lmdb::EnvironmentFlags::READ_ONLY).open(dir).unwrap();
        let db = env.open_db(None).unwrap();
        let txn = env.begin_ro_txn().unwrap();
        let mut cursor = txn.open_ro_cursor(db).unwrap();
        cursor.iter_start().map(|r| r.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    fn random_entries(n: usize, seed: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut seen = std::collections::HashSet::new();
        let mut entries = Vec::new();
        while entries.len() < n {
            // Keys of 1..=511 bytes (mostly short), values from empty to several pages, around
            // the inline/overflow boundary too.
            let klen = if rng.random_bool(0.1) { rng.random_range(100..=MAX_KEY) } else { rng.random_range(1..24) };
            let key: Vec<u8> = (0..klen).map(|_| rng.random_range(b'0'..=b'z')).collect();
            if !seen.insert(key.clone()) {
                continue;
            }
            let vlen = match rng.random_range(0..4) {
                0 => rng.random_range(0..64),
                1 => rng.random_range(NODE_MAX - NODE_HEADER - klen - 4..NODE_MAX - NODE_HEADER - klen + 4),
                2 => rng.random_range(PAGE - 40..PAGE + 40),
                _ => rng.random_range(0..40_000),
            };
            let mut value = vec![0u8; vlen];
            rng.fill(&mut value[..]);
            entries.push((key, value));
        }
        entries
    }

    fn write(dir: &Path, entries: &[(Vec<u8>, Vec<u8>)], run_bytes: usize) -> Result<()> {
        write_with(dir, entries, run_bytes, true)
    }

    /// `run_bytes` 0: `with_memory(2 MiB)` (small chunks and runs) instead of setting it.
    fn write_with(dir: &Path, entries: &[(Vec<u8>, Vec<u8>)], run_bytes: usize, direct: bool) -> Result<()> {
        let mut writer = LmdbWriter::create_with(dir, direct)?;
        if run_bytes == 0 {
            writer = writer.with_memory(2 << 20);
            assert_eq!((writer.run_bytes, writer.chunk), ((2 << 20) * 4 / 5, 25 * PAGE));
        } else {
            writer.run_bytes = run_bytes;
        }
        for (k, v) in entries {
            writer.put(k, v)?;
        }
        writer.finish()
    }

    /// What LMDB reads back (cursor order, point lookups and its statistics) is what was put,
    /// for trees three levels deep, in memory and through spilled runs.
    #[test]
    fn lmdb_reads_back_every_entry() {
        for (n, run_bytes, direct) in [
            (1, RUN_BYTES, true),
            (3000, RUN_BYTES, true),
            (3000, 50_000, true),
            (3000, 2_000, true),
            (3000, RUN_BYTES, false),
            (3000, 0, true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let entries = random_entries(n, n as u64 + run_bytes as u64);
            write_with(dir.path(), &entries, run_bytes, direct).unwrap();
            assert!(dir.path().join("lock.mdb").exists());
            assert!(!dir.path().join(".cnclip-sort-runs").exists());
            let mut sorted = entries.clone();
            sorted.sort();
            assert_eq!(read_all(dir.path()), sorted, "{n} entries, runs of {run_bytes} bytes, direct {direct}");

            let env = lmdb::Environment::new().set_flags(lmdb::EnvironmentFlags::READ_ONLY).open(dir.path()).unwrap();
            let db = env.open_db(None).unwrap();
            let txn = env.begin_ro_txn().unwrap();
            for (k, v) in &entries {
                assert_eq!(txn.get(db, k).unwrap(), &v[..]);
            }
            assert_eq!(txn.get(db, b"\xff-not-there"), Err(lmdb::Error::NotFound));
            let stat = env.stat().unwrap();
            assert_eq!(stat.entries(), n);
            if n > 1 {
                assert!(stat.depth() >= 3, "depth {}", stat.depth());
            }
            let pages = std::fs::metadata(dir.path().join("data.mdb")).unwrap().len() / PAGE as u64;
            assert_eq!(
                pages,
                2 + (stat.branch_pages() + stat.leaf_pages() + stat.overflow_pages()) as u64,
                "every page is accounted for"
            );

            // LMDB itself, given the same puts, puts the same values on overflow pages (the
            // inline/overflow rule and page counts are its own).
            let reference = tempfile::tempdir().unwrap();
            let lmdb_env = lmdb::Environment::new().set_map_size(1 << 30).open(reference.path()).unwrap();
            let lmdb_db = lmdb_env.open_db(None).unwrap();
            let mut txn = lmdb_env.begin_rw_txn().unwrap();
            for (k, v) in &entries {
                txn.put(lmdb_db, k, v, lmdb::WriteFlags::empty()).unwrap();
            }
            txn.commit().unwrap();
            assert_eq!(lmdb_env.stat().unwrap().overflow_pages(), stat.overflow_pages());
        }
    }

    #[test]
    fn an_empty_database_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[], RUN_BYTES).unwrap();
        assert_eq!(read_all(dir.path()), vec![]);
    }

    /// LMDB can go on writing to a loaded database: inserts split our full pages, deletes
    /// free our overflow pages, and nothing it allocates lands on a page we wrote.
    #[test]
    fn lmdb_keeps_writing_to_a_loaded_database() {
        let dir = tempfile::tempdir().unwrap();
        let entries = random_entries(2000, 7);
        write(dir.path(), &entries, RUN_BYTES).unwrap();
        let more = random_entries(4000, 8);
        let mut expected: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = entries.iter().cloned().collect();
        {
            let env = lmdb::Environment::new().set_map_size(1 << 30).open(dir.path()).unwrap();
            let db = env.open_db(None).unwrap();
            let mut txn = env.begin_rw_txn().unwrap();
            for (k, _) in entries.iter().step_by(3) {
                txn.del(db, k, None).unwrap();
                expected.remove(k);
            }
            for (k, v) in &more {
                txn.put(db, k, v, lmdb::WriteFlags::empty()).unwrap();
                expected.insert(k.clone(), v.clone());
            }
            txn.commit().unwrap();
        }
        let expected: Vec<_> = expected.into_iter().collect();
        assert_eq!(read_all(dir.path()), expected);
    }

    /// A failing write (here: a descriptor opened read-only) stops the writer threads and comes
    /// back as the error, from whichever call meets it first; nothing hangs. With `direct` the
    /// path cannot be opened for `O_DIRECT` (it does not exist), so that falls back as well.
    #[test]
    fn a_write_error_comes_back_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.mdb");
        std::fs::write(&path, b"").unwrap();
        for direct in [false, true] {
            let read_only = File::open(&path).unwrap();
            let mut appender = Appender::new(read_only, &dir.path().join("not-there"), 0, direct, 16 * PAGE);
            let page = vec![1u8; PAGE];
            let stopped = (0..(CHUNKS + 2) * 16).any(|_| appender.append(&page).is_err());
            let error = appender.finish().unwrap_err();
            assert!(stopped || error.raw_os_error() == Some(libc::EBADF), "{error}");
            assert_eq!(error.raw_os_error(), Some(libc::EBADF), "direct {direct}: {error}");
        }
    }

    #[test]
    fn a_repeated_key_is_named() {
        for run_bytes in [RUN_BYTES, 100] {
            let dir = tempfile::tempdir().unwrap();
            let entries = vec![(b"7".to_vec(), vec![1; 5000]), (b"8".to_vec(), vec![2]), (b"7".to_vec(), vec![3])];
            let err = write(dir.path(), &entries, run_bytes).unwrap_err().to_string();
            assert!(err.contains("key 7 was put twice"), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let err = write(dir.path(), &[(vec![b'k'; 512], vec![])], RUN_BYTES).unwrap_err().to_string();
        assert!(err.contains("1 to 511 bytes; got 512"), "{err}");
    }

    #[test]
    fn constants_are_lmdbs() {
        assert_eq!(NODE_MAX, 2038);
        assert_eq!(overflow_pages(4080), 1);
        assert_eq!(overflow_pages(4081), 2);
    }
}
