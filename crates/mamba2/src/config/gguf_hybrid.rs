//! Configs of the hybrid GGUF architectures, read as llama.cpp reads them
//! (`src/models/granite-hybrid.cpp`, `src/models/nemotron-h.cpp`, `src/llama-model.cpp`) from
//! what `convert_hf_to_gguf.py` writes (`conversion/granite.py`, `conversion/nemotron.py`).
//!
//! `granitehybrid` (Granite-4.0-H; Bamba converts to it too): a layer is attention when its
//! `attention.head_count_kv` entry is > 0, else Mamba-2; every layer then has a SwiGLU MLP of
//! `expert_shared_feed_forward_length` (else `feed_forward_length`) rows, or, when
//! `expert_count` > 0, a MoE block of `feed_forward_length`-wide experts beside that MLP. `embedding_scale`,
//! `residual_scale`, `logit_scale` (logits are divided by it) and `attention.scale` are
//! Granite's multipliers, unfolded (0 or absent: no scaling, `head_dim^-0.5` for attention).
//! RoPE is on unless `rope.scaling.finetuned` is false: the converter writes false for every
//! model with Mamba layers except Bamba, so Granite-4.0-H files are NoPE whatever their HF
//! `position_embedding_type` said, as llama.cpp runs them.
//!
//! `nemotron_h` / `nemotron_h_moe`: a layer is an MLP (ReLU²) when its `feed_forward_length`
//! entry is not 0, a MoE block instead when `expert_count` is not 0 either (llama.cpp then builds
//! every such layer as MoE), attention when its `attention.head_count_kv` entry is > 0, else
//! Mamba-2; no RoPE. The file
//! has no `time_step_min`: dt is not clamped (limit (0, inf)), as llama.cpp runs it, where HF's
//! chunked scan clamps dt to `time_step_min` (see `tests/gguf_hybrid.rs` for what that costs).
//!
//! `falcon-h1`: every layer runs attention and the Mamba-2 mixer on the same normed input, sums
//! them, then a SwiGLU MLP (`src/models/falcon-h1.cpp`). The converter multiplies every µP
//! multiplier into the tensors (`conversion/falcon_h1.py`), so the file's model has all of them
//! 1, with two consequences it does not record: a tied model's lm_head_multiplier is lost (the
//! output matrix is token_embd, already scaled by embedding_multiplier), and llama.cpp has no
//! `mamba_norm_before_gate` (it gates, then normalises). The config says what llama.cpp runs;
//! `tests/gguf_hybrid.rs` checks it against HF with those two settings changed. RoPE is
//! NeoX-style (HF's rotate-half), so q/k are stored unpermuted; the grouped norm is on when the
//! file has `ssm_norm` tensors (HF `mamba_rms_norm`).
//!
//! No architecture here stores a chunk size (it does not change the result): 256 is used.

use super::gguf_moe;
use super::{token_ids, vocab_rows, Keys, SsmSizes};
use crate::config::{
    AttentionConfig, BlockKind, BlockSpec, ConfigFlavor, Family, Mamba2Config, MlpActivation,
    MlpConfig, Multipliers, RopeConfig,
};
use crate::error::{Error, Result};
use crate::gguf::{GgufError, GgufFile};

fn has(file: &GgufFile, name: &str) -> bool {
    file.tensor_info(name).is_some()
}

fn missing(keys: &Keys<'_>, k: &str) -> Error {
    GgufError::MissingKey {
        path: keys.path(),
        key: keys.key(k),
    }
    .into()
}

/// Falcon-H1 has no MoE variant: refused, naming the key that says the file has experts.
fn refuse_experts(keys: &Keys<'_>) -> Result<()> {
    match gguf_moe::expert_count(keys)? {
        0 => Ok(()),
        n => Err(Error::Unsupported(format!(
            "{}: {} {n} > 0 (mixture of experts) is not supported for this architecture",
            keys.path(),
            keys.key("expert_count")
        ))),
    }
}

/// The one value a per-layer key has on `layers` (the layers of one kind); the config holds one
/// value per kind, so layers that differ are refused.
fn uniform(keys: &Keys<'_>, k: &str, values: &[usize], layers: &[usize]) -> Result<usize> {
    let first = layers.first().map_or(0, |&l| values[l]);
    match layers.iter().find(|&&l| values[l] != first) {
        Some(&l) => Err(Error::Unsupported(format!(
            "{}: {}[{l}] is {} where layer {} has {first} (layers of one kind must agree)",
            keys.path(),
            keys.key(k),
            values[l],
            layers[0]
        ))),
        None => Ok(first),
    }
}

/// A Granite scale: llama.cpp applies it only when it is non-zero.
fn scale(keys: &Keys<'_>, k: &str) -> Result<Option<f64>> {
    Ok(keys.float(k)?.filter(|&v| v != 0.0))
}

/// The config every GGUF architecture shares: sizes, Mamba-2 mixer (its biases looked up in the
/// first Mamba layer; layer 0 for `mamba2`, whose pattern is empty: every layer is Mamba), block
/// pattern, vocabulary, tying and token ids.
pub(super) fn base(
    keys: &Keys<'_>,
    family: Family,
    pattern: Vec<BlockSpec>,
    norm_eps: f64,
) -> Result<Mamba2Config> {
    let file = keys.file;
    let d_model = keys.required("embedding_length")?;
    let n_layer = keys.required("block_count")?;
    let ssm = SsmSizes::read(keys)?;
    let mamba = match pattern.is_empty() {
        true => Some(0),
        false => pattern.iter().find(|b| b.kind.has_ssm()).map(|b| b.layer),
    };
    let ssm_bias = |leaf: &str| mamba.is_some_and(|l| has(file, &format!("blk.{l}.{leaf}")));
    let (bos_token_id, eos_token_ids, pad_token_id) = token_ids(file)?;
    Ok(Mamba2Config {
        flavor: ConfigFlavor::Gguf,
        family,
        pattern,
        attention: None,
        mlp: None,
        moe: None,
        multipliers: Multipliers::default(),
        gated_norm: true,
        out_proj_bias: ssm_bias("ssm_out.bias"),
        d_model,
        n_layer,
        vocab_size: vocab_rows(file, d_model)?,
        pad_vocab_size_multiple: 1,
        d_state: ssm.d_state,
        d_conv: ssm.d_conv,
        expand: (ssm.d_inner / d_model.max(1)).max(1),
        headdim: ssm.d_inner / ssm.nheads,
        nheads: ssm.nheads,
        ngroups: ssm.ngroups,
        d_inner: ssm.d_inner,
        chunk_size: 256,
        dt_limit: (0.0, f64::INFINITY),
        bias: ssm_bias("ssm_in.bias"),
        conv_bias: ssm_bias("ssm_conv1d.bias"),
        norm_eps,
        residual_in_fp32: true,
        tie_embeddings: !has(file, "output.weight"),
        norm_before_gate: false,
        bos_token_id,
        eos_token_ids,
        pad_token_id,
    })
}

/// The attention settings of the layers `attn` (None when there are none): heads from
/// `attention.head_count` (scalar or per layer), key/value heads from `kv`, head size from
/// `attention.key_length` (else `embedding_length / head_count`, llama.cpp's default).
fn attention(
    keys: &Keys<'_>,
    d_model: usize,
    kv: &[usize],
    attn: &[usize],
    rope: bool,
    scale: Option<f64>,
) -> Result<Option<AttentionConfig>> {
    let Some(&first) = attn.first() else {
        return Ok(None);
    };
    let heads_key = "attention.head_count";
    let heads = keys
        .per_layer(heads_key, kv.len())?
        .ok_or_else(|| missing(keys, heads_key))?;
    let num_heads = uniform(keys, heads_key, &heads, attn)?;
    let num_kv_heads = uniform(keys, "attention.head_count_kv", kv, attn)?;
    if num_heads == 0 {
        return Err(Error::field(
            format!("{}[{first}]", keys.key(heads_key)),
            "an attention layer needs at least one head",
        ));
    }
    let head_dim = match keys.optional("attention.key_length")? {
        Some(d) => d,
        None => d_model / num_heads,
    };
    if let Some(v) = keys.optional("attention.value_length")? {
        if v != head_dim {
            return Err(Error::Unsupported(format!(
                "{}: {} {v} differs from the key length {head_dim}",
                keys.path(),
                keys.key("attention.value_length")
            )));
        }
    }
    // The converter permutes q/k rows in pairs within each head (llama.cpp's RoPE layout);
    // the model source undoes it, which needs an even head size.
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::field(
            keys.key("attention.key_length"),
            format!("head size {head_dim} must be even and > 0"),
        ));
    }
    let rope = match rope {
        false => None,
        true => {
            if let Some(t) = keys.file.get_str(&keys.key("rope.scaling.type"))? {
                if t != "none" {
                    return Err(Error::Unsupported(format!(
                        "{}: {} `{t}` (only unscaled RoPE is implemented)",
                        keys.path(),
                        keys.key("rope.scaling.type")
                    )));
                }
            }
            let rotary_dim = keys.optional("rope.dimension_count")?.unwrap_or(head_dim);
            if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
                return Err(Error::field(
                    keys.key("rope.dimension_count"),
                    format!("rotates {rotary_dim} channels of a {head_dim}-channel head; must be even, > 0 and <= the head size"),
                ));
            }
            Some(RopeConfig {
                theta: keys.float("rope.freq_base")?.unwrap_or(10000.0),
                rotary_dim,
            })
        }
    };
    let f = keys.file;
    Ok(Some(AttentionConfig {
        num_heads,
        num_kv_heads,
        head_dim,
        scale: scale.unwrap_or((head_dim as f64).powf(-0.5)),
        rope,
        bias: has(f, &format!("blk.{first}.attn_q.bias")),
    }))
}

fn layers_of(pattern: &[BlockSpec], kind: BlockKind) -> Vec<usize> {
    pattern
        .iter()
        .filter(|b| b.kind == kind)
        .map(|b| b.layer)
        .collect()
}

/// `granitehybrid`: every layer a mixer (Mamba-2 or attention) followed by a SwiGLU MLP, or by
/// a MoE block beside that MLP.
pub(super) fn granite(file: &GgufFile) -> Result<Mamba2Config> {
    let keys = Keys::new(file)?;
    let experts = gguf_moe::expert_count(&keys)?;
    let second = match experts {
        0 => BlockKind::Mlp,
        _ => BlockKind::Moe,
    };
    let n_layer = keys.required("block_count")?;
    let kv_key = "attention.head_count_kv";
    let kv = keys
        .per_layer(kv_key, n_layer)?
        .ok_or_else(|| missing(&keys, kv_key))?;
    let pattern: Vec<BlockSpec> = kv
        .iter()
        .enumerate()
        .flat_map(|(layer, &n)| {
            let kind = if n > 0 {
                BlockKind::Attention
            } else {
                BlockKind::Mamba
            };
            [
                BlockSpec { kind, layer },
                BlockSpec {
                    kind: second,
                    layer,
                },
            ]
        })
        .collect();
    let eps_key = "attention.layer_norm_rms_epsilon";
    let eps = keys
        .float(eps_key)?
        .ok_or_else(|| missing(&keys, eps_key))?;
    let attn = layers_of(&pattern, BlockKind::Attention);
    let mut c = base(&keys, Family::GraniteHybrid, pattern, eps)?;
    // llama.cpp: "Granite uses rope_finetuned as a switch for rope, so default to true".
    let rope = file
        .get_bool(&keys.key("rope.scaling.finetuned"))?
        .unwrap_or(true);
    let attn_scale = scale(&keys, "attention.scale")?;
    c.attention = attention(&keys, c.d_model, &kv, &attn, rope, attn_scale)?;
    // The dense shared MLP: the converter writes shared_intermediate_size as
    // expert_shared_feed_forward_length and intermediate_size (the routed experts' width when
    // there are experts) as feed_forward_length; older dense files may have only the latter.
    let ff_key = "feed_forward_length";
    let all: Vec<usize> = (0..n_layer).collect();
    let ff = || -> Result<usize> {
        let ff = keys
            .per_layer(ff_key, n_layer)?
            .ok_or_else(|| missing(&keys, ff_key))?;
        uniform(&keys, ff_key, &ff, &all)
    };
    if experts > 0 {
        c.moe = Some(gguf_moe::granite(&keys, experts, ff()?, n_layer, &all)?);
    }
    let intermediate_size = match (c.moe, keys.optional("expert_shared_feed_forward_length")?) {
        (Some(m), _) => m.shared_intermediate_size,
        (None, Some(n)) if n > 0 => n,
        _ => ff()?,
    };
    // HF's shared_mlp has no biases; llama.cpp would add them, this graph cannot.
    for l in 0..n_layer {
        for leaf in ["ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"] {
            let name = format!("blk.{l}.{leaf}");
            if has(file, &name) {
                return Err(Error::Unsupported(format!(
                    "{}: tensor `{name}` (the Granite MLP has no biases)",
                    keys.path()
                )));
            }
        }
    }
    c.mlp = Some(MlpConfig {
        intermediate_size,
        activation: MlpActivation::SwiGlu,
        bias: false,
    });
    c.multipliers = Multipliers {
        embedding: scale(&keys, "embedding_scale")?.unwrap_or(1.0),
        residual: scale(&keys, "residual_scale")?.unwrap_or(1.0),
        logits: scale(&keys, "logit_scale")?.map_or(1.0, |s| 1.0 / s),
        ..Multipliers::default()
    };
    Ok(c)
}

/// `nemotron_h` / `nemotron_h_moe`: one block per layer, Mamba-2, attention, a ReLU² MLP or a
/// MoE block.
pub(super) fn nemotron_h(file: &GgufFile) -> Result<Mamba2Config> {
    let keys = Keys::new(file)?;
    let experts = gguf_moe::expert_count(&keys)?;
    // The converter appends the multi-token-prediction head as extra blocks (counted in
    // block_count); HF's model does not run it.
    if let Some(n) = keys.optional("nextn_predict_layers")?.filter(|&n| n > 0) {
        return Err(Error::Unsupported(format!(
            "{}: {} {n} (multi-token-prediction blocks) is not supported",
            keys.path(),
            keys.key("nextn_predict_layers")
        )));
    }
    let n_layer = keys.required("block_count")?;
    let ff_kind = match experts {
        0 => BlockKind::Mlp,
        _ => BlockKind::Moe,
    };
    let (kv_key, ff_key) = ("attention.head_count_kv", "feed_forward_length");
    let kv = keys
        .per_layer(kv_key, n_layer)?
        .ok_or_else(|| missing(&keys, kv_key))?;
    let ff = keys
        .per_layer(ff_key, n_layer)?
        .ok_or_else(|| missing(&keys, ff_key))?;
    // llama.cpp's order: a layer with a feed-forward length is an MLP whatever its KV heads.
    let pattern: Vec<BlockSpec> = (0..n_layer)
        .map(|layer| BlockSpec {
            kind: match (ff[layer], kv[layer]) {
                (f, _) if f > 0 => ff_kind,
                (_, k) if k > 0 => BlockKind::Attention,
                _ => BlockKind::Mamba,
            },
            layer,
        })
        .collect();
    // llama.cpp reads layer_norm_epsilon and prefers layer_norm_rms_epsilon when present.
    let eps = match keys.float("attention.layer_norm_rms_epsilon")? {
        Some(e) => e,
        None => keys
            .float("attention.layer_norm_epsilon")?
            .ok_or_else(|| missing(&keys, "attention.layer_norm_epsilon"))?,
    };
    let attn = layers_of(&pattern, BlockKind::Attention);
    let mlp = layers_of(&pattern, BlockKind::Mlp);
    let moe = layers_of(&pattern, BlockKind::Moe);
    let mut c = base(&keys, Family::NemotronH, pattern, eps)?;
    // No RoPE, and llama.cpp's Nemotron-H graph ignores attention.scale.
    c.attention = attention(&keys, c.d_model, &kv, &attn, false, None)?;
    if let Some(&first) = mlp.first() {
        c.mlp = Some(MlpConfig {
            intermediate_size: uniform(&keys, ff_key, &ff, &mlp)?,
            activation: MlpActivation::ReluSquared,
            bias: has(file, &format!("blk.{first}.ffn_up.bias")),
        });
    }
    if !moe.is_empty() {
        let m = gguf_moe::nemotron(&keys, experts, &ff, &moe)?;
        // A MoE file has no dense MLP layer (llama.cpp builds every layer with a
        // feed_forward_length as MoE); the shared experts (ReLU², no biases in llama.cpp's graph)
        // stand for it.
        c.mlp = Some(MlpConfig {
            intermediate_size: m.shared_intermediate_size,
            activation: MlpActivation::ReluSquared,
            bias: false,
        });
        c.moe = Some(m);
    }
    Ok(c)
}

/// `falcon-h1`: attention ∥ Mamba-2 on the same normed input, summed, then a SwiGLU MLP, in
/// every layer; all multipliers already folded into the tensors.
pub(super) fn falcon_h1(file: &GgufFile) -> Result<Mamba2Config> {
    let keys = Keys::new(file)?;
    refuse_experts(&keys)?;
    let n_layer = keys.required("block_count")?;
    let pattern: Vec<BlockSpec> = (0..n_layer)
        .flat_map(|layer| {
            [BlockKind::MambaAttention, BlockKind::Mlp].map(|kind| BlockSpec { kind, layer })
        })
        .collect();
    let eps_key = "attention.layer_norm_rms_epsilon";
    let eps = keys
        .float(eps_key)?
        .ok_or_else(|| missing(&keys, eps_key))?;
    let kv_key = "attention.head_count_kv";
    let kv = keys
        .per_layer(kv_key, n_layer)?
        .ok_or_else(|| missing(&keys, kv_key))?;
    let all: Vec<usize> = (0..n_layer).collect();
    let mut c = base(&keys, Family::FalconH1, pattern, eps)?;
    c.attention = attention(&keys, c.d_model, &kv, &all, true, None)?;
    let ff_key = "feed_forward_length";
    let ff = keys
        .per_layer(ff_key, n_layer)?
        .ok_or_else(|| missing(&keys, ff_key))?;
    c.mlp = Some(MlpConfig {
        intermediate_size: uniform(&keys, ff_key, &ff, &all)?,
        activation: MlpActivation::SwiGlu,
        bias: has(file, "blk.0.ffn_up.bias"),
    });
    c.gated_norm = has(file, "blk.0.ssm_norm.weight");
    c.norm_before_gate = false;
    Ok(c)
}
