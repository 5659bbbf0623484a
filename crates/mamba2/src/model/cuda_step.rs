//! The decode step on CUDA as one captured graph per cache (see `mamba2_ops::cuda_graph`).
//!
//! The graph bakes in the addresses of the model's weights, the cache's states and its own
//! buffers, so it lives in the [`Mamba2Cache`] it was captured for (whose state tensors are
//! updated in place and never replaced) and remembers which model it belongs to. It is built at
//! the first step of a cache and replayed for every later one; configurations its kernels do not
//! take (unaligned widths, mixed dtypes, projection biases beyond 4 sequences) keep the eager
//! step.

use super::Mamba2Model;
use crate::cache::Mamba2Cache;
use crate::Result;
use candle_core::{DType, Device, Tensor, TensorId};
use mamba2_ops::cuda_graph::{StepGraph, StepScratch, StepStream};
use mamba2_ops::OpError;

/// A captured decode step and everything its addresses point into.
pub(crate) struct CudaStepGraph {
    model: [TensorId; 2], // embeddings and lm_head of the model it was captured for
    ids: Tensor,          // (batch) u32: refilled before each replay
    logits: Tensor,       // (batch, vocab_rows) f32: written by each replay
    _buffers: Vec<Tensor>,
    _scratch: StepScratch,
    graph: StepGraph,
}

impl std::fmt::Debug for CudaStepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaStepGraph")
            .field("logits", &self.logits.shape())
            .finish_non_exhaustive()
    }
}

/// What a cache holds for the captured step.
#[derive(Debug, Default)]
pub(crate) enum GraphSlot {
    #[default]
    Untried,
    /// The kernels' preconditions do not hold for this model and batch: decode eagerly.
    Unsupported,
    Ready(Box<CudaStepGraph>),
}

/// One decode step through the cache's graph: `ids` `(batch)` u32 on the model's device, already
/// range-checked. `None` when the graph cannot serve (the caller runs the eager step).
pub(crate) fn step(
    model: &Mamba2Model,
    ids: &Tensor,
    cache: &mut Mamba2Cache,
) -> Result<Option<Tensor>> {
    let Device::Cuda(dev) = model.device() else {
        return Ok(None);
    };
    let key = graph_key(model);
    let stale = match &cache.graph {
        GraphSlot::Ready(g) => g.model != key,
        GraphSlot::Unsupported => return Ok(None),
        GraphSlot::Untried => true,
    };
    if stale {
        cache.graph = GraphSlot::Untried;
        cache.graph = match capture(model, cache, dev) {
            Ok(g) => GraphSlot::Ready(Box::new(g)),
            Err(crate::Error::Op(OpError::Param {
                op: "cuda_graph",
                param,
                ..
            })) => {
                tracing::debug!("decode step not captured ({param}): eager decode");
                GraphSlot::Unsupported
            }
            Err(e) => return Err(e),
        };
    }
    let GraphSlot::Ready(g) = &mut cache.graph else {
        return Ok(None);
    };
    g.ids.slice_set(ids, 0, 0)?;
    g.graph.replay()?;
    Ok(Some(g.logits.copy()?))
}

fn capture(
    model: &Mamba2Model,
    cache: &mut Mamba2Cache,
    dev: &candle_core::CudaDevice,
) -> Result<CudaStepGraph> {
    let c = model.config();
    let batch = cache.batch();
    let dtype = model.dtype();
    let device = model.device();
    let res_dtype = if c.residual_in_fp32 {
        DType::F32
    } else {
        dtype
    };
    let s = StepStream::new(dev, dtype, batch)?;
    let zeros = |shape: (usize, usize), dt: DType| Tensor::zeros(shape, dt, device);
    let ids = Tensor::zeros(batch, DType::U32, device)?;
    let hidden = zeros((batch, c.d_model), dtype)?; // embedding, then each mixer's output
    let residual = [
        zeros((batch, c.d_model), res_dtype)?,
        zeros((batch, c.d_model), res_dtype)?,
    ];
    let normed = zeros((batch, c.d_model), dtype)?;
    let zxbcdt = zeros((batch, c.d_in_proj()), dtype)?;
    let y = zeros((batch, c.d_inner), dtype)?;
    let logits = zeros((batch, model.vocab_rows()), DType::F32)?;
    let scratch = s.scratch(c.d_inner, c.nheads, c.ngroups)?;
    let parts = model.projection_views(&zxbcdt)?; // z, xBC, dt: views of zxbcdt
    let (fuse_res, fuse_group) = (s.fuses_res_norm(), s.fuses_group_norm());
    // The residual norm in front of a projection: fused into it, or a kernel of its own.
    let norm_then_linear = |s: &StepStream,
                            res_in: Option<&Tensor>,
                            norm_w: &Tensor,
                            res_out: &Tensor,
                            w: &Tensor,
                            bias: Option<&Tensor>,
                            out: &Tensor|
     -> mamba2_ops::Result<()> {
        if fuse_res {
            s.linear_res_norm(&hidden, res_in, norm_w, c.norm_eps, res_out, w, bias, out)
        } else {
            s.rms_norm_residual(&hidden, res_in, norm_w, c.norm_eps, &normed, res_out)?;
            s.linear(&normed, w, bias, out)
        }
    };
    let graph = s.capture(|s| {
        s.embedding(&model.embeddings, &ids, &hidden)?;
        for (i, block) in model.blocks.iter().enumerate() {
            let m = &block.mixer;
            // The residual ping-pongs: the norm reads one buffer and writes the other.
            let res_in = (i > 0).then(|| &residual[(i + 1) % 2]);
            let (w_in, b_in) = (m.in_proj.weight(), m.in_proj.bias());
            let res_out = &residual[i % 2];
            norm_then_linear(s, res_in, &block.norm_weight, res_out, w_in, b_in, &zxbcdt)?;
            let args = model.decode_step_args(m, &parts, cache.layer_mut(i));
            let (w_out, b_out) = (m.out_proj.weight(), m.out_proj.bias());
            if fuse_group {
                s.mixer_decode_step_unnormed(&args, &model.ssd_params, &scratch)?;
                s.linear_group_norm(
                    &scratch,
                    args.z,
                    args.norm_weight,
                    args.eps,
                    args.norm_before_gate,
                    w_out,
                    b_out,
                    &hidden,
                )?;
            } else {
                s.mixer_decode_step(&args, &model.ssd_params, &scratch, &y)?;
                s.linear(&y, w_out, b_out, &hidden)?;
            }
        }
        let n = model.blocks.len();
        let res_in = (n > 0).then(|| &residual[(n + 1) % 2]);
        norm_then_linear(
            s,
            res_in,
            &model.norm_f,
            &residual[n % 2],
            &model.lm_head,
            None,
            &logits,
        )
    })?;
    Ok(CudaStepGraph {
        model: graph_key(model),
        ids,
        logits,
        _buffers: [vec![hidden, normed, zxbcdt, y], residual.to_vec()].concat(),
        _scratch: scratch,
        graph,
    })
}

/// Identity of the weights a captured step reads (clones of a model share them).
fn graph_key(model: &Mamba2Model) -> [TensorId; 2] {
    [model.embeddings.id(), model.lm_head.id()]
}
