//! The mixture-of-experts block: router, routed experts and the always-on shared MLP,
//! written against the `moe_route` / `moe_experts` ops. Maps a normed `(batch, seqlen, d_model)`
//! input to `experts(x) + shared(x)`, like HF's `GraniteMoeHybridMoE + shared_mlp` and
//! `NemotronHMoE`.

use super::mixers::Mlp;
use super::Mamba2Model;
use crate::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};
use mamba2_ops::{
    linear, moe_experts, moe_experts_quantized, moe_route, ExpertActivation, MoeExpertsArgs,
    MoeQuantizedExpertsArgs, MoeRouteArgs, MoeRouting, QuantizedExpert,
};
use std::sync::{Arc, Mutex};

/// Expert ids chosen by one MoE block in the forwards since tracing was switched on, one
/// `(tokens, top_k)` u32 tensor per forward (tokens in `(batch, seqlen)` row-major order).
type Trace = Arc<Mutex<Option<Vec<Tensor>>>>;

#[derive(Debug, Clone)]
pub(crate) struct MoeBlock {
    /// `(n_experts, d_model)`: in the model dtype for Granite (HF runs its router in the
    /// activation dtype), f32 for Nemotron-H (HF keeps `gate.weight` in f32).
    pub router: Tensor,
    /// Nemotron-H's `e_score_correction_bias` `(n_experts)` f32.
    pub correction_bias: Option<Tensor>,
    pub experts: RoutedExperts,
    pub activation: ExpertActivation,
    pub routing: MoeRouting,
    pub top_k: usize,
    pub shared: Mlp,
    /// Checkpoint layer, for [`Mamba2Model::take_routing_trace`].
    pub layer: usize,
    pub trace: Trace,
}

/// The routed experts' weights.
#[derive(Debug, Clone)]
pub(crate) enum RoutedExperts {
    /// Stacked in the model dtype: `up` `(n_experts, up_rows, d_model)`, `down`
    /// `(n_experts, d_model, inter)` (any output multiplier folded in).
    Dense { up: Tensor, down: Tensor },
    /// In their ggml blocks, as a quantized GGUF stores them (read in place from the memory map
    /// on the CPU). Blocks cannot absorb a multiplier exactly, so `gate_scale` (Granite's
    /// `residual_multiplier`, folded into `down` on the dense path) scales the gates instead:
    /// the expert outputs are linear in it.
    Quantized {
        experts: Vec<QuantizedExpert>,
        gate_scale: f64,
    },
}

impl RoutedExperts {
    fn count(&self) -> usize {
        match self {
            RoutedExperts::Dense { up, .. } => up.dim(0).unwrap_or(1),
            RoutedExperts::Quantized { experts, .. } => experts.len(),
        }
    }
}

impl MoeBlock {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, seqlen, h) = x.dims3()?;
        let flat = x.reshape((batch * seqlen, h))?; // (tokens, d_model)
        let logits = match self.router.dtype() {
            // Nemotron-H: f32 input and weight.
            DType::F32 => linear(&flat.to_dtype(DType::F32)?, &self.router, None)?,
            // Granite: logits rounded to the model dtype, then f32, as HF's `.float()`.
            _ => linear(&flat, &self.router, None)?.to_dtype(DType::F32)?,
        }; // (tokens, n_experts)
        let (ids, gates) = moe_route(&MoeRouteArgs {
            logits: &logits,
            correction_bias: self.correction_bias.as_ref(),
            top_k: self.top_k,
            routing: self.routing,
        })?; // (tokens, top_k) each
        if let Ok(mut t) = self.trace.lock() {
            if let Some(v) = t.as_mut() {
                v.push(ids.clone());
            }
        }
        let routed = match &self.experts {
            RoutedExperts::Dense { up, down } => moe_experts(&MoeExpertsArgs {
                x: &flat,
                ids: &ids,
                gates: &gates,
                up,
                down,
                activation: self.activation,
            })?,
            RoutedExperts::Quantized {
                experts,
                gate_scale,
            } => moe_experts_quantized(&MoeQuantizedExpertsArgs {
                x: &flat,
                ids: &ids,
                gates: &gates.affine(*gate_scale, 0.0)?,
                experts,
                activation: self.activation,
            })?,
        }
        .reshape((batch, seqlen, h))?;
        Ok((routed + self.shared.forward(x)?)?)
    }

    /// Weights of the routed experts (every expert).
    pub(crate) fn routed_parameters(&self) -> usize {
        match &self.experts {
            RoutedExperts::Dense { up, down } => up.elem_count() + down.elem_count(),
            RoutedExperts::Quantized { experts, .. } => {
                experts.iter().map(|e| e.parameters()).sum()
            }
        }
    }

    /// Bytes of the routed experts as stored (every expert).
    pub(crate) fn routed_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match &self.experts {
            RoutedExperts::Dense { up, down } => bytes(up) + bytes(down),
            RoutedExperts::Quantized { experts, .. } => {
                experts.iter().map(|e| e.storage_bytes()).sum()
            }
        }
    }

    /// The part of `all` (a quantity summed over the experts, which are all the same size) that
    /// belongs to the `top_k` experts one token is sent to.
    pub(crate) fn per_token(&self, all: usize) -> usize {
        let experts = self.experts.count().max(1);
        all / experts * self.top_k.min(experts)
    }

    /// The block format of the routed experts, when they are in blocks.
    pub(crate) fn experts_ggml_dtype(&self) -> Option<GgmlDType> {
        match &self.experts {
            RoutedExperts::Dense { .. } => None,
            RoutedExperts::Quantized { experts, .. } => experts
                .first()
                .into_iter()
                .flat_map(|e| e.up.iter().chain([&e.down]))
                .map(|m| m.ggml_dtype())
                .find(|&t| mamba2_ops::quantized::is_block_format(t)),
        }
    }

    /// The dense tensors: router, correction bias and dense expert stacks.
    pub(crate) fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        let stacks = match &self.experts {
            RoutedExperts::Dense { up, down } => vec![up, down],
            RoutedExperts::Quantized { .. } => Vec::new(),
        };
        [&self.router]
            .into_iter()
            .chain(stacks)
            .chain(self.correction_bias.as_ref())
    }
}

/// One MoE block's routing decisions, from [`Mamba2Model::take_routing_trace`].
#[derive(Debug, Clone)]
pub struct RoutingTrace {
    /// The checkpoint layer (`layers.{layer}.…`).
    pub layer: usize,
    /// Per forward since tracing was switched on: the chosen expert ids `(tokens, top_k)` u32,
    /// best first, tokens in `(batch, seqlen)` row-major order.
    pub ids: Vec<Tensor>,
}

impl Mamba2Model {
    fn moe_blocks(&self) -> impl Iterator<Item = &MoeBlock> {
        self.blocks.iter().filter_map(|b| match &b.mixer {
            super::mixers::Mixer::Moe(m) => Some(m),
            _ => None,
        })
    }

    /// Debug API: starts (`true`) or stops recording the experts every MoE block chooses (a
    /// no-op for models without MoE blocks). Recording costs one small tensor per block and
    /// forward until [`Mamba2Model::take_routing_trace`] drains it.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use mamba2::{config::Mamba2Config, model::Mamba2Model};
    /// let cfg = Mamba2Config::from_json_str(
    ///     r#"{"model_type": "nemotron_h", "hidden_size": 32, "vocab_size": 64,
    ///         "hybrid_override_pattern": "ME", "mamba_num_heads": 2, "mamba_head_dim": 16,
    ///         "n_groups": 1, "ssm_state_size": 8, "n_routed_experts": 4,
    ///         "num_experts_per_tok": 2, "moe_intermediate_size": 8,
    ///         "moe_shared_expert_intermediate_size": 8}"#,
    ///     "inline",
    /// )?;
    /// let model = Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 0)?;
    /// model.record_routing(true);
    /// let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
    /// model.forward(&ids, None)?;
    /// let trace = model.take_routing_trace();
    /// assert_eq!(trace[0].layer, 1);
    /// assert_eq!(trace[0].ids[0].dims(), &[3, 2]); // 3 tokens, 2 experts each
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn record_routing(&self, on: bool) {
        for m in self.moe_blocks() {
            if let Ok(mut t) = m.trace.lock() {
                *t = on.then(Vec::new);
            }
        }
    }

    /// Debug API: the experts chosen since [`Mamba2Model::record_routing`] (or the last call),
    /// one entry per MoE block in layer order; recording stays on.
    pub fn take_routing_trace(&self) -> Vec<RoutingTrace> {
        self.moe_blocks()
            .map(|m| RoutingTrace {
                layer: m.layer,
                ids: m
                    .trace
                    .lock()
                    .ok()
                    .and_then(|mut t| t.as_mut().map(std::mem::take))
                    .unwrap_or_default(),
            })
            .collect()
    }
}
