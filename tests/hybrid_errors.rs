//! Bad hybrid configs and checkpoints get a typed error naming the field or tensor: a pattern
//! whose length differs from the layer count, an unknown block letter or layer type, KV heads
//! that do not divide the heads, a missing attention or MLP tensor, an unknown `model_type`.

use candle_core::{DType, Device};
use mamba2::{pipeline::load_model, Error, Mamba2Config};
use std::path::Path;

fn parse(json: &str) -> Result<Mamba2Config, Error> {
    Mamba2Config::from_json_str(json, "inline")
}

/// The field a `ConfigField` error names.
fn field_of(r: Result<Mamba2Config, Error>) -> (String, String) {
    match r {
        Err(e @ Error::ConfigField { .. }) => {
            let Error::ConfigField { ref field, .. } = e else {
                unreachable!()
            };
            (field.clone(), e.to_string())
        }
        other => panic!("expected ConfigField, got {other:?}"),
    }
}

const NEMOTRON: &str = r#""model_type": "nemotron_h", "hidden_size": 32, "vocab_size": 64,
    "mamba_num_heads": 2, "mamba_head_dim": 16, "n_groups": 1, "ssm_state_size": 8,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48"#;

const GRANITE: &str = r#""model_type": "granitemoehybrid", "hidden_size": 32, "vocab_size": 64,
    "num_local_experts": 0, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1,
    "mamba_d_state": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
    "shared_intermediate_size": 48"#;

#[test]
fn valid_configs_parse() {
    let c = parse(&format!(
        r#"{{{NEMOTRON}, "hybrid_override_pattern": "M-*M"}}"#
    ))
    .unwrap();
    assert_eq!(c.pattern_string(), "M-*M");
    let c = parse(&format!(
        r#"{{{GRANITE}, "num_hidden_layers": 2, "layer_types": ["mamba", "attention"]}}"#
    ))
    .unwrap();
    assert_eq!(c.pattern_string(), "M-*-");
}

#[test]
fn pattern_length_differs_from_layer_count() {
    let (field, msg) = field_of(parse(&format!(
        r#"{{{NEMOTRON}, "hybrid_override_pattern": "M-*M", "num_hidden_layers": 5}}"#
    )));
    assert_eq!(field, "hybrid_override_pattern", "{msg}");
    assert!(msg.contains("4 layers") && msg.contains('5'), "{msg}");
    let (field, msg) = field_of(parse(&format!(
        r#"{{{GRANITE}, "num_hidden_layers": 3, "layer_types": ["mamba", "attention"]}}"#
    )));
    assert_eq!(field, "layer_types", "{msg}");
}

#[test]
fn unknown_block_letter_or_layer_type() {
    let (field, msg) = field_of(parse(&format!(
        r#"{{{NEMOTRON}, "hybrid_override_pattern": "M-X"}}"#
    )));
    assert_eq!(field, "hybrid_override_pattern");
    assert!(msg.contains("`X`") && msg.contains("layer 2"), "{msg}");
    let (field, msg) = field_of(parse(&format!(
        r#"{{{GRANITE}, "num_hidden_layers": 2, "layer_types": ["mamba", "sliding"]}}"#
    )));
    assert_eq!(field, "layer_types[1]");
    assert!(msg.contains("`sliding`"), "{msg}");
    let (field, _) = field_of(parse(&format!(
        r#"{{{NEMOTRON}, "layers_block_type": ["mamba", "convolution"]}}"#
    )));
    assert_eq!(field, "layers_block_type[1]");
}

#[test]
fn kv_heads_must_divide_heads() {
    let (field, msg) = field_of(parse(&format!(
        r#"{{{NEMOTRON}, "hybrid_override_pattern": "M*", "num_key_value_heads": 3}}"#
    )));
    assert_eq!(field, "num_key_value_heads", "{msg}");
    assert!(
        msg.contains("3 key/value heads") && msg.contains("4 attention heads"),
        "{msg}"
    );
}

#[test]
fn unknown_model_type_is_unsupported() {
    match parse(r#"{"model_type": "jamba", "hidden_size": 8, "vocab_size": 8}"#) {
        Err(Error::Unsupported(m)) => {
            assert!(m.contains("`jamba`") && m.contains("nemotron_h"), "{m}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // MoE configs (issue 16) are parsed since crates/mamba2/tests/moe_config.rs; their errors
    // are tested there.
}

/// A fixture checkpoint with one tensor removed fails to load, naming the tensor.
#[test]
fn missing_attention_or_mlp_tensor_is_named() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hybrid/bamba_b2/hf");
    for missing in [
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.2.feed_forward.up_proj.weight",
        "model.layers.0.mamba.A_log",
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
        let all =
            candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
        let kept: std::collections::HashMap<_, _> =
            all.into_iter().filter(|(k, _)| k != missing).collect();
        candle_core::safetensors::save(&kept, dir.path().join("model.safetensors")).unwrap();
        let files =
            mamba2::hub::resolve_model(dir.path().to_str().unwrap(), &Default::default()).unwrap();
        match load_model(&files, DType::F32, &Device::Cpu) {
            Err(Error::MissingTensor { name, .. }) => assert_eq!(name, missing),
            other => panic!("{missing}: expected MissingTensor, got {other:?}"),
        }
    }
}

/// Every benchmark shape parses and has the layout its family implies.
#[test]
fn hybrid_presets_parse() {
    for (name, letters) in [
        ("granite-4.0-h-1b", "*-"),
        ("granite-4.0-h-350m", "*-"),
        ("nemotron-h-8b", "*"),
        ("nemotron-nano-9b-v2", "*"),
        ("falcon-h1-0.5b", "P-"),
        ("falcon-h1-1.5b", "P-"),
        ("bamba-9b", "*-"),
    ] {
        let c = Mamba2Config::preset(name).unwrap();
        let p = c.pattern_string();
        assert!(p.contains(letters), "{name}: {p}");
        assert!(
            c.kv_bytes_per_token(2) > 0 && c.ssm_state_bytes() > 0,
            "{name}"
        );
    }
    assert_eq!(
        Mamba2Config::preset("nemotron-nano-9b-v2").unwrap().headdim,
        80
    );
}
