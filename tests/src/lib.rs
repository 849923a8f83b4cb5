//! Helpers for cnclip's integration and parity tests.
//!
//! The reference is cn_clip 1.6.0 running on CPU in the project venv (made by
//! `scripts/setup.sh`). [`reference()`] runs `tests/reference/cnclip_ref.py` there; the tests
//! themselves live in `tests/it/` (one integration binary, `it/main.rs`, a module per topic).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository root (this crate lives in `tests/`). Taken from the `CARGO_MANIFEST_DIR`
/// that `cargo test` sets when it *runs* a test, not the one compiled in: a target directory
/// shared between checkouts (as CI's cache is) may hold this crate built from another one.
pub fn workspace_root() -> PathBuf {
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir.parent().expect("tests/ has a parent").to_path_buf()
}

/// The `cnclip` binary, which `cargo test --workspace` builds beside the test binaries (for the
/// CLI packages' own tests, `cli/*/tests/`).
///
/// # Panics
/// When it has not been built, saying how to build it.
pub fn cnclip_bin() -> PathBuf {
    // `CNCLIP_TEST_BIN_DIR` runs the tests against other binaries (e.g. an older build, to see
    // a regression test fail before its fix).
    if let Some(dir) = std::env::var_os("CNCLIP_TEST_BIN_DIR") {
        return PathBuf::from(dir).join("cnclip");
    }
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let target = exe.parent().and_then(Path::parent).expect("test binaries live in target/<profile>/deps");
    let bin = target.join("cnclip");
    assert!(
        bin.exists(),
        "{} not built: run `cargo test --workspace` (or `cargo build -p cnclip-cli -p cnclip-torch`)",
        bin.display()
    );
    bin
}

/// `cnclip-torch`, beside [`cnclip_bin`].
///
/// # Panics
/// As [`cnclip_bin`].
pub fn cnclip_torch_bin() -> PathBuf {
    cnclip_bin().with_file_name("cnclip-torch")
}

/// The project venv's python, which has torch, cn_clip, py-lmdb and pyarrow.
///
/// # Panics
/// When the venv is missing: the tests cannot run without the reference, and say how to fix it.
pub fn venv_python() -> PathBuf {
    let python = workspace_root().join(".venv/bin/python");
    assert!(python.exists(), "{} not found: run scripts/setup.sh to create the project venv", python.display());
    python
}

/// Runs `python -c SCRIPT ARGS…` in the venv, feeding `stdin`; returns stdout.
///
/// # Panics
/// When python exits non-zero, with its stderr in the message.
pub fn python(script: &str, args: &[&str], stdin: &str) -> String {
    run(Command::new(venv_python()).arg("-c").arg(script).args(args), stdin)
}

/// Runs the cn_clip reference harness (`tests/reference/cnclip_ref.py`) with `args`.
///
/// # Panics
/// When the harness exits non-zero, with its stderr in the message.
pub fn reference(args: &[&str], stdin: &str) -> String {
    let harness = workspace_root().join("tests/reference/cnclip_ref.py");
    run(Command::new(venv_python()).arg(harness).args(args), stdin)
}

fn run(command: &mut Command, stdin: &str) -> String {
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {description}: {e}"));
    // Write stdin from a thread so a child that fills its stdout pipe first cannot deadlock us.
    let mut pipe = child.stdin.take().expect("stdin is piped");
    let input = stdin.to_owned();
    let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    let output = child.wait_with_output().expect("child runs to completion");
    writer.join().expect("stdin writer").expect("child reads its stdin");
    assert!(
        output.status.success(),
        "{description} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("reference output is UTF-8")
}

pub mod corpus;
pub mod faulty;
pub mod hostile;
pub mod s3;

/// `cn_clip.clip.tokenize(text, context_length)` for each text, through the reference harness.
pub fn reference_token_ids(texts: &[String], context_length: usize) -> Vec<Vec<i64>> {
    let stdin: String = texts.iter().map(|t| serde_json::to_string(t).expect("strings serialise") + "\n").collect();
    let out = reference(&["tokenize", "--context-length", &context_length.to_string()], &stdin);
    let rows: Vec<Vec<i64>> =
        out.lines().map(|line| serde_json::from_str(line).expect("the harness prints JSON id lists")).collect();
    assert_eq!(rows.len(), texts.len(), "the harness returns one row per text");
    rows
}

/// The test images of `tests/reference/make_images.py` (every mode and format the decoders
/// meet), written into `dir`: name → path.
///
/// # Panics
/// When the script fails.
pub fn make_images(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let script = workspace_root().join("tests/reference/make_images.py");
    let out = python(
        &format!(
            "import runpy, sys; sys.argv = ['make_images', sys.argv[1]]; runpy.run_path({:?}, run_name='__main__')",
            script
        ),
        &[dir.to_str().unwrap()],
        "",
    );
    serde_json::from_str(&out).unwrap()
}
