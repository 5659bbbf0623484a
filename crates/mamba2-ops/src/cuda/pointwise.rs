//! CUDA rotary embedding and MLP activations (`kernels/cuda/rotary.cu`, `activation.cu`):
//! elementwise kernels, one thread per rotated pair / pass-through channel, or per 16-byte
//! vector of the activations where the rows allow it (else per element).
//!
//! Inputs are read in place through their strides where the channels are contiguous (q or k
//! narrowed out of a fused projection, the [gate | up] half of a wider one); rank >= 4
//! activations and inputs with strided channels are made contiguous. Preconditions, otherwise
//! `Ok(None)` and the reference runs: f32/f16/bf16, a non-empty input, a grid within CUDA's
//! limits; rotary also `0 < rotary_dim <= 256` (the inv_freq table is a kernel parameter).

use super::launch::{cfg, count_launch, device, func, launch, output, ptr, ptx, rows, rows2};
use super::launch::{suffix, Result};
use crate::RotaryArgs;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::Tensor;

/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;
/// `ROPE_MAX_PAIRS` of rotary.cu.
const ROPE_MAX_PAIRS: usize = 128;

/// `InvFreq` of rotary.cu: the inv_freq table, passed by value (a 512-byte kernel parameter).
#[repr(C)]
#[derive(Clone, Copy)]
struct InvFreq([f32; ROPE_MAX_PAIRS]);

// SAFETY: plain old data with the layout of the kernel's `struct InvFreq { float v[128]; }`.
unsafe impl DeviceRepr for InvFreq {}

pub(crate) fn rotary_embedding(args: &RotaryArgs) -> Result<Option<Tensor>> {
    let Some(dev) = device(args.x) else {
        return Ok(None);
    };
    let Some(sfx) = suffix(args.x.dtype()) else {
        return Ok(None);
    };
    let (batch, seqlen, n_heads, head_dim) = args.x.dims4()?;
    let rd = args.rotary_dim;
    // rotary_dim 0 is the identity, which the reference returns without a copy
    if rd == 0 || rd / 2 > ROPE_MAX_PAIRS || rd > head_dim || args.x.elem_count() == 0 {
        return Ok(None);
    }
    let items = rd / 2 + (head_dim - rd);
    let total = batch * seqlen * n_heads * items;
    let Some(c) = cfg((total.div_ceil(THREADS as usize) as u64, 1, 1), THREADS, 0) else {
        return Ok(None);
    };
    let mut table = InvFreq([0.0; ROPE_MAX_PAIRS]);
    // the same f32 table as the reference and the CPU / Metal paths
    let inv_freq = crate::rotary::inv_freq(rd, args.theta);
    table.0[..inv_freq.len()].copy_from_slice(&inv_freq);
    let (x, xs) = rows(args.x, 1)?; // (batch, seqlen, n_heads, head_dim), channels contiguous
    let out = output(args.x.dims(), args.x.dtype(), &dev)?;
    let f = func(
        &dev,
        "rotary",
        ptx::ROTARY,
        &format!("rotary_embedding_{sfx}"),
    )?;
    let (xp, op) = (ptr(&x, &dev)?, ptr(&out, &dev)?);
    let (sb, st, sh) = (xs[0] as i64, xs[1] as i64, xs[2] as i64);
    let (seqlen, n_heads, head_dim) = (seqlen as i64, n_heads as i64, head_dim as i64);
    let (rd, pos0) = (rd as i64, args.position_offset as i64);
    let (items, total) = (items as i64, total as i64);
    // `launch!` takes scalar arguments only; the table is pushed by reference here.
    count_launch();
    let mut b = f.builder();
    b.arg(&xp)
        .arg(&sb)
        .arg(&st)
        .arg(&sh)
        .arg(&op)
        .arg(&seqlen)
        .arg(&n_heads)
        .arg(&head_dim)
        .arg(&rd)
        .arg(&pos0)
        .arg(&table)
        .arg(&items)
        .arg(&total);
    // SAFETY: the arguments match `rotary_embedding_<dtype>` in rotary.cu; x and out are live
    // tensors of the sizes the kernel reads and writes.
    unsafe { b.launch(c) }.w()?;
    Ok(Some(out))
}

/// Launches `<name>_<dtype>` (swiglu or relu_squared) of activation.cu: `x` seen as rows of its
/// last dimension, `out_last` outputs per row (the output has x's shape with that last size).
fn activation(x: &Tensor, name: &str, out_last: usize) -> Result<Option<Tensor>> {
    let Some(dev) = device(x) else {
        return Ok(None);
    };
    let Some(sfx) = suffix(x.dtype()) else {
        return Ok(None);
    };
    let dims = x.dims();
    let Some(&last) = dims.last() else {
        return Ok(None);
    };
    if x.elem_count() == 0 || out_last == 0 {
        return Ok(None);
    }
    let rows = x.elem_count() / last;
    let (t, r1, s0, s1) = rows2(x)?; // (rows, last), row (i0, i1) at i0 s0 + i1 s1
                                     // 16-byte vectors when every row start, the up half (swiglu: at out_last) and the output
                                     // rows (out_last apart) are 16-byte aligned
    let n = 16 / x.dtype().size_in_bytes();
    let vec = ptr(&t, &dev)?.is_multiple_of(16)
        && [s0, s1, last, out_last].iter().all(|v| v.is_multiple_of(n));
    let per = if vec {
        16 / x.dtype().size_in_bytes()
    } else {
        1
    };
    let work = rows * (out_last / per);
    let Some(c) = cfg((work.div_ceil(THREADS as usize) as u64, 1, 1), THREADS, 0) else {
        return Ok(None);
    };
    let f = func(
        &dev,
        "activation",
        ptx::ACTIVATION,
        &format!("{name}_{sfx}"),
    )?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank >= 1") = out_last;
    let out = output(out_dims.as_slice(), x.dtype(), &dev)?;
    launch!(
        f,
        c,
        ptr(&t, &dev)?,
        s0 as i64,
        s1 as i64,
        ptr(&out, &dev)?,
        r1 as i64,
        out_last as i64,
        rows as i64,
        vec as i32,
    )?;
    Ok(Some(out))
}

pub(crate) fn swiglu(x: &Tensor) -> Result<Option<Tensor>> {
    let n = x.dims().last().map_or(0, |d| d / 2);
    activation(x, "swiglu", n)
}

pub(crate) fn relu_squared(x: &Tensor) -> Result<Option<Tensor>> {
    let dim = x.dims().last().copied().unwrap_or(0);
    activation(x, "relu_squared", dim)
}
