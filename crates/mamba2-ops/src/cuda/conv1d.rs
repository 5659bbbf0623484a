//! CUDA causal conv1d: prefill, decode update and varlen conv states (`kernels/cuda/conv1d.cu`).

use super::launch::{
    cfg, code, device, func, launch, opt_ptr, output, ptr, ptx, rows, suffix, Result,
};
use crate::Conv1dArgs;
use candle_core::{DType, Tensor};

/// Largest `d_conv` the kernels take (`CONV_MAX_D` in conv1d.cu); released models use 4.
const MAX_D_CONV: usize = 8;
/// Tokens per block of the prefill kernel (`CONV_TILE_T`).
const TILE_T: usize = 32;

pub(crate) fn causal_conv1d(args: &Conv1dArgs) -> Result<Option<(Tensor, Tensor)>> {
    let Some(dev) = device(args.x) else {
        return Ok(None);
    };
    let (batch, seqlen, channels) = args.x.dims3()?;
    let d_conv = args.weight.dim(1)?;
    let Some(sfx) = suffix(args.x.dtype()) else {
        return Ok(None);
    };
    if d_conv > MAX_D_CONV {
        return Ok(None);
    }
    let (x, xs) = rows(args.x, 1)?; // (batch, seqlen, channels), strides of batch and token
    let weight = args.weight.contiguous()?; // (channels, d_conv)
    let bias = args.bias.map(|b| b.contiguous()).transpose()?; // (channels)
    let init = args.initial_state.map(|s| s.contiguous()).transpose()?; // (batch, channels, d_conv)
    let seq_idx = args.seq_idx.map(|s| s.contiguous()).transpose()?; // (batch, seqlen)
    let y = output((batch, seqlen, channels), x.dtype(), &dev)?;
    let fstate = output((batch, channels, d_conv), DType::F32, &dev)?;
    let Some(c) = cfg(
        (
            channels.div_ceil(128) as u64,
            seqlen.div_ceil(TILE_T) as u64,
            batch as u64,
        ),
        128,
        0,
    ) else {
        return Ok(None);
    };
    let f = func(
        &dev,
        "conv1d",
        ptx::CONV1D,
        &format!("causal_conv1d_fwd_{sfx}"),
    )?;
    launch!(
        f,
        c,
        ptr(&x, &dev)?,
        xs[0] as i64,
        xs[1] as i64,
        ptr(&weight, &dev)?,
        code(weight.dtype()),
        opt_ptr(bias.as_ref(), &dev)?,
        code(bias.as_ref().map_or(DType::F32, |b| b.dtype())),
        opt_ptr(init.as_ref(), &dev)?,
        opt_ptr(seq_idx.as_ref(), &dev)?,
        ptr(&y, &dev)?,
        ptr(&fstate, &dev)?,
        seqlen as i64,
        channels as i64,
        d_conv as i32,
        args.silu as i32,
    )?;
    Ok(Some((y, fstate)))
}

pub(crate) fn causal_conv1d_update(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<Option<Tensor>> {
    let Some(dev) = device(x) else {
        return Ok(None);
    };
    let (batch, channels) = x.dims2()?;
    let d_conv = conv_state.dim(2)?;
    let Some(sfx) = suffix(x.dtype()) else {
        return Ok(None);
    };
    let (x, xs) = rows(x, 1)?; // (batch, channels)
    let weight = weight.contiguous()?; // (channels, d_conv)
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let y = output((batch, channels), x.dtype(), &dev)?;
    let n = (batch * channels) as u64;
    let Some(c) = cfg((n.div_ceil(256), 1, 1), 256, 0) else {
        return Ok(None);
    };
    let f = func(
        &dev,
        "conv1d",
        ptx::CONV1D,
        &format!("causal_conv1d_update_{sfx}"),
    )?;
    // conv_state is contiguous f32 (checked by the op) and updated in place.
    launch!(
        f,
        c,
        ptr(&x, &dev)?,
        xs[0] as i64,
        ptr(conv_state, &dev)?,
        ptr(&weight, &dev)?,
        code(weight.dtype()),
        opt_ptr(bias.as_ref(), &dev)?,
        code(bias.as_ref().map_or(DType::F32, |b| b.dtype())),
        ptr(&y, &dev)?,
        batch as i64,
        channels as i64,
        d_conv as i32,
        silu as i32,
    )?;
    Ok(Some(y))
}

pub(crate) fn conv_states_varlen(
    x: &Tensor,
    cu_seqlens: &[usize],
    d_conv: usize,
) -> Result<Option<Tensor>> {
    let Some(dev) = device(x) else {
        return Ok(None);
    };
    let channels = x.dim(1)?;
    let Some(sfx) = suffix(x.dtype()) else {
        return Ok(None);
    };
    let nseq = cu_seqlens.len() - 1;
    let (x, xs) = rows(x, 1)?; // (total_tokens, channels)
                               // Host-to-device copy of the offsets: asynchronous on the stream, no device synchronisation.
    let cu: Vec<i64> = cu_seqlens.iter().map(|&v| v as i64).collect();
    let cu = dev.clone_htod(&cu)?;
    let out = output((nseq, channels, d_conv), DType::F32, &dev)?;
    let n = (nseq * channels * d_conv) as u64;
    let Some(c) = cfg((n.div_ceil(256), 1, 1), 256, 0) else {
        return Ok(None);
    };
    let f = func(
        &dev,
        "conv1d",
        ptx::CONV1D,
        &format!("conv_states_varlen_{sfx}"),
    )?;
    let cu_ptr = {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        cu.device_ptr(&dev.cuda_stream()).0
    };
    launch!(
        f,
        c,
        ptr(&x, &dev)?,
        xs[0] as i64,
        cu_ptr,
        ptr(&out, &dev)?,
        nseq as i64,
        channels as i64,
        d_conv as i32,
    )?;
    drop(cu); // stream-ordered free, after the kernel
    Ok(Some(out))
}
