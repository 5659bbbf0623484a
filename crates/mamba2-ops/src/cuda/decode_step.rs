//! CUDA fused mixer decode step (`kernels/cuda/decode_step.cu`): one launch (plus a 4-byte-per-
//! group memset of its arrival counters) for conv update, state update and gated norm. The
//! enqueue half is shared with the captured decode step (`graph.rs`), which owns its scratch.

use super::launch::{
    cfg, code, cuda_options, device, func, launch, opt_ptr, output, ptr, ptx, rows, sm_count,
    suffix, Kernel, Result,
};
use super::state_update::dt_params;
use crate::decode_step::{validate, DecodeStepArgs, StepDims};
use crate::SsdParams;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Tensor};

const MAX_N: usize = 256;
const MAX_P: usize = 256;
const MAX_K: usize = 8;
/// Most blocks per head (see [`split`]).
pub(crate) const MAX_SPLIT: usize = 4;

/// Blocks per head of the fused step: up to [`MAX_SPLIT`] where batch x heads is below the SM
/// count, at most the rows of a head. How many at most depends on the mode: in
/// [`StepMode::Defer`] the blocks of a head share nothing, and two per head measured faster (1.3b
/// batch 1, captured: 814 -> 839 tok/s, BENCHMARKS.md "CUDA"); in [`StepMode::Norm`] every
/// block of a group counts in on one atomic and the last one normalises the group, and splitting
/// measured slower (19 us per step at 3 blocks per head against 14 us unsplit), so it is
/// 1 there. `CudaOptions::step_split` overrides the most for both (the kernel's tests cover 1 and
/// 4).
pub(crate) fn split(
    dev: &CudaDevice,
    nheads: usize,
    batch: usize,
    headdim: usize,
    mode: StepMode,
) -> Result<usize> {
    let blocks = (nheads * batch).max(1);
    let default = if mode == StepMode::Defer { 2 } else { 1 };
    let most = cuda_options()
        .step_split
        .map_or(default, |v| v.clamp(1, MAX_SPLIT));
    if most == 1 {
        return Ok(1); // no device query on every eager step
    }
    Ok(sm_count(dev)?
        .div_ceil(blocks)
        .clamp(1, most)
        .min(headdim.max(1)))
}

pub(crate) fn mixer_decode_step(
    args: &DecodeStepArgs,
    params: &SsdParams,
) -> crate::Result<Option<Tensor>> {
    let StepDims {
        batch,
        nheads,
        headdim,
        d_state,
        d_inner,
    } = validate(args)?;
    Ok(launch_step(
        args, params, batch, nheads, headdim, d_state, d_inner,
    )?)
}

#[allow(clippy::too_many_arguments)]
fn launch_step(
    args: &DecodeStepArgs,
    params: &SsdParams,
    batch: usize,
    nheads: usize,
    headdim: usize,
    d_state: usize,
    d_inner: usize,
) -> Result<Option<Tensor>> {
    let Some(dev) = device(args.xbc) else {
        return Ok(None);
    };
    let Some(sfx) = suffix(args.xbc.dtype()) else {
        return Ok(None);
    };
    if !supported(args, batch, d_state, headdim, d_inner)? {
        return Ok(None);
    }
    let split = split(&dev, nheads, batch, headdim, StepMode::Norm)?;
    let out = output((batch, d_inner), args.xbc.dtype(), &dev)?;
    let ybuf = output((batch, d_inner), DType::F32, &dev)?;
    let hsum = output((batch, nheads * split), DType::F32, &dev)?;
    // Arrival counters must start at zero: a stream-ordered memset, not a kernel.
    let count = dev.alloc_zeros::<u32>(batch * args.ngroups)?;
    let count_ptr = count.device_ptr(&dev.cuda_stream()).0;
    let k = args.conv_state.dim(2)?;
    let f = func(
        &dev,
        "decode_step",
        ptx::DECODE_STEP,
        &kernel_name(sfx, narrow(d_state, k)),
    )?;
    let scratch = StepScratchPtrs {
        ybuf: ptr(&ybuf, &dev)?,
        hsum: ptr(&hsum, &dev)?,
        count: count_ptr,
    };
    let shape = StepShape {
        nheads,
        headdim,
        d_state,
        split,
        mode: StepMode::Norm,
    };
    let launched = enqueue(&f, &dev, args, params, shape, &out, scratch)?;
    drop(count); // stream-ordered free, after the kernel
    Ok(launched.then_some(out))
}

/// Whether the step takes the `n128` variant (d_state <= 128, d_conv <= 4: every released
/// Mamba-2 model): half the state registers, two blocks per SM, for large batches (1.3b batch
/// 16 is 1,024 blocks). `CudaOptions::step_n128 = false` keeps the general variant, for
/// comparisons.
pub(crate) fn narrow(d_state: usize, d_conv: usize) -> bool {
    d_state <= 128 && d_conv <= 4 && cuda_options().step_n128
}

/// The kernel of the step for activation suffix `sfx`, narrow (`n128`) or general.
pub(crate) fn kernel_name(sfx: &str, narrow: bool) -> String {
    if narrow {
        format!("mixer_decode_step_n128_{sfx}")
    } else {
        format!("mixer_decode_step_{sfx}")
    }
}

/// Preconditions of the fused kernel (else the composed ops run): the op-level checks of the
/// parts, done here since the fused kernel skips the individual ops' validation.
pub(crate) fn supported(
    args: &DecodeStepArgs,
    batch: usize,
    d_state: usize,
    headdim: usize,
    d_inner: usize,
) -> Result<bool> {
    let k = args.conv_state.dim(2)?;
    let conv_dim = args.xbc.dim(1)?;
    let f32_contig = |t: &Tensor| t.dtype() == DType::F32 && t.is_contiguous();
    Ok(suffix(args.xbc.dtype()).is_some()
        && d_state <= MAX_N
        && headdim <= MAX_P
        && k <= MAX_K
        && k != 0
        && args.z.dtype() == args.xbc.dtype()
        && f32_contig(args.conv_state)
        && f32_contig(args.ssm_state)
        && args.a.dtype() == DType::F32
        && args.conv_state.dims() == [batch, conv_dim, k]
        && args.conv_weight.dims() == [conv_dim, k]
        && args.norm_weight.dims() == [d_inner])
}

/// What the fused step leaves to the kernel after it (`mode` of `decode_step.cu`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum StepMode {
    /// The step normalises into `out` and shifts every conv state (`STEP_NORM`).
    Norm = 1,
    /// `out = y * gate * norm_w` unscaled, per-block sums of squares in `hsum`; the group's
    /// 1 / rms and the B/C conv-state shift are left to the output projection
    /// (`linear_res_b<BB>`, `STEP_DEFER`).
    Defer = 2,
}

/// Head layout of a fused-step launch: `split` blocks per head (at most [`MAX_SPLIT`]), and
/// what the step leaves to its consumer.
#[derive(Clone, Copy)]
pub(crate) struct StepShape {
    pub nheads: usize,
    pub headdim: usize,
    pub d_state: usize,
    pub split: usize,
    pub mode: StepMode,
}

/// Device addresses of the fused step's scratch: `ybuf` `(batch, d_inner)` f32, `hsum`
/// `(batch, nheads * split)` f32, `count` `(batch, ngroups)` u32 (zero before the launch; the kernel
/// leaves it zero). [`StepMode::Defer`] uses only `hsum`.
#[derive(Clone, Copy)]
pub(crate) struct StepScratchPtrs {
    pub ybuf: u64,
    pub hsum: u64,
    pub count: u64,
}

/// Enqueues the fused step writing `out` `(batch, d_inner)` on `f`'s stream; `false` when the
/// grid does not fit CUDA's limits (nothing enqueued). [`supported`] must hold.
#[allow(clippy::too_many_arguments)]
pub(crate) fn enqueue(
    f: &Kernel,
    dev: &CudaDevice,
    args: &DecodeStepArgs,
    params: &SsdParams,
    shape: StepShape,
    out: &Tensor,
    scratch: StepScratchPtrs,
) -> Result<bool> {
    let StepShape {
        nheads,
        headdim,
        d_state,
        split,
        mode,
    } = shape;
    let batch = args.xbc.dim(0)?;
    let k = args.conv_state.dim(2)?;
    let (xbc, xs) = rows(args.xbc, 1)?; // (batch, conv_dim)
    let (dt, dts) = rows(args.dt, 1)?; // (batch, nheads)
    let (z, zs) = rows(args.z, 1)?; // (batch, d_inner)
    let conv_w = args.conv_weight.contiguous()?; // (conv_dim, d_conv)
    let conv_b = args.conv_bias.map(|t| t.contiguous()).transpose()?; // (conv_dim)
    let a = args.a.contiguous()?; // (nheads) f32
    let d = args.d.map(|t| t.contiguous()).transpose()?; // (nheads)
    let dt_bias = args.dt_bias.map(|t| t.contiguous()).transpose()?; // (nheads)
    let norm_w = args.norm_weight.contiguous()?; // (d_inner)
    let Some(lc) = cfg(((nheads * split) as u64, batch as u64, 1), 512, 0) else {
        return Ok(false);
    };
    let (softplus, clamp, lo, hi) = dt_params(params);
    let opt_code = |t: Option<&Tensor>| code(t.map_or(DType::F32, |t| t.dtype()));
    launch!(
        f,
        lc,
        ptr(&xbc, dev)?,
        xs[0] as i64,
        ptr(&dt, dev)?,
        code(dt.dtype()),
        dts[0] as i64,
        ptr(&z, dev)?,
        zs[0] as i64,
        ptr(args.conv_state, dev)?,
        ptr(&conv_w, dev)?,
        code(conv_w.dtype()),
        opt_ptr(conv_b.as_ref(), dev)?,
        opt_code(conv_b.as_ref()),
        ptr(args.ssm_state, dev)?,
        ptr(&a, dev)?,
        opt_ptr(d.as_ref(), dev)?,
        opt_code(d.as_ref()),
        opt_ptr(dt_bias.as_ref(), dev)?,
        opt_code(dt_bias.as_ref()),
        ptr(&norm_w, dev)?,
        code(norm_w.dtype()),
        ptr(out, dev)?,
        scratch.ybuf,
        scratch.hsum,
        scratch.count,
        nheads as i64,
        headdim as i32,
        d_state as i32,
        args.ngroups as i64,
        k as i32,
        args.eps as f32,
        args.norm_before_gate as i32,
        split as i32,
        mode as i32,
        softplus,
        clamp,
        lo,
        hi,
    )?;
    Ok(true)
}
