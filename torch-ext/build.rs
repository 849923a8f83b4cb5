//! Compiles the shim (`csrc/`: c10d, amp and checkpointing) against the pinned libtorch's headers, as
//! torch-sys compiles its own `torch_api.cpp`: same include folders, C++17, the same C++ ABI
//! (`LIBTORCH_CXX11_ABI`, 1 unless set, as torch-sys reads it). Gloo's headers, which the wheel
//! lacks, are stood in for by `csrc/gloo/` (see its README). The symbols resolve against
//! `libtorch_cpu`, which tch links.

#[allow(dead_code)]
#[path = "../build-support/libtorch_rpath.rs"]
mod libtorch_rpath;

use std::path::PathBuf;

fn main() {
    libtorch_rpath::link_rpath();
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        panic!("LIBTORCH is not set: run scripts/setup.sh (the shim compiles against libtorch's headers)");
    };
    let include = PathBuf::from(libtorch).join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    cc::Build::new()
        .cpp(true)
        .file("csrc/c10d.cpp")
        .file("csrc/amp.cpp")
        .file("csrc/checkpoint.cpp")
        .include("csrc")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("USE_C10D_GLOO", None)
        .define("GLOG_USE_GLOG_EXPORT", None)
        .warnings(false)
        .compile("cnclip_c10d");
}
