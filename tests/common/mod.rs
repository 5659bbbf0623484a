//! Helpers shared by the end-to-end tests.

use candle_core::Tensor;

/// Largest absolute elementwise difference of two tensors of the same shape (as f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a.to_dtype(candle_core::DType::F32).unwrap()
        - b.to_dtype(candle_core::DType::F32).unwrap())
    .unwrap();
    d.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Installs the kernel options of this test binary once: the defaults overridden by the
/// environment (`MAMBA2_CPU_TIER=avx2` runs every CPU fast path on the AVX2 kernels; see
/// `mamba2_ops::options::ENV_VARS`). The test harness is the edge where the environment is read.
#[allow(dead_code)]
pub fn init_kernel_options() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let opts = mamba2_ops::options::KernelOptions::from_env().expect("kernel options");
        mamba2_ops::options::set_process_options(opts).expect("set once");
    });
}
