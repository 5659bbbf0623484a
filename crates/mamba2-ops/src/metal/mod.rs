//! METAL fast paths of the ops. Each function returns `Ok(None)` when its
//! preconditions do not hold, and the dispatcher then falls back to the reference.
#![allow(unused_variables)]

use crate::{Conv1dArgs, GatedRmsNormArgs, Result, SsdArgs, SsdParams, StateUpdateArgs};
use candle_core::Tensor;

pub(crate) fn causal_conv1d(args: &Conv1dArgs) -> Result<Option<(Tensor, Tensor)>> {
    Ok(None)
}

pub(crate) fn causal_conv1d_update(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<Option<Tensor>> {
    Ok(None)
}

pub(crate) fn conv_states_varlen(
    x: &Tensor,
    cu_seqlens: &[usize],
    d_conv: usize,
) -> Result<Option<Tensor>> {
    Ok(None)
}

pub(crate) fn ssd_chunk_scan(
    args: &SsdArgs,
    params: &SsdParams,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(None)
}

pub(crate) fn selective_state_update(
    args: &StateUpdateArgs,
    params: &SsdParams,
) -> Result<Option<Tensor>> {
    Ok(None)
}

pub(crate) fn gated_rms_norm(args: &GatedRmsNormArgs) -> Result<Option<Tensor>> {
    Ok(None)
}

pub(crate) fn rms_norm_residual(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    residual_in_fp32: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(None)
}
