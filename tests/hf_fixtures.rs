//! End-to-end parity with HF transformers' Mamba2ForCausalLM on the committed fixtures
//! (`tests/fixtures/*`, made by `scripts/make_fixtures.py`): both checkpoint layouts, the
//! one-shot prefill path and the prefill-then-step path, f32 and bf16, plus the final states.

mod common;
use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use mamba2::{pipeline::load_model, Mamba2Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Max |ours - HF f32| allowed on logits, per model dtype (logit std ~1.2 on these fixtures).
/// f32: measured up to 3.2e-6. f16: up to 0.015. bf16: up to 0.076; HF's own bf16 run differs from its
/// f32 run by up to ~0.09.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 5e-5,
        DType::BF16 => 0.15,
        DType::F16 => 0.03,
        other => panic!("no tolerance for {other:?}"),
    }
}

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 5,
        "expected the committed fixtures, found {dirs:?}"
    );
    dirs
}

struct Reference {
    ids: Tensor,
    prefill_len: usize,
    tensors: HashMap<String, Tensor>,
}

fn reference(dir: &Path) -> Reference {
    let tensors =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = tensors["input_ids"].clone();
    let prefill_len = tensors["prefill_len"].to_vec1::<i64>().unwrap()[0] as usize;
    Reference {
        ids,
        prefill_len,
        tensors,
    }
}

/// The `logits_decode` path: the first `p` tokens through the chunked prefill, the rest one at a time.
fn decode_path(model: &Mamba2Model, ids: &Tensor, p: usize) -> (Tensor, mamba2::Mamba2Cache) {
    let (batch, seq) = ids.dims2().unwrap();
    let mut cache = model.new_cache(batch).unwrap();
    let mut out = vec![model
        .forward(&ids.narrow(1, 0, p).unwrap(), Some(&mut cache))
        .unwrap()];
    for t in p..seq {
        let step = model
            .step(
                &ids.narrow(1, t, 1).unwrap().squeeze(1).unwrap(),
                &mut cache,
            )
            .unwrap();
        out.push(step.unsqueeze(1).unwrap());
    }
    (Tensor::cat(&out, 1).unwrap(), cache)
}

fn check_layout(dir: &Path, layout: &str, dtype: DType) {
    common::init_kernel_options();
    let r = reference(dir);
    let files = mamba2::hub::resolve_model(dir.join(layout).to_str().unwrap(), &Default::default())
        .unwrap();
    let model = load_model(&files, dtype, &Device::Cpu).unwrap();
    let name = format!(
        "{} [{layout}, {dtype:?}]",
        dir.file_name().unwrap().to_string_lossy()
    );
    let tol = tolerance(dtype);

    let prefill = model.forward(&r.ids, None).unwrap();
    let e = max_abs_diff(&prefill, &r.tensors["logits_prefill"]);
    println!("{name}: prefill max|diff| {e:.3e}");
    assert!(
        e <= tol,
        "{name}: prefill logits differ from HF by {e} > {tol}"
    );

    let (decode, cache) = decode_path(&model, &r.ids, r.prefill_len);
    let e = max_abs_diff(&decode, &r.tensors["logits_decode"]);
    println!("{name}: decode  max|diff| {e:.3e}");
    assert!(
        e <= tol,
        "{name}: decode logits differ from HF by {e} > {tol}"
    );

    if dtype == DType::F32 {
        for i in 0..model.config().n_layer {
            let ec = max_abs_diff(cache.conv_state(i), &r.tensors[&format!("conv_state.{i}")]);
            let es = max_abs_diff(cache.ssm_state(i), &r.tensors[&format!("ssm_state.{i}")]);
            assert!(
                ec <= 1e-5 && es <= 1e-4,
                "{name}: layer {i} state differs from HF: conv {ec}, ssm {es}"
            );
        }
    }
}

#[test]
fn hf_layout_f32() {
    for dir in fixtures() {
        check_layout(&dir, "hf", DType::F32);
    }
}

#[test]
fn mamba_ssm_layout_f32() {
    for dir in fixtures() {
        check_layout(&dir, "ssm", DType::F32);
    }
}

#[test]
fn hf_layout_bf16() {
    for dir in fixtures() {
        check_layout(&dir, "hf", DType::BF16);
    }
}

#[test]
fn mamba_ssm_layout_bf16() {
    for dir in fixtures() {
        check_layout(&dir, "ssm", DType::BF16);
    }
}

#[test]
fn hf_layout_f16() {
    for dir in fixtures() {
        check_layout(&dir, "hf", DType::F16);
    }
}
