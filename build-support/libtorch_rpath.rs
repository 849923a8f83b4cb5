//! Build script shared by every crate that links libtorch (through `tch`).
//!
//! `torch-sys` finds libtorch through `LIBTORCH`, which `.cargo/config.toml` points at the
//! project venv's `torch/` (made by `scripts/setup.sh`). It adds link search paths but no
//! runtime path, so a plain `cargo run`/`cargo test` binary would need `LD_LIBRARY_PATH`.
//! We embed the library folder as a DT_RPATH (`--disable-new-dtags`): unlike DT_RUNPATH it is
//! also searched for the libraries that libtorch itself loads (CUDA runtime, cuDNN, …).
//! Cargo applies `rustc-link-arg` to every binary, test and example of the package.
//!
//! A crate with a build script of its own includes this file as a module and calls
//! [`link_rpath`] (the distributed crate, which also compiles its c10d shim).

use std::path::PathBuf;

fn main() {
    link_rpath();
}

/// Embeds the libtorch library folder as the binaries' DT_RPATH (see the module's docs).
pub fn link_rpath() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=../build-support/libtorch_rpath.rs");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/setup.sh (binaries will need LD_LIBRARY_PATH)");
        return;
    };
    let libtorch = PathBuf::from(libtorch);
    // Resolve the venv symlink so the embedded path survives a re-link of `.venv/libtorch`.
    let libtorch = libtorch.canonicalize().unwrap_or(libtorch);
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags,-rpath,{}", lib.display());
}
