//! CPU fast paths of the ops. Each function returns `Ok(None)` when its preconditions do not
//! hold, and the dispatcher then falls back to the reference.
//!
//! Preconditions shared by all ops: CPU float storage (f32/f16/bf16, dtypes may differ between
//! arguments), rank <= 4 per view (the norms flatten higher ranks). Inputs are read through their
//! strides when the last dimension is unit-stride, so narrowed/transposed views need no copy.
//! `selective_state_update` additionally needs headdim and d_state <= 256, and the in-place ops
//! fall back when an input shares storage with the state they update.
//! `seq_idx` is supported by the conv and the SSD scan (state restarts at a change of id).
//! `linear` needs a contiguous (row-major) weight; a transposed or strided weight view takes the
//! reference (Candle's matmul).
//! `causal_attention` needs K and V with a unit-stride head_dim (narrowed KV-cache views are read
//! in place, never copied); `rotary_embedding`, `swiglu` and `relu_squared` take any view.

mod activation;
mod attention;
mod common;
mod conv1d;
mod linear;
#[cfg(target_arch = "aarch64")]
mod neon;
pub(crate) mod quantized;
mod quantized_gemm;
mod rms_norm;
mod ssd;
mod state_update;

use crate::options::CpuTier;
use crate::{
    AttentionArgs, Conv1dArgs, GatedRmsNormArgs, Result, RotaryArgs, SsdArgs, SsdParams,
    StateUpdateArgs,
};
use candle_core::Tensor;
use std::cell::Cell;

/// Names of the ops, in the order of the fast-path counters.
const OPS: [&str; 14] = [
    "causal_conv1d",
    "causal_conv1d_update",
    "conv_states_varlen",
    "ssd_chunk_scan",
    "selective_state_update",
    "gated_rms_norm",
    "rms_norm_residual",
    "linear",
    "causal_attention",
    "rotary_embedding",
    "swiglu",
    "relu_squared",
    "quantized_linear",
    "quantized_embedding",
];

thread_local! {
    /// How often each op took its CPU fast path on this thread. Thread-local so that tests
    /// running in parallel do not see each other's calls.
    static FAST_PATH_HITS: [Cell<usize>; OPS.len()] =
        const { [const { Cell::new(0) }; OPS.len()] };
}

thread_local! {
    /// The instruction-set tier of the last fast-path call of each op on this thread, for ops
    /// with tier-specific kernels.
    static LAST_TIER: [Cell<Option<CpuTier>>; OPS.len()] =
        const { [const { Cell::new(None) }; OPS.len()] };
}

/// Records that `op`'s fast path just ran the kernels of `tier` on this thread.
pub(crate) fn record_tier(op: &str, tier: CpuTier) {
    if let Some(i) = OPS.iter().position(|&o| o == op) {
        LAST_TIER.with(|t| t[i].set(Some(tier)));
    }
}

/// The instruction-set tier whose kernels the last CPU fast-path call of `op` on this thread
/// ran (`None` before any, and for ops without tier-specific kernels). For the dispatch tests
/// only: they check that a forced tier, or NEON on aarch64, really served.
#[doc(hidden)]
pub fn fast_path_tier(op: &str) -> Option<CpuTier> {
    OPS.iter()
        .position(|&o| o == op)
        .and_then(|i| LAST_TIER.with(|t| t[i].get()))
}

fn count<T>(op: usize, r: Result<Option<T>>) -> Result<Option<T>> {
    if let Ok(Some(_)) = &r {
        FAST_PATH_HITS.with(|h| h[op].set(h[op].get() + 1));
    }
    r
}

/// Counts a CPU fast-path call of `op` served outside this module (Candle's quantized kernels).
pub(crate) fn record_fast_path(op: &str) {
    if let Some(i) = OPS.iter().position(|&o| o == op) {
        FAST_PATH_HITS.with(|h| h[i].set(h[i].get() + 1));
    }
}

/// Number of calls on this thread that the CPU fast path of `op` (the public function's name)
/// served. For the dispatch tests only.
#[doc(hidden)]
pub fn fast_path_count(op: &str) -> usize {
    OPS.iter()
        .position(|&o| o == op)
        .map_or(0, |i| FAST_PATH_HITS.with(|h| h[i].get()))
}

pub(crate) fn causal_conv1d(args: &Conv1dArgs) -> Result<Option<(Tensor, Tensor)>> {
    count(0, conv1d::causal_conv1d(args))
}

pub(crate) fn causal_conv1d_update(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<Option<Tensor>> {
    count(
        1,
        conv1d::causal_conv1d_update(x, conv_state, weight, bias, silu),
    )
}

pub(crate) fn conv_states_varlen(
    x: &Tensor,
    cu_seqlens: &[usize],
    d_conv: usize,
) -> Result<Option<Tensor>> {
    count(2, conv1d::conv_states_varlen(x, cu_seqlens, d_conv))
}

pub(crate) fn ssd_chunk_scan(
    args: &SsdArgs,
    params: &SsdParams,
) -> Result<Option<(Tensor, Tensor)>> {
    count(3, ssd::ssd_chunk_scan(args, params))
}

pub(crate) fn selective_state_update(
    args: &StateUpdateArgs,
    params: &SsdParams,
) -> Result<Option<Tensor>> {
    count(4, state_update::selective_state_update(args, params))
}

pub(crate) fn gated_rms_norm(args: &GatedRmsNormArgs) -> Result<Option<Tensor>> {
    count(5, rms_norm::gated_rms_norm(args))
}

pub(crate) fn rms_norm_residual(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    residual_in_fp32: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    count(
        6,
        rms_norm::rms_norm_residual(x, residual, weight, eps, residual_in_fp32),
    )
}

/// Any row count; falls back for a non-contiguous weight (see `cpu/linear.rs`).
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    count(7, linear::linear(x, weight, bias))
}

/// K and V read in place; falls back when their head_dim is strided (see `cpu/attention.rs`).
pub(crate) fn causal_attention(args: &AttentionArgs) -> Result<Option<Tensor>> {
    count(8, attention::causal_attention(args))
}

pub(crate) fn rotary_embedding(args: &RotaryArgs) -> Result<Option<Tensor>> {
    count(9, activation::rotary_embedding(args))
}

pub(crate) fn swiglu(x: &Tensor) -> Result<Option<Tensor>> {
    count(10, activation::swiglu(x))
}

pub(crate) fn relu_squared(x: &Tensor) -> Result<Option<Tensor>> {
    count(11, activation::relu_squared(x))
}
