//! Inputs that must be local files — a checkpoint libtorch maps, a FAISS index directory a
//! search memory-maps — given as objects in a store: downloaded once into the spool
//! (`$TMPDIR/cnclip-spool/fetched/`), named after a hash of the object's identity (its store, the
//! S3 endpoint included, and key: one URL may name objects of two servers) and of its ETag,
//! and reused while the ETag holds; a new version replaces the old copy. A download is written
//! under a temporary name and renamed when whole, so a killed job leaves no half copy that a
//! later one would take for the object.

use std::io;
use std::path::{Path, PathBuf};

use super::{Location, locate, remote::Remote};

/// Where fetched copies live.
fn fetched_dir() -> io::Result<PathBuf> {
    let dir = std::env::temp_dir().join("cnclip-spool").join("fetched");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn short_hash(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `path` as a local file: itself when local (a `file://` URL's path), else the object's copy
/// in the spool, downloaded first when missing or out of date.
///
/// # Errors
/// The store's error, naming the object; the OS error of writing the copy.
pub fn local_copy(path: &Path) -> io::Result<PathBuf> {
    match locate(path)? {
        Location::Local(path) => Ok(path.into_owned()),
        Location::Remote(remote) => {
            let (size, version) = remote.version()?;
            copy_of(&remote, size, &version, &fetched_dir()?)
        }
    }
}

/// `path` as a local directory: itself when local, else every object under the prefix copied
/// into a directory of the spool (each as [`local_copy`] would, by its ETag), and objects no
/// longer under the prefix removed from it.
///
/// # Errors
/// The store's error (a prefix with no objects: `NotFound`, naming it); the OS error of writing.
pub fn local_dir_copy(path: &Path) -> io::Result<PathBuf> {
    dir_copy(path, true)
}

/// As [`local_dir_copy`], but a prefix with no objects gives an empty directory: where a job
/// builds an output directory that it may resume (`build-index`), then [`upload_dir`]s.
///
/// # Errors
/// The store's error; the OS error of writing.
pub fn local_dir_for(path: &Path) -> io::Result<PathBuf> {
    dir_copy(path, false)
}

fn dir_copy(path: &Path, must_exist: bool) -> io::Result<PathBuf> {
    let remote = match locate(path)? {
        Location::Local(path) => return Ok(path.into_owned()),
        Location::Remote(remote) => remote,
    };
    let listed = remote.list()?;
    if listed.is_empty() && must_exist {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("{}: no objects under this prefix", remote.url)));
    }
    let dir = dir_of(&remote)?;
    std::fs::create_dir_all(&dir)?;
    let prefix = format!("{}/", remote.key.as_ref().trim_end_matches('/'));
    let mut wanted = std::collections::HashSet::new();
    for (key, size) in listed {
        let relative = key.as_ref().strip_prefix(&prefix).unwrap_or(key.as_ref()).to_string();
        let object = remote.sibling(key);
        let (_, version) = object.version()?;
        let target = dir.join(&relative);
        let parent = target.parent().unwrap_or(&dir).to_path_buf();
        std::fs::create_dir_all(&parent)?;
        let stamp = stamp_of(&target);
        let current = std::fs::metadata(&target).is_ok_and(|m| m.len() == size)
            && std::fs::read_to_string(&stamp).is_ok_and(|v| v == version);
        if !current {
            download(&object, size, &target)?;
            std::fs::write(&stamp, version.as_bytes())?;
        }
        wanted.insert(target);
        wanted.insert(stamp);
    }
    remove_unwanted(&dir, &wanted)?;
    Ok(dir)
}

/// The spool directory that stands for the prefix `remote`.
fn dir_of(remote: &Remote) -> io::Result<PathBuf> {
    let name = Path::new(&remote.url).file_name().unwrap_or_default().to_string_lossy().into_owned();
    Ok(fetched_dir()?.join(format!("{}-{name}.d", short_hash(&remote.identity()))))
}

/// The ETag stamp kept beside a fetched file.
fn stamp_of(file: &Path) -> PathBuf {
    file.with_file_name(format!(".{}.etag", file.file_name().unwrap_or_default().to_string_lossy()))
}

fn is_stamp(file: &Path) -> bool {
    file.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.') && n.ends_with(".etag"))
}

/// Makes the prefix `to` hold what the local directory `dir` (from [`local_dir_for`]) holds:
/// each file uploaded whole (objects appear one by one, not at once; files in sub-folders, such
/// as a run's `checkpoints/`, after the top level's, so that a checkpoint is never in the store
/// before the metrics that precede it), then the objects whose copies the job removed deleted
/// (those with a stamp and no file: objects the job never saw are left alone). A file not
/// changed since its stamp (the ETag of its last upload or download) is not sent again. The
/// stamps take the new ETags, so the next [`local_dir_copy`] downloads nothing.
///
/// # Errors
/// The store's error, naming the object; the OS error of reading.
pub fn upload_dir(dir: &Path, to: &Path) -> io::Result<()> {
    let remote = match locate(to)? {
        Location::Local(_) => return Ok(()),
        Location::Remote(remote) => remote,
    };
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.retain(|f| !is_temporary(f));
    files.sort_by_key(|f| (f.components().count(), f.clone()));
    let listed: std::collections::HashSet<_> = remote.list()?.into_iter().map(|(key, _)| key).collect();
    let key_of = |file: &Path| {
        let relative = file.strip_prefix(dir).unwrap_or(file).to_string_lossy().into_owned();
        object_store::path::Path::from(format!("{}/{relative}", remote.key.as_ref().trim_end_matches('/')))
    };
    for file in files.iter().filter(|f| !is_stamp(f)) {
        let key = key_of(file);
        // Unchanged since it was uploaded or downloaded (its stamp is newer, strictly: times
        // have a coarse tick) and still there.
        let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if listed.contains(&key) && modified(&stamp_of(file)) > modified(file) && modified(file).is_some() {
            continue;
        }
        let object = remote.sibling(key.clone());
        object.upload(file)?;
        let (_, version) = object.version()?;
        std::fs::write(stamp_of(file), version.as_bytes())?;
    }
    // A stamp without its file: the job removed a copy it had synced (a stale index shard).
    for stamp in files.iter().filter(|f| is_stamp(f)) {
        let name = stamp.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let file = stamp.with_file_name(&name[1..name.len() - ".etag".len()]);
        if !file.exists() {
            let key = key_of(&file);
            if listed.contains(&key) {
                super::remove_file(Path::new(&remote.sibling(key).url))?;
            }
            std::fs::remove_file(stamp)?;
        }
    }
    Ok(())
}

/// A file being written by a process (a download's or a job's staging name): never synced.
fn is_temporary(file: &Path) -> bool {
    file.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".cnclip-tmp-"))
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() { walk(&path, files)? } else { files.push(path) }
    }
    Ok(())
}

/// Removes the files under `dir` that are not in `wanted`.
fn remove_unwanted(dir: &Path, wanted: &std::collections::HashSet<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            remove_unwanted(&path, wanted)?;
        } else if !wanted.contains(&path) && !is_temporary(&path) {
            // (Another process's download in progress is left to it.)
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// The copy of `remote` (of `size` bytes at `version`) in `dir`, downloaded if missing; other
/// versions' copies of the same URL removed.
fn copy_of(remote: &Remote, size: u64, version: &str, dir: &Path) -> io::Result<PathBuf> {
    let name = Path::new(&remote.url).file_name().unwrap_or_default().to_string_lossy().into_owned();
    let url_hash = short_hash(&remote.identity());
    let target = dir.join(format!("{url_hash}-{}-{name}", short_hash(version)));
    if std::fs::metadata(&target).is_ok_and(|m| m.len() == size) {
        return Ok(target);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(&format!("{url_hash}-")) && entry.path() != target {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    download(remote, size, &target)?;
    Ok(target)
}

/// Streams `remote` to `target` through a temporary file beside it, checking its size.
fn download(remote: &Remote, size: u64, target: &Path) -> io::Result<()> {
    let partial = super::staging::temp_path(target);
    let result = (|| {
        let mut reader = super::remote::RemoteReader::open(remote)?;
        let mut file = std::fs::File::create(&partial)?;
        let copied = io::copy(&mut reader, &mut file)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: {copied} bytes read, the store said {size}", remote.url),
            ));
        }
        file.sync_all()?;
        std::fs::rename(&partial, target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_path_is_its_own_copy() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.pt");
        std::fs::write(&file, b"weights").unwrap();
        assert_eq!(local_copy(&file).unwrap(), file);
        let url = PathBuf::from(format!("file://{}", file.display()));
        assert_eq!(local_copy(&url).unwrap(), file);
        assert_eq!(local_dir_copy(dir.path()).unwrap(), dir.path());
    }
}
