//! MLP activations of the hybrid models, applied to the output of one fused projection.
//!
//! Reference: HF transformers' MLPs. Shapes:
//! - [`swiglu`]: x `(..., 2n)` laid out `[gate | up]` (Granite's `input_linear` output; Falcon-H1
//!   and Bamba's `gate_proj` / `up_proj` concatenated at load) -> `(..., n) = silu(gate) · up`;
//! - [`relu_squared`]: x `(...)` -> `relu(x)²` (Nemotron-H), same shape.
//!
//! Computed in f32, rounded once to x's dtype. Memory: the output, plus f32 copies of x in the
//! reference; the CPU fast path one row of f32 scratch per worker.

use crate::check;
use crate::{Backend, OpError, Result};
use candle_core::{DType, Tensor, D};

const OP_SWIGLU: &str = "swiglu";
const OP_RELU2: &str = "relu_squared";

/// Returns `n`, half the last dimension.
pub(crate) fn validate_swiglu(x: &Tensor) -> Result<usize> {
    check::float(OP_SWIGLU, "x", x)?;
    match x.dims().last() {
        Some(&d) if d % 2 == 0 => Ok(d / 2),
        _ => Err(OpError::Shape {
            op: OP_SWIGLU,
            arg: "x",
            got: x.dims().to_vec(),
            expected: "(..., 2n): rank >= 1, an even last dimension [gate | up]".into(),
        }),
    }
}

/// `silu(gate) · up` of `x = [gate | up]` along the last dimension: `(..., 2n)` -> `(..., n)`
/// in x's dtype, computed in f32.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[1f32, -2.0, 3.0, 4.0]], &Device::Cpu)?; // gate [1, -2], up [3, 4]
/// let y = mamba2_ops::swiglu(&x)?;
/// let silu = |v: f32| v / (1.0 + (-v).exp());
/// let want = [silu(1.0) * 3.0, silu(-2.0) * 4.0];
/// for (a, b) in y.flatten_all()?.to_vec1::<f32>()?.iter().zip(want) {
///     assert!((a - b).abs() < 1e-6);
/// }
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    swiglu_with(x, Backend::Auto)
}

/// [`swiglu`] with an explicit backend choice.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use mamba2_ops::{swiglu_with, Backend};
/// let x = Tensor::randn(0f32, 1.0, (2, 3, 16), &Device::Cpu)?;
/// assert_eq!(swiglu_with(&x, Backend::Reference)?.dims(), &[2, 3, 8]);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn swiglu_with(x: &Tensor, backend: Backend) -> Result<Tensor> {
    validate_swiglu(x)?;
    crate::dispatch!(backend, x.device(), swiglu(x), swiglu_slow(x))
}

/// Plain-tensor reference of [`swiglu`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::randn(0f32, 1.0, (4, 10), &Device::Cpu)?;
/// assert_eq!(mamba2_ops::swiglu_slow(&x)?.dims(), &[4, 5]);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn swiglu_slow(x: &Tensor) -> Result<Tensor> {
    let n = validate_swiglu(x)?;
    let x32 = x.to_dtype(DType::F32)?; // (..., 2n)
    let gate = x32.narrow(D::Minus1, 0, n)?; // (..., n)
    let up = x32.narrow(D::Minus1, n, n)?; // (..., n)
    Ok((gate.silu()? * up)?.to_dtype(x.dtype())?)
}

/// `relu(x)²`, elementwise: same shape and dtype as `x`, computed in f32.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[-1.5f32, 0.0, 2.0], &Device::Cpu)?;
/// assert_eq!(mamba2_ops::relu_squared(&x)?.to_vec1::<f32>()?, [0.0, 0.0, 4.0]);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn relu_squared(x: &Tensor) -> Result<Tensor> {
    relu_squared_with(x, Backend::Auto)
}

/// [`relu_squared`] with an explicit backend choice.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use mamba2_ops::{relu_squared_with, Backend};
/// let x = Tensor::new(&[[-3f32, 3.0]], &Device::Cpu)?;
/// assert_eq!(relu_squared_with(&x, Backend::Reference)?.to_vec2::<f32>()?, [[0.0, 9.0]]);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn relu_squared_with(x: &Tensor, backend: Backend) -> Result<Tensor> {
    check::float(OP_RELU2, "x", x)?;
    crate::dispatch!(backend, x.device(), relu_squared(x), relu_squared_slow(x))
}

/// Plain-tensor reference of [`relu_squared`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[-1f32, 0.5], &Device::Cpu)?;
/// assert_eq!(mamba2_ops::relu_squared_slow(&x)?.to_vec1::<f32>()?, [0.0, 0.25]);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn relu_squared_slow(x: &Tensor) -> Result<Tensor> {
    check::float(OP_RELU2, "x", x)?;
    Ok(x.to_dtype(DType::F32)?.relu()?.sqr()?.to_dtype(x.dtype())?)
}
