//! The AVX-512 and AVX2 tiles. One macro writes the loop of each family; the dtypes differ
//! only in how a vector of weights is loaded and widened to f32.

use super::{unroll, Tiles, Widen, MW};
use crate::cpu::common::prefetch_ahead;
use crate::options::Prefetch;
use half::{bf16, f16};
use std::arch::x86_64::*;

// ------------------------------------------------------------------ AVX-512, 16 lanes

/// 16 f32 weights (`mask` selects the lanes read; the others are 0).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn ld512_f32(p: *const f32, mask: __mmask16) -> __m512 {
    _mm512_maskz_loadu_ps(mask, p)
}

/// 16 f16 weights widened by `vcvtph2ps`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn ld512_f16(p: *const f16, mask: __mmask16) -> __m512 {
    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
}

/// 16 bf16 weights widened exactly: a bf16 is the upper half of an f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn ld512_bf16(p: *const bf16, mask: __mmask16) -> __m512 {
    let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

/// How far ahead of the weight row being read the streaming tiles (`M = 1`) prefetch, in
/// bytes, unless the prefetch policy ([`Prefetch`], whose default sets its own distance) says
/// otherwise. Rows of a weight matrix are contiguous, so this runs on into the
/// following rows (which the same thread streams next: work items are consecutive row blocks).
/// Why prefetch at all: at decode the weight stream is the whole cost, and the hardware
/// prefetchers stop at 4 KiB page boundaries.
const PREFETCH_BYTES: usize = 8192;

macro_rules! avx512_tile {
    ($name:ident, $t:ty, $load:ident) => {
        /// AVX-512 tile (see [`super::TileFn`]); the tail of `k` uses masked loads.
        ///
        /// # Safety
        /// Pointers valid for `k` reads; AVX-512F/BW/VL, FMA and F16C present.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
        pub(super) unsafe fn $name<const M: usize, const N: usize>(
            w: [*const $t; M],
            x: [*const f32; N],
            k: usize,
            pf: Prefetch,
        ) -> [[f32; M]; N] {
            let u_n = unroll(M);
            let mut acc = [[[_mm512_setzero_ps(); 4]; M]; N];
            // `u_n` 16-lane steps from element `i`; lanes outside `mask` read nothing and
            // add 0.
            macro_rules! step {
                ($i:expr, $u_n:expr, $mask:expr) => {{
                    for u in 0..$u_n {
                        let mut wv = [_mm512_setzero_ps(); M];
                        for m in 0..M {
                            wv[m] = $load(w[m].add($i + 16 * u), $mask);
                        }
                        for r in 0..N {
                            let xv = _mm512_maskz_loadu_ps($mask, x[r].add($i + 16 * u));
                            for m in 0..M {
                                acc[r][m][u] = _mm512_fmadd_ps(xv, wv[m], acc[r][m][u]);
                            }
                        }
                    }
                }};
            }
            let wide = 16 * u_n;
            let main = k - k % wide;
            let mut i = 0;
            while i < main {
                if M == 1 {
                    prefetch_ahead(pf, w[0].wrapping_add(i), wide, PREFETCH_BYTES);
                }
                step!(i, u_n, 0xffff);
                i += wide;
            }
            while i + 16 <= k {
                step!(i, 1, 0xffff);
                i += 16;
            }
            if i < k {
                step!(i, 1, (1u16 << (k - i)) - 1);
            }
            let mut out = [[0f32; M]; N];
            for r in 0..N {
                for m in 0..M {
                    let mut v = acc[r][m][0];
                    for u in 1..u_n {
                        v = _mm512_add_ps(v, acc[r][m][u]);
                    }
                    out[r][m] = _mm512_reduce_add_ps(v);
                }
            }
            out
        }
    };
}
avx512_tile!(tile512_f32, f32, ld512_f32);
avx512_tile!(tile512_f16, f16, ld512_f16);
avx512_tile!(tile512_bf16, bf16, ld512_bf16);

// ------------------------------------------------------------------ packed GEMM

/// `out[j][i] = Σ_kk xt[kk][i] · w[j][kk]` for 32 rows `i` and 12 outputs `j`: `xt`
/// `(k, 32)` packed k-major (see [`super::gemm`]), `w` 12 f32 weight rows of `k`.
/// 24 accumulators; per k two x loads and 12 broadcasts, each weight row read sequentially.
///
/// # Safety
/// AVX-512F and FMA present; every `w` row valid for `k` reads.
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn gemm_32x12(
    xt: &[f32],
    w: [*const f32; 12],
    k: usize,
    out: &mut [[f32; 32]; 12],
) {
    assert!(xt.len() >= 32 * k);
    let xp = xt.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 2]; 12];
    for kk in 0..k {
        let x0 = _mm512_loadu_ps(xp.add(kk * 32));
        let x1 = _mm512_loadu_ps(xp.add(kk * 32 + 16));
        for (a, row) in acc.iter_mut().zip(&w) {
            let b = _mm512_set1_ps(*row.add(kk));
            a[0] = _mm512_fmadd_ps(x0, b, a[0]);
            a[1] = _mm512_fmadd_ps(x1, b, a[1]);
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
        _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
    }
}

// ------------------------------------------------------------------ AVX2, 8 lanes

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld256_f32(p: *const f32) -> __m256 {
    _mm256_loadu_ps(p)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld256_f16(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld256_bf16(p: *const bf16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

macro_rules! avx2_tile {
    ($name:ident, $t:ty, $load:ident) => {
        /// AVX2 tile (see [`super::TileFn`]); the last `k % 8` elements are summed scalar.
        ///
        /// # Safety
        /// Pointers valid for `k` reads; AVX2, FMA and F16C present.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn $name<const M: usize, const N: usize>(
            w: [*const $t; M],
            x: [*const f32; N],
            k: usize,
            _: Prefetch,
        ) -> [[f32; M]; N] {
            let u_n = unroll(M);
            let mut acc = [[[_mm256_setzero_ps(); 4]; M]; N];
            macro_rules! step {
                ($i:expr, $u_n:expr) => {{
                    for u in 0..$u_n {
                        let mut wv = [_mm256_setzero_ps(); M];
                        for m in 0..M {
                            wv[m] = $load(w[m].add($i + 8 * u));
                        }
                        for r in 0..N {
                            let xv = _mm256_loadu_ps(x[r].add($i + 8 * u));
                            for m in 0..M {
                                acc[r][m][u] = _mm256_fmadd_ps(xv, wv[m], acc[r][m][u]);
                            }
                        }
                    }
                }};
            }
            let wide = 8 * u_n;
            let main = k - k % wide;
            let mut i = 0;
            while i < main {
                step!(i, u_n);
                i += wide;
            }
            while i + 8 <= k {
                step!(i, 1);
                i += 8;
            }
            let mut out = [[0f32; M]; N];
            for r in 0..N {
                for m in 0..M {
                    let mut v = acc[r][m][0];
                    for u in 1..u_n {
                        v = _mm256_add_ps(v, acc[r][m][u]);
                    }
                    let mut s = hsum256(v);
                    for j in i..k {
                        s += *x[r].add(j) * Widen::widen(*w[m].add(j));
                    }
                    out[r][m] = s;
                }
            }
            out
        }
    };
}
avx2_tile!(tile256_f32, f32, ld256_f32);
avx2_tile!(tile256_f16, f16, ld256_f16);
avx2_tile!(tile256_bf16, bf16, ld256_bf16);

pub(super) fn avx512_f32() -> Tiles<f32> {
    tiles!(tile512_f32)
}
pub(super) fn avx512_f16() -> Tiles<f16> {
    tiles!(tile512_f16)
}
pub(super) fn avx512_bf16() -> Tiles<bf16> {
    tiles!(tile512_bf16)
}
pub(super) fn avx2_f32() -> Tiles<f32> {
    tiles!(tile256_f32)
}
pub(super) fn avx2_f16() -> Tiles<f16> {
    tiles!(tile256_f16)
}
pub(super) fn avx2_bf16() -> Tiles<bf16> {
    tiles!(tile256_bf16)
}
