//! CUDA RMSNorms: grouped gated norm and residual-add + norm (`kernels/cuda/rms_norm.cu`).

use super::launch::{
    cfg, code, device, func, launch, opt_ptr, output, ptr, ptx, rows2, suffix, Kernel, Result,
};
use crate::GatedRmsNormArgs;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Tensor};

pub(crate) fn gated_rms_norm(args: &GatedRmsNormArgs) -> Result<Option<Tensor>> {
    let Some(dev) = device(args.x) else {
        return Ok(None);
    };
    let Some(sfx) = suffix(args.x.dtype()) else {
        return Ok(None);
    };
    if args.z.is_some_and(|z| z.dtype() != args.x.dtype()) {
        return Ok(None);
    }
    let dim = *args.x.dims().last().unwrap_or(&0);
    let rows = args.x.elem_count() / dim.max(1);
    let (x, r1, xs0, xs1) = rows2(args.x)?; // (rows, dim)
    let z = args.z.map(rows2).transpose()?; // (rows, dim)
    let w = args.weight.contiguous()?; // (dim)
    let y = output(args.x.shape(), x.dtype(), &dev)?;
    let Some(c) = cfg((rows as u64, (dim / args.group_size) as u64, 1), 256, 0) else {
        return Ok(None);
    };
    let f = func(
        &dev,
        "rms_norm",
        ptx::RMS_NORM,
        &format!("gated_rms_norm_{sfx}"),
    )?;
    launch!(
        f,
        c,
        ptr(&x, &dev)?,
        xs0 as i64,
        xs1 as i64,
        opt_ptr(z.as_ref().map(|z| &z.0), &dev)?,
        z.as_ref().map_or(0, |z| z.2 as i64),
        z.as_ref().map_or(0, |z| z.3 as i64),
        ptr(&w, &dev)?,
        code(w.dtype()),
        ptr(&y, &dev)?,
        r1 as i64,
        dim as i64,
        args.group_size as i64,
        args.eps as f32,
        args.norm_before_gate as i32,
    )?;
    Ok(Some(y))
}

pub(crate) fn rms_norm_residual(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    residual_in_fp32: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(dev) = device(x) else {
        return Ok(None);
    };
    let Some(sfx) = suffix(x.dtype()) else {
        return Ok(None);
    };
    let res_dtype = if residual_in_fp32 {
        DType::F32
    } else {
        x.dtype()
    };
    let w = weight.contiguous()?; // (dim)
    let normed = output(x.shape(), w.dtype(), &dev)?;
    // Without a residual in the activation dtype, residual_out is x itself (as the reference).
    let rout = if residual.is_none() && res_dtype == x.dtype() {
        None
    } else {
        Some(output(x.shape(), res_dtype, &dev)?)
    };
    let f = func(
        &dev,
        "rms_norm",
        ptx::RMS_NORM,
        &format!("rms_norm_residual_{sfx}"),
    )?;
    if !enqueue_residual(
        &f,
        &dev,
        x,
        residual,
        &w,
        eps,
        res_dtype,
        &normed,
        rout.as_ref(),
    )? {
        return Ok(None);
    }
    Ok(Some((normed, rout.unwrap_or_else(|| x.clone()))))
}

/// Enqueues `rms_norm_residual_<dtype>` on `f`'s stream: `normed` (x's shape, w's dtype) and,
/// when given, `rout` (x's shape, `res_dtype`); `false` when the grid does not fit (nothing
/// enqueued). Shared with the captured decode step, which owns its outputs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn enqueue_residual(
    f: &Kernel,
    dev: &CudaDevice,
    x: &Tensor,
    residual: Option<&Tensor>,
    w: &Tensor,
    eps: f64,
    res_dtype: DType,
    normed: &Tensor,
    rout: Option<&Tensor>,
) -> Result<bool> {
    let dim = *x.dims().last().unwrap_or(&0);
    let rows = x.elem_count() / dim.max(1);
    let (xv, r1, xs0, xs1) = rows2(x)?; // (rows, dim)
    let res = residual.map(rows2).transpose()?; // (rows, dim)
    let Some(c) = cfg((rows as u64, 1, 1), 256, 0) else {
        return Ok(false);
    };
    launch!(
        f,
        c,
        ptr(&xv, dev)?,
        xs0 as i64,
        xs1 as i64,
        opt_ptr(res.as_ref().map(|r| &r.0), dev)?,
        code(res.as_ref().map_or(DType::F32, |r| r.0.dtype())),
        res.as_ref().map_or(0, |r| r.2 as i64),
        res.as_ref().map_or(0, |r| r.3 as i64),
        ptr(w, dev)?,
        code(w.dtype()),
        ptr(normed, dev)?,
        opt_ptr(rout, dev)?,
        code(res_dtype),
        r1 as i64,
        dim as i64,
        eps as f32,
    )?;
    Ok(true)
}
