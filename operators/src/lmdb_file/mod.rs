//! LMDB files read and written without trusting them: the on-disk format (`page`) shared by
//! the bulk loader and its check, and [`LmdbFile`], the reader every LMDB input goes through.
//!
//! LMDB itself maps `data.mdb` and follows its page numbers and node offsets as they are: a
//! truncated file or a flipped bit sends it outside the map (SIGBUS, SIGSEGV) with no message.
//! So inputs are not handed to LMDB. [`LmdbFile::open`] checks the meta pages (page numbers,
//! flags, magic, data version, page size; the newer one is used, as LMDB does) and that the
//! file holds every page up to the meta page's last one; the walk then reads each page (with
//! `pread`, or from an object's cached blocks) and checks it before use: within the file, of the type its level calls for, nodes
//! and keys within the page, keys in increasing order, overflow values within the file and
//! headed by an overflow page of the right size, no page reached twice (a corrupt branch cannot
//! loop). Every failure is a [`VerifyError`] saying where, in [`Error::LmdbCorrupt`] naming the
//! file. LMDB 0.9's checksum-free format has nothing more to check.
//!
//! Only what cn_clip's datasets hold is read: the default database of an environment written
//! by py-lmdb or LMDB (any page size, free pages and older transactions' pages skipped),
//! without duplicate-sort or integer-key flags.
//!
//! The directory may be an object store prefix (`s3://bucket/lmdb/train/imgs`): its `data.mdb`
//! is then read by ranged GETs through a bounded block cache (`reader.rs`), never downloaded
//! whole, and checked exactly as a local file is; errors name the object's URL.

pub(crate) mod page;
pub(crate) mod reader;

pub use page::PageError;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result, io};
use crate::storage::{self, Location};
use page::{Db, HEADER, MetaPage, NodePage, P_BRANCH, P_LEAF, P_OVERFLOW, PAGE, Value, overflow_pages_of};
use reader::Reader;

/// What is wrong with an LMDB file: one we wrote that fails its end-of-job check
/// ([`Error::LmdbCheck`]), or an input that cannot be read safely ([`Error::LmdbCorrupt`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the file is {bytes} bytes: LMDB's are whole {PAGE}-byte pages, the two meta pages at least")]
    Size { bytes: u64 },
    #[error("meta page {pgno}: {reason}")]
    Meta { pgno: u64, reason: PageError },
    #[error("the file has {pages} pages; its meta page says the last is page {last_page}")]
    Length { pages: u64, last_page: u64 },
    #[error("the file is {bytes} bytes, shorter than the {expected} its meta page says it holds (truncated?)")]
    Truncated { bytes: u64, expected: u64 },
    #[error("{pages} page(s) from page {pgno} (reached from page {from}) are not within pages 2..={last_page}")]
    OutOfBounds { pgno: u64, pages: u64, from: u64, last_page: u64 },
    #[error("page {pgno} is reached twice (the second time from page {from})")]
    Twice { pgno: u64, from: u64 },
    #[error("page {pgno} should be a {expected} page; its flags are {flags:#06x}")]
    PageType { pgno: u64, expected: &'static str, flags: u16 },
    #[error("page {pgno}: {reason}")]
    Page { pgno: u64, reason: PageError },
    #[error("keys out of order on page {pgno}: {detail}")]
    KeyOrder { pgno: u64, detail: String },
    #[error("{what}: the tree has {found}, its meta page says {recorded}")]
    Count { what: &'static str, found: u64, recorded: u64 },
    #[error("{found} entries in the file, {expected} were put")]
    Entries { found: u64, expected: u64 },
    #[error("{count} page(s) belong to nothing (the first is page {first})")]
    Unaccounted { count: u64, first: u64 },
}

/// Prints a key for a message: lossy UTF-8, quoted, at most a short prefix.
pub(crate) fn show(key: &[u8]) -> String {
    format!("{:?}", crate::sources::quote(key))
}

/// An LMDB environment's `data.mdb`, opened for checked reading.
pub struct LmdbFile {
    file: Reader,
    path: PathBuf,
    page_size: usize,
    last_page: u64,
    main: Db,
}

impl LmdbFile {
    /// Opens the environment directory `dir` (its `data.mdb`) and checks its meta pages and
    /// length. `dir` may be a `file://` URL or an object store prefix (`s3://…/imgs`).
    ///
    /// # Errors
    /// [`Error::Io`] when `dir` or its `data.mdb` cannot be opened (a missing object: naming
    /// its URL); [`Error::LmdbCorrupt`] naming `data.mdb` and its problem.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("data.mdb");
        if let Location::Local(local) = storage::locate(dir).map_err(io(dir))?
            && !local.is_dir()
        {
            let kind = if local.exists() { "is not a directory" } else { "does not exist" };
            return Err(Error::Io {
                path: dir.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("LMDB directory {kind}")),
            });
        }
        let (file, bytes) = Reader::open(&path).map_err(io(&path))?;
        Self::checked(file, path, bytes)
    }

    /// Checks the meta pages and length of `file`, `bytes` long, read from `path`.
    fn checked(file: Reader, path: PathBuf, bytes: u64) -> Result<Self> {
        let corrupt = |problem| Error::LmdbCorrupt { path: path.display().to_string(), problem };
        // Meta page 0 gives the page size; meta page 1 starts one page in.
        let mut first = vec![0u8; 512];
        let got = file.read_up_to(&mut first, 0).map_err(io(&path))?;
        let meta0 =
            MetaPage::read(0, &first[..got]).map_err(|reason| corrupt(VerifyError::Meta { pgno: 0, reason }))?;
        let page_size = meta0.page_size;
        if bytes < 2 * page_size as u64 {
            return Err(corrupt(VerifyError::Truncated { bytes, expected: 2 * page_size as u64 }));
        }
        let mut second = vec![0u8; 512];
        file.read_exact_at(&mut second, page_size as u64).map_err(io(&path))?;
        let meta1 = MetaPage::read(1, &second).map_err(|reason| corrupt(VerifyError::Meta { pgno: 1, reason }))?;
        if meta1.page_size != page_size {
            let reason = PageError::PageSizes { size: meta1.page_size, first: page_size };
            return Err(corrupt(VerifyError::Meta { pgno: 1, reason }));
        }
        // LMDB uses the meta page with the higher transaction id.
        let (pgno, meta) = if meta1.meta.txnid > meta0.meta.txnid { (1, meta1) } else { (0, meta0) };
        let bad_meta = |reason: PageError| corrupt(VerifyError::Meta { pgno, reason });
        if meta.main_flags != 0 {
            return Err(bad_meta(PageError::UnsupportedFlags { flags: meta.main_flags }));
        }
        let last_page = meta.meta.last_page;
        let expected = last_page.checked_add(1).and_then(|pages| pages.checked_mul(page_size as u64));
        match expected {
            None => return Err(bad_meta(PageError::LastPage { last_page })),
            Some(expected) if expected > bytes => {
                return Err(corrupt(VerifyError::Truncated { bytes, expected }));
            }
            Some(_) => {}
        }
        let main = meta.meta.main;
        if main.is_empty() != (main.depth == 0) || main.depth > 64 {
            return Err(bad_meta(PageError::Root { root: main.root as i64, depth: main.depth }));
        }
        Ok(LmdbFile { file, path, page_size, last_page, main })
    }

    /// `data.mdb`'s path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries in the default database, as its meta page records them.
    pub fn entries(&self) -> u64 {
        self.main.entries
    }

    fn corrupt(&self, problem: VerifyError) -> Error {
        Error::LmdbCorrupt { path: self.path.display().to_string(), problem }
    }

    /// Calls `on_entry` with every key and value in key order, checking each page as it goes.
    ///
    /// # Errors
    /// [`Error::LmdbCorrupt`] at the first page that fails a check (entries before it have
    /// been passed on), IO errors, or what `on_entry` returns.
    pub fn for_each(&self, mut on_entry: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        if self.main.is_empty() {
            return Ok(());
        }
        let mut walk = Walk::new(self);
        walk.visit(self.main.root, 0, 1, &mut on_entry)?;
        if walk.entries != self.main.entries {
            let count = VerifyError::Count { what: "entries", found: walk.entries, recorded: self.main.entries };
            return Err(self.corrupt(count));
        }
        Ok(())
    }

    /// The value of `key`, descending the tree as LMDB's lookup does (checking every page).
    ///
    /// # Errors
    /// As [`LmdbFile::for_each`].
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if self.main.is_empty() {
            return Ok(None);
        }
        let mut walk = Walk::new(self);
        let (mut pgno, mut from) = (self.main.root, 0);
        for level in 1..=self.main.depth {
            let bytes = walk.page(pgno, from, level)?;
            let page =
                NodePage::read(pgno, &bytes).map_err(|reason| self.corrupt(VerifyError::Page { pgno, reason }))?;
            let bad = |reason: PageError| self.corrupt(VerifyError::Page { pgno, reason });
            if level == self.main.depth {
                for i in 0..page.count {
                    let node = page.node(i).map_err(bad)?;
                    if node.key == key {
                        let value =
                            node.value().map_err(|e| bad(PageError::Key { key: show(node.key), source: e.into() }))?;
                        return walk.value(value, pgno).map(|v| Some(v.to_vec()));
                    }
                }
                return Ok(None);
            }
            // The last branch node whose key is <= `key` (the first node's key counts as -inf).
            let mut child = page.node(0).map_err(&bad)?.child();
            for i in 1..page.count {
                let node = page.node(i).map_err(&bad)?;
                if node.key > key {
                    break;
                }
                child = node.child();
            }
            (from, pgno) = (pgno, child);
        }
        Ok(None)
    }
}

/// What a walk calls with each key and value.
type OnEntry<'f> = dyn FnMut(&[u8], &[u8]) -> Result<()> + 'f;

struct Walk<'a> {
    lmdb: &'a LmdbFile,
    /// One bit per page: reached already.
    seen: Vec<u64>,
    entries: u64,
    previous: Option<Vec<u8>>,
    /// The current overflow value.
    value: Vec<u8>,
}

impl<'a> Walk<'a> {
    fn new(lmdb: &'a LmdbFile) -> Self {
        let pages = lmdb.last_page + 1;
        Walk { lmdb, seen: vec![0; pages.div_ceil(64) as usize], entries: 0, previous: None, value: Vec::new() }
    }

    fn corrupt(&self, problem: VerifyError) -> Error {
        self.lmdb.corrupt(problem)
    }

    /// Accounts for pages `first..first + count`, reached from page `from`.
    fn mark(&mut self, first: u64, count: u64, from: u64) -> Result<()> {
        let last_page = self.lmdb.last_page;
        if first < 2 || count == 0 || first.checked_add(count).is_none_or(|end| end > last_page + 1) {
            return Err(self.corrupt(VerifyError::OutOfBounds { pgno: first, pages: count, from, last_page }));
        }
        for pgno in first..first + count {
            let (word, bit) = (pgno as usize / 64, 1u64 << (pgno % 64));
            if self.seen[word] & bit != 0 {
                return Err(self.corrupt(VerifyError::Twice { pgno, from }));
            }
            self.seen[word] |= bit;
        }
        Ok(())
    }

    /// Reads tree page `pgno` (reached from `from`, at `level`, 1 at the root), checking it is
    /// within the file, not seen before and of the type its level calls for.
    fn page(&mut self, pgno: u64, from: u64, level: u16) -> Result<Vec<u8>> {
        self.mark(pgno, 1, from)?;
        let size = self.lmdb.page_size;
        let mut bytes = vec![0u8; size];
        self.lmdb.file.read_exact_at(&mut bytes, pgno * size as u64).map_err(io(&self.lmdb.path))?;
        let leaf = level == self.lmdb.main.depth;
        let (expected, flags) = if leaf { ("leaf", P_LEAF) } else { ("branch", P_BRANCH) };
        let found = page::Header::read(&bytes).flags;
        if found != flags {
            return Err(self.corrupt(VerifyError::PageType { pgno, expected, flags: found }));
        }
        Ok(bytes)
    }

    /// A leaf node's value: inline, or read from its overflow pages after checking them.
    fn value<'v>(&'v mut self, value: Value<'v>, leaf: u64) -> Result<&'v [u8]> {
        match value {
            Value::Inline(bytes) => Ok(bytes),
            Value::Overflow { pgno, len } => {
                let size = self.lmdb.page_size;
                let pages = overflow_pages_of(len as usize, size);
                self.mark(pgno, pages, leaf)?;
                self.value.resize(HEADER + len as usize, 0);
                let offset = pgno * size as u64;
                self.lmdb.file.read_exact_at(&mut self.value, offset).map_err(io(&self.lmdb.path))?;
                let header = page::Header::read(&self.value);
                if header.pgno != pgno || header.flags != P_OVERFLOW || header.overflow_count() != pages {
                    let reason = PageError::Overflow {
                        pages,
                        found: header.pgno,
                        flags: header.flags,
                        count: header.overflow_count(),
                    };
                    return Err(self.corrupt(VerifyError::Page { pgno, reason }));
                }
                Ok(&self.value[HEADER..])
            }
        }
    }

    fn visit(&mut self, pgno: u64, from: u64, level: u16, on_entry: &mut OnEntry<'_>) -> Result<()> {
        let bytes = self.page(pgno, from, level)?;
        let bad = |reason: PageError| VerifyError::Page { pgno, reason };
        let page = NodePage::read(pgno, &bytes).map_err(|e| self.corrupt(bad(e)))?;
        if level == self.lmdb.main.depth {
            for i in 0..page.count {
                let node = page.node(i).map_err(|e| self.corrupt(bad(e)))?;
                if let Some(previous) = &self.previous
                    && node.key <= &previous[..]
                {
                    let detail = format!("key {} comes after {}", show(node.key), show(previous));
                    return Err(self.corrupt(VerifyError::KeyOrder { pgno, detail }));
                }
                let value = node
                    .value()
                    .map_err(|e| self.corrupt(bad(PageError::Key { key: show(node.key), source: e.into() })))?;
                let previous = self.previous.get_or_insert_with(Vec::new);
                previous.clear();
                previous.extend_from_slice(node.key);
                self.entries += 1;
                let value = self.value(value, pgno)?;
                on_entry(node.key, value)?;
            }
        } else {
            for i in 0..page.count {
                let child = page.node(i).map_err(|e| self.corrupt(bad(e)))?.child();
                self.visit(child, pgno, level + 1, on_entry)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmdb::{Cursor, Transaction};
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use std::os::unix::fs::FileExt;

    /// An environment written by LMDB itself as py-lmdb would (many commits, deletes that
    /// leave free pages, values inline and on overflow pages), and its entries as LMDB reads
    /// them.
    fn lmdb_written(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
        lmdb_written_with(dir, 20_000)
    }

    /// As [`lmdb_written`], overflow values up to `big` bytes.
    fn lmdb_written_with(dir: &Path, big: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut rng = StdRng::seed_from_u64(7);
        let env = lmdb::Environment::new().set_map_size(1 << 30).open(dir).unwrap();
        let db = env.open_db(None).unwrap();
        for batch in 0..12 {
            let mut txn = env.begin_rw_txn().unwrap();
            for i in 0..100 {
                let key = format!("{}", batch * 1000 + i * 7 % 100);
                let len = if rng.random_bool(0.3) { rng.random_range(2000..big) } else { rng.random_range(1..300) };
                let value: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                txn.put(db, &key, &value, lmdb::WriteFlags::empty()).unwrap();
            }
            if batch % 3 == 2 {
                for i in 0..30 {
                    let _ = txn.del(db, &format!("{}", (batch - 1) * 1000 + i), None);
                }
            }
            txn.commit().unwrap();
        }
        let txn = env.begin_ro_txn().unwrap();
        let mut cursor = txn.open_ro_cursor(db).unwrap();
        cursor.iter_start().map(|r| r.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    fn read_all(dir: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut all = Vec::new();
        LmdbFile::open(dir)?.for_each(|k, v| {
            all.push((k.to_vec(), v.to_vec()));
            Ok(())
        })?;
        Ok(all)
    }

    #[test]
    fn reads_what_lmdb_wrote_entry_for_entry() {
        let dir = tempfile::tempdir().unwrap();
        let expected = lmdb_written(dir.path());
        assert!(expected.len() > 900, "{}", expected.len());
        let file = LmdbFile::open(dir.path()).unwrap();
        assert_eq!(file.entries(), expected.len() as u64);
        assert_eq!(read_all(dir.path()).unwrap(), expected);
        for (key, value) in expected.iter().step_by(17) {
            assert!(file.get(key).unwrap().as_ref() == Some(value), "{}", String::from_utf8_lossy(key));
        }
        assert_eq!(file.get(b"no such key").unwrap(), None);
        assert_eq!(file.get(b"!").unwrap(), None); // below every key
    }

    /// The ranges a cached reader asked for.
    type Asked = std::sync::Arc<std::sync::Mutex<Vec<std::ops::Range<u64>>>>;

    /// `dir`'s `data.mdb` opened as an object is: read by ranges (here through the storage
    /// seam's local ranged reads) in cached blocks; with the ranges asked for.
    fn open_cached(dir: &Path) -> (Result<LmdbFile>, Asked) {
        let path = dir.join("data.mdb");
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let bytes = std::fs::metadata(&path).unwrap().len();
        let blocks = {
            let (path, asked) = (path.clone(), asked.clone());
            reader::Blocks::new(bytes, move |range| {
                asked.lock().unwrap().push(range.clone());
                storage::read_range(&path, range)
            })
        };
        (LmdbFile::checked(Reader::Blocks(blocks), path, bytes), asked)
    }

    #[test]
    fn reads_through_cached_blocks_as_through_pread() {
        let dir = tempfile::tempdir().unwrap();
        let expected = lmdb_written_with(dir.path(), 200_000);
        let (file, asked) = open_cached(dir.path());
        let file = file.unwrap();
        let mut all = Vec::new();
        file.for_each(|k, v| {
            all.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert!(all == expected, "the walk through cached blocks differs");
        // A walk costs about a request per run of blocks, not one per page.
        let size = std::fs::metadata(dir.path().join("data.mdb")).unwrap().len();
        let requests = asked.lock().unwrap().len() as u64;
        let (pages, blocks) = (size / PAGE as u64, size.div_ceil(reader::BLOCK));
        assert!(size > 8 * reader::BLOCK, "{size} bytes: too small a file to tell");
        assert!(requests <= blocks && requests * 20 < pages, "{requests} requests for {pages} pages");
        // Lookups through the same reader.
        asked.lock().unwrap().clear();
        for (key, value) in expected.iter().step_by(7) {
            assert!(file.get(key).unwrap().as_ref() == Some(value), "{}", String::from_utf8_lossy(key));
        }
        assert_eq!(file.get(b"no such key").unwrap(), None);
        assert!(asked.lock().unwrap().len() as u64 <= blocks, "the blocks are cached");
    }

    #[test]
    fn truncated_objects_are_refused_as_truncated_files_are() {
        let dir = tempfile::tempdir().unwrap();
        lmdb_written(dir.path());
        let data = std::fs::read(dir.path().join("data.mdb")).unwrap();
        for len in [0, 100, 4096, 8192, data.len() / 2, data.len() - 1] {
            std::fs::write(dir.path().join("data.mdb"), &data[..len]).unwrap();
            let local = corrupt_problem(LmdbFile::open(dir.path()).map(|_| ()));
            let cached = corrupt_problem(open_cached(dir.path()).0.map(|_| ()));
            assert_eq!(local, cached, "{len} bytes");
        }
    }

    #[test]
    fn an_empty_environment_has_no_entries() {
        let dir = tempfile::tempdir().unwrap();
        lmdb::Environment::new().open(dir.path()).unwrap();
        assert_eq!(read_all(dir.path()).unwrap(), vec![]);
        assert_eq!(LmdbFile::open(dir.path()).unwrap().get(b"k").unwrap(), None);
    }

    fn corrupt_problem(result: Result<impl std::fmt::Debug>) -> VerifyError {
        match result {
            Err(Error::LmdbCorrupt { path, problem }) => {
                assert!(path.ends_with("data.mdb"), "{path}");
                problem
            }
            other => panic!("expected a corrupt-LMDB error, got {other:?}"),
        }
    }

    #[test]
    fn truncated_files_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        lmdb_written(dir.path());
        let data = std::fs::read(dir.path().join("data.mdb")).unwrap();
        for len in [0, 100, 4096, 8191, 8192, data.len() / 2, data.len() - 4096, data.len() - 1] {
            std::fs::write(dir.path().join("data.mdb"), &data[..len]).unwrap();
            let problem = corrupt_problem(LmdbFile::open(dir.path()).map(|_| ()));
            assert!(
                matches!(problem, VerifyError::Truncated { .. } | VerifyError::Meta { .. }),
                "{len} bytes: {problem}"
            );
        }
    }

    #[test]
    fn a_bad_meta_page_is_named() {
        let dir = tempfile::tempdir().unwrap();
        lmdb_written(dir.path());
        let path = dir.path().join("data.mdb");
        let mut data = std::fs::read(&path).unwrap();
        data[HEADER] ^= 0x40; // meta 0's magic
        std::fs::write(&path, &data).unwrap();
        let problem = corrupt_problem(LmdbFile::open(dir.path()).map(|_| ()));
        assert!(problem.to_string().starts_with("meta page 0: magic"), "{problem}");
    }

    /// Every byte of the tree's pages flipped in turn (a sample of offsets in each page):
    /// the read ends in entries or a corrupt-LMDB error, never a panic or a crash, and when it
    /// ends in entries, they are as many as the meta page says.
    #[test]
    fn flipped_bytes_in_tree_pages_never_crash_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let expected = lmdb_written_with(dir.path(), 5000);
        let path = dir.path().join("data.mdb");
        let data = std::fs::read(&path).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let pages = data.len() / PAGE;
        let mut rng = StdRng::seed_from_u64(11);
        let (mut refused, mut read) = (0, 0);
        for pgno in 0..pages {
            let flags = u16::from_le_bytes([data[pgno * PAGE + 10], data[pgno * PAGE + 11]]);
            if flags & (P_BRANCH | P_LEAF | page::P_META) == 0 {
                continue; // overflow pages hold values: a flip there changes a value only
            }
            let offsets: Vec<usize> = (0..16).chain((0..16).map(|_| rng.random_range(16..PAGE))).collect();
            for offset in offsets {
                let at = pgno * PAGE + offset;
                file.write_all_at(&[data[at] ^ 1 << rng.random_range(0..8)], at as u64).unwrap();
                let result = read_all(dir.path());
                file.write_all_at(&data[at..at + 1], at as u64).unwrap();
                match result {
                    Ok(entries) => {
                        assert_eq!(entries.len(), expected.len(), "page {pgno} offset {offset}");
                        read += 1;
                    }
                    Err(Error::LmdbCorrupt { .. }) => refused += 1,
                    Err(other) => panic!("page {pgno} offset {offset}: {other}"),
                }
            }
        }
        assert!(refused > 100 && read > 100, "refused {refused}, read {read}");
    }
}
