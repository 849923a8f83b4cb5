//! A bulk loader that writes LMDB's on-disk format directly, for databases built once from a
//! stream of unique keys (cn_clip's `imgs` and `pairs`).
//!
//! Going through LMDB's write transactions costs three user-space copies of every value (our
//! buffer, LMDB's dirty pages, the kernel's page cache) and a B-tree insert per key in random
//! order. Here a value too big for a leaf node is copied once, in arrival order, into the page
//! image of its overflow pages at the end of the file, and written by background threads
//! (`appender`: `O_DIRECT` where allowed, so the disk takes it straight from that buffer);
//! only keys, page numbers and the small values are kept, sorted (`sort`: in memory, or in
//! sorted runs spilled to disk past 64 MiB, so memory stays bounded for any corpus size), and
//! turned into full leaf pages and the branch levels above them (`tree`) at
//! [`BulkWriter::finish`]. The result is an ordinary LMDB 0.9 environment (data version 1,
//! 4 KiB pages, default database only, as py-lmdb makes with `lmdb.open(path)`; the format is
//! in `lmdb_file::page`): py-lmdb and lmdb-rkv read it, and LMDB can keep writing to it (both tested).
//! The layout mirrors what LMDB itself leaves after its first commit: meta page 0 holds the
//! empty database (txn 0), meta page 1 the loaded one (txn 1), the free list is empty, and
//! `last_pg` is the last page written.
//!
//! Before [`BulkWriter::finish`] returns, `verify` reads the file back and walks the tree
//! independently of the code that wrote it; a file that does not check out fails the job.
//!
//! Only [`BulkWriter`] is public (and [`VerifyError`], what its check can find wrong); this
//! module holds it and the order of its steps. Jobs choose between it and LMDB's own write
//! transactions through [`super::lmdb::LmdbWriter`] (`--writer bulk|txn`).

mod appender;
mod sort;
mod tree;
mod verify;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, io};
pub use crate::lmdb_file::VerifyError;
use crate::lmdb_file::page::{
    Db, MAX_KEY, Meta, NODE_HEADER, NODE_MAX, PAGE, Value, ZEROS, overflow_header, overflow_pages,
};
use crate::storage;
use appender::{Appender, CHUNK, CHUNKS};
use sort::Sorter;
use tree::TreeBuilder;
pub(crate) use verify::verify;

/// Writes one LMDB environment (`data.mdb` + `lock.mdb`) into a directory.
pub struct BulkWriter {
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
    /// Keys with their small values or overflow page numbers, to come out in key order.
    sort: Sorter,
    entries: u64,
    /// Bytes per write chunk ([`CHUNK`] by default).
    chunk: usize,
}

impl BulkWriter {
    /// Creates the LMDB directory `path` (replacing a `data.mdb` there).
    ///
    /// # Errors
    /// IO errors naming `path`.
    pub fn create(path: &Path) -> Result<Self> {
        Self::create_with(path, true)
    }

    /// [`create`](Self::create), choosing whether to try `O_DIRECT` writes.
    fn create_with(path: &Path, direct: bool) -> Result<Self> {
        storage::create_dir_all(path).map_err(io(path))?;
        let data = path.join("data.mdb");
        let _ = storage::remove_file(path.join("lock.mdb"));
        let file = storage::open_with(&data, File::options().read(true).write(true).create(true).truncate(true))
            .map_err(io(&data))?;
        Ok(BulkWriter {
            dir: path.to_path_buf(),
            file: Some(file),
            appender: None,
            direct,
            next_page: 2,
            overflow_pages: 0,
            sort: Sorter::new(path.join(".cnclip-sort-runs")),
            entries: 0,
            chunk: CHUNK,
        })
    }

    /// Caps what this writer holds in memory at about `bytes` (default ~80 MiB: 64 MiB of
    /// pending keys and small values before a sorted run is spilled, and the write chunks), for
    /// jobs that keep many writers open at once (`build-lmdb --shards N`). At least 2 MiB.
    pub fn with_memory(mut self, bytes: usize) -> Self {
        let bytes = bytes.max(2 << 20);
        self.sort.run_bytes = bytes * 4 / 5;
        self.chunk = ((bytes / 5 / CHUNKS) / PAGE * PAGE).clamp(16 * PAGE, CHUNK);
        self
    }

    fn data_path(&self) -> PathBuf {
        self.dir.join("data.mdb")
    }

    /// Stores `value` under `key`. Keys must be unique within the database: a repeated key fails
    /// [`finish`](Self::finish) naming it (callers deduplicate and quarantine first).
    ///
    /// # Errors
    /// A key over 511 bytes or empty, a value of 4 GiB or more, IO errors.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let len = check_put(&self.dir, key, value)?;
        if NODE_HEADER + key.len() + value.len() > NODE_MAX {
            let pgno = self.next_page;
            self.write_overflow(pgno, value)?;
            self.sort.push(key, Value::Overflow { pgno, len })?;
        } else {
            self.sort.push(key, Value::Inline(value))?;
        }
        self.entries += 1;
        Ok(())
    }

    /// Header, value and zero padding, appended to the file.
    fn write_overflow(&mut self, pgno: u64, value: &[u8]) -> Result<()> {
        let pages = overflow_pages(value.len());
        let header = overflow_header(pgno, pages);
        let pad = pages as usize * PAGE - header.len() - value.len();
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

    /// Writes the leaf and branch pages and the meta pages, syncs `data.mdb`, checks it
    /// (`verify`: read back and walked, every page accounted for, as many entries as puts),
    /// and opens the result with LMDB once (which creates `lock.mdb`).
    ///
    /// # Errors
    /// A duplicate key (named), [`Error::LmdbCheck`] naming `data.mdb` when the file does not
    /// check out, IO errors.
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
        self.sort.finish(|key, value| {
            if !previous.is_empty() && previous == key {
                return Err(duplicate(&dir, key));
            }
            tree.add(&mut file, key, value).map_err(io(&data_path))?;
            previous.clear();
            previous.extend_from_slice(key);
            Ok(())
        })?;
        let main = tree.finish(&mut file, self.overflow_pages, self.entries).map_err(io(&data_path))?;
        let last_page = main.next_page - 1;
        let file_bytes = (last_page + 1) * PAGE as u64;
        let map_size = (file_bytes * 2 + (64 << 20)).next_power_of_two();
        let empty = Meta { txnid: 0, last_page: 1, map_size, main: Db::empty() };
        let loaded = Meta { txnid: 1, last_page, map_size, main: main.db };
        file.write_all_at(&empty.page(0), 0).map_err(io(&data_path))?;
        file.write_all_at(&loaded.page(1), PAGE as u64).map_err(io(&data_path))?;
        file.sync_data().map_err(io(&data_path))?;

        drop(file);
        verify(&data_path, self.entries)?;

        // LMDB opens it (which creates `lock.mdb`, as a database LMDB wrote has).
        lmdb::Environment::new()
            .set_flags(lmdb::EnvironmentFlags::READ_ONLY)
            .open(&self.dir)
            .map_err(|source| Error::Lmdb { path: self.dir.display().to_string(), source })?;
        Ok(())
    }
}

/// Checks a put against LMDB's limits: a key of 1 to 511 bytes, a value under 4 GiB (its
/// length, as LMDB stores it).
///
/// # Errors
/// [`Error::Format`] naming `dir` (and the key, for a value too big).
pub(crate) fn check_put(dir: &Path, key: &[u8], value: &[u8]) -> Result<u32> {
    let format_error = |reason| Error::Format { path: dir.display().to_string(), reason };
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(format_error(format!("LMDB keys are 1 to {MAX_KEY} bytes; got {} bytes", key.len())));
    }
    u32::try_from(value.len()).map_err(|_| {
        format_error(format!(
            "value of key {} is {} bytes; LMDB stores < 4 GiB",
            String::from_utf8_lossy(key),
            value.len()
        ))
    })
}

/// A key put twice into the database at `dir`.
pub(crate) fn duplicate(dir: &Path, key: &[u8]) -> Error {
    Error::Format {
        path: dir.display().to_string(),
        reason: format!("key {} was put twice", String::from_utf8_lossy(key)),
    }
}

#[cfg(test)]
mod tests {
    use super::sort::RUN_BYTES;
    use super::*;
    use lmdb::{Cursor, Transaction};

    fn read_all(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
        let env = lmdb::Environment::new().set_flags(lmdb::EnvironmentFlags::READ_ONLY).open(dir).unwrap();
        let db = env.open_db(None).unwrap();
        let txn = env.begin_ro_txn().unwrap();
        let mut cursor = txn.open_ro_cursor(db).unwrap();
        cursor.iter_start().map(|r| r.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    pub(super) fn random_entries(n: usize, seed: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
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

    pub(super) fn write(dir: &Path, entries: &[(Vec<u8>, Vec<u8>)], run_bytes: usize) -> Result<()> {
        write_with(dir, entries, run_bytes, true)
    }

    /// `run_bytes` 0: `with_memory(2 MiB)` (small chunks and runs) instead of setting it.
    fn write_with(dir: &Path, entries: &[(Vec<u8>, Vec<u8>)], run_bytes: usize, direct: bool) -> Result<()> {
        let mut writer = BulkWriter::create_with(dir, direct)?;
        if run_bytes == 0 {
            writer = writer.with_memory(2 << 20);
            assert_eq!((writer.sort.run_bytes, writer.chunk), ((2 << 20) * 4 / 5, 25 * PAGE));
        } else {
            writer.sort.run_bytes = run_bytes;
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
}
