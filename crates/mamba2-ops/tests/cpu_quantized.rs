//! `quantized_linear` and `quantized_embedding` (Candle's quantized kernels) against their
//! references (the exactly dequantized weight through `linear_slow` / a plain row select), for
//! every block format the engine loads from GGUF, on random shapes that include the real
//! projection shapes (mamba2-130m `in_proj` 768 → 3352, `out_proj` 1536 → 768, the 50288-row LM
//! head; 1.3b `in_proj` 2048 → 8512), decode rows (1) and prefill rows.
//!
//! Decode rows (up to 8) quantize the activations to 8-bit blocks (Q8_0 or Q8_K) before the
//! integer dot products, so they differ from the reference by that rounding: about 2^-8 of each
//! block's largest |x| per element, which over `in_features` terms of random sign grows like
//! `sqrt(in_features)`. Prefill rows multiply by the exactly dequantized matrix. The tolerance is
//! relative to the RMS of the reference output, per activation dtype (a 16-bit output adds its
//! own rounding).

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use mamba2_ops::{
    fast_path_count, quantized_embedding, quantized_embedding_slow, quantized_linear,
    quantized_linear_slow, quantized_linear_with, Backend, OpError, QuantizedMatrix,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

mod support;
use support::flat;
use support::quantized::{randn, rms, tol, FORMATS};

/// One case in one format and dtype: the fast path is taken and matches the reference.
fn check(
    rng: &mut StdRng,
    ty: GgmlDType,
    dtype: DType,
    rows: &[usize],
    in_f: usize,
    out_f: usize,
    bias: bool,
) {
    let w = randn(rng, &[out_f, in_f], DType::F32);
    let q = QuantizedMatrix::quantize(&w, ty).unwrap();
    let x = randn(
        rng,
        rows.iter()
            .chain([&in_f])
            .copied()
            .collect::<Vec<_>>()
            .as_slice(),
        dtype,
    );
    let b = bias.then(|| randn(rng, &[out_f], dtype));
    support::init_options();
    let before = fast_path_count("quantized_linear");
    let fast = quantized_linear(&x, &q, b.as_ref()).unwrap();
    assert_eq!(
        fast_path_count("quantized_linear"),
        before + 1,
        "{ty:?}: fast path not taken"
    );
    let reference = quantized_linear_slow(&x, &q, b.as_ref()).unwrap();
    assert_eq!(fast.dims(), reference.dims());
    assert_eq!(fast.dtype(), dtype);
    let (f, r) = (flat(&fast), flat(&reference));
    assert!(
        f.iter().all(|v| v.is_finite()),
        "{ty:?} {dtype:?}: non-finite output"
    );
    let scale = rms(&r).max(1e-6);
    let worst = f
        .iter()
        .zip(&r)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale;
    assert!(
        worst <= tol(dtype, r.len()),
        "{ty:?} {dtype:?} rows {rows:?} {in_f}->{out_f}: max |fast - ref| = {worst:.4} x RMS > {}",
        tol(dtype, r.len())
    );
}

#[test]
fn every_format_matches_the_dequantized_reference() {
    let mut rng = StdRng::seed_from_u64(17);
    for ty in FORMATS {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // Decode (one row), a batch of rows with a bias, prefill rows in (batch, seqlen).
            check(&mut rng, ty, dtype, &[1], 256, 48, false);
            check(&mut rng, ty, dtype, &[3], 512, 20, true);
            check(&mut rng, ty, dtype, &[2, 37], 768, 36, false);
        }
    }
}

#[test]
fn real_projection_shapes() {
    let mut rng = StdRng::seed_from_u64(18);
    // mamba2-130m in_proj / out_proj (decode and a prefill slice), 1.3b in_proj at decode.
    for ty in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        check(&mut rng, ty, DType::F32, &[1], 768, 3352, false);
        check(&mut rng, ty, DType::BF16, &[1, 64], 768, 3352, false);
        check(&mut rng, ty, DType::F32, &[1], 1536, 768, false);
        check(&mut rng, ty, DType::F32, &[1], 2048, 8512, false);
    }
}

#[test]
fn lm_head_rows_of_the_released_vocabulary() {
    let mut rng = StdRng::seed_from_u64(19);
    for ty in [GgmlDType::Q8_0, GgmlDType::Q6K] {
        check(&mut rng, ty, DType::F32, &[1], 256, 50288, false);
    }
}

#[test]
fn embedding_rows_equal_the_dequantized_table() {
    let mut rng = StdRng::seed_from_u64(20);
    for ty in FORMATS {
        let table =
            QuantizedMatrix::quantize(&randn(&mut rng, &[300, 256], DType::F32), ty).unwrap();
        let ids: Vec<u32> = (0..10)
            .map(|_| rng.random_range(0..300))
            .chain([0, 299])
            .collect();
        let ids = Tensor::from_vec(ids, (3, 4), &Device::Cpu).unwrap(); // (batch, seqlen)
        for dtype in [DType::F32, DType::BF16] {
            let before = fast_path_count("quantized_embedding");
            let fast = quantized_embedding(&ids, &table, dtype).unwrap();
            assert_eq!(fast_path_count("quantized_embedding"), before + 1);
            let reference = quantized_embedding_slow(&ids, &table, dtype).unwrap();
            assert_eq!(fast.dims(), &[3, 4, 256]);
            // Both decode the same blocks: identical values.
            assert_eq!(flat(&fast), flat(&reference), "{ty:?} {dtype:?}");
        }
    }
}

#[test]
fn reference_backend_and_float_formats_take_the_reference() {
    let mut rng = StdRng::seed_from_u64(21);
    let x = randn(&mut rng, &[2, 256], DType::F32);
    let q = QuantizedMatrix::quantize(&randn(&mut rng, &[16, 256], DType::F32), GgmlDType::Q8_0)
        .unwrap();
    let before = fast_path_count("quantized_linear");
    let forced = quantized_linear_with(&x, &q, None, Backend::Reference).unwrap();
    assert_eq!(fast_path_count("quantized_linear"), before);
    assert_eq!(
        flat(&forced),
        flat(&quantized_linear_slow(&x, &q, None).unwrap())
    );
    // An F16 "quantized" matrix: Candle would dequantize it anyway, so the reference runs.
    let h = QuantizedMatrix::quantize(&randn(&mut rng, &[16, 256], DType::F32), GgmlDType::F16)
        .unwrap();
    let y = quantized_linear(&x, &h, None).unwrap();
    assert_eq!(fast_path_count("quantized_linear"), before);
    assert_eq!(y.dims(), &[2, 16]);
}

/// Q4_1 / Q5_0 / Q5_1 rows of an odd number of blocks (32 or 96 values): Candle's dot products
/// take blocks in pairs, so these take the reference, with the reference's result.
#[test]
fn odd_block_counts_take_the_reference() {
    let mut rng = StdRng::seed_from_u64(24);
    for ty in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1] {
        for k in [32, 96] {
            let q = QuantizedMatrix::quantize(&randn(&mut rng, &[8, k], DType::F32), ty).unwrap();
            for rows in [1, 20] {
                let x = randn(&mut rng, &[rows, k], DType::F32);
                let before = fast_path_count("quantized_linear");
                let y = quantized_linear(&x, &q, None).unwrap();
                assert_eq!(fast_path_count("quantized_linear"), before, "{ty:?} k {k}");
                assert_eq!(
                    flat(&y),
                    flat(&quantized_linear_slow(&x, &q, None).unwrap())
                );
            }
        }
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    let mut rng = StdRng::seed_from_u64(22);
    let q = QuantizedMatrix::quantize(&randn(&mut rng, &[16, 256], DType::F32), GgmlDType::Q4K)
        .unwrap();
    // in_features mismatch
    let x = randn(&mut rng, &[2, 128], DType::F32);
    assert!(matches!(
        quantized_linear(&x, &q, None),
        Err(OpError::Shape { arg: "x", .. })
    ));
    // integer activations
    let xi = Tensor::zeros((2, 256), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        quantized_linear(&xi, &q, None),
        Err(OpError::Dtype { .. })
    ));
    // wrong bias length
    let x = randn(&mut rng, &[2, 256], DType::F32);
    let b = randn(&mut rng, &[15], DType::F32);
    assert!(matches!(
        quantized_linear(&x, &q, Some(&b)),
        Err(OpError::Shape { arg: "bias", .. })
    ));
    // a row length that is not a multiple of the block size
    let w = randn(&mut rng, &[4, 100], DType::F32);
    assert!(matches!(
        QuantizedMatrix::quantize(&w, GgmlDType::Q8_0),
        Err(OpError::Shape { .. })
    ));
    // ids past the table, and non-u32 ids
    let ids = Tensor::new(&[16u32], &Device::Cpu).unwrap();
    assert!(matches!(
        quantized_embedding(&ids, &q, DType::F32),
        Err(OpError::Param { .. })
    ));
    let ids = Tensor::new(&[1i64], &Device::Cpu).unwrap();
    assert!(matches!(
        quantized_embedding(&ids, &q, DType::F32),
        Err(OpError::Dtype { .. })
    ));
}

/// The two CPU paths: decode rows (up to 8) depend on their own input row only, so a row
/// computed alone equals the same row in a batch of 8; prefill rows (more than 8) multiply by
/// the exactly dequantized matrix, so they equal the reference to f32 rounding. The model's
/// decode = prefill invariance rests on both.
#[test]
fn decode_rows_are_independent_and_prefill_rows_are_exact() {
    let mut rng = StdRng::seed_from_u64(23);
    let max_diff = |a: &Tensor, b: &Tensor| {
        flat(a)
            .iter()
            .zip(flat(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    for ty in FORMATS {
        let q = QuantizedMatrix::quantize(&randn(&mut rng, &[72, 512], DType::F32), ty).unwrap();
        let x = randn(&mut rng, &[8, 512], DType::F32);
        let batch = quantized_linear(&x, &q, None).unwrap();
        for r in [0, 3, 7] {
            let one = quantized_linear(&x.narrow(0, r, 1).unwrap(), &q, None).unwrap();
            let d = max_diff(&batch.narrow(0, r, 1).unwrap(), &one);
            assert_eq!(d, 0.0, "{ty:?} decode row {r}");
        }
        let x = randn(&mut rng, &[26, 512], DType::F32);
        let fast = quantized_linear(&x, &q, None).unwrap();
        let reference = quantized_linear_slow(&x, &q, None).unwrap();
        let scale = rms(&flat(&reference));
        let d = max_diff(&fast, &reference) / scale;
        if ty == GgmlDType::Q8_0 && mamba2_ops::q8_0_prefill_rounds_activations() {
            // The VNNI GEMM rounds the activations as decode does: within the rounding's
            // tolerance of the exact product, and each row equal to its decode value.
            assert!(
                d <= tol(DType::F32, 26 * 72),
                "{ty:?} prefill rows: {d} x RMS"
            );
            for r in [0, 1, 4, 13, 24, 25] {
                let one = quantized_linear(&x.narrow(0, r, 1).unwrap(), &q, None).unwrap();
                let e = max_diff(&fast.narrow(0, r, 1).unwrap(), &one) / scale;
                assert!(
                    e <= 1e-6,
                    "Q8_0 prefill row {r} vs its decode value: {e} x RMS"
                );
            }
        } else {
            assert!(d <= 1e-5, "{ty:?} prefill rows: {d} x RMS");
        }
    }
}

/// The Q8_0 prefill GEMM against the decode path row by row, over shapes that cover a partial
/// row tile (rows % 4), a partial column pair (n % 32), several tasks each way (rows > 64,
/// n > 256) and the real 130m `in_proj` width; f32 and bf16 activations.
#[test]
fn q8_0_prefill_rows_equal_their_decode_values() {
    if !mamba2_ops::q8_0_prefill_rounds_activations() {
        eprintln!("no AVX-512 VNNI here (or switched off): Q8_0 prefill is the dequantized GEMM");
        return;
    }
    let mut rng = StdRng::seed_from_u64(26);
    for (rows, k, n) in [(9, 64, 5), (70, 256, 300), (13, 768, 3352), (130, 96, 33)] {
        for dtype in [DType::F32, DType::BF16] {
            let q =
                QuantizedMatrix::quantize(&randn(&mut rng, &[n, k], DType::F32), GgmlDType::Q8_0)
                    .unwrap();
            let x = randn(&mut rng, &[rows, k], dtype);
            let before = fast_path_count("quantized_linear");
            let fast = quantized_linear(&x, &q, None).unwrap();
            assert_eq!(fast_path_count("quantized_linear"), before + 1);
            let f = flat(&fast);
            assert!(
                f.iter().all(|v| v.is_finite()),
                "unwritten or non-finite outputs"
            );
            let scale = rms(&f).max(1e-6);
            for r in 0..rows {
                let one = flat(&quantized_linear(&x.narrow(0, r, 1).unwrap(), &q, None).unwrap());
                let e = f[r * n..(r + 1) * n]
                    .iter()
                    .zip(&one)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max)
                    / scale;
                // f32: the same block products summed in another order (the error grows like
                // the square root of the block count); bf16 outputs: both round the same f32
                // value, up to one bf16 step apart.
                let bound = match dtype {
                    DType::BF16 => 1.0 / 128.0,
                    _ => 1e-6 * ((k / 32) as f32).sqrt(),
                };
                assert!(
                    e <= bound,
                    "rows {rows} k {k} n {n} {dtype:?}: row {r} {e} x RMS"
                );
            }
        }
    }
}

/// Q8_0 decode's two dot products: the AVX-512 VNNI kernel (taken when the CPU has it) and
/// Candle's AVX2 one (`MAMBA2_CPU_Q8_0_VNNI=0`, or a CPU without VNNI) give the same value up to
/// f32 summation order, for odd and even block counts. Skips where the CPU lacks VNNI.
#[test]
fn q8_0_vnni_dot_equals_candles() {
    let mut rng = StdRng::seed_from_u64(25);
    for k in [32, 64, 96, 768, 1536, 2048] {
        let w = QuantizedMatrix::quantize(&randn(&mut rng, &[1, k], DType::F32), GgmlDType::Q8_0)
            .unwrap();
        let bytes = w.data().unwrap().to_vec();
        let x = flat(&randn(&mut rng, &[k], DType::F32));
        let Some((vnni, candle)) = mamba2_ops::q8_0_dot_both(&bytes, &x) else {
            eprintln!("no AVX-512 VNNI here: the Candle side is covered by the other tests");
            return;
        };
        let tol = 1e-5 * (k as f32).sqrt() * candle.abs().max(1.0);
        assert!(
            (vnni - candle).abs() <= tol,
            "k {k}: vnni {vnni} vs candle {candle}"
        );
    }
}
