//! Tensors of several MiB through the safetensors loader: the loader releases the mapped pages
//! of each tensor once copied (so they must load intact, also twice in a row as a tied weight
//! is), and its non-finite check works in slices of 2^20 elements (so a NaN or an inf must be
//! found in any slice, the last partial one included).

use candle_core::{DType, Device};
use mamba2::weights::Weights;
use mamba2::Error;
use safetensors::tensor::TensorView;

const N: usize = (1 << 21) + 12_345; // two whole check slices and a partial one; 8.05 MiB of f32

fn write(path: &std::path::Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(safetensors::Dtype::F32, vec![N], &bytes).unwrap();
    let file = safetensors::serialize([("backbone.embeddings.weight", view)], None).unwrap();
    std::fs::write(path, file).unwrap();
}

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 200) as f32 * 0.5 - 50.0).collect()
}

#[test]
fn large_tensors_load_intact_twice_after_their_pages_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let want = values(N);
    write(&path, &want);
    let w = Weights::from_files(&[path], &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::F32, DType::BF16] {
        let t = w.tensor("backbone.embeddings.weight", &[N], dtype).unwrap();
        let got: Vec<f32> = t.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        // The values are exact in bf16 too (multiples of 0.5 up to 50 in magnitude: 8 significant bits at most).
        assert!(got == want, "{dtype:?}: loaded values differ");
    }
}

#[test]
fn the_finite_check_finds_a_bad_value_in_every_slice() {
    let dir = tempfile::tempdir().unwrap();
    for (at, bad) in [
        (0, f32::NAN),
        ((1 << 20) - 1, f32::INFINITY),
        (1 << 20, f32::NEG_INFINITY),
        (N - 1, f32::NAN),
    ] {
        let path = dir.path().join(format!("bad{at}.safetensors"));
        let mut v = values(N);
        v[at] = bad;
        write(&path, &v);
        let w = Weights::from_files(&[path], &Device::Cpu)
            .unwrap()
            .with_finite_check(true);
        match w.tensor("backbone.embeddings.weight", &[N], DType::F32) {
            Err(Error::NonFinite { name }) => assert_eq!(name, "backbone.embeddings.weight"),
            other => panic!("{bad} at {at}: expected NonFinite, got {other:?}"),
        }
    }
    let path = dir.path().join("good.safetensors");
    write(&path, &values(N));
    let w = Weights::from_files(&[path], &Device::Cpu)
        .unwrap()
        .with_finite_check(true);
    assert!(w
        .tensor("backbone.embeddings.weight", &[N], DType::F32)
        .is_ok());
}
