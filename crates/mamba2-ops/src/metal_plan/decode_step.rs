//! Plan of the fused decode step of one Mamba-2 layer (`kernels/metal/decode_step.metal`):
//! conv update + SiLU + selective state update + D skip (+ gate) in one dispatch.
//!
//! The conv state is read from one buffer and written to another (threads of one dispatch read
//! channels other threads roll), so the caller ping-pongs two conv-state buffers across steps.

use super::{dtype_suffix, f32_param, output, require, rows_arg, some, u32_of};
use super::{DispatchPlan, PlanExecutor};
use crate::metal_params::{self as mp, layout};
use crate::{Result, SsdParams};
use candle_core::Tensor;

const DECODE_STEP: &str = "decode_step.metal";

/// Tensors of one fused decode step. Shapes as in `decode_step.metal`'s header.
#[derive(Debug, Clone, Copy)]
pub struct FusedStepArgs<'a> {
    /// `(batch, conv_dim)`: pre-conv `[x | B | C]` of this token.
    pub xbc: &'a Tensor,
    /// `(batch, conv_dim, d_conv)` f32: conv state before the step (read only).
    pub conv_state_in: &'a Tensor,
    /// `(batch, conv_dim, d_conv)` f32, contiguous: receives the conv state after the step.
    /// Must be another tensor than `conv_state_in`.
    pub conv_state_out: &'a Tensor,
    /// `(conv_dim, d_conv)`.
    pub conv_weight: &'a Tensor,
    /// `(conv_dim)`.
    pub conv_bias: Option<&'a Tensor>,
    /// `(batch, nheads)` raw time step.
    pub dt: &'a Tensor,
    /// `(nheads)` f32.
    pub a: &'a Tensor,
    /// `(nheads)`.
    pub d: Option<&'a Tensor>,
    /// `(batch, nheads * headdim)`.
    pub z: Option<&'a Tensor>,
    /// `(nheads)`.
    pub dt_bias: Option<&'a Tensor>,
    /// `(batch, nheads, headdim, d_state)` f32, contiguous: updated in place.
    pub state: &'a Tensor,
}

/// `mamba2_decode_step_<dtype>`; returns `y` `(batch, nheads * headdim)` in the dtype of `xbc`,
/// or `None` outside the kernel's preconditions.
pub fn mamba2_decode_step(
    ex: &dyn PlanExecutor,
    args: &FusedStepArgs,
    params: &SsdParams,
) -> Result<Option<Tensor>> {
    let dtype = args.xbc.dtype();
    let suffix = some!(dtype_suffix(dtype));
    let (batch, conv_dim) = args.xbc.dims2()?;
    let (sb, nheads, headdim, d_state) = args.state.dims4()?;
    let d_conv = args.conv_weight.dim(1)?;
    let d_inner = nheads * headdim;
    require!(sb == batch && conv_dim > d_inner && (conv_dim - d_inner) % (2 * d_state) == 0);
    let ngroups = (conv_dim - d_inner) / (2 * d_state);
    require!(ngroups > 0 && nheads % ngroups == 0);
    require!(mp::supports::decode_step(d_state, d_conv));
    require!(args.conv_state_in.dims() == [batch, conv_dim, d_conv]);
    require!(args.conv_state_out.dims() == [batch, conv_dim, d_conv]);
    require!(args.conv_state_out.is_contiguous() && args.state.is_contiguous());
    require!(args.dt.dims() == [batch, nheads] && args.dt.dtype() == dtype);
    if let Some(z) = args.z {
        require!(z.dims() == [batch, d_inner] && z.dtype() == dtype);
    }
    let (dt_clamp, dt_min, dt_max) = mp::dt_clamp(params.dt_limit);
    // views of the in-projection row, read in place through their row strides
    let (xbc, xbc_stride) = some!(rows_arg(args.xbc)?);
    let (dt, dt_stride) = some!(rows_arg(args.dt)?);
    let z = args.z.map(rows_arg).transpose()?;
    let z_stride = match &z {
        Some(z) => some!(z.as_ref()).1,
        None => d_inner as u32,
    };
    let p = mp::DecodeStepParams {
        batch: some!(u32_of(batch)),
        nheads: some!(u32_of(nheads)),
        headdim: some!(u32_of(headdim)),
        ngroups: ngroups as u32,
        d_state: d_state as u32,
        d_conv: d_conv as u32,
        conv_dim: some!(u32_of(conv_dim)),
        has_conv_bias: args.conv_bias.is_some() as u32,
        has_d: args.d.is_some() as u32,
        has_z: args.z.is_some() as u32,
        has_dt_bias: args.dt_bias.is_some() as u32,
        dt_softplus: params.dt_softplus as u32,
        dt_clamp,
        dt_min,
        dt_max,
        xbc_stride,
        dt_stride,
        z_stride,
    };
    let name = format!("mamba2_decode_step_{suffix}");
    let rows = layout::SSU_ROWS as usize;
    require!(some!(ex.pipeline(DECODE_STEP, &name)?) >= 32 * rows);
    let conv_in = args.conv_state_in.contiguous()?;
    let w = f32_param(args.conv_weight)?;
    let cb = args.conv_bias.map(f32_param).transpose()?;
    let a = f32_param(args.a)?;
    let d = args.d.map(f32_param).transpose()?;
    let dt_bias = args.dt_bias.map(f32_param).transpose()?;
    let y = output(ex, (batch, d_inner), dtype, "decode_step_y")?; // (batch, d_inner)
    let plan = DispatchPlan::new(DECODE_STEP, name)
        .push(xbc)
        .read(&conv_in)?
        .write(args.conv_state_out)?
        .read(&w)?
        .read_opt(cb.as_ref(), &w)?
        .push(dt)
        .read(&a)?
        .read_opt(d.as_ref(), &a)?;
    let plan = match z.flatten() {
        Some((zb, _)) => plan.push(zb),
        None => plan.read(&a)?,
    };
    let plan = plan
        .read_opt(dt_bias.as_ref(), &a)?
        .write(args.state)?
        .write(&y)?
        .params(&p)
        .grid([headdim.div_ceil(rows), nheads, batch], [32 * rows, 1, 1]);
    ex.run(plan)?;
    Ok(Some(y))
}

/// The mixer's decode step ([`crate::mixer_decode_step`]) in two launches: the fused step
/// (conv update + SiLU + state update + D skip) from `conv_state` into `conv_state_next`, then
/// the grouped gated RMSNorm. Needs `conv_state_next` (the kernel cannot roll the conv state in
/// place); without it, or outside the kernels' preconditions, `None` and the composed
/// reference runs.
pub fn mixer_decode_step(
    ex: &dyn PlanExecutor,
    args: &crate::DecodeStepArgs,
    params: &SsdParams,
) -> Result<Option<Tensor>> {
    let next = some!(args.conv_state_next);
    let (batch, d_inner) = args.z.dims2()?;
    require!(d_inner.is_multiple_of(args.ngroups));
    let step = FusedStepArgs {
        xbc: args.xbc,
        conv_state_in: args.conv_state,
        conv_state_out: next,
        conv_weight: args.conv_weight,
        conv_bias: args.conv_bias,
        dt: args.dt,
        a: args.a,
        d: args.d,
        z: None,
        dt_bias: args.dt_bias,
        state: args.ssm_state,
    };
    // the gated-norm kernel's preconditions are dtypes only, checked before the state moves
    require!(args.z.dtype() == args.xbc.dtype() && dtype_suffix(args.z.dtype()).is_some());
    let y = some!(mamba2_decode_step(ex, &step, params)?); // (batch, d_inner)
    let norm = crate::GatedRmsNormArgs {
        x: &y,
        z: Some(args.z),
        weight: args.norm_weight,
        eps: args.eps,
        group_size: d_inner / args.ngroups,
        norm_before_gate: args.norm_before_gate,
    };
    let out = match super::gated_rms_norm(ex, &norm)? {
        Some(out) => out,
        None => crate::gated_rms_norm_slow(&norm)?,
    }; // (batch, d_inner)
    debug_assert_eq!(out.dims(), [batch, d_inner]);
    Ok(Some(out))
}

/// The mixer's decode step through its out-projection ([`crate::mixer_decode_step_out`]) in
/// two launches: the fused step into `conv_state_next`, then the out-projection with the
/// gated norm folded in front (`linear_matvec_gated_norm_<dtype>`; the separate norm and
/// projection when its preconditions fail). Without `conv_state_next` or outside the fused
/// kernel's preconditions, `None` (nothing has run).
pub fn mixer_decode_step_out(
    ex: &dyn PlanExecutor,
    args: &crate::DecodeStepArgs,
    params: &SsdParams,
    out_proj: &Tensor,
    out_bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let next = some!(args.conv_state_next);
    let (_, d_inner) = args.z.dims2()?;
    require!(d_inner.is_multiple_of(args.ngroups));
    require!(args.z.dtype() == args.xbc.dtype() && dtype_suffix(args.z.dtype()).is_some());
    let step = FusedStepArgs {
        xbc: args.xbc,
        conv_state_in: args.conv_state,
        conv_state_out: next,
        conv_weight: args.conv_weight,
        conv_bias: args.conv_bias,
        dt: args.dt,
        a: args.a,
        d: args.d,
        z: None,
        dt_bias: args.dt_bias,
        state: args.ssm_state,
    };
    let y = some!(mamba2_decode_step(ex, &step, params)?); // (batch, d_inner)
    let norm = crate::GatedRmsNormArgs {
        x: &y,
        z: Some(args.z),
        weight: args.norm_weight,
        eps: args.eps,
        group_size: d_inner / args.ngroups,
        norm_before_gate: args.norm_before_gate,
    };
    // the state has moved: from here on an answer is always given
    if let Some(out) = super::linear_gated_norm(ex, &norm, out_proj, out_bias)? {
        return Ok(Some(out)); // (batch, d_model)
    }
    let normed = match super::gated_rms_norm(ex, &norm)? {
        Some(t) => t,
        None => crate::gated_rms_norm_slow(&norm)?,
    };
    match super::linear(ex, &normed, out_proj, out_bias)? {
        Some(t) => Ok(Some(t)),
        None => Ok(Some(crate::linear_slow(&normed, out_proj, out_bias)?)),
    }
}
