//! Model configuration: one validated [`Mamba2Config`] read from either an HF-transformers
//! `Mamba2Config` (`config.json` with `hidden_size`, `num_heads`, ...) or a mamba_ssm
//! `MambaConfig` (`d_model`, `n_layer`, `ssm_cfg`, ...).
//!
//! Python writes non-finite floats as bare `Infinity` / `-Infinity` / `NaN` (not JSON), and newer
//! transformers as `{"__float__": "Infinity"}`; both are accepted (see [`parse_json_lenient`]).
//! Missing fields take the defaults of the Python class that wrote the file, except the three that
//! define the model's size (`hidden_size`/`d_model`, `num_hidden_layers`/`n_layer`, `vocab_size`),
//! which are required: a config without them is not a checkpoint's config.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

mod json;
pub use json::parse_json_lenient;
use json::{parse_err, Fields};

/// Upper bound on every size field except the vocabulary (2^24).
const MAX_DIM: usize = 1 << 24;

/// Which Python class wrote the config file; decides the field names used in error messages.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum ConfigFlavor {
    /// HF transformers `Mamba2Config` (`model_type: "mamba2"`, `hidden_size`, `num_heads`, ...).
    HfTransformers,
    /// mamba_ssm `MambaConfig` with `ssm_cfg.layer == "Mamba2"` (`d_model`, `n_layer`, ...).
    MambaSsm,
}

/// A validated Mamba-2 model configuration, independent of the file flavor it came from.
///
/// ```
/// use mamba2::config::Mamba2Config;
/// let cfg = Mamba2Config::from_json_str(
///     r#"{"d_model": 64, "n_layer": 2, "vocab_size": 100,
///         "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16},
///         "pad_vocab_size_multiple": 16}"#,
///     "inline",
/// )?;
/// assert_eq!(cfg.nheads, 8); // expand 2 * d_model 64 / headdim 16
/// assert_eq!(cfg.padded_vocab_size(), 112);
/// assert_eq!(cfg.dt_limit, (0.0, f64::INFINITY));
/// # Ok::<(), mamba2::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Mamba2Config {
    /// Which file layout the config came from.
    pub flavor: ConfigFlavor,
    /// Residual stream width (`hidden_size` / `d_model`).
    pub d_model: usize,
    /// Number of Mamba-2 blocks (`num_hidden_layers` / `n_layer`).
    pub n_layer: usize,
    /// Vocabulary size as written in the config, before padding.
    pub vocab_size: usize,
    /// The embedding has `vocab_size` rounded up to a multiple of this (1 for HF configs).
    pub pad_vocab_size_multiple: usize,
    /// SSM state size per group (`state_size` / `ssm_cfg.d_state`).
    pub d_state: usize,
    /// Causal conv1d kernel width (`conv_kernel` / `ssm_cfg.d_conv`).
    pub d_conv: usize,
    /// Expansion factor of the inner dimension.
    pub expand: usize,
    /// Channels per SSM head (`head_dim` / `ssm_cfg.headdim`).
    pub headdim: usize,
    /// Number of SSM heads (`num_heads`; derived as `d_inner / headdim` for mamba_ssm).
    pub nheads: usize,
    /// Number of B/C groups (`n_groups` / `ssm_cfg.ngroups`).
    pub ngroups: usize,
    /// Inner (SSM) width, `nheads * headdim`.
    pub d_inner: usize,
    /// Chunk length of the chunked SSD scan.
    pub chunk_size: usize,
    /// Clamp range of `dt` after softplus (`time_step_limit` / `ssm_cfg.dt_limit`).
    pub dt_limit: (f64, f64),
    /// Bias in `in_proj` / `out_proj`.
    pub bias: bool,
    /// Bias in the depthwise conv1d.
    pub conv_bias: bool,
    /// Epsilon of every RMSNorm (block norms, gated norm, final norm).
    pub norm_eps: f64,
    /// Keep the residual stream in f32 whatever the activation dtype.
    pub residual_in_fp32: bool,
    /// The output layer shares the embedding matrix.
    pub tie_embeddings: bool,
    /// Gated RMSNorm order: `norm(y) * silu(z)` when true, `norm(y * silu(z))` when false
    /// (false for every known checkpoint; HF hard-codes false).
    pub norm_before_gate: bool,
    /// Beginning-of-sequence token id, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids named by the config (may be empty).
    pub eos_token_ids: Vec<u32>,
    /// Padding token id, if the config names one.
    pub pad_token_id: Option<u32>,
}

impl Mamba2Config {
    /// Parses a config from JSON text, detecting the flavor, then validates it.
    /// `origin` (usually the file path) is used in error messages.
    pub fn from_json_str(s: &str, origin: &str) -> Result<Self> {
        let value = parse_json_lenient(s, origin)?;
        let Value::Object(obj) = &value else {
            return Err(parse_err(origin, "the top level is not a JSON object"));
        };
        let cfg = match detect_flavor(obj, origin)? {
            ConfigFlavor::HfTransformers => parse_hf(&Fields::new(obj, "", origin))?,
            ConfigFlavor::MambaSsm => parse_mamba_ssm(&Fields::new(obj, "", origin))?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a `config.json` file (see [`Mamba2Config::from_json_str`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Rows of the embedding: `vocab_size` rounded up to `pad_vocab_size_multiple`.
    pub fn padded_vocab_size(&self) -> usize {
        let m = self.pad_vocab_size_multiple.max(1);
        self.vocab_size.div_ceil(m) * m
    }

    /// Channels of the depthwise conv: x, B and C, `d_inner + 2 * ngroups * d_state`.
    pub fn conv_dim(&self) -> usize {
        self.d_inner + 2 * self.ngroups * self.d_state
    }

    /// Output width of `in_proj`: z, xBC and dt, `2 * d_inner + 2 * ngroups * d_state + nheads`.
    pub fn d_in_proj(&self) -> usize {
        2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads
    }

    /// Every tensor this config implies, by canonical name, with its exact shape; `embedding_rows`
    /// is the row count of the checkpoint's embedding (usually [`Self::padded_vocab_size`]).
    /// `lm_head.weight` is listed only for untied models; biases only when enabled.
    ///
    /// ```
    /// let cfg = mamba2::config::Mamba2Config::preset("130m")?;
    /// let shapes = cfg.tensor_shapes(cfg.padded_vocab_size());
    /// let params: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    /// assert_eq!(params, 128_989_632); // ~129M, the tied embedding counted once
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn tensor_shapes(&self, embedding_rows: usize) -> Vec<(String, Vec<usize>)> {
        let mut out = vec![(
            "backbone.embeddings.weight".to_string(),
            vec![embedding_rows, self.d_model],
        )];
        for i in 0..self.n_layer {
            let p = format!("backbone.layers.{i}");
            let mut push = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
            push("norm.weight", vec![self.d_model]);
            push("mixer.in_proj.weight", vec![self.d_in_proj(), self.d_model]);
            if self.bias {
                push("mixer.in_proj.bias", vec![self.d_in_proj()]);
            }
            push("mixer.conv1d.weight", vec![self.conv_dim(), 1, self.d_conv]);
            if self.conv_bias {
                push("mixer.conv1d.bias", vec![self.conv_dim()]);
            }
            push("mixer.dt_bias", vec![self.nheads]);
            push("mixer.A_log", vec![self.nheads]);
            push("mixer.D", vec![self.nheads]);
            push("mixer.norm.weight", vec![self.d_inner]);
            push("mixer.out_proj.weight", vec![self.d_model, self.d_inner]);
            if self.bias {
                push("mixer.out_proj.bias", vec![self.d_model]);
            }
        }
        out.push(("backbone.norm_f.weight".to_string(), vec![self.d_model]));
        if !self.tie_embeddings {
            out.push((
                "lm_head.weight".to_string(),
                vec![embedding_rows, self.d_model],
            ));
        }
        out
    }

    /// The name this config's file uses for a canonical field (`"headdim"` is `"head_dim"` in
    /// HF configs and `"ssm_cfg.headdim"` in mamba_ssm configs).
    pub fn field_name(&self, canonical: &str) -> String {
        let hf = self.flavor == ConfigFlavor::HfTransformers;
        let name = match (canonical, hf) {
            ("d_model", true) => "hidden_size",
            ("n_layer", true) => "num_hidden_layers",
            ("d_state", true) => "state_size",
            ("d_conv", true) => "conv_kernel",
            ("headdim", true) => "head_dim",
            ("nheads", true) => "num_heads",
            ("ngroups", true) => "n_groups",
            ("dt_limit", true) => "time_step_limit",
            ("norm_eps", true) => "layer_norm_epsilon",
            ("bias", true) => "use_bias",
            ("conv_bias", true) => "use_conv_bias",
            ("tie_embeddings", true) => "tie_word_embeddings",
            ("d_state" | "d_conv" | "expand" | "headdim" | "ngroups" | "chunk_size", false)
            | ("dt_limit" | "bias" | "conv_bias" | "norm_before_gate", false) => {
                return format!("ssm_cfg.{canonical}");
            }
            // mamba_ssm derives nheads from expand * d_model / headdim.
            ("nheads", false) => "ssm_cfg.headdim",
            _ => canonical,
        };
        name.to_string()
    }

    /// Checks sizes and cross-field consistency; errors name the field as the file spells it.
    pub fn validate(&self) -> Result<()> {
        let err = |canonical: &str, msg: String| Err(Error::field(self.field_name(canonical), msg));
        let sizes = [
            ("d_model", self.d_model),
            ("n_layer", self.n_layer),
            ("vocab_size", self.vocab_size),
            ("pad_vocab_size_multiple", self.pad_vocab_size_multiple),
            ("d_state", self.d_state),
            ("d_conv", self.d_conv),
            ("expand", self.expand),
            ("headdim", self.headdim),
            ("nheads", self.nheads),
            ("ngroups", self.ngroups),
            ("chunk_size", self.chunk_size),
        ];
        for (name, v) in sizes {
            if v == 0 {
                return err(name, "must be at least 1, got 0".into());
            }
            // Keeps every product of two sizes (d_model * expand, ...) far from overflow.
            if name != "vocab_size" && v > MAX_DIM {
                return err(
                    name,
                    format!("{v} is larger than the supported maximum {MAX_DIM}"),
                );
            }
        }
        if self.vocab_size > u32::MAX as usize {
            return err(
                "vocab_size",
                format!("{} does not fit token ids (u32)", self.vocab_size),
            );
        }
        if self.d_inner != self.nheads * self.headdim || self.d_model * self.expand != self.d_inner
        {
            let msg = match self.flavor {
                ConfigFlavor::HfTransformers => format!(
                    "hidden_size * expand ({} * {} = {}) must equal num_heads * head_dim ({} * {} = {})",
                    self.d_model,
                    self.expand,
                    self.d_model * self.expand,
                    self.nheads,
                    self.headdim,
                    self.nheads * self.headdim
                ),
                ConfigFlavor::MambaSsm => format!(
                    "headdim {} must divide d_inner = expand * d_model = {}",
                    self.headdim,
                    self.d_model * self.expand
                ),
            };
            return err("nheads", msg);
        }
        if !self.nheads.is_multiple_of(self.ngroups) {
            return err(
                "ngroups",
                format!(
                    "{} groups must divide the {} heads",
                    self.ngroups, self.nheads
                ),
            );
        }
        let (lo, hi) = self.dt_limit;
        if lo.is_nan() || hi.is_nan() || lo < 0.0 || lo > hi || lo == f64::INFINITY {
            return err(
                "dt_limit",
                format!("({lo}, {hi}) must satisfy 0 <= min <= max (max may be Infinity)"),
            );
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return err(
                "norm_eps",
                format!("must be finite and > 0, got {}", self.norm_eps),
            );
        }
        Ok(())
    }

    /// The configuration of a real state-spaces checkpoint, for benchmarks on random weights:
    /// `"130m"`, `"370m"`, `"780m"`, `"1.3b"`, `"2.7b"` (also accepted with a `mamba2-` prefix,
    /// any case). These are mamba_ssm configs: vocab 50277 padded to 50288, d_state 128,
    /// headdim 64, ngroups 1, expand 2, d_conv 4, chunk 256, tied embeddings, f32 residual.
    ///
    /// ```
    /// let cfg = mamba2::config::Mamba2Config::preset("1.3b")?;
    /// assert_eq!((cfg.d_model, cfg.n_layer, cfg.nheads), (2048, 48, 64));
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn preset(name: &str) -> Result<Self> {
        let key = name.trim().to_ascii_lowercase();
        let key = key.strip_prefix("mamba2-").unwrap_or(&key);
        let (d_model, n_layer) = match key {
            "130m" => (768, 24),
            "370m" => (1024, 48),
            "780m" => (1536, 48),
            "1.3b" => (2048, 48),
            "2.7b" => (2560, 64),
            _ => {
                return Err(Error::field(
                    "preset",
                    format!("unknown shape `{name}`; known: 130m, 370m, 780m, 1.3b, 2.7b"),
                ))
            }
        };
        let (expand, headdim) = (2, 64);
        let cfg = Mamba2Config {
            flavor: ConfigFlavor::MambaSsm,
            d_model,
            n_layer,
            vocab_size: 50277,
            pad_vocab_size_multiple: 16,
            d_state: 128,
            d_conv: 4,
            expand,
            headdim,
            nheads: expand * d_model / headdim,
            ngroups: 1,
            d_inner: expand * d_model,
            chunk_size: 256,
            dt_limit: (0.0, f64::INFINITY),
            bias: false,
            conv_bias: true,
            norm_eps: 1e-5,
            residual_in_fp32: true,
            tie_embeddings: true,
            norm_before_gate: false,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Reads the end-of-sequence ids of a `generation_config.json`: `eos_token_id` may be an integer,
/// a list of integers, `null` or absent (the last two give an empty list).
pub fn read_generation_eos(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let origin = path.display().to_string();
    let value = parse_json_lenient(&text, &origin)?;
    let Value::Object(obj) = &value else {
        return Err(parse_err(&origin, "the top level is not a JSON object"));
    };
    Ok(Fields::new(obj, "", &origin)
        .token_ids("eos_token_id")?
        .unwrap_or_default())
}

fn detect_flavor(obj: &Map<String, Value>, origin: &str) -> Result<ConfigFlavor> {
    match obj.get("model_type") {
        Some(Value::String(t)) if t == "mamba2" => return Ok(ConfigFlavor::HfTransformers),
        Some(Value::String(t)) => {
            return Err(Error::Unsupported(format!(
                "{origin}: model_type `{t}` is not a Mamba-2 model (expected `mamba2`)"
            )))
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
        (true, false) => Ok(ConfigFlavor::MambaSsm),
        (false, true) => Ok(ConfigFlavor::HfTransformers),
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
fn parse_hf(f: &Fields<'_>) -> Result<Mamba2Config> {
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
    Ok(Mamba2Config {
        flavor: ConfigFlavor::HfTransformers,
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
        bias: f.bool("use_bias")?.unwrap_or(false),
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
fn parse_mamba_ssm(f: &Fields<'_>) -> Result<Mamba2Config> {
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
    Ok(Mamba2Config {
        flavor: ConfigFlavor::MambaSsm,
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
        bias: s.bool("bias")?.unwrap_or(false),
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
