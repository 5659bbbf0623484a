//! CUDA projections for a few rows (`kernels/cuda/linear.cu`): decode-time matrix-vector
//! products that stream the weight once at close to copy bandwidth. More rows go to cuBLAS
//! (Candle's matmul).

use super::launch::{cfg, code, device, func, launch, opt_ptr, output, ptr, ptx, suffix};
use super::launch::{Kernel, Result};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Tensor};

/// Most rows of x the kernel takes. Measured on the H200 (1.3b projections, bf16): at 1-2 rows
/// the kernel is 1.1-1.4x cuBLAS, at 4 about even, at 8 0.65x and at 16 0.37x: beyond 4 rows
/// the fast path is cuBLAS (Candle's matmul in the activation dtype).
pub(crate) const MAX_ROWS: usize = 4;

/// The kernel variant (`linear_b<BB>`) serving `rows` rows: the smallest instantiated width.
pub(crate) fn variant(rows: usize) -> Option<usize> {
    [1, 2, 4].into_iter().find(|&bb| rows <= bb)
}

pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let Some(dev) = device(x) else {
        return Ok(None);
    };
    let (n, k) = weight.dims2()?;
    let rows_n = x.elem_count() / k.max(1);
    if rows_n == 0 {
        return Ok(None);
    }
    if rows_n > MAX_ROWS {
        // cuBLAS in the activation dtype (f32 accumulation): the reference's f32 round trip
        // would double the traffic for nothing.
        return Ok(Some(crate::linear::linear_native(x, weight, bias)?));
    }
    let Some(sfx) = suffix(x.dtype()) else {
        return Ok(None);
    };
    let x2 = x.reshape((rows_n, k))?; // (rows, in_features)
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().unwrap() = n;
    let y = output((rows_n, n), x.dtype(), &dev)?; // (rows, out_features)
    let name = format!("linear_b{}_{sfx}", variant(rows_n).unwrap_or(MAX_ROWS));
    let f = func(&dev, "linear", ptx::LINEAR, &name)?;
    // A misaligned view of x (an odd start offset) is copied; a misaligned weight falls back.
    let x2 = if aligned_rows(&x2, &dev)? {
        x2
    } else {
        x2.copy()?
    };
    if !enqueue(&f, &dev, &x2, weight, bias, &y)? {
        return Ok(None);
    }
    Ok(Some(y.reshape(out_dims)?))
}

/// Whether `x` `(rows, k)` has 16-byte aligned, unit-stride rows.
fn aligned_rows(x: &Tensor, dev: &CudaDevice) -> Result<bool> {
    let size = x.dtype().size_in_bytes();
    let s = x.layout().stride();
    Ok(s[1] == 1 && (s[0] * size).is_multiple_of(16) && ptr(x, dev)?.is_multiple_of(16))
}

/// Enqueues `y = x · wᵀ (+ bias)` on `f`'s stream (`f` the `linear_b<BB>` variant for x's row
/// count): `x` `(rows, k)`, `w` `(n, k)`, `y` `(rows, n)` of x's dtype or f32. `false` (nothing
/// enqueued) when a precondition fails: rows in 1..=4, w contiguous, 16-byte aligned rows of x
/// and w (k a multiple of 16 bytes), bias contiguous.
pub(crate) fn enqueue(
    f: &Kernel,
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> Result<bool> {
    let (rows_n, k) = x.dims2()?;
    let (n, _) = w.dims2()?;
    let size = x.dtype().size_in_bytes();
    if rows_n == 0
        || rows_n > MAX_ROWS
        || !w.is_contiguous()
        || !(k * size).is_multiple_of(16)
        || !ptr(w, dev)?.is_multiple_of(16)
        || !aligned_rows(x, dev)?
        || bias.is_some_and(|b| !b.is_contiguous())
        || y.dims() != [rows_n, n]
        || y.layout().stride()[1] != 1
        || !matches!(y.dtype(), DType::F32) && y.dtype() != x.dtype()
    {
        return Ok(false);
    }
    let Some(c) = cfg((n.div_ceil(4) as u64, 1, 1), 256, 0) else {
        return Ok(false);
    };
    launch!(
        f,
        c,
        ptr(x, dev)?,
        x.layout().stride()[0] as i64,
        rows_n as i32,
        ptr(w, dev)?,
        opt_ptr(bias, dev)?,
        code(bias.map_or(DType::F32, |b| b.dtype())),
        ptr(y, dev)?,
        code(y.dtype()),
        y.layout().stride()[0] as i64,
        n as i64,
        k as i64,
    )?;
    Ok(true)
}
