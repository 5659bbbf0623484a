//! `quantized_linear` for a few rows (decode) on this crate's Rayon pool: each weight row's
//! blocks dotted with the activation row quantized to the format's dot type (Q8_0 for the
//! 32-blocks, Q8_K for the K-quants, as llama.cpp does), with Candle's per-format SIMD dot
//! products (`GgmlType::vec_dot`, AVX2 / NEON chosen at run time).
//!
//! Why not Candle's `QMatMul` here: it runs on Candle's own spinning thread pool, which on a
//! 2-core machine fights the Rayon workers of the other ops of the step (decode measured 4-8x
//! slower than this path); and on AVX-512 VNNI its repacked Q8_0 kernel rounds the activations
//! per 256 values where llama.cpp rounds per 32. Prefill (many rows) keeps Candle's tiled
//! kernels, whose weight reuse across rows matters more, except for Q8_0 (see [`serves`]).
//!
//! Work: `out_features` rows split into chunks over the pool; each chunk reads its weight rows
//! once for all `rows` activation rows. Memory: the quantized activation rows (`rows x
//! in_features` bytes) and the f32 output.

use crate::quantized::QuantizedMatrix;
use crate::Result;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Activation rows up to which this path serves (decode and batched decode) for the formats
/// whose prefill keeps Candle's tiled kernels.
pub(crate) const MAX_ROWS: usize = 8;

/// Whether this path serves `rows` rows of format `ty`. Q8_0 is served at every row count (many
/// rows through [`tiled`]): Candle's repacked Q8_0 kernel (AVX-512 VNNI) rounds activations per
/// 256 values, which would make prefill differ from decode and from llama.cpp by twice
/// llama.cpp's own activation rounding (tests/gguf_fixtures.rs measured 0.10 vs 0.058 on the
/// Q8_0 fixture).
fn serves(ty: GgmlDType, rows: usize) -> bool {
    rows > 0 && (rows <= MAX_ROWS || ty == GgmlDType::Q8_0)
}

/// Weight rows per task: enough bytes per task (~64 rows x a few hundred bytes) to amortise the
/// scheduling, small enough for ~8 tasks per thread on the 130m shapes.
const ROWS_PER_TASK: usize = 32;

/// `x` `(rows, in_features)` (any float dtype, any layout) times `wᵀ` → `(rows, out_features)`
/// f32; `None` when the preconditions do not hold (too many rows, a format without a dot
/// kernel here, blocks not laid out as expected).
pub(crate) fn quantized_linear(x: &Tensor, w: &QuantizedMatrix) -> Result<Option<Tensor>> {
    let (k, n) = (w.in_features(), w.out_features());
    let rows = x.elem_count() / k.max(1);
    if !serves(w.ggml_dtype(), rows) || !w.device().is_cpu() {
        return Ok(None);
    }
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?; // (rows * in_features)
    let data = w.qtensor().data()?;
    let out = match w.ggml_dtype() {
        GgmlDType::Q8_0 if rows > MAX_ROWS => tiled::<BlockQ8_0>(&xs, &data, rows, k, n)?,
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

/// Many rows: Candle's untiled-weight kernel (`k_quants::matmul`: row tiles, four weight rows
/// per dot, its own thread pool), which quantizes the activations to the format's own dot type
/// (Q8_0 for Q8_0), unlike its repacked AVX-512 tiles.
fn tiled<T: GgmlType>(
    x: &[f32],
    bytes: &[u8],
    rows: usize,
    k: usize,
    n: usize,
) -> Result<Option<Vec<f32>>> {
    let Some(w) = blocks::<T>(bytes, n, k) else {
        return Ok(None);
    };
    let mut out = vec![0f32; rows * n]; // (rows, out_features)
    candle_core::quantized::k_quants::matmul((rows, k, n), x, w, &mut out)?;
    Ok(Some(out))
}

fn matvec<T: GgmlType>(
    x: &[f32],
    bytes: &[u8],
    rows: usize,
    k: usize,
    n: usize,
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
                    *d = T::vec_dot(k, wr, xr);
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
