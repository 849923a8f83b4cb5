//! `cnclip-torch` finds libtorch without `LD_LIBRARY_PATH` (the build embeds its folder as an
//! rpath) and starts.
//!
//! These are the `cnclip-torch` package's integration tests, so `cargo test --workspace` builds
//! the `cnclip-torch` binary that `tests/` runs.

use std::process::Command;

#[test]
fn cnclip_torch_finds_libtorch_and_starts() {
    let exe = env!("CARGO_BIN_EXE_cnclip-torch");
    let output = Command::new("ldd").arg(exe).env_remove("LD_LIBRARY_PATH").output().expect("ldd runs");
    let libraries = String::from_utf8_lossy(&output.stdout);
    assert!(libraries.contains("libtorch_cpu.so"), "no libtorch in:\n{libraries}");
    assert!(!libraries.contains("not found"), "unresolved libraries:\n{libraries}");
    let version = Command::new(exe).arg("--version").env_remove("LD_LIBRARY_PATH").output().expect("it starts");
    assert!(version.status.success(), "{}", String::from_utf8_lossy(&version.stderr));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("cnclip "));
}
