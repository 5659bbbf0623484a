//! Total and active parameter counts and the bytes a decode step reads (issue 16), against a
//! count made here from the fixture checkpoints' tensors (tests/fixtures/moe) and their
//! `num_experts_per_tok`: a token uses `top_k` of the `num_experts` routed experts of each MoE
//! block and reads every other weight except the embedding table (one row).

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use mamba2::weights::Weights;
use mamba2::{Mamba2Config, Mamba2Model};
use std::path::{Path, PathBuf};

fn dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/moe")
        .join(case)
        .join("hf")
}

/// Counted from the checkpoint file: elements of all tensors, of the routed experts' weights,
/// of the embedding table; the routed share `(num_experts - top_k) / num_experts` a token skips.
struct FileCounts {
    total: usize,
    routed: usize,
    embedding: usize,
    skipped_share: (usize, usize),
}

fn file_counts(case: &str) -> FileCounts {
    let d = dir(case);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        json["tie_word_embeddings"], false,
        "{case}: the count assumes untied"
    );
    let e = json
        .get("num_local_experts")
        .or(json.get("n_routed_experts"))
        .and_then(|v| v.as_u64())
        .unwrap() as usize;
    let k = json["num_experts_per_tok"].as_u64().unwrap() as usize;
    let tensors =
        candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut c = FileCounts {
        total: 0,
        routed: 0,
        embedding: 0,
        skipped_share: (e - k, e),
    };
    for (name, t) in &tensors {
        let n = t.elem_count();
        c.total += n;
        if name.contains("block_sparse_moe.input_linear")
            || name.contains("block_sparse_moe.output_linear")
            || name.contains(".mixer.experts.")
        {
            c.routed += n;
        }
        if name.ends_with("embed_tokens.weight") || name.ends_with("embeddings.weight") {
            c.embedding += n;
        }
    }
    assert!(c.routed > 0, "{case}: no routed experts found");
    c
}

impl FileCounts {
    fn skipped(&self) -> usize {
        self.routed / self.skipped_share.1 * self.skipped_share.0
    }
}

fn load(case: &str, dtype: DType, quantize: Option<GgmlDType>) -> Mamba2Model {
    let d = dir(case);
    let cfg = Mamba2Config::from_file(&d.join("config.json")).unwrap();
    let w = Weights::from_files(&[d.join("model.safetensors")], &Device::Cpu).unwrap();
    Mamba2Model::from_weights_quantized(&cfg, &w, dtype, quantize).unwrap()
}

const CASES: [&str; 3] = [
    "granite_moe_b2",
    "nemotron_moe_flat_b1",
    "nemotron_moe_grouped_b2",
];

#[test]
fn active_parameters_and_bytes_follow_top_k() {
    for case in CASES {
        let f = file_counts(case);
        let active = f.total - f.skipped();
        let m = load(case, DType::F32, None);
        assert_eq!(m.num_parameters(), f.total, "{case}: total");
        assert_eq!(m.num_active_parameters(), active, "{case}: active");
        assert_eq!(m.weight_bytes(), 4 * f.total, "{case}: weight bytes");
        // Every f32 weight a token uses except the embedding table (one row of it).
        assert_eq!(
            m.weight_bytes_per_token(),
            4 * (active - f.embedding),
            "{case}: bytes per token"
        );
        let state = m.config().ssm_state_bytes();
        assert!(state > 0);
        assert_eq!(
            m.decode_bytes_per_token(),
            4 * (active - f.embedding) + state
        );

        // bf16: the same counts; the bytes are fewer (router and per-channel tensors stay f32).
        let b = load(case, DType::BF16, None);
        assert_eq!(b.num_active_parameters(), active, "{case}: bf16 active");
        assert!(b.weight_bytes_per_token() < m.weight_bytes_per_token() * 3 / 4);

        // Quantized at load: the routed experts stay dense f32, so the bytes a token does not
        // read are the skipped experts' f32 bytes plus the (q8_0) embedding table.
        let q = load(case, DType::F32, Some(GgmlDType::Q8_0));
        assert_eq!(q.num_active_parameters(), active, "{case}: q8_0 active");
        let q8_embedding = f.embedding / 32 * 34;
        assert_eq!(
            q.weight_bytes() - q.weight_bytes_per_token(),
            4 * f.skipped() + q8_embedding,
            "{case}: q8_0 bytes not read per token"
        );
        assert!(q.weight_bytes_per_token() < m.weight_bytes_per_token());
    }
}

/// A dense hybrid's active figures are its totals.
#[test]
fn dense_models_are_all_active() {
    let cfg = Mamba2Config::from_json_str(
        r#"{"model_type": "granitemoehybrid", "hidden_size": 32, "vocab_size": 64,
            "num_hidden_layers": 2, "layer_types": ["mamba", "attention"], "mamba_n_heads": 4,
            "mamba_d_head": 16, "mamba_d_state": 8, "num_attention_heads": 4,
            "num_key_value_heads": 2, "shared_intermediate_size": 48, "num_local_experts": 0}"#,
        "inline",
    )
    .unwrap();
    assert!(cfg.moe.is_none());
    let m = Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 0).unwrap();
    assert_eq!(m.num_active_parameters(), m.num_parameters());
    // Random models tie the LM head to the embedding table, which decode then reads whole.
    assert_eq!(m.weight_bytes_per_token(), m.weight_bytes());
}
