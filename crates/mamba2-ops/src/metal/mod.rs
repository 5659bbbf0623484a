//! Metal fast paths of the ops: the kernels of `kernels/metal/`, encoded on Candle's command
//! encoder of the input's `MetalDevice`. Each function returns `Ok(None)` when its
//! preconditions do not hold (the dispatcher then runs the reference); arguments have already
//! been validated by the op.
//!
//! The attention, rotary and activation fast paths of the hybrid models live in `attention.rs`
//! and `pointwise.rs`.
//!
//! Binding: Candle custom ops take at most three tensors, and these kernels take up to twelve,
//! so no `CustomOpN` is used: each tensor's Metal buffer and byte offset are taken from its
//! storage (`storage_and_layout`), outputs are allocated on the device and wrapped with
//! `Tensor::from_storage`. In-place states are bound as written buffers.

mod attention;
mod decode_step;
mod pointwise;
mod runtime;

pub(crate) use attention::causal_attention;
#[allow(unused_imports)]
pub(crate) use decode_step::{mamba2_decode_step, DecodeStepArgs};
pub(crate) use pointwise::{relu_squared, rotary_embedding, swiglu};

use crate::metal_params::{self as mp, layout};
use crate::{Conv1dArgs, GatedRmsNormArgs, Result, SsdArgs, SsdParams, StateUpdateArgs};
use candle_core::{DType, Tensor};
use runtime::{dispatch, dtype_suffix, f32_param, max_threads, metal_device, output, pipeline};
use runtime::{u32_of, Arg};
use runtime::{Bind, CONV1D, RMS_NORM, SSD, STATE_UPDATE};

/// Returns `Ok(None)` from the enclosing fast path when the condition does not hold.
macro_rules! require {
    ($cond:expr) => {
        if !$cond {
            return Ok(None);
        }
    };
}

/// Unwraps an `Option`, or returns `Ok(None)` from the enclosing fast path.
macro_rules! some {
    ($opt:expr) => {
        match $opt {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}
pub(crate) use {require, some};

fn flag(b: bool) -> u32 {
    b as u32
}

pub(crate) fn causal_conv1d(args: &Conv1dArgs) -> Result<Option<(Tensor, Tensor)>> {
    let dev = some!(metal_device(args.x));
    let suffix = some!(dtype_suffix(args.x.dtype()));
    let (batch, seqlen, channels) = args.x.dims3()?;
    let d_conv = args.weight.dim(1)?;
    require!(mp::supports::conv1d(d_conv));
    let p = mp::Conv1dParams {
        batch: some!(u32_of(batch)),
        seqlen: some!(u32_of(seqlen)),
        channels: some!(u32_of(channels)),
        d_conv: d_conv as u32,
        has_bias: flag(args.bias.is_some()),
        has_init: flag(args.initial_state.is_some()),
        has_seq_idx: flag(args.seq_idx.is_some()),
        silu: flag(args.silu),
    };
    let pipe = some!(pipeline(
        &dev,
        CONV1D,
        &format!("causal_conv1d_fwd_{suffix}")
    )?);
    let x = args.x.contiguous()?;
    let w = f32_param(args.weight)?;
    let bias = args.bias.map(f32_param).transpose()?;
    let init = args.initial_state.map(|t| t.contiguous()).transpose()?;
    let seq = args.seq_idx.map(|t| t.contiguous()).transpose()?;
    let (y, ya) = output(&dev, (batch, seqlen, channels), x.dtype(), "conv1d_y")?;
    let (state, sa) = output(&dev, (batch, channels, d_conv), DType::F32, "conv1d_state")?;
    let (xa, wa) = (Arg::of(&x)?, Arg::of(&w)?);
    let ba = Arg::opt(bias.as_ref(), &w)?;
    let ia = Arg::opt(init.as_ref(), &w)?;
    let qa = Arg::opt(seq.as_ref(), &w)?;
    let groups = [
        channels.div_ceil(layout::CONV_CHANNELS_PER_GROUP as usize),
        seqlen.div_ceil(layout::CONV_TOKENS_PER_THREAD as usize),
        batch,
    ];
    let binds = [
        Bind::In(&xa),
        Bind::In(&wa),
        Bind::In(&ba),
        Bind::In(&ia),
        Bind::In(&qa),
        Bind::Out(&ya),
        Bind::Out(&sa),
    ];
    let tg = [layout::CONV_CHANNELS_PER_GROUP as usize, 1, 1];
    require!(max_threads(&pipe) >= tg[0]);
    dispatch(&dev, &pipe, "causal_conv1d_fwd", &binds, &p, groups, tg)?;
    Ok(Some((y, state)))
}

pub(crate) fn causal_conv1d_update(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<Option<Tensor>> {
    let dev = some!(metal_device(x));
    let suffix = some!(dtype_suffix(x.dtype()));
    let (batch, channels) = x.dims2()?;
    let d_conv = weight.dim(1)?;
    require!(mp::supports::conv1d(d_conv));
    let p = mp::ConvUpdateParams {
        batch: some!(u32_of(batch)),
        channels: some!(u32_of(channels)),
        d_conv: d_conv as u32,
        has_bias: flag(bias.is_some()),
        silu: flag(silu),
    };
    let pipe = some!(pipeline(
        &dev,
        CONV1D,
        &format!("causal_conv1d_update_{suffix}")
    )?);
    let x = x.contiguous()?;
    let w = f32_param(weight)?;
    let bias = bias.map(f32_param).transpose()?;
    let (y, ya) = output(&dev, (batch, channels), x.dtype(), "conv1d_update_y")?;
    // conv_state is contiguous (validated): updated in place
    let (xa, sa, wa) = (Arg::of(&x)?, Arg::of(conv_state)?, Arg::of(&w)?);
    let ba = Arg::opt(bias.as_ref(), &w)?;
    let binds = [
        Bind::In(&xa),
        Bind::Out(&sa),
        Bind::In(&wa),
        Bind::In(&ba),
        Bind::Out(&ya),
    ];
    let tg = channels.min(256).min(max_threads(&pipe));
    let groups = [channels.div_ceil(tg), batch, 1];
    dispatch(
        &dev,
        &pipe,
        "causal_conv1d_update",
        &binds,
        &p,
        groups,
        [tg, 1, 1],
    )?;
    Ok(Some(y))
}

pub(crate) fn conv_states_varlen(
    x: &Tensor,
    cu_seqlens: &[usize],
    d_conv: usize,
) -> Result<Option<Tensor>> {
    let dev = some!(metal_device(x));
    let suffix = some!(dtype_suffix(x.dtype()));
    let (total, channels) = x.dims2()?;
    let nseq = cu_seqlens.len() - 1;
    let cu: Vec<u32> = some!(cu_seqlens
        .iter()
        .map(|&v| u32_of(v))
        .collect::<Option<Vec<u32>>>());
    let p = mp::ConvVarlenParams {
        nseq: some!(u32_of(nseq)),
        channels: some!(u32_of(channels)),
        d_conv: some!(u32_of(d_conv)),
        total: some!(u32_of(total)),
    };
    let pipe = some!(pipeline(
        &dev,
        CONV1D,
        &format!("conv_states_varlen_{suffix}")
    )?);
    let x = x.contiguous()?;
    let cu = Tensor::from_vec(cu, nseq + 1, x.device())?;
    let (states, oa) = output(&dev, (nseq, channels, d_conv), DType::F32, "conv_states")?;
    let (xa, ca) = (Arg::of(&x)?, Arg::of(&cu)?);
    let binds = [Bind::In(&xa), Bind::In(&ca), Bind::Out(&oa)];
    let tg = channels.min(256).min(max_threads(&pipe));
    let groups = [channels.div_ceil(tg), nseq, 1];
    dispatch(
        &dev,
        &pipe,
        "conv_states_varlen",
        &binds,
        &p,
        groups,
        [tg, 1, 1],
    )?;
    Ok(Some(states))
}

pub(crate) fn ssd_chunk_scan(
    args: &SsdArgs,
    params: &SsdParams,
) -> Result<Option<(Tensor, Tensor)>> {
    let dev = some!(metal_device(args.x));
    let dtype = args.x.dtype();
    let suffix = some!(dtype_suffix(dtype));
    let (batch, seqlen, nheads, headdim) = args.x.dims4()?;
    let (_, _, ngroups, d_state) = args.b.dims4()?;
    // 16-row threadgroups and 8-wide d_state tiles (simdgroup_float8x8)
    require!(mp::supports::ssd_chunk_scan(headdim, d_state));
    // the kernel reads dt, B, C, z in the activation dtype
    for t in [Some(args.dt), Some(args.b), Some(args.c), args.z]
        .into_iter()
        .flatten()
    {
        require!(t.dtype() == dtype);
    }
    let (dt_clamp, dt_min, dt_max) = mp::dt_clamp(params.dt_limit);
    let p = mp::SsdScanParams {
        batch: some!(u32_of(batch)),
        seqlen: some!(u32_of(seqlen)),
        nheads: some!(u32_of(nheads)),
        headdim: some!(u32_of(headdim)),
        ngroups: some!(u32_of(ngroups)),
        d_state: some!(u32_of(d_state)),
        has_d: flag(args.d.is_some()),
        has_z: flag(args.z.is_some()),
        has_dt_bias: flag(args.dt_bias.is_some()),
        has_init: flag(args.initial_state.is_some()),
        has_seq_idx: flag(args.seq_idx.is_some()),
        dt_softplus: flag(params.dt_softplus),
        dt_clamp,
        dt_min,
        dt_max,
    };
    let pipe_cb = some!(pipeline(&dev, SSD, &format!("ssd_chunk_cb_{suffix}"))?);
    let pipe = some!(pipeline(&dev, SSD, &format!("ssd_chunk_scan_{suffix}"))?);
    let tg = [layout::SSD_THREADS as usize, 1, 1];
    require!(max_threads(&pipe) >= tg[0] && max_threads(&pipe_cb) >= tg[0]);
    let c = |t: &Tensor| t.contiguous();
    let (x, dt, b, cm) = (c(args.x)?, c(args.dt)?, c(args.b)?, c(args.c)?);
    let a = f32_param(args.a)?;
    let d = args.d.map(f32_param).transpose()?;
    let z = args.z.map(c).transpose()?;
    let dt_bias = args.dt_bias.map(f32_param).transpose()?;
    let init = args.initial_state.map(c).transpose()?;
    let seq = args.seq_idx.map(c).transpose()?;
    let (y, ya) = output(&dev, (batch, seqlen, nheads, headdim), dtype, "ssd_y")?;
    let (state, sa) = output(
        &dev,
        (batch, nheads, headdim, d_state),
        DType::F32,
        "ssd_state",
    )?;
    let ins = [
        Arg::of(&x)?,
        Arg::of(&dt)?,
        Arg::of(&a)?,
        Arg::of(&b)?,
        Arg::of(&cm)?,
        Arg::opt(d.as_ref(), &a)?,
        Arg::opt(z.as_ref(), &a)?,
        Arg::opt(dt_bias.as_ref(), &a)?,
        Arg::opt(init.as_ref(), &a)?,
        Arg::opt(seq.as_ref(), &a)?,
    ];
    // stage 1: C Bᵀ per (batch, group, chunk), shared by the heads of a group
    let chunk = layout::SSD_CHUNK as usize;
    let nchunks = seqlen.div_ceil(chunk);
    let (_cb, cba) = output(
        &dev,
        (batch, ngroups, nchunks, chunk, chunk),
        DType::F32,
        "ssd_cb",
    )?;
    let cb_binds = [Bind::In(&ins[3]), Bind::In(&ins[4]), Bind::Out(&cba)];
    let cb_groups = [nchunks, ngroups, batch];
    dispatch(&dev, &pipe_cb, "ssd_chunk_cb", &cb_binds, &p, cb_groups, tg)?;
    // stage 2: the scan over chunks
    let mut binds: Vec<Bind> = ins.iter().map(Bind::In).collect();
    binds.push(Bind::Out(&ya));
    binds.push(Bind::Out(&sa));
    binds.push(Bind::In(&cba));
    let groups = [headdim / layout::SSD_ROWS as usize, nheads, batch];
    dispatch(&dev, &pipe, "ssd_chunk_scan", &binds, &p, groups, tg)?;
    Ok(Some((y, state)))
}

pub(crate) fn selective_state_update(
    args: &StateUpdateArgs,
    params: &SsdParams,
) -> Result<Option<Tensor>> {
    let dev = some!(metal_device(args.x));
    let dtype = args.x.dtype();
    let suffix = some!(dtype_suffix(dtype));
    let (batch, nheads, headdim) = args.x.dims3()?;
    let (_, ngroups, d_state) = args.b.dims3()?;
    require!(mp::supports::state_update(d_state));
    for t in [Some(args.dt), Some(args.b), Some(args.c), args.z]
        .into_iter()
        .flatten()
    {
        require!(t.dtype() == dtype);
    }
    let (dt_clamp, dt_min, dt_max) = mp::dt_clamp(params.dt_limit);
    let p = mp::StateUpdateParams {
        batch: some!(u32_of(batch)),
        nheads: some!(u32_of(nheads)),
        headdim: some!(u32_of(headdim)),
        ngroups: some!(u32_of(ngroups)),
        d_state: d_state as u32,
        has_d: flag(args.d.is_some()),
        has_z: flag(args.z.is_some()),
        has_dt_bias: flag(args.dt_bias.is_some()),
        dt_softplus: flag(params.dt_softplus),
        dt_clamp,
        dt_min,
        dt_max,
    };
    let pipe = some!(pipeline(
        &dev,
        STATE_UPDATE,
        &format!("selective_state_update_{suffix}")
    )?);
    let c = |t: &Tensor| t.contiguous();
    let (x, dt, b, cm) = (c(args.x)?, c(args.dt)?, c(args.b)?, c(args.c)?);
    let a = f32_param(args.a)?;
    let d = args.d.map(f32_param).transpose()?;
    let z = args.z.map(c).transpose()?;
    let dt_bias = args.dt_bias.map(f32_param).transpose()?;
    let (y, ya) = output(&dev, (batch, nheads, headdim), dtype, "ssu_y")?;
    // the state is contiguous (validated): updated in place
    let sa = Arg::of(args.state)?;
    let ins = [
        Arg::of(&x)?,
        Arg::of(&dt)?,
        Arg::of(&a)?,
        Arg::of(&b)?,
        Arg::of(&cm)?,
        Arg::opt(d.as_ref(), &a)?,
        Arg::opt(z.as_ref(), &a)?,
        Arg::opt(dt_bias.as_ref(), &a)?,
    ];
    let mut binds = vec![Bind::Out(&sa)];
    binds.extend(ins.iter().map(Bind::In));
    binds.push(Bind::Out(&ya));
    let rows = layout::SSU_ROWS as usize;
    require!(max_threads(&pipe) >= 32 * rows);
    let groups = [headdim.div_ceil(rows), nheads, batch];
    dispatch(
        &dev,
        &pipe,
        "selective_state_update",
        &binds,
        &p,
        groups,
        [32 * rows, 1, 1],
    )?;
    Ok(Some(y))
}

pub(crate) fn gated_rms_norm(args: &GatedRmsNormArgs) -> Result<Option<Tensor>> {
    let dev = some!(metal_device(args.x));
    let dtype = args.x.dtype();
    let suffix = some!(dtype_suffix(dtype));
    if let Some(z) = args.z {
        require!(z.dtype() == dtype);
    }
    let dims = args.x.dims().to_vec();
    let dim = *some!(dims.last());
    let rows = args.x.elem_count() / dim.max(1);
    require!(rows > 0);
    let p = mp::GatedRmsNormParams {
        rows: some!(u32_of(rows)),
        dim: some!(u32_of(dim)),
        group_size: some!(u32_of(args.group_size)),
        has_z: flag(args.z.is_some()),
        norm_before_gate: flag(args.norm_before_gate),
        eps: args.eps as f32,
    };
    let pipe = some!(pipeline(
        &dev,
        RMS_NORM,
        &format!("gated_rms_norm_{suffix}")
    )?);
    let x = args.x.contiguous()?;
    let z = args.z.map(|t| t.contiguous()).transpose()?;
    let w = f32_param(args.weight)?;
    let (out, oa) = output(&dev, dims.as_slice(), dtype, "gated_rms_norm")?;
    let (xa, wa) = (Arg::of(&x)?, Arg::of(&w)?);
    let za = Arg::opt(z.as_ref(), &w)?;
    let binds = [Bind::In(&xa), Bind::In(&za), Bind::In(&wa), Bind::Out(&oa)];
    let tg = args
        .group_size
        .next_multiple_of(32)
        .min(256)
        .min(max_threads(&pipe));
    let groups = [dim / args.group_size, rows, 1];
    dispatch(
        &dev,
        &pipe,
        "gated_rms_norm",
        &binds,
        &p,
        groups,
        [tg, 1, 1],
    )?;
    Ok(Some(out))
}

pub(crate) fn rms_norm_residual(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    residual_in_fp32: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    let dev = some!(metal_device(x));
    let dtype = x.dtype();
    let suffix = some!(dtype_suffix(dtype));
    // normed comes back in the weight's dtype: the kernel writes the dtype of x
    require!(weight.dtype() == dtype);
    let res_dtype = if residual_in_fp32 { DType::F32 } else { dtype };
    if let Some(r) = residual {
        require!(r.dtype() == res_dtype);
    }
    let dims = x.dims().to_vec();
    let dim = *some!(dims.last());
    let rows = x.elem_count() / dim.max(1);
    require!(rows > 0);
    let p = mp::RmsNormResidualParams {
        rows: some!(u32_of(rows)),
        dim: some!(u32_of(dim)),
        has_residual: flag(residual.is_some()),
        eps: eps as f32,
    };
    let name = if res_dtype == dtype {
        format!("rms_norm_residual_{suffix}")
    } else {
        format!("rms_norm_residual_f32res_{suffix}")
    };
    let pipe = some!(pipeline(&dev, RMS_NORM, &name)?);
    let x = x.contiguous()?;
    let r = residual.map(|t| t.contiguous()).transpose()?;
    let w = f32_param(weight)?;
    let (normed, na) = output(&dev, dims.as_slice(), dtype, "rms_norm_normed")?;
    let (res_out, ra) = output(&dev, dims.as_slice(), res_dtype, "rms_norm_residual")?;
    let (xa, wa) = (Arg::of(&x)?, Arg::of(&w)?);
    let rin = Arg::opt(r.as_ref(), &x)?;
    let binds = [
        Bind::In(&xa),
        Bind::In(&rin),
        Bind::In(&wa),
        Bind::Out(&na),
        Bind::Out(&ra),
    ];
    let tg = dim.next_multiple_of(32).min(1024).min(max_threads(&pipe));
    dispatch(
        &dev,
        &pipe,
        "rms_norm_residual",
        &binds,
        &p,
        [rows, 1, 1],
        [tg, 1, 1],
    )?;
    Ok(Some((normed, res_out)))
}

/// No Metal kernel for the projections yet: Candle's Metal matmul in the activation dtype serves
/// them (the reference would round-trip through f32).
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    Ok(Some(crate::linear::linear_native(x, weight, bias)?))
}
