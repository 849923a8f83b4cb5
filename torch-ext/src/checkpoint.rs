//! Activation checkpointing ([`checkpoint`]) as torch's reentrant `torch.utils.checkpoint`,
//! which cn_clip's `--grad-checkpointing` wraps around each ViT residual block and BERT layer:
//! the function's activations are not kept between the forward and backward passes but
//! recomputed in backward, with the forward's random number generator states (dropout draws
//! the same masks) and autocast settings. Memory for activations drops to the blocks' inputs;
//! the price is a second forward pass of each block.

use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use tch::Tensor;

use crate::{Result, check, ffi};

/// The closure the shim calls, boxed twice so its pointer is thin.
type Closure = Box<dyn Fn(&Tensor) -> Tensor + Send>;

/// `f(input)`, checkpointed: run now without recording a graph, and again, recording, when the
/// gradients flow back through its result. Parameters `f` uses receive their gradients in that
/// second run. With gradients off, or an `input` that requires none, `f` simply runs.
///
/// `f` must compute the same function both times: it may draw random numbers (they repeat) but
/// must not depend on state that changes in between.
///
/// # Errors
/// `f` panicked in the forward run (its message), or libtorch refused the graph.
pub fn checkpoint(input: &Tensor, f: impl Fn(&Tensor) -> Tensor + Send + 'static) -> Result<Tensor> {
    let closure: Box<Closure> = Box::new(Box::new(f));
    let data = Box::into_raw(closure).cast::<c_void>();
    let mut out: ffi::TensorPtr = std::ptr::null_mut();
    // SAFETY: `data` is a leaked `Box<Closure>` that the shim frees exactly once, through
    // `drop_closure`, whatever happens; `input` is live for the call; `out` is written only on
    // success, with a new `at::Tensor*` that the returned Tensor owns from then on.
    check("checkpointing", unsafe {
        ffi::cnclip_checkpoint(data, run, drop_closure, ffi::tensor_ptr(input), &mut out)
    })?;
    // SAFETY: a new tensor handle the shim allocated for us, as tch's own functions return them.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// The shim's callback: runs the closure on `input`, hands the result over through `output`.
unsafe extern "C" fn run(data: *mut c_void, input: ffi::TensorPtr, output: ffi::TensorPtr) -> *mut c_char {
    // SAFETY: `data` is the `Box<Closure>` that `checkpoint` leaked, alive until `drop_closure`.
    let f = unsafe { &*data.cast::<Closure>() };
    // SAFETY: `input` is a live `at::Tensor*`; the handle is a new one this Tensor owns.
    let x = unsafe { Tensor::from_ptr(ffi::cnclip_tensor_handle(input).cast()) };
    match catch_unwind(AssertUnwindSafe(|| f(&x))) {
        Ok(y) => {
            // SAFETY: `output` is the shim's `at::Tensor` slot for the result.
            unsafe { ffi::cnclip_tensor_assign(output, ffi::tensor_ptr(&y)) };
            std::ptr::null_mut()
        }
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the checkpointed function panicked".into());
            // SAFETY: the shim copies the bytes into a message it owns (and frees).
            unsafe { ffi::cnclip_ext_message(text.as_ptr().cast(), text.len()) }
        }
    }
}

/// The shim's destructor for the closure.
unsafe extern "C" fn drop_closure(data: *mut c_void) {
    // SAFETY: called once, by the shim, on the pointer `checkpoint` leaked.
    drop(unsafe { Box::from_raw(data.cast::<Closure>()) });
}
