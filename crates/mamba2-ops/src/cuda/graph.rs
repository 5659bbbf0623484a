//! A whole decode step captured as one CUDA graph.
//!
//! At batch 1 a decode step of a 1.3b model is ~200 small launches, and the host cost of each
//! (Candle's allocation, argument packing, the launch itself) exceeds its GPU time: the step is
//! launch-bound. Here the caller records the step once, kernel by kernel, into buffers it owns
//! for the life of the graph (weights, states, scratch, an ids buffer in, a logits buffer out);
//! each later token is one graph launch.
//!
//! The capture runs on a private stream, so work that other threads enqueue on Candle's stream
//! meanwhile is neither captured nor disturbed; a replay is ordered after Candle's stream (the
//! host's refill of the ids buffer) and Candle's stream after it (the logits read-back), by
//! events. Every address baked into the graph must stay valid and unmoved while it lives: the
//! enqueue functions refuse views that would need a temporary copy.

use super::decode_step::{self, StepScratchPtrs};
use super::launch::{func_on, ptr, ptx, suffix, Kernel, Result as CResult};
use super::{embedding, linear, rms_norm};
use crate::decode_step::{validate, DecodeStepArgs, StepDims};
use crate::{OpError, Result, SsdParams};
use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaGraph, CudaStream};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

const OP: &str = "cuda_graph";

fn need(ok: bool, what: &'static str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(OpError::Param {
            op: OP,
            param: what,
            message: "precondition of the captured step does not hold".into(),
        })
    }
}

/// The kernels of one decode step for one activation dtype and batch size, launched on a
/// private stream; [`StepStream::capture`] records them into a [`StepGraph`].
pub struct StepStream {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    batch: usize,
    embedding: Kernel,
    res_norm: Kernel,
    step: Kernel,
    linear: Kernel,
}

/// Scratch of the fused mixer step: f32 `y` and per-head sums of squares, and the per-group
/// arrival counters (zeroed once: the kernel re-arms them).
pub struct StepScratch {
    ybuf: Tensor,  // (batch, d_inner) f32
    hsum: Tensor,  // (batch, nheads) f32
    count: Tensor, // (batch, ngroups) u32
}

impl StepStream {
    /// Kernels for `dtype` activations and `batch` sequences (at most 4, the widest projection
    /// kernel; larger batches decode eagerly with cuBLAS projections), loaded now: module loading is not allowed while a stream captures.
    pub fn new(dev: &CudaDevice, dtype: DType, batch: usize) -> Result<Self> {
        let sfx = suffix(dtype).ok_or(OpError::Dtype {
            op: OP,
            arg: "activations",
            got: dtype,
            expected: "f32, f16 or bf16",
        })?;
        let bb = linear::variant(batch).filter(|_| batch > 0);
        need(bb.is_some(), "batch")?;
        let stream = dev.cuda_stream().context().new_stream().w()?;
        let k = |module: &str, src: &str, name: String| func_on(dev, &stream, module, src, &name);
        Ok(Self {
            embedding: k("embedding", ptx::EMBEDDING, format!("embedding_rows_{sfx}"))?,
            res_norm: k(
                "rms_norm",
                ptx::RMS_NORM,
                format!("rms_norm_residual_{sfx}"),
            )?,
            step: k(
                "decode_step",
                ptx::DECODE_STEP,
                format!("mixer_decode_step_{sfx}"),
            )?,
            linear: k(
                "linear",
                ptx::LINEAR,
                format!("linear_b{}_{sfx}", bb.unwrap_or(1)),
            )?,
            dev: dev.clone(),
            stream,
            batch,
        })
    }

    /// Number of sequences the step was built for.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Zeroed scratch for [`StepStream::mixer_decode_step`].
    pub fn scratch(&self, d_inner: usize, nheads: usize, ngroups: usize) -> Result<StepScratch> {
        let device = Device::Cuda(self.dev.clone());
        let b = self.batch;
        Ok(StepScratch {
            ybuf: Tensor::zeros((b, d_inner), DType::F32, &device)?,
            hsum: Tensor::zeros((b, nheads), DType::F32, &device)?,
            count: Tensor::zeros((b, ngroups), DType::U32, &device)?,
        })
    }

    /// `out[b] = table[ids[b]]`: `table` `(rows, dim)`, `ids` `(batch)` u32 whose values the
    /// caller has checked against `rows`, `out` `(batch, dim)`.
    pub fn embedding(&self, table: &Tensor, ids: &Tensor, out: &Tensor) -> Result<()> {
        need(
            embedding::enqueue(&self.embedding, &self.dev, table, ids, out)?,
            "embedding",
        )
    }

    /// `rms_norm_residual` into caller-owned outputs: `normed` `(batch, dim)` of the weight's
    /// dtype and `residual_out` `(batch, dim)` of `res_dtype`, both distinct from the inputs.
    pub fn rms_norm_residual(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        weight: &Tensor,
        eps: f64,
        normed: &Tensor,
        residual_out: &Tensor,
    ) -> Result<()> {
        need(
            weight.is_contiguous()
                && normed.is_contiguous()
                && residual_out.is_contiguous()
                && x.is_contiguous()
                && residual.is_none_or(|r| r.is_contiguous()),
            "rms_norm_residual",
        )?;
        need(
            rms_norm::enqueue_residual(
                &self.res_norm,
                &self.dev,
                x,
                residual,
                weight,
                eps,
                residual_out.dtype(),
                normed,
                Some(residual_out),
            )?,
            "rms_norm_residual",
        )
    }

    /// `out = x · wᵀ (+ bias)`: `x` `(batch, k)`, `w` `(n, k)`, `out` `(batch, n)` of x's dtype
    /// or f32 (logits).
    pub fn linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        out: &Tensor,
    ) -> Result<()> {
        need(x.dim(0)? == self.batch, "linear")?;
        need(
            linear::enqueue(&self.linear, &self.dev, x, w, bias, out)?,
            "linear",
        )
    }

    /// The fused mixer step (conv update, state update, gated norm) into `out`
    /// `(batch, d_inner)`; the states of `args` are updated in place at every replay.
    pub fn mixer_decode_step(
        &self,
        args: &DecodeStepArgs,
        params: &SsdParams,
        scratch: &StepScratch,
        out: &Tensor,
    ) -> Result<()> {
        let StepDims {
            batch,
            nheads,
            headdim,
            d_state,
            d_inner,
        } = validate(args)?;
        let unit_rows = |t: &Tensor| t.rank() == 2 && t.layout().stride()[1] == 1;
        let contig = |t: Option<&Tensor>| t.is_none_or(|t| t.is_contiguous());
        need(
            batch == self.batch
                && decode_step::supported(args, batch, d_state, headdim, d_inner)?
                && unit_rows(args.xbc)
                && unit_rows(args.dt)
                && unit_rows(args.z)
                && contig(Some(args.conv_weight))
                && contig(args.conv_bias)
                && contig(Some(args.a))
                && contig(args.d)
                && contig(args.dt_bias)
                && contig(Some(args.norm_weight))
                && out.is_contiguous()
                && out.dims() == [batch, d_inner]
                && out.dtype() == args.xbc.dtype()
                && scratch.ybuf.dims() == [batch, d_inner]
                && scratch.hsum.dims() == [batch, nheads]
                && scratch.count.dims() == [batch, args.ngroups],
            "mixer_decode_step",
        )?;
        let s = StepScratchPtrs {
            ybuf: ptr(&scratch.ybuf, &self.dev)?,
            hsum: ptr(&scratch.hsum, &self.dev)?,
            count: ptr(&scratch.count, &self.dev)?,
        };
        let ok = decode_step::enqueue(
            &self.step, &self.dev, args, params, nheads, headdim, d_state, out, s,
        )?;
        need(ok, "mixer_decode_step")
    }

    /// Records what `record` enqueues on this stream (nothing runs) and instantiates it.
    pub fn capture(&self, record: impl FnOnce(&Self) -> Result<()>) -> Result<StepGraph> {
        // Buffers written by Candle's stream before the capture (zeroed scratch) are complete
        // before the first replay: replays wait for Candle's stream.
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let recorded = record(self);
        // Always end the capture, also after a failed record, so the stream is usable again.
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .w();
        recorded?;
        let graph = graph?.ok_or(OpError::Param {
            op: OP,
            param: "capture",
            message: "the capture recorded nothing".into(),
        })?;
        graph.upload().w()?;
        let ctx = self.stream.context();
        Ok(StepGraph {
            graph,
            stream: self.stream.clone(),
            candle: self.dev.cuda_stream(),
            before: ctx.new_event(None).w()?,
            after: ctx.new_event(None).w()?,
        })
    }
}

/// A captured decode step: [`StepGraph::replay`] runs it once, ordered after the work already
/// on the device's Candle stream and before the work enqueued there afterwards.
pub struct StepGraph {
    graph: CudaGraph,
    stream: Arc<CudaStream>,
    candle: Arc<CudaStream>,
    before: CudaEvent,
    after: CudaEvent,
}

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialised
// (CUDA's graph thread-safety rules); `replay` takes `&mut self`, so they are.
unsafe impl Send for StepGraph {}
// SAFETY: no method takes `&self` and touches the graph.
unsafe impl Sync for StepGraph {}

impl StepGraph {
    /// Launches the graph once (host cost: two event records, two waits, one graph launch).
    pub fn replay(&mut self) -> Result<()> {
        self.replay_inner().map_err(OpError::from)
    }

    fn replay_inner(&mut self) -> CResult<()> {
        self.before.record(&self.candle).w()?;
        self.stream.wait(&self.before).w()?;
        self.graph.launch().w()?;
        self.after.record(&self.stream).w()?;
        self.candle.wait(&self.after).w()?;
        super::launch::count_launch();
        Ok(())
    }
}

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepGraph")
    }
}
