//! Where the checked LMDB reader's bytes come from: a local `data.mdb` read with `pread`, or an
//! object in a store (`s3://…/imgs/data.mdb`) read by ranged GETs, without downloading it first.
//!
//! The walk asks for one page (4 KiB) at a time, and a lookup for a few pages of which the
//! upper ones (branch pages) are shared by every lookup. A GET per page would make a walk of
//! a split cost one request per page, each paying a round trip; so an object is read in
//! aligned blocks of [`BLOCK`] bytes kept in a bounded least-recently-used cache ([`Blocks`]).
//! A miss right after blocks already read (a walk's leaves, a long value) fetches a run of
//! blocks in one GET, twice as many as are cached just before it, up to [`MAX_RUN`]: a reader
//! going forward (or several at once: `imgs`' leaves in key order and their values in arrival
//! order) costs about `size / (BLOCK · MAX_RUN)` requests. A miss elsewhere (a random `get`)
//! fetches one block, and lookups reuse the cached branch pages. At most [`CAPACITY`] blocks are
//! held per file, the least recently used dropped first.
//!
//! A local file is read as before: `pread` straight into the caller's buffer, no cache, no copy.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;

use crate::storage::{self, Location};

/// The bytes of an object's block: a GET reads whole aligned blocks.
pub(crate) const BLOCK: u64 = 256 << 10;

/// The most blocks one GET reads (a sequential run: 4 MiB).
pub(crate) const MAX_RUN: u64 = 16;

/// The most blocks a file's cache holds (32 MiB).
pub(crate) const CAPACITY: usize = 128;

/// An LMDB file opened for reading at offsets.
pub(crate) enum Reader {
    /// A local file: `pread`.
    Local(File),
    /// An object, or anything else read by ranges: through a block cache.
    Blocks(Blocks),
}

impl Reader {
    /// Opens the file or object `path`; returns it and its size in bytes.
    ///
    /// # Errors
    /// The OS error of opening a file; the store's of asking an object's size (a missing
    /// object: `NotFound`, naming it).
    pub(crate) fn open(path: &Path) -> io::Result<(Reader, u64)> {
        match storage::locate(path)? {
            Location::Local(path) => {
                let file = storage::open(&path)?;
                let size = file.metadata()?.len();
                Ok((Reader::Local(file), size))
            }
            Location::Remote(remote) => {
                let size = remote.size()?;
                Ok((Reader::Blocks(Blocks::new(size, move |range| remote.read_range(range))), size))
            }
        }
    }

    /// Fills `buf` with the bytes at `offset`.
    ///
    /// # Errors
    /// `UnexpectedEof` when the file ends first; the OS's or the store's error.
    pub(crate) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Reader::Local(file) => file.read_exact_at(buf, offset),
            Reader::Blocks(blocks) => blocks.read_exact_at(buf, offset),
        }
    }

    /// Reads into `buf` from `offset` until it is full or the file ends; returns the bytes read.
    ///
    /// # Errors
    /// The OS's or the store's error.
    pub(crate) fn read_up_to(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self {
            Reader::Local(file) => {
                let mut got = 0;
                while got < buf.len() {
                    match file.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(got)
            }
            Reader::Blocks(blocks) => {
                let end = offset.saturating_add(buf.len() as u64).min(blocks.size);
                let got = end.saturating_sub(offset) as usize;
                if got > 0 {
                    blocks.read_exact_at(&mut buf[..got], offset)?;
                }
                Ok(got)
            }
        }
    }
}

/// Reads a range of the underlying object (a ranged GET).
type Fetch = dyn Fn(Range<u64>) -> io::Result<Bytes> + Send + Sync;

/// An object of `size` bytes read through a cache of aligned [`BLOCK`]-byte blocks (see the
/// module docs). Safe to share between threads; a miss holds the cache while its GET runs (one
/// reader per file is the use: a source's thread).
pub(crate) struct Blocks {
    fetch: Box<Fetch>,
    size: u64,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// Block number → its bytes and when it was last used.
    blocks: HashMap<u64, (Bytes, u64)>,
    /// A clock ticked at each use.
    clock: u64,
}

impl Blocks {
    /// An object of `size` bytes whose ranges `fetch` reads.
    pub(crate) fn new(size: u64, fetch: impl Fn(Range<u64>) -> io::Result<Bytes> + Send + Sync + 'static) -> Self {
        Blocks { fetch: Box::new(fetch), size, cache: Mutex::new(Cache::default()) }
    }

    /// Fills `buf` with the bytes at `offset`, from cached blocks, fetching the missing ones.
    ///
    /// # Errors
    /// `UnexpectedEof` when the object ends before `buf` is full (nothing is fetched); the
    /// fetch's error, or `InvalidData` when it returns fewer bytes than asked.
    pub(crate) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("bytes {offset}..+{} are past the end ({} bytes)", buf.len(), self.size),
            ));
        }
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (number, within) = (at / BLOCK, (at % BLOCK) as usize);
            let block = match cache.get(number) {
                Some(block) => block,
                None => self.fill(&mut cache, number)?,
            };
            let n = (block.len().saturating_sub(within)).min(buf.len() - done);
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("block {number} came back short")));
            }
            buf[done..done + n].copy_from_slice(&block[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// Fetches block `number` (and, continuing a sequential read, the run after it) into the
    /// cache; returns it.
    fn fill(&self, cache: &mut Cache, number: u64) -> io::Result<Bytes> {
        let blocks = self.size.div_ceil(BLOCK);
        // Blocks just before this one already read: a sequential reader's (a walk's leaves,
        // a long value; several at once), which reads ahead twice as far as it has come.
        let behind = (1..=MAX_RUN.min(number)).take_while(|i| cache.blocks.contains_key(&(number - i))).count() as u64;
        let run = (2 * behind).clamp(1, MAX_RUN);
        let mut count = 1;
        while count < run && number + count < blocks && !cache.blocks.contains_key(&(number + count)) {
            count += 1;
        }
        let start = number * BLOCK;
        let end = ((number + count) * BLOCK).min(self.size);
        let bytes = (self.fetch)(start..end)?;
        if bytes.len() as u64 != end - start {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("asked for bytes {start}..{end}, got {} bytes", bytes.len()),
            ));
        }
        let block = |i: u64| bytes.slice((i * BLOCK) as usize..((i + 1) * BLOCK).min(end - start) as usize);
        for i in 0..count {
            cache.insert(number + i, block(i));
        }
        Ok(block(0))
    }
}

impl Cache {
    /// A cached block, marked as just used.
    fn get(&mut self, number: u64) -> Option<Bytes> {
        self.clock += 1;
        let clock = self.clock;
        self.blocks.get_mut(&number).map(|(bytes, used)| {
            *used = clock;
            bytes.clone()
        })
    }

    /// Caches a block, dropping the least recently used ones past [`CAPACITY`].
    fn insert(&mut self, number: u64, bytes: Bytes) {
        self.clock += 1;
        self.blocks.insert(number, (bytes, self.clock));
        while self.blocks.len() > CAPACITY {
            let Some(oldest) = self.blocks.iter().min_by_key(|(_, (_, used))| *used).map(|(n, _)| *n) else { break };
            self.blocks.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Blocks over `data`, counting the fetches and the bytes fetched.
    fn counted(data: Arc<Vec<u8>>) -> (Blocks, Arc<AtomicU64>, Arc<AtomicU64>) {
        let (fetches, fetched) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (f, b) = (fetches.clone(), fetched.clone());
        let blocks = Blocks::new(data.len() as u64, move |range: Range<u64>| {
            f.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(range.end - range.start, Ordering::Relaxed);
            assert_eq!(range.start % BLOCK, 0, "an aligned block");
            Ok(Bytes::copy_from_slice(&data[range.start as usize..range.end as usize]))
        });
        (blocks, fetches, fetched)
    }

    #[test]
    fn cached_reads_give_the_files_bytes_across_block_boundaries() {
        let mut rng = StdRng::seed_from_u64(5);
        // Not a whole number of blocks: the last one is short.
        let len = 40 * BLOCK as usize + 1234;
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.mdb");
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        // Through the storage seam's ranged reads, as an object is read.
        let ranged = {
            let path = path.clone();
            Blocks::new(len as u64, move |range| storage::read_range(&path, range))
        };
        let (counting, _, _) = counted(Arc::new(data.clone()));
        for _ in 0..2000 {
            let n = match rng.random_range(0..4) {
                0 => rng.random_range(0..16),
                1 => 4096,
                2 => rng.random_range(1..3 * BLOCK as usize),
                _ => rng.random_range(BLOCK as usize - 10..BLOCK as usize + 10),
            };
            let offset = match rng.random_range(0..3) {
                // Just before a block boundary.
                0 => (rng.random_range(1..=40) * BLOCK).saturating_sub(rng.random_range(0..64)),
                _ => rng.random_range(0..len as u64),
            };
            let mut expected = vec![0u8; n];
            let local = file.read_exact_at(&mut expected, offset);
            for blocks in [&ranged, &counting] {
                let mut got = vec![0u8; n];
                match (&local, blocks.read_exact_at(&mut got, offset)) {
                    (Ok(()), Ok(())) => assert!(got == expected, "{n} bytes at {offset}"),
                    (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind(), "{n} bytes at {offset}"),
                    (a, b) => panic!("{n} bytes at {offset}: pread {a:?}, cached {b:?}"),
                }
            }
        }
        // read_up_to stops at the end, as a short pread does.
        let reader = Reader::Blocks(counted(Arc::new(data.clone())).0);
        let mut tail = vec![0u8; 5000];
        assert_eq!(reader.read_up_to(&mut tail, len as u64 - 100).unwrap(), 100);
        assert_eq!(&tail[..100], &data[len - 100..]);
        assert_eq!(reader.read_up_to(&mut tail, len as u64 + 7).unwrap(), 0);
    }

    #[test]
    fn a_sequential_read_takes_runs_of_blocks_and_the_cache_stays_bounded() {
        let blocks_in_file = 3 * CAPACITY as u64;
        let data = Arc::new((0..blocks_in_file * BLOCK).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let (blocks, fetches, fetched) = counted(data.clone());
        // Page by page, front to back, as a walk reads.
        let mut page = vec![0u8; 4096];
        for offset in (0..data.len() as u64).step_by(4096) {
            blocks.read_exact_at(&mut page, offset).unwrap();
            assert!(page[..] == data[offset as usize..offset as usize + 4096], "{offset}");
        }
        let pages = data.len() as u64 / 4096;
        let requests = fetches.load(Ordering::Relaxed);
        // Runs double up to MAX_RUN blocks: about size / (BLOCK · MAX_RUN) requests, each byte
        // fetched once.
        assert!(requests <= blocks_in_file / MAX_RUN + 8, "{requests} requests for {pages} pages");
        assert_eq!(fetched.load(Ordering::Relaxed), data.len() as u64);
        assert!(blocks.cache.lock().unwrap().blocks.len() <= CAPACITY);

        // Random lookups that share their upper pages (block 0) fetch that block once while it
        // stays in use, and one block per miss elsewhere.
        let (blocks, fetches, fetched) = counted(data.clone());
        let mut rng = StdRng::seed_from_u64(9);
        let mut expected_requests = 0;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            blocks.read_exact_at(&mut page, 8192).unwrap();
            let block = rng.random_range(1..blocks_in_file);
            blocks.read_exact_at(&mut page, block * BLOCK + 4096).unwrap();
            assert!(page[..] == data[(block * BLOCK + 4096) as usize..(block * BLOCK + 8192) as usize]);
            if seen.insert(block) {
                expected_requests += 1;
            }
        }
        // The 50 blocks fit the cache, so none is fetched twice (and one after a cached block
        // comes with the next ones: at most one request per distinct block).
        let requests = fetches.load(Ordering::Relaxed);
        assert!(requests <= expected_requests + 1, "{requests} requests, {expected_requests} distinct blocks");
        assert!(fetched.load(Ordering::Relaxed) <= (expected_requests + 1) * BLOCK * MAX_RUN);
    }

    #[test]
    fn a_fetch_that_fails_or_comes_back_short_is_an_error() {
        let failing = Blocks::new(10 * BLOCK, |_| Err(io::Error::other("the store is down")));
        let mut page = vec![0u8; 4096];
        assert_eq!(failing.read_exact_at(&mut page, 0).unwrap_err().to_string(), "the store is down");
        let short = Blocks::new(10 * BLOCK, |_| Ok(Bytes::from_static(b"short")));
        assert_eq!(short.read_exact_at(&mut page, BLOCK).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(short.read_exact_at(&mut page, 10 * BLOCK - 10).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
