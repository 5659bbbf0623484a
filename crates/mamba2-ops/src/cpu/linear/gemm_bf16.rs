//! Packed GEMM for bf16 activations and bf16 weights (prefill of a bf16 model) on AVX-512 BF16:
//! `y (rows, out) = x (rows, k) · wᵀ`, f32 accumulation, `k` even.
//!
//! Why: [`super::gemm`] widens 16-bit weights to f32 and issues one f32 FMA (16 multiply-adds)
//! per zmm instruction; `vdpbf16ps` multiplies 16 lanes of bf16 *pairs* (32 multiply-adds) per
//! instruction, and needs no widening of the weight at all: a pair `w[j][2p..2p + 2]` is one
//! 32-bit broadcast straight from the weight row. Both operands are bf16 values whose products
//! are exact in f32, and each lane adds the pair's two products in turn, so the result is the
//! f32 sum of the exact products as with widening, up to summation order (and `vdpbf16ps`
//! flushing subnormal inputs and outputs to zero).
//!
//! Layout: x is packed into panels of [`GM`] rows, `[k / 2][GM]` pairs (one u32 each),
//! zero-padded; a 32 x 12 micro-kernel keeps 24 zmm accumulators: per pair step, two x loads,
//! 12 weight-pair broadcasts, 24 `vdpbf16ps`.
//!
//! Reference: the f32 GEMM of the widened operands (`linear_slow`); tested in
//! `tests/cpu_linear.rs` and this module's unit test. Memory: the x panels of one chunk
//! ([`X_CHUNK_ROWS`] rows × `k` bf16) in the calling thread's reusable buffer; the weight is read
//! in place.

use super::X_CHUNK_ROWS;
use crate::cpu::common::{OutVec, View};
use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows per micro-tile (two vectors of 16 lanes).
const GM: usize = 32;
/// Weight rows (outputs) per micro-tile.
const GN: usize = 12;
/// Outputs per parallel work item.
const GG: usize = 4 * GN;

thread_local! {
    /// This thread's packed x panels, reused across calls.
    static X_PAIRS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Whether this CPU has the instructions of [`gemm_32x12`].
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// The pair `(v[i], v[i + 1])` as one u32, low half first (the order `vdpbf16ps` reads).
#[inline(always)]
fn pair(v: &[bf16], i: usize) -> u32 {
    u32::from(v[i].to_bits()) | (u32::from(v[i + 1].to_bits()) << 16)
}

/// The product (the caller checked [`available`] and that `k` is even). `x` `(rows, k)` bf16
/// row-major, `w` `(out_f, k)` bf16, bias `(out_f)`; results to rows `0..rows` of `out`.
pub(super) fn run(
    w: &[bf16],
    x: &[bf16],
    (rows, k, out_f): (usize, usize, usize),
    bias: Option<View<'_>>,
    out: &mut OutVec,
) {
    assert!(k.is_multiple_of(2) && w.len() >= out_f * k && x.len() >= rows * k);
    let kp = k / 2;
    let writer = out.writer();
    for c0 in (0..rows).step_by(X_CHUNK_ROWS) {
        let n = (rows - c0).min(X_CHUNK_ROWS);
        let n_panels = n.div_ceil(GM);
        let mut xt = X_PAIRS.with(|c| std::mem::take(&mut *c.borrow_mut()));
        xt.resize(n_panels * GM * kp, 0);
        // xt: (n_panels, k / 2, GM); rows past `n` are zero.
        xt.par_chunks_mut(GM * kp)
            .enumerate()
            .for_each(|(p, panel)| {
                for i in 0..GM {
                    let r = p * GM + i;
                    if r < n {
                        let src = &x[(c0 + r) * k..(c0 + r + 1) * k];
                        for q in 0..kp {
                            panel[q * GM + i] = pair(src, 2 * q);
                        }
                    } else {
                        (0..kp).for_each(|q| panel[q * GM + i] = 0);
                    }
                }
            });
        let xt_ref = &xt;
        (0..out_f.div_ceil(GG)).into_par_iter().for_each(|g| {
            let (o0, no) = (g * GG, (out_f - g * GG).min(GG));
            // Row `j` of micro-tile column `jp`; past the group's end, its last row again
            // (computed, then dropped).
            let wrow = |jp: usize, j: usize| -> *const u32 {
                let o = o0 + (jp * GN + j).min(no - 1);
                // SAFETY: row `o < out_f` lies inside `w` (asserted above); `k` even keeps each
                // row start 4-byte aligned relative to the slice, and reads are unaligned-safe.
                unsafe { w.as_ptr().add(o * k) as *const u32 }
            };
            let mut bv = [0f32; GG];
            if let Some(b) = &bias {
                b.load(b.at([0, 0, 0, o0]), &mut bv[..no]);
            }
            for p in 0..n_panels {
                let mut yb = [[0f32; GG]; GM]; // (GM, GG)
                for jp in 0..no.div_ceil(GN) {
                    let mut cm = [[0f32; GM]; GN]; // (GN, GM)
                    let rows: [*const u32; GN] = std::array::from_fn(|j| wrow(jp, j));
                    // SAFETY: `available()` was checked by the caller; the panel holds `kp`
                    // pair steps and every weight row `kp` pairs.
                    unsafe {
                        gemm_32x12(&xt_ref[p * GM * kp..(p + 1) * GM * kp], rows, kp, &mut cm)
                    };
                    for (j, col) in cm.iter().enumerate() {
                        for (i, &v) in col.iter().enumerate() {
                            yb[i][jp * GN + j] = v;
                        }
                    }
                }
                for (i, yr) in yb.iter_mut().enumerate().take((n - p * GM).min(GM)) {
                    let yr = &mut yr[..no];
                    if bias.is_some() {
                        yr.iter_mut().zip(&bv).for_each(|(y, b)| *y += b);
                    }
                    let r = c0 + p * GM + i;
                    // SAFETY: group `g` owns columns `o0..o0 + no` of every row.
                    unsafe { writer.store(r * out_f + o0, yr) };
                }
            }
        });
        X_PAIRS.with(|c| {
            let mut slot = c.borrow_mut();
            if slot.len() < xt.len() {
                *slot = xt;
            }
        });
    }
}

/// `out[j][i] = Σ_q xt[q][i] · w[j][q]` over `kp` bf16 pairs, for 32 rows `i` and 12 outputs
/// `j`: `xt` `(kp, 32)` packed pairs, `w` 12 weight rows of `kp` pairs (read unaligned).
///
/// # Safety
/// AVX-512F and AVX-512 BF16 present; `xt` holds `32 kp` pairs, every `w` row `kp`.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn gemm_32x12(xt: &[u32], w: [*const u32; GN], kp: usize, out: &mut [[f32; GM]; GN]) {
    use std::arch::x86_64::*;
    assert!(xt.len() >= GM * kp);
    let xp = xt.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 2]; GN];
    for q in 0..kp {
        let x0: __m512bh = std::mem::transmute(_mm512_loadu_si512(xp.add(q * GM) as *const _));
        let x1: __m512bh = std::mem::transmute(_mm512_loadu_si512(xp.add(q * GM + 16) as *const _));
        for (a, row) in acc.iter_mut().zip(&w) {
            let b: __m512bh =
                std::mem::transmute(_mm512_set1_epi32(row.add(q).read_unaligned() as i32));
            a[0] = _mm512_dpbf16_ps(a[0], x0, b);
            a[1] = _mm512_dpbf16_ps(a[1], x1, b);
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
        _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
    }
}
