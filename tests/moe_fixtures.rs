//! End-to-end parity with HF transformers' mixture-of-experts hybrids (issue 16) on
//! `tests/fixtures/moe/*` (made by `scripts/moe_fixtures.py`): GraniteMoeHybrid with experts and
//! Nemotron-H with `E` layers, both config spellings, f32 and bf16, one-shot prefill and
//! prefill-then-step decode (batch 1 and 2), and the experts chosen for every token and MoE layer
//! (read through the debug API `Mamba2Model::record_routing` / `take_routing_trace`).

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::max_abs_diff;
use mamba2::{pipeline::load_model, Mamba2Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Max |ours - HF f32| on logits: f32 1e-4; bf16 0.25 (HF's own bf16 vs f32 on these cases:
/// 0.02-0.10, printed by the generator).
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 0.25,
    }
}

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moe");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures/moe exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.safetensors").exists())
        .collect();
    dirs.sort();
    assert_eq!(
        dirs.len(),
        3,
        "expected the committed MoE fixtures: {dirs:?}"
    );
    dirs
}

fn load(dir: &Path, layout: &str, dtype: DType) -> Mamba2Model {
    let files = mamba2::hub::resolve_model(dir.join(layout).to_str().unwrap(), &Default::default())
        .unwrap();
    load_model(&files, dtype, &Device::Cpu).unwrap()
}

/// Prefill of `p` tokens through a cache, then one `step` per token.
fn decode(model: &Mamba2Model, ids: &Tensor, p: usize) -> Tensor {
    let (batch, seq) = ids.dims2().unwrap();
    let mut cache = model.new_cache(batch).unwrap();
    let mut out = vec![model
        .forward(&ids.narrow(1, 0, p).unwrap(), Some(&mut cache))
        .unwrap()];
    for t in p..seq {
        let step = model.step(&ids.i((.., t)).unwrap(), &mut cache).unwrap();
        out.push(step.unsqueeze(1).unwrap());
    }
    Tensor::cat(&out, 1).unwrap()
}

fn check(dir: &Path, layout: &str, dtype: DType) {
    let r: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = &r["input_ids"];
    let (batch, seq) = ids.dims2().unwrap();
    let p = r["prefill_len"].to_vec1::<i64>().unwrap()[0] as usize;
    let model = load(dir, layout, dtype);
    let name = format!(
        "{} [{layout}, {dtype:?}]",
        dir.file_name().unwrap().to_string_lossy()
    );
    let tol = tolerance(dtype);
    let close = |what: &str, ours: &Tensor, key: &str, tol: f32| {
        let e = max_abs_diff(ours, &r[key]);
        println!("{name}: {what} vs {key} max|diff| {e:.3e}");
        assert!(
            e <= tol,
            "{name}: {what} differs from HF {key} by {e} > {tol}"
        );
    };

    model.record_routing(true);
    let prefill = model.forward(ids, None).unwrap();
    let trace = model.take_routing_trace();
    model.record_routing(false);
    close("prefill", &prefill, "logits_prefill", tol);
    close("decode", &decode(&model, ids, p), "logits_decode", tol);
    if dtype != DType::F32 {
        close("prefill", &prefill, "logits_prefill_bf16", tol);
        return;
    }
    // Routing: the ids of every token and MoE layer equal HF's (as sets; HF's Nemotron-H
    // router returns them in no defined order, the fixture stores them sorted).
    let layers: Vec<usize> = trace.iter().map(|t| t.layer).collect();
    let want: Vec<usize> = r
        .keys()
        .filter_map(|k| k.strip_prefix("routing.").map(|l| l.parse().unwrap()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(layers, want, "{name}: MoE layers");
    for t in &trace {
        assert_eq!(t.ids.len(), 1, "{name}: one forward recorded");
        let ours = t.ids[0].to_vec2::<u32>().unwrap();
        let hf = r[&format!("routing.{}", t.layer)]
            .reshape((batch * seq, ()))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (tok, (o, h)) in ours.iter().zip(&hf).enumerate() {
            let mut o = o.clone();
            o.sort();
            let h: Vec<u32> = h.iter().map(|&v| v as u32).collect();
            assert_eq!(o, h, "{name}: layer {} token {tok}", t.layer);
        }
    }
}

#[test]
fn moe_f32_matches_hf_in_both_layouts() {
    for dir in cases() {
        for layout in ["hf", "hub"] {
            check(&dir, layout, DType::F32);
        }
    }
}

#[test]
fn moe_bf16_matches_hf() {
    for dir in cases() {
        check(&dir, "hf", DType::BF16);
    }
}

/// A checkpoint without a router, or with experts of the wrong stacked shape, is a typed error
/// naming the tensor.
#[test]
fn missing_router_and_wrong_expert_shape_are_typed_errors() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moe/granite_moe_b2/hf");
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let cfg = mamba2::config::Mamba2Config::from_file(&src.join("config.json")).unwrap();
    let router = "model.layers.1.block_sparse_moe.router.layer.weight";
    let experts = "model.layers.0.block_sparse_moe.input_linear.weight";
    for (edit, want) in [(router, "missing"), (experts, "shape")] {
        let dir = tempfile::tempdir().unwrap();
        let mut t = all.clone();
        if want == "missing" {
            t.remove(edit);
        } else {
            let w = t[edit].narrow(0, 0, 7).unwrap();
            t.insert(edit.to_string(), w);
        }
        candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
        let weights = mamba2::weights::Weights::from_files(
            &[dir.path().join("model.safetensors")],
            &Device::Cpu,
        )
        .unwrap();
        match (Mamba2Model::from_weights(&cfg, &weights, DType::F32), want) {
            (Err(mamba2::Error::MissingTensor { name, .. }), "missing") => assert_eq!(name, edit),
            (Err(mamba2::Error::TensorShape { name, got, .. }), "shape") => {
                assert_eq!(name, edit);
                assert_eq!(got, vec![7, 32, 32]);
            }
            (other, _) => panic!("{edit}: expected a {want} error, got {:?}", other.err()),
        }
    }
}
