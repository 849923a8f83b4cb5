//! Writing an LMDB database through LMDB's own write transactions (`--writer txn`), the way
//! cn_clip's `build_lmdb_dataset.py` writes with py-lmdb.
//!
//! The bulk loader ([`super::lmdb_bulk`]) is the default and the faster (one copy of each
//! value, no B-tree inserts); this writer is the one to pick when the file should come from
//! LMDB's own code (every page laid out by LMDB itself), or to compare the two.
//!
//! Puts are buffered in one arena and committed in batches (~32 MiB by default) with
//! `MDB_NOOVERWRITE`, so a repeated key stops the job naming it, as the bulk loader does; the
//! environment is synced once at the end rather than on every commit. The map grows as data
//! is committed and ends at about twice the data, as the bulk loader's, not
//! `build_lmdb_dataset.py`'s fixed 1 TiB (cn_clip #281).

use std::path::{Path, PathBuf};

use lmdb::{Database, Environment, EnvironmentFlags, Transaction, WriteFlags};

use super::lmdb_bulk::{check_put, duplicate};
use crate::error::{Error, Result, io};
use crate::storage;

const INITIAL_MAP_SIZE: usize = 64 << 20;
/// Bytes of keys and values buffered per commit, by default.
const COMMIT_BYTES: usize = 32 << 20;

/// Writes one LMDB environment (`data.mdb` + `lock.mdb`) into a directory through LMDB's
/// write transactions.
pub struct TxnWriter {
    env: Environment,
    db: Database,
    dir: PathBuf,
    map_size: usize,
    /// Buffered puts: keys and values back to back in one arena (reused across commits), and
    /// the `(key end, value end)` offsets of each put.
    arena: Vec<u8>,
    pending: Vec<(usize, usize)>,
    /// Arena bytes that trigger a commit.
    commit_bytes: usize,
    /// Key and value bytes committed so far, for sizing the map.
    written_bytes: usize,
}

impl TxnWriter {
    /// Creates the LMDB directory `path` (replacing a database there).
    ///
    /// # Errors
    /// IO or LMDB errors naming `path`.
    pub fn create(path: &Path) -> Result<Self> {
        storage::create_dir_all(path).map_err(io(path))?;
        for file in ["data.mdb", "lock.mdb"] {
            let file = path.join(file);
            match storage::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&file)(e)),
                _ => {}
            }
        }
        let lmdb_error = |source| Error::Lmdb { path: path.display().to_string(), source };
        let env = Environment::new()
            .set_map_size(INITIAL_MAP_SIZE)
            .set_flags(EnvironmentFlags::NO_SYNC | EnvironmentFlags::NO_META_SYNC)
            .open(path)
            .map_err(lmdb_error)?;
        let db = env.open_db(None).map_err(lmdb_error)?;
        Ok(TxnWriter {
            env,
            db,
            dir: path.to_path_buf(),
            map_size: INITIAL_MAP_SIZE,
            arena: Vec::new(),
            pending: Vec::new(),
            commit_bytes: COMMIT_BYTES,
            written_bytes: 0,
        })
    }

    /// Caps what this writer holds in memory at about `bytes` (default ~64 MiB: a 32 MiB batch
    /// of puts and LMDB's dirty pages for it). At least 2 MiB.
    pub fn with_memory(mut self, bytes: usize) -> Self {
        self.commit_bytes = bytes.max(2 << 20) / 2;
        self
    }

    fn lmdb_error(&self) -> impl Fn(lmdb::Error) -> Error + '_ {
        |source| Error::Lmdb { path: self.dir.display().to_string(), source }
    }

    /// Stores `value` under `key`. Keys must be unique within the database: a repeated key
    /// fails the commit that meets it (this put, a later one, or [`finish`](Self::finish)),
    /// naming it.
    ///
    /// # Errors
    /// A key over 511 bytes or empty, a value of 4 GiB or more, a repeated key, LMDB errors.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        check_put(&self.dir, key, value)?;
        if self.arena.capacity() == 0 {
            // Sized once for a whole commit: growing by doubling would copy and fault in about
            // twice the commit size before the first commit.
            self.arena.reserve(self.commit_bytes + (1 << 20));
        }
        self.arena.extend_from_slice(key);
        let key_end = self.arena.len();
        self.arena.extend_from_slice(value);
        self.pending.push((key_end, self.arena.len()));
        if self.arena.len() >= self.commit_bytes { self.commit() } else { Ok(()) }
    }

    /// Commits the buffered puts in one transaction, growing the map first when they may not
    /// fit and again whenever LMDB says the map is full.
    fn commit(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        loop {
            // Keep the map comfortably above what is stored (B-tree pages add overhead).
            let needed = (self.written_bytes + self.arena.len()) * 2 + INITIAL_MAP_SIZE;
            if needed > self.map_size {
                self.grow(needed)?;
            }
            match self.try_commit() {
                Ok(()) => break,
                Err((lmdb::Error::MapFull, _)) => self.grow(self.map_size * 2)?,
                Err((lmdb::Error::KeyExist, Some(i))) => {
                    let start = if i == 0 { 0 } else { self.pending[i - 1].1 };
                    return Err(duplicate(&self.dir, &self.arena[start..self.pending[i].0]));
                }
                Err((e, _)) => return Err(self.lmdb_error()(e)),
            }
        }
        self.written_bytes += self.arena.len();
        self.pending.clear();
        self.arena.clear();
        Ok(())
    }

    /// Puts everything pending in one transaction; an error aborts it (nothing is written) and
    /// comes back with the index of the put that failed, if one did.
    fn try_commit(&self) -> Result<(), (lmdb::Error, Option<usize>)> {
        let mut txn = self.env.begin_rw_txn().map_err(|e| (e, None))?;
        let mut start = 0;
        for (i, &(key_end, value_end)) in self.pending.iter().enumerate() {
            let (key, value) = (&self.arena[start..key_end], &self.arena[key_end..value_end]);
            txn.put(self.db, &key, &value, WriteFlags::NO_OVERWRITE).map_err(|e| (e, Some(i)))?;
            start = value_end;
        }
        txn.commit().map_err(|e| (e, None))
    }

    fn grow(&mut self, size: usize) -> Result<()> {
        let size = size.next_power_of_two();
        self.env.set_map_size(size).map_err(self.lmdb_error())?;
        self.map_size = size;
        Ok(())
    }

    /// Commits what is buffered and syncs the database to disk.
    ///
    /// # Errors
    /// A repeated key (named), LMDB errors.
    pub fn finish(mut self) -> Result<()> {
        self.commit()?;
        self.env.sync(true).map_err(self.lmdb_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmdb::Cursor;

    fn read_all(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
        let env = Environment::new().set_flags(EnvironmentFlags::READ_ONLY).open(dir).unwrap();
        let db = env.open_db(None).unwrap();
        let txn = env.begin_ro_txn().unwrap();
        let mut cursor = txn.open_ro_cursor(db).unwrap();
        cursor.iter_start().map(|r| r.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    /// Many small commits (a 2 MiB budget: 1 MiB batches) past the initial map, which grows:
    /// everything comes back, in key order, and the map recorded is about twice the data.
    #[test]
    fn puts_come_back_across_commits_and_map_growth() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = TxnWriter::create(dir.path()).unwrap().with_memory(0);
        assert_eq!(writer.commit_bytes, 1 << 20);
        let mut expected = Vec::new();
        for i in 0..3000u32 {
            let key = format!("{:05}", (i * 7919) % 3000).into_bytes();
            let value = vec![(i % 251) as u8; (i as usize * 37) % 60_000];
            writer.put(&key, &value).unwrap();
            expected.push((key, value));
        }
        let data: usize = expected.iter().map(|(k, v)| k.len() + v.len()).sum();
        writer.finish().unwrap();
        expected.sort();
        assert_eq!(read_all(dir.path()), expected);
        let env = Environment::new().set_flags(EnvironmentFlags::READ_ONLY).open(dir.path()).unwrap();
        let map_size = env.info().unwrap().map_size();
        assert!(map_size >= 2 * data && map_size <= 4 * data + 2 * INITIAL_MAP_SIZE, "{map_size} for {data} bytes");
    }

    /// A repeated key stops the writer naming it, within one batch and across batches; nothing
    /// of the failed batch is committed.
    #[test]
    fn a_repeated_key_is_named() {
        for across_batches in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut writer = TxnWriter::create(dir.path()).unwrap();
            writer.put(b"7", &[1; 5000]).unwrap();
            if across_batches {
                writer.commit().unwrap();
            }
            writer.put(b"8", &[2]).unwrap();
            writer.put(b"7", &[3]).unwrap();
            let err = writer.finish().unwrap_err().to_string();
            assert!(err.contains("key 7 was put twice"), "{err}");
            let expected: Vec<(Vec<u8>, Vec<u8>)> =
                if across_batches { vec![(b"7".to_vec(), vec![1; 5000])] } else { vec![] };
            assert_eq!(read_all(dir.path()), expected);
        }
        let dir = tempfile::tempdir().unwrap();
        let mut writer = TxnWriter::create(dir.path()).unwrap();
        let err = writer.put(&[b'k'; 512], &[]).unwrap_err().to_string();
        assert!(err.contains("1 to 511 bytes; got 512"), "{err}");
    }

    /// `create` replaces a database already there, as the bulk loader does.
    #[test]
    fn create_replaces_a_database() {
        let dir = tempfile::tempdir().unwrap();
        for key in [b"old", b"new"] {
            let mut writer = TxnWriter::create(dir.path()).unwrap();
            writer.put(key, b"v").unwrap();
            writer.finish().unwrap();
        }
        assert_eq!(read_all(dir.path()), vec![(b"new".to_vec(), b"v".to_vec())]);
    }
}
