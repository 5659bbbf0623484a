//! Argument validation shared by the ops: every mismatch becomes an [`OpError`] naming the
//! op and the argument, so a caller never sees a Candle broadcast error from deep inside.

use crate::{OpError, Result};
use candle_core::{DType, Tensor};

pub(crate) fn dims<const N: usize>(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
) -> Result<[usize; N]> {
    let d = t.dims();
    if d.len() != N {
        return Err(OpError::Shape {
            op,
            arg,
            got: d.to_vec(),
            expected: format!("rank {N}"),
        });
    }
    let mut out = [0usize; N];
    out.copy_from_slice(d);
    Ok(out)
}

pub(crate) fn shape(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    expected: &[usize],
) -> Result<()> {
    if t.dims() != expected {
        return Err(OpError::Shape {
            op,
            arg,
            got: t.dims().to_vec(),
            expected: format!("{expected:?}"),
        });
    }
    Ok(())
}

pub(crate) fn float(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        got => Err(OpError::Dtype {
            op,
            arg,
            got,
            expected: "f32, f16 or bf16",
        }),
    }
}

pub(crate) fn f32(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(OpError::Dtype {
            op,
            arg,
            got: t.dtype(),
            expected: "f32",
        });
    }
    Ok(())
}

pub(crate) fn same_device(
    op: &'static str,
    arg: &'static str,
    x: &Tensor,
    t: &Tensor,
) -> Result<()> {
    if !x.device().same_device(t.device()) {
        return Err(OpError::Device { op, arg });
    }
    Ok(())
}

/// Checks shape, float dtype and device of an optional argument in one go.
pub(crate) fn opt(
    op: &'static str,
    arg: &'static str,
    x: &Tensor,
    t: Option<&Tensor>,
    expected: &[usize],
) -> Result<()> {
    if let Some(t) = t {
        shape(op, arg, t, expected)?;
        float(op, arg, t)?;
        same_device(op, arg, x, t)?;
    }
    Ok(())
}

/// `softplus(v) = log(1 + exp(v))`, computed without overflow for large `v` (where it equals `v`).
pub(crate) fn softplus(v: &Tensor) -> candle_core::Result<Tensor> {
    // max(v, 0) + log1p(exp(-|v|)): exact identity, never overflows.
    let relu = v.relu()?;
    let neg_abs = v.abs()?.neg()?;
    relu + (neg_abs.exp()? + 1.0)?.log()?
}

/// Heads share B and C within a group: head `h` reads group `h / (nheads / ngroups)`.
/// Expands `(.., ngroups, d_state)` to `(.., nheads, d_state)` along dimension `dim`.
pub(crate) fn groups_to_heads(
    t: &Tensor,
    dim: usize,
    nheads: usize,
) -> candle_core::Result<Tensor> {
    let ngroups = t.dim(dim)?;
    let rep = nheads / ngroups;
    if rep == 1 {
        return Ok(t.clone());
    }
    // (.., g, n) -> (.., g, 1, n) -> (.., g, rep, n) -> (.., g*rep, n)
    let mut dims = t.dims().to_vec();
    let t = t.unsqueeze(dim + 1)?;
    let mut bdims = t.dims().to_vec();
    bdims[dim + 1] = rep;
    dims[dim] = nheads;
    t.broadcast_as(bdims)?.contiguous()?.reshape(dims)
}
