//! Where a canonical HF tensor of a hybrid family lives in a GGUF file: llama.cpp's names
//! (`gguf-py/gguf/tensor_mapping.py`) and the layouts `convert_hf_to_gguf.py` writes.
//!
//! | canonical (Granite `model.layers.N.` / Nemotron-H `backbone.layers.N.`) | GGUF `blk.N.` |
//! |---|---|
//! | `input_layernorm` / `norm` | `attn_norm` |
//! | `post_attention_layernorm` (Granite) | `ffn_norm` |
//! | `mamba.*` / `mixer.*` (Mamba-2 leaves) | `ssm_*`, as for `mamba2` files |
//! | `self_attn.{q,k}_proj` / `mixer.{q,k}_proj` | `attn_{q,k}`, rows permuted (see below) |
//! | `self_attn.{v,o}_proj` / `mixer.{v,o}_proj` | `attn_v`, `attn_output` |
//! | `shared_mlp.input_linear` (Granite, gate rows then up rows) | `ffn_gate` + `ffn_up` |
//! | `shared_mlp.output_linear` (Granite) | `ffn_down` |
//! | `mixer.{up,down}_proj` (Nemotron-H) | `ffn_{up,down}` |
//! | `pre_ff_layernorm` (Falcon-H1) | `ffn_norm` (no `.weight` suffix) |
//! | `feed_forward.{gate,up,down}_proj` (Falcon-H1) | `ffn_{gate,up,down}` |
//! | `block_sparse_moe.router.layer` / `mixer.gate` (MoE router) | `ffn_gate_inp` |
//! | `mixer.gate.e_score_correction_bias` (Nemotron-H) | `exp_probs_b.bias` |
//! | `block_sparse_moe.input_linear` (Granite, `(E, 2I, H)`: per expert gate rows then up rows) | `ffn_gate_exps` + `ffn_up_exps`, `(E, I, H)` each, joined per expert |
//! | `block_sparse_moe.output_linear` (Granite) / `mixer.experts.down_proj` (Nemotron-H) | `ffn_down_exps` `(E, H, I)` |
//! | `mixer.experts.up_proj` (Nemotron-H, `(E, I, H)`) | `ffn_up_exps` |
//! | `mixer.shared_experts.{up,down}_proj` (Nemotron-H) | `ffn_{up,down}_shexp` |
//!
//! The converter routes attention layers of both families through its Llama class, which
//! permutes the rows of q and k within each head for llama.cpp's pairwise RoPE: HF row
//! `half * head_dim/2 + i` becomes row `2i + half`. llama.cpp reads NoPE layers the same either
//! way (q and k move together), but the permutation only equals HF's rotate-half RoPE when the
//! whole head rotates; reading the rows back in HF's order gives HF's model in every case
//! (Bamba rotates 8 of 16 channels). Falcon-H1 goes through the Mamba-2 class, which leaves
//! q/k as they are (llama.cpp runs it with NeoX RoPE, HF's
//! rotate-half). Granite-4.0-H files with experts name their shared MLP `ffn_*_shexp`; those
//! names are accepted in place of `ffn_*`. The converter stacks Nemotron-H's per-expert
//! tensors into one 3-D tensor; a per-expert canonical name (`mixer.experts.{e}.up_proj.weight`,
//! asked for only when the stacked one is absent) points at the stacked GGUF tensor, so that the
//! error names what the file lacks.

use super::{mamba_leaf, Transform};
use crate::config::{Family, Mamba2Config};

/// The GGUF tensor(s) holding one canonical tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Located {
    /// One tensor whose values differ as `Transform` says.
    One(String, Transform),
    /// One tensor whose rows, in heads of `head_dim`, are in llama.cpp's RoPE order.
    Unpermuted { name: String, head_dim: usize },
    /// The rows of these tensors, stacked in order.
    Rows(Vec<String>),
    /// These `(experts, rows, cols)` tensors joined along the rows of each expert, in order.
    Experts(Vec<String>),
}

/// The location of `canonical` in a file of a hybrid family (None for a name the family does
/// not have); `has` says whether the file has a tensor, to pick between alternative names.
pub(super) fn locate_hybrid(
    c: &Mamba2Config,
    canonical: &str,
    has: impl Fn(&str) -> bool,
) -> Option<Located> {
    let root = c.default_root();
    let one = |n: &str| Some(Located::One(n.to_string(), Transform::Reshape));
    if canonical == c.embedding_name(root) {
        return one("token_embd.weight");
    }
    if canonical == c.final_norm_name(root) {
        return one("output_norm.weight");
    }
    if canonical == "lm_head.weight" {
        return one("output.weight");
    }
    let rest = canonical.strip_prefix(root)?.strip_prefix(".layers.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let blk = |n: &str| format!("blk.{layer}.{n}");
    // The first of `names` the file has (the first one otherwise, for the error message).
    let pick = |names: &[&str]| {
        let found = names.iter().find(|n| has(&blk(n))).or(names.first());
        found.map(|n| blk(n))
    };
    let head_dim = c.attention.map_or(0, |a| a.head_dim);
    // Falcon-H1's RoPE is NeoX-style, so its converter stores q/k as HF has them.
    let permuted_qk = c.family != Family::FalconH1;
    let attention = |leaf: &str| -> Option<Located> {
        let (proj, part) = leaf.split_once('.')?;
        if part != "weight" && part != "bias" {
            return None;
        }
        let (name, permuted) = match proj {
            "q_proj" => ("attn_q", true),
            "k_proj" => ("attn_k", true),
            "v_proj" => ("attn_v", false),
            "o_proj" => ("attn_output", false),
            _ => return None,
        };
        let name = blk(&format!("{name}.{part}"));
        Some(match permuted && permuted_qk {
            true => Located::Unpermuted { name, head_dim },
            false => Located::One(name, Transform::Reshape),
        })
    };
    let mamba = |leaf: &str| mamba_leaf(leaf).map(|(n, t)| Located::One(blk(n), t));
    match c.family {
        Family::GraniteHybrid => match leaf {
            "input_layernorm.weight" => one(&blk("attn_norm.weight")),
            "post_attention_layernorm.weight" => one(&blk("ffn_norm.weight")),
            "shared_mlp.input_linear.weight" => Some(Located::Rows(vec![
                pick(&["ffn_gate.weight", "ffn_gate_shexp.weight"])?,
                pick(&["ffn_up.weight", "ffn_up_shexp.weight"])?,
            ])),
            "shared_mlp.output_linear.weight" => {
                one(&pick(&["ffn_down.weight", "ffn_down_shexp.weight"])?)
            }
            "block_sparse_moe.router.layer.weight" => one(&blk("ffn_gate_inp.weight")),
            "block_sparse_moe.input_linear.weight" => Some(Located::Experts(vec![
                blk("ffn_gate_exps.weight"),
                blk("ffn_up_exps.weight"),
            ])),
            "block_sparse_moe.output_linear.weight" => one(&blk("ffn_down_exps.weight")),
            _ => match leaf.split_once('.')? {
                ("mamba", l) => mamba(l),
                ("self_attn", l) => attention(l),
                _ => None,
            },
        },
        Family::NemotronH => match leaf {
            "norm.weight" => one(&blk("attn_norm.weight")),
            _ => {
                let l = leaf.strip_prefix("mixer.")?;
                let expert = l
                    .strip_prefix("experts.")
                    .and_then(|e| e.split_once('.'))
                    .filter(|(x, _)| x.parse::<usize>().is_ok())
                    .map(|(_, leaf)| leaf);
                let mlp = match (l, expert) {
                    ("up_proj.weight", _) => Some("ffn_up.weight"),
                    ("up_proj.bias", _) => Some("ffn_up.bias"),
                    ("down_proj.weight", _) => Some("ffn_down.weight"),
                    ("down_proj.bias", _) => Some("ffn_down.bias"),
                    ("gate.weight", _) => Some("ffn_gate_inp.weight"),
                    ("gate.e_score_correction_bias", _) => Some("exp_probs_b.bias"),
                    ("experts.up_proj", _) | (_, Some("up_proj.weight")) => {
                        Some("ffn_up_exps.weight")
                    }
                    ("experts.down_proj", _) | (_, Some("down_proj.weight")) => {
                        Some("ffn_down_exps.weight")
                    }
                    ("shared_experts.up_proj.weight", _) => Some("ffn_up_shexp.weight"),
                    ("shared_experts.down_proj.weight", _) => Some("ffn_down_shexp.weight"),
                    _ => None,
                };
                match mlp {
                    Some(n) => one(&blk(n)),
                    None => mamba(l).or_else(|| attention(l)),
                }
            }
        },
        Family::FalconH1 => match leaf {
            "input_layernorm.weight" => one(&blk("attn_norm.weight")),
            // The converter writes this one without the `.weight` suffix.
            "pre_ff_layernorm.weight" => one(&pick(&["ffn_norm", "ffn_norm.weight"])?),
            _ => match leaf.split_once('.')? {
                ("mamba", l) => mamba(l),
                ("self_attn", l) => attention(l),
                ("feed_forward", l) => {
                    let (proj, part) = l.split_once('.')?;
                    let name = match proj {
                        "gate_proj" => "ffn_gate",
                        "up_proj" => "ffn_up",
                        "down_proj" => "ffn_down",
                        _ => return None,
                    };
                    one(&blk(&format!("{name}.{part}")))
                }
                _ => None,
            },
        },
        Family::Mamba2 | Family::Bamba => None,
    }
}
