//! Configs of the hybrid families (Granite-4.0-H, Nemotron-H, Falcon-H1, Bamba), read as their
//! Hub repos publish them and as transformers 5.x re-saves them. Defaults are those of the
//! transformers config class of each family; semantics follow its modeling code (see
//! `tests/fixtures/hybrid/README.md`).

use serde_json::Value;

use super::blocks::{
    blocks_from_pattern, AttentionConfig, BlockKind, BlockSpec, Family, MlpActivation, MlpConfig,
    Multipliers, RopeConfig,
};
use super::json::Fields;
use super::{ConfigFlavor, Mamba2Config};
use crate::error::{Error, Result};

/// The Mamba-2 mixer part shared by every family, with the family's own key names.
struct MambaKeys {
    heads: &'static str,
    head_dim: &'static str,
    groups: &'static str,
    state: &'static str,
    conv: &'static str,
    expand: &'static str,
    chunk: &'static str,
    conv_bias: &'static str,
    proj_bias: &'static str,
}

const MAMBA_PREFIXED: MambaKeys = MambaKeys {
    heads: "mamba_n_heads",
    head_dim: "mamba_d_head",
    groups: "mamba_n_groups",
    state: "mamba_d_state",
    conv: "mamba_d_conv",
    expand: "mamba_expand",
    chunk: "mamba_chunk_size",
    conv_bias: "mamba_conv_bias",
    proj_bias: "mamba_proj_bias",
};

/// `mamba_d_head`: an integer, or `"auto"` (`d_inner / n_heads`).
fn head_dim_auto(f: &Fields<'_>, key: &str, d_inner: usize, heads: usize) -> Result<usize> {
    match f.get(key) {
        None => Ok(d_inner.checked_div(heads).unwrap_or(0)),
        Some(Value::String(s)) if s == "auto" => Ok(d_inner.checked_div(heads).unwrap_or(0)),
        Some(_) => f.usize(key).map(|v| v.unwrap_or(0)),
    }
}

/// `hidden_act` / `mamba_hidden_act` must be SiLU where the family uses it.
fn require_silu(f: &Fields<'_>, key: &str) -> Result<()> {
    match f.string(key)? {
        None | Some("silu") | Some("swish") => Ok(()),
        Some(other) => Err(Error::field(
            f.path(key),
            format!("`{other}` is not supported (only silu)"),
        )),
    }
}

/// The RoPE base: `rope_parameters.rope_theta` (transformers 5.x) or a top-level `rope_theta`
/// (Hub configs), 10000 when neither is given. Only the default rope type is implemented.
fn rope_theta(f: &Fields<'_>) -> Result<f64> {
    let params = f.object("rope_parameters")?;
    let scaling = f.object("rope_scaling")?;
    for (key, obj) in [("rope_parameters", params), ("rope_scaling", scaling)] {
        let Some(obj) = obj else { continue };
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(|v| v.as_str());
        if let Some(kind) = kind.filter(|k| *k != "default") {
            return Err(Error::Unsupported(format!(
                "{}: {key}.rope_type `{kind}` (only the default RoPE is implemented)",
                f.origin
            )));
        }
    }
    let nested = params
        .map(|p| Fields::new(p, "rope_parameters.", f.origin).f64("rope_theta"))
        .transpose()?
        .flatten();
    let theta = match nested {
        Some(t) => t,
        None => f.f64("rope_theta")?.unwrap_or(10000.0),
    };
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::field(
            "rope_theta",
            format!("must be finite and > 0, got {theta}"),
        ));
    }
    Ok(theta)
}

/// `layer_types` / `layers_block_type` entries of Granite and Nemotron-H, old and new names.
fn kind_of_layer_type(t: &str) -> Option<std::result::Result<BlockKind, String>> {
    Some(Ok(match t {
        "mamba" | "linear_attention" => BlockKind::Mamba,
        "attention" | "full_attention" => BlockKind::Attention,
        "mlp" => BlockKind::Mlp,
        "moe" => BlockKind::Moe,
        _ => return None,
    }))
}

/// The layer types listed under `layer_types` or `layers_block_type`, mapped to block kinds.
fn listed_layer_types(f: &Fields<'_>) -> Result<Option<(String, Vec<BlockKind>)>> {
    for key in ["layer_types", "layers_block_type"] {
        let Some(list) = f.strings(key)? else {
            continue;
        };
        let kinds = list
            .iter()
            .enumerate()
            .map(|(i, t)| match kind_of_layer_type(t) {
                Some(Ok(k)) => Ok(k),
                Some(Err(msg)) => Err(Error::field(format!("{key}[{i}]"), format!("`{t}`: {msg}"))),
                None => Err(Error::field(
                    format!("{key}[{i}]"),
                    format!("unknown layer type `{t}`"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(Some((key.to_string(), kinds)));
    }
    Ok(None)
}

/// Fails unless `len` layers were listed where the config says `n_layer`.
fn check_layer_count(key: &str, len: usize, n_layer: usize) -> Result<()> {
    if len != n_layer {
        return Err(Error::field(
            key,
            format!("lists {len} layers but num_hidden_layers is {n_layer}"),
        ));
    }
    Ok(())
}

/// A mixer block followed by an MLP block for every layer (Granite, Falcon-H1, Bamba).
fn mixer_then_mlp(mixers: &[BlockKind]) -> Vec<BlockSpec> {
    mixer_then(mixers, BlockKind::Mlp)
}

/// A mixer block followed by a `second` block (MLP or MoE) for every layer.
fn mixer_then(mixers: &[BlockKind], second: BlockKind) -> Vec<BlockSpec> {
    mixers
        .iter()
        .enumerate()
        .flat_map(|(layer, &kind)| {
            [
                BlockSpec { kind, layer },
                BlockSpec {
                    kind: second,
                    layer,
                },
            ]
        })
        .collect()
}

/// The attention settings shared by the families; `head_dim` defaults to hidden / heads.
fn attention(
    f: &Fields<'_>,
    d_model: usize,
    kv_default: Option<usize>,
) -> Result<(usize, usize, usize)> {
    let heads = f.usize("num_attention_heads")?.unwrap_or(32);
    let kv = f
        .usize("num_key_value_heads")?
        .or(kv_default)
        .unwrap_or(heads);
    let head_dim = match f.usize("head_dim")? {
        Some(d) => d,
        None => d_model.checked_div(heads).unwrap_or(0),
    };
    Ok((heads, kv, head_dim))
}

/// The base config of a hybrid, with the Mamba-2 mixer read from `keys`.
#[allow(clippy::too_many_arguments)]
fn base(
    f: &Fields<'_>,
    family: Family,
    keys: &MambaKeys,
    d_model: usize,
    n_layer: usize,
    vocab_size: usize,
    d_inner: Option<usize>,
    defaults: (usize, usize, usize, usize), // (heads, groups, d_state, chunk)
) -> Result<Mamba2Config> {
    let expand = f.usize(keys.expand)?.unwrap_or(2);
    let nheads = f.usize(keys.heads)?.unwrap_or(defaults.0);
    let d_inner = d_inner.unwrap_or_else(|| expand.saturating_mul(d_model));
    let headdim = head_dim_auto(f, keys.head_dim, d_inner, nheads)?;
    let proj_bias = f.bool(keys.proj_bias)?.unwrap_or(false);
    Ok(Mamba2Config {
        flavor: ConfigFlavor::HfTransformers,
        family,
        pattern: Vec::new(),
        attention: None,
        mlp: None,
        moe: None,
        multipliers: Multipliers::default(),
        gated_norm: true,
        out_proj_bias: proj_bias,
        d_model,
        n_layer,
        vocab_size,
        pad_vocab_size_multiple: 1,
        d_state: f.usize(keys.state)?.unwrap_or(defaults.2),
        d_conv: f.usize(keys.conv)?.unwrap_or(4),
        expand,
        headdim,
        nheads,
        ngroups: f.usize(keys.groups)?.unwrap_or(defaults.1),
        d_inner: nheads.saturating_mul(headdim),
        chunk_size: f.usize(keys.chunk)?.unwrap_or(defaults.3),
        dt_limit: f
            .f64_pair("time_step_limit")?
            .unwrap_or((0.0, f64::INFINITY)),
        bias: proj_bias,
        conv_bias: f.bool(keys.conv_bias)?.unwrap_or(true),
        norm_eps: f.f64("rms_norm_eps")?.unwrap_or(1e-5),
        // The residual stream is kept in f32 for every hybrid (HF keeps it in the activation
        // dtype): accumulation stays in f32 whatever the weights are.
        residual_in_fp32: true,
        tie_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
        norm_before_gate: false,
        bos_token_id: f.token_id("bos_token_id")?.unwrap_or(Some(1)),
        eos_token_ids: f.token_ids("eos_token_id")?.unwrap_or_else(|| vec![2]),
        pad_token_id: f.token_id("pad_token_id")?.unwrap_or(Some(0)),
    })
}

fn required_sizes(f: &Fields<'_>) -> Result<(usize, usize)> {
    let d_model = f.required("hidden_size", f.usize("hidden_size")?)?;
    let vocab = f.required("vocab_size", f.usize("vocab_size")?)?;
    Ok((d_model, vocab))
}

/// IBM Granite-4.0-H (`granitemoehybrid`), dense (`num_local_experts: 0`).
pub(super) fn parse_granite(f: &Fields<'_>) -> Result<Mamba2Config> {
    let (d_model, vocab) = required_sizes(f)?;
    let n_layer = f.required("num_hidden_layers", f.usize("num_hidden_layers")?)?;
    let shared = f.usize("shared_intermediate_size")?.unwrap_or(1024);
    let moe = super::moe::granite_moe(f, shared)?;
    require_silu(f, "hidden_act")?;
    let mixers = match listed_layer_types(f)? {
        Some((key, kinds)) => {
            check_layer_count(&key, kinds.len(), n_layer)?;
            if let Some(i) = kinds
                .iter()
                .position(|k| matches!(k, BlockKind::Mlp | BlockKind::Moe))
            {
                return Err(Error::field(
                    format!("{key}[{i}]"),
                    "`mlp` / `moe` is not a Granite mixer (expected mamba or attention)",
                ));
            }
            kinds
        }
        None => vec![BlockKind::Mamba; n_layer],
    };
    let mut c = base(
        f,
        Family::GraniteHybrid,
        &MAMBA_PREFIXED,
        d_model,
        n_layer,
        vocab,
        None,
        (128, 1, 256, 256),
    )?;
    c.norm_eps = f.f64("rms_norm_eps")?.unwrap_or(1e-6);
    // With experts, each layer's second block is the MoE beside the shared_mlp.
    let second = match moe {
        Some(_) => BlockKind::Moe,
        None => BlockKind::Mlp,
    };
    c.pattern = mixer_then(&mixers, second);
    c.moe = moe;
    let (heads, kv, head_dim) = attention(f, d_model, None)?;
    let rope = match f.string("position_embedding_type")? {
        Some("rope") => Some(RopeConfig {
            theta: rope_theta(f)?,
            rotary_dim: head_dim,
        }),
        None | Some("nope") => None,
        Some(other) => {
            return Err(Error::field(
                "position_embedding_type",
                format!("`{other}` is not supported (rope or nope)"),
            ))
        }
    };
    c.attention = Some(AttentionConfig {
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        scale: f.f64("attention_multiplier")?.unwrap_or(1.0),
        rope,
        bias: f.bool("attention_bias")?.unwrap_or(false),
    });
    c.mlp = Some(MlpConfig {
        intermediate_size: shared,
        activation: MlpActivation::SwiGlu,
        bias: false,
    });
    let logits_scaling = f.f64("logits_scaling")?.unwrap_or(1.0);
    if !(logits_scaling.is_finite() && logits_scaling != 0.0) {
        return Err(Error::field(
            "logits_scaling",
            format!("must be finite and non-zero, got {logits_scaling}"),
        ));
    }
    c.multipliers = Multipliers {
        embedding: f.f64("embedding_multiplier")?.unwrap_or(1.0),
        residual: f.f64("residual_multiplier")?.unwrap_or(1.0),
        logits: 1.0 / logits_scaling,
        ..Multipliers::default()
    };
    c.bos_token_id = f.token_id("bos_token_id")?.unwrap_or(Some(1));
    c.pad_token_id = f.token_id("pad_token_id")?.unwrap_or(None);
    Ok(c)
}

/// NVIDIA Nemotron-H (`nemotron_h`): one block per letter of `hybrid_override_pattern`, or per
/// entry of `layers_block_type`.
pub(super) fn parse_nemotron_h(f: &Fields<'_>) -> Result<Mamba2Config> {
    let (d_model, vocab) = required_sizes(f)?;
    let (key, kinds) = match (f.string("hybrid_override_pattern")?, listed_layer_types(f)?) {
        (_, Some((key, kinds))) => (key, kinds),
        (Some(p), None) => {
            let blocks = blocks_from_pattern(p)
                .map_err(|msg| Error::field("hybrid_override_pattern", msg))?;
            (
                "hybrid_override_pattern".to_string(),
                blocks.iter().map(|b| b.kind).collect(),
            )
        }
        (None, None) => {
            return Err(Error::field(
                "hybrid_override_pattern",
                "missing: neither it nor layers_block_type gives the layer layout",
            ))
        }
    };
    let n_layer = match f.usize("num_hidden_layers")? {
        Some(n) => {
            check_layer_count(&key, kinds.len(), n)?;
            n
        }
        None => kinds.len(),
    };
    require_silu(f, "mamba_hidden_act")?;
    match f.string("mlp_hidden_act")? {
        None | Some("relu2") => {}
        Some(other) => {
            return Err(Error::field(
                "mlp_hidden_act",
                format!("`{other}` is not supported (only relu2)"),
            ))
        }
    }
    let keys = MambaKeys {
        heads: "mamba_num_heads",
        head_dim: "mamba_head_dim",
        groups: if f.get("mamba_n_groups").is_some() {
            "mamba_n_groups"
        } else {
            "n_groups"
        },
        state: "ssm_state_size",
        conv: if f.get("mamba_d_conv").is_some() {
            "mamba_d_conv"
        } else {
            "conv_kernel"
        },
        expand: if f.get("mamba_expand").is_some() {
            "mamba_expand"
        } else {
            "expand"
        },
        chunk: if f.get("mamba_chunk_size").is_some() {
            "mamba_chunk_size"
        } else {
            "chunk_size"
        },
        conv_bias: if f.get("mamba_conv_bias").is_some() {
            "mamba_conv_bias"
        } else {
            "use_conv_bias"
        },
        proj_bias: "use_bias",
    };
    let mut c = base(
        f,
        Family::NemotronH,
        &keys,
        d_model,
        n_layer,
        vocab,
        None,
        (128, 8, 128, 128),
    )?;
    // `mamba_head_dim` is independent of hidden_size * expand here.
    c.headdim = f.usize("mamba_head_dim")?.unwrap_or(64);
    c.d_inner = c.nheads.saturating_mul(c.headdim);
    c.norm_eps = f.f64("layer_norm_epsilon")?.unwrap_or(1e-5);
    // The chunked scan of HF's NemotronHMamba2Mixer clamps dt to (time_step_min, inf) whatever
    // `time_step_limit` says; the step uses the same limit here.
    let dt_min_key = if f.get("mamba_dt_min").is_some() {
        "mamba_dt_min"
    } else {
        "time_step_min"
    };
    c.dt_limit = (f.f64(dt_min_key)?.unwrap_or(0.001), f64::INFINITY);
    c.pattern = kinds
        .iter()
        .enumerate()
        .map(|(layer, &kind)| BlockSpec { kind, layer })
        .collect();
    if kinds.contains(&BlockKind::Moe) {
        c.moe = Some(super::moe::nemotron_moe(f)?);
    }
    let (heads, kv, _) = attention(f, d_model, Some(8))?;
    // transformers reads `head_dim`; the v1 Hub configs spell it `attention_head_dim`.
    let head_dim = match f.usize("head_dim")? {
        Some(d) => d,
        None => f.usize("attention_head_dim")?.unwrap_or(128),
    };
    c.attention = Some(AttentionConfig {
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        scale: (head_dim as f64).powf(-0.5),
        rope: None,
        // HF builds q/k/v/o without bias whatever `attention_bias` says.
        bias: false,
    });
    c.mlp = Some(MlpConfig {
        intermediate_size: f.usize("intermediate_size")?.unwrap_or(21504),
        activation: MlpActivation::ReluSquared,
        bias: f.bool("mlp_bias")?.unwrap_or(false),
    });
    Ok(c)
}

/// A list field of exactly `N` numbers.
fn fixed_list<const N: usize>(f: &Fields<'_>, key: &str) -> Result<Option<[f64; N]>> {
    match f.f64s(key)? {
        None => Ok(None),
        Some(v) => <[f64; N]>::try_from(v.as_slice())
            .map(Some)
            .map_err(|_| Error::field(key, format!("must list {N} numbers, got {}", v.len()))),
    }
}

/// TII Falcon-H1 (`falcon_h1`): attention and Mamba-2 in parallel in every layer.
pub(super) fn parse_falcon_h1(f: &Fields<'_>) -> Result<Mamba2Config> {
    let (d_model, vocab) = required_sizes(f)?;
    let n_layer = f.required("num_hidden_layers", f.usize("num_hidden_layers")?)?;
    require_silu(f, "hidden_act")?;
    let d_ssm = match f.get("mamba_d_ssm") {
        // An explicit null means expand * hidden_size.
        None if f.obj.contains_key("mamba_d_ssm") => None,
        None => Some(1024),
        Some(_) => f.usize("mamba_d_ssm")?,
    };
    let mut c = base(
        f,
        Family::FalconH1,
        &MAMBA_PREFIXED,
        d_model,
        n_layer,
        vocab,
        d_ssm,
        (128, 1, 256, 256),
    )?;
    c.out_proj_bias = f.bool("projectors_bias")?.unwrap_or(false);
    c.gated_norm = f.bool("mamba_rms_norm")?.unwrap_or(false);
    c.norm_before_gate = f.bool("mamba_norm_before_gate")?.unwrap_or(true);
    c.pattern = mixer_then_mlp(&vec![BlockKind::MambaAttention; n_layer]);
    (c.attention, c.mlp) = rope_attention_and_swiglu(f, d_model, 1)?;
    let [mlp_gate, mlp_down] = fixed_list::<2>(f, "mlp_multipliers")?.unwrap_or([1.0; 2]);
    c.multipliers = Multipliers {
        embedding: f.f64("embedding_multiplier")?.unwrap_or(1.0),
        logits: f.f64("lm_head_multiplier")?.unwrap_or(1.0),
        residual: 1.0,
        attention_in: f.f64("attention_in_multiplier")?.unwrap_or(1.0),
        attention_out: f.f64("attention_out_multiplier")?.unwrap_or(1.0),
        key: f.f64("key_multiplier")?.unwrap_or(1.0),
        ssm_in: f.f64("ssm_in_multiplier")?.unwrap_or(1.0),
        ssm_out: f.f64("ssm_out_multiplier")?.unwrap_or(1.0),
        ssm_zxbcdt: fixed_list::<5>(f, "ssm_multipliers")?.unwrap_or([1.0; 5]),
        mlp_gate,
        mlp_down,
    };
    Ok(c)
}

/// The attention of Falcon-H1 and Bamba (head_dim^-0.5 scale, RoPE on `head_dim / rotary_div`
/// channels, 8 KV heads by default) and their SwiGLU MLP.
fn rope_attention_and_swiglu(
    f: &Fields<'_>,
    d_model: usize,
    rotary_div: usize,
) -> Result<(Option<AttentionConfig>, Option<MlpConfig>)> {
    let (heads, kv, head_dim) = attention(f, d_model, Some(8))?;
    let attention = AttentionConfig {
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        scale: (head_dim as f64).powf(-0.5),
        rope: Some(RopeConfig {
            theta: rope_theta(f)?,
            rotary_dim: head_dim / rotary_div,
        }),
        bias: f.bool("attention_bias")?.unwrap_or(false),
    };
    let mlp = MlpConfig {
        intermediate_size: f.usize("intermediate_size")?.unwrap_or(14336),
        activation: MlpActivation::SwiGlu,
        bias: f.bool("mlp_bias")?.unwrap_or(false),
    };
    Ok((Some(attention), Some(mlp)))
}

/// IBM Bamba (`bamba`): attention at `attn_layer_indices`, Mamba-2 elsewhere, SwiGLU MLPs.
pub(super) fn parse_bamba(f: &Fields<'_>) -> Result<Mamba2Config> {
    let (d_model, vocab) = required_sizes(f)?;
    let n_layer = f.required("num_hidden_layers", f.usize("num_hidden_layers")?)?;
    require_silu(f, "hidden_act")?;
    let mut mixers = vec![BlockKind::Mamba; n_layer];
    for (i, idx) in f
        .usizes("attn_layer_indices")?
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        match mixers.get_mut(idx) {
            Some(k) => *k = BlockKind::Attention,
            None => {
                return Err(Error::field(
                    format!("attn_layer_indices[{i}]"),
                    format!("layer {idx} does not exist (num_hidden_layers is {n_layer})"),
                ))
            }
        }
    }
    let mut c = base(
        f,
        Family::Bamba,
        &MAMBA_PREFIXED,
        d_model,
        n_layer,
        vocab,
        None,
        (128, 1, 256, 256),
    )?;
    c.pattern = mixer_then_mlp(&mixers);
    // transformers' BambaConfig sets partial_rotary_factor to 0.5 whatever the file says.
    (c.attention, c.mlp) = rope_attention_and_swiglu(f, d_model, 2)?;
    Ok(c)
}
