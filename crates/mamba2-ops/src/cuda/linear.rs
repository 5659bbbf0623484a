//! CUDA projections for a few rows (`kernels/cuda/linear.cu`): decode-time matrix-vector
//! products that stream the weight once at close to copy bandwidth. More rows go to cuBLAS
//! (Candle's matmul).

use super::launch::{
    cfg, code, cuda_options, device, func, launch, opt_ptr, output, ptr, ptx, suffix,
};
use super::launch::{Kernel, Result};
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
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

/// Whether `w` `(n, k)` can be streamed by the kernels: contiguous, 16-byte aligned, rows a
/// multiple of 16 bytes.
fn streamable(w: &Tensor, dev: &CudaDevice) -> Result<bool> {
    let k = w.dim(1)?;
    Ok(w.is_contiguous()
        && (k * w.dtype().size_in_bytes()).is_multiple_of(16)
        && ptr(w, dev)?.is_multiple_of(16))
}

/// The preconditions every matrix-vector kernel shares, for `rows` rows of width `k` in `dt`:
/// 1..=4 rows, `w` `(n, k)` of `dt` streamable, bias contiguous, `y` `(rows, n)` with unit inner
/// stride of `dt` or f32.
fn projection_ok(
    dev: &CudaDevice,
    rows: usize,
    k: usize,
    dt: DType,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> Result<bool> {
    let (n, kw) = w.dims2()?;
    Ok(rows > 0
        && rows <= MAX_ROWS
        && kw == k
        && w.dtype() == dt
        && streamable(w, dev)?
        && bias.is_none_or(|b| b.is_contiguous())
        && y.dims() == [rows, n]
        && y.layout().stride()[1] == 1
        && (y.dtype() == DType::F32 || y.dtype() == dt))
}

/// The RMS scale that a scaled projection (`linear_scaled_b<BB>`, `linear_res_b<BB>`) applies
/// to its dot products: row `b` is divided by `sqrt(sum(parts[b, :]) / dim + eps)`. The
/// producer of x wrote x times the norm weight, unscaled, and these partial sums of squares.
pub struct RowScale<'a> {
    pub parts: &'a Tensor, // (rows, nparts) f32, contiguous
    pub dim: usize,        // elements per normalised row (group)
    pub eps: f64,
}

/// The residual epilogue of `linear_res_b<BB>`, run on the projection's rounded output `o`:
/// `h = o + residual` (rounded to `residual_out`'s dtype) into `residual_out`, `y = h *
/// next_norm_w` (the next norm's input, unscaled) and each block's sum of h² into `parts_out`.
pub struct ResidualEpilogue<'a> {
    pub residual: &'a Tensor,     // (rows, n) contiguous
    pub residual_out: &'a Tensor, // (rows, n) contiguous, distinct from `residual`
    pub next_norm_w: &'a Tensor,  // (n)
    pub parts_out: &'a Tensor,    // (rows, StepStream::residual_parts(n) columns) f32, contiguous
}

/// Output rows reduced together by the matrix-vector kernels (`LIN_ROWS` in `linear.cu`).
const ROWS_PER_GROUP: usize = 4;

/// Threads per block of the matrix-vector kernels (`LIN_THREADS` in `linear.cu`).
const THREADS: u32 = 256;

/// Blocks of a matrix-vector launch of `f` for `n` outputs, hence the columns of
/// [`ResidualEpilogue::parts_out`] (one partial sum per block): as many as the GPU holds at
/// once (each block then walks a balanced range of rows with two weight tiles in flight), or
/// one per [`ROWS_PER_GROUP`] rows when there are fewer groups. `CudaOptions::matvec_resident =
/// false` always launches one block per group (the plain grid, kept to compare against on the
/// GPU).
pub(crate) fn matvec_blocks(dev: &CudaDevice, f: &Kernel, n: usize) -> Result<usize> {
    let groups = n.div_ceil(ROWS_PER_GROUP).max(1);
    if !cuda_options().matvec_resident {
        return Ok(groups);
    }
    Ok(groups.min(f.resident_blocks(dev, THREADS)?))
}

/// The launch of a matrix-vector kernel `f` for `x` `(rows, k)` and `w` `(n, k)`
/// ([`matvec_blocks`] blocks of [`THREADS`] threads); `None` when a precondition every variant
/// shares fails ([`projection_ok`], 16-byte aligned rows of x) or the grid exceeds CUDA's
/// limits.
fn matvec_launch(
    dev: &CudaDevice,
    f: &Kernel,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> Result<Option<LaunchConfig>> {
    let (rows_n, k) = x.dims2()?;
    if !projection_ok(dev, rows_n, k, x.dtype(), w, bias, y)? || !aligned_rows(x, dev)? {
        return Ok(None);
    }
    // The kernels index 16-byte vectors of a row with 32-bit integers.
    if k / (16 / x.dtype().size_in_bytes()) >= 1 << 31 {
        return Ok(None);
    }
    Ok(cfg(
        (matvec_blocks(dev, f, w.dim(0)?)? as u64, 1, 1),
        THREADS,
        0,
    ))
}

/// The B/C conv-state shift a deferred mixer step leaves to the projection after it (done by
/// its block 0): channels `ch0 .. ch0 + nch` of `conv_state` `(rows, conv_dim, k)` f32 take
/// their next value from `xbc` `(rows, conv_dim)` (unit inner stride, activation dtype).
pub struct ConvShift<'a> {
    pub conv_state: &'a Tensor,
    pub xbc: &'a Tensor,
    pub ch0: usize,
    pub nch: usize,
}

fn scale_ok(s: &RowScale, rows: usize) -> Result<bool> {
    Ok(s.parts.dtype() == DType::F32
        && s.parts.is_contiguous()
        && s.parts.rank() == 2
        && s.parts.dim(0)? == rows
        && s.dim > 0)
}

/// `y = (x · wᵀ) / rms (+ bias)` (`linear_scaled_b<BB>`): the RMSNorm whose input times weight
/// is `x` and whose partial sums of squares are `scale.parts`, fused with the projection after
/// it. Shapes as [`enqueue`]; `false` (nothing enqueued) when a precondition fails.
pub(crate) fn enqueue_scaled(
    f: &Kernel,
    dev: &CudaDevice,
    x: &Tensor,
    scale: &RowScale,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> Result<bool> {
    let (rows_n, k) = x.dims2()?;
    let n = w.dim(0)?;
    if !scale_ok(scale, rows_n)? {
        return Ok(false);
    }
    let Some(c) = matvec_launch(dev, f, x, w, bias, y)? else {
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
        ptr(scale.parts, dev)?,
        scale.parts.dim(1)? as i64,
        scale.dim as f32,
        scale.eps as f32,
    )?;
    Ok(true)
}

/// The output projection of a mixer with the next block's residual add behind it
/// (`linear_res_b<BB>`): `o = (x · wᵀ) [/ rms] (+ bias)` rounded to x's dtype, then the
/// [`ResidualEpilogue`] (whose `y` is the next norm's unscaled input, x's dtype) and, when
/// given, the [`ConvShift`]. `false` (nothing enqueued) when a precondition fails.
#[allow(clippy::too_many_arguments)]
pub(crate) fn enqueue_residual(
    f: &Kernel,
    dev: &CudaDevice,
    x: &Tensor,
    scale: Option<&RowScale>,
    w: &Tensor,
    bias: Option<&Tensor>,
    epi: &ResidualEpilogue,
    shift: Option<&ConvShift>,
    y: &Tensor,
) -> Result<bool> {
    let (rows_n, k) = x.dims2()?;
    let n = w.dim(0)?;
    let dt = x.dtype();
    let same = |t: &Tensor| t.dims() == [rows_n, n] && t.is_contiguous();
    let epi_ok = same(epi.residual)
        && same(epi.residual_out)
        && epi.next_norm_w.dims() == [n]
        && epi.next_norm_w.is_contiguous()
        && epi.parts_out.dtype() == DType::F32
        && epi.parts_out.is_contiguous();
    let shift_ok = match shift {
        None => true,
        Some(s) => {
            let (b, conv_dim, kc) = s.conv_state.dims3()?;
            s.conv_state.dtype() == DType::F32
                && s.conv_state.is_contiguous()
                && b == rows_n
                && kc > 0
                && s.ch0 + s.nch <= conv_dim
                && s.xbc.dtype() == dt
                && s.xbc.dims() == [rows_n, conv_dim]
                && s.xbc.layout().stride()[1] == 1
        }
    };
    let scale_fits = match scale {
        Some(s) => scale_ok(s, rows_n)?,
        None => true,
    };
    if y.dtype() != dt || !epi_ok || !shift_ok || !scale_fits {
        return Ok(false);
    }
    let Some(c) = matvec_launch(dev, f, x, w, bias, y)? else {
        return Ok(false);
    };
    // One partial sum per block of this launch.
    if epi.parts_out.dims() != [rows_n, c.grid_dim.0 as usize] {
        return Ok(false);
    }
    let (conv_dim, kc) = match shift {
        Some(s) => (s.conv_state.dim(1)?, s.conv_state.dim(2)?),
        None => (0, 0),
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
        y.layout().stride()[0] as i64,
        n as i64,
        k as i64,
        opt_ptr(scale.map(|s| s.parts), dev)?,
        scale.map_or(Ok(0), |s| s.parts.dim(1))? as i64,
        scale.map_or(1.0, |s| s.dim as f32),
        scale.map_or(0.0, |s| s.eps as f32),
        ptr(epi.residual, dev)?,
        code(epi.residual.dtype()),
        ptr(epi.residual_out, dev)?,
        code(epi.residual_out.dtype()),
        ptr(epi.next_norm_w, dev)?,
        code(epi.next_norm_w.dtype()),
        ptr(epi.parts_out, dev)?,
        opt_ptr(shift.map(|s| s.conv_state), dev)?,
        opt_ptr(shift.map(|s| s.xbc), dev)?,
        shift.map_or(0, |s| s.xbc.layout().stride()[0]) as i64,
        conv_dim as i64,
        shift.map_or(0, |s| s.ch0) as i64,
        shift.map_or(0, |s| s.nch) as i32,
        kc as i32,
    )?;
    Ok(true)
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
    let n = w.dim(0)?;
    let Some(c) = matvec_launch(dev, f, x, w, bias, y)? else {
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
