//! The pure Mamba-2 config flavours (HF transformers `Mamba2Config`, mamba_ssm `MambaConfig`)
//! and the detection of a config's family from its `model_type` or keys.

use serde_json::{Map, Value};

use super::json::{parse_err, Fields};
use super::{ConfigFlavor, Family, Mamba2Config, Multipliers};
use crate::error::{Error, Result};

/// Model types this engine runs, with their family.
const MODEL_TYPES: [(&str, Family); 5] = [
    ("mamba2", Family::Mamba2),
    ("granitemoehybrid", Family::GraniteHybrid),
    ("nemotron_h", Family::NemotronH),
    ("falcon_h1", Family::FalconH1),
    ("bamba", Family::Bamba),
];

pub(super) fn detect_flavor(
    obj: &Map<String, Value>,
    origin: &str,
) -> Result<(ConfigFlavor, Family)> {
    match obj.get("model_type") {
        Some(Value::String(t)) => {
            return match MODEL_TYPES.iter().find(|(name, _)| name == t) {
                Some(&(_, family)) => Ok((ConfigFlavor::HfTransformers, family)),
                None => Err(Error::Unsupported(format!(
                    "{origin}: model_type `{t}` is not a Mamba-2 model (supported: {})",
                    MODEL_TYPES.map(|(n, _)| format!("`{n}`")).join(", ")
                ))),
            }
        }
        Some(Value::Null) | None => {}
        Some(other) => {
            return Err(parse_err(
                origin,
                format!("field `model_type`: expected a string, got {other}"),
            ))
        }
    }
    match (
        obj.contains_key("d_model") || obj.contains_key("ssm_cfg"),
        obj.contains_key("hidden_size"),
    ) {
        (true, false) => Ok((ConfigFlavor::MambaSsm, Family::Mamba2)),
        (false, true) => Ok((ConfigFlavor::HfTransformers, Family::Mamba2)),
        (true, true) => Err(parse_err(
            origin,
            "has both `hidden_size` (HF transformers) and `d_model`/`ssm_cfg` (mamba_ssm) and no \
             `model_type`; cannot tell which layout it is",
        )),
        (false, false) => Err(parse_err(
            origin,
            "not a Mamba-2 config: neither `hidden_size` (HF transformers Mamba2Config) nor \
             `d_model` (mamba_ssm MambaConfig) is present",
        )),
    }
}

/// HF transformers `Mamba2Config`; defaults are those of transformers' class.
pub(super) fn parse_hf(f: &Fields<'_>) -> Result<Mamba2Config> {
    let d_model = f.required("hidden_size", f.usize("hidden_size")?)?;
    let n_layer = f.required("num_hidden_layers", f.usize("num_hidden_layers")?)?;
    let vocab_size = f.required("vocab_size", f.usize("vocab_size")?)?;
    let nheads = f.usize("num_heads")?.unwrap_or(128);
    let headdim = f.usize("head_dim")?.unwrap_or(64);
    if let Some(act) = f.string("hidden_act")? {
        if act != "silu" && act != "swish" {
            return Err(Error::field(
                "hidden_act",
                format!("`{act}` is not supported (only silu)"),
            ));
        }
    }
    let bias = f.bool("use_bias")?.unwrap_or(false);
    Ok(Mamba2Config {
        flavor: ConfigFlavor::HfTransformers,
        family: Family::Mamba2,
        pattern: Vec::new(),
        attention: None,
        mlp: None,
        moe: None,
        multipliers: Multipliers::default(),
        gated_norm: true,
        out_proj_bias: bias,
        d_model,
        n_layer,
        vocab_size,
        pad_vocab_size_multiple: 1,
        d_state: f.usize("state_size")?.unwrap_or(128),
        d_conv: f.usize("conv_kernel")?.unwrap_or(4),
        expand: f.usize("expand")?.unwrap_or(2),
        headdim,
        nheads,
        ngroups: f.usize("n_groups")?.unwrap_or(8),
        d_inner: nheads.saturating_mul(headdim),
        chunk_size: f.usize("chunk_size")?.unwrap_or(256),
        dt_limit: f
            .f64_pair("time_step_limit")?
            .unwrap_or((0.0, f64::INFINITY)),
        bias,
        conv_bias: f.bool("use_conv_bias")?.unwrap_or(true),
        norm_eps: f.f64("layer_norm_epsilon")?.unwrap_or(1e-5),
        residual_in_fp32: f.bool("residual_in_fp32")?.unwrap_or(true),
        tie_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
        norm_before_gate: false,
        bos_token_id: f.token_id("bos_token_id")?.unwrap_or(Some(0)),
        eos_token_ids: f.token_ids("eos_token_id")?.unwrap_or_else(|| vec![2]),
        pad_token_id: f.token_id("pad_token_id")?.unwrap_or(Some(1)),
    })
}

/// mamba_ssm `MambaConfig`; `ssm_cfg` defaults are those of mamba_ssm's `Mamba2` module.
pub(super) fn parse_mamba_ssm(f: &Fields<'_>) -> Result<Mamba2Config> {
    let d_model = f.required("d_model", f.usize("d_model")?)?;
    let n_layer = f.required("n_layer", f.usize("n_layer")?)?;
    let vocab_size = f.required("vocab_size", f.usize("vocab_size")?)?;
    if f.usize("d_intermediate")?.unwrap_or(0) > 0 {
        return Err(Error::field(
            "d_intermediate",
            "MLP blocks (d_intermediate > 0) are not supported",
        ));
    }
    match f.get("attn_layer_idx") {
        None => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(Value::Array(_)) => {
            return Err(Error::field(
                "attn_layer_idx",
                "attention layers are not supported",
            ))
        }
        Some(v) => return Err(f.type_err("attn_layer_idx", "a list of layer indices", v)),
    }
    if !f.bool("rms_norm")?.unwrap_or(true) {
        return Err(Error::field(
            "rms_norm",
            "LayerNorm blocks (rms_norm: false) are not supported",
        ));
    }
    let empty = Map::new();
    let ssm_obj = f.object("ssm_cfg")?.unwrap_or(&empty);
    let s = Fields::new(ssm_obj, "ssm_cfg.", f.origin);
    match s.string("layer")? {
        Some("Mamba2") => {}
        Some(other) => {
            return Err(Error::field(
                "ssm_cfg.layer",
                format!("`{other}` is not supported (only Mamba2)"),
            ))
        }
        None => {
            return Err(Error::field(
                "ssm_cfg.layer",
                "missing: mamba_ssm then builds Mamba1 layers, which are not supported",
            ))
        }
    }
    if !s.bool("rmsnorm")?.unwrap_or(true) {
        return Err(Error::field(
            "ssm_cfg.rmsnorm",
            "Mamba2 without the gated RMSNorm is not supported",
        ));
    }
    if s.bool("D_has_hdim")?.unwrap_or(false) {
        return Err(Error::field(
            "ssm_cfg.D_has_hdim",
            "a per-channel D is not supported",
        ));
    }
    if let Some(act) = s.string("activation")? {
        if act != "silu" && act != "swish" {
            return Err(Error::field(
                "ssm_cfg.activation",
                format!("`{act}` is not supported (only silu)"),
            ));
        }
    }
    let expand = s.usize("expand")?.unwrap_or(2);
    let headdim = s.usize("headdim")?.unwrap_or(64);
    let d_inner = expand.saturating_mul(d_model);
    if let Some(d_ssm) = s.usize("d_ssm")? {
        if d_ssm != d_inner {
            return Err(Error::field(
                "ssm_cfg.d_ssm",
                format!(
                    "{d_ssm} != expand * d_model = {d_inner}: gated-MLP channels are not supported"
                ),
            ));
        }
    }
    let bias = s.bool("bias")?.unwrap_or(false);
    Ok(Mamba2Config {
        flavor: ConfigFlavor::MambaSsm,
        family: Family::Mamba2,
        pattern: Vec::new(),
        attention: None,
        mlp: None,
        moe: None,
        multipliers: Multipliers::default(),
        gated_norm: true,
        out_proj_bias: bias,
        d_model,
        n_layer,
        vocab_size,
        pad_vocab_size_multiple: f.usize("pad_vocab_size_multiple")?.unwrap_or(8),
        d_state: s.usize("d_state")?.unwrap_or(128),
        d_conv: s.usize("d_conv")?.unwrap_or(4),
        expand,
        headdim,
        // A headdim that does not divide d_inner is caught by validate(); 0 by the size check.
        nheads: d_inner.checked_div(headdim).unwrap_or(0),
        ngroups: s.usize("ngroups")?.unwrap_or(1),
        d_inner,
        chunk_size: s.usize("chunk_size")?.unwrap_or(256),
        dt_limit: s.f64_pair("dt_limit")?.unwrap_or((0.0, f64::INFINITY)),
        bias,
        conv_bias: s.bool("conv_bias")?.unwrap_or(true),
        norm_eps: 1e-5,
        residual_in_fp32: f.bool("residual_in_fp32")?.unwrap_or(true),
        tie_embeddings: f.bool("tie_embeddings")?.unwrap_or(true),
        norm_before_gate: s.bool("norm_before_gate")?.unwrap_or(false),
        bos_token_id: f.token_id("bos_token_id")?.flatten(),
        eos_token_ids: f.token_ids("eos_token_id")?.unwrap_or_default(),
        pad_token_id: f.token_id("pad_token_id")?.flatten(),
    })
}
