//! Mirror of `shim/msl_abi.h` and the few libc calls used to load kernels.

use std::ffi::{c_char, c_int, c_void};

pub const MAX_BUFFERS: usize = 31;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct BufferBinding {
    pub ptr: *mut c_void,
    pub len: u64,
    pub bound: u32,
    pub writable: u32,
}

impl Default for BufferBinding {
    fn default() -> Self {
        Self {
            ptr: std::ptr::null_mut(),
            len: 0,
            bound: 0,
            writable: 0,
        }
    }
}

#[repr(C)]
pub struct DispatchArgs {
    pub kernel: Option<unsafe extern "C" fn()>,
    pub groups: [u32; 3],
    pub tg: [u32; 3],
    pub grid_threads: [u32; 3],
    pub shuffled: u32,
    pub checked: u32,
    pub seed: u64,
    pub tg_budget: u64,
    pub timeout_ms: u64,
    pub buffers: [BufferBinding; MAX_BUFFERS],
    pub tg_lens: [u64; MAX_BUFFERS],
    pub fault: i32,
    pub _pad: u32,
    pub pc: [u64; 2],
    pub message: [c_char; 1024],
}

#[repr(C)]
pub struct KernelEntry {
    pub name: *const c_char,
    pub func: Option<unsafe extern "C" fn()>,
}

pub type DispatchFn = unsafe extern "C" fn(*mut DispatchArgs) -> c_int;

pub const RTLD_NOW: c_int = 2;

extern "C" {
    pub fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    pub fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    pub fn dlerror() -> *mut c_char;
}
