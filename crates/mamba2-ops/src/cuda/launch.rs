//! Plumbing shared by the CUDA fast paths: device pointers of Candle tensors, stride checks,
//! module loading (PTX built by `mamba2-kernels`, cached per device by Candle) and kernel
//! launches on the device's stream. Nothing here synchronises with the host.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaStream, DevicePtr, LaunchArgs, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::{DType, Device, Shape, Storage, Tensor};
use std::sync::Arc;

/// PTX of `kernels/cuda/*.cu`, one `&str` per file (`CONV1D`, `SSD`, ...), built by the
/// `mamba2-kernels` crate.
pub(crate) use mamba2_kernels::ptx;

pub(crate) type Result<T> = candle_core::Result<T>;

/// The CUDA device of `t`, `None` for other devices.
pub(crate) fn device(t: &Tensor) -> Option<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Some(d.clone()),
        _ => None,
    }
}

/// Dtype code understood by `load_any`/`store_any` in `common.cuh`.
pub(crate) fn code(dt: DType) -> i32 {
    match dt {
        DType::F16 => 1,
        DType::BF16 => 2,
        _ => 0,
    }
}

/// Kernel name suffix of an activation dtype; `None` for dtypes the kernels do not take.
pub(crate) fn suffix(dt: DType) -> Option<&'static str> {
    match dt {
        DType::F32 => Some("f32"),
        DType::F16 => Some("f16"),
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}

/// Device address of the first element of `t` (its layout's start offset applied). The tensor
/// must outlive the launch that uses the address; Candle frees stream-ordered, so a launch
/// already queued is safe even if the tensor is dropped right after.
pub(crate) fn ptr(t: &Tensor, dev: &CudaDevice) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        candle_core::bail!("mamba2-ops cuda: tensor is not on a CUDA device")
    };
    let stream = dev.cuda_stream();
    let off = layout.start_offset() as u64;
    let (base, size) = match &cs.slice {
        CudaStorageSlice::F32(s) => (s.device_ptr(&stream).0, 4),
        CudaStorageSlice::F16(s) => (s.device_ptr(&stream).0, 2),
        CudaStorageSlice::BF16(s) => (s.device_ptr(&stream).0, 2),
        CudaStorageSlice::U32(s) => (s.device_ptr(&stream).0, 4),
        CudaStorageSlice::I64(s) => (s.device_ptr(&stream).0, 8),
        CudaStorageSlice::U8(s) => (s.device_ptr(&stream).0, 1),
        _ => candle_core::bail!("mamba2-ops cuda: unsupported dtype {:?}", cs.dtype()),
    };
    Ok(base + off * size)
}

/// [`ptr`] of an optional tensor, 0 (a null pointer for the kernel) when absent.
pub(crate) fn opt_ptr(t: Option<&Tensor>, dev: &CudaDevice) -> Result<u64> {
    t.map_or(Ok(0), |t| ptr(t, dev))
}

/// `t` itself when its last `inner` dimensions are contiguous (row-major, unit innermost
/// stride), a contiguous copy otherwise; with the element strides of its outer dimensions.
/// Views such as the x / B / C parts of a split projection stay copy-free.
pub(crate) fn rows(t: &Tensor, inner: usize) -> Result<(Tensor, Vec<usize>)> {
    let dims = t.dims();
    let rank = dims.len();
    let stride = t.layout().stride();
    let mut expect = 1usize;
    let mut ok = true;
    for i in (rank - inner..rank).rev() {
        if dims[i] != 1 && stride[i] != expect {
            ok = false;
        }
        expect *= dims[i];
    }
    let t = if ok { t.clone() } else { t.contiguous()? };
    let s = t.layout().stride()[..rank - inner].to_vec();
    Ok((t, s))
}

/// A tensor seen as `(d0, d1, last)` with a contiguous last dimension, for the row kernels.
/// The split depends on the shape only, so tensors of one shape (x and its gate) agree: rank 3
/// keeps its two leading dimensions, rank 2 has `d0 = 1`, rank >= 4 is made contiguous.
/// Returns `(tensor, d1, s0, s1)` with the element strides of `d0` and `d1`.
pub(crate) fn rows2(t: &Tensor) -> Result<(Tensor, usize, usize, usize)> {
    match t.rank() {
        0 | 1 => Ok((t.contiguous()?, 1, 0, 0)),
        2 => {
            let (t, s) = rows(t, 1)?;
            let d1 = t.dim(0)?;
            Ok((t, d1, 0, s[0]))
        }
        3 => {
            let (t, s) = rows(t, 1)?;
            let d1 = t.dim(1)?;
            Ok((t, d1, s[0], s[1]))
        }
        _ => {
            let t = t.contiguous()?;
            let last = *t.dims().last().unwrap();
            let d1 = t.elem_count() / last.max(1);
            Ok((t, d1, 0, last))
        }
    }
}

/// A kernel and the stream of the device it runs on (Candle's one stream per device), launched
/// with programmatic dependent launch when `pdl` is set (see `pdl_wait` in `common.cuh`).
pub(crate) struct Kernel {
    stream: Arc<CudaStream>,
    func: CudaFunction,
    pdl: bool,
}

/// One kernel argument of a PDL launch (`cuLaunchKernelEx` takes pointers to the values).
pub(crate) enum KArg {
    U64(u64),
    I64(i64),
    I32(i32),
    F32(f32),
}

macro_rules! karg_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for KArg {
            fn from(x: $t) -> Self {
                KArg::$v(x)
            }
        }
    )*};
}
karg_from!(u64 => U64, i64 => I64, i32 => I32, f32 => F32);

impl KArg {
    fn as_mut_ptr(&mut self) -> *mut std::ffi::c_void {
        match self {
            KArg::U64(v) => v as *mut u64 as _,
            KArg::I64(v) => v as *mut i64 as _,
            KArg::I32(v) => v as *mut i32 as _,
            KArg::F32(v) => v as *mut f32 as _,
        }
    }
}

impl Kernel {
    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }

    pub(crate) fn pdl(&self) -> bool {
        self.pdl
    }

    /// Blocks of `threads` threads (no dynamic shared memory) that the whole GPU holds at once:
    /// the SM count times the occupancy that the kernel's registers and shared memory allow.
    pub(crate) fn resident_blocks(&self, dev: &CudaDevice, threads: u32) -> Result<usize> {
        let per_sm = self
            .func
            .occupancy_max_active_blocks_per_multiprocessor(threads, 0, None)
            .w()?;
        Ok(sm_count(dev)? * (per_sm.max(1) as usize))
    }

    /// Launches with the programmatic-stream-serialisation attribute: the kernel may start
    /// while the previous one on the stream finishes (captured into a graph as a programmatic
    /// edge). The kernel must call `pdl_wait` before touching its predecessor's data.
    ///
    /// # Safety
    /// `args` must match the kernel's signature; every address must belong to a live tensor of
    /// the size the kernel reads.
    pub(crate) unsafe fn launch_pdl(&self, c: LaunchConfig, args: &mut [KArg]) -> Result<()> {
        let mut ptrs: Vec<*mut std::ffi::c_void> = args.iter_mut().map(KArg::as_mut_ptr).collect();
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: c.grid_dim.0,
            gridDimY: c.grid_dim.1,
            gridDimZ: c.grid_dim.2,
            blockDimX: c.block_dim.0,
            blockDimY: c.block_dim.1,
            blockDimZ: c.block_dim.2,
            sharedMemBytes: c.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        self.stream.context().bind_to_thread().w()?;
        // SAFETY: see the function's contract; `ptrs` and `attr` outlive the call.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
            .w()
        }
    }
}

/// One attribute of the device (`cuDeviceGetAttribute`).
fn device_attribute(dev: &CudaDevice, attr: sys::CUdevice_attribute) -> Result<i32> {
    dev.cuda_stream().context().attribute(attr).w()
}

/// Whether the device can launch programmatic dependents (compute capability 9.0 and up).
pub(crate) fn pdl_capable(dev: &CudaDevice) -> Result<bool> {
    let major = device_attribute(
        dev,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
    )?;
    Ok(major >= 9)
}

/// Number of streaming multiprocessors of the device.
pub(crate) fn sm_count(dev: &CudaDevice) -> Result<usize> {
    let n = device_attribute(
        dev,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    )?;
    Ok(n.max(1) as usize)
}

/// The kernel `name` of the PTX module `module`, loaded (JIT-compiled by the driver) once per
/// device and cached by Candle, launched on the device's stream.
pub(crate) fn func(dev: &CudaDevice, module: &str, ptx: &str, name: &str) -> Result<Kernel> {
    func_on(dev, &dev.cuda_stream(), module, ptx, name, false)
}

/// [`func`] launched on `stream` instead of the device's own stream (the private stream that a
/// decode step is captured on), with programmatic dependent launch when `pdl` is set.
pub(crate) fn func_on(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    module: &str,
    ptx: &str,
    name: &str,
    pdl: bool,
) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, &format!("mamba2_ops_{module}"), ptx)?;
    Ok(Kernel {
        stream: stream.clone(),
        func: f.into_cuda_function(),
        pdl,
    })
}

/// Allows `bytes` of dynamic shared memory for `f` (needed above 48 KiB); fails when the device
/// allows less, so the caller can fall back.
pub(crate) fn allow_smem(dev: &CudaDevice, f: &Kernel, bytes: usize) -> Result<bool> {
    let max = device_attribute(
        dev,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
    )?;
    if bytes > max as usize {
        return Ok(false);
    }
    if bytes > 48 * 1024 {
        unsafe {
            candle_core::cuda_backend::cudarc::driver::result::function::set_function_attribute(
                f.func.cu_function(),
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .w()?;
        }
    }
    Ok(true)
}

/// Launch configuration; the grid is checked against CUDA's limits (x < 2^31, y and z < 2^16)
/// with 64-bit arithmetic, so no size is ever truncated.
pub(crate) fn cfg(grid: (u64, u64, u64), block: u32, smem: usize) -> Option<LaunchConfig> {
    if grid.0 == 0
        || grid.0 >= 1 << 31
        || grid.1 == 0
        || grid.1 > 65535
        || grid.2 == 0
        || grid.2 > 65535
    {
        return None;
    }
    Some(LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem as u32,
    })
}

/// Launches `$func` with `$cfg` and the listed arguments (each a `DeviceRepr` value: device
/// addresses as `u64`, sizes as `i64`, flags as `i32`, scalars as `f32`).
macro_rules! launch {
    ($func:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        $crate::cuda::launch::count_launch();
        let kernel = &$func;
        if kernel.pdl() {
            let mut args = [$($crate::cuda::launch::KArg::from($arg)),*];
            // SAFETY: as below.
            unsafe { kernel.launch_pdl($cfg, &mut args) }
        } else {
            let mut builder = kernel.builder();
            $(
                let arg = $arg;
                builder.arg(&arg);
            )*
            // SAFETY: the argument list matches the kernel's signature in kernels/cuda (checked
            // by the parity tests); every address belongs to a live tensor of the size the
            // kernel reads.
            unsafe { builder.launch($cfg) }.w().map(|_| ())
        }
    }};
}
pub(crate) use launch;

thread_local! {
    static LAUNCHES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub(crate) fn count_launch() {
    LAUNCHES.with(|c| c.set(c.get() + 1));
}

/// Kernels launched by this crate's CUDA fast paths from the calling thread so far (a
/// per-thread count, so concurrent callers do not disturb each other). For diagnostics: launches
/// per decode step, and tests checking that the fast path (not the fallback) ran.
pub fn launch_count() -> u64 {
    LAUNCHES.with(|c| c.get())
}

/// The CUDA switches in force on the calling thread (`crate::options`): the launch layouts
/// one binary compares on the GPU, and output poisoning for the tests.
pub(crate) fn cuda_options() -> crate::options::CudaOptions {
    crate::options::current_options().cuda
}

/// A fresh output tensor: uninitialised (every kernel writes all of its outputs), or NaN-filled
/// when the options say `poison` (tests: an element a kernel forgets to write shows up as NaN).
pub(crate) fn output<S: Into<Shape>>(shape: S, dtype: DType, dev: &CudaDevice) -> Result<Tensor> {
    let device = Device::Cuda(dev.clone());
    if cuda_options().poison {
        return Tensor::full(f32::NAN, shape, &device)?.to_dtype(dtype);
    }
    // SAFETY: every caller passes the tensor to a kernel that writes each element.
    unsafe { Tensor::empty(shape, dtype, &device) }
}
