//! Bad mixture-of-experts configs and checkpoints get a typed error naming the field or tensor
//! (issue 16): more experts per token than experts, in both families and through the ops; a
//! missing router (Granite's `router.layer`, Nemotron-H's `gate` and its correction bias); expert
//! weights whose stacked shape differs from the config, stored stacked (Granite) or per expert
//! (Nemotron-H), including a missing expert. Edits are made to the fixture checkpoints of
//! tests/fixtures/moe.

use candle_core::{DType, Device, Tensor};
use mamba2::{Error, Mamba2Config, Mamba2Model};
use std::collections::HashMap;
use std::path::Path;

fn fixture(case: &str) -> (Mamba2Config, HashMap<String, Tensor>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/moe")
        .join(case)
        .join("hf");
    let cfg = Mamba2Config::from_file(&dir.join("config.json")).unwrap();
    let t = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    (cfg, t)
}

/// Loads `tensors` written to a file as a checkpoint of `cfg`.
fn load(cfg: &Mamba2Config, tensors: &HashMap<String, Tensor>) -> mamba2::Result<Mamba2Model> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    candle_core::safetensors::save(tensors, &path).unwrap();
    let w = mamba2::weights::Weights::from_files(&[path], &Device::Cpu).unwrap();
    Mamba2Model::from_weights(cfg, &w, DType::F32)
}

fn expect_missing(case: &str, name: &str) {
    let (cfg, mut t) = fixture(case);
    assert!(t.remove(name).is_some(), "{name} is in the fixture");
    match load(&cfg, &t) {
        Err(Error::MissingTensor { name: n, .. }) => assert_eq!(n, name),
        other => panic!(
            "{case} without {name}: expected MissingTensor, got {:?}",
            other.err()
        ),
    }
}

/// Replaces `name` by `edit(original)` and expects a shape error naming it.
fn expect_shape(case: &str, name: &str, edit: impl Fn(&Tensor) -> Tensor) {
    let (cfg, mut t) = fixture(case);
    let bad = edit(&t[name]);
    let dims = bad.dims().to_vec();
    let want = t[name].dims().to_vec();
    t.insert(name.to_string(), bad);
    match load(&cfg, &t) {
        Err(Error::TensorShape {
            name: n,
            got,
            expected,
        }) => {
            assert_eq!(n, name);
            assert_eq!(got, dims, "{name}");
            assert_eq!(expected, want, "{name}");
        }
        other => panic!(
            "{case} {name} {dims:?}: expected TensorShape, got {:?}",
            other.err()
        ),
    }
}

#[test]
fn missing_routers_name_the_tensor() {
    expect_missing(
        "granite_moe_b2",
        "model.layers.2.block_sparse_moe.router.layer.weight",
    );
    expect_missing(
        "nemotron_moe_grouped_b2",
        "backbone.layers.3.mixer.gate.weight",
    );
    expect_missing(
        "nemotron_moe_grouped_b2",
        "backbone.layers.1.mixer.gate.e_score_correction_bias",
    );
    // An expert of the config that the checkpoint lacks.
    expect_missing(
        "nemotron_moe_flat_b1",
        "backbone.layers.3.mixer.experts.5.down_proj.weight",
    );
}

#[test]
fn expert_shapes_that_differ_from_the_config_name_the_tensor() {
    let rows = |n: usize| move |t: &Tensor| t.narrow(0, 0, n).unwrap();
    let cols = |n: usize| move |t: &Tensor| t.narrow(1, 0, n).unwrap();
    // Granite, stacked (E, 2I, H) and (E, H, I): one expert too few, an odd gate|up split,
    // a narrower expert width.
    let g = "granite_moe_b2";
    expect_shape(
        g,
        "model.layers.0.block_sparse_moe.input_linear.weight",
        rows(7),
    );
    expect_shape(
        g,
        "model.layers.1.block_sparse_moe.input_linear.weight",
        |t| t.narrow(1, 0, 31).unwrap(),
    );
    expect_shape(
        g,
        "model.layers.2.block_sparse_moe.output_linear.weight",
        |t| t.narrow(2, 0, 15).unwrap(),
    );
    // The router itself with the wrong number of experts.
    expect_shape(
        g,
        "model.layers.0.block_sparse_moe.router.layer.weight",
        rows(6),
    );
    // Nemotron-H, per expert (I, H) / (H, I), the router (E, H) and the bias (E).
    let n = "nemotron_moe_grouped_b2";
    expect_shape(
        n,
        "backbone.layers.1.mixer.experts.3.up_proj.weight",
        rows(15),
    );
    expect_shape(
        n,
        "backbone.layers.3.mixer.experts.0.down_proj.weight",
        cols(8),
    );
    expect_shape(n, "backbone.layers.1.mixer.gate.weight", rows(4));
    expect_shape(
        n,
        "backbone.layers.3.mixer.gate.e_score_correction_bias",
        rows(7),
    );
}

#[test]
fn more_experts_per_token_than_experts_is_a_config_error() {
    let field = |case: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/moe")
            .join(case)
            .join("hub/config.json");
        // The files spell the infinite `time_step_limit` the way Python writes it.
        let text = std::fs::read_to_string(dir).unwrap();
        let mut v = mamba2::config::parse_json_lenient(&text, case).unwrap();
        edit(&mut v);
        match Mamba2Config::from_json_str(&v.to_string(), case) {
            Err(Error::ConfigField { field, message }) => (field, message),
            other => panic!("{case}: expected ConfigField, got {other:?}"),
        }
    };
    let (f, m) = field("granite_moe_b2", &|v| v["num_experts_per_tok"] = 9.into());
    assert_eq!(f, "num_experts_per_tok", "{m}");
    assert!(
        m.contains("9 experts per token") && m.contains("only 8"),
        "{m}"
    );
    let (f, m) = field("nemotron_moe_flat_b1", &|v| {
        v["num_experts_per_tok"] = 7.into()
    });
    assert_eq!(f, "num_experts_per_tok", "{m}");
    assert!(
        m.contains("only 6") && m.contains("n_routed_experts"),
        "{m}"
    );

    // The op refuses it too (a config built in code skips the file's validation).
    let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let args = mamba2_ops::MoeRouteArgs {
        logits: &logits,
        correction_bias: None,
        top_k: 5,
        routing: mamba2_ops::MoeRouting::Softmax,
    };
    match mamba2_ops::moe_route(&args) {
        Err(mamba2_ops::OpError::Param { param, .. }) => assert_eq!(param, "top_k"),
        other => panic!("expected a top_k error, got {other:?}"),
    }
}
