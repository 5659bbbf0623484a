//! Falcon-H1 from GGUF files made by llama.cpp's converter
//! (`tests/fixtures/gguf/hybrid/falcon_h1_*.f32.gguf`, from `tests/fixtures/hybrid/<case>/hub/`).
//!
//! The converter multiplies every µP multiplier into the tensors, which loses two things the
//! HF model has: a tied model's `lm_head_multiplier` (the output matrix is token_embd, already
//! scaled by `embedding_multiplier`) and `mamba_norm_before_gate` (llama.cpp gates, then
//! normalises). So the reference of these files is HF's model with those two settings changed
//! as llama.cpp runs them (`*.variant.safetensors`, written by `scripts/gguf_fixtures.py`, which
//! records llama.cpp's own distance to it in the manifest: 1.15e-3 and 5.5e-3). Checked here:
//! one-shot prefill and prefill + token-by-token decode against it (f32, bf16), the model equal
//! to the safetensors model with the same two changes (logits and final states), and the
//! config against the HF config.

mod common;
#[path = "common/hybrid_gguf.rs"]
mod hybrid_gguf;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use hybrid_gguf::*;
use mamba2::config::Multipliers;
use mamba2::{Mamba2Cache, Mamba2Config, Mamba2Model};
use std::collections::HashMap;

/// Untied, grouped gated norm (2 groups) with `mamba_norm_before_gate` true in HF, batch 2.
const RMSNORM: Case = Case {
    name: "falcon_h1_rmsnorm_g2_b2",
    // The safetensors fixtures' f32 bound (tests/hybrid_fixtures.rs).
    tol: 1e-4,
};

/// Tied embeddings, no gated norm, batch 1.
const TIED: Case = Case {
    name: "falcon_h1_nonorm_tied_b1",
    tol: 1e-4,
};

/// bf16 weights and activations against HF f32, as `tests/hybrid_fixtures.rs` allows.
const BF16_TOL: f32 = 0.25;

/// HF's logits in llama.cpp's semantics (`input_ids`, `logits_prefill` of every batch row).
fn variant(case: &Case) -> HashMap<String, Tensor> {
    let p = root().join(format!(
        "tests/fixtures/gguf/hybrid/{}.variant.safetensors",
        case.name
    ));
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

/// One-shot prefill, and prefill of the HF fixture's prefill length + one step per token,
/// against the variant's logits.
fn check_against_variant(case: &Case, model: &Mamba2Model, tol: f32) {
    let v = variant(case);
    let ids = &v["input_ids"];
    assert_eq!(ids.to_vec2::<i64>().unwrap(), {
        reference(case.name)["input_ids"].to_vec2::<i64>().unwrap()
    });
    let what = format!("{} [{:?}]", case.name, model.dtype());
    let one_shot = model.forward(ids, None).unwrap();
    let e = max_abs_diff(&one_shot, &v["logits_prefill"]);
    println!("{what}: prefill vs HF (llama.cpp semantics) max|diff| {e:.3e} (tolerance {tol:.1e})");
    assert!(e <= tol, "{what}: prefill differs by {e} > {tol}");
    let (dec, _) = decode(model, ids, prefill_len(&reference(case.name)));
    let e = max_abs_diff(&dec, &v["logits_prefill"]);
    println!("{what}: prefill + decode vs HF (llama.cpp semantics) max|diff| {e:.3e}");
    assert!(e <= tol, "{what}: decode differs by {e} > {tol}");
}

#[test]
fn falcon_h1_ggufs_match_hf_as_llama_cpp_runs_them_f32() {
    for case in [&RMSNORM, &TIED] {
        check_against_variant(case, &gguf_model(case, DType::F32), case.tol);
    }
}

#[test]
fn falcon_h1_ggufs_match_hf_as_llama_cpp_runs_them_bf16() {
    for case in [&RMSNORM, &TIED] {
        check_against_variant(case, &gguf_model(case, DType::BF16), BF16_TOL);
    }
}

/// The HF config with llama.cpp's two changes, in the GGUF's terms: multipliers folded (all 1,
/// a tied head then scaled by what scaled the embedding), the gate before the norm.
fn hf_config_as_llama_cpp_runs_it(case: &Case) -> Mamba2Config {
    let mut c = Mamba2Config::from_file(&hub_dir(case.name).join("config.json")).unwrap();
    c.norm_before_gate = false;
    if c.tie_embeddings {
        c.multipliers.logits = c.multipliers.embedding;
    }
    c
}

/// Same weights up to the folded multipliers, same graph: the GGUF model equals the safetensors
/// model with llama.cpp's two changes, in the logits and in every final state, after prefill +
/// decode.
#[test]
fn falcon_h1_ggufs_are_the_safetensors_models_with_llama_cpps_changes() {
    for case in [&RMSNORM, &TIED] {
        let r = reference(case.name);
        let ids = &r["input_ids"];
        let config = hf_config_as_llama_cpp_runs_it(case);
        let dir = hub_dir(case.name);
        let files = mamba2::hub::resolve_model(dir.to_str().unwrap(), &Default::default()).unwrap();
        let weights = mamba2::weights::Weights::from_files(&files.weights, &Device::Cpu).unwrap();
        let st = Mamba2Model::from_weights(&config, &weights, DType::F32).unwrap();
        let gguf = gguf_model(case, DType::F32);
        let p = prefill_len(&r);
        let (a, ca) = decode(&gguf, ids, p);
        let (b, cb) = decode(&st, ids, p);
        let e = max_abs_diff(&a, &b);
        println!(
            "{}: GGUF vs safetensors (llama.cpp semantics) {e:.3e}",
            case.name
        );
        assert!(e <= 2e-5, "{}: {e}", case.name);
        let s = max_state_diff(&ca, &cb);
        println!("{}: final states {s:.3e}", case.name);
        assert!(s <= 2e-5, "{}: {s}", case.name);
        // What the two changes cost against HF's own model (no bound: they change the model).
        println!(
            "{}: GGUF vs HF's own model {:.3e}",
            case.name,
            max_abs_diff(&gguf.forward(ids, None).unwrap(), &r["logits_prefill"])
        );
    }
}

fn max_state_diff(a: &Mamba2Cache, b: &Mamba2Cache) -> f32 {
    let mut worst = 0f32;
    for i in 0..a.n_layer() {
        worst = worst.max(max_abs_diff(a.conv_state(i), b.conv_state(i)));
        worst = worst.max(max_abs_diff(a.ssm_state(i), b.ssm_state(i)));
    }
    for i in 0..a.n_kv() {
        let (ka, kb) = (a.kv(i), b.kv(i));
        worst = worst.max(max_abs_diff(
            &ka.keys().unwrap().unwrap(),
            &kb.keys().unwrap().unwrap(),
        ));
        worst = worst.max(max_abs_diff(
            &ka.values().unwrap().unwrap(),
            &kb.values().unwrap().unwrap(),
        ));
    }
    assert_eq!((a.n_layer(), a.n_kv()), (b.n_layer(), b.n_kv()));
    assert!(a.n_layer() > 0 && a.n_kv() > 0);
    worst
}

/// The GGUF config equals the HF config read from `config.json` in llama.cpp's semantics, except
/// what a GGUF does not carry (flavour, chunk size, dt clamp, `expand`) and the multipliers, which it
/// holds folded into the tensors.
#[test]
fn falcon_h1_gguf_configs_equal_the_hf_configs() {
    for case in [&RMSNORM, &TIED] {
        let hf = hf_config_as_llama_cpp_runs_it(case);
        let mut g = Mamba2Config::from_gguf(&open(case)).unwrap();
        assert_eq!(g.family, mamba2::config::Family::FalconH1);
        assert_eq!(g.multipliers, Multipliers::default());
        assert!(
            hf.multipliers != Multipliers::default(),
            "{}: the fixture should exercise the multipliers",
            case.name
        );
        g.flavor = hf.flavor.clone();
        g.chunk_size = hf.chunk_size;
        g.dt_limit = hf.dt_limit;
        g.multipliers = hf.multipliers;
        // Falcon-H1's d_ssm is its own size: `expand` (d_inner / d_model in a GGUF) is unused.
        g.expand = hf.expand;
        assert_eq!(g, hf, "{}", case.name);
        println!("{}: {}", case.name, g.pattern_string());
    }
}
