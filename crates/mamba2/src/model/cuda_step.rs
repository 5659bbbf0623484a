//! The decode step on CUDA as one captured graph per cache (see `mamba2_ops::cuda_graph`).
//!
//! The graph bakes in the addresses of the model's weights, the cache's states and its own
//! buffers, so it lives in the [`Mamba2Cache`] it was captured for (whose state tensors are
//! updated in place and never replaced) and remembers which model it belongs to. It is built at
//! the first step of a cache and replayed for every later one; configurations its kernels do not
//! take (unaligned widths, mixed dtypes, projection biases beyond 4 sequences) keep the eager
//! step.

use super::mixers::projection_views;
use super::{Mamba2Model, StackLayer};
use crate::cache::Mamba2Cache;
use crate::Result;
use candle_core::{DType, Device, Tensor, TensorId};
use mamba2_ops::cuda_graph::{
    ConvShift, ResidualEpilogue, RowScale, StepGraph, StepScratch, StepStream,
};
use mamba2_ops::OpError;

/// A captured decode step and everything its addresses point into.
pub(crate) struct CudaStepGraph {
    model: [TensorId; 2], // embeddings and lm_head of the model it was captured for
    ids: Tensor,          // (batch) u32: refilled before each replay
    logits: Tensor,       // (batch, vocab_rows) f32: written by each replay
    _buffers: Buffers,
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
    // The captured layout is the pure Mamba-2 stack; hybrids take the eager step.
    let Some(stack) = model.mamba_stack() else {
        return Ok(None);
    };
    let Some(key) = graph_key(model) else {
        return Ok(None);
    };
    let stale = match &cache.graph {
        GraphSlot::Ready(g) => g.model != key,
        GraphSlot::Unsupported => return Ok(None),
        GraphSlot::Untried => true,
    };
    if stale {
        cache.graph = GraphSlot::Untried;
        cache.graph = match capture(model, key, &stack, cache, dev) {
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
    key: [TensorId; 2],
    stack: &[StackLayer<'_>],
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
    let buf = Buffers {
        hidden: zeros((batch, c.d_model), dtype)?,
        residual: [
            zeros((batch, c.d_model), res_dtype)?,
            zeros((batch, c.d_model), res_dtype)?,
        ],
        normed: zeros((batch, c.d_model), dtype)?,
        sums: s.residual_parts(c.d_model)?,
        zxbcdt: zeros((batch, c.d_in_proj()), dtype)?,
        y: zeros((batch, c.d_inner), dtype)?,
        logits: zeros((batch, model.vocab_rows()), DType::F32)?,
    };
    let scratch = s.scratch(c.d_inner, c.nheads, c.ngroups)?;
    let parts = projection_views(c, &buf.zxbcdt)?; // z, xBC, dt: views of zxbcdt
    let epilogues = s.norm_epilogues() && !stack.is_empty();
    let graph = s.capture(|s| {
        s.embedding(model.embeddings.dense_or_err()?, &ids, &buf.hidden)?;
        let rec = Recorder {
            model,
            stack,
            s,
            scratch: &scratch,
            parts: &parts,
            buf: &buf,
        };
        if epilogues {
            rec.layers_with_norm_epilogues(cache)
        } else {
            rec.layers_with_norm_kernels(cache)
        }
    })?;
    Ok(CudaStepGraph {
        model: key,
        ids,
        logits: buf.logits.clone(),
        _buffers: buf,
        _scratch: scratch,
        graph,
    })
}

/// The buffers a captured step reads and writes between its kernels.
struct Buffers {
    /// (batch, d_model): the embedding (and, four-kernel layout, each mixer's output).
    hidden: Tensor,
    /// (batch, d_model) of the residual dtype: one layer reads one, writes the other.
    residual: [Tensor; 2],
    /// (batch, d_model): each norm's output (four-kernel layout) or its unscaled input.
    normed: Tensor,
    /// (batch, parts) f32: partial sums of squares of the residual, one per block of the
    /// output projection (norm epilogues; `StepStream::residual_parts`).
    sums: Tensor,
    /// (batch, d_in_proj): the input projection.
    zxbcdt: Tensor,
    /// (batch, d_inner): the mixer step's output.
    y: Tensor,
    /// (batch, vocab_rows) f32.
    logits: Tensor,
}

/// What recording the layers needs.
struct Recorder<'a> {
    model: &'a Mamba2Model,
    stack: &'a [StackLayer<'a>],
    s: &'a StepStream,
    scratch: &'a StepScratch,
    parts: &'a (Tensor, Tensor, Tensor), // z, xBC, dt: views of zxbcdt
    buf: &'a Buffers,
}

impl Recorder<'_> {
    /// The four-kernel layer (residual norm, input projection, fused step with its norm,
    /// output projection): batches beyond the matrix-vector kernels, or
    /// `CudaOptions::norm_epilogues` off.
    fn layers_with_norm_kernels(&self, cache: &mut Mamba2Cache) -> mamba2_ops::Result<()> {
        let (model, s, b) = (self.model, self.s, self.buf);
        let c = model.config();
        let eps = c.norm_eps;
        for (i, layer) in self.stack.iter().enumerate() {
            let m = layer.mixer;
            // The residual ping-pongs: the norm reads one buffer and writes the other.
            let res_in = (i > 0).then(|| &b.residual[(i + 1) % 2]);
            let res_out = &b.residual[i % 2];
            s.rms_norm_residual(&b.hidden, res_in, layer.norm, eps, &b.normed, res_out)?;
            s.linear(
                &b.normed,
                m.in_proj.weight.dense_or_err()?,
                m.in_proj.bias(),
                &b.zxbcdt,
            )?;
            let args = m.decode_step_args(c, self.parts, cache.layer_mut(i), layer.gated_norm);
            s.mixer_decode_step(&args, &model.ssd_params, self.scratch, &b.y)?;
            s.linear(
                &b.y,
                m.out_proj.weight.dense_or_err()?,
                m.out_proj.bias(),
                &b.hidden,
            )?;
        }
        let n = self.stack.len();
        let res_in = (n > 0).then(|| &b.residual[(n + 1) % 2]);
        let res_out = &b.residual[n % 2];
        s.rms_norm_residual(&b.hidden, res_in, &model.norm_f, eps, &b.normed, res_out)?;
        s.linear(&b.normed, model.lm_head.dense_or_err()?, None, &b.logits)
    }

    /// The norm-epilogue layer (see `mamba2_ops::cuda_graph`): input projection scaled by the
    /// residual norm whose input the previous output projection wrote, fused step (its gated
    /// norm deferred to the output projection when there is one group), output projection
    /// adding the residual. Only the first layer's norm is a kernel of its own (its input is
    /// the embedding). At least one layer.
    fn layers_with_norm_epilogues(&self, cache: &mut Mamba2Cache) -> mamba2_ops::Result<()> {
        let (model, s, b) = (self.model, self.s, self.buf);
        let c = model.config();
        let blocks = self.stack;
        // `normed` holds each norm's input times its weight, unscaled, and `sums` the partial
        // sums of squares of that input: both written by the previous output projection.
        let res_scale = RowScale {
            parts: &b.sums,
            dim: c.d_model,
            eps: c.norm_eps,
        };
        let first_norm = blocks[0].norm;
        s.rms_norm_residual(
            &b.hidden,
            None,
            first_norm,
            c.norm_eps,
            &b.normed,
            &b.residual[0],
        )?;
        for (i, layer) in blocks.iter().enumerate() {
            let m = layer.mixer;
            let (w_in, b_in) = (m.in_proj.weight.dense_or_err()?, m.in_proj.bias());
            if i == 0 {
                s.linear(&b.normed, w_in, b_in, &b.zxbcdt)?;
            } else {
                s.linear_scaled(&b.normed, &res_scale, w_in, b_in, &b.zxbcdt)?;
            }
            let args = m.decode_step_args(c, self.parts, cache.layer_mut(i), layer.gated_norm);
            let epi = ResidualEpilogue {
                residual: &b.residual[i % 2],
                residual_out: &b.residual[(i + 1) % 2],
                next_norm_w: blocks.get(i + 1).map_or(&model.norm_f, |b| b.norm),
                parts_out: &b.sums,
            };
            let (w_out, b_out) = (m.out_proj.weight.dense_or_err()?, m.out_proj.bias());
            if c.ngroups == 1 {
                s.mixer_decode_step_deferred(&args, &model.ssd_params, self.scratch, &b.y)?;
                let scale = RowScale {
                    parts: self.scratch.sums(),
                    dim: c.d_inner,
                    eps: args.eps,
                };
                let shift = ConvShift {
                    conv_state: args.conv_state,
                    xbc: args.xbc,
                    ch0: c.d_inner,
                    nch: 2 * c.ngroups * c.d_state,
                };
                s.linear_residual(
                    &b.y,
                    Some(&scale),
                    w_out,
                    b_out,
                    &epi,
                    Some(&shift),
                    &b.normed,
                )?;
            } else {
                // One scale per group: the step normalises, the projection adds the residual.
                s.mixer_decode_step(&args, &model.ssd_params, self.scratch, &b.y)?;
                s.linear_residual(&b.y, None, w_out, b_out, &epi, None, &b.normed)?;
            }
        }
        s.linear_scaled(
            &b.normed,
            &res_scale,
            model.lm_head.dense_or_err()?,
            None,
            &b.logits,
        )
    }
}

/// Identity of the weights a captured step reads (clones of a model share them).
/// `None` when a matrix is block-quantized (no captured step for those).
fn graph_key(model: &Mamba2Model) -> Option<[TensorId; 2]> {
    Some([model.embeddings.dense()?.id(), model.lm_head.dense()?.id()])
}
