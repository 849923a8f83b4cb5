//! Directories of sharded parts — `part-{i:05}-of-{n:05}.parquet`, as `extract-features --shard
//! i/n` writes them from an array job — read as one table. Every reader that takes such a
//! directory (knn's gallery and queries, build-index, `cnclip sql`) first checks that each of
//! the n shards' parts is there: an array job with a shard still running or failed is then an
//! error naming the missing shards, not a table silently short of their rows. This is the cheap
//! check, on file names only; `cnclip manifest check DIR` verifies the rest (entries, sizes,
//! checksums, model, duplicate ids).
//!
//! Directories whose `.parquet` files carry no `-of-` shard names (parts written by other tools)
//! are read as they are. In every directory, a `.parquet` entry that is not a regular file (a
//! FIFO, a device, a directory) is refused by name, and a sharded table holding other Parquet
//! files beside its parts (strays, which readers would take as rows) is refused too.

use crate::storage;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The shard a part's file name stands for: `part-00002-of-00008.parquet` → (2, 8).
pub fn part_shard(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let (index, count) = rest.split_once("-of-")?;
    let number =
        |s: &str| (s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<u64>().ok()).flatten();
    let (index, count) = (number(index)?, number(count)?);
    (index < count).then_some((index, count))
}

/// Why a directory of parts cannot be read as one table.
#[derive(Debug, thiserror::Error)]
pub enum PartsError {
    /// The directory, or an entry's metadata, cannot be read.
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A `.parquet` entry that is `kind` (a FIFO, a directory), not a file.
    #[error("{}: {kind}, not a regular file: a table's parts are Parquet files", .path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    /// Parquet files that are not parts beside a sharded table's parts (sorted names).
    #[error(
        "{}: a sharded table (part-…-of-N.parquet) also holding {} other Parquet file(s) ({}): they would be read \
         as rows of the table; move them out (`cnclip manifest check {}` lists every problem)",
        .dir.display(), .strays.len(), .strays.join(", "), .dir.display()
    )]
    Strays { dir: PathBuf, strays: Vec<String> },
    /// Parts of several shard counts `counts` (N of `-of-N`) in one directory.
    #[error(
        "{}: parts of {} shard runs mixed (part-…-of-N.parquet with N = {}): one directory holds one sharded \
         table",
        .dir.display(), .counts.len(), list(.counts)
    )]
    MixedRuns { dir: PathBuf, counts: Vec<u64> },
    /// Shards `missing` (their indexes) of `count`.
    #[error(
        "{}: a sharded table missing {} of its {count} shards ({}): run them (`--shard i/{count}`) before reading \
         it; `cnclip manifest check {}` lists every problem",
        .dir.display(), .missing.len(), missing_parts(.missing, *.count), .dir.display()
    )]
    Missing { dir: PathBuf, count: u64, missing: Vec<u64> },
}

fn list(counts: &[u64]) -> String {
    counts.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

/// The first five missing parts' file names, `, …` after them when there are more.
fn missing_parts(missing: &[u64], count: u64) -> String {
    let listed: Vec<String> = missing.iter().take(5).map(|i| format!("part-{i:05}-of-{count:05}.parquet")).collect();
    format!("{}{}", listed.join(", "), if missing.len() > listed.len() { ", …" } else { "" })
}

/// The names directly in the directory `dir`, or of the objects directly under the prefix `dir`
/// in a store (not those in deeper "folders").
///
/// # Errors
/// The directory or the prefix cannot be listed.
pub fn names_in(dir: &Path) -> std::io::Result<Vec<String>> {
    if storage::is_remote(dir) {
        let prefix = format!("{}/", dir.display().to_string().trim_end_matches('/'));
        let listed = storage::list_remote(dir)?;
        Ok(listed
            .into_iter()
            .filter_map(|(url, _)| url.strip_prefix(&prefix).filter(|name| !name.contains('/')).map(str::to_string))
            .collect())
    } else {
        let entries = storage::read_dir(dir)?;
        Ok(entries.flatten().map(|entry| entry.file_name().to_string_lossy().into_owned()).collect())
    }
}

/// Checks that a directory holding sharded parts holds every shard's.
///
/// # Errors
/// Shards missing (named, with their files), parts of different shard counts mixed, or the
/// directory unreadable.
pub fn check_complete(dir: &Path) -> Result<(), PartsError> {
    let names = names_in(dir).map_err(|source| PartsError::Io { path: dir.to_path_buf(), source })?;
    // Shard count → indexes present.
    let mut found: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut stray = Vec::new();
    for name in names {
        if !name.ends_with(".parquet") || name.starts_with('.') {
            continue;
        }
        // A FIFO or a device read as a part would hang or never end, a directory fails
        // somewhere deep in the reader: refused here, by name (links followed). (Objects are
        // objects.)
        let path = dir.join(&name);
        if !storage::is_remote(dir) {
            match storage::metadata(&path) {
                Ok(meta) if meta.is_file() => {}
                Ok(meta) => return Err(PartsError::NotAFile { path, kind: kind_of(&meta) }),
                Err(source) => return Err(PartsError::Io { path, source }),
            }
        }
        match part_shard(&name) {
            Some((index, count)) => found.entry(count).or_default().push(index),
            None => stray.push(name),
        }
    }
    if !found.is_empty() && !stray.is_empty() {
        stray.sort();
        return Err(PartsError::Strays { dir: dir.to_path_buf(), strays: stray });
    }
    if found.len() > 1 {
        return Err(PartsError::MixedRuns { dir: dir.to_path_buf(), counts: found.keys().copied().collect() });
    }
    let Some((&count, indexes)) = found.iter().next() else { return Ok(()) };
    let present: std::collections::BTreeSet<u64> = indexes.iter().copied().collect();
    let missing: Vec<u64> = (0..count).filter(|i| !present.contains(i)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(PartsError::Missing { dir: dir.to_path_buf(), count, missing })
}

/// The `*.parquet` files directly in `dir`, in name order: a table's parts, as its readers
/// take them. Hidden files are not parts (a killed writer's `.cnclip-tmp-…` file, which would
/// otherwise sort first), as in [`check_complete`] and `cnclip sql`'s tables.
///
/// # Errors
/// The directory cannot be read.
pub fn parquet_files(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<std::path::PathBuf> = storage::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .filter(|p| !is_hidden(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Whether `path`'s file name starts with a dot: a hidden file, such as a killed writer's
/// `.cnclip-tmp-…`, which is never a part of a table or a wildcard's match.
pub fn is_hidden(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
}

/// What a file that is not a regular one is, in a word or two.
pub fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_are_read_strictly() {
        assert_eq!(part_shard("part-00002-of-00008.parquet"), Some((2, 8)));
        assert_eq!(part_shard("part-123456-of-200000.parquet"), Some((123_456, 200_000)));
        for not in [
            "part-00008-of-00008.parquet",
            "part-2-of-8.parquet",
            "part-00002-of-00008.json",
            "part-00000.parquet",
            "xpart-00002-of-00008.parquet",
            "part-0000a-of-00008.parquet",
        ] {
            assert_eq!(part_shard(not), None, "{not}");
        }
    }

    #[test]
    fn a_tables_parts_leave_out_hidden_files_and_other_extensions() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["part-00001.parquet", ".cnclip-tmp-123-part-00000.parquet", "part-00000.parquet", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let names: Vec<String> = parquet_files(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["part-00000.parquet", "part-00001.parquet"]);
    }

    #[test]
    fn a_missing_shard_or_mixed_runs_are_named_and_plain_directories_pass() {
        let dir = tempfile::tempdir().unwrap();
        let touch = |name: &str| std::fs::write(dir.path().join(name), b"").unwrap();
        touch("notes.txt");
        touch("part-00000.parquet");
        assert!(check_complete(dir.path()).is_ok(), "no shard names: read as it is");
        touch("part-00000-of-00001.parquet");
        let e = check_complete(dir.path()).unwrap_err().to_string();
        assert!(e.contains("1 other Parquet file(s) (part-00000.parquet)"), "a stray beside a shard: {e}");
        std::fs::remove_file(dir.path().join("part-00000-of-00001.parquet")).unwrap();
        std::fs::remove_file(dir.path().join("part-00000.parquet")).unwrap();
        for i in [0, 1, 3] {
            touch(&format!("part-{i:05}-of-00004.parquet"));
        }
        let e = check_complete(dir.path()).unwrap_err().to_string();
        assert!(e.contains("missing 1 of its 4 shards (part-00002-of-00004.parquet)"), "{e}");
        assert!(e.contains("manifest check"), "{e}");
        touch("part-00002-of-00004.parquet");
        assert!(check_complete(dir.path()).is_ok());
        touch("part-00000-of-00002.parquet");
        let e = check_complete(dir.path()).unwrap_err().to_string();
        assert!(e.contains("N = 2, 4"), "{e}");
    }

    #[test]
    fn a_part_that_is_not_a_regular_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("part-00000-of-00002.parquet"), b"").unwrap();
        std::os::unix::fs::symlink("/dev/null", dir.path().join("part-00001-of-00002.parquet")).unwrap();
        let e = check_complete(dir.path()).unwrap_err().to_string();
        assert!(e.contains("part-00001-of-00002.parquet: a character device, not a regular file"), "{e}");
        std::fs::remove_file(dir.path().join("part-00001-of-00002.parquet")).unwrap();
        std::fs::create_dir(dir.path().join("part-00001-of-00002.parquet")).unwrap();
        let e = check_complete(dir.path()).unwrap_err().to_string();
        assert!(e.contains("a directory, not a regular file"), "{e}");
    }
}
