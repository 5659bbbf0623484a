//! Q8_0 prefill GEMM with AVX-512 VNNI: `y = x · wᵀ` for `rows > MAX_ROWS` activation rows and
//! a Q8_0 weight, with the activations rounded to Q8_0 blocks as llama.cpp rounds them (and as
//! this crate's decode path does), so a row gives the same value here as through the decode
//! dot product up to f32 summation order.
//!
//! Reference: the decode path's per-row dot product (`tests/cpu_quantized.rs` compares every
//! row), and `quantized_linear_slow` within the activation-rounding tolerance. Shapes: x
//! `(rows, k)` f32, weight `(n, k)` in Q8_0 blocks (34 bytes: f16 scale, 32 signed bytes), y
//! `(rows, n)` f32.
//!
//! Why: prefill is bound by arithmetic. Dequantizing to f32 and running the f32 GEMM gets 16
//! multiply-adds per cycle and core on Zen 4; `vpdpbusd` does 64 (four byte products per 32-bit
//! lane, 16 lanes). The weights are repacked per call so that a lane holds one output column:
//! for 16 columns and 4 consecutive k, 64 bytes = one `vpdpbusd` operand, against a broadcast of
//! 4 activation bytes. `vpdpbusd` multiplies unsigned by signed bytes, so the activations are
//! stored as `q + 128` and each block's integer accumulator starts at `-128 · Σ w` (exact in
//! i32), which leaves the exact integer dot product of the block; it is then scaled by the two
//! block scales in f32.
//!
//! Memory: the packed matrix (n rounded up to 32, × k bytes + 8 bytes of f32/i32 per 32
//! values), the activation bytes (`rows × k`) and their scales; the output.
//!
//! Register tile: 4 rows × 32 columns: 8 integer and 8 f32 accumulators, 2 weight vectors and a
//! broadcast, of the 32 zmm registers.

use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
use rayon::prelude::*;

/// Columns per packed tile (one zmm of i32 lanes).
const TILE: usize = 16;
/// Bytes of one packed (tile, block): 8 groups of 4 k × 16 lanes.
const TILE_BLOCK_BYTES: usize = 32 * TILE;
/// Activation rows per register tile.
const ROWS: usize = 4;
/// Rows and column pairs (of 2 tiles) per parallel task: 64 × 256 outputs, whose packed weights
/// (256 columns × k bytes) stay in L2 while the 16 row tiles pass over them.
const TASK_ROWS: usize = 64;
const TASK_PAIRS: usize = 8;

/// Q8_0 weights repacked for [`tile`]: per tile of 16 columns and block of 32 k, the bytes in
/// `vpdpbusd` order, the 16 f32 scales and the 16 `-128 · Σ w` corrections.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Packed {
    tiles: usize,
    nb: usize,
    bytes: Vec<u8>,
    scales: Vec<f32>,
    offsets: Vec<i32>,
}

/// A Q8_0 block's scale and 32 signed values. Candle keeps the fields private; the struct is
/// `repr(C)` `{ d: f16, qs: [i8; 32] }`, ggml's layout (34 bytes, checked).
fn parts(b: &BlockQ8_0) -> (f32, &[i8; 32]) {
    const { assert!(std::mem::size_of::<BlockQ8_0>() == 34) };
    let p = b as *const BlockQ8_0 as *const u8;
    // SAFETY: 34 initialised bytes: 2 of the f16 scale, then the 32 values (i8 has alignment 1).
    unsafe {
        let d = half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)]));
        (d.to_f32(), &*(p.add(2) as *const [i8; 32]))
    }
}

fn pack(w: &[BlockQ8_0], n: usize, nb: usize) -> Packed {
    // Whole pairs of tiles; the padding columns are zero weights with zero scale.
    let tiles = n.div_ceil(2 * TILE) * 2;
    let mut bytes = vec![0u8; tiles * nb * TILE_BLOCK_BYTES];
    let mut scales = vec![0f32; tiles * nb * TILE];
    let mut offsets = vec![0i32; tiles * nb * TILE];
    bytes
        .par_chunks_mut(nb * TILE_BLOCK_BYTES)
        .zip(scales.par_chunks_mut(nb * TILE))
        .zip(offsets.par_chunks_mut(nb * TILE))
        .enumerate()
        .for_each(|(t, ((bytes, scales), offsets))| {
            for j in 0..TILE {
                let c = t * TILE + j;
                if c >= n {
                    break;
                }
                for b in 0..nb {
                    let (d, qs) = parts(&w[c * nb + b]);
                    scales[b * TILE + j] = d;
                    let mut sum = 0i32;
                    for (i, &q) in qs.iter().enumerate() {
                        let (g, t4) = (i / 4, i % 4);
                        bytes[b * TILE_BLOCK_BYTES + g * 4 * TILE + j * 4 + t4] = q as u8;
                        sum += i32::from(q);
                    }
                    offsets[b * TILE + j] = -128 * sum;
                }
            }
        });
    Packed {
        tiles,
        nb,
        bytes,
        scales,
        offsets,
    }
}

/// The activation rows as `q + 128` bytes `(rows, k)` and f32 block scales `(rows, nb)`,
/// rounded exactly as Candle's (= llama.cpp's reference) Q8_0 quantizer rounds them, which the
/// decode path uses: `d = amax / 127`, `q = roundf(x / d)` (as `x * (1 / d)`), `d` kept as f16.
fn quantize_rows(x: &[f32], k: usize) -> (Vec<u8>, Vec<f32>) {
    let nb = k / 32;
    let rows = x.len() / k;
    let mut xu = vec![0u8; rows * k];
    let mut xd = vec![0f32; rows * nb];
    xu.par_chunks_mut(k)
        .zip(xd.par_chunks_mut(nb))
        .zip(x.par_chunks(k))
        .for_each(|((u, d), row)| {
            for ((u, d), xs) in u
                .chunks_exact_mut(32)
                .zip(d.iter_mut())
                .zip(row.chunks_exact(32))
            {
                let xs: &[f32; 32] = xs.try_into().expect("32 values");
                let u: &mut [u8; 32] = u.try_into().expect("32 bytes");
                // SAFETY: `available()` (asserted by the caller) includes AVX-512F.
                if !unsafe { quantize_block(xs, u, d) } {
                    quantize_block_scalar(xs, u, d);
                }
            }
        });
    (xu, xd)
}

/// Candle's scalar Q8_0 rounding of one block, for blocks with a NaN or an infinity.
fn quantize_block_scalar(xs: &[f32; 32], u: &mut [u8; 32], d: &mut f32) {
    let mut q = [BlockQ8_0::zeros()];
    BlockQ8_0::from_float(xs, &mut q);
    let (scale, qs) = parts(&q[0]);
    *d = scale;
    for (dst, &v) in u.iter_mut().zip(qs) {
        *dst = (i16::from(v) + 128) as u8;
    }
}

/// [`quantize_block_scalar`] with AVX-512: the same products `x * id` and `roundf` (truncate,
/// then step away from zero when the dropped fraction is at least one half: exact, unlike adding
/// 0.5). `false` (nothing written) when the block is not all finite.
///
/// # Safety
/// AVX-512F present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_block(xs: &[f32; 32], u: &mut [u8; 32], d: &mut f32) -> bool {
    use std::arch::x86_64::*;
    let v = [
        _mm512_loadu_ps(xs.as_ptr()),
        _mm512_loadu_ps(xs.as_ptr().add(16)),
    ];
    let a = [_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])];
    let finite = |x: __m512| _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(f32::INFINITY));
    if finite(a[0]) != 0xffff || finite(a[1]) != 0xffff {
        return false;
    }
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(a[0], a[1]));
    let scale = amax / 127.0;
    let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    *d = half::f16::from_f32(scale).to_f32();
    for (h, x) in v.iter().enumerate() {
        let p = _mm512_mul_ps(*x, _mm512_set1_ps(id));
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
        let frac = _mm512_abs_ps(_mm512_sub_ps(p, t));
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5));
        // copysign(1, p): the sign bit of p on 1.0.
        let sign = _mm512_and_si512(_mm512_castps_si512(p), _mm512_set1_epi32(i32::MIN));
        let one = _mm512_castsi512_ps(_mm512_or_si512(
            sign,
            _mm512_castps_si512(_mm512_set1_ps(1.0)),
        ));
        let q = _mm512_mask_add_ps(t, up, t, one);
        let qi = _mm512_add_epi32(_mm512_cvttps_epi32(q), _mm512_set1_epi32(128));
        _mm_storeu_si128(
            u.as_mut_ptr().add(16 * h) as *mut __m128i,
            _mm512_cvtusepi32_epi8(qi),
        );
    }
    true
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_block(_: &[f32; 32], _: &mut [u8; 32], _: &mut f32) -> bool {
    false
}

/// Whether the CPU has what [`tile`] uses.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Raw output pointer shared by tasks that write disjoint `(row, column)` ranges.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes only its own rows × columns of the output (see `gemm_q8_0`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// A method, so that closures capture the whole `Out` (Send + Sync), not its field.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `x` `(rows, k)` f32 times the Q8_0 matrix `w` `(n, k / 32 blocks)` transposed → `(rows, n)`.
/// Callers check [`available`] first.
pub(crate) fn gemm_q8_0(x: &[f32], w: &[BlockQ8_0], rows: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(available() && k.is_multiple_of(32) && x.len() == rows * k && w.len() * 32 == n * k);
    let nb = k / 32;
    let packed = pack(w, n, nb);
    let (xu, xd) = quantize_rows(x, k);
    // NaN-poisoned in debug builds (the test profile): an element no task writes cannot pass.
    let init = if cfg!(debug_assertions) {
        f32::NAN
    } else {
        0.0
    };
    let mut out = vec![init; rows * n];
    let dst = Out(out.as_mut_ptr());
    let pairs = packed.tiles / 2;
    let row_tasks = rows.div_ceil(TASK_ROWS);
    let col_tasks = pairs.div_ceil(TASK_PAIRS);
    (0..row_tasks * col_tasks).into_par_iter().for_each(|task| {
        let (rt, ct) = (task % row_tasks, task / row_tasks);
        let (r0, r1) = (rt * TASK_ROWS, ((rt + 1) * TASK_ROWS).min(rows));
        let (p0, p1) = (ct * TASK_PAIRS, ((ct + 1) * TASK_PAIRS).min(pairs));
        for p in p0..p1 {
            let mut r = r0;
            while r < r1 {
                let m = (r1 - r).min(ROWS);
                let mut acc = [[0f32; 2 * TILE]; ROWS];
                // SAFETY: `available()` was asserted; the packed and activation slices hold
                // whole tiles and rows (sizes from `pack` / `quantize_rows`).
                unsafe { tile(&packed, 2 * p, &xu[r * k..], &xd[r * nb..], k, m, &mut acc) };
                for (i, a) in acc.iter().take(m).enumerate() {
                    let c0 = 2 * p * TILE;
                    let cols = (n - c0).min(2 * TILE);
                    // SAFETY: row r + i < rows and columns c0..c0 + cols < n belong to this
                    // task alone (tasks split rows by TASK_ROWS and columns by pairs).
                    unsafe {
                        std::ptr::copy_nonoverlapping(a.as_ptr(), dst.at((r + i) * n + c0), cols)
                    };
                }
                r += m;
            }
        }
    });
    out
}

/// `m ≤ 4` activation rows (bytes `xu`, scales `xd`, each row `k` / `k / 32` long) against the
/// packed tiles `t0` and `t0 + 1` (32 columns): `acc[r][c]`.
///
/// # Safety
/// AVX-512F/BW/VNNI present; `xu` holds `m * k` bytes, `xd` `m * k / 32` scales; `t0 + 1` is a
/// tile of `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile(
    p: &Packed,
    t0: usize,
    xu: &[u8],
    xd: &[f32],
    k: usize,
    m: usize,
    acc: &mut [[f32; 2 * TILE]; ROWS],
) {
    use std::arch::x86_64::*;
    let nb = p.nb;
    debug_assert!(m <= ROWS && xu.len() >= m * k && xd.len() >= m * nb && t0 + 1 < p.tiles);
    let wb = [0, 1].map(|h| p.bytes.as_ptr().add((t0 + h) * nb * TILE_BLOCK_BYTES));
    let ws = [0, 1].map(|h| p.scales.as_ptr().add((t0 + h) * nb * TILE));
    let wo = [0, 1].map(|h| p.offsets.as_ptr().add((t0 + h) * nb * TILE));
    // Rows past `m` repeat row 0 (their results are not stored).
    let xr: [usize; ROWS] = std::array::from_fn(|r| if r < m { r } else { 0 });
    let mut facc = [[_mm512_setzero_ps(); 2]; ROWS];
    for b in 0..nb {
        let off = [0, 1].map(|h| _mm512_loadu_si512(wo[h].add(b * TILE) as *const _));
        let mut iacc = [off; ROWS];
        for g in 0..8 {
            let w = [0, 1].map(|h| {
                _mm512_loadu_si512(wb[h].add(b * TILE_BLOCK_BYTES + g * 4 * TILE) as *const _)
            });
            for r in 0..ROWS {
                let four = xu.as_ptr().add(xr[r] * k + b * 32 + g * 4) as *const i32;
                let xv = _mm512_set1_epi32(four.read_unaligned());
                iacc[r][0] = _mm512_dpbusd_epi32(iacc[r][0], xv, w[0]);
                iacc[r][1] = _mm512_dpbusd_epi32(iacc[r][1], xv, w[1]);
            }
        }
        let sw = [0, 1].map(|h| _mm512_loadu_ps(ws[h].add(b * TILE)));
        for r in 0..ROWS {
            let sx = _mm512_set1_ps(*xd.get_unchecked(xr[r] * nb + b));
            for h in 0..2 {
                let scale = _mm512_mul_ps(sw[h], sx);
                facc[r][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][h]), scale, facc[r][h]);
            }
        }
    }
    for (a, f) in acc.iter_mut().zip(&facc).take(m) {
        for (h, v) in f.iter().enumerate() {
            _mm512_storeu_ps(a.as_mut_ptr().add(h * TILE), *v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile(
    _: &Packed,
    _: usize,
    _: &[u8],
    _: &[f32],
    _: usize,
    _: usize,
    _: &mut [[f32; 2 * TILE]; ROWS],
) {
    unreachable!("available() is false off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 block quantizer gives Candle's bytes and scales: random blocks of several
    /// magnitudes, exact ties (`x / d` = k + 1/2 both signs), zeros, a lone non-zero, and blocks
    /// with NaN / ±inf (which take Candle's scalar code).
    #[test]
    fn simd_activation_rounding_equals_candles() {
        if !available() {
            return;
        }
        let mut blocks: Vec<[f32; 32]> = Vec::new();
        let mut seed = 0x9e37_79b9u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as f32 / u32::MAX as f32 - 0.5
        };
        for scale in [1e-30, 1e-3, 1.0, 7.0, 1e4, 3e38] {
            for _ in 0..50 {
                blocks.push(std::array::from_fn(|_| next() * scale));
            }
        }
        // amax 127 gives d = 1, id = 1: x = k + 0.5 is an exact tie.
        blocks.push(std::array::from_fn(|i| match i {
            0 => 127.0,
            _ => (i as f32 - 16.0) + 0.5,
        }));
        blocks.push([0.0; 32]);
        blocks.push(std::array::from_fn(|i| if i == 5 { -3.0 } else { 0.0 }));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            blocks.push(std::array::from_fn(|i| if i == 9 { bad } else { i as f32 }));
        }
        for xs in &blocks {
            let (mut u1, mut d1) = ([0u8; 32], 0f32);
            let (mut u2, mut d2) = ([0u8; 32], 0f32);
            quantize_block_scalar(xs, &mut u1, &mut d1);
            // SAFETY: available() checked.
            if !unsafe { quantize_block(xs, &mut u2, &mut d2) } {
                assert!(xs.iter().any(|x| !x.is_finite()), "{xs:?}");
                continue;
            }
            assert_eq!((u1, d1.to_bits()), (u2, d2.to_bits()), "{xs:?}");
        }
    }
}
