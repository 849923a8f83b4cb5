//! Mixed precision as torch does it: [`autocast`] for a device type and dtype (tch's own
//! `autocast` switches CUDA's only, in fp16, where cn_clip's `--precision amp` on CPU needs
//! bf16), and [`unscale`], the kernel of torch's `GradScaler.unscale_`.

use std::ffi::c_int;

use tch::{Kind, Tensor};

use crate::{Error, Result, check, ffi};

/// The device types autocast is switched for (c10's `DeviceType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutocastDevice {
    Cpu,
    Cuda,
}

impl AutocastDevice {
    fn code(self) -> c_int {
        match self {
            AutocastDevice::Cpu => 0,
            AutocastDevice::Cuda => 1,
        }
    }
}

/// c10's `ScalarType` number of the autocast dtypes.
fn dtype_code(kind: Kind) -> Result<c_int> {
    match kind {
        Kind::Half => Ok(5),
        Kind::BFloat16 => Ok(15),
        Kind::Float => Ok(6),
        other => Err(Error { what: "autocast", message: format!("{other:?} is not an autocast dtype") }),
    }
}

/// Runs `f` with autocast on for `device` in `dtype` on this thread, as `with
/// torch.autocast(device, dtype=dtype):` does: ops on the autocast lists run in `dtype` (matmuls,
/// convolutions, linear layers) or in fp32 (softmax, norms, losses). The state before is given
/// back afterwards, also when `f` panics.
///
/// # Errors
/// `dtype` is not half, bfloat16 or float.
pub fn autocast<T>(device: AutocastDevice, dtype: Kind, f: impl FnOnce() -> T) -> Result<T> {
    struct Restore {
        device: c_int,
        enabled: bool,
        dtype: c_int,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: undoes this thread's matching enter. It can only fail for an unknown
            // device type, which `code` never gives.
            let message = unsafe { ffi::cnclip_autocast_exit(self.device, self.enabled, self.dtype) };
            let _ = check("autocast", message);
        }
    }
    let code = dtype_code(dtype)?;
    let (mut enabled, mut previous) = (false, 0);
    // SAFETY: the outputs are written only on success.
    check("autocast", unsafe { ffi::cnclip_autocast_enter(device.code(), true, code, &mut enabled, &mut previous) })?;
    let _restore = Restore { device: device.code(), enabled, dtype: previous };
    Ok(f())
}

/// torch's `_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)`: every
/// gradient multiplied by `inv_scale` (a one-element fp32 tensor) in place, and `found_inf` (a
/// one-element fp32 tensor, 0 before) set to 1 when any gradient holds an inf or a NaN.
///
/// # Errors
/// Tensors torch refuses (other devices, `found_inf` or `inv_scale` not one fp32 element).
pub fn unscale(grads: &[&Tensor], found_inf: &Tensor, inv_scale: &Tensor) -> Result<()> {
    let pointers: Vec<ffi::TensorPtr> = grads.iter().map(|t| ffi::tensor_ptr(t)).collect();
    // SAFETY: every tensor is live for the call; the op works in place on them.
    check("unscaling gradients", unsafe {
        ffi::cnclip_amp_unscale(
            pointers.as_ptr(),
            pointers.len(),
            ffi::tensor_ptr(found_inf),
            ffi::tensor_ptr(inv_scale),
        )
    })
}
