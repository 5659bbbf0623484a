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

use serde_json::Value;

use crate::error::{Error, Result};

mod blocks;
mod flavors;
mod gguf;
mod hybrid;
mod json;
mod moe;
mod names;
mod presets;
mod validate;
pub use blocks::{
    AttentionConfig, BlockKind, BlockSpec, Family, MlpActivation, MlpConfig, Multipliers,
    RopeConfig,
};
use flavors::detect_flavor;
use flavors::{parse_hf, parse_mamba_ssm};
pub use gguf::GGUF_ARCHITECTURES;
pub use json::parse_json_lenient;
use json::{parse_err, Fields};
pub use moe::{MoeConfig, MoeRouter};
pub use names::BlockNames;

/// Upper bound on every size field except the vocabulary (2^24).
const MAX_DIM: usize = 1 << 24;

/// Which Python class wrote the config file; decides the field names used in error messages.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum ConfigFlavor {
    /// HF transformers `Mamba2Config` (`model_type: "mamba2"`, `hidden_size`, `num_heads`, ...).
    HfTransformers,
    /// mamba_ssm `MambaConfig` with `ssm_cfg.layer == "Mamba2"` (`d_model`, `n_layer`, ...).
    MambaSsm,
    /// The metadata of a GGUF file (`mamba2.embedding_length`, `mamba2.ssm.*`, ...).
    Gguf,
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
    /// The model family (pure Mamba-2 or one of the hybrids).
    pub family: Family,
    /// The residual blocks in order, for the hybrid families; empty for pure Mamba-2, whose
    /// every layer is one Mamba block (see [`Mamba2Config::blocks`]).
    pub pattern: Vec<BlockSpec>,
    /// Attention block settings (hybrids with attention blocks).
    pub attention: Option<AttentionConfig>,
    /// MLP block settings (hybrids with MLP blocks).
    pub mlp: Option<MlpConfig>,
    /// Mixture-of-experts block settings (hybrids with MoE blocks).
    pub moe: Option<MoeConfig>,
    /// Scalar multipliers (all 1 for Mamba-2).
    pub multipliers: Multipliers,
    /// Whether the Mamba output goes through the grouped gated RMSNorm (`false`: `y * silu(z)`
    /// with no norm, Falcon-H1's `mamba_rms_norm: false`).
    pub gated_norm: bool,
    /// Bias in the Mamba `out_proj` (Falcon-H1's `projectors_bias`; else the same as `bias`).
    pub out_proj_bias: bool,
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
    /// Bias in `in_proj` (and in `out_proj`, except for Falcon-H1: see `out_proj_bias`).
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
        let f = Fields::new(obj, "", origin);
        let cfg = match detect_flavor(obj, origin)? {
            // detect_flavor never returns Gguf: a JSON config is HF's or mamba_ssm's.
            (ConfigFlavor::HfTransformers | ConfigFlavor::Gguf, Family::Mamba2) => parse_hf(&f)?,
            (ConfigFlavor::MambaSsm, _) => parse_mamba_ssm(&f)?,
            (_, Family::GraniteHybrid) => hybrid::parse_granite(&f)?,
            (_, Family::NemotronH) => hybrid::parse_nemotron_h(&f)?,
            (_, Family::FalconH1) => hybrid::parse_falcon_h1(&f)?,
            (_, Family::Bamba) => hybrid::parse_bamba(&f)?,
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
        let root = self.default_root();
        let mut out = vec![(
            self.embedding_name(root),
            vec![embedding_rows, self.d_model],
        )];
        for b in 0..self.n_blocks() {
            out.extend(self.block_tensor_shapes(root, b));
        }
        out.push((self.final_norm_name(root), vec![self.d_model]));
        if !self.tie_embeddings {
            out.push((
                "lm_head.weight".to_string(),
                vec![embedding_rows, self.d_model],
            ));
        }
        out
    }

    /// The residual blocks in order: `n_layer` Mamba blocks for pure Mamba-2, the parsed layer
    /// pattern for the hybrids.
    ///
    /// ```
    /// let cfg = mamba2::config::Mamba2Config::from_json_str(
    ///     r#"{"model_type": "nemotron_h", "hidden_size": 64, "vocab_size": 100,
    ///         "hybrid_override_pattern": "M-M*-", "mamba_num_heads": 4, "mamba_head_dim": 32,
    ///         "n_groups": 2, "ssm_state_size": 16, "num_attention_heads": 4,
    ///         "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128}"#,
    ///     "inline",
    /// )?;
    /// let letters: String = cfg.blocks().iter().map(|b| b.kind.letter()).collect();
    /// assert_eq!(letters, "M-M*-");
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn blocks(&self) -> std::borrow::Cow<'_, [BlockSpec]> {
        if self.family == Family::Mamba2 {
            let all = (0..self.n_layer)
                .map(|layer| BlockSpec {
                    kind: BlockKind::Mamba,
                    layer,
                })
                .collect();
            std::borrow::Cow::Owned(all)
        } else {
            std::borrow::Cow::Borrowed(&self.pattern)
        }
    }

    /// Bytes of recurrent state per sequence: conv + SSM states of every Mamba block, f32.
    pub fn ssm_state_bytes(&self) -> usize {
        let per_block = self.conv_dim() * self.d_conv + self.nheads * self.headdim * self.d_state;
        self.n_ssm_blocks() * per_block * 4
    }

    /// Bytes of KV cache per token of one sequence, with keys and values of `elem_bytes` each.
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        let Some(a) = &self.attention else { return 0 };
        self.n_kv_blocks() * 2 * a.num_kv_heads * a.head_dim * elem_bytes
    }

    /// Number of blocks with a conv + SSM state (the cache's SSM slots).
    pub fn n_ssm_blocks(&self) -> usize {
        (0..self.n_blocks())
            .filter(|&b| self.block_spec(b).kind.has_ssm())
            .count()
    }

    /// Number of blocks with a KV cache (the cache's KV slots).
    pub fn n_kv_blocks(&self) -> usize {
        (0..self.n_blocks())
            .filter(|&b| self.block_spec(b).kind.has_kv())
            .count()
    }

    /// Number of residual blocks (without materialising [`Mamba2Config::blocks`]).
    pub fn n_blocks(&self) -> usize {
        match self.family {
            Family::Mamba2 => self.n_layer,
            _ => self.pattern.len(),
        }
    }

    /// Block `b` (`b < n_blocks()`), without materialising the list.
    pub fn block_spec(&self, b: usize) -> BlockSpec {
        match self.family {
            Family::Mamba2 => BlockSpec {
                kind: BlockKind::Mamba,
                layer: b,
            },
            _ => self.pattern[b],
        }
    }

    /// The layer pattern, one letter per block (`M` Mamba-2, `*` attention, `-` MLP, `P` Mamba-2
    /// and attention in parallel).
    pub fn pattern_string(&self) -> String {
        self.blocks().iter().map(|b| b.kind.letter()).collect()
    }

    /// The name this config's file uses for a canonical field (`"headdim"` is `"head_dim"` in
    /// HF configs and `"ssm_cfg.headdim"` in mamba_ssm configs).
    pub fn field_name(&self, canonical: &str) -> String {
        if let Some(name) = self.hybrid_field_name(canonical) {
            return name.to_string();
        }
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

    /// Field names of the hybrid families' configs.
    fn hybrid_field_name(&self, canonical: &str) -> Option<&'static str> {
        let nemotron = match self.family {
            Family::Mamba2 => return None,
            Family::NemotronH => true,
            _ => false,
        };
        Some(match (canonical, nemotron) {
            ("d_model", _) => "hidden_size",
            ("n_layer", _) => "num_hidden_layers",
            ("tie_embeddings", _) => "tie_word_embeddings",
            ("d_state", false) => "mamba_d_state",
            ("d_conv", false) => "mamba_d_conv",
            ("expand", false) => "mamba_expand",
            ("headdim", false) => "mamba_d_head",
            ("nheads", false) => "mamba_n_heads",
            ("ngroups", false) => "mamba_n_groups",
            ("chunk_size", false) => "mamba_chunk_size",
            ("dt_limit", false) => "time_step_limit",
            ("norm_eps", false) => "rms_norm_eps",
            ("d_state", true) => "ssm_state_size",
            ("d_conv", true) => "conv_kernel",
            ("expand", true) => "expand",
            ("headdim", true) => "mamba_head_dim",
            ("nheads", true) => "mamba_num_heads",
            ("ngroups", true) => "n_groups",
            ("chunk_size", true) => "chunk_size",
            ("dt_limit", true) => "time_step_min",
            ("norm_eps", true) => "layer_norm_epsilon",
            _ => return None,
        })
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
        if self.family != Family::Mamba2 {
            self.validate_hybrid()?;
        } else if self.d_inner != self.nheads * self.headdim
            || self.d_model * self.expand != self.d_inner
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
                ConfigFlavor::Gguf => format!(
                    "ssm.inner_size {} must be a whole multiple of embedding_length {}",
                    self.d_inner, self.d_model
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
        if let Some(cfg) = presets::hybrid_preset(key) {
            return cfg;
        }
        let (d_model, n_layer) = match key {
            "130m" => (768, 24),
            "370m" => (1024, 48),
            "780m" => (1536, 48),
            "1.3b" => (2048, 48),
            "2.7b" => (2560, 64),
            _ => {
                return Err(Error::field(
                    "preset",
                    format!(
                        "unknown shape `{name}`; known: 130m, 370m, 780m, 1.3b, 2.7b, {}",
                        presets::HYBRID_PRESETS.join(", ")
                    ),
                ))
            }
        };
        let (expand, headdim) = (2, 64);
        let cfg = Mamba2Config {
            flavor: ConfigFlavor::MambaSsm,
            family: Family::Mamba2,
            pattern: Vec::new(),
            attention: None,
            mlp: None,
            moe: None,
            multipliers: Multipliers::default(),
            gated_norm: true,
            out_proj_bias: false,
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
