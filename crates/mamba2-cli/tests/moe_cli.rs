//! `mamba2 info` on mixture-of-experts checkpoints (issue 16): total and active parameters and
//! the bytes a decode step reads, against a count made here from the checkpoint's tensors and
//! config (a token uses `num_experts_per_tok` of the `num_experts` routed experts per MoE block,
//! every other weight but the embedding table, plus the recurrent state).

use candle_core::Device;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/moe")
        .join(case)
        .join("hf")
}

fn info(model: &Path, extra: &[&str]) -> Value {
    let o = Command::new(env!("CARGO_BIN_EXE_mamba2"))
        .args([
            "info",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run mamba2");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

#[test]
fn info_reports_active_parameters_and_bytes() {
    for case in ["granite_moe_b2", "nemotron_moe_grouped_b2"] {
        let dir = fixture(case);
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let experts = u(cfg
            .get("num_local_experts")
            .unwrap_or(&cfg["n_routed_experts"]));
        let top_k = u(&cfg["num_experts_per_tok"]);
        let tensors =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let (mut total, mut routed, mut embedding) = (0u64, 0u64, 0u64);
        for (name, t) in &tensors {
            let n = t.elem_count() as u64;
            total += n;
            if name.contains("block_sparse_moe.input_linear")
                || name.contains("block_sparse_moe.output_linear")
                || name.contains(".mixer.experts.")
            {
                routed += n;
            }
            if name.ends_with("embed_tokens.weight") || name.ends_with("embeddings.weight") {
                embedding += n;
            }
        }
        let active = total - routed / experts * (experts - top_k);
        // Recurrent state: conv + SSM state of every Mamba layer, f32.
        let m = |k: &str, alt: &str| u(cfg.get(k).unwrap_or(&cfg[alt]));
        let (heads, head_dim) = (
            m("mamba_n_heads", "mamba_num_heads"),
            m("mamba_d_head", "mamba_head_dim"),
        );
        let (groups, d_state) = (
            m("mamba_n_groups", "n_groups"),
            m("mamba_d_state", "ssm_state_size"),
        );
        let d_conv = m("mamba_d_conv", "conv_kernel");
        let layer_types = cfg
            .get("layer_types")
            .unwrap_or(&cfg["layers_block_type"])
            .as_array()
            .unwrap();
        let n_mamba = layer_types
            .iter()
            .filter(|t| matches!(t.as_str(), Some("mamba" | "linear_attention")))
            .count() as u64;
        let conv_dim = heads * head_dim + 2 * groups * d_state;
        let state = n_mamba * (conv_dim * d_conv + heads * head_dim * d_state) * 4;

        let v = info(&dir, &[]);
        assert_eq!(u(&v["parameters"]), total, "{case}");
        assert_eq!(u(&v["active_parameters"]), active, "{case}");
        assert!(active < total);
        assert_eq!(u(&v["weight_bytes"]), 4 * total, "{case}");
        assert_eq!(
            u(&v["weight_bytes_per_token"]),
            4 * (active - embedding),
            "{case}"
        );
        assert_eq!(u(&v["state_bytes_per_sequence"]), state, "{case}");
        assert_eq!(
            u(&v["decode_bytes_per_token"]),
            4 * (active - embedding) + state,
            "{case}"
        );

        // Quantized at load: the same parameters, fewer bytes, still the active figure (the
        // unread experts' dense f32 bytes and the q8_0 embedding table are not counted).
        let q = info(&dir, &["--quantize", "q8_0"]);
        assert_eq!(q["quantization"], "Q8_0");
        assert_eq!(u(&q["active_parameters"]), active, "{case}");
        let skipped = 4 * (routed / experts * (experts - top_k));
        assert_eq!(
            u(&q["weight_bytes"]) - u(&q["weight_bytes_per_token"]),
            skipped + embedding / 32 * 34,
            "{case}"
        );
    }
}
