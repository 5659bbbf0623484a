//! Dispatch plans of the Metal kernels in `kernels/metal/`, compiled on every platform.
//!
//! A [`DispatchPlan`] describes one kernel launch without touching a GPU: the pipeline (library
//! file and function name), each buffer with its byte offset and access, the parameter bytes,
//! the grid and threadgroup size and the threadgroup memory. The op functions of this module
//! (`causal_conv1d`, `ssd_chunk_scan`, `linear` (matrix-vector for decode rows),
//! `mixer_decode_step_out` (the fused step and the out-projection with the gated norm folded
//! in), `embedding`, ...) check the fast path's preconditions, prepare the tensors, build the
//! plans and hand them to a [`PlanExecutor`]:
//! - on macOS, the `metal` module's executor encodes each plan on Candle's command encoder of
//!   the tensors' `MetalDevice`;
//! - everywhere, the MSL harness tests (`crates/msl-harness`) execute the same plans on the CPU
//!   from the same `.metal` sources, so every line that decides buffer order, offsets,
//!   parameter blocks and grids runs in CI.
//!
//! [`emulate_on_cpu`] routes the ops' dispatchers on the CPU device to an executor (the
//! whole-model emulation of `tests/metal_emulated.rs`); it is test plumbing, not a supported
//! API.
//!
//! Binding convention of every kernel: buffers at indices `0..buffers.len()` in plan order, the
//! parameter block (`setBytes`) at the next index.

mod attention;
mod decode_step;
mod mamba;
mod pointwise;

pub use attention::{causal_attention, causal_attention_as};
pub use decode_step::{
    mamba2_decode_step, mixer_decode_step, mixer_decode_step_out, FusedStepArgs,
};
pub use mamba::{
    causal_conv1d, causal_conv1d_update, conv_states_varlen, gated_rms_norm, linear,
    linear_gated_norm, linear_matvec, rms_norm_residual, selective_state_update, ssd_chunk_scan,
};
pub use pointwise::{embedding, relu_squared, rotary_embedding, swiglu};

use crate::metal_params::KernelParams;
use crate::Result;
use candle_core::{DType, Shape, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// How a kernel uses a buffer. Written buffers (outputs, in-place states) tell Metal's hazard
/// tracking to order later readers after the dispatch; the harness rejects writes to read ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only (`set_input_buffer`; the harness binds it read-only).
    Read,
    /// Written, possibly also read (`set_output_buffer`).
    Write,
}

/// One bound buffer: the tensor whose storage is bound, the byte offset of the kernel's first
/// element in that storage, and the access.
#[derive(Debug, Clone)]
pub struct PlanBuffer {
    /// The tensor whose storage is bound (the whole storage, as Metal binds a buffer).
    pub tensor: Tensor,
    /// Byte offset of the kernel's first element in the storage.
    pub offset: usize,
    /// Read or written.
    pub access: Access,
}

/// One kernel launch (`dispatchThreadgroups`).
#[derive(Debug, Clone)]
pub struct DispatchPlan {
    /// `.metal` file of `kernels/metal/` holding the function, e.g. `"conv1d.metal"`.
    pub library: &'static str,
    /// Function name, `<op>_<variant>_<dtype>`.
    pub function: String,
    /// Buffers bound at indices `0..buffers.len()`.
    pub buffers: Vec<PlanBuffer>,
    /// The parameter block, bound with `setBytes` at index `buffers.len()`.
    pub params: Vec<u8>,
    /// Threadgroups per grid.
    pub groups: [usize; 3],
    /// Threads per threadgroup.
    pub threads: [usize; 3],
    /// Length in bytes of each dynamic `[[threadgroup(i)]]` allocation (none so far: the
    /// kernels declare their threadgroup memory statically).
    pub threadgroup_memory: Vec<usize>,
}

impl DispatchPlan {
    fn new(library: &'static str, function: String) -> DispatchPlan {
        DispatchPlan {
            library,
            function,
            buffers: Vec::new(),
            params: Vec::new(),
            groups: [1; 3],
            threads: [1; 3],
            threadgroup_memory: Vec::new(),
        }
    }

    /// Binds `t` (contiguous) read-only at the next index.
    fn read(mut self, t: &Tensor) -> Result<Self> {
        self.buffers.push(contiguous_arg(t, Access::Read)?);
        Ok(self)
    }

    /// Binds `t` (contiguous) as written at the next index.
    fn write(mut self, t: &Tensor) -> Result<Self> {
        self.buffers.push(contiguous_arg(t, Access::Write)?);
        Ok(self)
    }

    /// Binds an optional read-only argument; an absent one is bound to `fallback` (never read:
    /// a flag in the parameter block says so; Metal still wants a buffer bound).
    fn read_opt(self, t: Option<&Tensor>, fallback: &Tensor) -> Result<Self> {
        self.read(t.unwrap_or(fallback))
    }

    fn push(mut self, b: PlanBuffer) -> Self {
        self.buffers.push(b);
        self
    }

    fn params<P: KernelParams>(mut self, p: &P) -> Self {
        self.params = p.as_bytes().to_vec();
        self
    }

    fn grid(mut self, groups: [usize; 3], threads: [usize; 3]) -> Self {
        self.groups = groups;
        self.threads = threads;
        self
    }

    /// Index of the parameter block.
    pub fn params_index(&self) -> usize {
        self.buffers.len()
    }
}

/// What runs the plans: Candle's Metal command encoder on macOS, the MSL harness in tests.
pub trait PlanExecutor {
    /// Most threads per threadgroup of `function`'s pipeline (rounded down to whole
    /// simdgroups), or `None` when the library has no such function (e.g. the bf16 variants on
    /// a compiler older than MSL 3.1): the op then falls back to its reference.
    fn pipeline(&self, library: &'static str, function: &str) -> Result<Option<usize>>;
    /// A fresh contiguous tensor on the executor's device; its contents are unspecified (the
    /// kernels write all of it; the harness executor poisons it with NaN).
    fn output(&self, shape: &Shape, dtype: DType, label: &str) -> Result<Tensor>;
    /// Runs (or encodes) one launch, ordered after the previous ones.
    fn run(&self, plan: DispatchPlan) -> Result<()>;
}

/// The executor of [`emulate_on_cpu`]; `ACTIVE` spares the CPU dispatch a lock when unset.
static EMULATED: RwLock<Option<Arc<dyn PlanExecutor + Send + Sync>>> = RwLock::new(None);
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Held by the guard of the emulation in progress: one at a time per process.
static SESSION: Mutex<()> = Mutex::new(());

/// Ends the emulation of [`emulate_on_cpu`] when dropped.
#[doc(hidden)]
#[must_use = "emulation ends when the guard is dropped"]
pub struct EmulationGuard {
    _session: MutexGuard<'static, ()>,
}

impl Drop for EmulationGuard {
    fn drop(&mut self) {
        ACTIVE.store(false, Ordering::SeqCst);
        *EMULATED.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Test plumbing: until the guard drops, the ops' dispatchers on the CPU device run the Metal
/// plans through `executor` instead of the CPU fast paths (ops whose Metal preconditions fail
/// run their references, as on Metal). Process-wide, because the model runs decode steps on
/// Rayon workers; a second call waits until the first guard drops, so tests of one binary that
/// emulate take turns.
#[doc(hidden)]
pub fn emulate_on_cpu(executor: Arc<dyn PlanExecutor + Send + Sync>) -> EmulationGuard {
    let session = SESSION.lock().unwrap_or_else(|p| p.into_inner());
    *EMULATED.write().unwrap_or_else(|p| p.into_inner()) = Some(executor);
    ACTIVE.store(true, Ordering::SeqCst);
    EmulationGuard { _session: session }
}

/// The executor installed by [`emulate_on_cpu`], if any.
#[doc(hidden)]
pub fn emulated() -> Option<Arc<dyn PlanExecutor + Send + Sync>> {
    if !ACTIVE.load(Ordering::Relaxed) {
        return None;
    }
    EMULATED.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Returns `Ok(None)` from the enclosing fast path when the condition does not hold.
macro_rules! require {
    ($cond:expr) => {
        if !$cond {
            return Ok(None);
        }
    };
}

/// Unwraps an `Option`, or returns `Ok(None)` from the enclosing fast path.
macro_rules! some {
    ($opt:expr) => {
        match $opt {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}
use {require, some};

/// `t` bound from its first element; it must be contiguous (callers make it so, or check it
/// for in-place tensors).
fn contiguous_arg(t: &Tensor, access: Access) -> Result<PlanBuffer> {
    if !t.is_contiguous() {
        return Err(candle_core::Error::msg("metal kernel argument must be contiguous").into());
    }
    Ok(PlanBuffer {
        tensor: t.clone(),
        offset: t.layout().start_offset() * t.dtype().size_in_bytes(),
        access,
    })
}

/// A tensor read in place through its strides (e.g. a view narrowed out of a KV cache): the
/// buffer and the strides in elements, or `None` when the last dimension is not unit-stride
/// (the kernels read channels contiguously).
fn strided_arg(t: &Tensor) -> Option<(PlanBuffer, Vec<usize>)> {
    let stride = t.stride().to_vec();
    if stride.last().is_some_and(|&s| s != 1) {
        return None;
    }
    let b = PlanBuffer {
        tensor: t.clone(),
        offset: t.layout().start_offset() * t.dtype().size_in_bytes(),
        access: Access::Read,
    };
    Some((b, stride))
}

/// A `(rows, n)` tensor read in place with its row stride (e.g. a view of the in-projection
/// output), or a contiguous copy when its channels are not unit-stride: the buffer and the
/// row stride in elements; `None` when the stride exceeds u32.
fn rows_arg(t: &Tensor) -> Result<Option<(PlanBuffer, u32)>> {
    let (_, n) = t.dims2()?;
    if let Some((b, stride)) = strided_arg(t) {
        return Ok(u32_of(stride[0]).map(|s| (b, s)));
    }
    let c = t.contiguous()?;
    Ok(u32_of(n).map(|s| (contiguous_arg(&c, Access::Read).expect("contiguous"), s)))
}

/// A fresh output of the executor.
fn output(
    ex: &dyn PlanExecutor,
    shape: impl Into<Shape>,
    dtype: DType,
    label: &str,
) -> Result<Tensor> {
    ex.output(&shape.into(), dtype, label)
}

/// `<op>_<variant>_<dtype>` suffix of an activation dtype, `None` for dtypes without kernels.
pub fn dtype_suffix(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("f32"),
        DType::F16 => Some("f16"),
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}

/// A small per-channel parameter as the kernels read it: f32, contiguous (a no-op when it
/// already is; the model keeps these in f32 from load on).
fn f32_param(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?)
}

/// Checked `usize -> u32` for kernel parameters; `None` (fall back) on overflow.
fn u32_of(v: usize) -> Option<u32> {
    u32::try_from(v).ok()
}

fn flag(b: bool) -> u32 {
    b as u32
}
