//! `quantized_linear` and `quantized_embedding` on CUDA (Candle's quantized CUDA kernels)
//! against their references computed on the CPU (the exactly dequantized weight through
//! `linear_slow` / a plain row select), for every block format the engine loads from GGUF, on
//! random shapes that include the real ones (mamba2-130m `in_proj` 768 → 3352, 1.3b `in_proj`
//! 2048 → 8512, the 50288-row LM head), decode rows and prefill rows. Skips without a CUDA
//! device.
//!
//! Candle's CUDA matrix-vector kernels round the activations to Q8_1 blocks (32 values, one
//! scale), the same size of rounding as the CPU's Q8_0: about 2^-8 of each block's largest |x|
//! per element, so the tolerance is `cpu_quantized.rs`'s, relative to the reference's RMS.
#![cfg(feature = "cuda")]

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use mamba2_ops::{
    quantized_embedding, quantized_embedding_slow, quantized_linear, quantized_linear_slow,
    QuantizedMatrix,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

mod support;
use support::flat;
use support::quantized::{randn, rms, tol, FORMATS};

fn cuda() -> Option<Device> {
    support::poisoned_cuda("CUDA quantized test")
}

/// One case: the matrix quantized on the CPU, copied to the GPU block for block; CUDA's output
/// against the CPU reference.
#[allow(clippy::too_many_arguments)]
fn check(
    dev: &Device,
    rng: &mut StdRng,
    ty: GgmlDType,
    dtype: DType,
    rows: &[usize],
    in_f: usize,
    out_f: usize,
    bias: bool,
) {
    let w = randn(rng, &[out_f, in_f], DType::F32);
    let q_cpu = QuantizedMatrix::quantize(&w, ty).unwrap();
    let q_gpu = q_cpu.to_device(dev).unwrap();
    let dims: Vec<usize> = rows.iter().chain([&in_f]).copied().collect();
    let x = randn(rng, &dims, dtype);
    let b = bias.then(|| randn(rng, &[out_f], dtype));
    let reference = quantized_linear_slow(&x, &q_cpu, b.as_ref()).unwrap();
    let got = quantized_linear(
        &x.to_device(dev).unwrap(),
        &q_gpu,
        b.as_ref().map(|b| b.to_device(dev).unwrap()).as_ref(),
    )
    .unwrap();
    assert!(got.device().is_cuda());
    assert_eq!(got.dims(), reference.dims());
    assert_eq!(got.dtype(), dtype);
    let (g, r) = (flat(&got), flat(&reference));
    assert!(
        g.iter().all(|v| v.is_finite()),
        "{ty:?} {dtype:?}: non-finite output"
    );
    let worst = g
        .iter()
        .zip(&r)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / rms(&r).max(1e-6);
    println!("{ty:?} {dtype:?} rows {rows:?} {in_f}->{out_f}: max |cuda - ref| = {worst:.4} x RMS");
    assert!(
        worst <= tol(dtype, r.len()),
        "{ty:?} {dtype:?} rows {rows:?} {in_f}->{out_f}: {worst:.4} x RMS > {}",
        tol(dtype, r.len())
    );
}

#[test]
fn every_format_matches_the_dequantized_reference() {
    let Some(dev) = cuda() else { return };
    let mut rng = StdRng::seed_from_u64(27);
    for ty in FORMATS {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            check(&dev, &mut rng, ty, dtype, &[1], 256, 48, false);
            check(&dev, &mut rng, ty, dtype, &[3], 512, 20, true);
            check(&dev, &mut rng, ty, dtype, &[2, 37], 768, 36, false);
        }
    }
}

#[test]
fn real_projection_shapes() {
    let Some(dev) = cuda() else { return };
    let mut rng = StdRng::seed_from_u64(28);
    for ty in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        check(&dev, &mut rng, ty, DType::BF16, &[1], 768, 3352, false);
        check(&dev, &mut rng, ty, DType::BF16, &[1, 512], 768, 3352, false);
        check(&dev, &mut rng, ty, DType::BF16, &[1], 2048, 8512, false);
        check(&dev, &mut rng, ty, DType::F32, &[1], 256, 50288, false);
    }
}

/// Load-time quantization of a matrix already on the GPU (`--quantize` with `--device cuda`):
/// the blocks are those of the CPU quantizer.
#[test]
fn quantizing_a_gpu_matrix_gives_the_cpu_blocks() {
    let Some(dev) = cuda() else { return };
    let mut rng = StdRng::seed_from_u64(30);
    for ty in [GgmlDType::Q8_0, GgmlDType::Q4K] {
        let w = randn(&mut rng, &[64, 512], DType::BF16);
        let on_gpu = QuantizedMatrix::quantize(&w.to_device(&dev).unwrap(), ty).unwrap();
        assert!(on_gpu.device().is_cuda());
        let on_cpu = QuantizedMatrix::quantize(&w, ty).unwrap();
        let back = on_gpu.to_device(&Device::Cpu).unwrap();
        assert_eq!(back.data().unwrap(), on_cpu.data().unwrap(), "{ty:?}");
    }
}

#[test]
fn embedding_rows_equal_the_dequantized_table() {
    let Some(dev) = cuda() else { return };
    let mut rng = StdRng::seed_from_u64(29);
    for ty in FORMATS {
        let table =
            QuantizedMatrix::quantize(&randn(&mut rng, &[300, 256], DType::F32), ty).unwrap();
        let ids: Vec<u32> = (0..10)
            .map(|_| rng.random_range(0..300))
            .chain([0, 299])
            .collect();
        let ids = Tensor::from_vec(ids, (3, 4), &Device::Cpu).unwrap(); // (batch, seqlen)
        let reference = quantized_embedding_slow(&ids, &table, DType::F32).unwrap();
        let got = quantized_embedding(
            &ids.to_device(&dev).unwrap(),
            &table.to_device(&dev).unwrap(),
            DType::F32,
        )
        .unwrap();
        assert!(got.device().is_cuda());
        // The same blocks decoded as d * q in f32 on both sides.
        let (g, r) = (flat(&got), flat(&reference));
        let worst = g
            .iter()
            .zip(&r)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6 * rms(&r), "{ty:?}: {worst}");
    }
}
