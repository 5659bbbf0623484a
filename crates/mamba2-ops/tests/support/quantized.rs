//! Shared by the quantized-op tests of every backend (`cpu_quantized.rs`, `cuda_quantized.rs`):
//! the block formats, Gaussian inputs and the activation-rounding tolerance.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng};

/// Every block format the engine loads from GGUF.
pub const FORMATS: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Largest |fast - reference| allowed over `n` outputs, as a fraction of the reference output's
/// RMS. The activation rounding (8-bit blocks scaled by the block's max |x|: an error of std
/// ~0.8 % of the input RMS per element for Gaussian inputs) gives each output an error of std
/// ~0.8 % of the output RMS, and the largest of `n` such errors is about `sqrt(2 ln n)` stds; a
/// 16-bit output adds one rounding step (f16 2^-11, bf16 2^-8) of values up to that many RMS.
pub fn tol(dtype: DType, n: usize) -> f32 {
    let tail = (2.0 * (n.max(2) as f32).ln()).sqrt();
    let out_rounding = match dtype {
        DType::F32 => 0.0,
        DType::F16 => 1.0 / 2048.0,
        DType::BF16 => 1.0 / 256.0,
        _ => unreachable!(),
    };
    tail * (0.012 + out_rounding)
}

/// Gaussian values (Box-Muller), like trained weights and activations, on the CPU in `dtype`.
pub fn randn(rng: &mut StdRng, dims: &[usize], dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

pub fn rms(v: &[f32]) -> f32 {
    (v.iter().map(|x| x * x).sum::<f32>() / v.len().max(1) as f32).sqrt()
}
