//! Checkpoint tensor names of each family, and the shapes a config implies for them. The model
//! builder and [`Mamba2Config::tensor_shapes`] both read names from here.

use super::blocks::{BlockKind, Family, MlpActivation};
use super::Mamba2Config;

/// The names of one block's tensors (prefixes end with a dot).
#[derive(Debug, Clone)]
pub struct BlockNames {
    /// The RMSNorm in front of the block.
    pub norm: String,
    /// Prefix of the Mamba-2 mixer (`in_proj.weight`, `conv1d.weight`, ...).
    pub mamba: String,
    /// Prefix of the attention projections (`q_proj.weight`, ...).
    pub attention: String,
    /// Prefix of the MLP (`input_linear` / `gate_proj` / `up_proj` / `down_proj` ...).
    pub mlp: String,
    /// Prefix of the MoE router and routed experts (Granite `block_sparse_moe.`, Nemotron-H
    /// `mixer.`).
    pub moe: String,
    /// Prefix of the MoE block's always-on shared MLP (Granite `shared_mlp.`, Nemotron-H
    /// `mixer.shared_experts.`).
    pub shared_mlp: String,
}

impl Mamba2Config {
    /// Root prefix of the model's tensors: `backbone` (Mamba-2, Nemotron-H as published) or
    /// `model`. Nemotron-H checkpoints re-saved by transformers 5 may use `model`; the builder
    /// passes the one the checkpoint has.
    pub fn default_root(&self) -> &'static str {
        match self.family {
            Family::Mamba2 | Family::NemotronH => "backbone",
            _ => "model",
        }
    }

    /// Name of the embedding matrix under `root`.
    pub fn embedding_name(&self, root: &str) -> String {
        match self.family {
            Family::Mamba2 | Family::NemotronH => format!("{root}.embeddings.weight"),
            _ => format!("{root}.embed_tokens.weight"),
        }
    }

    /// Name of the final RMSNorm's weight under `root`.
    pub fn final_norm_name(&self, root: &str) -> String {
        match self.family {
            Family::Mamba2 | Family::NemotronH => format!("{root}.norm_f.weight"),
            Family::GraniteHybrid => format!("{root}.norm.weight"),
            Family::FalconH1 | Family::Bamba => format!("{root}.final_layernorm.weight"),
        }
    }

    /// Names of block `b`'s tensors under `root`.
    pub fn block_names(&self, root: &str, b: usize) -> BlockNames {
        let spec = self.block_spec(b);
        let layer = format!("{root}.layers.{}.", spec.layer);
        let is_mlp = matches!(spec.kind, BlockKind::Mlp | BlockKind::Moe);
        let (norm, mamba, attention, mlp) = match self.family {
            Family::Mamba2 | Family::NemotronH => {
                let mixer = format!("{layer}mixer.");
                (
                    format!("{layer}norm.weight"),
                    mixer.clone(),
                    mixer.clone(),
                    mixer,
                )
            }
            Family::GraniteHybrid => (
                format!(
                    "{layer}{}.weight",
                    if is_mlp {
                        "post_attention_layernorm"
                    } else {
                        "input_layernorm"
                    }
                ),
                format!("{layer}mamba."),
                format!("{layer}self_attn."),
                format!("{layer}shared_mlp."),
            ),
            Family::FalconH1 | Family::Bamba => (
                format!(
                    "{layer}{}.weight",
                    if is_mlp {
                        "pre_ff_layernorm"
                    } else {
                        "input_layernorm"
                    }
                ),
                format!("{layer}mamba."),
                format!("{layer}self_attn."),
                format!("{layer}feed_forward."),
            ),
        };
        let (moe, shared_mlp) = match self.family {
            Family::GraniteHybrid => (format!("{layer}block_sparse_moe."), mlp.clone()),
            _ => (mamba.clone(), format!("{mamba}shared_experts.")),
        };
        BlockNames {
            norm,
            mamba,
            attention,
            mlp,
            moe,
            shared_mlp,
        }
    }

    /// Every tensor of block `b` with its stored shape, in load order.
    pub fn block_tensor_shapes(&self, root: &str, b: usize) -> Vec<(String, Vec<usize>)> {
        let kind = self.block_spec(b).kind;
        let n = self.block_names(root, b);
        let h = self.d_model;
        let mut out = vec![(n.norm.clone(), vec![h])];
        let mut push = |prefix: &str, name: &str, shape: Vec<usize>| {
            out.push((format!("{prefix}{name}"), shape));
        };
        if kind.has_ssm() {
            let (p, d) = (&n.mamba, self.d_in_proj());
            push(p, "in_proj.weight", vec![d, h]);
            if self.bias {
                push(p, "in_proj.bias", vec![d]);
            }
            push(p, "conv1d.weight", vec![self.conv_dim(), 1, self.d_conv]);
            if self.conv_bias {
                push(p, "conv1d.bias", vec![self.conv_dim()]);
            }
            push(p, "dt_bias", vec![self.nheads]);
            push(p, "A_log", vec![self.nheads]);
            push(p, "D", vec![self.nheads]);
            if self.gated_norm {
                push(p, "norm.weight", vec![self.d_inner]);
            }
            push(p, "out_proj.weight", vec![h, self.d_inner]);
            if self.out_proj_bias {
                push(p, "out_proj.bias", vec![h]);
            }
        }
        if let (true, Some(a)) = (kind.has_kv(), &self.attention) {
            let p = &n.attention;
            let (q, kv) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
            for (name, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                push(p, &format!("{name}.weight"), vec![rows, h]);
                if a.bias {
                    push(p, &format!("{name}.bias"), vec![rows]);
                }
            }
            push(p, "o_proj.weight", vec![h, q]);
            if a.bias {
                push(p, "o_proj.bias", vec![h]);
            }
        }
        if let (BlockKind::Mlp, Some(m)) = (kind, &self.mlp) {
            let (p, i) = (&n.mlp, m.intermediate_size);
            for (name, shape, bias) in self.mlp_tensors(i) {
                push(p, name, shape.clone());
                if bias && m.bias {
                    push(p, &name.replace(".weight", ".bias"), vec![shape[0]]);
                }
            }
        }
        if let (BlockKind::Moe, Some(m)) = (kind, &self.moe) {
            let (e, i) = (m.num_experts, m.intermediate_size);
            for (name, shape) in self.router_tensors() {
                push(&n.moe, name, shape);
            }
            match self.family {
                Family::GraniteHybrid => {
                    push(&n.moe, "input_linear.weight", vec![e, 2 * i, h]);
                    push(&n.moe, "output_linear.weight", vec![e, h, i]);
                }
                _ => {
                    for x in 0..e {
                        push(&n.moe, &format!("experts.{x}.up_proj.weight"), vec![i, h]);
                        push(&n.moe, &format!("experts.{x}.down_proj.weight"), vec![h, i]);
                    }
                }
            }
            let shared_bias =
                self.family != Family::GraniteHybrid && self.mlp.is_some_and(|m| m.bias);
            for (name, shape, bias) in self.moe_shared_tensors(m.shared_intermediate_size) {
                push(&n.shared_mlp, name, shape.clone());
                if bias && shared_bias {
                    push(
                        &n.shared_mlp,
                        &name.replace(".weight", ".bias"),
                        vec![shape[0]],
                    );
                }
            }
        }
        out
    }

    /// The router's tensors under the MoE prefix: Granite `router.layer.weight` `(E, H)`;
    /// Nemotron-H `gate.weight` `(E, H)` and `gate.e_score_correction_bias` `(E)`.
    pub(crate) fn router_tensors(&self) -> Vec<(&'static str, Vec<usize>)> {
        let (h, e) = (self.d_model, self.moe.map_or(0, |m| m.num_experts));
        match self.family {
            Family::GraniteHybrid => vec![("router.layer.weight", vec![e, h])],
            _ => vec![
                ("gate.weight", vec![e, h]),
                ("gate.e_score_correction_bias", vec![e]),
            ],
        }
    }

    /// The shared MLP of a MoE block: Granite's SwiGLU `shared_mlp`, Nemotron-H's ReLU²
    /// `shared_experts`.
    pub(crate) fn moe_shared_tensors(&self, s: usize) -> Vec<(&'static str, Vec<usize>, bool)> {
        let h = self.d_model;
        match self.family {
            Family::GraniteHybrid => self.mlp_tensors(s),
            _ => vec![
                ("up_proj.weight", vec![s, h], true),
                ("down_proj.weight", vec![h, s], true),
            ],
        }
    }

    /// The MLP's matrices as the family stores them: `(name, shape, may have a bias)`.
    pub(crate) fn mlp_tensors(&self, i: usize) -> Vec<(&'static str, Vec<usize>, bool)> {
        let h = self.d_model;
        match (self.family, self.mlp.map(|m| m.activation)) {
            (Family::GraniteHybrid, _) => vec![
                ("input_linear.weight", vec![2 * i, h], false),
                ("output_linear.weight", vec![h, i], false),
            ],
            (_, Some(MlpActivation::ReluSquared)) => vec![
                ("up_proj.weight", vec![i, h], true),
                ("down_proj.weight", vec![h, i], true),
            ],
            _ => vec![
                ("gate_proj.weight", vec![i, h], true),
                ("up_proj.weight", vec![i, h], true),
                ("down_proj.weight", vec![h, i], true),
            ],
        }
    }
}
