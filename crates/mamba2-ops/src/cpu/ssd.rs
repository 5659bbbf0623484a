//! CPU SSD chunked scan (prefill).
//!
//! Reference: [`crate::ssd::ssd_chunk_scan_slow`]. Shapes: x, z `(batch, seqlen, nheads, headdim)`;
//! dt `(batch, seqlen, nheads)`; B, C `(batch, seqlen, ngroups, d_state)`; state
//! `(batch, nheads, headdim, d_state)` f32.
//!
//! Chunks are processed one after another; inside a chunk the work is split over rayon tasks:
//! 1. per (batch, group): load B and C of the chunk as f32 and form `CB = C Bᵀ` (q×q, GEMM) once
//!    for all the heads of the group;
//! 2. per (batch, head), with `s` the within-chunk cumulative sum of `dt A`:
//!    - `y  = (CB ∘ exp(s_i - s_j) [j <= i]) · (dt x)`                         (GEMM q×q×headdim)
//!    - `y += (exp(s) ∘ C) · stateᵀ` (the state entering the chunk)            (GEMM q×d_state×headdim)
//!    - `state = exp(s_last) state + (exp(s_last - s) ∘ dt x)ᵀ · B`            (GEMM headdim×q×d_state)
//!    - `y += D x`, `y *= silu(z)`, stored in the output dtype.
//!
//! Scratch per task is O(q·(q + headdim + d_state)); per group O(q·(q + d_state)); nothing grows
//! with the sequence length except the output. The state lives in the returned final-state
//! buffer from the start, so there is no state copy per chunk.
//!
//! `seq_idx` is supported: with run indices r (a new run at each change of id), the mask also
//! requires `r_i == r_j`, the entering state only reaches rows of the run that was active before
//! the chunk, and the carried state restarts at the start of the chunk's last run.

use super::common::{exp_f32, gemm_f32, run_ids, softplus_f32, view, view_opt, OutVec};
use crate::ssd::{validate, SsdDims};
use crate::{Result, SsdArgs, SsdParams};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Largest chunk the CPU path uses, whatever `params.chunk_size` says (the result does not depend
/// on the chunk length up to rounding). 128 keeps the q×q mask (64 KiB) and the per-head
/// operands in L2 and costs fewer flops per token than 256.
const MAX_CHUNK: usize = 128;

struct HeadScratch {
    dt: Vec<f32>,      // (q)
    s: Vec<f32>,       // (q) within-chunk cumsum of dt·A
    mask: Vec<f32>,    // (q, q)
    xdt: Vec<f32>,     // (q, headdim)
    xw: Vec<f32>,      // (q, headdim) dt x weighted by the decay to the chunk end
    y: Vec<f32>,       // (q, headdim)
    c_decay: Vec<f32>, // (q, d_state)
    row: Vec<f32>,     // (headdim)
}

impl HeadScratch {
    fn new(q: usize, p: usize, n: usize) -> Self {
        Self {
            dt: vec![0.0; q],
            s: vec![0.0; q],
            mask: vec![0.0; q * q],
            xdt: vec![0.0; q * p],
            xw: vec![0.0; q * p],
            y: vec![0.0; q * p],
            c_decay: vec![0.0; q * n],
            row: vec![0.0; p],
        }
    }
}

/// Per (batch, group) operands of the current chunk.
struct GroupChunk {
    b: Vec<f32>,  // (q, d_state)
    c: Vec<f32>,  // (q, d_state)
    cb: Vec<f32>, // (q, q)
}

pub(crate) fn ssd_chunk_scan(
    args: &SsdArgs,
    params: &SsdParams,
) -> Result<Option<(Tensor, Tensor)>> {
    let SsdDims {
        batch,
        seqlen,
        nheads,
        headdim: p,
        d_state: n,
    } = validate(args, params)?;
    let ngroups = args.b.dim(2)?;
    let heads_per_group = nheads / ngroups;
    let q_max = params.chunk_size.min(MAX_CHUNK);
    let nchunks = seqlen.div_ceil(q_max);

    view!(x = args.x);
    view!(dt = args.dt);
    view!(a = args.a);
    view!(b = args.b);
    view!(c = args.c);
    view_opt!(d = args.d);
    view_opt!(z = args.z);
    view_opt!(dt_bias = args.dt_bias);
    let runs = run_ids(args.seq_idx)?;

    let Some(mut y_out) = OutVec::new(args.x.dtype(), batch * seqlen * nheads * p) else {
        return Ok(None);
    };
    let y_ptr = y_out.writer();
    // The state lives here from the start: (batch, nheads, headdim, d_state).
    let mut state: Vec<f32> = match args.initial_state {
        Some(s) => s.flatten_all()?.to_vec1::<f32>()?,
        None => vec![0.0; batch * nheads * p * n],
    };
    let mut groups: Vec<GroupChunk> = (0..batch * ngroups)
        .map(|_| GroupChunk {
            b: vec![0.0; q_max * n],
            c: vec![0.0; q_max * n],
            cb: vec![0.0; q_max * q_max],
        })
        .collect();
    let (lo, hi) = params.dt_limit;
    let clamp = lo > 0.0 || hi < f64::INFINITY;
    let (lo, hi) = (lo as f32, hi.min(f32::MAX as f64) as f32);

    for ci in 0..nchunks {
        let t0 = ci * q_max;
        let q = q_max.min(seqlen - t0);

        // 1. B, C and CB per (batch, group).
        groups.par_iter_mut().enumerate().for_each(|(bg, gc)| {
            let (bi, g) = (bg / ngroups, bg % ngroups);
            for t in 0..q {
                b.load(b.at([bi, t0 + t, g, 0]), &mut gc.b[t * n..(t + 1) * n]);
                c.load(c.at([bi, t0 + t, g, 0]), &mut gc.c[t * n..(t + 1) * n]);
            }
            // cb (q×q) = C (q×n) · Bᵀ (n×q)
            gemm_f32(
                (q, q, n),
                &mut gc.cb,
                (q, 1),
                None,
                &gc.c,
                (n, 1),
                &gc.b,
                (1, n),
                1.0,
            );
        });

        // 2. Everything per (batch, head); each task owns its state slice.
        let groups = &groups;
        let runs = runs.as_ref();
        let wide = wide_vectors();
        state
            .par_chunks_mut(p * n)
            .enumerate()
            .with_min_len(2)
            .for_each_init(
                || HeadScratch::new(q_max, p, n),
                |sc, (bh, st)| {
                    let (bi, h) = (bh / nheads, bh % nheads);
                    let gc = &groups[bi * ngroups + h / heads_per_group];
                    let a_h = a.get([0, 0, 0, h]);
                    let bias = dt_bias.map_or(0.0, |v| v.get([0, 0, 0, h]));
                    // Within-chunk runs: the run active before the chunk (owner of the entering
                    // state) and each row's run.
                    let run = |t: usize| runs.map_or(0, |r| r[bi][t]);
                    let run_before = if t0 == 0 { run(0) } else { run(t0 - 1) };

                    // dt and its cumulative decay; the sum is carried in f64 so that exp(s_i - s_j)
                    // stays accurate in long chunks.
                    let mut acc = 0f64;
                    for t in 0..q {
                        let mut v = dt.get([0, bi, t0 + t, h]) + bias;
                        if params.dt_softplus {
                            v = softplus_f32(v);
                        }
                        if clamp {
                            v = v.clamp(lo, hi);
                        }
                        sc.dt[t] = v;
                        acc += (v * a_h) as f64;
                        sc.s[t] = acc as f32;
                    }
                    for t in 0..q {
                        let row = &mut sc.xdt[t * p..(t + 1) * p];
                        x.load(x.at([bi, t0 + t, h, 0]), row);
                        let dtv = sc.dt[t];
                        row.iter_mut().for_each(|v| *v *= dtv);
                    }

                    // y = (CB ∘ L) · (dt x), L[i, j] = exp(s_i - s_j) for j <= i in the same run.
                    decay_mask(wide, q, &sc.s, &gc.cb, &mut sc.mask);
                    if runs.is_some() {
                        for i in 0..q {
                            let ri = run(t0 + i);
                            let m = &mut sc.mask[i * q..i * q + i + 1];
                            for (j, mv) in m.iter_mut().enumerate() {
                                if run(t0 + j) != ri {
                                    *mv = 0.0;
                                }
                            }
                        }
                    }
                    gemm_f32(
                        (q, p, q),
                        &mut sc.y,
                        (p, 1),
                        None,
                        &sc.mask,
                        (q, 1),
                        &sc.xdt,
                        (p, 1),
                        1.0,
                    );

                    // y += (exp(s) ∘ C) · stateᵀ for the rows still in the run of the state.
                    let state_nonzero = st.iter().any(|&v| v != 0.0);
                    if state_nonzero {
                        for i in 0..q {
                            let w = if run(t0 + i) == run_before {
                                exp_f32(sc.s[i])
                            } else {
                                0.0
                            };
                            let src = &gc.c[i * n..(i + 1) * n];
                            let dst = &mut sc.c_decay[i * n..(i + 1) * n];
                            dst.iter_mut().zip(src).for_each(|(d, &cv)| *d = cv * w);
                        }
                        // stateᵀ (n×p): element (k, j) = st[j * n + k]
                        gemm_f32(
                            (q, p, n),
                            &mut sc.y,
                            (p, 1),
                            Some(1.0),
                            &sc.c_decay,
                            (n, 1),
                            st,
                            (1, n),
                            1.0,
                        );
                    }

                    // state = exp(s_last) state + (w ∘ dt x)ᵀ · B, w_t = exp(s_last - s_t), only
                    // over the chunk's last run; the old state survives only if that run is the
                    // one that owned it.
                    let s_last = sc.s[q - 1];
                    let r_last = run(t0 + q - 1);
                    for t in 0..q {
                        let w = if run(t0 + t) == r_last {
                            exp_f32(s_last - sc.s[t])
                        } else {
                            0.0
                        };
                        let src = &sc.xdt[t * p..(t + 1) * p];
                        let dst = &mut sc.xw[t * p..(t + 1) * p];
                        dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v * w);
                    }
                    let keep = if r_last == run_before {
                        Some(exp_f32(s_last))
                    } else {
                        None
                    };
                    // (w ∘ dt x)ᵀ (p×q): element (j, t) = xw[t * p + j]
                    gemm_f32(
                        (p, n, q),
                        st,
                        (n, 1),
                        keep,
                        &sc.xw,
                        (1, p),
                        &gc.b,
                        (n, 1),
                        1.0,
                    );

                    // D skip, gate, store.
                    let d_h = d.map(|v| v.get([0, 0, 0, h]));
                    for i in 0..q {
                        let yr = &mut sc.y[i * p..(i + 1) * p];
                        if let Some(d_h) = d_h {
                            // dt x / dt = x would lose the dt = 0 case: reload x.
                            x.load(x.at([bi, t0 + i, h, 0]), &mut sc.row);
                            yr.iter_mut()
                                .zip(&sc.row)
                                .for_each(|(y, &xv)| *y += d_h * xv);
                        }
                        if let Some(z) = z {
                            z.load(z.at([bi, t0 + i, h, 0]), &mut sc.row);
                            yr.iter_mut()
                                .zip(&sc.row)
                                .for_each(|(y, &zv)| *y *= super::common::silu_f32(zv));
                        }
                        let off = ((bi * seqlen + t0 + i) * nheads + h) * p;
                        // SAFETY: row (bi, t0 + i, h) is written by this task only.
                        unsafe { y_ptr.store(off, yr) };
                    }
                },
            );
    }
    let y = y_out.into_tensor(&[batch, seqlen, nheads, p])?;
    let final_state = Tensor::from_vec(state, (batch, nheads, p, n), &candle_core::Device::Cpu)?;
    debug_assert_eq!(final_state.dtype(), DType::F32);
    Ok(Some((y, final_state)))
}

/// Whether the tier in force runs [`decay_mask`] with 512-bit vectors (read once per call).
fn wide_vectors() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::options::current_options().cpu.effective_tier() == crate::options::CpuTier::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The chunk's decayed `C Bᵀ`: `mask[i][j] = cb[i][j] · exp(s_i - s_j)` for `j <= i`, 0 above;
/// `cb`, `mask` `(q, q)`, `s` `(q)` the cumulative `dt · A`.
///
/// Why two compilations of one body: the crate is built for the baseline x86-64 target (SSE2),
/// and these q²/2 exponentials per head and chunk were ~8% of a 512-token f32 prefill; compiled
/// with AVX-512, `exp_f32` runs on 16 lanes. Same operations, so the same results.
fn decay_mask(wide: bool, q: usize, s: &[f32], cb: &[f32], mask: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if wide {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(q: usize, s: &[f32], cb: &[f32], mask: &mut [f32]) {
            decay_mask_body(q, s, cb, mask)
        }
        // SAFETY: `wide` comes from `wide_vectors`: the AVX-512 tier, which this CPU supports.
        return unsafe { avx512(q, s, cb, mask) };
    }
    let _ = wide;
    decay_mask_body(q, s, cb, mask)
}

#[inline(always)]
fn decay_mask_body(q: usize, s: &[f32], cb: &[f32], mask: &mut [f32]) {
    for i in 0..q {
        let si = s[i];
        let m = &mut mask[i * q..(i + 1) * q];
        let cb = &cb[i * q..i * q + i + 1];
        for ((mv, &cbv), &sj) in m[..i + 1].iter_mut().zip(cb).zip(&s[..i + 1]) {
            *mv = cbv * exp_f32(si - sj);
        }
        m[i + 1..].iter_mut().for_each(|v| *v = 0.0);
    }
}
