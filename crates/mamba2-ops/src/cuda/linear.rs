//! CUDA projections for a few rows (`kernels/cuda/linear.cu`): decode-time matrix-vector
//! products that stream the weight once at close to copy bandwidth. More rows go to cuBLAS
//! (Candle's matmul).

use super::launch::{allow_smem, cfg, code, device, func, launch, opt_ptr, output, ptr, ptx};
use super::launch::{sm_count, suffix, Kernel, Result};
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

/// Persistent grid of a prologue projection to `n` outputs with `smem` bytes of dynamic shared
/// memory (after raising the kernel's limit where needed): as many blocks as fit on the device
/// at once, each computing the normalised input once and walking several groups of 4 output
/// rows; `None` when the device cannot.
fn grid(f: &Kernel, dev: &CudaDevice, n: usize, smem: usize) -> Result<Option<LaunchConfig>> {
    if !allow_smem(dev, f, smem)? {
        return Ok(None);
    }
    let resident = f.blocks_per_sm(256, smem)? * sm_count(dev)?;
    Ok(cfg((n.div_ceil(4).min(resident) as u64, 1, 1), 256, smem))
}

/// Most groups of the norm that `linear_gnorm` computes in its prologue.
const GNORM_MAX_GROUPS: usize = 16;

/// The residual RMSNorm in front of a mixer, fused into its input projection
/// (`linear_resnorm_b<BB>`): `h = hidden + residual` (rounded to `rout`'s dtype, written to
/// `rout` by the kernel's first block), `x = h / rms(h) * norm_w`, `y = x · wᵀ (+ bias)`.
/// `hidden` `(rows, k)` contiguous, `residual` like it or absent, `norm_w` `(k)` of the
/// activation dtype, `rout` `(rows, k)` contiguous and distinct from the inputs. `false`
/// (nothing enqueued) when a precondition fails.
#[allow(clippy::too_many_arguments)]
pub(crate) fn enqueue_resnorm(
    f: &Kernel,
    dev: &CudaDevice,
    hidden: &Tensor,
    residual: Option<&Tensor>,
    norm_w: &Tensor,
    rout: &Tensor,
    eps: f64,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> Result<bool> {
    let (rows_n, k) = hidden.dims2()?;
    let n = w.dim(0)?;
    let dt = hidden.dtype();
    if !projection_ok(dev, rows_n, k, dt, w, bias, y)?
        || norm_w.dtype() != dt
        || norm_w.dims() != [k]
        || !hidden.is_contiguous()
        || !norm_w.is_contiguous()
        || !rout.is_contiguous()
        || rout.dims() != [rows_n, k]
        || residual.is_some_and(|r| !r.is_contiguous() || r.dims() != [rows_n, k])
    {
        return Ok(false);
    }
    let Some(c) = grid(f, dev, n, rows_n * k * dt.size_in_bytes())? else {
        return Ok(false);
    };
    launch!(
        f,
        c,
        ptr(hidden, dev)?,
        opt_ptr(residual, dev)?,
        code(residual.map_or(DType::F32, |r| r.dtype())),
        ptr(rout, dev)?,
        code(rout.dtype()),
        ptr(norm_w, dev)?,
        code(norm_w.dtype()),
        eps as f32,
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

/// What `linear_gnorm` reads of the fused mixer step that ran before it (launched with
/// `write_norm` off): its f32 y and partial sums of squares, and the norm's parameters.
pub(crate) struct GroupNormInput<'a> {
    pub ybuf: &'a Tensor, // (rows, d_inner) f32, gated unless norm_before_gate
    pub hsum: &'a Tensor, // (rows, nparts) f32, the parts of each group contiguous
    pub nparts: usize,
    pub ngroups: usize,
    pub z: &'a Tensor,      // (rows, d_inner) activation dtype, unit inner stride
    pub norm_w: &'a Tensor, // (d_inner) activation dtype
    pub eps: f64,
    pub norm_before_gate: bool,
}

/// The mixer's grouped gated RMSNorm fused into its output projection (`linear_gnorm_b<BB>`):
/// `x = gated_rms_norm(y, z)`, `y_out = x · wᵀ (+ bias)`. `false` (nothing enqueued) when a
/// precondition fails.
pub(crate) fn enqueue_gnorm(
    f: &Kernel,
    dev: &CudaDevice,
    g: &GroupNormInput,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> Result<bool> {
    let (rows_n, k) = g.ybuf.dims2()?;
    let n = w.dim(0)?;
    let dt = g.z.dtype();
    let z_ok = g.z.dims() == [rows_n, k] && g.z.layout().stride()[1] == 1;
    if !projection_ok(dev, rows_n, k, dt, w, bias, y)?
        || g.norm_w.dtype() != dt
        || g.norm_w.dims() != [k]
        || g.ybuf.dtype() != DType::F32
        || g.hsum.dtype() != DType::F32
        || g.ngroups == 0
        || g.ngroups > GNORM_MAX_GROUPS
        || !k.is_multiple_of(g.ngroups)
        || !g.nparts.is_multiple_of(g.ngroups)
        || g.hsum.dims() != [rows_n, g.nparts]
        || !z_ok
        || !g.ybuf.is_contiguous()
        || !g.hsum.is_contiguous()
        || !g.norm_w.is_contiguous()
    {
        return Ok(false);
    }
    let Some(c) = grid(f, dev, n, rows_n * k * dt.size_in_bytes())? else {
        return Ok(false);
    };
    launch!(
        f,
        c,
        ptr(g.ybuf, dev)?,
        ptr(g.hsum, dev)?,
        g.nparts as i64,
        g.ngroups as i64,
        ptr(g.z, dev)?,
        g.z.layout().stride()[0] as i64,
        g.norm_before_gate as i32,
        ptr(g.norm_w, dev)?,
        code(g.norm_w.dtype()),
        g.eps as f32,
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
    if !projection_ok(dev, rows_n, k, x.dtype(), w, bias, y)? || !aligned_rows(x, dev)? {
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
