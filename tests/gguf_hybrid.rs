//! The hybrid families from GGUF files made by llama.cpp's converter
//! (`tests/fixtures/gguf/hybrid/*.f32.gguf`, from `tests/fixtures/hybrid/<case>/hub/`; see
//! `tests/fixtures/gguf/manifest.json`, key `hybrid`) against the HF references of the same
//! checkpoints (`tests/fixtures/hybrid/<case>/reference.safetensors`): one-shot prefill and
//! prefill + token-by-token decode of every batch row, f32 and bf16, the final states, the
//! config against the one read from `config.json`, text generation through
//! `TextGenerator::load`, and the typed errors (a dense file claiming experts, unknown
//! architectures). Falcon-H1 is in `gguf_falcon_h1.rs`, the MoE files in `gguf_moe.rs`.

mod common;
#[path = "common/hybrid_gguf.rs"]
mod hybrid_gguf;
#[path = "../crates/mamba2/tests/support_gguf/mod.rs"]
mod support_gguf;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Tensor};
use common::max_abs_diff;
use hybrid_gguf::*;
use mamba2::gguf::{GgufFile, GgufTensorInfo, GgufValue};
use mamba2::pipeline::{LoadOptions, TextGenerator, TextOptions};
use mamba2::session::CancelToken;
use mamba2::{Error, Mamba2Cache, Mamba2Config, Mamba2Model};

/// Granite-4.0-H, NoPE, tied, 2 groups. llama.cpp is 7.64e-5 from HF on this file; the
/// tolerance is twice that (as the other GGUF fixture tolerances were derived). The GGUF holds
/// HF's f32 weights exactly, so this engine lands where its safetensors path does (checked
/// directly in `granite_gguf_is_the_safetensors_model`).
const GRANITE: Case = Case {
    name: "granite_nope_tied_b2",
    tol: 1.6e-4,
};

/// Nemotron-H, `M-M*-M*-`, 2 groups. The file cannot carry HF's `time_step_min`: HF's chunked
/// scan clamps dt >= 0.001 and llama.cpp (like this loader) does not clamp, which puts
/// llama.cpp 2.14e-3 from HF (manifest `difference_analysis`). The tolerance is twice that;
/// `nemotron_gguf_is_the_unclamped_safetensors_model` checks that the clamp is the only
/// difference.
const NEMOTRON: Case = Case {
    name: "nemotron_h_g2_b3",
    tol: 4.3e-3,
};

/// bf16 weights and activations against HF f32, as `tests/hybrid_fixtures.rs` allows.
const BF16_TOL: f32 = 0.25;

#[test]
fn granite_gguf_matches_hf_f32() {
    let model = gguf_model(&GRANITE, DType::F32);
    let cache = check_logits(&GRANITE, &model, GRANITE.tol);
    // The bounds of tests/hybrid_fixtures.rs for the safetensors model's states.
    check_states(&GRANITE, &model, &cache, 1e-4);
}

#[test]
fn nemotron_gguf_matches_hf_f32() {
    let model = gguf_model(&NEMOTRON, DType::F32);
    let cache = check_logits(&NEMOTRON, &model, NEMOTRON.tol);
    check_states(&NEMOTRON, &model, &cache, NEMOTRON.tol);
}

#[test]
fn hybrid_ggufs_match_hf_bf16() {
    for case in [&GRANITE, &NEMOTRON] {
        check_logits(case, &gguf_model(case, DType::BF16), BF16_TOL);
    }
}

/// Same weights, same graph: the GGUF and safetensors models of the Granite fixture agree to
/// rounding (the converter's f32 tensors are HF's; q/k come back in HF's row order).
#[test]
fn granite_gguf_is_the_safetensors_model() {
    let r = reference(GRANITE.name);
    let ids = &r["input_ids"];
    let gguf = gguf_model(&GRANITE, DType::F32).forward(ids, None).unwrap();
    let st = safetensors_model(GRANITE.name, DType::F32)
        .forward(ids, None)
        .unwrap();
    let e = max_abs_diff(&gguf, &st);
    println!("granite: GGUF vs safetensors max|diff| {e:.3e}");
    assert!(e <= 1e-5, "{e}");
}

/// The Nemotron-H GGUF is the safetensors model without HF's dt clamp: equal to rounding with
/// `dt_limit` (0, inf), and the clamp alone accounts for the distance to HF.
#[test]
fn nemotron_gguf_is_the_unclamped_safetensors_model() {
    let r = reference(NEMOTRON.name);
    let ids = &r["input_ids"];
    let gguf = gguf_model(&NEMOTRON, DType::F32)
        .forward(ids, None)
        .unwrap();
    let dir = hub_dir(NEMOTRON.name);
    let mut config = Mamba2Config::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(
        config.dt_limit,
        (0.001, f64::INFINITY),
        "HF's time_step_min"
    );
    config.dt_limit = (0.0, f64::INFINITY);
    let weights =
        mamba2::weights::Weights::from_files(&[dir.join("model.safetensors")], &Device::Cpu)
            .unwrap();
    let unclamped = Mamba2Model::from_weights(&config, &weights, DType::F32)
        .unwrap()
        .forward(ids, None)
        .unwrap();
    let e = max_abs_diff(&gguf, &unclamped);
    println!("nemotron: GGUF vs unclamped safetensors max|diff| {e:.3e}");
    assert!(e <= 1e-5, "{e}");
    let clamped = safetensors_model(NEMOTRON.name, DType::F32)
        .forward(ids, None)
        .unwrap();
    println!(
        "nemotron: clamped safetensors vs HF {:.3e}, GGUF vs HF {:.3e}",
        max_abs_diff(&clamped, &r["logits_prefill"]),
        max_abs_diff(&gguf, &r["logits_prefill"])
    );
}

/// The GGUF configs equal those read from the HF `config.json`, except what a GGUF does not
/// carry: the flavour, the chunk size (no effect on results) and Nemotron-H's dt clamp.
#[test]
fn gguf_configs_equal_the_hf_configs() {
    for case in [&GRANITE, &NEMOTRON] {
        let hf = Mamba2Config::from_file(&hub_dir(case.name).join("config.json")).unwrap();
        let mut g = Mamba2Config::from_gguf(&open(case)).unwrap();
        assert_eq!(g.flavor, mamba2::config::ConfigFlavor::Gguf);
        assert_eq!(g.dt_limit, (0.0, f64::INFINITY));
        g.flavor = hf.flavor.clone();
        g.chunk_size = hf.chunk_size;
        g.dt_limit = hf.dt_limit;
        assert_eq!(g, hf, "{}", case.name);
        println!(
            "{}: {} blocks {}",
            case.name,
            g.family.model_type(),
            g.pattern_string()
        );
    }
}

/// `mamba2 generate --model <file>.gguf` goes through `TextGenerator::load`: greedy text from
/// the file's own tokenizer, each token the argmax of the model's logits.
#[test]
fn text_generator_loads_hybrid_ggufs() {
    for case in [&GRANITE, &NEMOTRON] {
        let path = gguf_path(case);
        let gen = TextGenerator::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
        let mut session = gen.new_session().unwrap();
        let opts = TextOptions {
            max_new_tokens: 6,
            ignore_eos: true,
            ..Default::default()
        };
        let mut text = String::new();
        let summary = gen
            .generate(
                &mut session,
                "hello world",
                &opts,
                &CancelToken::new(),
                |t| {
                    text.push_str(t);
                    std::ops::ControlFlow::Continue(())
                },
            )
            .unwrap();
        assert_eq!(summary.tokens.len(), 6, "{}", case.name);
        let all = session.tokens().to_vec();
        let p = all.len() - 6;
        let ids = Tensor::new(all.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = gen.model().forward(&ids, None).unwrap();
        for k in 0..6 {
            let best = logits
                .i((0, p - 1 + k))
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            assert_eq!(best, summary.tokens[k], "{}: token {k}", case.name);
        }
        println!("{}: {:?} -> {:?}", case.name, "hello world", text);
    }
}

/// `(ggml dims, type id, bytes)` of a rewritten tensor.
type Rewritten = (Vec<u64>, u32, Vec<u8>);

/// The fixture rewritten: `kv` edits metadata (None drops the key), `tensor` edits or drops
/// tensors.
fn rewrite_with(
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

/// [`rewrite_with`] keeping the tensors `keep_tensor` names, unchanged.
fn rewrite(
    src: &GgufFile,
    kv: impl Fn(&str, &GgufValue) -> Option<GgufValue>,
    keep_tensor: impl Fn(&str) -> bool,
) -> GgufFile {
    rewrite_with(src, kv, |t, bytes| {
        let dims = t.dims.iter().map(|&d| d as u64).collect();
        keep_tensor(&t.name).then(|| (dims, t.ty.id(), bytes.to_vec()))
    })
}

/// Metadata without Granite's `residual_scale`: the builder folds it into three matrices in
/// f32, which takes them out of their blocks (dense `dequantize(W) * s`, where the f32 file's
/// load-time quantization gives `Q8_0(W * s)`); without it both roads give the same blocks.
fn unscaled(k: &str, v: &GgufValue) -> Option<GgufValue> {
    (k != "granitehybrid.residual_scale").then(|| v.clone())
}

/// The f32 fixture (without `residual_scale`) with the matrices llama-quantize would quantize
/// (embedding, output, ssm_in, ssm_out, attention and MLP projections) in Q8_0, as
/// `llama-quantize --pure Q8_0` lays them out (Candle's Q8_0 is ggml's reference quantizer).
fn q8_0_file(case: &Case) -> GgufFile {
    let quantized = [
        "token_embd.weight",
        "output.weight",
        "ssm_in.weight",
        "ssm_out.weight",
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_output.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
    ];
    rewrite_with(&open(case), unscaled, |t, bytes| {
        let dims: Vec<u64> = t.dims.iter().map(|&d| d as u64).collect();
        // `blk.N.leaf` -> `leaf`.
        let leaf = match t.name.strip_prefix("blk.") {
            Some(rest) => rest.split_once('.').map_or(rest, |(_, l)| l),
            None => t.name.as_str(),
        };
        if !quantized.contains(&leaf) {
            return Some((dims, t.ty.id(), bytes.to_vec()));
        }
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let x = Tensor::from_vec(values, t.shape(), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&x, GgmlDType::Q8_0).unwrap();
        Some((dims, 8, q.data().unwrap().into_owned()))
    })
}

/// Block-quantized hybrid files: q/k rows are reordered block row by block row and Granite's
/// gate and up join block for block, which must give exactly the model that quantizing the f32
/// file at load gives (the same blocks, the same quantized kernels). Misplaced rows would put
/// the keys off by their own magnitude (~1).
#[test]
fn q8_0_hybrid_ggufs_equal_load_time_quantization() {
    for case in [&GRANITE, &NEMOTRON] {
        let r = reference(case.name);
        let ids = &r["input_ids"];
        let q8 = build(&q8_0_file(case)).unwrap();
        assert_eq!(q8.quantization(), Some(GgmlDType::Q8_0), "{}", case.name);
        let f32_file = rewrite(&open(case), unscaled, |_| true);
        let at_load =
            Mamba2Model::from_gguf(&f32_file, DType::F32, &Device::Cpu, Some(GgmlDType::Q8_0))
                .unwrap();
        let (a, ca) = decode(&q8, ids, prefill_len(&r));
        let (b, cb) = decode(&at_load, ids, prefill_len(&r));
        let e = max_abs_diff(&a, &b);
        let mut ek = 0f32;
        for i in 0..ca.n_kv() {
            let k = |c: &Mamba2Cache| c.kv(i).keys().unwrap().unwrap();
            ek = ek.max(max_abs_diff(&k(&ca), &k(&cb)));
        }
        println!(
            "{}: Q8_0 file vs f32 file quantized at load: logits {e:.3e}, keys {ek:.3e}",
            case.name
        );
        assert!(e <= 1e-6 && ek <= 1e-6, "{}: {e} {ek}", case.name);
    }
}

fn set(key: &'static str, value: GgufValue) -> impl Fn(&str, &GgufValue) -> Option<GgufValue> {
    move |k, v| Some(if k == key { value.clone() } else { v.clone() })
}

fn build(f: &GgufFile) -> mamba2::Result<Mamba2Model> {
    Mamba2Model::from_gguf(f, DType::F32, &Device::Cpu, None)
}

fn unsupported(r: mamba2::Result<Mamba2Model>) -> String {
    match r {
        Err(Error::Unsupported(m)) => m,
        other => panic!("expected Error::Unsupported, got {:?}", other.err()),
    }
}

/// The dense fixture with `expert_count` 8: its `expert_used_count` 0 is named; with a top-k,
/// the first MoE block's router is the missing tensor.
#[test]
fn dense_granite_claiming_experts_is_a_typed_error() {
    let f = rewrite(
        &open(&GRANITE),
        set("granitehybrid.expert_count", GgufValue::U32(8)),
        |_| true,
    );
    match build(&f) {
        Err(Error::ConfigField { field, message }) => {
            assert_eq!(field, "granitehybrid.expert_used_count");
            assert!(message.contains("0 experts per token"), "{message}");
        }
        other => panic!("{:?}", other.err()),
    }
    let f = rewrite(
        &f,
        set("granitehybrid.expert_used_count", GgufValue::U32(2)),
        |_| true,
    );
    match build(&f) {
        Err(Error::MissingTensor { name, source_desc }) => {
            assert_eq!(name, "model.layers.0.block_sparse_moe.router.layer.weight");
            assert!(
                source_desc.contains("`blk.0.ffn_gate_inp.weight`"),
                "{source_desc}"
            );
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn unknown_architectures_are_refused() {
    let f = rewrite(
        &open(&NEMOTRON),
        set("general.architecture", GgufValue::String("jamba".into())),
        |_| true,
    );
    let m = unsupported(build(&f));
    assert!(
        m.contains("`jamba`")
            && m.contains("mamba2, granitehybrid, nemotron_h, nemotron_h_moe, falcon-h1"),
        "{m}"
    );
}

#[test]
fn bad_layer_arrays_and_missing_parts_are_named() {
    // A head_count_kv array of 3 entries for 4 layers.
    let f = rewrite(
        &open(&GRANITE),
        set(
            "granitehybrid.attention.head_count_kv",
            GgufValue::Array(vec![
                GgufValue::I32(0),
                GgufValue::I32(2),
                GgufValue::I32(0),
            ]),
        ),
        |_| true,
    );
    match build(&f) {
        Err(Error::ConfigField { field, message }) => {
            assert_eq!(field, "granitehybrid.attention.head_count_kv");
            assert!(message.contains("3 layers"), "{message}");
        }
        other => panic!("{:?}", other.err()),
    }
    // Attention layers with different KV head counts.
    let f = rewrite(
        &open(&NEMOTRON),
        set(
            "nemotron_h.attention.head_count_kv",
            GgufValue::Array([0, 0, 0, 2, 0, 0, 1, 0].map(GgufValue::I32).to_vec()),
        ),
        |_| true,
    );
    let m = unsupported(build(&f));
    assert!(m.contains("nemotron_h.attention.head_count_kv[6]"), "{m}");
    // The up half of Granite's fused gate|up projection.
    let f = rewrite(
        &open(&GRANITE),
        |_, v| Some(v.clone()),
        |n| n != "blk.1.ffn_up.weight",
    );
    match build(&f) {
        Err(Error::MissingTensor { name, source_desc }) => {
            assert_eq!(name, "model.layers.1.shared_mlp.input_linear.weight");
            assert!(
                source_desc.contains("`blk.1.ffn_up.weight`"),
                "{source_desc}"
            );
        }
        other => panic!("{:?}", other.err()),
    }
}

/// Bamba converts to `granitehybrid` with RoPE on 8 of its 16 head channels. llama.cpp is 1.65
/// from HF after position 0 on this file: the converter permutes whole heads for pairwise
/// RoPE, which equals HF's rotate-half only when every channel rotates. Reading q/k back in
/// HF's row order and rotating HF's way gives HF's logits. The file is llama.cpp's converter
/// output that `scripts/gguf_fixtures.py` writes under target/ (copied to the fixtures).
#[test]
fn bamba_gguf_matches_hf_f32() {
    let path = root().join("tests/fixtures/gguf/hybrid/bamba_b2.f32.gguf");
    let file = GgufFile::open(&path).unwrap();
    let model = Mamba2Model::from_gguf(&file, DType::F32, &Device::Cpu, None).unwrap();
    let a = model.config().attention.unwrap();
    assert_eq!((a.head_dim, a.rope.map(|r| r.rotary_dim)), (16, Some(8)));
    let bamba = Case {
        name: "bamba_b2",
        // The safetensors fixtures' f32 bound (tests/hybrid_fixtures.rs).
        tol: 1e-4,
    };
    let cache = check_logits(&bamba, &model, bamba.tol);
    check_states(&bamba, &model, &cache, 1e-4);
}
