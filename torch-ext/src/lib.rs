//! What cnclip needs of libtorch that tch does not bind, and nothing home-made:
//! - [`c10d`]: process groups for data-parallel training (TCPStore rendezvous, Gloo
//!   collectives);
//! - [`amp`]: mixed precision (autocast with a dtype per device type, and the kernels of
//!   torch's `GradScaler`);
//! - [`checkpoint`]: activation checkpointing (a custom autograd node that recomputes).
//!
//! `csrc/` is a thin C ABI over libtorch's own classes and functions (as torch-sys's
//! `torch_api.cpp` is over ATen), compiled by `build.rs` against the headers of the pinned torch
//! wheel; the symbols are in `libtorch_cpu`, which tch links. Every shim function that can fail
//! returns null or an error message, which `check` turns into an [`Error`].

pub mod amp;
pub mod c10d;
pub mod checkpoint;
mod ffi;

use std::ffi::{CStr, CString, c_char};

/// A libtorch call through the shim that failed, with libtorch's message (a timeout, a peer
/// that closed its connection, a tensor of the wrong shape or device).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct Error {
    /// What was being done ("all-reduce", "joining the process group", …).
    pub what: &'static str,
    /// libtorch's message.
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

/// Turns the shim's returned message (null: success) into a result, freeing it.
fn check(what: &'static str, message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return of the shim is a NUL-terminated string it malloc'd for us.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    // SAFETY: freed once, with the shim's free (the allocator that made it).
    unsafe { ffi::cnclip_ext_free(message.cast()) };
    Err(Error { what, message: text })
}

fn c_string(what: &'static str, text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| Error { what, message: format!("{text:?} holds a NUL byte") })
}
