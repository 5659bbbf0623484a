//! CUDA selective state update, one decode step (`kernels/cuda/state_update.cu`).

use super::launch::{
    cfg, code, device, func, launch, opt_ptr, output, ptr, ptx, rows, suffix, Result,
};
use crate::{SsdParams, StateUpdateArgs};
use candle_core::{DType, Tensor};

/// Largest d_state the kernel takes (`SSU_MAX_N`).
const MAX_D_STATE: usize = 256;
/// Rows of headdim per block (`SSU_WARPS * SSU_ROWS_PER_WARP`).
const ROWS_PER_BLOCK: usize = 16;

/// Host side of `DtParams` in common.cuh: (softplus, clamp, lo, hi).
pub(crate) fn dt_params(p: &SsdParams) -> (i32, i32, f32, f32) {
    let (lo, hi) = p.dt_limit;
    let clamp = lo > 0.0 || hi < f64::INFINITY;
    (
        p.dt_softplus as i32,
        clamp as i32,
        lo as f32,
        hi.min(f32::MAX as f64) as f32,
    )
}

pub(crate) fn selective_state_update(
    args: &StateUpdateArgs,
    params: &SsdParams,
) -> Result<Option<Tensor>> {
    let Some(dev) = device(args.x) else {
        return Ok(None);
    };
    let (batch, nheads, headdim) = args.x.dims3()?;
    let (_, ngroups, d_state) = args.b.dims3()?;
    let Some(sfx) = suffix(args.x.dtype()) else {
        return Ok(None);
    };
    if d_state > MAX_D_STATE || args.b.dtype() != args.x.dtype() || args.c.dtype() != args.x.dtype()
    {
        return Ok(None);
    }
    if args.z.is_some_and(|z| z.dtype() != args.x.dtype()) {
        return Ok(None);
    }
    let (x, xs) = rows(args.x, 2)?; // (batch, nheads, headdim)
    let (dt, dts) = rows(args.dt, 1)?; // (batch, nheads)
    let (b, bs) = rows(args.b, 2)?; // (batch, ngroups, d_state)
    let (c, cs) = rows(args.c, 2)?; // (batch, ngroups, d_state)
    let z = args.z.map(|z| rows(z, 2)).transpose()?; // (batch, nheads, headdim)
    let a = args.a.contiguous()?; // (nheads) f32
    let d = args.d.map(|t| t.contiguous()).transpose()?; // (nheads)
    let dt_bias = args.dt_bias.map(|t| t.contiguous()).transpose()?; // (nheads)
    let y = output((batch, nheads, headdim), x.dtype(), &dev)?;
    let Some(lc) = cfg(
        (
            headdim.div_ceil(ROWS_PER_BLOCK) as u64,
            nheads as u64,
            batch as u64,
        ),
        128,
        0,
    ) else {
        return Ok(None);
    };
    let (softplus, clamp, lo, hi) = dt_params(params);
    let f = func(
        &dev,
        "state_update",
        ptx::STATE_UPDATE,
        &format!("selective_state_update_{sfx}"),
    )?;
    let dtype_of = |t: Option<&Tensor>| code(t.map_or(DType::F32, |t| t.dtype()));
    launch!(
        f,
        lc,
        ptr(args.state, &dev)?,
        ptr(&x, &dev)?,
        xs[0] as i64,
        ptr(&dt, &dev)?,
        code(dt.dtype()),
        dts[0] as i64,
        ptr(&a, &dev)?,
        ptr(&b, &dev)?,
        bs[0] as i64,
        ptr(&c, &dev)?,
        cs[0] as i64,
        opt_ptr(d.as_ref(), &dev)?,
        dtype_of(d.as_ref()),
        opt_ptr(z.as_ref().map(|z| &z.0), &dev)?,
        z.as_ref().map_or(0, |z| z.1[0] as i64),
        opt_ptr(dt_bias.as_ref(), &dev)?,
        dtype_of(dt_bias.as_ref()),
        ptr(&y, &dev)?,
        nheads as i64,
        headdim as i64,
        d_state as i64,
        ngroups as i64,
        softplus,
        clamp,
        lo,
        hi,
    )?;
    Ok(Some(y))
}
