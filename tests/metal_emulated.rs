//! The whole model with every op that has a Metal kernel run by the MSL harness from the
//! `.metal` sources, through the same dispatch plans the Metal executor encodes
//! (`mamba2_ops::metal_plan`; `emulate_on_cpu` routes the ops' dispatchers on this thread to
//! the harness executor). Ops without a kernel run what Metal runs for them: Candle's matmul
//! for the projections, the references elsewhere.
//!
//! Checked against HF transformers as `hf_fixtures.rs` and `bundled_golden.rs` check the CPU
//! path, with the same tolerances: the HF fixtures (prefill, prefill then step decode, and
//! prefill continued over a cache) in f32, f16 and bf16, the bundled model's golden greedy
//! tokens and logits, and hybrid fixtures (attention, rotary, MLP activations) as
//! `hybrid_fixtures.rs` checks them. Each check also asserts which kernels ran, so a precondition that sent an
//! op back to its reference cannot pass unnoticed.
//!
//! Requires clang >= 17 (see crates/msl-harness/README.md).

mod common;
#[path = "../crates/mamba2-ops/tests/support/metal_exec.rs"]
mod metal_exec;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use mamba2::pipeline::{bundled_model_dir, load_model, LoadOptions, TextGenerator};
use mamba2::session::{CancelToken, GenerateOptions};
use mamba2::Mamba2Model;
use mamba2_ops::metal_plan::{emulate_on_cpu, EmulationGuard};
use metal_exec::HarnessExecutor;
use msl_harness::Mode;
use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Max |ours - HF f32| on logits per model dtype, as in `hf_fixtures.rs` (the harness computes
/// in f32 like the CPU kernels; only summation orders differ).
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 5e-5,
        DType::BF16 => 0.15,
        DType::F16 => 0.03,
        other => panic!("no tolerance for {other:?}"),
    }
}

/// Runs this thread's ops through a fresh harness executor until the guard drops.
fn emulate(seed: u64) -> (Arc<HarnessExecutor>, EmulationGuard) {
    let ex = Arc::new(HarnessExecutor::new(Mode::Shuffled { seed }));
    let guard = emulate_on_cpu(ex.clone());
    (ex, guard)
}

/// Kernel names (without the dtype suffix) of the launches run since the last call.
fn ran(ex: &HarnessExecutor) -> BTreeSet<String> {
    ex.take_ran()
        .into_iter()
        .map(|r| r.function.rsplit_once('_').unwrap().0.to_string())
        .collect()
}

fn assert_ran(ex: &HarnessExecutor, want: &[&str], what: &str) {
    let got = ran(ex);
    // a prefix: `rms_norm_residual` stands for its `_f32res` variant too
    for w in want {
        assert!(
            got.iter().any(|g| g.starts_with(w)),
            "{what}: {w} did not run (ran: {got:?})"
        );
    }
}

const PREFILL_KERNELS: [&str; 6] = [
    "embedding_gather",
    "causal_conv1d_fwd",
    "ssd_chunk_cb",
    "ssd_chunk_scan",
    "gated_rms_norm",
    "rms_norm_residual",
];
/// The decode step: the embedding gather, the residual norm, the in-projection and LM head
/// (matrix-vector), the fused conv + state-update kernel, the out-projection with the gated
/// norm folded in.
const STEP_KERNELS: [&str; 5] = [
    "embedding_gather",
    "rms_norm_residual",
    "linear_matvec",
    "mamba2_decode_step",
    "linear_matvec_gated_norm",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
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

fn check(name: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let e = max_abs_diff(got, want);
    println!("{name}: max|diff| {e:.3e}");
    assert!(e <= tol, "{name}: logits differ from HF by {e} > {tol}");
}

/// Prefill, prefill then step decode, and prefill continued over the cache, against HF; f32
/// also checks the final states.
fn check_fixture(fixture_name: &str, dtype: DType, seed: u64) {
    let dir = fixture(fixture_name);
    let r = reference(&dir);
    let files =
        mamba2::hub::resolve_model(dir.join("hf").to_str().unwrap(), &Default::default()).unwrap();
    let model = load_model(&files, dtype, &Device::Cpu).unwrap();
    let name = format!("{fixture_name} [emulated Metal, {dtype:?}]");
    let tol = tolerance(dtype);
    let (ex, _guard) = emulate(seed);
    let (batch, seq) = r.ids.dims2().unwrap();
    let p = r.prefill_len;

    let prefill = model.forward(&r.ids, None).unwrap();
    check(
        &format!("{name} prefill"),
        &prefill,
        &r.tensors["logits_prefill"],
        tol,
    );
    assert_ran(&ex, &PREFILL_KERNELS, &format!("{name} prefill"));

    let mut cache = model.new_cache(batch).unwrap();
    let mut out = vec![model
        .forward(&r.ids.narrow(1, 0, p).unwrap(), Some(&mut cache))
        .unwrap()];
    ex.take_ran();
    for t in p..seq {
        let ids = r.ids.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
        out.push(model.step(&ids, &mut cache).unwrap().unsqueeze(1).unwrap());
    }
    if seq > p {
        assert_ran(&ex, &STEP_KERNELS, &format!("{name} decode"));
    }
    check(
        &format!("{name} decode"),
        &Tensor::cat(&out, 1).unwrap(),
        &r.tensors["logits_decode"],
        tol,
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

    // continued prefill: the conv and SSD kernels start from the cache's states
    if seq >= 2 {
        let split = (seq / 2).max(1);
        let mut cache = model.new_cache(batch).unwrap();
        let first = model
            .forward(&r.ids.narrow(1, 0, split).unwrap(), Some(&mut cache))
            .unwrap();
        ex.take_ran();
        let rest = model
            .forward(
                &r.ids.narrow(1, split, seq - split).unwrap(),
                Some(&mut cache),
            )
            .unwrap();
        assert_ran(&ex, &PREFILL_KERNELS, &format!("{name} continued prefill"));
        check(
            &format!("{name} continued prefill"),
            &Tensor::cat(&[first, rest], 1).unwrap(),
            &r.tensors["logits_prefill"],
            tol,
        );
    }
}

const FIXTURES: [&str; 5] = [
    "g1_ds128_hd64_padvocab",
    "g1_ds32_hd32_short_b3",
    "g2_ds16_seq3_b2",
    "g2_nh6_ds64_limit_bias",
    "g8_ds16_hd16_b3_untied",
];

#[test]
fn hf_fixtures_f32() {
    for (i, f) in FIXTURES.iter().enumerate() {
        check_fixture(f, DType::F32, i as u64);
    }
}

#[test]
fn hf_fixtures_f16() {
    for (i, f) in FIXTURES.iter().enumerate() {
        check_fixture(f, DType::F16, 10 + i as u64);
    }
}

#[test]
fn hf_fixtures_bf16() {
    for (i, f) in FIXTURES.iter().enumerate() {
        check_fixture(f, DType::BF16, 20 + i as u64);
    }
}

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

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

fn bundled(dtype: DType) -> TextGenerator {
    let opts = LoadOptions {
        dtype,
        ..Default::default()
    };
    TextGenerator::load(bundled_model_dir().unwrap().to_str().unwrap(), &opts)
        .expect("bundled model loads")
}

#[test]
fn bundled_model_greedy_tokens_match_hf() {
    let (t, meta) = golden();
    let gen = bundled(DType::F32);
    let (ex, _guard) = emulate(40);
    for (i, p) in meta["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = p["prompt"].as_str().unwrap();
        let prompt_ids = gen.encode(prompt).unwrap();
        assert_eq!(prompt_ids, ids(&t[&format!("prompt{i}_ids")]));
        let want = ids(&t[&format!("prompt{i}_greedy_ids")]);
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
        let mut kernels = PREFILL_KERNELS.to_vec();
        kernels.extend(STEP_KERNELS);
        assert_ran(&ex, &kernels, &format!("bundled model, prompt {i}"));
    }
}

#[test]
fn bundled_model_logits_match_hf() {
    let (t, meta) = golden();
    let text = Tensor::new(ids(&t["text_ids"]).as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (ex, _guard) = emulate(41);
    let gen = bundled(DType::F32);
    let model: &Mamba2Model = gen.model();
    let prefill = model.forward(&text, None).unwrap().squeeze(0).unwrap();
    check("bundled f32 prefill", &prefill, &t["text_logits_f32"], 2e-4);
    assert_ran(&ex, &PREFILL_KERNELS, "bundled f32 prefill");
    let long = Tensor::new(ids(&t["long_text_ids"]).as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let got = model.forward(&long, None).unwrap().squeeze(0).unwrap();
    check(
        "bundled f32 long text",
        &got,
        &t["long_text_logits_f32"],
        2e-4,
    );
    // the stored 16-bit dtype: as close to HF f32 as HF's own 16-bit run, with headroom
    let stored = match meta["stored_dtype"].as_str().unwrap() {
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        other => panic!("unexpected stored dtype {other}"),
    };
    let gen = bundled(stored);
    let ours = gen
        .model()
        .forward(&text, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let hf_own = max_abs_diff(&t["text_logits_stored_dtype"], &t["text_logits_f32"]);
    check(
        &format!("bundled {stored:?} prefill"),
        &ours,
        &t["text_logits_f32"],
        1.5 * hf_own + 0.02,
    );
    assert_ran(&ex, &PREFILL_KERNELS, "bundled 16-bit prefill");
}

/// Launches of one decode token, counted from the plans the executor ran: the embedding
/// gather, per layer the residual norm, the in-projection, the fused step and the
/// out-projection with the gated norm (4, issue 18's budget), then the final norm and the LM
/// head: 4L + 3.
#[test]
fn decode_dispatches_per_layer() {
    for (i, name) in ["g1_ds128_hd64_padvocab", "g8_ds16_hd16_b3_untied"]
        .iter()
        .enumerate()
    {
        let dir = fixture(name);
        let r = reference(&dir);
        let files =
            mamba2::hub::resolve_model(dir.join("hf").to_str().unwrap(), &Default::default())
                .unwrap();
        let model = load_model(&files, DType::F32, &Device::Cpu).unwrap();
        let (ex, _guard) = emulate(50 + i as u64);
        let batch = r.ids.dim(0).unwrap();
        let mut cache = model.new_cache(batch).unwrap();
        model
            .forward(&r.ids.narrow(1, 0, 2).unwrap(), Some(&mut cache))
            .unwrap();
        ex.take_ran();
        let ids = r.ids.narrow(1, 2, 1).unwrap().squeeze(1).unwrap();
        model.step(&ids, &mut cache).unwrap();
        let ran: Vec<String> = ex
            .take_ran()
            .into_iter()
            .map(|r| r.function.rsplit_once('_').unwrap().0.to_string())
            .collect();
        let n_layer = model.config().n_layer;
        let count = |k: &str| ran.iter().filter(|f| f.as_str() == k).count();
        let what = format!("{name}: one decode token ran {ran:?}");
        assert_eq!(
            count("rms_norm_residual_f32res") + count("rms_norm_residual"),
            n_layer + 1,
            "{what}"
        );
        assert_eq!(count("linear_matvec"), n_layer + 1, "{what}");
        assert_eq!(count("mamba2_decode_step"), n_layer, "{what}");
        assert_eq!(count("linear_matvec_gated_norm"), n_layer, "{what}");
        assert_eq!(count("embedding_gather"), 1, "{what}");
        assert_eq!(ran.len(), 4 * n_layer + 3, "{what}");
    }
}

/// A hybrid fixture (`tests/fixtures/hybrid`, as `hybrid_fixtures.rs` checks the CPU path):
/// prefill, prefill then step decode, and the three-piece continued prefill against HF, with
/// `prefill_kernels` (attention, rotary, MLP activations, ...) among the kernels that ran in the
/// prefill and `step_kernels` among those of the decode steps.
fn check_hybrid(
    case: &str,
    dtype: DType,
    prefill_kernels: &[&str],
    step_kernels: &[&str],
    seed: u64,
) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hybrid")
        .join(case);
    let r: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = &r["input_ids"];
    let (batch, seq) = ids.dims2().unwrap();
    let p = r["prefill_len"].to_vec1::<i64>().unwrap()[0] as usize;
    let splits: Vec<usize> = r["continued_splits"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect();
    let files =
        mamba2::hub::resolve_model(dir.join("hf").to_str().unwrap(), &Default::default()).unwrap();
    let model = load_model(&files, dtype, &Device::Cpu).unwrap();
    // hybrid_fixtures.rs's tolerances (logits |max| ~ 4-8)
    let tol = if dtype == DType::F32 { 1e-4 } else { 0.25 };
    let name = format!("{case} [emulated Metal, {dtype:?}]");
    let (ex, _guard) = emulate(seed);

    let prefill = model.forward(ids, None).unwrap();
    check(
        &format!("{name} prefill"),
        &prefill,
        &r["logits_prefill"],
        tol,
    );
    assert_ran(&ex, prefill_kernels, &format!("{name} prefill"));

    let mut cache = model.new_cache(batch).unwrap();
    let mut out = vec![model
        .forward(&ids.narrow(1, 0, p).unwrap(), Some(&mut cache))
        .unwrap()];
    ex.take_ran();
    for t in p..seq {
        let step = model
            .step(
                &ids.narrow(1, t, 1).unwrap().squeeze(1).unwrap(),
                &mut cache,
            )
            .unwrap();
        out.push(step.unsqueeze(1).unwrap());
    }
    assert_ran(&ex, step_kernels, &format!("{name} decode"));
    let decode = Tensor::cat(&out, 1).unwrap();
    check(&format!("{name} decode"), &decode, &r["logits_decode"], tol);

    let mut cache = model.new_cache(batch).unwrap();
    let mut bounds = vec![0];
    bounds.extend(splits.iter().copied().filter(|&s| s > 0 && s < seq));
    bounds.push(seq);
    let out: Vec<Tensor> = bounds
        .windows(2)
        .map(|w| {
            model
                .forward(&ids.narrow(1, w[0], w[1] - w[0]).unwrap(), Some(&mut cache))
                .unwrap()
        })
        .collect();
    let continued = Tensor::cat(&out, 1).unwrap();
    check(
        &format!("{name} continued"),
        &continued,
        &r["logits_continued"],
        tol,
    );
}

#[test]
fn hybrid_fixtures() {
    let attn = ["causal_attention", "rms_norm_residual"];
    let with = |extra: &[&'static str]| [&attn[..], extra].concat();
    let step = ["linear_matvec", "mamba2_decode_step"];
    let granite = with(&["rotary_embedding", "swiglu"]);
    let granite_step = [&granite[..], &step[..]].concat();
    check_hybrid(
        "granite_rope_untied_limit_b1",
        DType::F32,
        &granite,
        &granite_step,
        60,
    );
    let nemotron = with(&["relu_squared"]);
    let nemotron_step = [&nemotron[..], &step[..]].concat();
    check_hybrid(
        "nemotron_h_g2_b3",
        DType::F32,
        &nemotron,
        &nemotron_step,
        61,
    );
    check_hybrid(
        "falcon_h1_rmsnorm_g2_b2",
        DType::F32,
        &attn,
        &with(&step),
        62,
    );
    // no gated norm: the ungated step (conv update + state update with the gate) writes the
    // cache's second conv buffer too
    let ungated = with(&[
        "linear_matvec",
        "causal_conv1d_update",
        "selective_state_update",
    ]);
    check_hybrid("falcon_h1_nonorm_tied_b1", DType::F32, &attn, &ungated, 65);
    check_hybrid(
        "granite_rope_untied_limit_b1",
        DType::BF16,
        &granite,
        &granite_step,
        63,
    );
    check_hybrid("bamba_b2", DType::BF16, &attn, &with(&step), 64);
}
