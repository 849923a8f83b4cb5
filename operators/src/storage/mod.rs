//! The storage seam: every file a job opens, creates, reads whole, renames or removes goes
//! through this module. Sources, sinks, parts and manifests, locks, the quarantine, checkpoints,
//! indexes' side files, logs and reports call these functions rather than `std::fs`, so a place
//! to keep data is taught here once, not in each job.
//!
//! A location ([`locate`]) is a plain path, a `file://` URL (its path: [`local`]), or an object
//! in a store ([`remote`]: `s3://`, `gs://`, `az://`, `https://` read-only). The functions mirror
//! `std::fs` (same arguments, `std::io::Result`, the same OS errors), so a caller adds its own
//! context (the path, what was being read) as before. Whole-file reads ([`read`],
//! [`read_to_string`]) and ranged reads ([`read_range`]) of local files go through the
//! [`object_store`] crate's `LocalFileSystem`; where its answer would differ from `std::fs`'s
//! (a FIFO or a `/proc` file, which report size 0; a name the store reserves, `…#1`; any
//! failure, whose OS error the store wraps), the same call reads with `std::fs`.
//!
//! Objects:
//!
//! - **Reads.** [`open_read`] streams one (ranged GETs with bounded read-ahead: tar shards, TSV
//!   and JSONL lines); [`open_chunks`] serves the Parquet reader's ranged reads; [`read`],
//!   [`read_range`], [`size`], [`list_remote`] (sources' globs over a prefix) and
//!   [`list_remote_folders`] (an image folder's classes) complete it.
//! - **Writes.** An output is written in the spool on this machine ([`staging::temp_path`]) and
//!   uploaded whole when the job commits ([`rename`]); [`write_atomically`] does the same for a
//!   single file. [`create_if_absent`] is the store's conditional write: the claims of
//!   [`staging::WriterLock`] on an object's output.
//!
//! What still needs a local file, and why:
//!
//! - **Seekable reads** ([`open`]): the checked LMDB reader (`pread`) and the memory-mapped
//!   refinement vectors of an index.
//! - **LMDB writing**: the bulk loader writes pages with `O_DIRECT` and LMDB's own writer maps
//!   its file (`operators/src/sinks/lmdb_bulk/`, `sinks/lmdb_txn.rs`); both write a local
//!   staged directory, committed by [`rename`].
//! - **FAISS indexes** are read and written by FAISS through a local path (`--mmap` maps the
//!   inverted lists), as the refinement vectors are (`models/src/retrieval/`).
//! - **Scratch space** ([`scratch_dir`]): quarantines nobody reads and DataFusion's registered
//!   batches on a cluster, removed when the job ends.
//! - **Metadata and listings** ([`metadata`], [`read_dir`]) keep `std::fs`'s types: modification
//!   times to the nanosecond (fingerprints), file types, and names that are not UTF-8, which an
//!   object store path cannot hold but a job must still report by name.

pub mod fetch;
pub mod remote;
pub mod staging;

use std::borrow::Cow;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use object_store::ObjectStoreExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;

/// The object store behind local paths.
static LOCAL: LazyLock<Arc<LocalFileSystem>> = LazyLock::new(|| Arc::new(LocalFileSystem::new()));

/// The local path a location names: `path` itself, or the path of a `file://` URL.
///
/// # Errors
/// `Unsupported` for a remote URL (`s3://`, `gs://`, `https://`…), naming it: the caller needs a
/// local file; an invalid `file://` URL.
pub fn local(path: &Path) -> io::Result<Cow<'_, Path>> {
    match locate(path)? {
        Location::Local(path) => Ok(path),
        Location::Remote(remote) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}: this must be a local path or file:// URL (object storage is not supported here yet)",
                remote.url
            ),
        )),
    }
}

/// Where a location is: a local path (a plain path, or a `file://` URL's), or an object in a
/// store ([`remote`]).
pub enum Location<'a> {
    Local(Cow<'a, Path>),
    Remote(remote::Remote),
}

/// The scheme of `path` when it is a URL (`scheme://…`), lower-cased.
fn scheme(path: &Path) -> Option<String> {
    let (scheme, _) = path.to_str()?.split_once("://")?;
    let is_scheme = !scheme.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    is_scheme.then(|| scheme.to_ascii_lowercase())
}

/// Whether `path` is written as a URL (`scheme://…`), local (`file://`) or not.
pub fn is_url(path: &Path) -> bool {
    scheme(path).is_some()
}

/// Whether `path` names an object in a store (`s3://`, `gs://`, `az://`, `http(s)://`…).
pub fn is_remote(path: &Path) -> bool {
    scheme(path).is_some_and(|s| remote::is_remote_scheme(&s))
}

/// Where `path` is.
///
/// # Errors
/// `Unsupported` for a URL of a scheme no store serves, naming it; an invalid URL.
pub fn locate(path: &Path) -> io::Result<Location<'_>> {
    let Some(scheme) = scheme(path) else { return Ok(Location::Local(Cow::Borrowed(path))) };
    let text = path.to_str().unwrap_or_default();
    if scheme == "file" {
        let url = url::Url::parse(text)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{text} is not a valid URL: {e}")))?;
        return url
            .to_file_path()
            .map(|p| Location::Local(Cow::Owned(p)))
            .map_err(|()| io::Error::new(io::ErrorKind::InvalidInput, format!("{text} does not name a local file")));
    }
    if remote::is_remote_scheme(&scheme) {
        return remote::parse(text).map(Location::Remote);
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "{text}: {scheme}:// storage is not supported (local paths, file://, s3://, gs://, az://, http(s):// are)"
        ),
    ))
}

/// The object store path of a local path, when it has one: an absolute path without `.` or
/// `..` components, in UTF-8, whose file name does not end in `#` and digits (the store's own
/// upload names). Other paths are read with `std::fs` directly (the same bytes).
fn object_path(path: &Path) -> Option<ObjectPath> {
    let name = path.file_name()?.to_str()?;
    if name.rsplit_once('#').is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let absolute = std::path::absolute(path).ok()?;
    ObjectPath::from_absolute_path(absolute).ok()
}

/// Runs one of the object store's futures to completion on this thread. `LocalFileSystem`'s
/// operations are blocking work that it runs in place outside a tokio runtime (source and sink
/// threads) and moves to the runtime's blocking pool inside one. The future runs outside tokio's
/// cooperative budget: a budget spent inside this call could never be refilled, since the
/// thread waits here rather than yielding to its scheduler.
fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    futures_executor::block_on(tokio::task::unconstrained(future))
}

/// The whole contents of a file, as `std::fs::read` (a FIFO or a `/proc` file too, read to its
/// end). Through the store, a regular file is read up to the size it had when opened.
///
/// # Errors
/// The OS error of opening or reading it, as `std::fs::read` gives it.
pub fn read(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    let path = match locate(path.as_ref())? {
        Location::Local(path) => path,
        Location::Remote(remote) => return remote.read().map(Vec::from),
    };
    // A file that says it is empty (a FIFO, `/dev/stdin`, a `/proc` file) is read to its end as a
    // stream: the store reads as many bytes as the size says.
    let sized = std::fs::metadata(&path)?.len() > 0;
    let Some(location) = object_path(&path).filter(|_| sized) else { return std::fs::read(&path) };
    match block_on(async { LOCAL.get(&location).await?.bytes().await }) {
        Ok(bytes) => Ok(bytes.into()),
        // The store wraps the OS error, or fails where std does not (a file that shrank while
        // read): `std::fs` gives the answer, and the error a caller expects.
        Err(_) => std::fs::read(&path),
    }
}

/// The whole contents of a UTF-8 text file, as `std::fs::read_to_string`.
///
/// # Errors
/// The OS error of opening or reading it; `InvalidData` when it is not UTF-8.
pub fn read_to_string(path: impl AsRef<Path>) -> io::Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "stream did not contain valid UTF-8"))
}

/// Bytes `range` of a file.
///
/// # Errors
/// The OS error of opening or reading it; `UnexpectedEof` for a range past its end.
pub fn read_range(path: impl AsRef<Path>, range: Range<u64>) -> io::Result<bytes::Bytes> {
    let wanted = range.end.saturating_sub(range.start);
    if wanted == 0 {
        return Ok(bytes::Bytes::new());
    }
    let path = match locate(path.as_ref())? {
        Location::Local(path) => path,
        Location::Remote(remote) => return remote.read_range(range),
    };
    if let Some(location) = object_path(&path) {
        // The store gives what there is of a range that runs past the end (a caller asked for all
        // of it), and fails on one that starts past it: both are read below, to std's error.
        if let Ok(bytes) = block_on(LOCAL.get_range(&location, range.clone()))
            && bytes.len() as u64 == wanted
        {
            return Ok(bytes);
        }
    }
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(&path)?;
    let mut buffer = vec![0; usize::try_from(wanted).unwrap_or(usize::MAX)];
    file.read_exact_at(&mut buffer, range.start)?;
    Ok(buffer.into())
}

/// Writes `contents` at `path` only if nothing is there yet (a file, a directory, a link),
/// atomically: a reader sees all of it or nothing, and of two writers exactly one succeeds. For
/// what must be made once, such as a job's claim on an output in an object store, where a lock
/// file cannot serve. On a store, the store's conditional write (`If-None-Match: *`) decides. The contents are written
/// and synced at a staging path ([`staging::temp_path`]) and linked into place. The parent
/// directory is created if missing. Returns whether it wrote.
///
/// # Errors
/// The OS error of writing or linking (a file system without hard links: `EPERM`).
pub fn create_if_absent(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> io::Result<bool> {
    use std::io::Write;
    let path = match locate(path.as_ref())? {
        Location::Local(path) => path,
        Location::Remote(remote) => return remote.create_if_absent(bytes::Bytes::copy_from_slice(contents.as_ref())),
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    // The staging name is per process ([`staging::temp_path`]): one writer at a time in this one.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let tmp = staging::temp_path(&path);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents.as_ref())?;
        file.sync_all()?;
        match std::fs::hard_link(&tmp, &path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// A file or an object opened for reading from its start to its end ([`open_read`]).
pub enum Reader {
    Local(std::fs::File),
    /// Boxed: a remote reader is a few hundred bytes of state beside a file's descriptor.
    Remote(Box<remote::RemoteReader>),
}

impl io::Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Reader::Local(file) => file.read(buf),
            Reader::Remote(reader) => reader.read(buf),
        }
    }
}

/// Opens a file or an object for streaming it once, in order (tar shards, TSV and JSONL lines):
/// an object is read by ranged GETs with bounded read-ahead ([`remote::RemoteReader`]).
///
/// # Errors
/// The OS error of opening a file; the store's (a missing object: `NotFound`).
pub fn open_read(path: impl AsRef<Path>) -> io::Result<Reader> {
    match locate(path.as_ref())? {
        Location::Local(path) => std::fs::File::open(path).map(Reader::Local),
        Location::Remote(remote) => remote::RemoteReader::open(&remote).map(|r| Reader::Remote(Box::new(r))),
    }
}

/// As [`open_read`], from byte `start` on (a stream resumed mid-file).
///
/// # Errors
/// The OS error of opening or seeking a file; the store's (a missing object: `NotFound`).
pub fn open_read_at(path: impl AsRef<Path>, start: u64) -> io::Result<Reader> {
    match locate(path.as_ref())? {
        Location::Local(path) => {
            let mut file = std::fs::File::open(path)?;
            io::Seek::seek(&mut file, io::SeekFrom::Start(start))?;
            Ok(Reader::Local(file))
        }
        Location::Remote(remote) => {
            let size = remote.size()?;
            remote::RemoteReader::open_range(&remote, start.min(size), size).map(|r| Reader::Remote(Box::new(r)))
        }
    }
}

/// A file or an object opened for reading in pieces, as the Parquet reader does (its footer,
/// then its column chunks): [`open_chunks`].
pub enum Chunks {
    Local(std::fs::File),
    Remote { remote: remote::Remote, size: u64 },
}

impl parquet::file::reader::Length for Chunks {
    fn len(&self) -> u64 {
        match self {
            Chunks::Local(file) => file.len(),
            Chunks::Remote { size, .. } => *size,
        }
    }
}

impl parquet::file::reader::ChunkReader for Chunks {
    type T = Box<dyn io::Read + Send>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        match self {
            Chunks::Local(file) => Ok(Box::new(file.get_read(start)?)),
            // Read as far as the Parquet reader reads (a page header), not megabytes ahead.
            Chunks::Remote { remote, size } => Ok(Box::new(remote::LazyReader::new(remote, start, *size))),
        }
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        match self {
            Chunks::Local(file) => file.get_bytes(start, length),
            Chunks::Remote { remote, .. } => Ok(remote.read_range(start..start + length as u64)?),
        }
    }
}

/// Opens a file or an object for reading in pieces (a Parquet file: ranged GETs of its footer
/// and of the column chunks read).
///
/// # Errors
/// The OS error of opening a file; the store's (a missing object: `NotFound`).
pub fn open_chunks(path: impl AsRef<Path>) -> io::Result<Chunks> {
    match locate(path.as_ref())? {
        Location::Local(path) => std::fs::File::open(path).map(Chunks::Local),
        Location::Remote(remote) => {
            let size = remote.size()?;
            Ok(Chunks::Remote { remote, size })
        }
    }
}

/// The size of a file or an object, in bytes.
///
/// # Errors
/// The OS error of looking it up, or the store's.
pub fn size(path: impl AsRef<Path>) -> io::Result<u64> {
    match locate(path.as_ref())? {
        Location::Local(path) => Ok(std::fs::metadata(path)?.len()),
        Location::Remote(remote) => remote.size(),
    }
}

/// The objects under a remote prefix (`s3://bucket/shards` lists `s3://bucket/shards/…`), as
/// URLs, sorted, with their sizes.
///
/// # Errors
/// `path` is local; the store's error.
pub fn list_remote(path: impl AsRef<Path>) -> io::Result<Vec<(String, u64)>> {
    match locate(path.as_ref())? {
        Location::Local(path) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is a local path, not an object store prefix", path.display()),
        )),
        Location::Remote(remote) => {
            Ok(remote.list()?.into_iter().map(|(key, size)| (remote.sibling(key).url, size)).collect())
        }
    }
}

/// The "folders" directly under a remote prefix, as a delimited listing gives them: the names of
/// its common prefixes, sorted (`s3://bucket/set` holding `set/a/x.jpg` and the marker object
/// `set/b/` gives `a` and `b`: a folder holding only a marker counts, as an empty directory
/// does), and how many objects lie directly under the prefix.
///
/// # Errors
/// `path` is local; the store's error, naming the prefix.
pub fn list_remote_folders(path: impl AsRef<Path>) -> io::Result<(Vec<String>, usize)> {
    let remote = match locate(path.as_ref())? {
        Location::Local(path) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is a local path, not an object store prefix", path.display()),
            ));
        }
        Location::Remote(remote) => remote,
    };
    let (store, key) = (remote.store.clone(), remote.key.clone());
    let listed = remote::run(async move {
        let prefix = (!key.as_ref().is_empty()).then_some(&key);
        store.list_with_delimiter(prefix).await
    })?
    .map_err(|e| remote::RemoteError::into_io(&remote.url, e))?;
    let mut folders: Vec<String> =
        listed.common_prefixes.iter().filter_map(|prefix| prefix.filename().map(str::to_string)).collect();
    folders.sort();
    Ok((folders, listed.objects.len()))
}

/// Opens a file for streaming or seekable reading (a local file; see the module docs).
///
/// # Errors
/// The OS error of opening it.
pub fn open(path: impl AsRef<Path>) -> io::Result<std::fs::File> {
    std::fs::File::open(local(path.as_ref())?)
}

/// Creates (or truncates) a file for writing. Outputs are created at their staging path
/// ([`staging::temp_path`]) and renamed into place.
///
/// # Errors
/// The OS error of creating it.
pub fn create(path: impl AsRef<Path>) -> io::Result<std::fs::File> {
    std::fs::File::create(local(path.as_ref())?)
}

/// Opens a file with `options` (appending to a log, a lock file, `O_DIRECT`).
///
/// # Errors
/// The OS error of opening it.
pub fn open_with(path: impl AsRef<Path>, options: &std::fs::OpenOptions) -> io::Result<std::fs::File> {
    options.open(local(path.as_ref())?)
}

/// Writes a whole file in place (not atomically: for files inside a staged directory, or
/// scratch files). Outputs use [`write_atomically`].
///
/// # Errors
/// The OS error of writing.
pub fn write(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> io::Result<()> {
    std::fs::write(local(path.as_ref())?, contents)
}

/// A file's or directory's metadata, following symbolic links.
///
/// # Errors
/// The OS error of looking it up.
pub fn metadata(path: impl AsRef<Path>) -> io::Result<std::fs::Metadata> {
    std::fs::metadata(local(path.as_ref())?)
}

/// A directory's entries, in the file system's order.
///
/// # Errors
/// The OS error of opening the directory.
pub fn read_dir(path: impl AsRef<Path>) -> io::Result<std::fs::ReadDir> {
    std::fs::read_dir(local(path.as_ref())?)
}

/// The absolute path with every symbolic link resolved.
///
/// # Errors
/// The OS error (the path does not exist).
pub fn canonicalize(path: impl AsRef<Path>) -> io::Result<PathBuf> {
    std::fs::canonicalize(local(path.as_ref())?)
}

/// Creates a directory and its missing parents (nothing, for a store: keys need no folders).
///
/// # Errors
/// The OS error of creating one.
pub fn create_dir_all(path: impl AsRef<Path>) -> io::Result<()> {
    match locate(path.as_ref())? {
        Location::Local(path) => std::fs::create_dir_all(path),
        Location::Remote(_) => Ok(()),
    }
}

/// Renames `from` to `to`, replacing a file at `to`: the atomic commit of a staged output.
/// When `to` is an object, the staged file `from` (local: [`staging::temp_path`] spools a remote
/// target's output on this machine) is uploaded as it, whole or not at all, and then removed; a
/// staged directory is uploaded file by file under `to/` (each object whole, the set not
/// atomically: a reader of the prefix may see some files before the others).
///
/// # Errors
/// The OS error of renaming; the store's error of uploading, naming the object.
pub fn rename(from: impl AsRef<Path>, to: impl AsRef<Path>) -> io::Result<()> {
    let from = local(from.as_ref())?;
    match locate(to.as_ref())? {
        Location::Local(to) => std::fs::rename(from, to),
        Location::Remote(remote) => {
            upload_tree(&from, &remote)?;
            if from.is_dir() { std::fs::remove_dir_all(&from) } else { std::fs::remove_file(&from) }
        }
    }
}

/// Uploads the file `from` as `to`, or the files under the directory `from` as `to/RELATIVE`.
fn upload_tree(from: &Path, to: &remote::Remote) -> io::Result<()> {
    if !from.is_dir() {
        return to.upload(from);
    }
    let mut entries: Vec<_> = std::fs::read_dir(from)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_str().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: not a UTF-8 name", entry.path().display()))
        })?;
        let key = object_store::path::Path::from(format!("{}/{name}", to.key));
        upload_tree(&entry.path(), &to.sibling(key))?;
    }
    Ok(())
}

/// Copies a file's contents to `to`, creating or truncating it.
///
/// # Errors
/// The OS error of reading or writing.
pub fn copy(from: impl AsRef<Path>, to: impl AsRef<Path>) -> io::Result<u64> {
    std::fs::copy(local(from.as_ref())?, local(to.as_ref())?)
}

/// Removes a file, or an object (a missing object is not an error: stores do not say).
///
/// # Errors
/// The OS error of removing it.
pub fn remove_file(path: impl AsRef<Path>) -> io::Result<()> {
    match locate(path.as_ref())? {
        Location::Local(path) => std::fs::remove_file(path),
        Location::Remote(remote) => remote.remove(),
    }
}

/// Removes an empty directory.
///
/// # Errors
/// The OS error of removing it.
pub fn remove_dir(path: impl AsRef<Path>) -> io::Result<()> {
    std::fs::remove_dir(local(path.as_ref())?)
}

/// Removes a directory and everything under it.
///
/// # Errors
/// The OS error of removing one of them.
pub fn remove_dir_all(path: impl AsRef<Path>) -> io::Result<()> {
    std::fs::remove_dir_all(local(path.as_ref())?)
}

/// A scratch directory, removed when dropped: in the system's temporary directory, or beside
/// `near` (a path the user chose, so one a cluster shares) when given. Scratch space is local.
///
/// # Errors
/// The OS error of making it.
pub fn scratch_dir(near: Option<&Path>, prefix: &str) -> io::Result<tempfile::TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    match near {
        None => builder.tempdir(),
        Some(near) => {
            let near = local(near)?;
            let parent = std::path::absolute(&near)?.parent().map(Path::to_path_buf).unwrap_or_else(|| ".".into());
            builder.tempdir_in(&parent).map_err(|e| {
                io::Error::new(e.kind(), format!("making a scratch directory in {}: {e}", parent.display()))
            })
        }
    }
}

/// Writes a file atomically: through a buffered temporary file beside `path`, synced and then
/// renamed over it, so a reader never sees a half-written file and a failed write leaves
/// nothing behind. Every cnclip output that is a single file goes through here. An object is
/// written to a local scratch file and uploaded ([`remote::Remote::upload`]).
///
/// # Errors
/// Whatever `write` returns, or the IO error (naming `path`) of creating, syncing or renaming.
pub fn write_atomically<E: From<io::Error>>(
    path: &Path,
    write: impl FnOnce(&mut io::BufWriter<std::fs::File>) -> Result<(), E>,
) -> Result<(), E> {
    let context = |e: io::Error| io::Error::new(e.kind(), format!("writing {}: {e}", path.display()));
    let target = match locate(path).map_err(context)? {
        Location::Local(target) => target,
        Location::Remote(remote) => {
            // Written whole to a local scratch file, then uploaded: the object appears complete
            // or not at all (a multipart upload is completed last, or aborted).
            let scratch = tempfile::NamedTempFile::new().map_err(context)?;
            let mut out = io::BufWriter::with_capacity(1 << 20, scratch.reopen().map_err(context)?);
            write(&mut out)?;
            out.into_inner().map_err(|e| context(e.into_error()))?;
            return remote.upload(scratch.path()).map_err(E::from);
        }
    };
    let dir = target.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = staging::temp_path(&dir.join(target.file_name().unwrap_or_default()));
    let result = (|| {
        let mut out = io::BufWriter::with_capacity(1 << 20, create(&tmp).map_err(context)?);
        write(&mut out)?;
        out.into_inner().map_err(|e| context(e.into_error()))?.sync_all().map_err(context)?;
        rename(&tmp, &target).map_err(context)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_match_std_fs_including_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a b#1.txt");
        std::fs::write(&file, "héllo").unwrap();
        assert_eq!(read(&file).unwrap(), std::fs::read(&file).unwrap());
        assert_eq!(read_to_string(&file).unwrap(), "héllo");
        assert_eq!(&read_range(&file, 1..3).unwrap()[..], "é".as_bytes());
        assert_eq!(read_range(&file, 2..2).unwrap().len(), 0);
        // Paths object_store cannot name (`..`, its own upload names) are read by std::fs.
        let dotted = dir.path().join("x/../a b#1.txt");
        std::fs::create_dir(dir.path().join("x")).unwrap();
        assert_eq!(read(&dotted).unwrap(), b"h\xc3\xa9llo");
        std::fs::write(dir.path().join("model#2"), "w").unwrap();
        assert_eq!(read(dir.path().join("model#2")).unwrap(), b"w");
        assert_eq!(&read_range(dir.path().join("model#2"), 0..1).unwrap()[..], b"w");
        // The errors a caller sees are std::fs's.
        let missing = dir.path().join("missing.txt");
        assert_eq!(read(&missing).unwrap_err().to_string(), std::fs::read(&missing).unwrap_err().to_string());
        assert_eq!(read(dir.path()).unwrap_err().to_string(), std::fs::read(dir.path()).unwrap_err().to_string());
        std::fs::write(dir.path().join("latin1.txt"), b"caf\xe9").unwrap();
        assert_eq!(
            read_to_string(dir.path().join("latin1.txt")).unwrap_err().to_string(),
            std::fs::read_to_string(dir.path().join("latin1.txt")).unwrap_err().to_string()
        );
        for past in [4..10, 6..7, 100..101] {
            assert_eq!(read_range(&file, past.clone()).unwrap_err().kind(), io::ErrorKind::UnexpectedEof, "{past:?}");
        }
        assert_eq!(read_range(&dotted, 4..10).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn special_files_are_read_to_their_end() {
        // /proc files say they hold 0 bytes.
        assert!(read_to_string("/proc/self/status").unwrap().contains("VmRSS"));
        // A FIFO (as `<(cat file)` hands a job) is read whole, once.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `name` is a valid NUL-terminated path for the duration of the call.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, "x\ty\n".repeat(50_000)))
        };
        assert_eq!(read(&fifo).unwrap().len(), 200_000);
        writer.join().unwrap().unwrap();
    }

    #[test]
    fn file_urls_name_local_files_and_remote_ones_need_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data set.jsonl");
        std::fs::write(&file, "{}").unwrap();
        let url = url::Url::from_file_path(&file).unwrap();
        assert!(url.as_str().contains("data%20set"), "{url}");
        assert_eq!(read(Path::new(url.as_str())).unwrap(), b"{}");
        assert_eq!(open(Path::new(url.as_str())).unwrap().metadata().unwrap().len(), 2);
        for remote in ["s3://bucket/corpus/part-0.tar", "gs://b/x", "https://example.com/x.parquet"] {
            assert!(is_remote(Path::new(remote)), "{remote}");
            // What needs a local file says so, naming it.
            let error = open(Path::new(remote)).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::Unsupported, "{remote}");
            assert!(error.to_string().starts_with(remote), "{error}");
        }
        let error = read(Path::new("ftp://host/x.tsv")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::Unsupported);
        assert!(error.to_string().starts_with("ftp://host/x.tsv: ftp:// storage is not supported"), "{error}");
        // Not URLs: local names that happen to hold "://".
        assert!(matches!(local(Path::new("out/a://b")).unwrap(), Cow::Borrowed(_)));
        assert!(matches!(local(Path::new("1x://b")).unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn create_if_absent_writes_once() {
        let dir = tempfile::tempdir().unwrap();
        let claim = dir.path().join("new/claim.json");
        assert!(create_if_absent(&claim, "first").unwrap());
        assert!(!create_if_absent(&claim, "second").unwrap());
        assert_eq!(std::fs::read_to_string(&claim).unwrap(), "first");
        // Nothing else is left beside it (no staging file).
        assert_eq!(std::fs::read_dir(dir.path().join("new")).unwrap().count(), 1);
        // Anything at the path counts: a directory, a dangling link.
        std::fs::create_dir(dir.path().join("new/dir")).unwrap();
        assert!(!create_if_absent(dir.path().join("new/dir"), "x").unwrap());
        std::os::unix::fs::symlink(dir.path().join("gone"), dir.path().join("new/link")).unwrap();
        assert!(!create_if_absent(dir.path().join("new/link"), "x").unwrap());
        // Of many writers racing for one path, one wins.
        let race = dir.path().join("race.json");
        let won: usize = std::thread::scope(|scope| {
            let writers: Vec<_> = (0..8)
                .map(|i| {
                    scope.spawn({
                        let race = &race;
                        move || create_if_absent(race, format!("{i}")).unwrap()
                    })
                })
                .collect();
            writers.into_iter().map(|w| usize::from(w.join().unwrap())).sum()
        });
        assert_eq!(won, 1);
    }

    #[test]
    fn write_atomically_leaves_nothing_when_writing_fails() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        write_atomically(&out, |w| w.write_all(b"done")).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"done");
        let failed: io::Result<()> = write_atomically(&out, |w| {
            w.write_all(b"half")?;
            Err(io::Error::other("stopped"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&out).unwrap(), b"done", "the old file stays whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file is left");
    }
}
