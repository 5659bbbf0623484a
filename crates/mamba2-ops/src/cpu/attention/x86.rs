//! AVX-512 kernels of the few-rows (decode) path: `S = Q Kᵀ` and `acc += P V` over a block of
//! cache positions, reading K and V in place in their own dtype (16-bit rows widened in
//! registers, as `cpu/linear/x86.rs` loads weights) with FMA and 16 lanes; head_dim tails use
//! masked loads.
//!
//! Shapes: `q`, `acc` `(ng × per_g, head_dim)` f32, rows grouped by kv head; `s`
//! `(ng × per_g, kb)` f32; K/V element `(position jj, kv head g, c)` at `base + jj·ps + g·hs + c`.

use crate::cpu::common::{prefetch_ahead, Data};
use crate::options::Prefetch;
use half::{bf16, f16};
use std::arch::x86_64::*;

/// A cache element type whose rows load as 16 f32 lanes.
trait Lanes: Copy {
    /// The lanes of `mask` from `p`, widened to f32 (the others 0).
    ///
    /// # Safety
    /// The selected lanes are readable; AVX-512F/BW/VL and F16C present.
    unsafe fn ld(p: *const Self, mask: __mmask16) -> __m512;
}

impl Lanes for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn ld(p: *const f32, mask: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }
}

impl Lanes for f16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn ld(p: *const f16, mask: __mmask16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
    }
}

impl Lanes for bf16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn ld(p: *const bf16, mask: __mmask16) -> __m512 {
        // Exact: a bf16 is the upper half of an f32.
        let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

/// How far ahead of the cache position being read the kernels prefetch, in bytes (past the
/// 4 KiB pages where the hardware prefetchers stop; the value `cpu/linear/x86.rs` measured).
const PREFETCH_BYTES: usize = 8192;

/// Lanes `c..min(c + 16, dh)`.
#[inline(always)]
fn mask(c: usize, dh: usize) -> __mmask16 {
    if dh - c >= 16 {
        0xffff
    } else {
        ((1u32 << (dh - c)) - 1) as __mmask16
    }
}

/// `out[i][p] = q_i · k_p` for four f32 rows `q` and `P` key rows `k`: `4 P` independent FMA
/// chains; each chunk of a key row is loaded once for the four query rows and each chunk of a
/// query row once for the `P` keys.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn dot4<T: Lanes, const P: usize>(
    q: [*const f32; 4],
    k: [*const T; P],
    dh: usize,
) -> [[f32; P]; 4] {
    let mut a = [[_mm512_setzero_ps(); P]; 4];
    for c in (0..dh).step_by(16) {
        let m = mask(c, dh);
        let kv = k.map(|kp| T::ld(kp.add(c), m));
        for i in 0..4 {
            let qv = _mm512_maskz_loadu_ps(m, q[i].add(c));
            for p in 0..P {
                a[i][p] = _mm512_fmadd_ps(qv, kv[p], a[i][p]);
            }
        }
    }
    let mut out = [[0f32; P]; 4];
    for i in 0..4 {
        for p in 0..P {
            out[i][p] = _mm512_reduce_add_ps(a[i][p]);
        }
    }
    out
}

/// Positions, kv heads and strides of one block of K or V, and the sizes of an item's rows.
#[derive(Clone, Copy)]
pub(super) struct Block {
    /// Flat index of `(position j0, kv head g0, 0)`.
    pub base: usize,
    /// Position stride and kv-head stride, in elements.
    pub ps: usize,
    pub hs: usize,
    /// Positions in the block.
    pub kb: usize,
    /// Kv heads, rows per kv head, head_dim.
    pub ng: usize,
    pub per_g: usize,
    pub dh: usize,
    /// Prefetch policy of the K and V streams.
    pub prefetch: Prefetch,
}

impl Block {
    /// Panics unless every element the block addresses is inside `len`.
    fn check(&self, len: usize) {
        let last = self.base + (self.kb - 1) * self.ps + (self.ng - 1) * self.hs + self.dh;
        assert!(self.kb > 0 && self.ng > 0 && self.dh > 0 && last <= len);
    }
}

/// Positions processed together by [`qk_typed`] and [`pv_typed`] (the block's tail one by one).
const POS: usize = 2;
const POS_PV: usize = 4;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn qk_typed<T: Lanes>(k: &[T], b: Block, q: &[f32], s: &mut [f32]) {
    assert!(q.len() >= b.ng * b.per_g * b.dh && s.len() >= b.ng * b.per_g * b.kb);
    b.check(k.len());
    let main = b.kb - b.kb % POS;
    for jj in (0..main).step_by(POS) {
        qk_positions::<T, POS>(k.as_ptr(), b, jj, q, s);
    }
    for jj in main..b.kb {
        qk_positions::<T, 1>(k.as_ptr(), b, jj, q, s);
    }
}

/// Scores of positions `jj..jj + P` of the block, every kv head.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn qk_positions<T: Lanes, const P: usize>(
    k: *const T,
    b: Block,
    jj: usize,
    q: &[f32],
    s: &mut [f32],
) {
    let (per_g, dh, kb) = (b.per_g, b.dh, b.kb);
    prefetch_ahead(
        b.prefetch,
        k.wrapping_add(b.base + jj * b.ps),
        P * b.ps,
        PREFETCH_BYTES,
    );
    let q = q.as_ptr();
    for g in 0..b.ng {
        let kp: [*const T; P] = std::array::from_fn(|p| k.add(b.base + (jj + p) * b.ps + g * b.hs));
        for r in (0..per_g).step_by(4) {
            let n = (per_g - r).min(4);
            // Rows past the group's last repeat its last row (computed, not stored).
            let rows = [0, 1, 2, 3].map(|i| q.add((g * per_g + r + i.min(n - 1)) * dh));
            let d = dot4(rows, kp, dh);
            for (i, di) in d.iter().enumerate().take(n) {
                for (p, &v) in di.iter().enumerate() {
                    s[(g * per_g + r + i) * kb + jj + p] = v;
                }
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn pv_typed<T: Lanes>(v: &[T], b: Block, s: &[f32], acc: &mut [f32]) {
    assert!(acc.len() >= b.ng * b.per_g * b.dh && s.len() >= b.ng * b.per_g * b.kb);
    b.check(v.len());
    let main = b.kb - b.kb % POS_PV;
    for jj in (0..main).step_by(POS_PV) {
        pv_positions::<T, POS_PV>(v.as_ptr(), b, jj, s, acc);
    }
    for jj in main..b.kb {
        pv_positions::<T, 1>(v.as_ptr(), b, jj, s, acc);
    }
}

/// `acc += P V` for positions `jj..jj + P` of the block, every kv head: each accumulator chunk
/// is loaded and stored once for the `P` positions, each V chunk widened once for four rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn pv_positions<T: Lanes, const P: usize>(
    v: *const T,
    b: Block,
    jj: usize,
    s: &[f32],
    acc: &mut [f32],
) {
    let (per_g, dh, kb) = (b.per_g, b.dh, b.kb);
    prefetch_ahead(
        b.prefetch,
        v.wrapping_add(b.base + jj * b.ps),
        P * b.ps,
        PREFETCH_BYTES,
    );
    let acc = acc.as_mut_ptr();
    for g in 0..b.ng {
        let vp: [*const T; P] = std::array::from_fn(|p| v.add(b.base + (jj + p) * b.ps + g * b.hs));
        for r0 in (g * per_g..(g + 1) * per_g).step_by(4) {
            let n = ((g + 1) * per_g - r0).min(4);
            let mut w = [[_mm512_setzero_ps(); P]; 4];
            for (i, wi) in w.iter_mut().enumerate().take(n) {
                for (p, wp) in wi.iter_mut().enumerate() {
                    *wp = _mm512_set1_ps(s[(r0 + i) * kb + jj + p]);
                }
            }
            for c in (0..dh).step_by(16) {
                let m = mask(c, dh);
                let vv = vp.map(|p| T::ld(p.add(c), m));
                for (i, wi) in w.iter().enumerate().take(n) {
                    let ptr = acc.add((r0 + i) * dh + c);
                    let mut a = _mm512_maskz_loadu_ps(m, ptr);
                    for p in 0..P {
                        a = _mm512_fmadd_ps(wi[p], vv[p], a);
                    }
                    _mm512_mask_storeu_ps(ptr, m, a);
                }
            }
        }
    }
}

/// `s[(g·per_g + r)·kb + jj] = q_(g·per_g + r) · K(jj, g)` over the block.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL, FMA and F16C (`Isa::detect() == Isa::Avx512`). Bounds are checked.
pub(super) unsafe fn qk(k: Data, b: Block, q: &[f32], s: &mut [f32]) {
    match k {
        Data::F32(d) => qk_typed(d, b, q, s),
        Data::F16(d) => qk_typed(d, b, q, s),
        Data::Bf16(d) => qk_typed(d, b, q, s),
    }
}

/// `acc_(g·per_g + r) += Σ_jj s[(g·per_g + r)·kb + jj] · V(jj, g)` over the block.
///
/// # Safety
/// As [`qk`].
pub(super) unsafe fn pv(v: Data, b: Block, s: &[f32], acc: &mut [f32]) {
    match v {
        Data::F32(d) => pv_typed(d, b, s, acc),
        Data::F16(d) => pv_typed(d, b, s, acc),
        Data::Bf16(d) => pv_typed(d, b, s, acc),
    }
}
