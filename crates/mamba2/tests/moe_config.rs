//! Mixture-of-experts configs (issue 16): both families in the Hub spelling and transformers'
//! re-save (tests/fixtures/moe), and the typed errors of inconsistent settings.

use mamba2::config::{BlockKind, Mamba2Config, MlpActivation, MoeRouter};
use mamba2::Error;
use std::path::PathBuf;

fn fixture(case: &str, layout: &str) -> Mamba2Config {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/moe")
        .join(case)
        .join(layout)
        .join("config.json");
    Mamba2Config::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const NEMOTRON: &str = r#""model_type": "nemotron_h", "hidden_size": 32, "vocab_size": 64,
    "mamba_num_heads": 2, "mamba_head_dim": 16, "n_groups": 1, "ssm_state_size": 8,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48,
    "hybrid_override_pattern": "ME*E", "moe_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 24"#;

const GRANITE: &str = r#""model_type": "granitemoehybrid", "hidden_size": 32, "vocab_size": 64,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "num_hidden_layers": 2,
    "mamba_d_state": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
    "layer_types": ["mamba", "attention"], "shared_intermediate_size": 48,
    "intermediate_size": 16"#;

fn parse(json: &str) -> mamba2::Result<Mamba2Config> {
    Mamba2Config::from_json_str(json, "test")
}

fn field_error(json: &str, field: &str, needle: &str) {
    match parse(json) {
        Err(Error::ConfigField { field: f, message }) => {
            assert_eq!(f, field, "{message}");
            assert!(message.contains(needle), "{message}");
        }
        other => panic!("expected a {field} error, got {other:?}"),
    }
}

#[test]
fn granite_moe_fixture_parses_in_both_spellings() {
    for layout in ["hf", "hub"] {
        let c = fixture("granite_moe_b2", layout);
        let moe = c.moe.expect("MoE settings");
        assert_eq!(moe.num_experts, 8, "{layout}");
        assert_eq!(moe.top_k, 3);
        assert_eq!(moe.intermediate_size, 16);
        assert_eq!(moe.shared_intermediate_size, 24);
        assert_eq!(moe.activation, MlpActivation::SwiGlu);
        assert_eq!(moe.router, MoeRouter::Softmax);
        // Every layer: its mixer, then the MoE block (experts + shared_mlp).
        assert_eq!(c.pattern_string(), "ME*EME", "{layout}");
    }
    assert_eq!(fixture("granite_moe_b2", "hf"), {
        let mut hub = fixture("granite_moe_b2", "hub");
        hub.flavor = fixture("granite_moe_b2", "hf").flavor;
        hub
    });
}

#[test]
fn nemotron_moe_fixtures_parse_in_both_spellings() {
    for layout in ["hf", "hub"] {
        let c = fixture("nemotron_moe_grouped_b2", layout);
        let moe = c.moe.expect("MoE settings");
        assert_eq!((moe.num_experts, moe.top_k), (8, 3), "{layout}");
        assert_eq!(moe.intermediate_size, 16);
        assert_eq!(moe.shared_intermediate_size, 20);
        assert_eq!(moe.activation, MlpActivation::ReluSquared);
        assert_eq!(
            moe.router,
            MoeRouter::SigmoidGrouped {
                n_group: 4,
                topk_group: 2,
                norm_topk_prob: true,
                routed_scaling_factor: 2.5
            }
        );
        assert_eq!(c.pattern_string(), "ME*E-M", "{layout}");
        let flat = fixture("nemotron_moe_flat_b1", layout);
        assert!(matches!(
            flat.moe.unwrap().router,
            MoeRouter::SigmoidGrouped {
                n_group: 1,
                topk_group: 1,
                norm_topk_prob: false,
                ..
            }
        ));
        assert_eq!(flat.pattern_string(), "EM*E");
    }
}

#[test]
fn dense_configs_have_no_moe() {
    let c = parse(&format!(r#"{{{GRANITE}, "num_local_experts": 0}}"#)).unwrap();
    assert!(c.moe.is_none());
    assert_eq!(c.pattern_string(), "M-*-");
    let c = parse(&format!(
        r#"{{{}, "hybrid_override_pattern": "M-*"}}"#,
        NEMOTRON.replace(r#""hybrid_override_pattern": "ME*E", "#, "")
    ))
    .unwrap();
    assert!(c.moe.is_none());
}

#[test]
fn granite_without_num_local_experts_is_moe_with_hf_defaults() {
    // transformers' GraniteMoeHybridConfig defaults: 8 experts, 2 per token.
    let c = parse(&format!("{{{GRANITE}}}")).unwrap();
    let moe = c.moe.unwrap();
    assert_eq!((moe.num_experts, moe.top_k), (8, 2));
}

#[test]
fn moe_tensor_shapes_follow_the_checkpoint_layout() {
    let c = fixture("nemotron_moe_grouped_b2", "hub");
    let shapes = c.tensor_shapes(c.padded_vocab_size());
    let get = |n: &str| shapes.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone());
    assert_eq!(
        get("backbone.layers.1.mixer.gate.weight"),
        Some(vec![8, 32])
    );
    assert_eq!(
        get("backbone.layers.1.mixer.gate.e_score_correction_bias"),
        Some(vec![8])
    );
    assert_eq!(
        get("backbone.layers.3.mixer.experts.7.down_proj.weight"),
        Some(vec![32, 16])
    );
    assert_eq!(
        get("backbone.layers.3.mixer.shared_experts.up_proj.weight"),
        Some(vec![20, 32])
    );
    let g = fixture("granite_moe_b2", "hf");
    let shapes = g.tensor_shapes(g.padded_vocab_size());
    let get = |n: &str| shapes.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone());
    assert_eq!(
        get("model.layers.2.block_sparse_moe.input_linear.weight"),
        Some(vec![8, 32, 32])
    );
    assert_eq!(
        get("model.layers.2.block_sparse_moe.router.layer.weight"),
        Some(vec![8, 32])
    );
    assert_eq!(
        get("model.layers.2.post_attention_layernorm.weight"),
        Some(vec![32])
    );
    assert_eq!(
        get("model.layers.2.shared_mlp.output_linear.weight"),
        Some(vec![32, 24])
    );
    assert!(g
        .blocks()
        .iter()
        .any(|b| b.kind == BlockKind::Moe && b.layer == 2));
}

#[test]
fn inconsistent_moe_settings_are_typed_errors() {
    field_error(
        &format!(r#"{{{GRANITE}, "num_local_experts": 4, "num_experts_per_tok": 5}}"#),
        "num_experts_per_tok",
        "only 4 experts",
    );
    field_error(
        &format!(r#"{{{NEMOTRON}, "n_routed_experts": 8, "n_group": 4, "topk_group": 5}}"#),
        "topk_group",
        "1..=4",
    );
    field_error(
        &format!(r#"{{{NEMOTRON}, "n_routed_experts": 8, "n_group": 3}}"#),
        "n_group",
        "divide the 8 experts",
    );
    field_error(
        &format!(r#"{{{NEMOTRON}, "n_routed_experts": 8, "n_group": 8, "topk_group": 2}}"#),
        "n_group",
        "at least 2",
    );
    field_error(
        &format!(
            r#"{{{NEMOTRON}, "n_routed_experts": 8, "n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}}"#
        ),
        "num_experts_per_tok",
        "hold only 2",
    );
    field_error(
        &format!(r#"{{{NEMOTRON}, "n_routed_experts": 0}}"#),
        "n_routed_experts",
        "at least 1",
    );
    field_error(
        &format!(r#"{{{NEMOTRON}, "moe_intermediate_size": 0}}"#),
        "moe_intermediate_size",
        "at least 1",
    );
    field_error(
        &format!(r#"{{{GRANITE}, "num_experts_per_tok": 0}}"#),
        "num_experts_per_tok",
        "at least 1",
    );
    match parse(&format!(r#"{{{NEMOTRON}, "moe_latent_size": 8}}"#)) {
        Err(Error::Unsupported(m)) => assert!(m.contains("moe_latent_size"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // A Granite MoE layer type is not a mixer.
    field_error(
        &format!(
            r#"{{{}, "layer_types": ["mamba", "moe"]}}"#,
            GRANITE.replace(r#""layer_types": ["mamba", "attention"], "#, "")
        ),
        "layer_types[1]",
        "not a Granite mixer",
    );
}
