//! Config parsing: both flavors on real checkpoint configs, defaults, non-finite literals and
//! every error case naming its field.

use mamba2::config::{parse_json_lenient, read_generation_eos, ConfigFlavor, Mamba2Config};
use mamba2::Error;

/// state-spaces/mamba2-130m `config.json` (mamba_ssm layout), verbatim.
const SSM_130M: &str = r#"{
    "d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
    "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {},
    "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true,
    "pad_vocab_size_multiple": 16, "tie_embeddings": true
}"#;

/// An HF `Mamba2ForCausalLM` config as written by transformers 4.4x (bare `Infinity`).
const HF_130M: &str = r#"{
  "architectures": ["Mamba2ForCausalLM"], "bos_token_id": 0, "chunk_size": 256,
  "conv_kernel": 4, "eos_token_id": 0, "expand": 2, "head_dim": 64, "hidden_act": "silu",
  "hidden_size": 768, "initializer_range": 0.1, "layer_norm_epsilon": 1e-05,
  "model_type": "mamba2", "n_groups": 1, "norm_before_gate": false, "num_heads": 24,
  "num_hidden_layers": 24, "pad_token_id": 0, "rescale_prenorm_residual": false,
  "residual_in_fp32": true, "rms_norm": true, "state_size": 128, "tie_word_embeddings": true,
  "time_step_floor": 0.0001, "time_step_limit": [0.0, Infinity], "time_step_max": 0.1,
  "time_step_min": 0.001, "time_step_rank": 48, "torch_dtype": "float32",
  "use_bias": false, "use_cache": true, "use_conv_bias": true, "vocab_size": 50288
}"#;

fn parse(json: &str) -> Mamba2Config {
    Mamba2Config::from_json_str(json, "test.json").unwrap_or_else(|e| panic!("{e}"))
}

/// The `field` of a ConfigField error (panics on any other outcome).
fn field_error(json: &str) -> String {
    match Mamba2Config::from_json_str(json, "test.json") {
        Err(Error::ConfigField { field, .. }) => field,
        other => panic!("expected ConfigField, got {other:?}"),
    }
}

/// The message of a ConfigParse error (panics on any other outcome).
fn parse_error(json: &str) -> String {
    match Mamba2Config::from_json_str(json, "test.json") {
        Err(Error::ConfigParse { path, message }) => {
            assert_eq!(path, "test.json");
            message
        }
        other => panic!("expected ConfigParse, got {other:?}"),
    }
}

/// A mamba_ssm config with `ssm_cfg` entries `ssm` and extra top-level entries `top`.
fn ssm(ssm: &str, top: &str) -> String {
    let sep = if top.is_empty() { "" } else { "," };
    format!(
        r#"{{"d_model": 64, "n_layer": 2, "vocab_size": 100{sep}{top},
            "ssm_cfg": {{"layer": "Mamba2", "d_state": 16, "headdim": 16{}{ssm}}}}}"#,
        if ssm.is_empty() { "" } else { "," }
    )
}

/// An HF config (64 wide, 8 heads of 16, 2 groups) with extra entries `extra` (later keys win).
fn hf(extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { "," };
    format!(
        r#"{{"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100,
            "num_heads": 8, "head_dim": 16, "n_groups": 2, "state_size": 16{sep}{extra}}}"#
    )
}

#[test]
fn state_spaces_130m() {
    let c = parse(SSM_130M);
    assert_eq!(c.flavor, ConfigFlavor::MambaSsm);
    assert_eq!((c.d_model, c.n_layer, c.vocab_size), (768, 24, 50277));
    assert_eq!(c.padded_vocab_size(), 50288);
    assert_eq!(
        (c.d_state, c.d_conv, c.expand, c.headdim, c.ngroups),
        (128, 4, 2, 64, 1)
    );
    assert_eq!((c.nheads, c.d_inner, c.chunk_size), (24, 1536, 256));
    assert_eq!(c.conv_dim(), 1536 + 2 * 128);
    assert_eq!(c.d_in_proj(), 2 * 1536 + 2 * 128 + 24);
    assert_eq!(c.dt_limit, (0.0, f64::INFINITY));
    assert!(!c.bias && c.conv_bias && c.residual_in_fp32 && c.tie_embeddings);
    assert!(!c.norm_before_gate);
    assert_eq!(c.norm_eps, 1e-5);
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id),
        (None, vec![], None)
    );
    // The same shape as the benchmark preset.
    assert_eq!(c, Mamba2Config::preset("130m").unwrap());
}

#[test]
fn hf_130m_with_bare_infinity() {
    let c = parse(HF_130M);
    assert_eq!(c.flavor, ConfigFlavor::HfTransformers);
    assert_eq!(
        (c.d_model, c.n_layer, c.vocab_size, c.padded_vocab_size()),
        (768, 24, 50288, 50288)
    );
    assert_eq!(c.pad_vocab_size_multiple, 1);
    assert_eq!(
        (c.nheads, c.headdim, c.d_inner, c.ngroups),
        (24, 64, 1536, 1)
    );
    assert_eq!(c.dt_limit, (0.0, f64::INFINITY));
    assert!(c.tie_embeddings);
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id),
        (Some(0), vec![0], Some(0))
    );
}

#[test]
fn hf_ignores_norm_before_gate_key_like_transformers() {
    // Mamba-Codestral's config says `norm_before_gate: true`, but transformers' Mamba2 ignores
    // the key and always gates before normalising.
    let c = parse(&hf(r#""norm_before_gate": true, "rms_norm": true"#));
    assert!(!c.norm_before_gate);
}

#[test]
fn hf_float_tag_form() {
    // As written by transformers 5.x.
    let c = parse(&hf(
        r#""time_step_limit": [0.0, {"__float__": "Infinity"}]"#,
    ));
    assert_eq!(c.dt_limit, (0.0, f64::INFINITY));
    let c = parse(&hf(r#""time_step_limit": [0.001, 0.1]"#));
    assert_eq!(c.dt_limit, (0.001, 0.1));
}

#[test]
fn hf_defaults_match_transformers() {
    // transformers 5.24 Mamba2Config defaults (the three size fields are required here).
    let c = parse(
        r#"{"model_type": "mamba2", "hidden_size": 4096, "num_hidden_layers": 3, "vocab_size": 32768}"#,
    );
    assert_eq!(
        (c.nheads, c.headdim, c.d_state, c.ngroups),
        (128, 64, 128, 8)
    );
    assert_eq!((c.expand, c.d_conv, c.chunk_size), (2, 4, 256));
    assert_eq!(c.norm_eps, 1e-5);
    assert_eq!(c.dt_limit, (0.0, f64::INFINITY));
    assert!(!c.bias && c.conv_bias && c.residual_in_fp32 && !c.tie_embeddings);
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id),
        (Some(0), vec![2], Some(1))
    );
    // Explicit nulls mean "no such token", not the default.
    let c = parse(&hf(
        r#""bos_token_id": null, "eos_token_id": null, "pad_token_id": null"#,
    ));
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids, c.pad_token_id),
        (None, vec![], None)
    );
    let c = parse(&hf(r#""eos_token_id": [0, 7]"#));
    assert_eq!(c.eos_token_ids, vec![0, 7]);
}

#[test]
fn hf_detected_without_model_type() {
    let c = parse(
        r#"{"hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 10, "num_heads": 8, "head_dim": 16, "n_groups": 1}"#,
    );
    assert_eq!(c.flavor, ConfigFlavor::HfTransformers);
}

#[test]
fn mamba_ssm_defaults() {
    let c = parse(
        r#"{"d_model": 256, "n_layer": 2, "vocab_size": 1000, "ssm_cfg": {"layer": "Mamba2"}}"#,
    );
    assert_eq!(
        (c.d_state, c.d_conv, c.expand, c.headdim, c.ngroups),
        (128, 4, 2, 64, 1)
    );
    assert_eq!((c.nheads, c.d_inner, c.chunk_size), (8, 512, 256));
    assert_eq!(c.dt_limit, (0.0, f64::INFINITY));
    assert!(!c.bias && c.conv_bias && !c.norm_before_gate);
    assert!(c.residual_in_fp32 && c.tie_embeddings);
    assert_eq!(c.pad_vocab_size_multiple, 8); // MambaConfig's default
    assert_eq!(c.padded_vocab_size(), 1000);
    assert_eq!(c.norm_eps, 1e-5);
}

#[test]
fn mamba_ssm_explicit_values() {
    let c = parse(&ssm(
        r#""d_conv": 3, "expand": 1, "ngroups": 2, "chunk_size": 32, "dt_limit": [0.01, 2.5],
           "bias": true, "conv_bias": false, "norm_before_gate": true, "d_ssm": 64,
           "activation": "swish", "rmsnorm": true, "dt_min": 0.001, "A_init_range": [1, 16]"#,
        r#""residual_in_fp32": false, "tie_embeddings": false, "pad_vocab_size_multiple": 64,
           "eos_token_id": 5"#,
    ));
    assert_eq!(
        (c.d_conv, c.expand, c.ngroups, c.chunk_size, c.nheads),
        (3, 1, 2, 32, 4)
    );
    assert_eq!(c.dt_limit, (0.01, 2.5));
    assert!(c.bias && !c.conv_bias && c.norm_before_gate);
    assert!(!c.residual_in_fp32 && !c.tie_embeddings);
    assert_eq!(c.padded_vocab_size(), 128);
    assert_eq!(c.eos_token_ids, vec![5]);
}

#[test]
fn lenient_json_rewrites_literals_only_outside_strings() {
    let v = parse_json_lenient(
        r#"{"a": [Infinity, -Infinity, NaN], "s": "Infinity \"NaN\" -Infinity", "t": "\\", "u": NaN}"#,
        "x",
    )
    .unwrap();
    assert_eq!(v["s"], "Infinity \"NaN\" -Infinity");
    assert_eq!(v["t"], "\\");
    assert_eq!(v["a"][0]["__float__"], "Infinity");
    assert_eq!(v["a"][1]["__float__"], "-Infinity");
    assert_eq!(v["a"][2]["__float__"], "NaN");
    assert_eq!(v["u"]["__float__"], "NaN");
    // A longer identifier is not a literal: still invalid JSON.
    assert!(parse_json_lenient(r#"{"a": Infinityx}"#, "x").is_err());
    assert!(parse_json_lenient(r#"{"a": NaNa}"#, "x").is_err());
}

#[test]
fn type_errors_name_the_field() {
    let cases: [(String, &str); 11] = [
        (hf(r#""hidden_size": "64""#), "`hidden_size`"),
        (hf(r#""num_heads": -8"#), "`num_heads`"),
        (hf(r#""head_dim": 16.5"#), "`head_dim`"),
        (hf(r#""use_bias": 1"#), "`use_bias`"),
        (hf(r#""time_step_limit": [0.0]"#), "`time_step_limit`"),
        (
            hf(r#""time_step_limit": [0.0, "inf"]"#),
            "`time_step_limit`",
        ),
        (
            hf(r#""layer_norm_epsilon": "1e-5""#),
            "`layer_norm_epsilon`",
        ),
        (hf(r#""eos_token_id": "</s>""#), "`eos_token_id`"),
        (hf(r#""bos_token_id": -1"#), "`bos_token_id`"),
        (ssm(r#""d_state": "128""#, ""), "`ssm_cfg.d_state`"),
        (
            ssm(r#""dt_limit": {"__float__": "Infinity"}"#, ""),
            "`ssm_cfg.dt_limit`",
        ),
    ];
    for (json, field) in cases {
        let msg = parse_error(&json);
        assert!(msg.contains(field), "{msg:?} does not name {field}");
    }
    let msg = parse_error(r#"{"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": [1]}"#);
    assert!(msg.contains("`ssm_cfg`"), "{msg}");
    let msg = parse_error(r#"{"model_type": 3, "hidden_size": 1}"#);
    assert!(msg.contains("`model_type`"), "{msg}");
}

#[test]
fn missing_required_fields() {
    assert_eq!(
        field_error(r#"{"model_type": "mamba2", "num_hidden_layers": 2, "vocab_size": 10}"#),
        "hidden_size"
    );
    assert_eq!(
        field_error(r#"{"model_type": "mamba2", "hidden_size": 64, "vocab_size": 10}"#),
        "num_hidden_layers"
    );
    assert_eq!(
        field_error(r#"{"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 1}"#),
        "vocab_size"
    );
    assert_eq!(
        field_error(r#"{"n_layer": 2, "vocab_size": 10, "ssm_cfg": {"layer": "Mamba2"}}"#),
        "d_model"
    );
    assert_eq!(
        field_error(r#"{"d_model": 64, "vocab_size": 10, "ssm_cfg": {"layer": "Mamba2"}}"#),
        "n_layer"
    );
    assert_eq!(
        field_error(r#"{"d_model": 64, "n_layer": 2, "ssm_cfg": {"layer": "Mamba2"}}"#),
        "vocab_size"
    );
    // A null required field counts as missing.
    assert_eq!(field_error(&hf(r#""hidden_size": null"#)), "hidden_size");
}

#[test]
fn inconsistent_values_name_the_field() {
    let cases: Vec<(String, &str)> = vec![
        // HF: expand * hidden_size != num_heads * head_dim.
        (hf(r#""num_heads": 7"#), "num_heads"),
        (hf(r#""expand": 3"#), "num_heads"),
        (hf(r#""n_groups": 3"#), "n_groups"),
        (hf(r#""state_size": 0"#), "state_size"),
        (hf(r#""chunk_size": 0"#), "chunk_size"),
        (hf(r#""num_hidden_layers": 0"#), "num_hidden_layers"),
        (hf(r#""vocab_size": 0"#), "vocab_size"),
        (hf(r#""conv_kernel": 0"#), "conv_kernel"),
        (hf(r#""head_dim": 0"#), "head_dim"),
        (hf(r#""time_step_limit": [0.1, 0.01]"#), "time_step_limit"),
        (
            hf(r#""time_step_limit": [-1.0, Infinity]"#),
            "time_step_limit",
        ),
        (
            hf(r#""time_step_limit": [-Infinity, 1.0]"#),
            "time_step_limit",
        ),
        (hf(r#""time_step_limit": [NaN, 1.0]"#), "time_step_limit"),
        (
            hf(r#""time_step_limit": [0.0, {"__float__": "NaN"}]"#),
            "time_step_limit",
        ),
        (hf(r#""layer_norm_epsilon": 0"#), "layer_norm_epsilon"),
        (hf(r#""hidden_act": "gelu""#), "hidden_act"),
        (hf(r#""hidden_size": 33554432"#), "hidden_size"),
        // mamba_ssm.
        (ssm(r#""headdim": 48"#, ""), "ssm_cfg.headdim"),
        (ssm(r#""headdim": 0"#, ""), "ssm_cfg.headdim"),
        (ssm(r#""ngroups": 3"#, ""), "ssm_cfg.ngroups"),
        (ssm(r#""d_state": 0"#, ""), "ssm_cfg.d_state"),
        (ssm(r#""chunk_size": 0"#, ""), "ssm_cfg.chunk_size"),
        (ssm(r#""expand": 0"#, ""), "ssm_cfg.expand"),
        (ssm(r#""dt_limit": [1.0, 0.5]"#, ""), "ssm_cfg.dt_limit"),
        (ssm(r#""dt_limit": [-0.5, 0.5]"#, ""), "ssm_cfg.dt_limit"),
        (ssm(r#""layer": "Mamba1""#, ""), "ssm_cfg.layer"),
        (ssm(r#""rmsnorm": false"#, ""), "ssm_cfg.rmsnorm"),
        (ssm(r#""D_has_hdim": true"#, ""), "ssm_cfg.D_has_hdim"),
        (ssm(r#""d_ssm": 64"#, r#""d_model": 128"#), "ssm_cfg.d_ssm"),
        (ssm(r#""activation": "relu""#, ""), "ssm_cfg.activation"),
        (ssm("", r#""attn_layer_idx": [1]"#), "attn_layer_idx"),
        (ssm("", r#""d_intermediate": 128"#), "d_intermediate"),
        (ssm("", r#""rms_norm": false"#), "rms_norm"),
        (
            ssm("", r#""pad_vocab_size_multiple": 0"#),
            "pad_vocab_size_multiple",
        ),
        (ssm("", r#""n_layer": 0"#), "n_layer"),
        (
            r#"{"d_model": 64, "n_layer": 2, "vocab_size": 10, "ssm_cfg": {}}"#.into(),
            "ssm_cfg.layer",
        ),
        (
            r#"{"d_model": 64, "n_layer": 2, "vocab_size": 10}"#.into(),
            "ssm_cfg.layer",
        ),
    ];
    for (json, field) in cases {
        assert_eq!(field_error(&json), field, "for {json}");
    }
}

#[test]
fn error_messages_are_specific() {
    let e = Mamba2Config::from_json_str(&hf(r#""num_heads": 7"#), "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hidden_size * expand") && e.contains("112"),
        "{e}"
    );
    let e = Mamba2Config::from_json_str(&hf(r#""hidden_size": null"#), "cfg/x.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("cfg/x.json"), "{e}");
}

#[test]
fn not_a_mamba2_config() {
    assert!(matches!(
        Mamba2Config::from_json_str(r#"{"model_type": "mamba", "hidden_size": 768}"#, "x"),
        Err(Error::Unsupported(m)) if m.contains("`mamba`")
    ));
    assert!(parse_error(r#"{"n_embd": 768}"#).contains("not a Mamba-2 config"));
    assert!(parse_error(r#"{"hidden_size": 64, "d_model": 64}"#).contains("both"));
    assert!(parse_error("[1, 2]").contains("not a JSON object"));
    assert!(parse_error(r#"{"d_model": 64,"#).contains("invalid JSON"));
    assert!(parse_error("").contains("invalid JSON"));
}

#[test]
fn from_file_and_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, SSM_130M).unwrap();
    assert_eq!(Mamba2Config::from_file(&path).unwrap().d_model, 768);
    std::fs::write(&path, "{nope").unwrap();
    match Mamba2Config::from_file(&path) {
        Err(Error::ConfigParse { path: p, .. }) => assert_eq!(p, path.display().to_string()),
        other => panic!("{other:?}"),
    }
    let missing = dir.path().join("absent.json");
    assert!(
        matches!(Mamba2Config::from_file(&missing), Err(Error::Io { path, .. }) if path == missing)
    );
}

#[test]
fn presets_have_real_shapes() {
    for (name, d_model, n_layer) in [
        ("130m", 768, 24),
        ("370m", 1024, 48),
        ("780m", 1536, 48),
        ("1.3b", 2048, 48),
        ("2.7B", 2560, 64),
    ] {
        let c = Mamba2Config::preset(name).unwrap();
        assert_eq!((c.d_model, c.n_layer), (d_model, n_layer), "{name}");
        assert_eq!((c.vocab_size, c.padded_vocab_size()), (50277, 50288));
        assert_eq!(
            (
                c.d_state,
                c.headdim,
                c.ngroups,
                c.expand,
                c.d_conv,
                c.chunk_size
            ),
            (128, 64, 1, 2, 4, 256)
        );
        assert_eq!(c.nheads, 2 * d_model / 64);
        assert!(c.tie_embeddings && c.residual_in_fp32);
        c.validate().unwrap();
    }
    assert_eq!(Mamba2Config::preset("mamba2-370m").unwrap().d_model, 1024);
    assert!(
        matches!(Mamba2Config::preset("7b"), Err(Error::ConfigField { field, .. }) if field == "preset")
    );
}

#[test]
fn validate_catches_edited_configs() {
    let mut c = Mamba2Config::preset("130m").unwrap();
    c.ngroups = 5;
    assert!(
        matches!(c.validate(), Err(Error::ConfigField { field, .. }) if field == "ssm_cfg.ngroups")
    );
    let mut c = Mamba2Config::preset("130m").unwrap();
    c.nheads = 23;
    assert!(
        matches!(c.validate(), Err(Error::ConfigField { field, .. }) if field == "ssm_cfg.headdim")
    );
}

#[test]
fn generation_config_eos() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("generation_config.json");
    let eos = |text: &str| {
        std::fs::write(&path, text).unwrap();
        read_generation_eos(&path)
    };
    assert_eq!(
        eos(r#"{"eos_token_id": 0, "temperature": NaN}"#).unwrap(),
        vec![0]
    );
    assert_eq!(
        eos(r#"{"eos_token_id": [1, 2, 32000]}"#).unwrap(),
        vec![1, 2, 32000]
    );
    assert_eq!(eos(r#"{"eos_token_id": null}"#).unwrap(), Vec::<u32>::new());
    assert_eq!(eos(r#"{"bos_token_id": 1}"#).unwrap(), Vec::<u32>::new());
    assert!(
        matches!(eos(r#"{"eos_token_id": [1, "x"]}"#), Err(Error::ConfigParse { message, .. }) if message.contains("eos_token_id"))
    );
    assert!(matches!(
        eos(r#"{"eos_token_id": 1.5}"#),
        Err(Error::ConfigParse { .. })
    ));
    assert!(matches!(eos("[]"), Err(Error::ConfigParse { .. })));
    assert!(matches!(
        read_generation_eos(&dir.path().join("none.json")),
        Err(Error::Io { .. })
    ));
}
