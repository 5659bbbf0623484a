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
