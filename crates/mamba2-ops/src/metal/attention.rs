//! Causal GQA attention on Metal (`kernels/metal/attention.metal`): the decode kernel for a few
//! queries (its key splits merged by `causal_attention_merge_*` when there are several), the
//! prefill kernel otherwise, as [`mp::AttentionShape::launch`] decides.
//!
//! K and V are read in place through their strides (KV-cache views are never copied); q is made
//! contiguous (a no-op for the rotary kernel's output). Preconditions, otherwise `Ok(None)`
//! and the reference runs: a Metal float dtype, head_dim <= 256 (prefill also head_dim % 8 ==
//! 0 when q_len > 8), K and V with unit channel stride, every size and stride within u32.

use super::runtime::{dispatch, dtype_suffix, max_threads, metal_device, output, pipeline};
use super::runtime::{u32_of, Arg, Bind, ATTENTION};
use super::{require, some};
use crate::metal_params::{self as mp, layout};
use crate::{AttentionArgs, Result};
use candle_core::{DType, Tensor};

pub(crate) fn causal_attention(args: &AttentionArgs) -> Result<Option<Tensor>> {
    let dev = some!(metal_device(args.q));
    let dtype = args.q.dtype();
    let suffix = some!(dtype_suffix(dtype));
    let (batch, q_len, n_heads, head_dim) = args.q.dims4()?;
    let (_, kv_len, n_kv_heads, _) = args.k.dims4()?;
    let shape = mp::AttentionShape {
        batch,
        q_len,
        n_heads,
        n_kv_heads,
        head_dim,
        kv_len,
    };
    let launch = some!(shape.launch());
    let (ka, ks) = some!(Arg::strided(args.k)?);
    let (va, vs) = some!(Arg::strided(args.v)?);
    let scale = args.scale as f32;
    require!(scale.is_finite());
    let p = mp::AttentionParams {
        batch: some!(u32_of(batch)),
        q_len: some!(u32_of(q_len)),
        n_heads: some!(u32_of(n_heads)),
        n_kv_heads: some!(u32_of(n_kv_heads)),
        head_dim: head_dim as u32,
        kv_len: some!(u32_of(kv_len)),
        k_sb: some!(u32_of(ks[0])),
        k_st: some!(u32_of(ks[1])),
        k_sh: some!(u32_of(ks[2])),
        v_sb: some!(u32_of(vs[0])),
        v_st: some!(u32_of(vs[1])),
        v_sh: some!(u32_of(vs[2])),
        n_splits: some!(u32_of(launch.n_splits)),
        split_len: some!(u32_of(launch.split_len)),
        scale,
    };
    // the kernels index rows of q/out and of the partial results in u64, the grid in u32
    require!(u32_of(batch * q_len * n_heads).is_some());
    let pipe = some!(pipeline(
        &dev,
        ATTENTION,
        &format!("{}_{suffix}", launch.kernel)
    )?);
    let threads = layout::ATTN_THREADS as usize;
    require!(max_threads(&pipe) >= threads);
    let merge = if launch.n_splits > 1 {
        let pipe = some!(pipeline(
            &dev,
            ATTENTION,
            &format!("causal_attention_merge_{suffix}")
        )?);
        require!(max_threads(&pipe) >= shape.merge_grid().1);
        Some(pipe)
    } else {
        None
    };
    let q = args.q.contiguous()?;
    let qa = Arg::of(&q)?;
    let (out, oa) = output(&dev, q.dims(), dtype, "attention_out")?;
    let tg = [threads, 1, 1];
    let Some(merge) = merge else {
        let mut binds = vec![Bind::In(&qa), Bind::In(&ka), Bind::In(&va), Bind::Out(&oa)];
        if launch.n_splits == 1 && launch.kernel.starts_with("causal_attention_decode") {
            // no partial results: the two f32 buffers are never touched; bind a buffer at
            // offset 0 (aligned for f32)
            binds.push(Bind::In(&oa));
            binds.push(Bind::In(&oa));
        }
        dispatch(&dev, &pipe, launch.kernel, &binds, &p, launch.groups, tg)?;
        return Ok(Some(out));
    };
    let rows = batch * q_len * n_heads;
    let (_po, poa) = output(
        &dev,
        (launch.n_splits, rows, head_dim),
        DType::F32,
        "attention_part_o",
    )?;
    let (_pml, pmla) = output(
        &dev,
        (launch.n_splits, rows, 2),
        DType::F32,
        "attention_part_ml",
    )?;
    let binds = [
        Bind::In(&qa),
        Bind::In(&ka),
        Bind::In(&va),
        Bind::In(&oa),
        Bind::Out(&poa),
        Bind::Out(&pmla),
    ];
    dispatch(&dev, &pipe, launch.kernel, &binds, &p, launch.groups, tg)?;
    let binds = [Bind::In(&poa), Bind::In(&pmla), Bind::Out(&oa)];
    let (groups, tx) = shape.merge_grid();
    dispatch(
        &dev,
        &merge,
        "causal_attention_merge",
        &binds,
        &p,
        groups,
        [tx, 1, 1],
    )?;
    Ok(Some(out))
}
