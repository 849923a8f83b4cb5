//! Where outputs are written before they are complete. Every cnclip output (a file or an LMDB
//! directory) is written at a temporary path beside its target and renamed into place only when
//! the job has succeeded. Temporary names carry a recognisable prefix and the writing process's
//! id — `.cnclip-tmp-{pid}-{name}` — so a job that was killed (SIGKILL, a power cut) before it
//! could clean up leaves something a later run can recognise: before writing a target, cnclip
//! removes that target's leftovers whose process is gone, and never those of a live process
//! (two jobs may write beside each other).
//!
//! An output built in resumable steps (extraction's parts) is claimed by one job at a time:
//! [`WriterLock`].

use std::path::{Path, PathBuf};

const PREFIX: &str = ".cnclip-tmp-";

/// The temporary path for `path`, in the same directory (so the final rename is atomic), after
/// removing what dead processes left for the same target.
///
/// An object's output is spooled on this machine, in `$TMPDIR/cnclip-spool/` (named after a hash
/// of its URL and its file name), and uploaded when committed ([`super::rename`]).
pub fn temp_path(path: &Path) -> PathBuf {
    let path = &local(path);
    let path = &spooled(path).unwrap_or_else(|| path.clone());
    remove_stale(path);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{PREFIX}{}-{name}", std::process::id()))
}

/// Whether `a` and `b` name the same file or directory, whether or not they exist yet: both
/// made absolute with symbolic links resolved as far as they exist (`out/../data.jsonl`,
/// `./data.jsonl` and a link to it are one path). Jobs compare their outputs with their inputs
/// (and with each other) through this before writing anything.
pub fn same_path(a: &Path, b: &Path) -> bool {
    let (a, b) = (&local(a), &local(b));
    match (resolved(a), resolved(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

/// Whether `path` is `dir` or lies under it (as [`same_path`] resolves them).
pub fn within(path: &Path, dir: &Path) -> bool {
    let (path, dir) = (&local(path), &local(dir));
    match (resolved(path), resolved(dir)) {
        (Some(path), Some(dir)) => path.starts_with(dir),
        _ => path.starts_with(dir),
    }
}

/// `path` absolute, with the links of its existing part resolved and `.`/`..` taken out of the
/// part that does not exist yet (`out/../data.jsonl` with no `out/` is `./data.jsonl`).
fn resolved(path: &Path) -> Option<PathBuf> {
    if let Ok(real) = std::fs::canonicalize(path) {
        return Some(real);
    }
    let absolute = std::path::absolute(path).ok()?;
    let mut existing = PathBuf::new();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    for component in absolute.components() {
        match component {
            std::path::Component::ParentDir if !rest.is_empty() => {
                rest.pop();
            }
            std::path::Component::ParentDir => {
                existing = std::fs::canonicalize(&existing).unwrap_or(existing);
                existing.pop();
            }
            std::path::Component::CurDir => {}
            other if rest.is_empty() && existing.join(other).exists() => existing.push(other),
            other => rest.push(other.as_os_str().to_os_string()),
        }
    }
    let mut out = std::fs::canonicalize(&existing).unwrap_or(existing);
    out.extend(rest);
    Some(out)
}

/// Removes `.cnclip-tmp-{pid}-{name}` beside `path` (files or directories) whose process no
/// longer runs; returns what it removed. Errors are ignored: a leftover that cannot be removed
/// does not stop a new job.
pub fn remove_stale(path: &Path) -> Vec<PathBuf> {
    let path = &local(path);
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, target)) = file_name.strip_prefix(PREFIX).and_then(|rest| rest.split_once('-')) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if target != name || pid == std::process::id() || alive(pid) {
            continue;
        }
        let leftover = entry.path();
        let gone = if leftover.is_dir() { std::fs::remove_dir_all(&leftover) } else { std::fs::remove_file(&leftover) };
        if gone.is_ok() {
            tracing::info!(path = %leftover.display(), pid, "Removed what a stopped cnclip job left behind");
            removed.push(leftover);
        }
    }
    removed
}

/// Where work on `path` happens on this machine: `path` itself when it is local; for an object,
/// its place in the spool ([`temp_path`]), where a job keeps what it resumes from (extraction's
/// parts) until the finished output is uploaded.
pub fn local_stand_in(path: &Path) -> PathBuf {
    spooled(path).unwrap_or_else(|| local(path))
}

/// Where the output of the remote target `path` is spooled: `$TMPDIR/cnclip-spool/HASH-NAME`.
/// `None` for a local path.
fn spooled(path: &Path) -> Option<PathBuf> {
    use sha2::Digest;
    if !super::is_remote(path) {
        return None;
    }
    let spool = std::env::temp_dir().join("cnclip-spool");
    let _ = std::fs::create_dir_all(&spool);
    // The object's identity (its store, the S3 endpoint included, and key): one URL may name
    // objects of two servers, which two jobs may write at once.
    let identity = match super::locate(path) {
        Ok(super::Location::Remote(remote)) => remote.identity(),
        _ => path.to_string_lossy().into_owned(),
    };
    let hash = sha2::Sha256::digest(identity.as_bytes());
    let hash: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    Some(spool.join(format!("{hash}-{name}")))
}

/// The local path of `path` (a `file://` URL's path). A location this cannot name (another
/// scheme) is kept as given: the storage call that opens it refuses it, naming it.
fn local(path: &Path) -> PathBuf {
    super::local(path).map_or_else(|_| path.to_path_buf(), std::borrow::Cow::into_owned)
}

/// Whether process `pid` exists (signal 0 checks without sending; EPERM means it exists but
/// belongs to someone else).
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// An exclusive claim on writing one output, held until dropped: a lock (`flock`) on
/// `.{name}.cnclip-lock` beside the output. A job whose output is built in steps it can resume
/// (extraction's parts) takes it first, so a second job on the same output (an array task
/// submitted twice, or requeued while its first run still writes from an unresponsive node)
/// fails at once, naming the holder, instead of both writing one work directory. The lock dies
/// with its process, however it ends; the file, holding the holder's pid and host for the
/// message, is removed on drop (a killed job's stays, unlocked, for the next run to take).
///
/// Across machines the guard is only as good as the shared file system's locks: NFSv4 and
/// CephFS lock for every client; an NFS mount with `nolock` or Lustre with `localflock` lock
/// for one node only, so there a job on another node is not stopped.
///
/// An object's output is claimed twice: by the same lock on its spooled stand-in (one machine),
/// and by a lock object `.{name}.cnclip-lock` beside it in the store, created with a
/// conditional write, so of two jobs anywhere exactly one gets it. The lock object is removed on
/// drop; one a killed job left is taken over by a job on the same host (its process is gone),
/// and otherwise names its holder, to be removed by hand once that job is known to be gone.
#[derive(Debug)]
pub struct WriterLock {
    file: std::fs::File,
    path: PathBuf,
    /// The lock object of an object's output.
    claim: Option<PathBuf>,
}

impl WriterLock {
    /// Takes the claim on writing `target`, or fails with [`Error::Busy`](crate::Error::Busy)
    /// when another process holds it.
    ///
    /// # Errors
    /// The lock file cannot be created, or another process holds the lock.
    pub fn acquire(target: &Path) -> crate::Result<WriterLock> {
        if !super::is_remote(target) {
            return Self::acquire_local(target);
        }
        let mut lock = Self::acquire_local(&local_stand_in(target))?;
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let claim = target.with_file_name(format!(".{}.cnclip-lock", name.trim_start_matches('.')));
        let io = |source: std::io::Error| crate::Error::Io { path: claim.display().to_string(), source };
        let holder = holder();
        for _ in 0..2 {
            if super::create_if_absent(&claim, &holder).map_err(io)? {
                lock.claim = Some(claim);
                return Ok(lock);
            }
            let found = super::read_to_string(&claim).unwrap_or_default();
            // A job of this host that is gone: its claim is taken over.
            let ours = found.strip_prefix("pid ").and_then(|rest| rest.split_once(" on ")).and_then(|(pid, host)| {
                (host == holder.split_once(" on ").map_or("", |(_, h)| h)).then(|| pid.parse::<u32>().ok()).flatten()
            });
            match ours {
                Some(pid) if !alive(pid) => super::remove_file(&claim).map_err(io)?,
                _ => {
                    return Err(crate::Error::Busy {
                        target: target.display().to_string(),
                        lock: format!("{} (delete it if that job is gone)", claim.display()),
                        holder: if found.trim().is_empty() { "starting".into() } else { found.trim().to_string() },
                    });
                }
            }
        }
        Err(crate::Error::Busy {
            target: target.display().to_string(),
            lock: claim.display().to_string(),
            holder: "another job, which took it over at the same time".into(),
        })
    }

    fn acquire_local(target: &Path) -> crate::Result<WriterLock> {
        use std::io::{Read, Seek, Write};
        let target = &local(target);
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let path = target.with_file_name(format!(".{}.cnclip-lock", name.trim_start_matches('.')));
        let io = |source: std::io::Error| crate::Error::Io { path: path.display().to_string(), source };
        loop {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder =
                        if holder.trim().is_empty() { "starting".to_string() } else { holder.trim().to_string() };
                    return Err(crate::Error::Busy {
                        target: target.display().to_string(),
                        lock: path.display().to_string(),
                        holder,
                    });
                }
                // A file system without locks (some FUSE and old NFS mounts): the job goes on,
                // unguarded, as before there was a lock.
                Err(std::fs::TryLockError::Error(e))
                    if [libc::ENOLCK, libc::EOPNOTSUPP, libc::ENOSYS].contains(&e.raw_os_error().unwrap_or(0)) =>
                {
                    eprintln!(
                        "cnclip: warning: cannot lock {} ({e}): a second job on this output would not be stopped",
                        path.display()
                    );
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
            // The holder before us may have removed the file after we opened it: our lock is then
            // on a file nobody else will open. Lock again, by name.
            let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
                use std::os::unix::fs::MetadataExt;
                a.ino() == b.ino() && a.dev() == b.dev()
            };
            match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(ours), Ok(named)) if same(&ours, &named) => {}
                _ => continue,
            }
            file.set_len(0).map_err(io)?;
            file.rewind().map_err(io)?;
            file.write_all(holder().as_bytes()).map_err(io)?;
            return Ok(WriterLock { file, path, claim: None });
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `pid PID on HOST`: who holds a lock.
fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("pid {} on {}", std::process::id(), host.trim())
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            let _ = super::remove_file(claim);
        }
        // Removed while still locked, so no other process can lock this file and then find it
        // gone; closing the file (after this) releases the lock.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_path_sees_through_dots_links_and_missing_folders() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("data.jsonl"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("data.jsonl"), root.join("link.jsonl")).unwrap();
        let data = root.join("data.jsonl");
        for same in ["data.jsonl", "./data.jsonl", "link.jsonl", "missing/../data.jsonl", "a/b/../../data.jsonl"] {
            assert!(same_path(&root.join(same), &data), "{same}");
        }
        for other in ["missing/data.jsonl", "data.jsonl.out", "missing/.."] {
            assert!(!same_path(&root.join(other), &data), "{other}");
        }
        assert!(within(&root.join("missing/x.parquet"), root));
        assert!(within(&root.join("missing/../x"), root));
        assert!(!within(&root.join("../x"), root));
    }

    #[test]
    fn a_second_writer_of_one_output_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("part-00001-of-00004.parquet");
        let first = WriterLock::acquire(&target).unwrap();
        assert_eq!(first.path(), dir.path().join(".part-00001-of-00004.parquet.cnclip-lock"));
        // flock locks belong to an open file: a second opening conflicts, in this process too.
        let busy = WriterLock::acquire(&target).unwrap_err().to_string();
        assert!(busy.contains(&format!("pid {}", std::process::id())), "{busy}");
        assert!(busy.contains("another job is writing it") && busy.contains("part-00001-of-00004.parquet"), "{busy}");
        // Another output is not this one's.
        let other = WriterLock::acquire(&dir.path().join("part-00002-of-00004.parquet")).unwrap();
        drop(first);
        assert!(!dir.path().join(".part-00001-of-00004.parquet.cnclip-lock").exists(), "the lock file stays");
        let again = WriterLock::acquire(&target).unwrap();
        drop((again, other));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_killed_writers_lock_file_is_taken_over() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("features.parquet");
        // A process that held the lock and was killed: its file stays, its lock is gone.
        // (flock(1), of util-linux, holds it for `sleep`; both in a group of their own, killed
        // together.)
        let mut holder = std::process::Command::new("flock")
            .arg(dir.path().join(".features.parquet.cnclip-lock"))
            .args(["sleep", "60"])
            .process_group(0)
            .spawn()
            .unwrap();
        let kill_group = |pid: u32| {
            let status = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
            assert!(status.unwrap().success(), "kill the holder's group");
        };
        // Held once a lock of our own on the file would block (ours, if taken, goes with `file`).
        let lock_file = dir.path().join(".features.parquet.cnclip-lock");
        let start = std::time::Instant::now();
        while !std::fs::File::open(&lock_file)
            .is_ok_and(|file| matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
        {
            if start.elapsed().as_secs() > 30 {
                kill_group(holder.id());
                panic!("flock(1) took no lock in 30 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let busy = WriterLock::acquire(&target).unwrap_err().to_string();
        assert!(busy.contains("another job is writing it"), "{busy}");
        kill_group(holder.id());
        holder.wait().unwrap();
        // `sleep`, not our child, may take a moment more to exit and drop the lock.
        let start = std::time::Instant::now();
        let lock = loop {
            match WriterLock::acquire(&target) {
                Ok(lock) => break lock,
                Err(e) => assert!(start.elapsed().as_secs() < 10, "not taken over 10 s after the kill: {e}"),
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let holder = std::fs::read_to_string(lock.path()).unwrap();
        assert!(holder.starts_with(&format!("pid {} on ", std::process::id())), "{holder}");
    }

    #[test]
    fn leftovers_of_dead_processes_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("train_images.parquet");
        // A process that has exited: its pid is free (reuse within this test is not a concern).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let dead_file = dir.path().join(format!(".cnclip-tmp-{dead}-train_images.parquet"));
        let dead_dir = dir.path().join(format!(".cnclip-tmp-{dead}-train"));
        std::fs::write(&dead_file, b"half").unwrap();
        std::fs::create_dir(&dead_dir).unwrap();
        // A live process's (this one's parent), another target's, and an unrelated file.
        let live = dir.path().join(format!(".cnclip-tmp-{}-train_images.parquet", std::os::unix::process::parent_id()));
        let other = dir.path().join(format!(".cnclip-tmp-{dead}-valid_images.parquet"));
        let unrelated = dir.path().join("notes.txt");
        for keep in [&live, &other, &unrelated] {
            std::fs::write(keep, b"keep").unwrap();
        }
        let tmp = temp_path(&target);
        assert_eq!(tmp, dir.path().join(format!(".cnclip-tmp-{}-train_images.parquet", std::process::id())));
        assert!(!dead_file.exists());
        assert!(dead_dir.exists(), "another target's leftover went with this one's");
        assert!(live.exists() && other.exists() && unrelated.exists());
        // An LMDB split's half-written directory goes too.
        assert_eq!(remove_stale(&dir.path().join("train")), std::slice::from_ref(&dead_dir));
        assert!(!dead_dir.exists());
    }
}
