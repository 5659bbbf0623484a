//! Rotary embedding and the MLP activations on Metal (`kernels/metal/rotary.metal`,
//! `activation.metal`): one thread per rotated pair / pass-through channel, per output element.
//!
//! Preconditions, otherwise `Ok(None)` and the reference runs: a Metal float dtype, a non-empty
//! input, sizes, strides and positions within u32. The rotary input is read in place through
//! its strides when its channels are unit-stride (e.g. q or k narrowed out of a fused
//! projection), made contiguous otherwise; the activations make their input contiguous.

use super::runtime::{dispatch, dtype_suffix, max_threads, metal_device, output, pipeline};
use super::runtime::{u32_of, Arg, Bind, ACTIVATION, ROTARY};
use super::{require, some};
use crate::metal_params::{self as mp, layout};
use crate::{Result, RotaryArgs};
use candle_core::Tensor;

pub(crate) fn rotary_embedding(args: &RotaryArgs) -> Result<Option<Tensor>> {
    let dev = some!(metal_device(args.x));
    let dtype = args.x.dtype();
    let suffix = some!(dtype_suffix(dtype));
    let (batch, seqlen, n_heads, head_dim) = args.x.dims4()?;
    let rd = args.rotary_dim;
    // rotary_dim 0 is the identity, which the reference returns without a copy
    require!(rd > 0 && args.x.elem_count() > 0);
    let rows = batch * seqlen * n_heads;
    let items = rd / 2 + (head_dim - rd);
    require!(u32_of(rows).is_some() && u32_of(args.position_offset + seqlen).is_some());
    let pipe = some!(pipeline(
        &dev,
        ROTARY,
        &format!("rotary_embedding_{suffix}")
    )?);
    let (grid, tg) = mp::rotary_grid(items, rows);
    require!(max_threads(&pipe) >= tg[0] * tg[1]);
    let x = if args.x.stride()[3] == 1 {
        args.x.clone()
    } else {
        args.x.contiguous()?
    };
    let (xa, xs) = some!(Arg::strided(&x)?);
    let p = mp::RotaryParams {
        batch: batch as u32,
        seqlen: seqlen as u32,
        n_heads: n_heads as u32,
        head_dim: some!(u32_of(head_dim)),
        rotary_dim: rd as u32,
        position_offset: args.position_offset as u32,
        x_sb: some!(u32_of(xs[0])),
        x_st: some!(u32_of(xs[1])),
        x_sh: some!(u32_of(xs[2])),
    };
    let inv_freq = Tensor::from_vec(mp::rotary_inv_freq(rd, args.theta), rd / 2, args.x.device())?;
    let fa = Arg::of(&inv_freq)?;
    let (out, oa) = output(&dev, args.x.dims(), dtype, "rotary_out")?;
    let binds = [Bind::In(&xa), Bind::In(&fa), Bind::Out(&oa)];
    dispatch(&dev, &pipe, "rotary_embedding", &binds, &p, grid, tg)?;
    Ok(Some(out))
}

pub(crate) fn swiglu(x: &Tensor) -> Result<Option<Tensor>> {
    let dev = some!(metal_device(x));
    let suffix = some!(dtype_suffix(x.dtype()));
    let mut dims = x.dims().to_vec();
    let n = *some!(dims.last()) / 2;
    require!(n > 0 && x.elem_count() > 0);
    let rows = x.elem_count() / (2 * n);
    require!(u32_of(rows).is_some() && u32_of(2 * n).is_some());
    let p = mp::SwigluParams {
        rows: rows as u32,
        n: n as u32,
    };
    let pipe = some!(pipeline(&dev, ACTIVATION, &format!("swiglu_{suffix}"))?);
    let tx = n
        .next_multiple_of(32)
        .min(layout::ELEMENTWISE_THREADS as usize)
        .min(max_threads(&pipe));
    let x = x.contiguous()?;
    let xa = Arg::of(&x)?;
    *some!(dims.last_mut()) = n;
    let (out, oa) = output(&dev, dims.as_slice(), x.dtype(), "swiglu_out")?;
    let binds = [Bind::In(&xa), Bind::Out(&oa)];
    let groups = [n.div_ceil(tx), rows, 1];
    dispatch(&dev, &pipe, "swiglu", &binds, &p, groups, [tx, 1, 1])?;
    Ok(Some(out))
}

pub(crate) fn relu_squared(x: &Tensor) -> Result<Option<Tensor>> {
    let dev = some!(metal_device(x));
    let suffix = some!(dtype_suffix(x.dtype()));
    let count = x.elem_count();
    require!(count > 0);
    let p = mp::ReluSquaredParams {
        count: some!(u32_of(count)),
    };
    let pipe = some!(pipeline(
        &dev,
        ACTIVATION,
        &format!("relu_squared_{suffix}")
    )?);
    let tx = (layout::ELEMENTWISE_THREADS as usize).min(max_threads(&pipe));
    let x = x.contiguous()?;
    let xa = Arg::of(&x)?;
    let (out, oa) = output(&dev, x.dims(), x.dtype(), "relu_squared_out")?;
    let binds = [Bind::In(&xa), Bind::Out(&oa)];
    let groups = [count.div_ceil(tx), 1, 1];
    dispatch(&dev, &pipe, "relu_squared", &binds, &p, groups, [tx, 1, 1])?;
    Ok(Some(out))
}
