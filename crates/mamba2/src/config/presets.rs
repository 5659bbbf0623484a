//! Shapes of published hybrid checkpoints, for benchmarks on random weights. Each is written as
//! the family's HF config and parsed by the same code as a checkpoint's `config.json`. The
//! values are those of the published configs as transcribed here (the Hub is not reachable from
//! this project's CI); benchmarks only depend on the sizes.

use super::Mamba2Config;
use crate::error::Result;
use serde_json::json;

/// Names accepted by [`Mamba2Config::preset`] besides the pure Mamba-2 sizes.
pub(super) const HYBRID_PRESETS: [&str; 7] = [
    "granite-4.0-h-1b",
    "granite-4.0-h-350m",
    "nemotron-h-8b",
    "nemotron-nano-9b-v2",
    "falcon-h1-0.5b",
    "falcon-h1-1.5b",
    "bamba-9b",
];

/// Granite-4.0-H layer types: attention at `attn`, Mamba elsewhere.
fn granite_layers(n: usize, attn: &[usize]) -> Vec<&'static str> {
    (0..n)
        .map(|i| {
            if attn.contains(&i) {
                "attention"
            } else {
                "mamba"
            }
        })
        .collect()
}

/// A Nemotron-H pattern of `n` layers: Mamba and MLP alternating, attention at `attn`.
fn nemotron_pattern(n: usize, attn: &[usize]) -> String {
    (0..n)
        .map(|i| match (attn.contains(&i), i % 2) {
            (true, _) => '*',
            (false, 0) => 'M',
            (false, _) => '-',
        })
        .collect()
}

pub(super) fn hybrid_preset(key: &str) -> Option<Result<Mamba2Config>> {
    let v = match key {
        "granite-4.0-h-1b" => json!({
            "model_type": "granitemoehybrid", "hidden_size": 1536, "num_hidden_layers": 40,
            "vocab_size": 100352, "num_attention_heads": 12, "num_key_value_heads": 4,
            "layer_types": granite_layers(40, &[10, 13, 17, 27]),
            "mamba_n_heads": 48, "mamba_d_head": 64, "mamba_d_state": 128, "mamba_n_groups": 1,
            "mamba_expand": 2, "mamba_chunk_size": 256, "shared_intermediate_size": 4096,
            "num_local_experts": 0, "position_embedding_type": "nope", "tie_word_embeddings": true,
            "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
            "attention_multiplier": 0.0078125, "logits_scaling": 6.0, "rms_norm_eps": 1e-5
        }),
        "granite-4.0-h-350m" => json!({
            "model_type": "granitemoehybrid", "hidden_size": 768, "num_hidden_layers": 32,
            "vocab_size": 100352, "num_attention_heads": 12, "num_key_value_heads": 4,
            "layer_types": granite_layers(32, &[10, 13, 17, 27]),
            "mamba_n_heads": 48, "mamba_d_head": 32, "mamba_d_state": 128, "mamba_n_groups": 1,
            "mamba_expand": 2, "mamba_chunk_size": 256, "shared_intermediate_size": 2048,
            "num_local_experts": 0, "position_embedding_type": "nope", "tie_word_embeddings": true,
            "embedding_multiplier": 12.0, "residual_multiplier": 0.246,
            "attention_multiplier": 0.015625, "logits_scaling": 3.0, "rms_norm_eps": 1e-5
        }),
        "nemotron-h-8b" => json!({
            "model_type": "nemotron_h", "hidden_size": 4096, "vocab_size": 131072,
            "hybrid_override_pattern": nemotron_pattern(52, &[7, 18, 29, 40]),
            "mamba_num_heads": 128, "mamba_head_dim": 64, "ssm_state_size": 128, "n_groups": 8,
            "conv_kernel": 4, "chunk_size": 128, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 21504,
            "mlp_hidden_act": "relu2", "tie_word_embeddings": false
        }),
        "nemotron-nano-9b-v2" => json!({
            "model_type": "nemotron_h", "hidden_size": 4480, "vocab_size": 131072,
            "hybrid_override_pattern": nemotron_pattern(56, &[13, 21, 31, 41]),
            "mamba_num_heads": 128, "mamba_head_dim": 80, "ssm_state_size": 128, "n_groups": 8,
            "conv_kernel": 4, "chunk_size": 128, "num_attention_heads": 40,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 15680,
            "mlp_hidden_act": "relu2", "tie_word_embeddings": false
        }),
        "falcon-h1-0.5b" => json!({
            "model_type": "falcon_h1", "hidden_size": 1024, "num_hidden_layers": 36,
            "vocab_size": 32784, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 64, "mamba_d_ssm": 1536, "mamba_n_heads": 24, "mamba_d_head": 64,
            "mamba_d_state": 128, "mamba_n_groups": 1, "mamba_chunk_size": 128,
            "mamba_rms_norm": false, "intermediate_size": 2048, "rope_theta": 1e11,
            "tie_word_embeddings": false
        }),
        "falcon-h1-1.5b" => json!({
            "model_type": "falcon_h1", "hidden_size": 2048, "num_hidden_layers": 24,
            "vocab_size": 65537, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 128, "mamba_d_ssm": 3072, "mamba_n_heads": 48, "mamba_d_head": 64,
            "mamba_d_state": 256, "mamba_n_groups": 1, "mamba_chunk_size": 128,
            "mamba_rms_norm": false, "intermediate_size": 6144, "rope_theta": 1e11,
            "tie_word_embeddings": false
        }),
        "bamba-9b" => json!({
            "model_type": "bamba", "hidden_size": 4096, "num_hidden_layers": 32,
            "vocab_size": 128256, "num_attention_heads": 32, "num_key_value_heads": 8,
            "attn_layer_indices": [9, 18, 27], "mamba_n_heads": 128, "mamba_d_head": 64,
            "mamba_d_state": 128, "mamba_n_groups": 1, "mamba_chunk_size": 256,
            "intermediate_size": 14336, "rope_theta": 10000.0, "tie_word_embeddings": false
        }),
        _ => return None,
    };
    Some(Mamba2Config::from_json_str(&v.to_string(), key))
}
