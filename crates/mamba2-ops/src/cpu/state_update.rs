//! CPU selective state update (one decode token), in place on the f32 state.
//!
//! Reference: [`crate::state_update::selective_state_update_slow`]. Shapes: state
//! `(batch, nheads, headdim, d_state)` f32 contiguous; x, z `(batch, nheads, headdim)`; dt
//! `(batch, nheads)`; B, C `(batch, ngroups, d_state)`.
//!
//! One pass over the state per (batch, head) task: each state row is decayed, gets `dt x B`,
//! is written back and dotted with C while still in registers; the D skip and the gate are applied
//! to the finished row before it is stored. B and C are converted to f32 once per group in this
//! thread's scratch (reused across tokens), per-task operands live on the stack, so the only
//! allocation of a step is the output tensor.

use super::common::{
    overlaps, prefetch_ahead, silu_f32, softplus_f32, view, view_opt, with_scratch, OutVec, View,
};
use crate::options::{current_options, CpuTier, Prefetch};
use crate::{Result, SsdParams, StateUpdateArgs};
use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};
use rayon::prelude::*;

/// Stack buffers bound headdim and d_state on the fast path (released models: 64 and 128).
const MAX_DIM: usize = 256;
/// How far ahead of the state row being updated [`head_rows`] prefetches: the state (786 KB per
/// layer at 130m, 19 MB per token) is streamed once per decode token like the weights, and the
/// following rows are the next ones this thread updates (heads are contiguous).
const STATE_PREFETCH_BYTES: usize = 8192;
/// Accumulator lanes of the C dot product: independent partial sums let the loop vectorize.
const LANES: usize = 16;

struct StateUpdate<'a> {
    x: View<'a>,
    dt: View<'a>,
    a: View<'a>,
    d: Option<View<'a>>,
    z: Option<View<'a>>,
    dt_bias: Option<View<'a>>,
    /// B and C of every (batch, group), f32: `(batch, ngroups, 2, d_state)`.
    bc: &'a [f32],
    params: SsdParams,
    tier: CpuTier,
    prefetch: Prefetch,
    dims: (usize, usize, usize, usize, usize), // (batch, nheads, headdim, ngroups, d_state)
    out: std::cell::RefCell<OutVec>,
}

impl InplaceOp1 for StateUpdate<'_> {
    fn name(&self) -> &'static str {
        "selective_state_update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(buf) = storage else {
            candle_core::bail!("selective_state_update: state must be f32");
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("state must be contiguous".into()))?;
        let (_batch, nheads, p, ngroups, n) = self.dims;
        let heads_per_group = nheads / ngroups;
        let (lo, hi) = self.params.dt_limit;
        let clamp = lo > 0.0 || hi < f64::INFINITY;
        let (lo, hi) = (lo as f32, hi.min(f32::MAX as f64) as f32);
        let mut out = self.out.borrow_mut();
        let writer = out.writer();
        // Capture the fields, not `self`: the output cell is not `Sync`.
        let Self {
            x,
            dt,
            a,
            d,
            z,
            dt_bias,
            bc,
            params,
            ..
        } = self;
        let tiers = (self.tier, self.prefetch);
        buf[start..end]
            .par_chunks_mut(p * n)
            .enumerate()
            .with_min_len(4)
            .for_each(|(bh, st)| {
                let (bi, h) = (bh / nheads, bh % nheads);
                let g = h / heads_per_group;
                let bc = &bc[(bi * ngroups + g) * 2 * n..(bi * ngroups + g + 1) * 2 * n];
                let (bv, cv) = bc.split_at(n);
                let mut dtv =
                    dt.get([0, 0, bi, h]) + dt_bias.as_ref().map_or(0.0, |v| v.get([0, 0, 0, h]));
                if params.dt_softplus {
                    dtv = softplus_f32(dtv);
                }
                if clamp {
                    dtv = dtv.clamp(lo, hi);
                }
                let decay = (dtv * a.get([0, 0, 0, h])).exp();
                let mut xs = [0f32; MAX_DIM];
                let xs = &mut xs[..p];
                x.load(x.at([0, bi, h, 0]), xs);
                let mut y = [0f32; MAX_DIM];
                let y = &mut y[..p];
                head_rows(tiers, st, n, xs, (dtv, decay), (bv, cv), y);
                if let Some(d) = d {
                    let d_h = d.get([0, 0, 0, h]);
                    y.iter_mut()
                        .zip(xs.iter())
                        .for_each(|(y, &x)| *y += d_h * x);
                }
                if let Some(z) = z {
                    // x is no longer needed: reuse its buffer for z.
                    z.load(z.at([0, bi, h, 0]), xs);
                    y.iter_mut()
                        .zip(xs.iter())
                        .for_each(|(y, &z)| *y *= silu_f32(z));
                }
                // SAFETY: row (bi, h) is written by this task only.
                unsafe { writer.store(bh * p, y) };
            });
        Ok(())
    }
}

/// The state rows of one head, `st` `(headdim, d_state)`: each row is decayed, gets `dt x B`, is
/// written back and dotted with C while in registers; `y[j]` = that dot product.
///
/// Why several compilations of one body: the crate is built for the baseline x86-64 target
/// (SSE2), and this loop is a third of a decode step's non-projection time; compiled with
/// AVX-512 (AVX2) it runs on 16 (8) lanes. Same operations in the same order (no FMA
/// contraction), so every x86 tier gives bit-identical results. NEON has its own kernel
/// (`cpu/neon.rs`), with fused multiply-adds.
#[allow(clippy::too_many_arguments)]
fn head_rows(
    (tier, pf): (CpuTier, Prefetch),
    st: &mut [f32],
    n: usize,
    xs: &[f32],
    (dtv, decay): (f32, f32),
    (bv, cv): (&[f32], &[f32]),
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    type Args<'a> = (&'a [f32], &'a [f32]);
    match tier {
        #[cfg(target_arch = "x86_64")]
        CpuTier::Avx512 => {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(
                pf: Prefetch,
                st: &mut [f32],
                n: usize,
                xs: &[f32],
                dd: (f32, f32),
                bc: Args,
                y: &mut [f32],
            ) {
                head_rows_body(pf, st, n, xs, dd, bc, y)
            }
            // SAFETY: the tier is one this CPU supports (`CpuOptions::effective_tier`).
            unsafe { avx512(pf, st, n, xs, (dtv, decay), (bv, cv), y) }
        }
        #[cfg(target_arch = "x86_64")]
        CpuTier::Avx2 => {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(
                pf: Prefetch,
                st: &mut [f32],
                n: usize,
                xs: &[f32],
                dd: (f32, f32),
                bc: Args,
                y: &mut [f32],
            ) {
                head_rows_body(pf, st, n, xs, dd, bc, y)
            }
            // SAFETY: as above.
            unsafe { avx2(pf, st, n, xs, (dtv, decay), (bv, cv), y) }
        }
        #[cfg(target_arch = "aarch64")]
        CpuTier::Neon => {
            for (j, row) in st.chunks_exact_mut(n).enumerate() {
                // SAFETY: as above (NEON).
                y[j] = unsafe { super::neon::state_row(row, xs[j] * dtv, decay, bv, cv) };
            }
        }
        _ => head_rows_body(pf, st, n, xs, (dtv, decay), (bv, cv), y),
    }
}

#[inline(always)]
fn head_rows_body(
    pf: Prefetch,
    st: &mut [f32],
    n: usize,
    xs: &[f32],
    (dtv, decay): (f32, f32),
    (bv, cv): (&[f32], &[f32]),
    y: &mut [f32],
) {
    for (j, row) in st.chunks_exact_mut(n).enumerate() {
        prefetch_ahead(pf, row.as_ptr(), n, STATE_PREFETCH_BYTES);
        let xdt = xs[j] * dtv;
        let mut acc = [0f32; LANES];
        let mut rows = row.chunks_exact_mut(LANES);
        let mut bs = bv.chunks_exact(LANES);
        let mut cs = cv.chunks_exact(LANES);
        for ((r, b), c) in (&mut rows).zip(&mut bs).zip(&mut cs) {
            for l in 0..LANES {
                let v = r[l] * decay + xdt * b[l];
                r[l] = v;
                acc[l] += v * c[l];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        let tail = rows.into_remainder();
        for ((r, &b), &c) in tail.iter_mut().zip(bs.remainder()).zip(cs.remainder()) {
            let v = *r * decay + xdt * b;
            *r = v;
            sum += v * c;
        }
        y[j] = sum;
    }
}

pub(crate) fn selective_state_update(
    args: &StateUpdateArgs,
    params: &SsdParams,
) -> Result<Option<Tensor>> {
    let (batch, nheads, p) = args.x.dims3()?;
    let (_, ngroups, n) = args.b.dims3()?;
    if p > MAX_DIM || n > MAX_DIM {
        return Ok(None);
    }
    let state_range = {
        let (g, l) = args.state.storage_and_layout();
        match View::new(&g, l) {
            Some(v) => v.addr_range(),
            None => return Ok(None),
        }
    };
    view!(x = args.x);
    view!(dt = args.dt);
    view!(a = args.a);
    view!(b = args.b);
    view!(c = args.c);
    view_opt!(d = args.d);
    view_opt!(z = args.z);
    view_opt!(dt_bias = args.dt_bias);
    // Read guards on a tensor sharing the state's storage would deadlock the write lock taken by
    // the in-place op: such calls take the reference path.
    let all = [Some(&x), Some(&dt), Some(&a), Some(&b), Some(&c)];
    let opt = [d.as_ref(), z.as_ref(), dt_bias.as_ref()];
    if all
        .iter()
        .chain(opt.iter())
        .flatten()
        .any(|v| overlaps(&v.addr_range(), &state_range))
    {
        return Ok(None);
    }
    let Some(out) = OutVec::new(args.x.dtype(), batch * nheads * p) else {
        return Ok(None);
    };
    let opts = current_options().cpu;
    let tier = opts.effective_tier();
    let out = with_scratch(
        batch * ngroups * 2 * n,
        |bc| -> candle_core::Result<OutVec> {
            for bi in 0..batch {
                for g in 0..ngroups {
                    let dst = &mut bc[(bi * ngroups + g) * 2 * n..(bi * ngroups + g + 1) * 2 * n];
                    let (db, dc) = dst.split_at_mut(n);
                    b.load(b.at([0, bi, g, 0]), db);
                    c.load(c.at([0, bi, g, 0]), dc);
                }
            }
            let op = StateUpdate {
                x,
                dt,
                a,
                d,
                z,
                dt_bias,
                bc,
                params: *params,
                tier,
                prefetch: opts.prefetch,
                dims: (batch, nheads, p, ngroups, n),
                out: std::cell::RefCell::new(out),
            };
            args.state.inplace_op1(&op)?;
            Ok(op.out.into_inner())
        },
    )?;
    super::record_tier("selective_state_update", tier);
    Ok(Some(out.into_tensor(&[batch, nheads, p])?))
}
