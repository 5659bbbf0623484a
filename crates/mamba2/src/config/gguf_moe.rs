//! Mixture-of-experts settings of the hybrid GGUF architectures, read as llama.cpp
//! reads them (`src/llama-model.cpp`, `src/models/granite-hybrid.cpp`, `src/models/nemotron-h.cpp`,
//! `build_moe_ffn` in `src/llama-graph.cpp`) from what `convert_hf_to_gguf.py` writes.
//!
//! Keys shared by both families (`{arch}.`): `expert_count` (routed experts; 0 or absent: dense),
//! `expert_used_count` (top-k; one value or one per layer), `expert_shared_feed_forward_length`
//! (the shared expert's width).
//!
//! `granitehybrid`: llama.cpp routes with a softmax over all experts, keeps the top-k and
//! renormalises them (= HF's softmax over the top-k logits); the experts' width is
//! `feed_forward_length`. Groups (`expert_group_count` > 1) and `expert_weights_scale` would change
//! that routing and HF's Granite has neither: refused.
//!
//! `nemotron_h_moe` (and `nemotron_h` with experts): sigmoid scores, the `exp_probs_b` bias added
//! for the choice only, groups `expert_group_count` of which `expert_group_used_count` are kept
//! (a group's score: the sum of its two best), gates renormalised when `expert_weights_norm`
//! (llama.cpp's default false) and multiplied by `expert_weights_scale` (0 or absent: 1). The
//! experts' width is `expert_feed_forward_length`, else llama.cpp's fallback
//! `feed_forward_length / expert_used_count`. Latent expert projections (`moe_latent_size`) and
//! multi-token-prediction blocks (`nextn_predict_layers`) are refused.

use super::Keys;
use crate::config::{MlpActivation, MoeConfig, MoeRouter};
use crate::error::{Error, Result};
use crate::gguf::GgufError;

fn missing(keys: &Keys<'_>, k: &str) -> Error {
    GgufError::MissingKey {
        path: keys.path(),
        key: keys.key(k),
    }
    .into()
}

/// The routed experts per MoE block (`expert_count`); 0 for a dense file.
pub(super) fn expert_count(keys: &Keys<'_>) -> Result<usize> {
    Ok(keys.optional("expert_count")?.unwrap_or(0))
}

/// The one value a per-layer key has on `layers` (the config holds one value for all MoE blocks).
fn uniform(keys: &Keys<'_>, k: &str, values: &[usize], layers: &[usize]) -> Result<usize> {
    let first = layers.first().map_or(0, |&l| values[l]);
    match layers.iter().find(|&&l| values[l] != first) {
        Some(&l) => Err(Error::Unsupported(format!(
            "{}: {}[{l}] is {} where layer {} has {first} (MoE layers must agree)",
            keys.path(),
            keys.key(k),
            values[l],
            layers[0]
        ))),
        None => Ok(first),
    }
}

/// A per-layer key (one value or an array of `n_layer`) on the MoE `layers`, if present.
fn per_moe_layer(
    keys: &Keys<'_>,
    k: &str,
    n_layer: usize,
    layers: &[usize],
) -> Result<Option<usize>> {
    keys.per_layer(k, n_layer)?
        .map(|v| uniform(keys, k, &v, layers))
        .transpose()
}

/// `expert_used_count`, checked against the expert count (llama.cpp asserts the same).
fn top_k(keys: &Keys<'_>, experts: usize, n_layer: usize, layers: &[usize]) -> Result<usize> {
    let k = "expert_used_count";
    let top_k = per_moe_layer(keys, k, n_layer, layers)?.ok_or_else(|| missing(keys, k))?;
    if top_k == 0 || top_k > experts {
        return Err(Error::field(
            keys.key(k),
            format!(
                "{top_k} experts per token must be in 1..={experts} ({})",
                keys.key("expert_count")
            ),
        ));
    }
    Ok(top_k)
}

/// `expert_shared_feed_forward_length`: both families' graphs need the shared expert.
fn shared_width(keys: &Keys<'_>) -> Result<usize> {
    let k = "expert_shared_feed_forward_length";
    match keys.optional(k)? {
        Some(n) if n > 0 => Ok(n),
        Some(_) => Err(Error::Unsupported(format!(
            "{}: {} 0 (a mixture of experts without a shared expert) is not supported",
            keys.path(),
            keys.key(k)
        ))),
        None => Err(missing(keys, k)),
    }
}

/// Granite-4.0-H's MoE block, in every layer (`layers` = all of them); `expert_width` is the
/// file's `feed_forward_length`.
pub(super) fn granite(
    keys: &Keys<'_>,
    experts: usize,
    expert_width: usize,
    n_layer: usize,
    layers: &[usize],
) -> Result<MoeConfig> {
    if let Some(g) = keys.optional("expert_group_count")?.filter(|&g| g > 1) {
        return Err(Error::Unsupported(format!(
            "{}: {} {g} (group-limited routing; HF's Granite router has no groups)",
            keys.path(),
            keys.key("expert_group_count")
        )));
    }
    if let Some(s) = keys
        .float("expert_weights_scale")?
        .filter(|&s| s != 0.0 && s != 1.0)
    {
        return Err(Error::Unsupported(format!(
            "{}: {} {s} (scaled gates; HF's Granite router has no scale)",
            keys.path(),
            keys.key("expert_weights_scale")
        )));
    }
    Ok(MoeConfig {
        num_experts: experts,
        top_k: top_k(keys, experts, n_layer, layers)?,
        intermediate_size: expert_width,
        activation: MlpActivation::SwiGlu,
        router: MoeRouter::Softmax,
        shared_intermediate_size: shared_width(keys)?,
    })
}

/// Nemotron-H's MoE block on `layers` (those with a `feed_forward_length`); `ff` is that array.
pub(super) fn nemotron(
    keys: &Keys<'_>,
    experts: usize,
    ff: &[usize],
    layers: &[usize],
) -> Result<MoeConfig> {
    let n_layer = ff.len();
    if let Some(n) = keys.optional("moe_latent_size")?.filter(|&n| n > 0) {
        return Err(Error::Unsupported(format!(
            "{}: {} {n} (latent expert projections) is not supported yet",
            keys.path(),
            keys.key("moe_latent_size")
        )));
    }
    let top_k = top_k(keys, experts, n_layer, layers)?;
    let intermediate_size =
        match per_moe_layer(keys, "expert_feed_forward_length", n_layer, layers)? {
            Some(n) => n,
            // llama.cpp's fallback for files without the key.
            None => uniform(keys, "feed_forward_length", ff, layers)? / top_k,
        };
    let groups_key = "expert_group_count";
    let n_group = keys.optional(groups_key)?.unwrap_or(0).max(1);
    if !experts.is_multiple_of(n_group) {
        return Err(Error::field(
            keys.key(groups_key),
            format!("{n_group} groups do not divide the {experts} experts"),
        ));
    }
    let topk_group = match n_group {
        1 => 1,
        _ => {
            let k = "expert_group_used_count";
            let used = keys.optional(k)?.ok_or_else(|| missing(keys, k))?;
            if used == 0 || used > n_group {
                return Err(Error::field(
                    keys.key(k),
                    format!(
                        "{used} groups kept must be in 1..={n_group} ({})",
                        keys.key(groups_key)
                    ),
                ));
            }
            used
        }
    };
    let norm_topk_prob = keys
        .file
        .get_bool(&keys.key("expert_weights_norm"))?
        .unwrap_or(false);
    // llama.cpp scales the gates only by a non-zero factor.
    let routed_scaling_factor = keys
        .float("expert_weights_scale")?
        .filter(|&s| s != 0.0)
        .unwrap_or(1.0);
    Ok(MoeConfig {
        num_experts: experts,
        top_k,
        intermediate_size,
        activation: MlpActivation::ReluSquared,
        router: MoeRouter::SigmoidGrouped {
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        },
        shared_intermediate_size: shared_width(keys)?,
    })
}
