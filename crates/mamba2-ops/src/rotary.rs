//! Rotary position embedding (RoPE) of the attention layers, HF's `rotate_half` (GPT-NeoX)
//! convention, with partial rotation (Bamba rotates the first half of each head).
//!
//! Reference: HF transformers' `*RotaryEmbedding` + `apply_rotary_pos_emb`. Shapes: x
//! `(batch, seqlen, n_heads, head_dim)`, out the same shape and dtype. For token `t` (absolute
//! position `p = position_offset + t`) and `i < rotary_dim / 2`:
//! - `inv_freq[i] = 1 / theta^(2i / rotary_dim)` in f32, as torch computes it;
//! - `freqs[i] = (p as f32) · inv_freq[i]` in f32, `emb = cat(freqs, freqs)`;
//! - `out[..rotary_dim] = x_rot · cos(emb) + rotate_half(x_rot) · sin(emb)`, with
//!   `rotate_half(x) = cat(-x[half..], x[..half])`;
//! - `out[rotary_dim..] = x[rotary_dim..]`.
//!
//! Computed in f32 and rounded once to x's dtype (HF rounds cos/sin to the activation dtype
//! first; this op does not). Memory: the reference holds `(seqlen, rotary_dim)` cos/sin tables
//! and f32 copies of x; the CPU fast path one `rotary_dim` table per token on the stack of its
//! task.

use crate::check;
use crate::{Backend, OpError, Result};
use candle_core::{DType, Tensor};

const OP: &str = "rotary_embedding";

/// Arguments of [`rotary_embedding`].
#[derive(Debug, Clone, Copy)]
pub struct RotaryArgs<'a> {
    /// `(batch, seqlen, n_heads, head_dim)`, f32/f16/bf16.
    pub x: &'a Tensor,
    /// Absolute position of x's first token (the same for every batch row).
    pub position_offset: usize,
    /// Channels rotated, from the start of each head (even, `<= head_dim`); the rest pass
    /// through (partial RoPE, e.g. Bamba: `head_dim / 2`).
    pub rotary_dim: usize,
    /// Base of the frequencies (`rope_theta`), finite and > 0.
    pub theta: f64,
}

pub(crate) fn validate(args: &RotaryArgs) -> Result<[usize; 4]> {
    let dims = check::dims::<4>(OP, "x", args.x)?;
    check::float(OP, "x", args.x)?;
    let param = |param, message| OpError::Param {
        op: OP,
        param,
        message,
    };
    if !args.rotary_dim.is_multiple_of(2) {
        return Err(param("rotary_dim", format!("{} is odd", args.rotary_dim)));
    }
    if args.rotary_dim > dims[3] {
        return Err(param(
            "rotary_dim",
            format!("{} exceeds head_dim {}", args.rotary_dim, dims[3]),
        ));
    }
    if !(args.theta.is_finite() && args.theta > 0.0) {
        return Err(param(
            "theta",
            format!("{} is not finite and > 0", args.theta),
        ));
    }
    Ok(dims)
}

/// `inv_freq[i] = 1 / theta^(2i / rotary_dim)`, i < rotary_dim / 2, in f32 as torch computes
/// `1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))`.
pub(crate) fn inv_freq(rotary_dim: usize, theta: f64) -> Vec<f32> {
    let base = theta as f32;
    (0..rotary_dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / rotary_dim as f32))
        .collect()
}

/// Rotary position embedding of `x` (queries or keys): the first `rotary_dim` channels of each
/// head rotated by the angles of the token's absolute position, the rest passed through. Same
/// shape and dtype as `x`, computed in f32.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use mamba2_ops::{rotary_embedding, RotaryArgs};
/// let x = Tensor::randn(0f32, 1.0, (1, 3, 4, 16), &Device::Cpu)?; // (batch, seqlen, n_heads, head_dim)
/// // tokens at positions 10, 11, 12; partial rotation of the first 8 channels of each head
/// let args = RotaryArgs { x: &x, position_offset: 10, rotary_dim: 8, theta: 10_000.0 };
/// let y = rotary_embedding(&args)?;
/// assert_eq!(y.dims(), x.dims());
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn rotary_embedding(args: &RotaryArgs) -> Result<Tensor> {
    rotary_embedding_with(args, Backend::Auto)
}

/// [`rotary_embedding`] with an explicit backend choice.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use mamba2_ops::{rotary_embedding_with, Backend, RotaryArgs};
/// let x = Tensor::randn(0f32, 1.0, (2, 5, 3, 8), &Device::Cpu)?;
/// let args = RotaryArgs { x: &x, position_offset: 0, rotary_dim: 8, theta: 1e6 };
/// let y = rotary_embedding_with(&args, Backend::Reference)?;
/// // position 0 is the identity rotation
/// let d = (y.narrow(1, 0, 1)? - x.narrow(1, 0, 1)?)?.abs()?.max_keepdim(3)?;
/// assert!(d.flatten_all()?.max(0)?.to_scalar::<f32>()? == 0.0);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn rotary_embedding_with(args: &RotaryArgs, backend: Backend) -> Result<Tensor> {
    validate(args)?;
    crate::dispatch!(
        backend,
        args.x.device(),
        rotary_embedding(args),
        rotary_embedding_slow(args)
    )
}

/// Plain-tensor reference of [`rotary_embedding`], HF's formula on Candle tensors.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use mamba2_ops::{rotary_embedding_slow, RotaryArgs};
/// let x = Tensor::randn(0f32, 1.0, (1, 2, 2, 4), &Device::Cpu)?;
/// let y = rotary_embedding_slow(&RotaryArgs { x: &x, position_offset: 7, rotary_dim: 4, theta: 1e4 })?;
/// assert_eq!(y.dims(), &[1, 2, 2, 4]);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn rotary_embedding_slow(args: &RotaryArgs) -> Result<Tensor> {
    let [_batch, seqlen, _n_heads, head_dim] = validate(args)?;
    let (rd, dev) = (args.rotary_dim, args.x.device());
    let half = rd / 2;
    if rd == 0 || args.x.elem_count() == 0 {
        return Ok(args.x.clone());
    }
    let inv_freq = Tensor::from_vec(inv_freq(rd, args.theta), (1, half), dev)?; // (1, rotary_dim/2)
    let positions: Vec<f32> = (0..seqlen)
        .map(|t| (args.position_offset + t) as f32)
        .collect();
    let positions = Tensor::from_vec(positions, (seqlen, 1), dev)?; // (seqlen, 1)
    let freqs = positions.broadcast_mul(&inv_freq)?; // (seqlen, rotary_dim/2)
    let emb = Tensor::cat(&[&freqs, &freqs], 1)?; // (seqlen, rotary_dim)
    let cos = emb.cos()?.reshape((1, seqlen, 1, rd))?;
    let sin = emb.sin()?.reshape((1, seqlen, 1, rd))?;
    let x = args.x.to_dtype(DType::F32)?; // (batch, seqlen, n_heads, head_dim)
    let x_rot = x.narrow(3, 0, rd)?; // (batch, seqlen, n_heads, rotary_dim)
    let (x1, x2) = (x_rot.narrow(3, 0, half)?, x_rot.narrow(3, half, half)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?; // rotate_half(x_rot)
    let mut out = (x_rot.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
    if rd < head_dim {
        out = Tensor::cat(&[&out, &x.narrow(3, rd, head_dim - rd)?], 3)?;
    }
    Ok(out.to_dtype(args.x.dtype())?)
}
