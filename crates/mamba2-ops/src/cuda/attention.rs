//! CUDA causal GQA attention (`kernels/cuda/attention_decode.cu`, `attention_prefill.cu`).
//!
//! Which kernel runs:
//! - `q_len <= 8` (decode, speculative steps): `causal_attention_decode_hd{64,128,256}_*`, the
//!   keys split over several blocks per (batch, kv head) when those alone would not fill the GPU
//!   (flash-decoding), the splits combined by `causal_attention_merge_*`;
//! - longer f16/bf16 queries with head_dim % 16 == 0, head_dim <= 128 and 16-byte aligned K/V
//!   rows: the tensor-core kernel `causal_attention_prefill_hd{64,128}_*`;
//! - other longer queries (f32, other head dims, unaligned K/V): the CUDA-core kernel
//!   `causal_attention_prefill_simt_*`.
//!
//! K and V are read in place through their strides (KV-cache views are never copied), and so is
//! q. Preconditions, otherwise `Ok(None)` and the reference runs: f32/f16/bf16, a non-empty
//! input, head_dim <= 256, a grid within CUDA's limits, the shared memory the prefill kernels
//! need within the device's opt-in limit. Inputs whose channels are not contiguous are copied.

use super::launch::{
    allow_smem, cfg, device, func, launch, output, ptr, ptx, rows, sm_count, suffix, Result,
};
use crate::AttentionArgs;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Tensor};

/// Largest q_len served by the decode kernel.
const DECODE_MAX_Q: usize = 8;
/// Largest head_dim of any kernel (`hd256` decode variant, `SP_MAX_E` of the SIMT prefill).
const MAX_HEAD_DIM: usize = 256;
/// Threads per block of the attention kernels (`DEC_THREADS`, `SP_THREADS`, `MP_THREADS`).
const THREADS: u32 = 128;
/// Decode key splits: aim at this many blocks per SM in all (2: what the decode kernel's
/// registers let an SM hold at once, so the splits run in one wave) ...
const SPLIT_BLOCKS_PER_SM: usize = 2;
/// ... with at least this many keys per split ...
const MIN_SPLIT_KEYS: usize = 64;
/// ... and at most this many splits.
const MAX_SPLITS: usize = 64;
/// Packed query rows per block of the SIMT and tensor-core prefill kernels (`SP_BQ`, `MP_BQ`).
const SIMT_ROWS: usize = 32;
const MMA_ROWS: usize = 64;

/// Whether the address `p` is a multiple of `bytes` and every stride of a dimension longer than
/// 1 a multiple of `elems` elements: then every row start of the tensor is as aligned as `p`
/// (given `bytes <= elems * size`), for vector loads of `bytes`.
fn aligned(p: u64, bytes: usize, strides: &[usize], dims: &[usize], elems: usize) -> bool {
    p.is_multiple_of(bytes as u64)
        && strides
            .iter()
            .zip(dims)
            .all(|(&s, &d)| d == 1 || s.is_multiple_of(elems))
}

pub(crate) fn causal_attention(args: &AttentionArgs) -> Result<Option<Tensor>> {
    let Some(dev) = device(args.q) else {
        return Ok(None);
    };
    let dtype = args.q.dtype();
    let Some(sfx) = suffix(dtype) else {
        return Ok(None);
    };
    let (batch, q_len, n_heads, head_dim) = args.q.dims4()?;
    let (_, kv_len, n_kv_heads, _) = args.k.dims4()?;
    let scale = args.scale as f32;
    if args.q.elem_count() == 0
        || head_dim > MAX_HEAD_DIM
        || n_kv_heads == 0
        || !n_heads.is_multiple_of(n_kv_heads)
        || kv_len < q_len
        || !scale.is_finite()
    {
        return Ok(None);
    }
    let (q, qs) = rows(args.q, 1)?; // (batch, q_len, n_heads, head_dim), channels contiguous
    let (k, ks) = rows(args.k, 1)?; // (batch, kv_len, n_kv_heads, head_dim)
    let (v, vs) = rows(args.v, 1)?;
    let t = Tensors {
        dev: &dev,
        sfx,
        q: &q,
        k: &k,
        v: &v,
        qs: &qs,
        ks: &ks,
        vs: &vs,
        dims: [batch, q_len, n_heads, n_kv_heads, head_dim, kv_len],
        scale,
    };
    if q_len <= DECODE_MAX_Q {
        return decode(&t);
    }
    // the tensor-core kernel's cp.async: 16-byte chunks (8 elements) of every K/V row
    let kv_dims = &k.dims()[..3];
    let kv_aligned = aligned(ptr(&k, &dev)?, 16, &ks, kv_dims, 8)
        && aligned(ptr(&v, &dev)?, 16, &vs, kv_dims, 8);
    if dtype != DType::F32 && head_dim.is_multiple_of(16) && head_dim <= 128 && kv_aligned {
        if let Some(out) = prefill_mma(&t)? {
            return Ok(Some(out));
        }
    }
    prefill_simt(&t)
}

/// The arguments of one attention call as the launches take them.
struct Tensors<'a> {
    dev: &'a CudaDevice,
    sfx: &'static str,
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    /// Element strides of batch, position and head of q, k and v.
    qs: &'a [usize],
    ks: &'a [usize],
    vs: &'a [usize],
    /// batch, q_len, n_heads, n_kv_heads, head_dim, kv_len
    dims: [usize; 6],
    scale: f32,
}

/// The decode kernel (any q_len; the dispatch sends it q_len <= 8), with key splits and the
/// merge when the (batch, kv head, row block) blocks alone would leave the GPU idle.
fn decode(t: &Tensors) -> Result<Option<Tensor>> {
    let [batch, q_len, n_heads, n_kv_heads, head_dim, kv_len] = t.dims;
    let dev = t.dev;
    let (variant, dpl, rows_per_block) = match head_dim {
        0..=64 => ("hd64", 2, 8),
        65..=128 => ("hd128", 4, 8),
        _ => ("hd256", 8, 4),
    };
    let rows = n_heads / n_kv_heads * q_len;
    let row_blocks = rows.div_ceil(rows_per_block);
    let base = batch * n_kv_heads * row_blocks;
    let want = (SPLIT_BLOCKS_PER_SM * sm_count(dev)?).div_ceil(base);
    let n_splits = want
        .min(kv_len.div_ceil(MIN_SPLIT_KEYS))
        .clamp(1, MAX_SPLITS);
    let split_len = kv_len.div_ceil(n_splits);
    let n_splits = kv_len.div_ceil(split_len);
    let nrows = batch * q_len * n_heads;
    let Some(c) = cfg(
        (
            n_splits as u64,
            (n_kv_heads * row_blocks) as u64,
            batch as u64,
        ),
        THREADS,
        0,
    ) else {
        return Ok(None);
    };
    let merge_threads = (head_dim.next_multiple_of(32) as u32).min(256);
    let Some(c_merge) = cfg((nrows as u64, 1, 1), merge_threads, 0) else {
        return Ok(None);
    };
    // `load_chunk` of the kernel: DPL elements per lane, aligned to min(16, DPL * size) bytes
    let bytes = (dpl * t.q.dtype().size_in_bytes()).min(16);
    let kv_dims = &t.k.dims()[..3];
    let vec = head_dim.is_multiple_of(dpl)
        && aligned(ptr(t.k, dev)?, bytes, t.ks, kv_dims, dpl)
        && aligned(ptr(t.v, dev)?, bytes, t.vs, kv_dims, dpl);
    let f = func(
        dev,
        "attention_decode",
        ptx::ATTENTION_DECODE,
        &format!("causal_attention_decode_{variant}_{}", t.sfx),
    )?;
    let out = output(t.q.dims(), t.q.dtype(), dev)?;
    let parts = if n_splits > 1 {
        Some((
            output((n_splits, nrows, head_dim), DType::F32, dev)?,
            output((n_splits, nrows, 2), DType::F32, dev)?,
        ))
    } else {
        None
    };
    let (po, pml) = match &parts {
        Some((o, ml)) => (ptr(o, dev)?, ptr(ml, dev)?),
        None => (0, 0),
    };
    launch!(
        f,
        c,
        ptr(t.q, dev)?,
        t.qs[0] as i64,
        t.qs[1] as i64,
        t.qs[2] as i64,
        ptr(t.k, dev)?,
        t.ks[0] as i64,
        t.ks[1] as i64,
        t.ks[2] as i64,
        ptr(t.v, dev)?,
        t.vs[0] as i64,
        t.vs[1] as i64,
        t.vs[2] as i64,
        ptr(&out, dev)?,
        po,
        pml,
        q_len as i64,
        n_heads as i64,
        n_kv_heads as i64,
        head_dim as i64,
        kv_len as i64,
        split_len as i64,
        n_splits as i32,
        t.scale,
        vec as i32,
    )?;
    if n_splits > 1 {
        let fm = func(
            dev,
            "attention_decode",
            ptx::ATTENTION_DECODE,
            &format!("causal_attention_merge_{}", t.sfx),
        )?;
        launch!(
            fm,
            c_merge,
            po,
            pml,
            ptr(&out, dev)?,
            nrows as i64,
            head_dim as i64,
            n_splits as i32,
        )?;
    }
    // The partial buffers are freed stream-ordered, after the merge has read them.
    drop(parts);
    Ok(Some(out))
}

/// The common arguments of the prefill kernels, in their order.
macro_rules! prefill_launch {
    ($f:expr, $c:expr, $t:expr, $out:expr $(, $extra:expr)*) => {{
        let t = $t;
        let [_batch, q_len, n_heads, n_kv_heads, head_dim, kv_len] = t.dims;
        launch!(
            $f,
            $c,
            ptr(t.q, t.dev)?,
            t.qs[0] as i64,
            t.qs[1] as i64,
            t.qs[2] as i64,
            ptr(t.k, t.dev)?,
            t.ks[0] as i64,
            t.ks[1] as i64,
            t.ks[2] as i64,
            ptr(t.v, t.dev)?,
            t.vs[0] as i64,
            t.vs[1] as i64,
            t.vs[2] as i64,
            ptr($out, t.dev)?,
            q_len as i64,
            n_heads as i64,
            n_kv_heads as i64,
            head_dim as i64,
            kv_len as i64,
            t.scale
            $(, $extra)*
        )
    }};
}

/// Grid of a prefill kernel: (row blocks, kv heads, batch).
fn prefill_grid(t: &Tensors, rows_per_block: usize) -> (u64, u64, u64) {
    let [batch, q_len, n_heads, n_kv_heads, ..] = t.dims;
    let rows = n_heads / n_kv_heads * q_len;
    (
        rows.div_ceil(rows_per_block) as u64,
        n_kv_heads as u64,
        batch as u64,
    )
}

/// The tensor-core prefill (f16/bf16, head_dim % 16 == 0, <= 128, aligned K/V: the caller
/// checked); `None` when its grid or shared memory does not fit.
fn prefill_mma(t: &Tensors) -> Result<Option<Tensor>> {
    let head_dim = t.dims[4];
    let dk = if head_dim <= 64 { 64 } else { 128 };
    let smem = (2 * MMA_ROWS + MMA_ROWS) * (head_dim + 8) * t.q.dtype().size_in_bytes();
    let Some(c) = cfg(prefill_grid(t, MMA_ROWS), THREADS, smem) else {
        return Ok(None);
    };
    let f = func(
        t.dev,
        "attention_prefill",
        ptx::ATTENTION_PREFILL,
        &format!("causal_attention_prefill_hd{dk}_{}", t.sfx),
    )?;
    if !allow_smem(t.dev, &f, smem)? {
        return Ok(None);
    }
    let q_vec = aligned(ptr(t.q, t.dev)?, 16, t.qs, &t.q.dims()[..3], 8);
    let out = output(t.q.dims(), t.q.dtype(), t.dev)?;
    prefill_launch!(f, c, t, &out, q_vec as i32)?;
    Ok(Some(out))
}

/// The CUDA-core prefill (any dtype, head_dim <= 256, any alignment).
fn prefill_simt(t: &Tensors) -> Result<Option<Tensor>> {
    let hd = t.dims[4];
    // Q and K rows padded to hd + 1 floats, V rows of hd, S 32 x 33, 32 row factors.
    let smem = 4 * (SIMT_ROWS * (hd + 1) * 2 + SIMT_ROWS * hd + SIMT_ROWS * 33 + SIMT_ROWS);
    let Some(c) = cfg(prefill_grid(t, SIMT_ROWS), THREADS, smem) else {
        return Ok(None);
    };
    let f = func(
        t.dev,
        "attention_prefill",
        ptx::ATTENTION_PREFILL,
        &format!("causal_attention_prefill_simt_{}", t.sfx),
    )?;
    if !allow_smem(t.dev, &f, smem)? {
        return Ok(None);
    }
    let out = output(t.q.dims(), t.q.dtype(), t.dev)?;
    prefill_launch!(f, c, t, &out)?;
    Ok(Some(out))
}
