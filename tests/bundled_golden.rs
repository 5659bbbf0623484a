//! The bundled model (`models/mamba2-tiny`) against HF transformers on the same weights
//! (`tests/golden`, made by `scripts/make_golden.py`): greedy generations from two prompts,
//! logits over a fixed text (prefill and step paths) and over a text longer than a chunk, in f32
//! and in the stored 16-bit dtype.

mod common;
use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use mamba2::pipeline::{bundled_model_dir, LoadOptions, TextGenerator};
use mamba2::session::{CancelToken, GenerateOptions};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

fn golden() -> (HashMap<String, Tensor>, serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let t =
        candle_core::safetensors::load(dir.join("mamba2_tiny_golden.safetensors"), &Device::Cpu)
            .expect("golden tensors");
    let meta = serde_json::from_str(
        &std::fs::read_to_string(dir.join("mamba2_tiny_golden.json")).unwrap(),
    )
    .unwrap();
    (t, meta)
}

fn generator(dtype: DType) -> TextGenerator {
    let opts = LoadOptions {
        dtype,
        ..Default::default()
    };
    TextGenerator::load(bundled_model_dir().unwrap().to_str().unwrap(), &opts)
        .expect("bundled model loads")
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

#[test]
fn greedy_generation_matches_hf() {
    let (t, meta) = golden();
    let gen = generator(DType::F32);
    for (i, p) in meta["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = p["prompt"].as_str().unwrap();
        let prompt_ids = gen.encode(prompt).unwrap();
        assert_eq!(
            prompt_ids,
            ids(&t[&format!("prompt{i}_ids")]),
            "tokenizer disagrees on {prompt:?}"
        );
        let want = ids(&t[&format!("prompt{i}_greedy_ids")]);
        assert!(want.len() >= 32);
        let mut s = gen.new_session().unwrap();
        s.feed(&prompt_ids).unwrap();
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            ..Default::default()
        };
        let got = s
            .generate(&opts, &CancelToken::new(), |_| ControlFlow::Continue(()))
            .unwrap()
            .tokens;
        assert_eq!(got, want, "greedy continuation of {prompt:?}");
    }
}

#[test]
fn logits_match_hf_in_f32() {
    let (t, _) = golden();
    let gen = generator(DType::F32);
    let model = gen.model();
    let text = Tensor::new(ids(&t["text_ids"]).as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let prefill = model.forward(&text, None).unwrap().squeeze(0).unwrap();
    let e = max_abs_diff(&prefill, &t["text_logits_f32"]);
    assert!(e < 2e-4, "prefill logits differ from HF by {e}");
    let mut cache = model.new_cache(1).unwrap();
    let steps: Vec<Tensor> = (0..text.dim(1).unwrap())
        .map(|i| {
            model
                .step(
                    &text.narrow(1, i, 1).unwrap().squeeze(1).unwrap(),
                    &mut cache,
                )
                .unwrap()
        })
        .collect();
    let e = max_abs_diff(
        &Tensor::cat(&steps, 0).unwrap(),
        &t["text_logits_f32_stepwise"],
    );
    assert!(e < 2e-4, "step logits differ from HF by {e}");
    let long = Tensor::new(ids(&t["long_text_ids"]).as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let e = max_abs_diff(
        &model.forward(&long, None).unwrap().squeeze(0).unwrap(),
        &t["long_text_logits_f32"],
    );
    assert!(e < 2e-4, "long-text logits differ from HF by {e}");
}

#[test]
fn logits_in_stored_dtype_are_as_close_as_hfs_own() {
    let (t, meta) = golden();
    let stored = match meta["stored_dtype"].as_str().unwrap() {
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        other => panic!("unexpected stored dtype {other}"),
    };
    let gen = generator(stored);
    let text = Tensor::new(ids(&t["text_ids"]).as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ours = gen
        .model()
        .forward(&text, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let hf_own = max_abs_diff(&t["text_logits_stored_dtype"], &t["text_logits_f32"]);
    let e = max_abs_diff(&ours, &t["text_logits_f32"]);
    // Tolerance: HF's own 16-bit run's distance from f32, with 50% headroom.
    assert!(
        e <= 1.5 * hf_own + 0.02,
        "{stored:?} logits differ from HF f32 by {e} (HF's own {stored:?}: {hf_own})"
    );
}
