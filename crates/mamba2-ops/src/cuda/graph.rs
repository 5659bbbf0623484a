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
//!
//! A layer's kernels, by batch size:
//! - up to `linear::MAX_ROWS` sequences, "norm epilogues" (the default;
//!   `CudaOptions::norm_epilogues = false` switches back to the four-kernel layout below):
//!   matrix-vector input projection, fused mixer step, matrix-vector output projection. Neither norm has a kernel:
//!   an RMSNorm scales its input by one number per row (per group), so its producer writes the input
//!   times the norm weight with per-block partial sums of squares, and the projection that consumes
//!   it multiplies its dot products by 1 / rms after the reduction (`linear_scaled`, `linear_res`).
//!   The output projection's epilogue also adds the residual and writes the next block's norm input,
//!   and (with one group, where its scale is one per row) the fused step defers its gated norm and
//!   its B/C conv-state shift to it, so the step has no cross-block arrival counting. On sm_90+ each
//!   kernel is a programmatic dependent of the previous one (it starts while that one ends and loads
//!   its weights or states before waiting for its inputs).
//! - up to `linear::MAX_ROWS` sequences, four-kernel layout: residual norm, input projection,
//!   fused mixer step with its norm, output projection (1.3b batch 1: 624 tok/s on an H200).
//! - more sequences: the four-kernel layout with cuBLAS GEMMs on this stream (see `blas.rs`)
//!   for the projections (1.3b batch 16: 3,107 tok/s eager -> 3,423 captured).
//!
//! Fusing the norms into the projections' prologues instead (every block recomputing the row's
//! norm from L2 before its first multiply) measured slower: 515-612 against 624 tok/s.

use super::blas::StreamBlas;
use super::decode_step::{self, StepMode, StepScratchPtrs, StepShape};
use super::launch::Result as CResult;
use super::launch::{cuda_options, func_on, pdl_capable, ptr, ptx, suffix, Kernel};
pub use super::linear::{ConvShift, ResidualEpilogue, RowScale};
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
        Err(unmet(what))
    }
}

/// The error of a precondition `what` of the captured step that does not hold.
fn unmet(what: &'static str) -> OpError {
    OpError::Param {
        op: OP,
        param: what,
        message: "precondition of the captured step does not hold".into(),
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
    step: [Kernel; 2], // the fused mixer step: general, n128
    /// The matrix-vector kernels (plain, scaled, residual epilogue) for batches up to
    /// `linear::MAX_ROWS`; cuBLAS beyond.
    matvec: Option<[Kernel; 3]>,
    blas: Option<Arc<StreamBlas>>,
    epilogues: bool, // the norm-epilogue layout (module docs)
}

/// Scratch of the fused mixer step: f32 `y` and per-block sums of squares, and the per-group
/// arrival counters (zeroed once: the kernel re-arms them); the deferred step uses the sums
/// only.
pub struct StepScratch {
    ybuf: Tensor,  // (batch, d_inner) f32
    hsum: Tensor,  // (batch, nheads * split) f32
    count: Tensor, // (batch, ngroups) u32
    split: usize,  // blocks per head
}

impl StepStream {
    /// Kernels for `dtype` activations and `batch` sequences, loaded now: module loading is
    /// not allowed while a stream captures.
    pub fn new(dev: &CudaDevice, dtype: DType, batch: usize) -> Result<Self> {
        let sfx = suffix(dtype).ok_or(OpError::Dtype {
            op: OP,
            arg: "activations",
            got: dtype,
            expected: "f32, f16 or bf16",
        })?;
        need(batch > 0, "batch")?;
        let stream = dev.cuda_stream().context().new_stream().w()?;
        // Batches the matrix-vector kernels take get the norm-epilogue layout (unless the
        // options switch it off for a comparison: read at every capture); the others run
        // cuBLAS, which does not
        // join a PDL chain.
        let bb = linear::variant(batch);
        let opts = cuda_options();
        let epilogues = bb.is_some() && opts.norm_epilogues;
        let pdl = bb.is_some() && pdl_capable(dev)? && opts.pdl;
        let k =
            |module: &str, src: &str, name: String| func_on(dev, &stream, module, src, &name, pdl);
        let matvec = match bb {
            Some(bb) => Some([
                k("linear", ptx::LINEAR, format!("linear_b{bb}_{sfx}"))?,
                k("linear", ptx::LINEAR, format!("linear_scaled_b{bb}_{sfx}"))?,
                k("linear", ptx::LINEAR, format!("linear_res_b{bb}_{sfx}"))?,
            ]),
            None => None,
        };
        let blas = match bb {
            Some(_) => None,
            None => Some(Arc::new(StreamBlas::new(dev, &stream)?)),
        };
        Ok(Self {
            embedding: k("embedding", ptx::EMBEDDING, format!("embedding_rows_{sfx}"))?,
            res_norm: k(
                "rms_norm",
                ptx::RMS_NORM,
                format!("rms_norm_residual_{sfx}"),
            )?,
            // Both variants: the layer's d_state is known only at enqueue.
            step: [
                k(
                    "decode_step",
                    ptx::DECODE_STEP,
                    decode_step::kernel_name(sfx, false),
                )?,
                k(
                    "decode_step",
                    ptx::DECODE_STEP,
                    decode_step::kernel_name(sfx, true),
                )?,
            ],
            matvec,
            blas,
            epilogues,
            dev: dev.clone(),
            stream,
            batch,
        })
    }

    /// Number of sequences the step was built for.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Whether the step is recorded in the norm-epilogue layout (module docs): the caller
    /// then uses [`StepStream::linear_scaled`], [`StepStream::linear_residual`] and (one group)
    /// [`StepStream::mixer_decode_step_deferred`] instead of the norm kernels.
    pub fn norm_epilogues(&self) -> bool {
        self.epilogues
    }

    /// Zeroed partial sums of squares `(batch, parts)` f32 written by
    /// [`StepStream::linear_residual`] for an output width `n` (and read by the scaled
    /// projection after it); one column when the step has no matrix-vector kernels (cuBLAS
    /// batches, which keep their norm kernels).
    pub fn residual_parts(&self, n: usize) -> Result<Tensor> {
        let device = Device::Cuda(self.dev.clone());
        let parts = match &self.matvec {
            Some(k) => linear::matvec_blocks(&self.dev, &k[2], n)?,
            None => 1,
        };
        Ok(Tensor::zeros((self.batch, parts), DType::F32, &device)?)
    }

    /// Zeroed scratch for the fused mixer step of a layer with these sizes.
    pub fn scratch(&self, d_inner: usize, nheads: usize, ngroups: usize) -> Result<StepScratch> {
        let device = Device::Cuda(self.dev.clone());
        let b = self.batch;
        need(nheads > 0 && d_inner.is_multiple_of(nheads), "scratch")?;
        // The deferred step (norm epilogues, one group) may spread a head over more blocks.
        let mode = if self.epilogues && ngroups == 1 {
            StepMode::Defer
        } else {
            StepMode::Norm
        };
        let split = decode_step::split(&self.dev, nheads, b, d_inner / nheads, mode)?;
        Ok(StepScratch {
            ybuf: Tensor::zeros((b, d_inner), DType::F32, &device)?,
            hsum: Tensor::zeros((b, nheads * split), DType::F32, &device)?,
            count: Tensor::zeros((b, ngroups), DType::U32, &device)?,
            split,
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
    /// or f32 (logits). Through cuBLAS for batches the matrix-vector kernel does not take, which
    /// has no bias epilogue here (Mamba-2 projections have none; a bias keeps the eager step).
    pub fn linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        out: &Tensor,
    ) -> Result<()> {
        need(x.dim(0)? == self.batch, "linear")?;
        let ok = match (&self.matvec, &self.blas) {
            (Some(k), _) => linear::enqueue(&k[0], &self.dev, x, w, bias, out)?,
            (None, Some(blas)) => bias.is_none() && blas.gemm(&self.dev, x, w, out)?,
            (None, None) => false,
        };
        need(ok, "linear")
    }

    /// `out = (x · wᵀ) / rms (+ bias)`: an RMSNorm fused with the projection after it, `x`
    /// `(batch, k)` being the norm's input times its weight, unscaled, and `scale.parts` the
    /// partial sums of squares of the input (as [`StepStream::linear_residual`] writes them).
    /// Only in the norm-epilogue layout.
    pub fn linear_scaled(
        &self,
        x: &Tensor,
        scale: &RowScale,
        w: &Tensor,
        bias: Option<&Tensor>,
        out: &Tensor,
    ) -> Result<()> {
        let k = self.epilogue_matvec(x, "linear_scaled")?;
        need(
            linear::enqueue_scaled(&k[1], &self.dev, x, scale, w, bias, out)?,
            "linear_scaled",
        )
    }

    /// A mixer's output projection with the next block's residual add in its epilogue:
    /// `o = (x · wᵀ) [/ rms] (+ bias)`, then `epi` (`h = o + residual`, `out = h *
    /// next_norm_w`, partial sums of h²) and the conv-state `shift` a deferred step left.
    /// `scale` is the deferred step's (one group), absent after a step that normalised. Only in
    /// the norm-epilogue layout.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_residual(
        &self,
        x: &Tensor,
        scale: Option<&RowScale>,
        w: &Tensor,
        bias: Option<&Tensor>,
        epi: &ResidualEpilogue,
        shift: Option<&ConvShift>,
        out: &Tensor,
    ) -> Result<()> {
        let k = self.epilogue_matvec(x, "linear_residual")?;
        need(
            linear::enqueue_residual(&k[2], &self.dev, x, scale, w, bias, epi, shift, out)?,
            "linear_residual",
        )
    }

    /// The matrix-vector kernels of the norm-epilogue layout, for an input `x` of this step's
    /// batch; the precondition error of `what` otherwise.
    fn epilogue_matvec(&self, x: &Tensor, what: &'static str) -> Result<&[Kernel; 3]> {
        let batch_ok = x.dims().first() == Some(&self.batch);
        (self.matvec.as_ref())
            .filter(|_| self.epilogues && batch_ok)
            .ok_or_else(|| unmet(what))
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
        self.enqueue_step(args, params, scratch, out, StepMode::Norm)
    }

    /// The fused mixer step with its norm deferred to the output projection: `out` `(batch,
    /// d_inner)` = y * gate * norm_w, unscaled, the per-block sums of squares in `scratch`
    /// ([`StepScratch::sums`], the projection's [`RowScale`] over `d_inner`), the B/C conv
    /// states left for the projection's [`ConvShift`]. One group only (one scale per row), in
    /// the norm-epilogue layout.
    pub fn mixer_decode_step_deferred(
        &self,
        args: &DecodeStepArgs,
        params: &SsdParams,
        scratch: &StepScratch,
        out: &Tensor,
    ) -> Result<()> {
        need(
            self.epilogues && args.ngroups == 1,
            "mixer_decode_step_deferred",
        )?;
        self.enqueue_step(args, params, scratch, out, StepMode::Defer)
    }

    fn enqueue_step(
        &self,
        args: &DecodeStepArgs,
        params: &SsdParams,
        scratch: &StepScratch,
        out: &Tensor,
        mode: StepMode,
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
                && scratch.hsum.dims() == [batch, nheads * scratch.split]
                && scratch.count.dims() == [batch, args.ngroups],
            "mixer_decode_step",
        )?;
        let s = StepScratchPtrs {
            ybuf: ptr(&scratch.ybuf, &self.dev)?,
            hsum: ptr(&scratch.hsum, &self.dev)?,
            count: ptr(&scratch.count, &self.dev)?,
        };
        let shape = StepShape {
            nheads,
            headdim,
            d_state,
            split: scratch.split,
            mode,
        };
        let f = &self.step[decode_step::narrow(d_state, args.conv_state.dim(2)?) as usize];
        let ok = decode_step::enqueue(f, &self.dev, args, params, shape, out, s)?;
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
            _blas: self.blas.clone(),
            stream: self.stream.clone(),
            candle: self.dev.cuda_stream(),
            before: ctx.new_event(None).w()?,
            after: ctx.new_event(None).w()?,
        })
    }
}

impl StepScratch {
    /// The per-block sums of squares of the step's y `(batch, nheads * split)` f32: the parts
    /// of the deferred step's [`RowScale`].
    pub fn sums(&self) -> &Tensor {
        &self.hsum
    }
}

/// A captured decode step: [`StepGraph::replay`] runs it once, ordered after the work already
/// on the device's Candle stream and before the work enqueued there afterwards.
pub struct StepGraph {
    graph: CudaGraph,
    _blas: Option<Arc<StreamBlas>>, // cuBLAS handle and workspace of the captured GEMMs
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
