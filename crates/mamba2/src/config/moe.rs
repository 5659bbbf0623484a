//! Mixture-of-experts settings of the hybrid families: Granite-4.0-H's
//! `block_sparse_moe` (softmax over the top-k router logits, SwiGLU experts, beside the
//! `shared_mlp`) and Nemotron-H's `E` layers (sigmoid router with a score-correction bias,
//! group-limited top-k, ReLU² experts plus shared experts). Field names and defaults are those of
//! transformers 5.24's `GraniteMoeHybridConfig` / `NemotronHConfig`; the routing math is that of
//! `GraniteMoeHybridTopKRouter` / `NemotronHTopkRouter`.

use super::blocks::MlpActivation;
use super::json::Fields;
use crate::error::{Error, Result};

/// How a token's experts and their gates are chosen from the router logits.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum MoeRouter {
    /// Granite: top-k of the logits, gates = softmax over those k logits.
    Softmax,
    /// Nemotron-H / DeepSeek-V3 style: scores = sigmoid(logits); experts are chosen on
    /// `scores + e_score_correction_bias` among the `topk_group` best of `n_group` groups (a
    /// group's score is the sum of its two best); gates are the chosen *uncorrected* scores,
    /// divided by their sum when `norm_topk_prob`, times `routed_scaling_factor`.
    SigmoidGrouped {
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        routed_scaling_factor: f64,
    },
}

/// The mixture-of-experts block of a config.
///
/// ```
/// use mamba2::config::{Mamba2Config, MoeRouter};
/// let cfg = Mamba2Config::from_json_str(
///     r#"{"model_type": "nemotron_h", "hidden_size": 64, "vocab_size": 100,
///         "hybrid_override_pattern": "MEM*E", "mamba_num_heads": 4, "mamba_head_dim": 32,
///         "n_groups": 2, "ssm_state_size": 16, "num_attention_heads": 4,
///         "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
///         "n_routed_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
///         "moe_shared_expert_intermediate_size": 48, "n_group": 4, "topk_group": 2}"#,
///     "inline",
/// )?;
/// let moe = cfg.moe.as_ref().unwrap();
/// assert_eq!((moe.num_experts, moe.top_k, moe.shared_intermediate_size), (16, 4, 48));
/// assert!(matches!(moe.router, MoeRouter::SigmoidGrouped { n_group: 4, topk_group: 2, .. }));
/// assert_eq!(cfg.pattern_string(), "MEM*E");
/// # Ok::<(), mamba2::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MoeConfig {
    /// Routed experts per MoE block (`num_local_experts` / `n_routed_experts`).
    pub num_experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Hidden width of one routed expert (`intermediate_size` / `moe_intermediate_size`).
    pub intermediate_size: usize,
    /// Activation of the routed and shared experts.
    pub activation: MlpActivation,
    pub router: MoeRouter,
    /// Hidden width of the always-on shared expert MLP that runs beside the routed ones
    /// (Granite's `shared_mlp`: `shared_intermediate_size`; Nemotron-H's `shared_experts`:
    /// `moe_shared_expert_intermediate_size`).
    pub shared_intermediate_size: usize,
}

impl MoeConfig {
    /// The config file's name of a canonical MoE field, for error messages.
    fn field(&self, canonical: &str) -> &'static str {
        let nemotron = matches!(self.router, MoeRouter::SigmoidGrouped { .. });
        match (canonical, nemotron) {
            ("num_experts", false) => "num_local_experts",
            ("num_experts", true) => "n_routed_experts",
            ("intermediate_size", false) => "intermediate_size",
            ("intermediate_size", true) => "moe_intermediate_size",
            ("shared", false) => "shared_intermediate_size",
            ("shared", true) => "moe_shared_expert_intermediate_size",
            _ => "num_experts_per_tok",
        }
    }

    /// Consistency checks; errors name the field as the config file spells it.
    pub(super) fn validate(&self, max_dim: usize) -> Result<()> {
        for (canonical, v) in [
            ("num_experts", self.num_experts),
            ("top_k", self.top_k),
            ("intermediate_size", self.intermediate_size),
            ("shared", self.shared_intermediate_size),
        ] {
            let name = self.field(canonical);
            if v == 0 {
                return Err(Error::field(name, "must be at least 1, got 0"));
            }
            if v > max_dim {
                return Err(Error::field(
                    name,
                    format!("{v} is larger than the supported maximum {max_dim}"),
                ));
            }
        }
        if self.top_k > self.num_experts {
            return Err(Error::field(
                "num_experts_per_tok",
                format!(
                    "{} experts per token but only {} experts ({})",
                    self.top_k,
                    self.num_experts,
                    self.field("num_experts")
                ),
            ));
        }
        if let MoeRouter::SigmoidGrouped {
            n_group,
            topk_group,
            routed_scaling_factor,
            ..
        } = self.router
        {
            if n_group == 0 || !self.num_experts.is_multiple_of(n_group) {
                return Err(Error::field(
                    "n_group",
                    format!(
                        "{n_group} groups must be >= 1 and divide the {} experts",
                        self.num_experts
                    ),
                ));
            }
            if topk_group == 0 || topk_group > n_group {
                return Err(Error::field(
                    "topk_group",
                    format!("{topk_group} groups kept must be in 1..={n_group} (n_group)"),
                ));
            }
            // A group's score is the sum of its two best experts (HF's `topk(2)`).
            if n_group > 1 && self.num_experts / n_group < 2 {
                return Err(Error::field(
                    "n_group",
                    format!(
                        "{n_group} groups of {} experts: each group needs at least 2",
                        self.num_experts
                    ),
                ));
            }
            let kept = topk_group * (self.num_experts / n_group);
            if self.top_k > kept {
                return Err(Error::field(
                    "num_experts_per_tok",
                    format!(
                        "{} experts per token but the {topk_group} groups kept hold only {kept}",
                        self.top_k
                    ),
                ));
            }
            if !routed_scaling_factor.is_finite() {
                return Err(Error::field(
                    "routed_scaling_factor",
                    format!("must be finite, got {routed_scaling_factor}"),
                ));
            }
        }
        Ok(())
    }
}

/// Granite-4.0-H's MoE settings, `None` for a dense config (`num_local_experts: 0`).
/// transformers' default is 8 experts: a config without the field is a MoE model.
pub(super) fn granite_moe(f: &Fields<'_>, shared: usize) -> Result<Option<MoeConfig>> {
    let experts = f.usize("num_local_experts")?.unwrap_or(8);
    if experts == 0 {
        return Ok(None);
    }
    Ok(Some(MoeConfig {
        num_experts: experts,
        top_k: f.usize("num_experts_per_tok")?.unwrap_or(2),
        intermediate_size: f.usize("intermediate_size")?.unwrap_or(1024),
        activation: MlpActivation::SwiGlu,
        router: MoeRouter::Softmax,
        shared_intermediate_size: shared,
    }))
}

/// Nemotron-H's MoE settings (read only when the pattern has `E` / `moe` layers).
/// `n_shared_experts` is not read: HF builds one shared MLP of
/// `moe_shared_expert_intermediate_size` whatever it says.
pub(super) fn nemotron_moe(f: &Fields<'_>) -> Result<MoeConfig> {
    if let Some(v) = f.get("moe_latent_size").filter(|v| !v.is_null()) {
        return Err(Error::Unsupported(format!(
            "{}: moe_latent_size {v} (latent expert projections) is not supported yet",
            f.origin
        )));
    }
    let experts_key = if f.get("n_routed_experts").is_some() {
        "n_routed_experts"
    } else {
        "num_local_experts"
    };
    Ok(MoeConfig {
        num_experts: f.usize(experts_key)?.unwrap_or(8),
        top_k: f.usize("num_experts_per_tok")?.unwrap_or(2),
        intermediate_size: f.usize("moe_intermediate_size")?.unwrap_or(7688),
        activation: MlpActivation::ReluSquared,
        router: MoeRouter::SigmoidGrouped {
            n_group: f.usize("n_group")?.unwrap_or(1),
            topk_group: f.usize("topk_group")?.unwrap_or(1),
            norm_topk_prob: f.bool("norm_topk_prob")?.unwrap_or(true),
            routed_scaling_factor: f.f64("routed_scaling_factor")?.unwrap_or(1.0),
        },
        shared_intermediate_size: f
            .usize("moe_shared_expert_intermediate_size")?
            .unwrap_or(7688),
    })
}
