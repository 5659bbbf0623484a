//! RMSNorms of Mamba-2: the grouped gated norm inside the mixer, and the residual-add + norm in
//! front of each block.

use crate::check;
use crate::{Backend, OpError, Result};
use candle_core::{DType, Tensor, D};

const OP: &str = "gated_rms_norm";
const OP_RES: &str = "rms_norm_residual";

/// Arguments of [`gated_rms_norm`].
#[derive(Debug, Clone, Copy)]
pub struct GatedRmsNormArgs<'a> {
    /// `(..., dim)`.
    pub x: &'a Tensor,
    /// `(..., dim)`: the gate; `None` gives a plain grouped RMSNorm.
    pub z: Option<&'a Tensor>,
    /// `(dim)`.
    pub weight: &'a Tensor,
    pub eps: f64,
    /// The norm is taken over consecutive groups of this many channels (`d_inner / ngroups`).
    pub group_size: usize,
    /// `true`: `rmsnorm(x) * silu(z)`; `false` (every released Mamba-2): `rmsnorm(x * silu(z))`.
    pub norm_before_gate: bool,
}

fn validate(args: &GatedRmsNormArgs) -> Result<usize> {
    check::float(OP, "x", args.x)?;
    let dim = *args.x.dims().last().ok_or_else(|| OpError::Shape {
        op: OP,
        arg: "x",
        got: vec![],
        expected: "rank >= 1".into(),
    })?;
    if args.group_size == 0 || dim % args.group_size != 0 {
        return Err(OpError::Param {
            op: OP,
            param: "group_size",
            message: format!("{} does not divide {dim}", args.group_size),
        });
    }
    check::shape(OP, "weight", args.weight, &[dim])?;
    check::float(OP, "weight", args.weight)?;
    check::same_device(OP, "weight", args.x, args.weight)?;
    check::opt(OP, "z", args.x, args.z, args.x.dims())?;
    Ok(dim)
}

/// Grouped gated RMSNorm. Output has the dtype of `x`; computed in f32.
pub fn gated_rms_norm(args: &GatedRmsNormArgs) -> Result<Tensor> {
    gated_rms_norm_with(args, Backend::Auto)
}

/// [`gated_rms_norm`] with an explicit backend choice.
pub fn gated_rms_norm_with(args: &GatedRmsNormArgs, backend: Backend) -> Result<Tensor> {
    validate(args)?;
    crate::dispatch!(
        backend,
        args.x.device(),
        gated_rms_norm(args),
        gated_rms_norm_slow(args)
    )
}

/// Plain-tensor reference of [`gated_rms_norm`].
pub fn gated_rms_norm_slow(args: &GatedRmsNormArgs) -> Result<Tensor> {
    let dim = validate(args)?;
    let mut x = args.x.to_dtype(DType::F32)?; // (..., dim)
    let gate = args.z.map(|z| z.to_dtype(DType::F32)?.silu()).transpose()?;
    if let (Some(g), false) = (&gate, args.norm_before_gate) {
        x = (x * g)?;
    }
    let dims = x.dims().to_vec();
    let mut grouped = dims[..dims.len() - 1].to_vec();
    grouped.extend([dim / args.group_size, args.group_size]);
    let xg = x.reshape(grouped)?; // (..., ngroups, group_size)
    let inv_rms = (xg.sqr()?.mean_keepdim(D::Minus1)? + args.eps)?
        .sqrt()?
        .recip()?;
    let mut y = xg.broadcast_mul(&inv_rms)?.reshape(dims)?; // (..., dim)
    y = y.broadcast_mul(&args.weight.to_dtype(DType::F32)?)?;
    if let (Some(g), true) = (&gate, args.norm_before_gate) {
        y = (y * g)?;
    }
    Ok(y.to_dtype(args.x.dtype())?)
}

fn validate_residual(x: &Tensor, residual: Option<&Tensor>, weight: &Tensor) -> Result<()> {
    check::float(OP_RES, "x", x)?;
    let dim = *x.dims().last().ok_or_else(|| OpError::Shape {
        op: OP_RES,
        arg: "x",
        got: vec![],
        expected: "rank >= 1".into(),
    })?;
    check::opt(OP_RES, "residual", x, residual, x.dims())?;
    check::shape(OP_RES, "weight", weight, &[dim])?;
    check::float(OP_RES, "weight", weight)?;
    check::same_device(OP_RES, "weight", x, weight)
}

/// Residual add + RMSNorm in front of a Mamba-2 block (and the final norm).
///
/// `residual_out = x + residual` (f32 when `residual_in_fp32`, else the dtype of `x`), and
/// `normed = rmsnorm(residual_out) * weight` in the dtype of `weight`. Returns
/// `(normed, residual_out)`. With `residual = None`, `residual_out` is `x` itself (first block).
pub fn rms_norm_residual(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    residual_in_fp32: bool,
) -> Result<(Tensor, Tensor)> {
    rms_norm_residual_with(x, residual, weight, eps, residual_in_fp32, Backend::Auto)
}

/// [`rms_norm_residual`] with an explicit backend choice.
pub fn rms_norm_residual_with(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    residual_in_fp32: bool,
    backend: Backend,
) -> Result<(Tensor, Tensor)> {
    validate_residual(x, residual, weight)?;
    crate::dispatch!(
        backend,
        x.device(),
        rms_norm_residual(x, residual, weight, eps, residual_in_fp32),
        rms_norm_residual_slow(x, residual, weight, eps, residual_in_fp32)
    )
}

/// Plain-tensor reference of [`rms_norm_residual`].
pub fn rms_norm_residual_slow(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    residual_in_fp32: bool,
) -> Result<(Tensor, Tensor)> {
    validate_residual(x, residual, weight)?;
    let res_dtype = if residual_in_fp32 {
        DType::F32
    } else {
        x.dtype()
    };
    let residual_out = match residual {
        Some(r) => (x.to_dtype(DType::F32)? + r.to_dtype(DType::F32)?)?.to_dtype(res_dtype)?,
        None => x.to_dtype(res_dtype)?,
    };
    let h = residual_out.to_dtype(DType::F32)?;
    let inv_rms = (h.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let normed = h
        .broadcast_mul(&inv_rms)?
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?;
    Ok((normed.to_dtype(weight.dtype())?, residual_out))
}
