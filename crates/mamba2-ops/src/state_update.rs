//! Selective state update: one decode step of the Mamba-2 SSM, in place on the f32 state.
//!
//!   dt    = clamp(softplus(dt + dt_bias), dt_limit)                 // (batch, nheads)
//!   state = exp(dt A) state + dt x Bᵀ                               // (batch, nheads, headdim, d_state)
//!   y     = state C + D x, then y * silu(z)                         // (batch, nheads, headdim)

use crate::check::{self, groups_to_heads};
use crate::ssd::{finish_output, process_dt, validate_params, SsdParams};
use crate::{Backend, OpError, Result};
use candle_core::{DType, Tensor};

const OP: &str = "selective_state_update";

/// Arguments of [`selective_state_update`].
#[derive(Debug, Clone, Copy)]
pub struct StateUpdateArgs<'a> {
    /// `(batch, nheads, headdim, d_state)` f32, contiguous: updated in place.
    pub state: &'a Tensor,
    /// `(batch, nheads, headdim)`.
    pub x: &'a Tensor,
    /// `(batch, nheads)`: raw time step.
    pub dt: &'a Tensor,
    /// `(nheads)` f32: `A = -exp(A_log)`.
    pub a: &'a Tensor,
    /// `(batch, ngroups, d_state)`.
    pub b: &'a Tensor,
    /// `(batch, ngroups, d_state)`.
    pub c: &'a Tensor,
    /// `(nheads)`.
    pub d: Option<&'a Tensor>,
    /// `(batch, nheads, headdim)`.
    pub z: Option<&'a Tensor>,
    /// `(nheads)`.
    pub dt_bias: Option<&'a Tensor>,
}

fn validate(args: &StateUpdateArgs, params: &SsdParams) -> Result<()> {
    let [batch, nheads, headdim] = check::dims::<3>(OP, "x", args.x)?;
    check::float(OP, "x", args.x)?;
    let [_, _, _, d_state] = check::dims::<4>(OP, "state", args.state)?;
    check::shape(OP, "state", args.state, &[batch, nheads, headdim, d_state])?;
    check::f32(OP, "state", args.state)?;
    check::same_device(OP, "state", args.x, args.state)?;
    if !args.state.is_contiguous() {
        return Err(OpError::Param {
            op: OP,
            param: "state",
            message: "must be contiguous (it is updated in place)".into(),
        });
    }
    check::shape(OP, "dt", args.dt, &[batch, nheads])?;
    check::float(OP, "dt", args.dt)?;
    check::same_device(OP, "dt", args.x, args.dt)?;
    check::shape(OP, "a", args.a, &[nheads])?;
    check::f32(OP, "a", args.a)?;
    check::same_device(OP, "a", args.x, args.a)?;
    let [_, ngroups, _] = check::dims::<3>(OP, "b", args.b)?;
    if ngroups == 0 || nheads % ngroups != 0 {
        return Err(OpError::Shape {
            op: OP,
            arg: "b",
            got: args.b.dims().to_vec(),
            expected: format!("ngroups dividing nheads = {nheads}"),
        });
    }
    for (name, t) in [("b", args.b), ("c", args.c)] {
        check::shape(OP, name, t, &[batch, ngroups, d_state])?;
        check::float(OP, name, t)?;
        check::same_device(OP, name, args.x, t)?;
    }
    check::opt(OP, "d", args.x, args.d, &[nheads])?;
    check::opt(OP, "z", args.x, args.z, &[batch, nheads, headdim])?;
    check::opt(OP, "dt_bias", args.x, args.dt_bias, &[nheads])?;
    validate_params(OP, params)
}

/// One decode step of the SSM. Updates `args.state` in place and returns `y`,
/// `(batch, nheads, headdim)` in the dtype of `x`. `params.chunk_size` is ignored.
pub fn selective_state_update(args: &StateUpdateArgs, params: &SsdParams) -> Result<Tensor> {
    selective_state_update_with(args, params, Backend::Auto)
}

/// [`selective_state_update`] with an explicit backend choice.
pub fn selective_state_update_with(
    args: &StateUpdateArgs,
    params: &SsdParams,
    backend: Backend,
) -> Result<Tensor> {
    validate(args, params)?;
    crate::dispatch!(
        backend,
        args.x.device(),
        selective_state_update(args, params),
        selective_state_update_slow(args, params)
    )
}

/// Plain-tensor reference of [`selective_state_update`].
pub fn selective_state_update_slow(args: &StateUpdateArgs, params: &SsdParams) -> Result<Tensor> {
    validate(args, params)?;
    let nheads = args.x.dim(1)?;
    let x = args.x.to_dtype(DType::F32)?; // (batch, nheads, headdim)
    let dt = process_dt(args.dt, args.dt_bias, params)?; // (batch, nheads)
    let decay = dt.broadcast_mul(&args.a.unsqueeze(0)?)?.exp()?; // (batch, nheads)
    let b = groups_to_heads(&args.b.to_dtype(DType::F32)?, 1, nheads)?; // (batch, nheads, d_state)
    let c = groups_to_heads(&args.c.to_dtype(DType::F32)?, 1, nheads)?; // (batch, nheads, d_state)
    let xdt = x.broadcast_mul(&dt.unsqueeze(2)?)?; // (batch, nheads, headdim)
    let input = xdt.unsqueeze(3)?.broadcast_mul(&b.unsqueeze(2)?)?; // (batch, nheads, headdim, d_state)
    let state = args
        .state
        .broadcast_mul(&decay.unsqueeze(2)?.unsqueeze(3)?)?
        .add(&input)?; // (batch, nheads, headdim, d_state)
    let y = state.matmul(&c.unsqueeze(3)?)?.squeeze(3)?; // (batch, nheads, headdim)
    let y = finish_output(y, &x, args.d, args.z)?;
    args.state.slice_set(&state.contiguous()?, 0, 0)?;
    Ok(y.to_dtype(args.x.dtype())?)
}
