//! What a saved result was made from: content fingerprints of input files, so a job that keeps
//! a result between runs (a FAISS index saved with `--index-path`, a benchmark run's JSON, an
//! extraction shard's part) can tell that its inputs are still the ones it was made from, and
//! redo or refuse when they are not — instead of silently answering from stale inputs.
//!
//! A [`Stamp`] is a file's path, size and modification time, and optionally its sha256: size and
//! time catch almost every change for the price of a `stat`; the hash also catches a file
//! replaced by another of the same size whose time was kept (`cp -p`, `rsync -t`), and is worth
//! it where the file is read anyway or small next to the work it saves (a checkpoint, a gallery).

use std::path::{Path, PathBuf};

use crate::storage;
use serde::{Deserialize, Serialize};

/// One input file as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub path: PathBuf,
    /// `None` when the file could not be read (recorded as such: its error kind).
    pub bytes: Option<u64>,
    /// Modification time, nanoseconds since the epoch, as a string (JSON numbers are f64).
    pub modified: Option<String>,
    /// Hex sha256 of the contents, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Why the file could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Stamp {
    /// Stamps `path` (following symbolic links); with `hash`, reads it for its sha256 too. A
    /// file that cannot be read is stamped with the error's kind, not refused: the job itself
    /// reports or quarantines it.
    pub fn of(path: &Path, hash: bool) -> Stamp {
        let failed = |e: std::io::Error| Stamp {
            path: path.to_path_buf(),
            bytes: None,
            modified: None,
            sha256: None,
            error: Some(e.kind().to_string()),
        };
        // An object: its size and version (ETag), from the store.
        if let Ok(storage::Location::Remote(remote)) = storage::locate(path) {
            return match remote.version() {
                Ok((bytes, version)) => Stamp {
                    path: path.to_path_buf(),
                    bytes: Some(bytes),
                    modified: Some(version),
                    sha256: None,
                    error: None,
                },
                Err(e) => failed(e),
            };
        }
        let meta = match storage::metadata(path) {
            Ok(meta) => meta,
            Err(e) => return failed(e),
        };
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos().to_string());
        let sha256 = if hash && meta.is_file() {
            match sha256_file(path) {
                Ok(hex) => Some(hex),
                Err(e) => return failed(e),
            }
        } else {
            None
        };
        Stamp { path: path.to_path_buf(), bytes: Some(meta.len()), modified, sha256, error: None }
    }
}

/// The hex sha256 of a file, streamed.
///
/// # Errors
/// The file cannot be read.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut reader = storage::open(path)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut reader, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The files an input names: brace patterns (`{000..009}`) and globs expanded (objects in a
/// store too, stamped by size and ETag), an LMDB split or directory by its `data.mdb` (its
/// `lock.mdb` changes on every read), any other directory by every file under it (links to
/// directories followed, each directory once), in sorted order.
pub fn files_of(given: &[String]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for given in given.iter().flat_map(|g| crate::sources::webdataset::expand_braces(g)) {
        let mut found = if given.contains(['*', '?', '[']) {
            crate::sources::expand_paths(std::slice::from_ref(&given)).unwrap_or_default()
        } else {
            vec![PathBuf::from(&given)]
        };
        found.sort();
        for path in found {
            if let Some(lmdb) =
                [path.join("data.mdb"), path.join("imgs").join("data.mdb")].into_iter().find(|p| p.is_file())
            {
                files.push(lmdb);
            } else if path.is_dir() {
                let mut under = Vec::new();
                walk(&path, &mut under, &mut std::collections::HashSet::new());
                under.sort();
                files.extend(under);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Every file under `dir` (entries that cannot be listed are left out), following links to
/// directories as the image-folder walk does — a class folder that is a link is its files —
/// each directory once (`seen`: device and inode), so a loop or links fanning out cannot recur.
fn walk(dir: &Path, out: &mut Vec<PathBuf>, seen: &mut std::collections::HashSet<(u64, u64)>) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = storage::metadata(dir) else { return };
    if !seen.insert((meta.dev(), meta.ino())) {
        return;
    }
    let Ok(entries) = storage::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out, seen);
        } else {
            out.push(path);
        }
    }
}

/// Stamps of every file `given` names (see [`files_of`]), hashed or not.
pub fn stamps(given: &[String], hash: bool) -> Vec<Stamp> {
    files_of(given).iter().map(|file| Stamp::of(file, hash)).collect()
}

/// What differs between two stamp lists, in a few words for a message (`None`: nothing).
pub fn difference(was: &[Stamp], now: &[Stamp]) -> Option<String> {
    if was == now {
        return None;
    }
    let names = |stamps: &[Stamp]| stamps.iter().map(|s| s.path.clone()).collect::<Vec<_>>();
    if names(was) != names(now) {
        let listed =
            |stamps: &[Stamp]| stamps.iter().map(|s| s.path.display().to_string()).collect::<Vec<_>>().join(", ");
        return Some(format!("its files were [{}], now [{}]", listed(was), listed(now)));
    }
    let changed: Vec<String> = was
        .iter()
        .zip(now)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| {
            let what = if a.bytes != b.bytes {
                format!("{} bytes, now {}", show(a.bytes), show(b.bytes))
            } else if a.sha256 != b.sha256 && a.sha256.is_some() && b.sha256.is_some() {
                "other contents (sha256)".to_string()
            } else {
                "modified since".to_string()
            };
            format!("{} ({what})", a.path.display())
        })
        .collect();
    Some(format!("changed: {}", changed.join(", ")))
}

fn show(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "unreadable".into(), |b| b.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_replaced_with_the_same_size_and_time_differs_by_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        std::fs::write(&path, b"first").unwrap();
        let time = std::fs::metadata(&path).unwrap().modified().unwrap();
        let was = vec![Stamp::of(&path, true)];
        std::fs::write(&path, b"other").unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(time).unwrap();
        let unhashed = |s: &[Stamp]| s.iter().map(|s| Stamp { sha256: None, ..s.clone() }).collect::<Vec<_>>();
        let now = vec![Stamp::of(&path, true)];
        assert_eq!(difference(&unhashed(&was), &unhashed(&now)), None, "size and time are the same");
        let said = difference(&was, &now).expect("the hash differs");
        assert!(said.contains("a.bin") && said.contains("sha256"), "{said}");
        assert_eq!(difference(&now, &[Stamp::of(&path, true)]), None);
    }

    #[test]
    fn a_directory_is_its_files_and_an_lmdb_its_data_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("split/imgs")).unwrap();
        std::fs::write(dir.path().join("split/imgs/data.mdb"), b"x").unwrap();
        std::fs::write(dir.path().join("split/imgs/lock.mdb"), b"x").unwrap();
        std::fs::create_dir_all(dir.path().join("folder/a")).unwrap();
        std::fs::write(dir.path().join("folder/a/1.png"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("folder"), dir.path().join("folder/a/loop")).unwrap();
        let given = |p: &str| vec![dir.path().join(p).display().to_string()];
        assert_eq!(files_of(&given("split")), vec![dir.path().join("split/imgs/data.mdb")]);
        // The loop back to `folder` leads to a folder already listed: nothing more.
        assert_eq!(files_of(&given("folder")), vec![dir.path().join("folder/a/1.png")]);
        std::fs::create_dir_all(dir.path().join("elsewhere")).unwrap();
        std::fs::write(dir.path().join("elsewhere/2.png"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join("folder/b")).unwrap();
        assert_eq!(
            files_of(&given("folder")),
            vec![dir.path().join("folder/a/1.png"), dir.path().join("folder/b/2.png")],
            "a class folder that is a link is its files"
        );
    }
}
