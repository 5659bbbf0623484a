//! Shared by the GGUF hybrid tests (`gguf_hybrid.rs`, `gguf_falcon_h1.rs`): fixture paths,
//! the HF references of `tests/fixtures/hybrid/<case>/`, prefill + token-by-token decode, and
//! the logits and state checks against HF.
#![allow(dead_code)]

use super::common::max_abs_diff;
use candle_core::{DType, Device, IndexOp, Tensor};
use mamba2::gguf::GgufFile;
use mamba2::pipeline::load_model;
use mamba2::{Mamba2Cache, Mamba2Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct Case {
    pub name: &'static str,
    /// Max |ours f32 - HF f32| on the logits.
    pub tol: f32,
}

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn gguf_path(case: &Case) -> PathBuf {
    root().join(format!("tests/fixtures/gguf/hybrid/{}.f32.gguf", case.name))
}

pub fn open(case: &Case) -> GgufFile {
    GgufFile::open(&gguf_path(case)).unwrap()
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let p = root().join(format!(
        "tests/fixtures/hybrid/{name}/reference.safetensors"
    ));
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

pub fn prefill_len(r: &HashMap<String, Tensor>) -> usize {
    r["prefill_len"].to_vec1::<i64>().unwrap()[0] as usize
}

pub fn hub_dir(name: &str) -> PathBuf {
    root().join(format!("tests/fixtures/hybrid/{name}/hub"))
}

pub fn safetensors_model(name: &str, dtype: DType) -> Mamba2Model {
    let dir = hub_dir(name);
    let files = mamba2::hub::resolve_model(dir.to_str().unwrap(), &Default::default()).unwrap();
    load_model(&files, dtype, &Device::Cpu).unwrap()
}

/// `prefill` tokens in one forward, then one `step` per token; logits `(batch, seq, vocab)`.
pub fn decode(model: &Mamba2Model, ids: &Tensor, prefill: usize) -> (Tensor, Mamba2Cache) {
    let (batch, seq) = ids.dims2().unwrap();
    let mut cache = model.new_cache(batch).unwrap();
    let mut out = vec![model
        .forward(&ids.narrow(1, 0, prefill).unwrap(), Some(&mut cache))
        .unwrap()];
    for t in prefill..seq {
        let step = model.step(&ids.i((.., t)).unwrap(), &mut cache).unwrap();
        out.push(step.unsqueeze(1).unwrap());
    }
    (Tensor::cat(&out, 1).unwrap(), cache)
}

/// Prefill and decode of every batch row against HF's f32 logits; returns the decode cache.
pub fn check_logits(case: &Case, model: &Mamba2Model, tol: f32) -> Mamba2Cache {
    let r = reference(case.name);
    let ids = &r["input_ids"];
    let what = format!("{} [{:?}]", case.name, model.dtype());
    let prefill = model.forward(ids, None).unwrap();
    let e = max_abs_diff(&prefill, &r["logits_prefill"]);
    println!("{what}: prefill vs HF max|diff| {e:.3e} (tolerance {tol:.1e})");
    assert!(e <= tol, "{what}: prefill differs from HF by {e} > {tol}");
    let (dec, cache) = decode(model, ids, prefill_len(&r));
    let e = max_abs_diff(&dec, &r["logits_decode"]);
    println!("{what}: decode vs HF max|diff| {e:.3e}");
    assert!(e <= tol, "{what}: decode differs from HF by {e} > {tol}");
    cache
}

/// The decode run's final SSM states and KV caches against HF's, by layer: the keys only match
/// when the q/k rows the converter permuted are read back in HF's order.
pub fn check_states(case: &Case, model: &Mamba2Model, cache: &Mamba2Cache, tol: f32) {
    let r = reference(case.name);
    let (mut si, mut ki, mut worst) = (0, 0, 0f32);
    for b in model.config().blocks().iter() {
        let l = b.layer;
        let mut diffs = Vec::new();
        if b.kind.has_ssm() {
            diffs.push(max_abs_diff(
                cache.conv_state(si),
                &r[&format!("conv_state.{l}")],
            ));
            diffs.push(max_abs_diff(
                cache.ssm_state(si),
                &r[&format!("ssm_state.{l}")],
            ));
            si += 1;
        }
        if b.kind.has_kv() {
            let kv = cache.kv(ki);
            diffs.push(max_abs_diff(
                &kv.keys().unwrap().unwrap(),
                &r[&format!("key.{l}")],
            ));
            diffs.push(max_abs_diff(
                &kv.values().unwrap().unwrap(),
                &r[&format!("value.{l}")],
            ));
            ki += 1;
        }
        for e in diffs {
            assert!(
                e <= tol,
                "{}: layer {l} state differs from HF by {e}",
                case.name
            );
            worst = worst.max(e);
        }
    }
    assert_eq!((si, ki), (cache.n_layer(), cache.n_kv()));
    println!("{}: final states vs HF max|diff| {worst:.3e}", case.name);
}

pub fn gguf_model(case: &Case, dtype: DType) -> Mamba2Model {
    Mamba2Model::from_gguf(&open(case), dtype, &Device::Cpu, None).unwrap()
}
