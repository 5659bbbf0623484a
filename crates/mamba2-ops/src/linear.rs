//! The projections of a Mamba-2 block (`in_proj`, `out_proj`, the LM head) as an op: at decode
//! time they are matrix-vector products over a handful of rows, bound by the weight bytes read,
//! and the general GEMMs of the backends leave bandwidth on the table there.

use crate::check;
use crate::{Backend, OpError, Result};
use candle_core::{DType, Tensor};

const OP: &str = "linear";

/// Returns `(rows, in_features, out_features)` after checking the arguments.
fn validate(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    check::float(OP, "x", x)?;
    check::float(OP, "weight", weight)?;
    let (out_f, in_f) = weight.dims2().map_err(|_| OpError::Shape {
        op: OP,
        arg: "weight",
        got: weight.dims().to_vec(),
        expected: "(out_features, in_features)".into(),
    })?;
    let last = x.dims().last().copied();
    if last != Some(in_f) {
        return Err(OpError::Shape {
            op: OP,
            arg: "x",
            got: x.dims().to_vec(),
            expected: format!("(..., {in_f})"),
        });
    }
    if weight.dtype() != x.dtype() {
        return Err(OpError::Dtype {
            op: OP,
            arg: "weight",
            got: weight.dtype(),
            expected: "the dtype of x",
        });
    }
    check::same_device(OP, "weight", x, weight)?;
    check::opt(OP, "bias", x, bias, &[out_f])?;
    Ok((x.elem_count() / in_f.max(1), in_f, out_f))
}

/// `y = x · weightᵀ (+ bias)`: `x` `(..., in_features)`, `weight` `(out_features, in_features)`
/// of x's dtype, `bias` `(out_features)`; `y` `(..., out_features)` in x's dtype, accumulated
/// in f32 by the fast paths.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let x = Tensor::randn(0f32, 1.0, (2, 16), &dev)?; // (rows, in_features)
/// let w = Tensor::randn(0f32, 1.0, (8, 16), &dev)?; // (out_features, in_features)
/// let y = mamba2_ops::linear(&x, &w, None)?;
/// assert_eq!(y.dims(), &[2, 8]);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_with(x, weight, bias, Backend::Auto)
}

/// [`linear`] with an explicit backend choice.
pub fn linear_with(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    backend: Backend,
) -> Result<Tensor> {
    validate(x, weight, bias)?;
    crate::dispatch!(
        backend,
        x.device(),
        linear(x, weight, bias),
        linear_slow(x, weight, bias)
    )
}

/// Plain-tensor reference of [`linear`]: Candle's matmul in f32.
pub fn linear_slow(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    validate(x, weight, bias)?;
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?; // (..., in_features)
    let w32 = weight.to_dtype(DType::F32)?; // (out_features, in_features)
    let mut y = x32.broadcast_matmul(&w32.t()?)?; // (..., out_features)
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
    }
    Ok(y.to_dtype(dtype)?)
}

/// `x · weightᵀ (+ bias)` by Candle's matmul in the activation dtype (cuBLAS / Metal GEMM, f32
/// accumulation inside): the GPU fast paths use it where no kernel of ours is faster.
pub(crate) fn linear_native(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let y = x.broadcast_matmul(&weight.t()?)?; // (..., out_features)
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}
