//! The C ABI of `csrc/` (`c10d.cpp`, `amp.cpp`, `checkpoint.cpp`), as declared there. Every `*mut c_char`
//! returned is null on success or an error message the caller frees with [`cnclip_ext_free`].

use std::ffi::{c_char, c_int, c_void};

use tch::Tensor;

/// An opaque `c10::intrusive_ptr<c10d::TCPStore>` holder.
#[repr(C)]
pub struct CnStore {
    _private: [u8; 0],
}

/// An opaque process group (a `c10d::Backend`) with its timeout.
#[repr(C)]
pub struct CnGroup {
    _private: [u8; 0],
}

/// An opaque `c10d::Work` in flight.
#[repr(C)]
pub struct CnWork {
    _private: [u8; 0],
}

/// tch's tensor pointer, an `at::Tensor*` (torch-sys's opaque `C_tensor`).
pub type TensorPtr = *mut c_void;

unsafe extern "C" {
    pub fn cnclip_ext_free(p: *mut c_void);

    pub fn cnclip_c10d_tcp_store(
        host: *const c_char,
        port: u16,
        world_size: u32,
        is_server: bool,
        timeout_ms: i64,
        out: *mut *mut CnStore,
    ) -> *mut c_char;
    pub fn cnclip_c10d_store_port(store: *const CnStore) -> u16;
    pub fn cnclip_c10d_store_set(store: *mut CnStore, key: *const c_char, data: *const u8, len: usize) -> *mut c_char;
    pub fn cnclip_c10d_store_get(
        store: *mut CnStore,
        key: *const c_char,
        data: *mut *mut u8,
        len: *mut usize,
    ) -> *mut c_char;
    pub fn cnclip_c10d_store_add(store: *mut CnStore, key: *const c_char, value: i64, out: *mut i64) -> *mut c_char;
    pub fn cnclip_c10d_store_drop(store: *mut CnStore);

    pub fn cnclip_c10d_gloo(
        store: *mut CnStore,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        hostname: *const c_char,
        prefix: *const c_char,
        out: *mut *mut CnGroup,
    ) -> *mut c_char;
    pub fn cnclip_c10d_group_rank(group: *const CnGroup) -> c_int;
    pub fn cnclip_c10d_group_size(group: *const CnGroup) -> c_int;
    pub fn cnclip_c10d_group_drop(group: *mut CnGroup);

    pub fn cnclip_c10d_all_reduce(
        group: *mut CnGroup,
        tensors: *const TensorPtr,
        n: usize,
        op: c_int,
        out: *mut *mut CnWork,
    ) -> *mut c_char;
    pub fn cnclip_c10d_all_reduce_sum_autograd(
        group: *mut CnGroup,
        input: TensorPtr,
        out: *mut TensorPtr,
    ) -> *mut c_char;
    pub fn cnclip_c10d_all_gather(
        group: *mut CnGroup,
        outputs: *const TensorPtr,
        n: usize,
        input: TensorPtr,
        out: *mut *mut CnWork,
    ) -> *mut c_char;
    pub fn cnclip_c10d_broadcast(
        group: *mut CnGroup,
        tensor: TensorPtr,
        root: c_int,
        out: *mut *mut CnWork,
    ) -> *mut c_char;
    pub fn cnclip_c10d_barrier(group: *mut CnGroup) -> *mut c_char;
    pub fn cnclip_c10d_work_wait(work: *mut CnWork) -> *mut c_char;
    pub fn cnclip_c10d_work_drop(work: *mut CnWork);

    pub fn cnclip_autocast_enter(
        device: c_int,
        enabled: bool,
        dtype: c_int,
        previous_enabled: *mut bool,
        previous_dtype: *mut c_int,
    ) -> *mut c_char;
    pub fn cnclip_autocast_exit(device: c_int, previous_enabled: bool, previous_dtype: c_int) -> *mut c_char;
    pub fn cnclip_ext_message(text: *const c_char, len: usize) -> *mut c_char;
    pub fn cnclip_tensor_handle(tensor: TensorPtr) -> TensorPtr;
    pub fn cnclip_tensor_assign(dst: TensorPtr, src: TensorPtr);
    pub fn cnclip_checkpoint(
        data: *mut c_void,
        run: unsafe extern "C" fn(*mut c_void, TensorPtr, TensorPtr) -> *mut c_char,
        drop: unsafe extern "C" fn(*mut c_void),
        input: TensorPtr,
        out: *mut TensorPtr,
    ) -> *mut c_char;
    pub fn cnclip_amp_unscale(
        grads: *const TensorPtr,
        n: usize,
        found_inf: TensorPtr,
        inv_scale: TensorPtr,
    ) -> *mut c_char;
}

/// tch's pointer to `tensor`, as the shim takes it.
pub fn tensor_ptr(tensor: &Tensor) -> TensorPtr {
    tensor.as_ptr() as TensorPtr
}
