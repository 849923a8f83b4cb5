//! The bad-input batteries' harness (issue #23): run a cnclip command under a time limit and
//! check that it ended as a hostile input must end it — exit 1 with the file, line or id named
//! (or exit 0 with a counted quarantine), never a signal, a `panicked at`, a hang, or a
//! temporary file left behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a battery case may run before it counts as a hang.
pub const LIMIT: Duration = Duration::from_secs(120);

/// What a bounded run gave.
pub struct Ran {
    pub output: Output,
    pub stderr: String,
    pub stdout: String,
    pub took: Duration,
}

/// Runs `cnclip ARGS…` in `dir` under `limit`; a run past it is killed and the test fails,
/// calling it a hang.
///
/// # Panics
/// On a hang, or when the binary cannot start.
pub fn run_within(dir: &Path, args: &[&str], limit: Duration) -> Ran {
    let child = Command::new(crate::cnclip_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cnclip starts");
    wait_within(child, limit, &format!("cnclip {args:?}"))
}

/// Waits for `child` at most `limit` (killing it and failing the test past that).
///
/// # Panics
/// On a hang.
pub fn wait_within(mut child: Child, limit: Duration, what: &str) -> Ran {
    let started = Instant::now();
    // Drain the pipes on threads: a child that fills one must not stall.
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(pipe) = out.as_mut() {
            let _ = std::io::Read::read_to_end(pipe, &mut buf);
        }
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(pipe) = err.as_mut() {
            let _ = std::io::Read::read_to_end(pipe, &mut buf);
        }
        buf
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
            panic!("{what}: still running after {limit:?} (a hang); stderr so far:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ran {
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        output: Output { status, stdout, stderr },
        took,
    }
}

/// Runs `cnclip ARGS…` in `dir` and checks it was refused: exit status 1, every one of `names`
/// in its message, no panic, no temporary file left under `dir`. Returns stderr.
///
/// # Panics
/// When it was not.
pub fn refused(dir: &Path, args: &[&str], names: &[&str]) -> String {
    let ran = run_within(dir, args, LIMIT);
    check_refused(&ran, dir, names, &format!("cnclip {args:?}"));
    ran.stderr
}

/// The checks of [`refused`] on a finished run.
///
/// # Panics
/// When the run was not refused as it should be.
pub fn check_refused(ran: &Ran, dir: &Path, names: &[&str], what: &str) {
    use std::os::unix::process::ExitStatusExt;
    let stderr = &ran.stderr;
    assert_eq!(ran.output.status.signal(), None, "{what}: killed by a signal; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{what}: panicked:\n{stderr}");
    assert_eq!(ran.output.status.code(), Some(1), "{what}: should fail with status 1; stderr:\n{stderr}");
    for name in names {
        assert!(stderr.contains(name), "{what}: the message does not name `{name}`:\n{stderr}");
    }
    assert_eq!(leftovers(dir), Vec::<PathBuf>::new(), "{what}: left temporary files");
}

/// Runs `cnclip ARGS…` in `dir`, which must succeed (no panic); returns the run.
///
/// # Panics
/// When it fails.
pub fn succeeds(dir: &Path, args: &[&str]) -> Ran {
    let ran = run_within(dir, args, LIMIT);
    assert!(ran.output.status.success(), "cnclip {args:?} failed:\n{}", ran.stderr);
    assert!(!ran.stderr.contains("panicked"), "cnclip {args:?}: {}", ran.stderr);
    ran
}

/// Files and directories under `dir` whose names say they are temporary (`.cnclip-tmp-`).
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().contains(".cnclip-tmp-") {
            found.push(path.clone());
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(leftovers(&path));
        }
    }
    found.sort();
    found
}

/// Sends `signal` (`"TERM"`, `"INT"`, `"STOP"`, `"CONT"`) to process `pid`.
///
/// # Panics
/// When `kill` fails.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Starts `cnclip ARGS…` in `dir` with piped output, for a test that signals it.
///
/// # Panics
/// When it cannot start.
pub fn start(dir: &Path, args: &[&str]) -> Child {
    Command::new(crate::cnclip_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cnclip starts")
}

/// SIGTERM to a running job: it is stopped once `busy` says it is at work (checked every
/// 10 ms, for at most a minute), sent SIGTERM, and continued, so the signal lands while it
/// works whatever the machine's speed; it must exit with 143 within 5 s of the signal, saying
/// so, leaving no temporary file under `dir`. Returns its stderr.
///
/// # Panics
/// When it does not.
pub fn sigterm_while(dir: &Path, args: &[&str], busy: impl Fn() -> bool) -> String {
    let child = start(dir, args);
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !busy() {
        assert!(Instant::now() < deadline, "cnclip {args:?} never got busy");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(pid, "STOP");
    signal(pid, "TERM");
    signal(pid, "CONT");
    let ran = wait_within(child, Duration::from_secs(5), &format!("cnclip {args:?} after SIGTERM"));
    assert_eq!(ran.output.status.code(), Some(143), "cnclip {args:?}: {}", ran.stderr);
    assert!(ran.stderr.contains("interrupted by SIGTERM"), "cnclip {args:?}: {}", ran.stderr);
    assert_eq!(leftovers(dir), Vec::<PathBuf>::new(), "cnclip {args:?}: left temporary files after SIGTERM");
    ran.stderr
}

/// Writes a safetensors checkpoint's float32 tensors as NaN (what a diverged run saves),
/// in place: the header is kept, every F32 tensor's bytes become quiet NaNs.
///
/// # Panics
/// When the file is not a safetensors file.
pub fn poison_safetensors(path: &Path) {
    let mut bytes = std::fs::read(path).expect("reads the checkpoint");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).expect("a JSON header");
    let base = 8 + header_len;
    for (name, tensor) in header.as_object().expect("an object") {
        if name == "__metadata__" || tensor["dtype"] != "F32" {
            continue;
        }
        let offsets = tensor["data_offsets"].as_array().expect("offsets");
        let (start, end) = (offsets[0].as_u64().unwrap() as usize, offsets[1].as_u64().unwrap() as usize);
        for chunk in bytes[base + start..base + end].chunks_mut(4) {
            chunk.copy_from_slice(&f32::NAN.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).expect("writes the checkpoint");
}
