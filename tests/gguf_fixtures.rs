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
use candle_core::quantized::GgmlDType;
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

/// Logits `(1, seq, rows)` of the three paths: one forward over the whole sequence; a prefill
/// of `prefill_len` tokens then token-by-token decode; token-by-token decode from the start.
fn paths(model: &Mamba2Model, ids: &Tensor, prefill_len: usize) -> [Tensor; 3] {
    let oneshot = model.forward(ids, None).unwrap();
    let seq = ids.dim(1).unwrap();
    let decode_from = |start: usize| {
        let mut cache = model.new_cache(1).unwrap();
        let mut parts = Vec::new();
        if start > 0 {
            let prefix = ids.narrow(1, 0, start).unwrap();
            parts.push(model.forward(&prefix, Some(&mut cache)).unwrap());
        }
        for t in start..seq {
            let id = ids.narrow(1, t, 1).unwrap().squeeze(1).unwrap(); // (1)
            parts.push(model.step(&id, &mut cache).unwrap().unsqueeze(1).unwrap());
        }
        Tensor::cat(&parts, 1).unwrap()
    };
    [oneshot, decode_from(prefill_len), decode_from(0)]
}

fn check(name: &str, what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let d = common::max_abs_diff(got, want);
    eprintln!("{name} {what}: {d:.2e} (tol {tol})");
    assert!(
        d <= tol,
        "{name} {what}: max |ours - reference| = {d} > {tol}"
    );
}

/// Prefill (many rows) multiplies by the exactly dequantized weights in f32 (except Q8_0 on a
/// CPU with AVX-512 VNNI, whose integer GEMM rounds the activations like decode), so it is held to
/// HF's dequantized logits at f32 tolerance. Decode rows round the activations to 8-bit blocks
/// as llama.cpp does (Q8_0 for the 32-value formats, Q8_K for the K-quants): token-by-token
/// decode from the start is held to HF with that rounding (`logits_act_quant`) at the tolerance
/// derived from llama.cpp's own distance; decode after an exact prefill mixes the two and is held
/// to the dequantized logits at twice llama.cpp's distance (`logits_any_cpu_math`).
#[test]
fn gguf_files_match_hf_on_the_dequantized_weights() {
    for r in references() {
        let file = GgufFile::open(&r.gguf).unwrap();
        let name = r.gguf.display().to_string();
        let model = Mamba2Model::from_gguf(&file, DType::F32, &Device::Cpu, None).unwrap();
        assert_eq!(
            model.quantization().is_some(),
            r.act_quant.is_some(),
            "{name}"
        );
        let [oneshot, prefill_decode, decode] = paths(&model, &r.ids, r.prefill_len);
        let f32_tol = r.tol["logits_f32_math"];
        let p = r.prefill_len;
        let seq = r.ids.dim(1).unwrap();
        let head = |t: &Tensor| t.narrow(1, 0, p).unwrap();
        let tail = |t: &Tensor| t.narrow(1, p, seq - p).unwrap();
        // Q8_0 prefill through the VNNI GEMM rounds the activations as decode does (and as
        // llama.cpp's prefill does): every path is then held to the act-quant reference.
        if model.quantization() == Some(GgmlDType::Q8_0)
            && mamba2_ops::q8_0_prefill_rounds_activations()
        {
            let aq = r
                .act_quant
                .as_ref()
                .expect("a quantized file has logits_act_quant");
            let aq_tol = r.tol["logits_act_quant_llama_math"];
            check(&name, "one-shot vs HF act-quant", &oneshot, aq, aq_tol);
            check(
                &name,
                "prefill + decode vs HF act-quant",
                &prefill_decode,
                aq,
                aq_tol,
            );
            check(&name, "decode vs HF act-quant", &decode, aq, aq_tol);
            let model = Mamba2Model::from_gguf(&file, DType::BF16, &Device::Cpu, None).unwrap();
            for got in paths(&model, &r.ids, r.prefill_len) {
                check(&name, "bf16 vs HF", &got, &r.logits, 0.25);
            }
            continue;
        }
        check(&name, "one-shot vs HF", &oneshot, &r.logits, f32_tol);
        check(
            &name,
            "prefill part vs HF",
            &head(&prefill_decode),
            &head(&r.logits),
            f32_tol,
        );
        match &r.act_quant {
            None => {
                check(
                    &name,
                    "decode after prefill vs HF",
                    &tail(&prefill_decode),
                    &tail(&r.logits),
                    f32_tol,
                );
                check(&name, "decode vs HF", &decode, &r.logits, f32_tol);
            }
            Some(aq) => {
                let any = r.tol["logits_any_cpu_math"];
                check(
                    &name,
                    "decode after prefill vs HF",
                    &tail(&prefill_decode),
                    &tail(&r.logits),
                    any,
                );
                let aq_tol = r.tol["logits_act_quant_llama_math"];
                check(&name, "decode vs HF act-quant", &decode, aq, aq_tol);
            }
        }
        // bf16 activations on the same file: within a bf16 distance of HF (the residual and
        // state stay f32; 0.25 as for the safetensors fixtures).
        let model = Mamba2Model::from_gguf(&file, DType::BF16, &Device::Cpu, None).unwrap();
        for got in paths(&model, &r.ids, r.prefill_len) {
            check(&name, "bf16 vs HF", &got, &r.logits, 0.25);
        }
    }
}
