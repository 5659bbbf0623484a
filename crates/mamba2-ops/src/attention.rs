//! Causal self-attention with grouped KV heads (GQA), for the attention layers of the hybrid
//! Mamba-2 models (Granite-4.0-H, Nemotron-H, Falcon-H1, Bamba).
//!
//! Reference: HF transformers' eager attention (`repeat_kv`, `softmax(q kᵀ · scale + causal
//! mask, dim=-1, dtype=float32) v`). Shapes:
//! - q    `(batch, q_len, n_heads, head_dim)`;
//! - k, v `(batch, kv_len, n_kv_heads, head_dim)`, `kv_len >= q_len`, typically views narrowed
//!   along dim 1 out of a pre-allocated KV cache `(batch, capacity, n_kv_heads, head_dim)`;
//! - out  `(batch, q_len, n_heads, head_dim)` in q's dtype.
//!
//! Query `i` sits at absolute position `kv_len - q_len + i` and sees keys `0..=` that position,
//! so one op covers prefill (`kv_len == q_len`), continued prefill and decode (`q_len == 1`).
//! Query head `h` reads kv head `h / (n_heads / n_kv_heads)` (HF `repeat_kv` order).
//!
//! Numerics: scores, softmax (max subtracted) and the weighted sum of V in f32; the output is
//! rounded once to q's dtype.
//!
//! Memory: neither implementation ever holds the `(q_len, kv_len)` scores of a whole prompt.
//! The reference walks the queries in blocks of at most 128 rows, sized so that one block's
//! scores, `batch × n_heads × q_block × kv_len` f32, stay within 2^24 floats (64 MiB) when
//! `kv_len` allows (plus the f32 K/V repeated to `n_heads`, `O(kv_len)`); the CPU fast path keeps
//! under 1 MiB of scratch per worker at head_dim 128 (see `cpu/attention.rs`).

use crate::check;
use crate::{Backend, OpError, Result};
use candle_core::{DType, Tensor, D};

const OP: &str = "causal_attention";

/// Most query rows per block of the reference.
const REF_Q_BLOCK: usize = 128;
/// Most f32 scores (`batch × n_heads × q_block × kv_len`) per block of the reference: 64 MiB.
const REF_SCORE_BUDGET: usize = 1 << 24;

/// Arguments of [`causal_attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionArgs<'a> {
    /// `(batch, q_len, n_heads, head_dim)`, f32/f16/bf16.
    pub q: &'a Tensor,
    /// `(batch, kv_len, n_kv_heads, head_dim)`, `kv_len >= q_len`: query `i` sits at absolute
    /// position `kv_len - q_len + i` and sees keys `0..=` that position (causal). Same dtype as q.
    pub k: &'a Tensor,
    /// Same shape and dtype as `k`.
    pub v: &'a Tensor,
    /// Multiplier of q·k (`head_dim^-0.5` for most families; Granite uses `attention_multiplier`).
    pub scale: f64,
}

/// Sizes of an attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnDims {
    pub batch: usize,
    pub q_len: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    pub kv_len: usize,
    pub n_kv_heads: usize,
}

pub(crate) fn validate(args: &AttentionArgs) -> Result<AttnDims> {
    let [batch, q_len, n_heads, head_dim] = check::dims::<4>(OP, "q", args.q)?;
    check::float(OP, "q", args.q)?;
    let [kb, kv_len, n_kv_heads, kd] = check::dims::<4>(OP, "k", args.k)?;
    let k_err = |expected: String| OpError::Shape {
        op: OP,
        arg: "k",
        got: args.k.dims().to_vec(),
        expected,
    };
    if kb != batch || kd != head_dim {
        return Err(k_err(format!(
            "({batch}, kv_len, n_kv_heads, {head_dim}) (the batch and head_dim of q)"
        )));
    }
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(k_err(format!("n_kv_heads dividing n_heads = {n_heads}")));
    }
    if kv_len < q_len {
        return Err(k_err(format!("kv_len >= q_len = {q_len}")));
    }
    check::shape(OP, "v", args.v, args.k.dims())?;
    for (arg, t) in [("k", args.k), ("v", args.v)] {
        if t.dtype() != args.q.dtype() {
            return Err(OpError::Dtype {
                op: OP,
                arg,
                got: t.dtype(),
                expected: "the dtype of q",
            });
        }
        check::same_device(OP, arg, args.q, t)?;
    }
    if !args.scale.is_finite() {
        return Err(OpError::Param {
            op: OP,
            param: "scale",
            message: format!("{} is not finite", args.scale),
        });
    }
    Ok(AttnDims {
        batch,
        q_len,
        n_heads,
        head_dim,
        kv_len,
        n_kv_heads,
    })
}

/// Causal attention of `q` over the keys and values `k`, `v` (GQA): `softmax(q kᵀ · scale +
/// causal mask) v` per head, `(batch, q_len, n_heads, head_dim)` in q's dtype, computed in f32.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use mamba2_ops::{causal_attention, AttentionArgs};
/// let dev = Device::Cpu;
/// // A KV cache with room for 16 positions, 5 of them filled: decode the 5th token.
/// let k_cache = Tensor::randn(0f32, 1.0, (1, 16, 2, 8), &dev)?; // (batch, capacity, n_kv_heads, head_dim)
/// let v_cache = Tensor::randn(0f32, 1.0, (1, 16, 2, 8), &dev)?;
/// let (k, v) = (k_cache.narrow(1, 0, 5)?, v_cache.narrow(1, 0, 5)?);
/// let q = Tensor::randn(0f32, 1.0, (1, 1, 4, 8), &dev)?; // (batch, q_len, n_heads, head_dim)
/// let out = causal_attention(&AttentionArgs { q: &q, k: &k, v: &v, scale: 8f64.powf(-0.5) })?;
/// assert_eq!(out.dims(), &[1, 1, 4, 8]);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn causal_attention(args: &AttentionArgs) -> Result<Tensor> {
    causal_attention_with(args, Backend::Auto)
}

/// [`causal_attention`] with an explicit backend choice.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use mamba2_ops::{causal_attention_with, AttentionArgs, Backend};
/// let q = Tensor::randn(0f32, 1.0, (2, 3, 4, 8), &Device::Cpu)?;
/// let k = Tensor::randn(0f32, 1.0, (2, 3, 4, 8), &Device::Cpu)?;
/// let args = AttentionArgs { q: &q, k: &k, v: &k, scale: 0.35 };
/// let out = causal_attention_with(&args, Backend::Reference)?;
/// assert_eq!(out.dims(), &[2, 3, 4, 8]);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn causal_attention_with(args: &AttentionArgs, backend: Backend) -> Result<Tensor> {
    validate(args)?;
    crate::dispatch!(
        backend,
        args.q.device(),
        causal_attention(args),
        causal_attention_slow(args)
    )
}

/// `(batch, kv_len, n_kv_heads, head_dim)` -> f32 `(batch, n_heads, kv_len, head_dim)`, query
/// head `h` reading kv head `h / (n_heads / n_kv_heads)` (HF `repeat_kv`).
fn repeat_kv(t: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let t = t.to_dtype(DType::F32)?; // (batch, kv_len, n_kv_heads, head_dim)
    let t = check::groups_to_heads(&t, 2, n_heads)?; // (batch, kv_len, n_heads, head_dim)
    t.transpose(1, 2)?.contiguous()
}

/// Plain-tensor reference of [`causal_attention`]: per block of queries, scores by matmul, the
/// causal mask as `-inf`, softmax over the keys in f32, matmul with V.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use mamba2_ops::{causal_attention_slow, AttentionArgs};
/// let q = Tensor::randn(0f32, 1.0, (1, 4, 2, 8), &Device::Cpu)?;
/// let k = Tensor::randn(0f32, 1.0, (1, 6, 1, 8), &Device::Cpu)?; // 2 earlier positions cached
/// let out = causal_attention_slow(&AttentionArgs { q: &q, k: &k, v: &k, scale: 0.35 })?;
/// assert_eq!(out.dims(), &[1, 4, 2, 8]);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn causal_attention_slow(args: &AttentionArgs) -> Result<Tensor> {
    let AttnDims {
        batch,
        q_len,
        n_heads,
        kv_len,
        ..
    } = validate(args)?;
    let (dtype, dev) = (args.q.dtype(), args.q.device());
    if args.q.elem_count() == 0 {
        return Ok(Tensor::zeros(args.q.dims(), dtype, dev)?);
    }
    let offset = kv_len - q_len; // absolute position of query 0
    let q = args.q.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?; // (batch, n_heads, q_len, head_dim)
    let k = repeat_kv(args.k, n_heads)?; // (batch, n_heads, kv_len, head_dim)
    let v = repeat_kv(args.v, n_heads)?; // (batch, n_heads, kv_len, head_dim)
    let q_block = (REF_SCORE_BUDGET / (batch * n_heads * kv_len).max(1)).clamp(1, REF_Q_BLOCK);
    let mut outs = Vec::with_capacity(q_len.div_ceil(q_block));
    for i0 in (0..q_len).step_by(q_block) {
        let n = q_block.min(q_len - i0);
        // The block's last query sees keys 0..kv_end; none of it looks further.
        let kv_end = offset + i0 + n;
        let qi = q.narrow(2, i0, n)?; // (batch, n_heads, n, head_dim)
        let kj = k.narrow(2, 0, kv_end)?; // (batch, n_heads, kv_end, head_dim)
        let vj = v.narrow(2, 0, kv_end)?; // (batch, n_heads, kv_end, head_dim)
        let scores = (qi.matmul(&kj.t()?)? * args.scale)?; // (batch, n_heads, n, kv_end)
                                                           // Key j is hidden from query i0 + r (position offset + i0 + r) when j > offset + i0 + r.
        let key_pos = Tensor::arange(0u32, kv_end as u32, dev)?.reshape((1, kv_end))?;
        let query_pos =
            Tensor::arange((offset + i0) as u32, kv_end as u32, dev)?.reshape((n, 1))?;
        let hidden = key_pos.broadcast_gt(&query_pos)?; // (n, kv_end)
        let mask = hidden.where_cond(
            &Tensor::full(f32::NEG_INFINITY, (n, kv_end), dev)?,
            &Tensor::zeros((n, kv_end), DType::F32, dev)?,
        )?; // (n, kv_end): 0 or -inf
        let scores = scores.broadcast_add(&mask)?;
        // softmax over the keys, max subtracted (every query sees key 0, so the max is finite)
        let max = scores.max_keepdim(D::Minus1)?; // (batch, n_heads, n, 1)
        let e = scores.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?; // (batch, n_heads, n, kv_end)
        outs.push(p.matmul(&vj)?); // (batch, n_heads, n, head_dim)
    }
    let out = Tensor::cat(&outs, 2)?.transpose(1, 2)?; // (batch, q_len, n_heads, head_dim)
    Ok(out.to_dtype(dtype)?.contiguous()?)
}
