//! Truncated and corrupted LMDB inputs (issue #10): LMDB trusts its file and crashes on a bad
//! one (SIGBUS, SIGSEGV), so cnclip never hands it an input. Every such file gives a clear
//! error naming its `data.mdb` — or, where a flipped bit only changed a value, that record is
//! quarantined — never a crash, and no temporary file is left behind.

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PAGE: usize = 4096;

/// A cn_clip LMDB split written through LMDB's own transactions (`train/imgs`, `train/pairs`).
fn lmdb_split(root: &Path) -> PathBuf {
    let demo = root.join("demo");
    let run = |args: &[&str]| {
        let output = Command::new(cnclip_tests::cnclip_bin()).args(args).output().unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    run(&["synth", "--out", demo.to_str().unwrap(), "--train", "300", "--valid", "1", "--test", "1"]);
    let lmdb = root.join("lmdb");
    run(&["build-lmdb", "--data-dir", demo.to_str().unwrap(), "--splits", "train", "--writer", "txn"]);
    std::fs::rename(demo.join("lmdb"), &lmdb).unwrap();
    lmdb
}

fn import(lmdb: &Path, out: &Path) -> Output {
    Command::new(cnclip_tests::cnclip_bin())
        .args(["import", "--lmdb-dir", lmdb.to_str().unwrap(), "--splits", "train", "--out", out.to_str().unwrap()])
        .output()
        .unwrap()
}

/// Files under `dir` whose names say they are temporary.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".cnclip-tmp-") {
            found.push(name);
        }
        if entry.path().is_dir() {
            found.extend(leftovers(&entry.path()));
        }
    }
    found
}

/// The import of a damaged database either succeeds (a value changed) or fails with exit code 1
/// naming `data`; never a signal, never a temporary file left.
fn check_damaged(lmdb: &Path, out: &Path, data: &Path, what: &str) -> bool {
    let output = import(lmdb, out);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), None, "{what}: killed by a signal; stderr: {stderr}");
    assert!(leftovers(out).is_empty(), "{what}: left {:?}", leftovers(out));
    if output.status.success() {
        return false;
    }
    assert_eq!(output.status.code(), Some(1), "{what}: {stderr}");
    assert!(
        stderr.contains(&data.display().to_string()),
        "{what}: the error does not name {}: {stderr}",
        data.display()
    );
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    true
}

#[test]
fn truncated_lmdb_files_are_refused_naming_the_file() {
    let root = tempfile::tempdir().unwrap();
    let lmdb = lmdb_split(root.path());
    let out = root.path().join("out");
    for db in ["imgs", "pairs"] {
        let data = lmdb.join("train").join(db).join("data.mdb");
        let whole = std::fs::read(&data).unwrap();
        for len in [0, 100, PAGE + 8, whole.len() / 2, whole.len() - PAGE, whole.len() - 1] {
            std::fs::write(&data, &whole[..len]).unwrap();
            let what = format!("{db} cut to {len} of {} bytes", whole.len());
            assert!(check_damaged(&lmdb, &out, &data, &what), "{what}: the import succeeded");
            let stderr = String::from_utf8_lossy(&import(&lmdb, &out).stderr).into_owned();
            assert!(
                stderr.contains("truncated") || stderr.contains("meta page 0"),
                "{what}: the error does not say what is wrong: {stderr}"
            );
        }
        std::fs::write(&data, &whole).unwrap();
    }
    assert!(import(&lmdb, &out).status.success(), "the restored database does not import");
}

#[test]
fn flipped_bits_in_lmdb_pages_give_an_error_or_a_quarantine_never_a_crash() {
    let root = tempfile::tempdir().unwrap();
    let lmdb = lmdb_split(root.path());
    let out = root.path().join("out");
    let mut refused = 0;
    for db in ["imgs", "pairs"] {
        let data = lmdb.join("train").join(db).join("data.mdb");
        let whole = std::fs::read(&data).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        // The meta pages' fields, and the headers and node offsets of every tree page (branch
        // or leaf, by their flags), where LMDB would follow a bad number out of the map.
        let mut offsets: Vec<usize> = (16..160).step_by(8).chain((PAGE + 16..PAGE + 160).step_by(8)).collect();
        for page in 2..whole.len() / PAGE {
            let flags = u16::from_le_bytes([whole[page * PAGE + 10], whole[page * PAGE + 11]]);
            if flags & 0x03 != 0 {
                offsets.extend([page * PAGE, page * PAGE + 10, page * PAGE + 12, page * PAGE + 14, page * PAGE + 17]);
            }
        }
        for at in offsets {
            file.write_all_at(&[whole[at] ^ 0x81], at as u64).unwrap();
            refused += usize::from(check_damaged(&lmdb, &out, &data, &format!("{db}: byte {at} flipped")));
            file.write_all_at(&whole[at..at + 1], at as u64).unwrap();
        }
    }
    assert!(refused > 20, "only {refused} damaged files were refused");
    assert!(import(&lmdb, &out).status.success(), "the restored database does not import");
}
