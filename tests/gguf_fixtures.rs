//! GGUF files made by llama.cpp's own converter and quantizer (`scripts/gguf_fixtures.py`)
//! against HF transformers (float32, CPU) run with the exactly dequantized GGUF weights.
//!
//! Every `tests/fixtures/gguf/<case>/<file>.reference.safetensors` names its GGUF
//! (`<file>.gguf` beside it), the token ids, the prefill length and two references: `logits`
//! (HF on the dequantized weights) and `logits_act_quant` (the same with llama.cpp's 8-bit
//! activation rounding at the inputs of the quantized products, which this engine's quantized
//! kernels also do). The tolerances are the script's, derived from llama.cpp's own distance to
//! these references on the same files and ids (see tests/fixtures/README.md). Each file is run
//! as a one-shot prefill and as a prefill of `prefill_len` tokens followed by token-by-token
//! decode, in f32 and bf16 activations.

mod common;
use candle_core::{DType, Device, Tensor};
use mamba2::gguf::GgufFile;
use mamba2::Mamba2Model;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

struct Reference {
    gguf: PathBuf,
    ids: Tensor,    // (1, seq) u32
    logits: Tensor, // (1, seq, rows) f32
    act_quant: Option<Tensor>,
    prefill_len: usize,
    tol: HashMap<String, f32>,
}

fn references() -> Vec<Reference> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let mut out = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for dir in dirs.into_iter().filter(|d| d.is_dir()) {
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files {
            let Some(stem) = f
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .strip_suffix(".reference.safetensors")
            else {
                continue;
            };
            let bytes = std::fs::read(&f).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let meta = meta.metadata().clone().unwrap_or_default();
            let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
            let tol: HashMap<String, f32> =
                serde_json::from_str::<HashMap<String, f64>>(&meta["tolerances"])
                    .unwrap()
                    .into_iter()
                    .map(|(k, v)| (k, v as f32))
                    .collect();
            out.push(Reference {
                gguf: dir.join(format!("{stem}.gguf")),
                ids: tensors["input_ids"].to_dtype(DType::U32).unwrap(),
                logits: tensors["logits"].to_dtype(DType::F32).unwrap(),
                act_quant: tensors
                    .get("logits_act_quant")
                    .map(|t| t.to_dtype(DType::F32).unwrap()),
                prefill_len: tensors["prefill_len"]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<i64>()
                    .unwrap()[0] as usize,
                tol,
            });
        }
    }
    assert!(
        out.len() >= 3,
        "expected the GGUF fixtures under {}",
        root.display()
    );
    out
}

/// Logits of a one-shot forward, and of prefill + token-by-token decode, `(1, seq, rows)`.
fn both_paths(model: &Mamba2Model, ids: &Tensor, prefill_len: usize) -> (Tensor, Tensor) {
    let oneshot = model.forward(ids, None).unwrap();
    let seq = ids.dim(1).unwrap();
    let mut cache = model.new_cache(1).unwrap();
    let mut parts = vec![model
        .forward(&ids.narrow(1, 0, prefill_len).unwrap(), Some(&mut cache))
        .unwrap()];
    for t in prefill_len..seq {
        let id = ids.narrow(1, t, 1).unwrap().squeeze(1).unwrap(); // (1)
        parts.push(model.step(&id, &mut cache).unwrap().unsqueeze(1).unwrap());
    }
    (oneshot, Tensor::cat(&parts, 1).unwrap())
}

#[test]
fn gguf_files_match_hf_on_the_dequantized_weights() {
    for r in references() {
        let file = GgufFile::open(&r.gguf).unwrap();
        let quantized = r.act_quant.is_some();
        let model = Mamba2Model::from_gguf(&file, DType::F32, &Device::Cpu, None).unwrap();
        assert_eq!(
            model.quantization().is_some(),
            quantized,
            "{}",
            r.gguf.display()
        );
        let (oneshot, stepped) = both_paths(&model, &r.ids, r.prefill_len);
        for (path, got) in [("one-shot", &oneshot), ("prefill+decode", &stepped)] {
            let name = r.gguf.display();
            eprintln!(
                "{name} {path}: |ours - HF dequantized| {:.2e}{}",
                common::max_abs_diff(got, &r.logits),
                r.act_quant.as_ref().map_or(String::new(), |aq| format!(
                    ", |ours - HF act-quant| {:.2e}",
                    common::max_abs_diff(got, aq)
                ))
            );
            match &r.act_quant {
                // A float GGUF: HF's own logits at f32 tolerance.
                None => {
                    let d = common::max_abs_diff(got, &r.logits);
                    let tol = r.tol["logits_f32_math"];
                    assert!(d <= tol, "{name} {path}: max |ours - HF| = {d} > {tol}");
                }
                // Quantized: the same activation rounding as llama.cpp (Q8_0 blocks for the
                // 32-value formats, Q8_K for the K-quants), then HF's math.
                Some(aq) => {
                    let d = common::max_abs_diff(got, aq);
                    let tol = r.tol["logits_act_quant_llama_math"];
                    assert!(d <= tol, "{name} {path}: |ours - HF act-quant| {d} > {tol}");
                    let d = common::max_abs_diff(got, &r.logits);
                    let tol = r.tol["logits_any_cpu_math"];
                    assert!(
                        d <= tol,
                        "{name} {path}: max |ours - HF dequantized| = {d} > {tol}"
                    );
                }
            }
        }
        // bf16 activations on the same file: within a bf16 distance of HF (the residual and
        // state stay f32; 0.25 as for the safetensors fixtures).
        let model = Mamba2Model::from_gguf(&file, DType::BF16, &Device::Cpu, None).unwrap();
        let (oneshot, stepped) = both_paths(&model, &r.ids, r.prefill_len);
        for got in [&oneshot, &stepped] {
            let d = common::max_abs_diff(got, &r.logits);
            assert!(
                d <= 0.25,
                "{} bf16: max |ours - HF| = {d}",
                r.gguf.display()
            );
        }
    }
}
