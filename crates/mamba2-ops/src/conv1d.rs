//! Causal depthwise conv1d: prefill over a sequence, single-token update of a rolling state, and
//! conv-state extraction for packed variable-length batches.
//!
//! The conv state of a sequence is its last `d_conv` *pre-activation* inputs, oldest first,
//! zero-padded on the left when fewer inputs were seen (the layout of HF transformers' and
//! mamba_ssm's caches). Only the newest `d_conv - 1` entries influence future outputs; the oldest
//! is kept so that the state has the same shape in every implementation.

use crate::check;
use crate::{Backend, OpError, Result};
use candle_core::{DType, Tensor, D};

const OP: &str = "causal_conv1d";
const OP_UPDATE: &str = "causal_conv1d_update";
const OP_VARLEN: &str = "conv_states_varlen";

/// Arguments of [`causal_conv1d`].
#[derive(Debug, Clone, Copy)]
pub struct Conv1dArgs<'a> {
    /// `(batch, seqlen, channels)`, f32/f16/bf16.
    pub x: &'a Tensor,
    /// `(channels, d_conv)`: the depthwise filter (a checkpoint's `(channels, 1, d_conv)` squeezed).
    pub weight: &'a Tensor,
    /// `(channels)`.
    pub bias: Option<&'a Tensor>,
    /// `(batch, channels, d_conv)`, f32: the inputs seen before `x` (conv state of a previous call).
    pub initial_state: Option<&'a Tensor>,
    /// `(batch, seqlen)`, u32: packed sequences; the filter never reads across a change of id.
    pub seq_idx: Option<&'a Tensor>,
    /// Apply SiLU to the output (Mamba-2 always does).
    pub silu: bool,
}

struct Dims {
    batch: usize,
    seqlen: usize,
    channels: usize,
    d_conv: usize,
}

fn validate(args: &Conv1dArgs) -> Result<Dims> {
    let [batch, seqlen, channels] = check::dims::<3>(OP, "x", args.x)?;
    check::float(OP, "x", args.x)?;
    let [wc, d_conv] = check::dims::<2>(OP, "weight", args.weight)?;
    if wc != channels || d_conv == 0 {
        return Err(OpError::Shape {
            op: OP,
            arg: "weight",
            got: args.weight.dims().to_vec(),
            expected: format!("[{channels}, d_conv >= 1]"),
        });
    }
    check::float(OP, "weight", args.weight)?;
    check::same_device(OP, "weight", args.x, args.weight)?;
    check::opt(OP, "bias", args.x, args.bias, &[channels])?;
    if let Some(s) = args.initial_state {
        check::shape(OP, "initial_state", s, &[batch, channels, d_conv])?;
        check::f32(OP, "initial_state", s)?;
        check::same_device(OP, "initial_state", args.x, s)?;
    }
    if let Some(s) = args.seq_idx {
        check::shape(OP, "seq_idx", s, &[batch, seqlen])?;
        if s.dtype() != DType::U32 {
            return Err(OpError::Dtype {
                op: OP,
                arg: "seq_idx",
                got: s.dtype(),
                expected: "u32",
            });
        }
    }
    if seqlen == 0 {
        return Err(OpError::Param {
            op: OP,
            param: "x",
            message: "seqlen must be >= 1".into(),
        });
    }
    Ok(Dims {
        batch,
        seqlen,
        channels,
        d_conv,
    })
}

/// Causal depthwise conv1d over a sequence, with optional bias, SiLU and initial state.
///
/// Returns `(y, final_state)`: `y` is `(batch, seqlen, channels)` in the dtype of `x`;
/// `final_state` is `(batch, channels, d_conv)` f32, ready to be the `initial_state` of the next
/// call or the state of [`causal_conv1d_update`].
pub fn causal_conv1d(args: &Conv1dArgs) -> Result<(Tensor, Tensor)> {
    causal_conv1d_with(args, Backend::Auto)
}

/// [`causal_conv1d`] with an explicit backend choice.
pub fn causal_conv1d_with(args: &Conv1dArgs, backend: Backend) -> Result<(Tensor, Tensor)> {
    validate(args)?;
    crate::dispatch!(
        backend,
        args.x.device(),
        causal_conv1d(args),
        causal_conv1d_slow(args)
    )
}

/// Plain-tensor reference of [`causal_conv1d`].
pub fn causal_conv1d_slow(args: &Conv1dArgs) -> Result<(Tensor, Tensor)> {
    let Dims {
        batch,
        seqlen,
        channels,
        d_conv,
    } = validate(args)?;
    if let Some(seq_idx) = args.seq_idx {
        return conv_by_segments(args, seq_idx);
    }
    let dev = args.x.device();
    let x = args.x.to_dtype(DType::F32)?.transpose(1, 2)?; // (batch, channels, seqlen)
                                                           // The history the first outputs see: the newest d_conv - 1 inputs of the state.
    let history = match args.initial_state {
        Some(s) => s.narrow(2, 1, d_conv - 1)?, // (batch, channels, d_conv - 1)
        None => Tensor::zeros((batch, channels, d_conv - 1), DType::F32, dev)?,
    };
    let padded = Tensor::cat(&[&history, &x], 2)?; // (batch, channels, d_conv - 1 + seqlen)
    let w = args.weight.to_dtype(DType::F32)?; // (channels, d_conv)
                                               // y[t] = sum_k w[k] * padded[t + k]: tap k looks k - (d_conv - 1) steps back.
    let mut y = Tensor::zeros((batch, channels, seqlen), DType::F32, dev)?;
    for k in 0..d_conv {
        let tap = w.narrow(1, k, 1)?.unsqueeze(0)?; // (1, channels, 1)
        y = (y + padded.narrow(2, k, seqlen)?.broadcast_mul(&tap)?)?;
    }
    if let Some(b) = args.bias {
        y = y.broadcast_add(&b.to_dtype(DType::F32)?.reshape((1, channels, 1))?)?;
    }
    if args.silu {
        y = candle_core::Tensor::silu(&y)?;
    }
    let y = y.transpose(1, 2)?.contiguous()?.to_dtype(args.x.dtype())?; // (batch, seqlen, channels)
                                                                        // The newest d_conv entries of [initial state, x].
    let full = match args.initial_state {
        Some(s) => Tensor::cat(&[s, &x], 2)?,
        None => Tensor::cat(
            &[
                &Tensor::zeros((batch, channels, d_conv), DType::F32, dev)?,
                &x,
            ],
            2,
        )?,
    };
    let total = full.dim(2)?;
    let final_state = full.narrow(2, total - d_conv, d_conv)?.contiguous()?; // (batch, channels, d_conv)
    Ok((y, final_state))
}

/// Packed sequences: run the reference on each run of equal `seq_idx`, the initial state applying
/// to the first run only. The final state is that of the last run of each batch row.
fn conv_by_segments(args: &Conv1dArgs, seq_idx: &Tensor) -> Result<(Tensor, Tensor)> {
    let ids = seq_idx.to_vec2::<u32>()?;
    let mut ys = Vec::with_capacity(ids.len());
    let mut states = Vec::with_capacity(ids.len());
    for (b, row) in ids.iter().enumerate() {
        // Only the first run continues from the initial state; later runs start from zeros.
        let mut initial = args.initial_state.map(|s| s.narrow(0, b, 1)).transpose()?;
        let mut last_state = None;
        let mut parts = Vec::new();
        for (start, len) in segments(row) {
            let x = args.x.narrow(0, b, 1)?.narrow(1, start, len)?;
            let init = initial.take();
            let seg = Conv1dArgs {
                x: &x,
                initial_state: init.as_ref(),
                seq_idx: None,
                ..*args
            };
            let (y, s) = causal_conv1d_slow(&seg)?;
            parts.push(y);
            last_state = Some(s);
        }
        ys.push(Tensor::cat(&parts, 1)?);
        states.push(last_state.expect("seqlen >= 1 gives at least one segment"));
    }
    Ok((Tensor::cat(&ys, 0)?, Tensor::cat(&states, 0)?))
}

/// Runs of equal ids as `(start, len)`.
pub(crate) fn segments(ids: &[u32]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for t in 1..=ids.len() {
        if t == ids.len() || ids[t] != ids[start] {
            out.push((start, t - start));
            start = t;
        }
    }
    out
}

/// One decode step: shifts `x` into `conv_state` in place and returns the conv output.
///
/// `x`: `(batch, channels)`; `conv_state`: `(batch, channels, d_conv)` f32, contiguous, updated in
/// place; `weight`: `(channels, d_conv)`; `bias`: `(channels)`. Returns `(batch, channels)` in the
/// dtype of `x`.
pub fn causal_conv1d_update(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<Tensor> {
    causal_conv1d_update_with(x, conv_state, weight, bias, silu, Backend::Auto)
}

/// [`causal_conv1d_update`] with an explicit backend choice.
pub fn causal_conv1d_update_with(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
    backend: Backend,
) -> Result<Tensor> {
    validate_update(x, conv_state, weight, bias)?;
    crate::dispatch!(
        backend,
        x.device(),
        causal_conv1d_update(x, conv_state, weight, bias, silu),
        causal_conv1d_update_slow(x, conv_state, weight, bias, silu)
    )
}

fn validate_update(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<usize> {
    let [batch, channels] = check::dims::<2>(OP_UPDATE, "x", x)?;
    check::float(OP_UPDATE, "x", x)?;
    let [_, _, d_conv] = check::dims::<3>(OP_UPDATE, "conv_state", conv_state)?;
    check::shape(
        OP_UPDATE,
        "conv_state",
        conv_state,
        &[batch, channels, d_conv],
    )?;
    check::f32(OP_UPDATE, "conv_state", conv_state)?;
    check::same_device(OP_UPDATE, "conv_state", x, conv_state)?;
    if !conv_state.is_contiguous() {
        return Err(OpError::Param {
            op: OP_UPDATE,
            param: "conv_state",
            message: "must be contiguous (it is updated in place)".into(),
        });
    }
    check::shape(OP_UPDATE, "weight", weight, &[channels, d_conv])?;
    check::float(OP_UPDATE, "weight", weight)?;
    check::same_device(OP_UPDATE, "weight", x, weight)?;
    check::opt(OP_UPDATE, "bias", x, bias, &[channels])?;
    Ok(d_conv)
}

/// Plain-tensor reference of [`causal_conv1d_update`].
pub fn causal_conv1d_update_slow(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<Tensor> {
    let d_conv = validate_update(x, conv_state, weight, bias)?;
    let x32 = x.to_dtype(DType::F32)?.unsqueeze(2)?; // (batch, channels, 1)
                                                     // roll left by one and append the new input
    let shifted = Tensor::cat(&[&conv_state.narrow(2, 1, d_conv - 1)?, &x32], 2)?; // (batch, channels, d_conv)
    let w = weight.to_dtype(DType::F32)?.unsqueeze(0)?; // (1, channels, d_conv)
    let mut y = shifted.broadcast_mul(&w)?.sum(D::Minus1)?; // (batch, channels)
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(DType::F32)?.unsqueeze(0)?)?;
    }
    if silu {
        y = y.silu()?;
    }
    conv_state.slice_set(&shifted.contiguous()?, 0, 0)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// Conv states of packed variable-length sequences.
///
/// `x`: `(total_tokens, channels)`, the sequences one after another; `cu_seqlens`: cumulative
/// lengths, `[0, len_0, len_0 + len_1, ..., total_tokens]`. Returns `(nseq, channels, d_conv)` f32:
/// for each sequence its last `d_conv` inputs, zero-padded on the left for short sequences (never
/// reading into the previous sequence).
pub fn conv_states_varlen(x: &Tensor, cu_seqlens: &[usize], d_conv: usize) -> Result<Tensor> {
    conv_states_varlen_with(x, cu_seqlens, d_conv, Backend::Auto)
}

/// [`conv_states_varlen`] with an explicit backend choice.
pub fn conv_states_varlen_with(
    x: &Tensor,
    cu_seqlens: &[usize],
    d_conv: usize,
    backend: Backend,
) -> Result<Tensor> {
    validate_varlen(x, cu_seqlens, d_conv)?;
    crate::dispatch!(
        backend,
        x.device(),
        conv_states_varlen(x, cu_seqlens, d_conv),
        conv_states_varlen_slow(x, cu_seqlens, d_conv)
    )
}

fn validate_varlen(x: &Tensor, cu_seqlens: &[usize], d_conv: usize) -> Result<usize> {
    let [total, _] = check::dims::<2>(OP_VARLEN, "x", x)?;
    check::float(OP_VARLEN, "x", x)?;
    if d_conv == 0 {
        return Err(OpError::Param {
            op: OP_VARLEN,
            param: "d_conv",
            message: "must be >= 1".into(),
        });
    }
    let ok = cu_seqlens.len() >= 2
        && cu_seqlens[0] == 0
        && cu_seqlens.windows(2).all(|w| w[0] <= w[1])
        && *cu_seqlens.last().unwrap() == total;
    if !ok {
        return Err(OpError::Param {
            op: OP_VARLEN,
            param: "cu_seqlens",
            message: format!(
                "must start at 0, be non-decreasing and end at {total}; got {cu_seqlens:?}"
            ),
        });
    }
    Ok(total)
}

/// Plain-tensor reference of [`conv_states_varlen`].
pub fn conv_states_varlen_slow(x: &Tensor, cu_seqlens: &[usize], d_conv: usize) -> Result<Tensor> {
    validate_varlen(x, cu_seqlens, d_conv)?;
    let channels = x.dim(1)?;
    let x = x.to_dtype(DType::F32)?;
    let mut states = Vec::with_capacity(cu_seqlens.len() - 1);
    for w in cu_seqlens.windows(2) {
        let (start, end) = (w[0], w[1]);
        let take = (end - start).min(d_conv);
        let tail = x.narrow(0, end - take, take)?.t()?; // (channels, take)
        let pad = Tensor::zeros((channels, d_conv - take), DType::F32, x.device())?;
        states.push(Tensor::cat(&[&pad, &tail], 1)?.unsqueeze(0)?);
    }
    Ok(Tensor::cat(&states, 0)?.contiguous()?)
}
