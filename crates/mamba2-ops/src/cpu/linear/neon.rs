//! The NEON tiles of the linear (aarch64): 4 f32 lanes per vector, fused multiply-adds. 16-bit
//! weights are widened in registers: bf16 by a 16-bit shift (`shll`), f16 by `fcvtl` (base
//! Advanced SIMD; Rust's f16 intrinsics are not stable yet, so it is one line of assembly).
//! Register budget of the largest tile (4 x 4): 16 accumulators + 4 weight + 1 x vector of the
//! 32 NEON registers.

use super::{unroll, Tiles, Widen, MW};
use crate::options::Prefetch;
use half::{bf16, f16};
use std::arch::aarch64::*;

#[inline]
#[target_feature(enable = "neon")]
unsafe fn ld_f32(p: *const f32) -> float32x4_t {
    vld1q_f32(p)
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn ld_f16(p: *const f16) -> float32x4_t {
    let h = vld1_u16(p as *const u16);
    let out: float32x4_t;
    // SAFETY (of the asm): a register-to-register conversion; no memory, flags or stack.
    std::arch::asm!(
        "fcvtl {o:v}.4s, {i:v}.4h",
        o = lateout(vreg) out,
        i = in(vreg) h,
        options(pure, nomem, nostack, preserves_flags)
    );
    out
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn ld_bf16(p: *const bf16) -> float32x4_t {
    vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p as *const u16)))
}

macro_rules! neon_tile {
    ($name:ident, $t:ty, $load:ident) => {
        /// NEON tile (see [`super::TileFn`]); the last `k % 4` elements are summed scalar. No
        /// software prefetch (the policy is x86's).
        ///
        /// # Safety
        /// Pointers valid for `k` reads; NEON present.
        #[target_feature(enable = "neon")]
        pub(super) unsafe fn $name<const M: usize, const N: usize>(
            w: [*const $t; M],
            x: [*const f32; N],
            k: usize,
            _: Prefetch,
        ) -> [[f32; M]; N] {
            let u_n = unroll(M);
            let mut acc = [[[vdupq_n_f32(0.0); 4]; M]; N];
            macro_rules! step {
                ($i:expr, $u_n:expr) => {{
                    for u in 0..$u_n {
                        let mut wv = [vdupq_n_f32(0.0); M];
                        for m in 0..M {
                            wv[m] = $load(w[m].add($i + 4 * u));
                        }
                        for r in 0..N {
                            let xv = vld1q_f32(x[r].add($i + 4 * u));
                            for m in 0..M {
                                acc[r][m][u] = vfmaq_f32(acc[r][m][u], xv, wv[m]);
                            }
                        }
                    }
                }};
            }
            let wide = 4 * u_n;
            let main = k - k % wide;
            let mut i = 0;
            while i < main {
                step!(i, u_n);
                i += wide;
            }
            while i + 4 <= k {
                step!(i, 1);
                i += 4;
            }
            let mut out = [[0f32; M]; N];
            for r in 0..N {
                for m in 0..M {
                    let mut v = acc[r][m][0];
                    for u in 1..u_n {
                        v = vaddq_f32(v, acc[r][m][u]);
                    }
                    let mut s = vaddvq_f32(v);
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
neon_tile!(tile_neon_f32, f32, ld_f32);
neon_tile!(tile_neon_f16, f16, ld_f16);
neon_tile!(tile_neon_bf16, bf16, ld_bf16);

pub(super) fn neon_f32() -> Tiles<f32> {
    tiles!(tile_neon_f32)
}
pub(super) fn neon_f16() -> Tiles<f16> {
    tiles!(tile_neon_f16)
}
pub(super) fn neon_bf16() -> Tiles<bf16> {
    tiles!(tile_neon_bf16)
}
