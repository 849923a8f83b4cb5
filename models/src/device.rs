//! Devices. CUDA support lives in `libtorch_cuda.so`, which nothing in our binaries references
//! by symbol, so the linker (as-needed) drops it — and loading it eagerly would also cost every
//! command, GPU or not, the start-up of the whole CUDA stack. It is loaded on demand instead:
//! [`device`] `dlopen`s it (found through the binaries' rpath) before the first CUDA tensor.

use tch::Device;

use crate::error::{Error, Result};

/// Loads libtorch's CUDA backend once. Returns whether it loaded.
pub fn load_cuda_backend() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        // RTLD_GLOBAL: its kernels and hooks register with libtorch_cpu as they would at link time.
        // SAFETY: the name is a NUL-terminated literal; dlopen is thread-safe and runs only the
        // library's initializers, here libtorch's own CUDA backend of the libtorch this binary
        // links (found through its rpath), which registers with libtorch_cpu exactly as it would
        // when linked; `OnceLock` runs it once, and the handle is only compared with null.
        let handle = unsafe { libc::dlopen(c"libtorch_cuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        !handle.is_null()
    })
}

/// Parses `cpu`, `cuda` or `cuda:N`, loading the CUDA backend for CUDA devices.
///
/// # Errors
/// [`Error::Device`] for an unknown name, or a CUDA device that is not there (with the reason).
pub fn device(name: &str) -> Result<Device> {
    let index = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => return Err(Error::Device(format!("unknown device `{other}`: use cpu, cuda or cuda:N"))),
        },
    };
    if !load_cuda_backend() {
        return Err(Error::Device(format!(
            "device `{name}`: libtorch_cuda.so could not be loaded (CPU-only libtorch?)"
        )));
    }
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        return Err(Error::Device(format!("device `{name}`: {count} CUDA device(s) visible")));
    }
    Ok(Device::Cuda(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a GPU the backend still loads (the wheel ships it), and asking for
    /// a CUDA device is a clear error, not a crash.
    #[test]
    fn cuda_backend_loads_and_missing_devices_are_errors() {
        assert!(load_cuda_backend(), "libtorch_cuda.so did not load through the rpath");
        assert_eq!(device("cpu").unwrap(), Device::Cpu);
        if tch::Cuda::device_count() == 0 {
            let err = device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("0 CUDA device(s) visible"), "{err}");
        }
        assert!(device("tpu").is_err());
    }
}
