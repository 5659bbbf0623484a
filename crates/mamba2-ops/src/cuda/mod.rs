//! CUDA fast paths of the ops, kernels in `kernels/cuda/*.cu` (compiled to PTX by the
//! `mamba2-kernels` build script, launched on the Candle device's stream). Each function
//! returns `Ok(None)` when its preconditions do not hold, and the dispatcher then falls back to
//! the reference.

mod attention;
mod blas;
mod conv1d;
mod decode_step;
mod embedding;
pub(crate) mod graph;
pub(crate) mod launch;
mod linear;

pub use launch::launch_count;
mod pointwise;
mod rms_norm;
mod ssd;
mod state_update;

use crate::{
    AttentionArgs, Conv1dArgs, GatedRmsNormArgs, Result, RotaryArgs, SsdArgs, SsdParams,
    StateUpdateArgs,
};
use candle_core::Tensor;

pub(crate) fn causal_conv1d(args: &Conv1dArgs) -> Result<Option<(Tensor, Tensor)>> {
    Ok(conv1d::causal_conv1d(args)?)
}

pub(crate) fn causal_conv1d_update(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<Option<Tensor>> {
    Ok(conv1d::causal_conv1d_update(
        x, conv_state, weight, bias, silu,
    )?)
}

pub(crate) fn conv_states_varlen(
    x: &Tensor,
    cu_seqlens: &[usize],
    d_conv: usize,
) -> Result<Option<Tensor>> {
    Ok(conv1d::conv_states_varlen(x, cu_seqlens, d_conv)?)
}

pub(crate) fn ssd_chunk_scan(
    args: &SsdArgs,
    params: &SsdParams,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(ssd::ssd_chunk_scan(args, params)?)
}

pub(crate) fn selective_state_update(
    args: &StateUpdateArgs,
    params: &SsdParams,
) -> Result<Option<Tensor>> {
    Ok(state_update::selective_state_update(args, params)?)
}

pub(crate) fn mixer_decode_step(
    args: &crate::DecodeStepArgs,
    params: &SsdParams,
) -> Result<Option<Tensor>> {
    decode_step::mixer_decode_step(args, params)
}

pub(crate) fn gated_rms_norm(args: &GatedRmsNormArgs) -> Result<Option<Tensor>> {
    Ok(rms_norm::gated_rms_norm(args)?)
}

pub(crate) fn rms_norm_residual(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    residual_in_fp32: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(rms_norm::rms_norm_residual(
        x,
        residual,
        weight,
        eps,
        residual_in_fp32,
    )?)
}

pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    Ok(linear::linear(x, weight, bias)?)
}

pub(crate) fn causal_attention(args: &AttentionArgs) -> Result<Option<Tensor>> {
    Ok(attention::causal_attention(args)?)
}

pub(crate) fn rotary_embedding(args: &RotaryArgs) -> Result<Option<Tensor>> {
    Ok(pointwise::rotary_embedding(args)?)
}

pub(crate) fn swiglu(x: &Tensor) -> Result<Option<Tensor>> {
    Ok(pointwise::swiglu(x)?)
}

pub(crate) fn relu_squared(x: &Tensor) -> Result<Option<Tensor>> {
    Ok(pointwise::relu_squared(x)?)
}
