//! The mixture-of-experts hybrids from GGUF files made by llama.cpp's converter
//! (`tests/fixtures/gguf/moe/*.f32.gguf`, from `tests/fixtures/moe/<case>/hub/`; numbers in
//! `tests/fixtures/gguf/manifest.json`, key `moe`) against HF's references: one-shot prefill and
//! prefill + token-by-token decode of every batch row in f32 and bf16, the experts chosen for
//! every token, the configs against those read from `config.json`, quantized expert tensors,
//! and the typed errors for bad files.
//!
//! What the files cannot carry decides each case's reference:
//! - `granite_moe_b2`: the converter writes `rope.scaling.finetuned` false for a Granite-4.0-H
//!   with Mamba layers (llama.cpp runs it without RoPE), so the reference is HF with
//!   `position_embedding_type` nope (`tests/fixtures/gguf/moe/granite_moe_b2.variant.safetensors`).
//! - `nemotron_moe_flat_b1`: no `time_step_min` (HF's chunked scan clamps dt >= 0.001, llama.cpp
//!   never clamps), as for the dense Nemotron-H fixture in `gguf_hybrid.rs`.
//! - `nemotron_moe_grouped_b2`: its dense MLP layer (`-` in `ME*E-M`) is written with
//!   `feed_forward_length` 0, so llama.cpp takes it for a Mamba layer and fails to load; this
//!   loader fails the same way, with a typed error.

mod common;
#[path = "common/hybrid_gguf.rs"]
mod hybrid_gguf;
#[path = "../crates/mamba2/tests/support_gguf/mod.rs"]
mod support_gguf;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Tensor};
use common::max_abs_diff;
use hybrid_gguf::{decode, root};
use mamba2::config::{ConfigFlavor, MoeRouter};
use mamba2::gguf::{GgufError, GgufFile, GgufTensorInfo, GgufValue};
use mamba2::pipeline::{LoadOptions, TextGenerator, TextOptions};
use mamba2::session::CancelToken;
use mamba2::{Error, Mamba2Config, Mamba2Model};
use std::collections::HashMap;
use std::path::PathBuf;

const GRANITE: &str = "granite_moe_b2";
const FLAT: &str = "nemotron_moe_flat_b1";
const GROUPED: &str = "nemotron_moe_grouped_b2";

/// Max |ours f32 - HF f32| on the logits. Granite: the file holds HF's f32 weights exactly
/// (llama.cpp is 1.34e-4 from the NoPE reference, 7.4e-2 from HF with RoPE; this engine 6e-7),
/// so the safetensors bound of `tests/moe_fixtures.rs`. Nemotron-H: llama.cpp is 9.86e-4 from HF
/// (the dt clamp the file cannot carry; this engine 3.9e-4); twice llama.cpp's distance, as for
/// the dense fixtures in `gguf_hybrid.rs`. `moe_ggufs_are_the_safetensors_models` checks that
/// the missing setting is the only difference.
const GRANITE_TOL: f32 = 1e-4;
const FLAT_TOL: f32 = 2e-3;
/// bf16 weights and activations against HF f32, as `tests/moe_fixtures.rs` allows.
const BF16_TOL: f32 = 0.25;

fn gguf_path(name: &str) -> PathBuf {
    root().join(format!("tests/fixtures/gguf/moe/{name}.f32.gguf"))
}

fn open(name: &str) -> GgufFile {
    GgufFile::open(&gguf_path(name)).unwrap()
}

fn hub_dir(name: &str) -> PathBuf {
    root().join(format!("tests/fixtures/moe/{name}/hub"))
}

/// The HF reference the file is checked against (see the module doc).
fn reference(name: &str) -> HashMap<String, Tensor> {
    let p = match name {
        GRANITE => root().join("tests/fixtures/gguf/moe/granite_moe_b2.variant.safetensors"),
        _ => root().join(format!("tests/fixtures/moe/{name}/reference.safetensors")),
    };
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn build(f: &GgufFile, dtype: DType) -> mamba2::Result<Mamba2Model> {
    Mamba2Model::from_gguf(f, dtype, &Device::Cpu, None)
}

/// Prefill and decode against HF, and (f32) the experts of every token and MoE layer.
fn check(name: &str, model: &Mamba2Model, tol: f32) {
    let r = reference(name);
    let ids = &r["input_ids"];
    let (batch, seq) = ids.dims2().unwrap();
    let what = format!("{name} [{:?}]", model.dtype());
    model.record_routing(true);
    let prefill = model.forward(ids, None).unwrap();
    let trace = model.take_routing_trace();
    model.record_routing(false);
    let p = r["prefill_len"].to_vec1::<i64>().unwrap()[0] as usize;
    let (dec, _) = decode(model, ids, p);
    for (run, ours, key) in [
        ("prefill", &prefill, "logits_prefill"),
        ("decode", &dec, "logits_decode"),
    ] {
        let e = max_abs_diff(ours, &r[key]);
        println!("{what}: {run} vs HF {key} max|diff| {e:.3e} (tolerance {tol:.1e})");
        assert!(e <= tol, "{what}: {run} differs from HF by {e} > {tol}");
    }
    if model.dtype() != DType::F32 {
        return;
    }
    // Routing equals HF's as sets (the fixtures store each token's experts sorted).
    let mut layers = 0;
    for t in &trace {
        let Some(hf) = r.get(&format!("routing.{}", t.layer)) else {
            panic!("{what}: HF has no MoE block in layer {}", t.layer);
        };
        let hf = hf
            .reshape((batch * seq, ()))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (tok, (o, h)) in t.ids[0]
            .to_vec2::<u32>()
            .unwrap()
            .iter()
            .zip(&hf)
            .enumerate()
        {
            let mut o = o.clone();
            o.sort();
            let h: Vec<u32> = h.iter().map(|&v| v as u32).collect();
            assert_eq!(o, h, "{what}: layer {} token {tok}", t.layer);
        }
        layers += 1;
    }
    let hf_layers = r.keys().filter(|k| k.starts_with("routing.")).count();
    assert_eq!(layers, hf_layers, "{what}: MoE layers");
    println!(
        "{what}: experts of {layers} MoE layers x {} tokens equal HF's",
        batch * seq
    );
}

#[test]
fn granite_moe_gguf_matches_hf_f32_and_bf16() {
    let f = open(GRANITE);
    check(GRANITE, &build(&f, DType::F32).unwrap(), GRANITE_TOL);
    check(GRANITE, &build(&f, DType::BF16).unwrap(), BF16_TOL);
}

#[test]
fn nemotron_moe_gguf_matches_hf_f32_and_bf16() {
    let f = open(FLAT);
    check(FLAT, &build(&f, DType::F32).unwrap(), FLAT_TOL);
    check(FLAT, &build(&f, DType::BF16).unwrap(), BF16_TOL);
}

/// The safetensors model of `name` with `edit` applied to its `config.json` config.
fn safetensors_model(name: &str, edit: impl Fn(&mut Mamba2Config)) -> Mamba2Model {
    let dir = hub_dir(name);
    let mut config = Mamba2Config::from_file(&dir.join("config.json")).unwrap();
    edit(&mut config);
    let weights =
        mamba2::weights::Weights::from_files(&[dir.join("model.safetensors")], &Device::Cpu)
            .unwrap();
    Mamba2Model::from_weights(&config, &weights, DType::F32).unwrap()
}

/// Same weights, same graph: each GGUF model equals the safetensors model (checked against HF
/// in `tests/moe_fixtures.rs`) with the one setting the file cannot carry changed: Granite
/// without RoPE, Nemotron-H without the dt clamp.
#[test]
fn moe_ggufs_are_the_safetensors_models() {
    type Edit = fn(&mut Mamba2Config);
    let cases: [(&str, Edit); 2] = [
        (GRANITE, |c| c.attention.as_mut().unwrap().rope = None),
        (FLAT, |c| c.dt_limit = (0.0, f64::INFINITY)),
    ];
    for (name, edit) in cases {
        let ids = &reference(name)["input_ids"];
        let gguf = build(&open(name), DType::F32)
            .unwrap()
            .forward(ids, None)
            .unwrap();
        let st = safetensors_model(name, edit).forward(ids, None).unwrap();
        let e = max_abs_diff(&gguf, &st);
        println!("{name}: GGUF vs safetensors (edited config) max|diff| {e:.3e}");
        assert!(e <= 1e-5, "{name}: {e}");
    }
}

/// The GGUF configs equal those read from `config.json`, except what a GGUF does not carry:
/// the flavour, the chunk size, Nemotron-H's dt clamp and dense MLP width (a MoE file has no
/// dense MLP; its shared experts' width stands in), Granite's RoPE (off in every converted
/// Granite-4.0-H). The grouped Nemotron file's `-` layer reads as Mamba, as llama.cpp reads it;
/// its MoE settings (groups, norm, scaling) are read exactly.
#[test]
fn moe_gguf_configs_equal_the_hf_configs() {
    for name in [GRANITE, FLAT, GROUPED] {
        let hf = Mamba2Config::from_file(&hub_dir(name).join("config.json")).unwrap();
        let mut g = Mamba2Config::from_gguf(&open(name)).unwrap();
        assert_eq!(g.flavor, ConfigFlavor::Gguf);
        assert_eq!(g.dt_limit, (0.0, f64::INFINITY));
        assert!(g.attention.unwrap().rope.is_none(), "{name}");
        assert_eq!(g.moe, hf.moe, "{name}");
        g.flavor = hf.flavor.clone();
        g.chunk_size = hf.chunk_size;
        g.dt_limit = hf.dt_limit;
        g.attention.as_mut().unwrap().rope = hf.attention.unwrap().rope;
        if name != GRANITE {
            let m = g.mlp.as_mut().unwrap();
            assert_eq!(
                m.intermediate_size,
                hf.moe.unwrap().shared_intermediate_size
            );
            m.intermediate_size = hf.mlp.unwrap().intermediate_size;
        }
        if name == GROUPED {
            assert_eq!(hf.pattern_string(), "ME*E-M");
            assert_eq!(g.pattern_string(), "ME*EMM");
            g.pattern = hf.pattern.clone();
            assert!(matches!(
                g.moe.unwrap().router,
                MoeRouter::SigmoidGrouped { n_group: 4, topk_group: 2, norm_topk_prob: true, routed_scaling_factor }
                    if routed_scaling_factor == 2.5
            ));
        }
        assert_eq!(g, hf, "{name}");
        println!("{name}: {} {}", g.family.model_type(), g.pattern_string());
    }
}

/// llama.cpp cannot load the grouped file (its `-` layer reads as Mamba, without Mamba
/// tensors); neither can this loader, and the error names the tensor.
#[test]
fn grouped_file_with_a_dense_layer_is_a_missing_tensor() {
    match build(&open(GROUPED), DType::F32) {
        Err(Error::MissingTensor { name, source_desc }) => {
            assert_eq!(name, "backbone.layers.4.mixer.in_proj.weight");
            assert!(
                source_desc.contains("`blk.4.ssm_in.weight`"),
                "{source_desc}"
            );
        }
        other => panic!("expected a missing tensor, got {:?}", other.err()),
    }
}

/// `mamba2 generate --model <file>.gguf` on a MoE file: `TextGenerator::load` builds tokenizer
/// and model from the file alone; each greedy token is the argmax of the model's logits.
#[test]
fn text_generator_loads_moe_ggufs() {
    for name in [GRANITE, FLAT] {
        let path = gguf_path(name);
        let gen = TextGenerator::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
        assert!(gen.model().config().moe.is_some(), "{name}");
        let mut session = gen.new_session().unwrap();
        let opts = TextOptions {
            max_new_tokens: 5,
            ignore_eos: true,
            ..Default::default()
        };
        let summary = gen
            .generate(
                &mut session,
                "hello world",
                &opts,
                &CancelToken::new(),
                |_| std::ops::ControlFlow::Continue(()),
            )
            .unwrap();
        assert_eq!(summary.tokens.len(), 5, "{name}");
        let all = session.tokens().to_vec();
        let p = all.len() - 5;
        let ids = Tensor::new(all.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = gen.model().forward(&ids, None).unwrap();
        for k in 0..5 {
            let best = logits.i((0, p - 1 + k)).unwrap().argmax(0).unwrap();
            assert_eq!(
                best.to_scalar::<u32>().unwrap(),
                summary.tokens[k],
                "{name}: token {k}"
            );
        }
    }
}

/// `(ggml dims, type id, bytes)` of a rewritten tensor.
type Rewritten = (Vec<u64>, u32, Vec<u8>);

/// `src` rewritten: `kv` edits metadata (None drops the key), `tensor` edits or drops tensors.
fn rewrite(
    src: &GgufFile,
    kv: impl Fn(&str, &GgufValue) -> Option<GgufValue>,
    tensor: impl Fn(&GgufTensorInfo, &[u8]) -> Option<Rewritten>,
) -> GgufFile {
    let mut w = support_gguf::Writer::new(3);
    for (k, v) in src.metadata() {
        if let Some(v) = kv(k, v) {
            w = w.kv(k, v);
        }
    }
    for t in src.tensors() {
        if let Some((dims, ty, bytes)) = tensor(t, src.tensor_bytes(t)) {
            w = w.tensor(&t.name, &dims, ty, &bytes);
        }
    }
    GgufFile::from_bytes(w.bytes(), "rewritten.gguf").unwrap()
}

fn same_kv(_: &str, v: &GgufValue) -> Option<GgufValue> {
    Some(v.clone())
}

fn unchanged(t: &GgufTensorInfo, bytes: &[u8]) -> Option<Rewritten> {
    Some((
        t.dims.iter().map(|&d| d as u64).collect(),
        t.ty.id(),
        bytes.to_vec(),
    ))
}

fn f32_values(t: &GgufTensorInfo, bytes: &[u8]) -> Tensor {
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap()
}

/// Expert tensors in Q8_0 (those whose rows are whole blocks: gate/up, H = 32 columns) run as
/// their dequantization up to the 8-bit rounding of the decode rows' activations: the model from
/// the quantized file is within twice llama.cpp's distance on llama-quantize's Q8_0 file of the
/// one from the f32 file holding the dequantized values (a block misplaced across experts or
/// rows moves the logits by far more).
#[test]
fn q8_0_expert_tensors_load_as_their_dequantization() {
    for name in [GRANITE, FLAT] {
        let src = open(name);
        let is_q =
            |t: &GgufTensorInfo| t.name.ends_with("_exps.weight") && t.dims[0].is_multiple_of(32);
        let q8 = rewrite(&src, same_kv, |t, bytes| {
            if !is_q(t) {
                return unchanged(t, bytes);
            }
            let q = QTensor::quantize(&f32_values(t, bytes), GgmlDType::Q8_0).unwrap();
            let dims = t.dims.iter().map(|&d| d as u64).collect();
            Some((dims, 8, q.data().unwrap().into_owned()))
        });
        let n = q8
            .tensors()
            .iter()
            .filter(|t| t.ty.name() == "Q8_0")
            .count();
        assert!(n >= 2, "{name}: {n} Q8_0 tensors");
        let dequantized = rewrite(&src, same_kv, |t, bytes| {
            if !is_q(t) {
                return unchanged(t, bytes);
            }
            let q = QTensor::quantize(&f32_values(t, bytes), GgmlDType::Q8_0).unwrap();
            let d = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
            let bytes: Vec<u8> = d
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            Some((t.dims.iter().map(|&d| d as u64).collect(), 0, bytes))
        });
        let r = reference(name);
        let ids = &r["input_ids"];
        let a = build(&q8, DType::F32).unwrap().forward(ids, None).unwrap();
        let b = build(&dequantized, DType::F32)
            .unwrap()
            .forward(ids, None)
            .unwrap();
        let e = max_abs_diff(&a, &b);
        println!(
            "{name}: {n} Q8_0 expert tensors vs their dequantization {e:.3e}; vs HF {:.3e}",
            max_abs_diff(&a, &r["logits_prefill"])
        );
        let bound = 2.0 * llama_distance(name, "q8_0");
        assert!(e > 0.0 && e <= bound, "{name}: {e} (bound {bound})");
    }
}

/// Files of llama.cpp's quantizer with the experts whose rows are whole blocks in Q8_0 / Q4_0
/// (the rest f32), against HF run with those tensors exactly dequantized (gguf-py). The experts
/// stay in their blocks and decode rows round their activations to 8 bits, as llama.cpp does,
/// which is 3.2e-3 (Q8_0) and 2.8e-3 (Q4_0) from these references on Granite and 4.7e-2 /
/// 3.9e-2 on Nemotron-H (manifest, `quantized_experts`); the bound is twice llama.cpp's
/// distance, or the f32 bound where larger (Nemotron-H's includes the dt clamp). The
/// quantization itself moves the logits by 3.2e-3 / 5.8e-2 and 3.9e-2 / 0.51.
#[test]
fn quantized_expert_files_match_hf_with_dequantized_experts() {
    for (name, tol) in [(GRANITE, GRANITE_TOL), (FLAT, FLAT_TOL)] {
        for q in ["q8_0", "q4_0"] {
            let dir = root().join("tests/fixtures/gguf/moe");
            let f = GgufFile::open(&dir.join(format!("{name}.{q}.gguf"))).unwrap();
            let n = f
                .tensors()
                .iter()
                .filter(|t| t.ty.name() == q.to_uppercase())
                .count();
            assert!(n >= 2, "{name}.{q}: {n} quantized tensors");
            let r = candle_core::safetensors::load(
                dir.join(format!("{name}.{q}.hf.safetensors")),
                &Device::Cpu,
            )
            .unwrap();
            let model = build(&f, DType::F32).unwrap();
            // The experts stay in their blocks.
            assert_eq!(
                model.quantization().map(mamba2_ops::quantized::type_name),
                Some(q.to_uppercase().as_str()),
                "{name}.{q}"
            );
            let llama = llama_distance(name, q);
            let tol = tol.max(2.0 * llama);
            let ids = &r["input_ids"];
            let p = r["prefill_len"].to_vec1::<i64>().unwrap()[0] as usize;
            let e1 = max_abs_diff(&model.forward(ids, None).unwrap(), &r["logits_prefill"]);
            let e2 = max_abs_diff(&decode(&model, ids, p).0, &r["logits_decode"]);
            println!(
                "{name}.{q}: {n} quantized expert tensors; prefill {e1:.3e}, decode {e2:.3e} \
                 from HF (llama.cpp {llama:.3e})"
            );
            assert!(e1 <= tol && e2 <= tol, "{name}.{q}: {e1} {e2} > {tol}");
        }
    }
}

/// llama.cpp's largest distance (prefill, decode) from the dequantized-weight reference of the
/// `<name>.<q>.gguf` fixture, from the manifest.
fn llama_distance(name: &str, q: &str) -> f32 {
    let text = std::fs::read_to_string(root().join("tests/fixtures/gguf/manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    let file = format!("moe/{name}.{q}.gguf");
    let entry = m["moe"][name]["quantized_experts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["gguf"] == file.as_str())
        .unwrap_or_else(|| panic!("manifest: no {file}"));
    [
        "llama_oneshot_vs_reference_prefill",
        "llama_step_vs_reference_decode",
    ]
    .iter()
    .map(|k| entry[k].as_f64().unwrap() as f32)
    .fold(0f32, f32::max)
}

/// `src` with metadata `key` set to `value` (added if absent), or dropped (None).
fn with_key(src: &GgufFile, key: &str, value: Option<GgufValue>) -> GgufFile {
    let mut w = support_gguf::Writer::new(3);
    for (k, v) in src.metadata() {
        if k != key {
            w = w.kv(k, v.clone());
        }
    }
    if let Some(v) = value {
        w = w.kv(key, v);
    }
    for t in src.tensors() {
        let dims: Vec<u64> = t.dims.iter().map(|&d| d as u64).collect();
        w = w.tensor(&t.name, &dims, t.ty.id(), src.tensor_bytes(t));
    }
    GgufFile::from_bytes(w.bytes(), "rewritten.gguf").unwrap()
}

fn shape_error(r: mamba2::Result<Mamba2Model>) -> (String, Vec<usize>) {
    match r {
        Err(Error::TensorShape { name, got, .. }) => (name, got),
        other => panic!("expected a shape error, got {:?}", other.err()),
    }
}

/// A stacked expert tensor of the wrong shape names the canonical tensor and the file's shape:
/// a transposed stack (same size) and a stack with one expert missing.
#[test]
fn wrong_expert_stack_shapes_are_typed_errors() {
    let transposed = rewrite(&open(GRANITE), same_kv, |t, bytes| {
        let mut dims: Vec<u64> = t.dims.iter().map(|&d| d as u64).collect();
        if t.name == "blk.0.ffn_down_exps.weight" {
            dims.swap(0, 1);
        }
        Some((dims, t.ty.id(), bytes.to_vec()))
    });
    let (name, got) = shape_error(build(&transposed, DType::F32));
    assert_eq!(name, "model.layers.0.block_sparse_moe.output_linear.weight");
    assert_eq!(got, vec![8, 16, 32]);
    // Granite's gate and up halves must agree per expert.
    let short = |target: &'static str| {
        move |t: &GgufTensorInfo, bytes: &[u8]| {
            let mut dims: Vec<u64> = t.dims.iter().map(|&d| d as u64).collect();
            let mut bytes = bytes.to_vec();
            if t.name == target {
                let e = dims[2] as usize;
                bytes.truncate(bytes.len() / e * (e - 1));
                dims[2] -= 1;
            }
            Some((dims, t.ty.id(), bytes))
        }
    };
    let f = rewrite(&open(GRANITE), same_kv, short("blk.2.ffn_up_exps.weight"));
    let (name, got) = shape_error(build(&f, DType::F32));
    assert_eq!(name, "model.layers.2.block_sparse_moe.input_linear.weight");
    assert_eq!(
        got,
        vec![7, 16, 32],
        "the up half, which disagrees with the gate half"
    );
    // Gate and up flattened to 2-D (experts x rows, cols): the same values, not a stack.
    let flat = rewrite(&open(GRANITE), same_kv, |t, bytes| {
        let mut dims: Vec<u64> = t.dims.iter().map(|&d| d as u64).collect();
        if t.name.starts_with("blk.1.ffn_gate_exps") || t.name.starts_with("blk.1.ffn_up_exps") {
            dims = vec![dims[0], dims[1] * dims[2]];
        }
        Some((dims, t.ty.id(), bytes.to_vec()))
    });
    let (name, got) = shape_error(build(&flat, DType::F32));
    assert_eq!(name, "model.layers.1.block_sparse_moe.input_linear.weight");
    assert_eq!(got, vec![128, 64]);
    let f = rewrite(&open(FLAT), same_kv, short("blk.3.ffn_up_exps.weight"));
    let (name, got) = shape_error(build(&f, DType::F32));
    assert_eq!(name, "backbone.layers.3.mixer.experts.up_proj");
    assert_eq!(got, vec![5, 16, 32]);
}

/// A missing router (or correction bias, or expert stack) is a missing tensor naming the
/// canonical tensor and the GGUF one.
#[test]
fn missing_router_and_experts_are_typed_errors() {
    for (name, drop, canonical) in [
        (
            GRANITE,
            "blk.1.ffn_gate_inp.weight",
            "model.layers.1.block_sparse_moe.router.layer.weight",
        ),
        (
            FLAT,
            "blk.0.ffn_gate_inp.weight",
            "backbone.layers.0.mixer.gate.weight",
        ),
        (
            FLAT,
            "blk.3.exp_probs_b.bias",
            "backbone.layers.3.mixer.gate.e_score_correction_bias",
        ),
        (
            FLAT,
            "blk.0.ffn_down_exps.weight",
            "backbone.layers.0.mixer.experts.down_proj",
        ),
        // Without the stacked up projection the loader asks for per-expert tensors.
        (
            FLAT,
            "blk.0.ffn_up_exps.weight",
            "backbone.layers.0.mixer.experts.0.up_proj.weight",
        ),
    ] {
        let f = rewrite(&open(name), same_kv, |t, b| match t.name == drop {
            true => None,
            false => unchanged(t, b),
        });
        match build(&f, DType::F32) {
            Err(Error::MissingTensor {
                name: n,
                source_desc,
            }) => {
                assert_eq!(n, canonical);
                assert!(source_desc.contains(&format!("`{drop}`")), "{source_desc}");
            }
            other => panic!("{drop}: expected a missing tensor, got {:?}", other.err()),
        }
    }
}

/// Bad MoE metadata is a typed error naming the key: top-k above the expert count (both
/// families), groups without the number kept, llama.cpp features HF's models lack.
#[test]
fn bad_moe_metadata_is_a_typed_error_naming_the_key() {
    for (name, arch) in [(GRANITE, "granitehybrid"), (FLAT, "nemotron_h_moe")] {
        let key = format!("{arch}.expert_used_count");
        let f = with_key(&open(name), &key, Some(GgufValue::U32(9)));
        match Mamba2Config::from_gguf(&f) {
            Err(Error::ConfigField { field, message }) => {
                assert_eq!(field, key);
                assert!(message.contains("9 experts per token"), "{message}");
            }
            other => panic!("{key}: {other:?}"),
        }
    }
    // Three groups (of the 6 experts) and no expert_group_used_count.
    let f = with_key(
        &open(FLAT),
        "nemotron_h_moe.expert_group_count",
        Some(GgufValue::U32(3)),
    );
    let f = with_key(&f, "nemotron_h_moe.expert_group_used_count", None);
    match Mamba2Config::from_gguf(&f) {
        Err(Error::Gguf(GgufError::MissingKey { key, .. })) => {
            assert_eq!(key, "nemotron_h_moe.expert_group_used_count")
        }
        other => panic!("{other:?}"),
    }
    for (name, key, value) in [
        (
            GRANITE,
            "granitehybrid.expert_group_count",
            GgufValue::U32(2),
        ),
        (
            GRANITE,
            "granitehybrid.expert_weights_scale",
            GgufValue::F32(2.0),
        ),
        (
            GRANITE,
            "granitehybrid.expert_shared_feed_forward_length",
            GgufValue::U32(0),
        ),
        (FLAT, "nemotron_h_moe.moe_latent_size", GgufValue::U32(8)),
        (
            FLAT,
            "nemotron_h_moe.nextn_predict_layers",
            GgufValue::U32(1),
        ),
    ] {
        let f = with_key(&open(name), key, Some(value));
        match Mamba2Config::from_gguf(&f) {
            Err(Error::Unsupported(m)) => assert!(m.contains(key), "{m}"),
            other => panic!("{key}: {other:?}"),
        }
    }
}
