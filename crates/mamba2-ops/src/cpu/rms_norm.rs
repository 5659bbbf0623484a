//! CPU RMSNorms: the grouped gated norm of the mixer and the residual add + norm of each block.
//!
//! Reference: [`crate::rms_norm::gated_rms_norm_slow`], [`crate::rms_norm::rms_norm_residual_slow`].
//! Each row (the last dimension) is loaded to f32 once, gated/added, normed and stored in one
//! pass. Rows are split over rayon tasks for prefill; a single row (decode) runs on the calling
//! thread in its reused scratch, so a decode step allocates only the output tensors.

use super::common::{silu_f32, view, view_opt, with_scratch, OutPtr, OutVec, View};
use crate::options::{current_options, CpuTier};
use crate::{GatedRmsNormArgs, Result};
use candle_core::{DType, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Below this many elements the work stays on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Runs `row_fn(row, scratch)` for every row, in parallel when the work is large enough.
pub(super) fn for_rows(
    rows: usize,
    dim: usize,
    scratch: usize,
    row_fn: impl Fn(usize, &mut [f32]) + Sync,
) {
    if rows * dim < PAR_MIN_ELEMS {
        with_scratch(scratch, |s| (0..rows).for_each(|r| row_fn(r, s)));
    } else {
        (0..rows)
            .into_par_iter()
            .with_min_len(8)
            .for_each_init(|| vec![0f32; scratch], |s, r| row_fn(r, s));
    }
}

/// Flat start of row `r` of a view whose rows (all but the last dimension) may be strided.
pub(super) fn row_start(v: &View, dims: &[usize], r: usize) -> usize {
    let lead = &dims[..dims.len() - 1];
    let mut idx = [0usize; 4];
    let mut rem = r;
    for (i, &d) in lead.iter().enumerate().rev() {
        idx[4 - dims.len() + i] = rem % d;
        rem /= d;
    }
    v.at(idx)
}

/// Flattens to `(rows, dim)` when the rank exceeds what a view addresses.
pub(super) fn as_2d(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.rank() <= 4 {
        Ok(t.clone())
    } else {
        let dim = *t.dims().last().unwrap_or(&1);
        t.contiguous()?.reshape(((), dim))
    }
}

pub(crate) fn gated_rms_norm(args: &GatedRmsNormArgs) -> Result<Option<Tensor>> {
    let dims = args.x.dims().to_vec();
    let dim = *dims.last().unwrap_or(&0);
    let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    if dim == 0 || rows == 0 {
        return Ok(None);
    }
    let x2 = as_2d(args.x)?;
    let z2 = args.z.map(as_2d).transpose()?;
    let vdims = x2.dims().to_vec();
    view!(x = &x2);
    view_opt!(z = z2.as_ref());
    view!(w = args.weight);
    let Some(mut out) = OutVec::new(args.x.dtype(), rows * dim) else {
        return Ok(None);
    };
    let writer = out.writer();
    let gs = args.group_size;
    let eps = args.eps as f32;
    let nbg = args.norm_before_gate;
    let tier = current_options().cpu.effective_tier();
    with_weight(&w, dim, |wf| {
        for_rows(rows, dim, 2 * dim, |r, s| {
            let (xr, zr) = s.split_at_mut(dim);
            x.load(row_start(&x, &vdims, r), xr);
            if let Some(z) = &z {
                z.load(row_start(z, &vdims, r), zr);
                zr.iter_mut().for_each(|v| *v = silu_f32(*v));
                if !nbg {
                    xr.iter_mut().zip(zr.iter()).for_each(|(x, g)| *x *= g);
                }
            }
            norm_groups(tier, xr, wf, gs, eps);
            if z.is_some() && nbg {
                xr.iter_mut().zip(zr.iter()).for_each(|(x, g)| *x *= g);
            }
            // SAFETY: row r is written by this task only.
            unsafe { writer.store(r * dim, xr) };
        })
    });
    super::record_tier("gated_rms_norm", tier);
    Ok(Some(out.into_tensor(&dims)?))
}

/// Normalises each group of `gs` values of `x` by its RMS and scales it by the matching part
/// of `w`: `x = x · (mean(x²) + eps)^-½ · w`.
///
/// Compiled for the tier's vector width on x86-64 (the crate targets baseline SSE2; same
/// operations, so the same results on every x86 tier); NEON has its own kernel
/// (`cpu/neon.rs`).
fn norm_groups(tier: CpuTier, x: &mut [f32], w: &[f32], gs: usize, eps: f32) {
    match tier {
        #[cfg(target_arch = "x86_64")]
        CpuTier::Avx512 => {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(x: &mut [f32], w: &[f32], gs: usize, eps: f32) {
                norm_groups_body(x, w, gs, eps)
            }
            // SAFETY: the tier is one this CPU supports (`CpuOptions::effective_tier`).
            unsafe { avx512(x, w, gs, eps) }
        }
        #[cfg(target_arch = "x86_64")]
        CpuTier::Avx2 => {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(x: &mut [f32], w: &[f32], gs: usize, eps: f32) {
                norm_groups_body(x, w, gs, eps)
            }
            // SAFETY: as above.
            unsafe { avx2(x, w, gs, eps) }
        }
        #[cfg(target_arch = "aarch64")]
        CpuTier::Neon => {
            for (xg, wg) in x.chunks_exact_mut(gs).zip(w.chunks_exact(gs)) {
                // SAFETY: as above (NEON).
                unsafe { super::neon::rms_scale(xg, wg, eps) }
            }
        }
        _ => norm_groups_body(x, w, gs, eps),
    }
}

#[inline(always)]
fn norm_groups_body(x: &mut [f32], w: &[f32], gs: usize, eps: f32) {
    for (xg, wg) in x.chunks_exact_mut(gs).zip(w.chunks_exact(gs)) {
        let inv = 1.0 / (sum_sq(xg) / gs as f32 + eps).sqrt();
        xg.iter_mut().zip(wg).for_each(|(x, &w)| *x = *x * inv * w);
    }
}

/// Sum of squares with independent partial sums, so the loop vectorizes.
#[inline(always)]
fn sum_sq(v: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let mut it = v.chunks_exact(L);
    for c in &mut it {
        for l in 0..L {
            acc[l] += c[l] * c[l];
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().map(|x| x * x).sum::<f32>()
}

thread_local! {
    /// This thread's f32 copy of a 16-bit norm weight, reused across calls (a decode step runs
    /// two norms per layer), apart from `with_scratch`'s buffer, which the rows use.
    static WEIGHT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Calls `f` with the weight as a contiguous f32 slice: borrowed when it already is one,
/// converted into a reused buffer otherwise (in one bulk conversion when contiguous: per element
/// it cost as much as the norm itself at decode).
fn with_weight<R>(w: &View, dim: usize, f: impl FnOnce(&[f32]) -> R) -> R {
    let contiguous = w.is_contiguous_from(1, &[dim]);
    if contiguous {
        if let Some(s) = w.f32_slice(w.at([0; 4]), dim) {
            return f(s);
        }
    }
    // Taken out of the slot for the duration, so a nested call gets a fresh buffer.
    let mut buf = WEIGHT.with(|c| std::mem::take(&mut *c.borrow_mut()));
    buf.resize(dim, 0.0);
    if contiguous {
        w.load(w.at([0; 4]), &mut buf[..dim]);
    } else {
        for (i, v) in buf[..dim].iter_mut().enumerate() {
            *v = w.get([0, 0, 0, i]);
        }
    }
    let r = f(&buf[..dim]);
    WEIGHT.with(|c| {
        let mut slot = c.borrow_mut();
        if slot.len() < buf.len() {
            *slot = buf;
        }
    });
    r
}

/// Rounds f32 values through `dtype`, as storing and reloading would.
fn round_through(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        DType::BF16 => v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
        _ => {}
    }
}

pub(crate) fn rms_norm_residual(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    residual_in_fp32: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    let dims = x.dims().to_vec();
    let dim = *dims.last().unwrap_or(&0);
    let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    if dim == 0 || rows == 0 {
        return Ok(None);
    }
    let res_dtype = if residual_in_fp32 {
        DType::F32
    } else {
        x.dtype()
    };
    let x2 = as_2d(x)?;
    let r2 = residual.map(as_2d).transpose()?;
    let vdims = x2.dims().to_vec();
    view!(xv = &x2);
    view_opt!(rv = r2.as_ref());
    view!(w = weight);
    let (Some(mut normed), Some(mut res_out)) = (
        OutVec::new(weight.dtype(), rows * dim),
        OutVec::new(res_dtype, rows * dim),
    ) else {
        return Ok(None);
    };
    let (nw, rw): (OutPtr, OutPtr) = (normed.writer(), res_out.writer());
    let eps = eps as f32;
    let tier = current_options().cpu.effective_tier();
    with_weight(&w, dim, |wf| {
        for_rows(rows, dim, 2 * dim, |r, s| {
            let (h, tmp) = s.split_at_mut(dim);
            xv.load(row_start(&xv, &vdims, r), h);
            if let Some(rv) = &rv {
                rv.load(row_start(rv, &vdims, r), tmp);
                h.iter_mut().zip(tmp.iter()).for_each(|(a, b)| *a += b);
            }
            // The norm sees the residual stream as stored.
            round_through(res_dtype, h);
            // SAFETY: row r of both outputs is written by this task only.
            unsafe { rw.store(r * dim, h) };
            norm_groups(tier, h, wf, dim, eps);
            unsafe { nw.store(r * dim, h) };
        })
    });
    super::record_tier("rms_norm_residual", tier);
    Ok(Some((
        normed.into_tensor(&dims)?,
        res_out.into_tensor(&dims)?,
    )))
}
