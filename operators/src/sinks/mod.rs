//! Sinks: write records in cn_clip's formats and as Parquet tables. Every sink writes to a
//! temporary path beside its target; [`Sink::finish`] completes it there and hands back a
//! [`Staged`] output, which the job moves into place only once *every* node has succeeded — so
//! a failed or cancelled job leaves no output at all, half-written or not.

pub mod discard;
pub mod jsonl;
pub mod lmdb;
pub mod lmdb_bulk;
pub mod lmdb_txn;
pub mod parquet;
pub mod parts;
pub mod tsv;
pub mod webdataset;

use arrow::record_batch::RecordBatch;

use crate::error::Result;
use crate::storage;

/// What a finished sink wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub rows: u64,
    pub path: std::path::PathBuf,
}

/// A sink, run on a thread of its own.
pub trait Sink: Send + 'static {
    /// Appends a batch.
    ///
    /// # Errors
    /// IO errors naming the output.
    fn write(&mut self, batch: &RecordBatch) -> Result<()>;

    /// Completes the output at its temporary path.
    ///
    /// # Errors
    /// IO errors naming the output.
    fn finish(self: Box<Self>) -> Result<(Written, Staged)>;
}

/// A complete output at its temporary path. [`Staged::commit`] renames it into place
/// (replacing what was there), or runs the sink's own publishing step
/// ([`Staged::with_publish`]); dropped uncommitted, it is removed.
pub struct Staged {
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    done: bool,
    publish: Option<Publish>,
}

/// A sink's own way of moving its output into place (a shard's part and then its entry).
type Publish = Box<dyn FnOnce(&Committed) -> Result<()> + Send>;

/// What the job knows when it commits, for a sink whose output records it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Records the job quarantined.
    pub quarantined: u64,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("tmp", &self.tmp)
            .field("path", &self.path)
            .field("done", &self.done)
            .field("publish", &self.publish.is_some())
            .finish()
    }
}

impl Staged {
    /// `tmp` (a file or directory being written) is to become `path`: on [`commit`](Self::commit),
    /// or removed if dropped uncommitted.
    pub fn new(tmp: std::path::PathBuf, path: std::path::PathBuf) -> Self {
        Staged { tmp, path, done: false, publish: None }
    }

    /// `tmp` is to be moved into place by `publish` (which sees what the job knows then), or
    /// removed if dropped uncommitted.
    pub fn with_publish(
        tmp: std::path::PathBuf,
        path: std::path::PathBuf,
        publish: impl FnOnce(&Committed) -> Result<()> + Send + 'static,
    ) -> Self {
        Staged { tmp, path, done: false, publish: Some(Box::new(publish)) }
    }

    /// Moves the output into place.
    ///
    /// # Errors
    /// IO errors renaming it (or removing the directory it replaces).
    pub fn commit(self) -> Result<()> {
        self.commit_with(&Committed::default())
    }

    /// Moves the output into place, telling a publishing sink what the job knows.
    ///
    /// # Errors
    /// IO errors renaming it (or removing the directory it replaces), or the publishing step's.
    pub fn commit_with(mut self, committed: &Committed) -> Result<()> {
        if let Some(publish) = self.publish.take() {
            self.done = true;
            return publish(committed);
        }
        if self.path.is_dir() && self.tmp.is_dir() {
            storage::remove_dir_all(&self.path).map_err(crate::error::io(&self.path))?;
        }
        storage::rename(&self.tmp, &self.path).map_err(crate::error::io(&self.path))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ =
                if self.tmp.is_dir() { storage::remove_dir_all(&self.tmp) } else { storage::remove_file(&self.tmp) };
        }
    }
}

/// Where a sink writes before the rename ([`storage::staging::temp_path`]).
pub(crate) fn tmp_path(path: &std::path::Path) -> std::path::PathBuf {
    storage::staging::temp_path(path)
}

/// Creates the parent directory of `path` if needed.
pub(crate) fn create_parent(path: &std::path::Path) -> Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => storage::create_dir_all(dir).map_err(crate::error::io(dir)),
        None => Ok(()),
    }
}

/// A buffered file written at a temporary path and renamed into place by [`AtomicFile::commit`];
/// dropped uncommitted, it removes itself.
pub(crate) struct AtomicFile {
    pub(crate) out: Option<std::io::BufWriter<std::fs::File>>,
    pub(crate) path: std::path::PathBuf,
    pub(crate) tmp: std::path::PathBuf,
}

impl AtomicFile {
    pub(crate) fn create(path: &std::path::Path) -> Result<Self> {
        create_parent(path)?;
        let tmp = tmp_path(path);
        let file = storage::create(&tmp).map_err(crate::error::io(&tmp))?;
        Ok(AtomicFile { out: Some(std::io::BufWriter::with_capacity(1 << 20, file)), path: path.to_path_buf(), tmp })
    }

    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        self.out.as_mut().expect("not committed").write_all(bytes).map_err(crate::error::io(&self.tmp))
    }

    /// Flushes what is buffered to the temporary file (which a reader may then open).
    pub(crate) fn flush(&mut self) -> Result<()> {
        use std::io::Write;
        self.out.as_mut().expect("not committed").flush().map_err(crate::error::io(&self.tmp))
    }

    /// Appends the rest of `from` (the file `name`).
    pub(crate) fn copy_from(&mut self, from: &mut impl std::io::Read, name: &std::path::Path) -> Result<()> {
        let out = self.out.as_mut().expect("not committed");
        std::io::copy(from, out).map(|_| ()).map_err(|e| {
            // The error is on one side or the other; name both.
            crate::error::Error::Io { path: format!("{} → {}", name.display(), self.tmp.display()), source: e }
        })
    }

    /// Flushes and syncs the file; it stays at its temporary path until committed.
    pub(crate) fn finish(self) -> Result<Staged> {
        let path = self.path.clone();
        self.finish_as(&path)
    }

    /// [`AtomicFile::finish`], committing to `path` instead of the path it was created for.
    pub(crate) fn finish_as(mut self, path: &std::path::Path) -> Result<Staged> {
        let out = self.out.take().expect("finished once");
        let staged = Staged::new(self.tmp.clone(), path.to_path_buf());
        out.into_inner().map_err(|e| e.into_error()).and_then(|f| f.sync_all()).map_err(crate::error::io(&self.tmp))?;
        Ok(staged)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = storage::remove_file(&self.tmp);
        }
    }
}
