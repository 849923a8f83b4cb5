//! Where outputs are written before they are complete. Every cnclip output (a file or an LMDB
//! directory) is written at a temporary path beside its target and renamed into place only when
//! the job has succeeded. Temporary names carry a recognisable prefix and the writing process's
//! id — `.cnclip-tmp-{pid}-{name}` — so a job that was killed (SIGKILL, a power cut) before it
//! could clean up leaves something a later run can recognise: before writing a target, cnclip
//! removes that target's leftovers whose process is gone, and never those of a live process
//! (two jobs may write beside each other).

use std::path::{Path, PathBuf};

const PREFIX: &str = ".cnclip-tmp-";

/// The temporary path for `path`, in the same directory (so the final rename is atomic), after
/// removing what dead processes left for the same target.
pub fn temp_path(path: &Path) -> PathBuf {
    remove_stale(path);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{PREFIX}{}-{name}", std::process::id()))
}

/// Removes `.cnclip-tmp-{pid}-{name}` beside `path` (files or directories) whose process no
/// longer runs; returns what it removed. Errors are ignored: a leftover that cannot be removed
/// does not stop a new job.
pub fn remove_stale(path: &Path) -> Vec<PathBuf> {
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

/// Whether process `pid` exists (signal 0 checks without sending; EPERM means it exists but
/// belongs to someone else).
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

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
