//! `quantized_linear` on the CPU, on this crate's Rayon pool. Reference:
//! `quantized_linear_slow` (the exactly dequantized matrix through `linear_slow`); parity in
//! `tests/cpu_quantized.rs`. Shapes: `x` `(rows, in_features)`, weight `(out_features,
//! in_features)` in ggml blocks, output `(rows, out_features)` f32.
//!
//! - **Decode** (at most [`MAX_ROWS`] rows): each weight row's blocks dotted with the activation
//!   row quantized to the format's dot type (Q8_0 for the 32-value formats, Q8_K for the
//!   K-quants, as llama.cpp does), with Candle's per-format SIMD dot products
//!   (`GgmlType::vec_dot`, AVX2 / NEON chosen at run time). Bound by the quantized bytes read.
//! - **Prefill** (more rows), Q8_0 with AVX-512 VNNI: the integer GEMM of
//!   `quantized_gemm.rs`, with the activations rounded to Q8_0 as in decode (llama.cpp rounds
//!   its prefill activations the same way).
//! - **Prefill**, other formats or CPUs: the matrix is dequantized (in parallel, one matrix at a time) to
//!   the activation dtype and multiplied by the `linear` op's tiled GEMM. Prefill is bound by
//!   arithmetic, and the f32/bf16 GEMM outruns the integer dot products available here by 3-4x
//!   on the 130m Q8_0 shape (BENCHMARKS.md, "GGUF on the CPU"); its result is the exact product
//!   with the dequantized weights, so prefill differs from decode by the decode path's
//!   activation rounding only.
//!
//! Why not Candle's `QMatMul`: it runs on Candle's own spinning thread pool, which on a 2-core
//! machine fights the Rayon workers of the other ops of the step (decode measured 4-8x slower
//! than this path under load), and on AVX-512 VNNI its repacked Q8_0 kernel rounds the
//! activations per 256 values where llama.cpp rounds per 32.
//!
//! Memory: decode holds the quantized activation rows (`rows x in_features` bytes) and the f32
//! output; prefill one dequantized matrix (`out_features x in_features` values) at a time.

use crate::options::{current_options, CpuTier};
use crate::quantized::QuantizedMatrix;
use crate::Result;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Activation rows up to which the matrix-vector path serves (decode and batched decode).
pub(crate) const MAX_ROWS: usize = 8;

/// Weight rows per task: enough bytes per task (~64 rows x a few hundred bytes) to amortise the
/// scheduling, small enough for ~8 tasks per thread on the 130m shapes.
const ROWS_PER_TASK: usize = 32;

/// `x` `(rows, in_features)` (any float dtype, any layout) times `wᵀ` → `(rows, out_features)`
/// f32; `None` when the preconditions do not hold (a format without a kernel here, blocks not
/// laid out as expected).
pub(crate) fn quantized_linear(x: &Tensor, w: &QuantizedMatrix) -> Result<Option<Tensor>> {
    let (k, n) = (w.in_features(), w.out_features());
    let rows = x.elem_count() / k.max(1);
    if rows == 0 || !w.device().is_cpu() {
        return Ok(None);
    }
    if rows > MAX_ROWS && w.ggml_dtype() == GgmlDType::Q8_0 && q8_0_gemm() {
        let data = w.data()?;
        if let Some(wb) = blocks::<BlockQ8_0>(&data, n, k) {
            let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?; // (rows * k)
            let y = super::quantized_gemm::gemm_q8_0(&xs, wb, rows, k, n);
            return Ok(Some(Tensor::from_vec(y, (rows, n), x.device())?));
        }
    }
    if rows > MAX_ROWS {
        let Some(dense) = dequantize(w)? else {
            return Ok(None);
        };
        // (out_features, in_features) in the activation dtype, through the tiled GEMM.
        let dense = dense.to_dtype(x.dtype())?;
        let x2 = x.reshape((rows, k))?;
        return Ok(Some(
            crate::linear(&x2, &dense, None)?.to_dtype(DType::F32)?,
        ));
    }
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?; // (rows * in_features)
    let data = w.data()?;
    let out = match w.ggml_dtype() {
        GgmlDType::Q8_0 if q8_0_vnni() => {
            matvec_with::<BlockQ8_0>(&xs, &data, rows, k, n, |k, w, x| {
                // SAFETY: the CPU has the features (checked by `q8_0_vnni`); both slices hold
                // k / 32 blocks (from `blocks` and the activation quantization).
                unsafe { dot_q8_0_vnni(w, x, k / 32) }
            })
        }
        GgmlDType::Q8_0 => matvec::<BlockQ8_0>(&xs, &data, rows, k, n),
        GgmlDType::Q4_0 => matvec::<BlockQ4_0>(&xs, &data, rows, k, n),
        GgmlDType::Q4_1 => matvec::<BlockQ4_1>(&xs, &data, rows, k, n),
        GgmlDType::Q5_0 => matvec::<BlockQ5_0>(&xs, &data, rows, k, n),
        GgmlDType::Q5_1 => matvec::<BlockQ5_1>(&xs, &data, rows, k, n),
        GgmlDType::Q2K => matvec::<BlockQ2K>(&xs, &data, rows, k, n),
        GgmlDType::Q3K => matvec::<BlockQ3K>(&xs, &data, rows, k, n),
        GgmlDType::Q4K => matvec::<BlockQ4K>(&xs, &data, rows, k, n),
        GgmlDType::Q5K => matvec::<BlockQ5K>(&xs, &data, rows, k, n),
        GgmlDType::Q6K => matvec::<BlockQ6K>(&xs, &data, rows, k, n),
        _ => None,
    };
    match out {
        Some(v) => Ok(Some(Tensor::from_vec(v, (rows, n), x.device())?)),
        None => Ok(None),
    }
}

/// The blocks of `bytes` as `&[T]`, if they are exactly `n * k / T::BLCK_SIZE` aligned blocks.
fn blocks<T: GgmlType>(bytes: &[u8], n: usize, k: usize) -> Option<&[T]> {
    let count = n * (k / T::BLCK_SIZE);
    let size = std::mem::size_of::<T>();
    if !k.is_multiple_of(T::BLCK_SIZE)
        || bytes.len() != count * size
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: length and alignment checked above; the bytes are Candle's own block storage of
    // this format (plain-old-data structs of integers and f16 scales).
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, count) })
}

/// The exact f32 values of `w`'s blocks, `(out_features, in_features)`, decoded in parallel.
fn dequantize(w: &QuantizedMatrix) -> Result<Option<Tensor>> {
    let (k, n) = (w.in_features(), w.out_features());
    let data = w.data()?;
    let v = match w.ggml_dtype() {
        GgmlDType::Q8_0 => decode_blocks::<BlockQ8_0>(&data, n, k),
        GgmlDType::Q4_0 => decode_blocks::<BlockQ4_0>(&data, n, k),
        GgmlDType::Q4_1 => decode_blocks::<BlockQ4_1>(&data, n, k),
        GgmlDType::Q5_0 => decode_blocks::<BlockQ5_0>(&data, n, k),
        GgmlDType::Q5_1 => decode_blocks::<BlockQ5_1>(&data, n, k),
        GgmlDType::Q2K => decode_blocks::<BlockQ2K>(&data, n, k),
        GgmlDType::Q3K => decode_blocks::<BlockQ3K>(&data, n, k),
        GgmlDType::Q4K => decode_blocks::<BlockQ4K>(&data, n, k),
        GgmlDType::Q5K => decode_blocks::<BlockQ5K>(&data, n, k),
        GgmlDType::Q6K => decode_blocks::<BlockQ6K>(&data, n, k),
        _ => None,
    };
    Ok(match v {
        Some(v) => Some(Tensor::from_vec(v, (n, k), &candle_core::Device::Cpu)?),
        None => None,
    })
}

fn decode_blocks<T: GgmlType>(bytes: &[u8], n: usize, k: usize) -> Option<Vec<f32>> {
    let w = blocks::<T>(bytes, n, k)?;
    let kb = k / T::BLCK_SIZE;
    let mut out = vec![0f32; n * k];
    out.par_chunks_mut(ROWS_PER_TASK * k)
        .zip(w.par_chunks(ROWS_PER_TASK * kb))
        .for_each(|(dst, src)| T::to_float(src, dst));
    Some(out)
}

fn matvec<T: GgmlType>(
    x: &[f32],
    bytes: &[u8],
    rows: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    matvec_with::<T>(x, bytes, rows, k, n, T::vec_dot)
}

/// [`matvec`] with the dot product of one weight row and one activation row given.
fn matvec_with<T: GgmlType>(
    x: &[f32],
    bytes: &[u8],
    rows: usize,
    k: usize,
    n: usize,
    dot: impl Fn(usize, &[T], &[T::VecDotType]) -> f32 + Sync,
) -> Option<Vec<f32>> {
    let w = blocks::<T>(bytes, n, k)?; // (n, k / B)
    let kb = k / T::BLCK_SIZE;
    if T::VecDotType::BLCK_SIZE != T::BLCK_SIZE {
        return None;
    }
    // The activation rows in the format's dot type, quantized once.
    let xq: Vec<Vec<T::VecDotType>> = x
        .chunks_exact(k)
        .map(|row| {
            let mut q = vec![T::VecDotType::zeros(); kb];
            T::VecDotType::from_float(row, &mut q);
            q
        })
        .collect();
    // (out_features, rows): each task owns whole weight rows.
    // NaN-poisoned in debug builds (the test profile): an element no task writes cannot pass.
    let init = if cfg!(debug_assertions) {
        f32::NAN
    } else {
        0.0
    };
    let mut out_t = vec![init; n * rows];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * rows)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * ROWS_PER_TASK;
            for (i, dst) in chunk.chunks_exact_mut(rows).enumerate() {
                let wr = &w[(first + i) * kb..(first + i + 1) * kb];
                for (d, xr) in dst.iter_mut().zip(&xq) {
                    *d = dot(k, wr, xr);
                }
            }
        });
    if rows == 1 {
        return Some(out_t);
    }
    let mut out = vec![0f32; rows * n]; // (rows, out_features)
    for (o, vals) in out_t.chunks_exact(rows).enumerate() {
        for (r, &v) in vals.iter().enumerate() {
            out[r * n + o] = v;
        }
    }
    Some(out)
}

/// Whether Q8_0 decode uses [`dot_q8_0_vnni`]: the options in force on this thread run the
/// AVX-512 tier with `q8_0_vnni` on, and the CPU has AVX-512 VNNI.
fn q8_0_vnni() -> bool {
    let o = current_options().cpu;
    o.q8_0_vnni && o.effective_tier() == CpuTier::Avx512 && vnni_present()
}

/// Whether the CPU has everything [`dot_q8_0_vnni`] uses (detected once).
fn vnni_present() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether Q8_0 prefill uses the VNNI GEMM of `quantized_gemm.rs` (activations rounded to Q8_0
/// like decode's) rather than the dequantized matrix through the f32 GEMM: the options in force
/// run the AVX-512 tier with `q8_0_gemm` on, and the CPU has AVX-512 VNNI.
pub(crate) fn q8_0_gemm() -> bool {
    let o = current_options().cpu;
    o.q8_0_gemm && o.effective_tier() == CpuTier::Avx512 && super::quantized_gemm::available()
}

/// `Σ_b d_w[b] d_x[b] Σ_i w[b][i] x[b][i]` over `nb` Q8_0 blocks (34 bytes each: an f16 scale,
/// then 32 signed bytes), with `vpdpbusd`: |w| as unsigned bytes times x carrying w's sign,
/// four products summed per 32-bit lane, then scaled in f32 per block. Two accumulators hide
/// the FMA latency. Same block math as llama.cpp's AVX-512 VNNI Q8_0 dot product.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn dot_q8_0_vnni(w: &[BlockQ8_0], x: &[BlockQ8_0], nb: usize) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(w.len() >= nb && x.len() >= nb);
    let (wp, xp) = (w.as_ptr() as *const u8, x.as_ptr() as *const u8);
    let scale = |p: *const u8| {
        let bits = u16::from_le_bytes([*p, *p.add(1)]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    };
    let block = |b: usize| {
        let (wb, xb) = (wp.add(b * 34), xp.add(b * 34));
        let wq = _mm256_loadu_si256(wb.add(2) as *const __m256i);
        let xq = _mm256_loadu_si256(xb.add(2) as *const __m256i);
        let prod = _mm256_dpbusd_epi32(
            _mm256_setzero_si256(),
            _mm256_sign_epi8(wq, wq), // |w| (w = -128 never occurs in Q8_0)
            _mm256_sign_epi8(xq, wq), // x with w's sign
        );
        (
            _mm256_cvtepi32_ps(prod),
            _mm256_set1_ps(scale(wb) * scale(xb)),
        )
    };
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut b = 0;
    while b + 1 < nb {
        let (p0, s0) = block(b);
        let (p1, s1) = block(b + 1);
        acc0 = _mm256_fmadd_ps(p0, s0, acc0);
        acc1 = _mm256_fmadd_ps(p1, s1, acc1);
        b += 2;
    }
    if b < nb {
        let (p0, s0) = block(b);
        acc0 = _mm256_fmadd_ps(p0, s0, acc0);
    }
    let acc = _mm256_add_ps(acc0, acc1);
    let sum4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    _mm_cvtss_f32(_mm_add_ss(sum2, _mm_shuffle_ps(sum2, sum2, 1)))
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_q8_0_vnni(_: &[BlockQ8_0], _: &[BlockQ8_0], _: usize) -> f32 {
    unreachable!("q8_0_vnni() is false off x86-64")
}

/// The Q8_0 dot product of one weight row's blocks (`w`, raw block bytes) with the activation
/// row `x` quantized to Q8_0, by this module's AVX-512 VNNI kernel and by Candle's: `None` when
/// the CPU lacks AVX-512 VNNI. For the tests of the dispatcher's two sides.
#[doc(hidden)]
pub fn q8_0_dot_both(w: &[u8], x: &[f32]) -> Option<(f32, f32)> {
    let k = x.len();
    let wb = blocks::<BlockQ8_0>(w, 1, k)?;
    let mut xq = vec![BlockQ8_0::zeros(); k / 32];
    BlockQ8_0::from_float(x, &mut xq);
    let candle = BlockQ8_0::vec_dot(k, wb, &xq);
    if !q8_0_vnni() {
        return None;
    }
    // SAFETY: features checked by q8_0_vnni; both slices hold k / 32 blocks.
    Some((unsafe { dot_q8_0_vnni(wb, &xq, k / 32) }, candle))
}

/// Whether Q8_0 prefill rows on the CPU round the activations to Q8_0 (the VNNI GEMM) rather
/// than multiply by the exactly dequantized matrix, under the options in force on this thread:
/// what a test's reference must assume.
#[doc(hidden)]
pub fn q8_0_prefill_rounds_activations() -> bool {
    q8_0_gemm()
}
