//! Plans of causal GQA attention (`kernels/metal/attention.metal`): the decode kernel for a few
//! queries (its key splits merged by `causal_attention_merge_*` when there are several), the
//! prefill kernel otherwise, as [`mp::AttentionShape::launch`] decides.
//!
//! K and V are read in place through their strides (KV-cache views are never copied); q is made
//! contiguous (a no-op for the rotary kernel's output). Preconditions, otherwise `Ok(None)`
//! and the reference runs: a Metal float dtype, head_dim <= 256 (prefill also head_dim % 8 ==
//! 0 when q_len > 8), K and V with unit channel stride, every size and stride within u32.

use super::{dtype_suffix, output, require, some, strided_arg, u32_of};
use super::{DispatchPlan, PlanExecutor};
use crate::metal_params::{self as mp, layout};
use crate::{AttentionArgs, Result};
use candle_core::{DType, Tensor};

const ATTENTION: &str = "attention.metal";

fn shape_of(args: &AttentionArgs) -> Result<mp::AttentionShape> {
    let (batch, q_len, n_heads, head_dim) = args.q.dims4()?;
    let (_, kv_len, n_kv_heads, _) = args.k.dims4()?;
    Ok(mp::AttentionShape {
        batch,
        q_len,
        n_heads,
        n_kv_heads,
        head_dim,
        kv_len,
    })
}

/// Causal attention with the launch [`mp::AttentionShape::launch`] picks; returns the output
/// `(batch, q_len, n_heads, head_dim)` in q's dtype.
pub fn causal_attention(ex: &dyn PlanExecutor, args: &AttentionArgs) -> Result<Option<Tensor>> {
    let launch = some!(shape_of(args)?.launch());
    causal_attention_as(ex, args, launch)
}

/// Causal attention with a given launch of its shape (`AttentionShape::decode(n)` or
/// `prefill()`; tests use it to force key splits or a kernel).
pub fn causal_attention_as(
    ex: &dyn PlanExecutor,
    args: &AttentionArgs,
    launch: mp::AttentionLaunch,
) -> Result<Option<Tensor>> {
    let dtype = args.q.dtype();
    let suffix = some!(dtype_suffix(dtype));
    let shape = shape_of(args)?;
    let mp::AttentionShape {
        batch,
        q_len,
        n_heads,
        n_kv_heads,
        head_dim,
        kv_len,
    } = shape;
    let (kb, ks) = some!(strided_arg(args.k));
    let (vb, vs) = some!(strided_arg(args.v));
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
    let name = format!("{}_{suffix}", launch.kernel);
    let threads = layout::ATTN_THREADS as usize;
    require!(some!(ex.pipeline(ATTENTION, &name)?) >= threads);
    let merge = format!("causal_attention_merge_{suffix}");
    if launch.n_splits > 1 {
        require!(some!(ex.pipeline(ATTENTION, &merge)?) >= shape.merge_grid().1);
    }
    let q = args.q.contiguous()?;
    let out = output(ex, q.dims(), dtype, "attention_out")?; // (batch, q_len, n_heads, head_dim)
    let tg = [threads, 1, 1];
    let plan = DispatchPlan::new(ATTENTION, name)
        .read(&q)?
        .push(kb)
        .push(vb);
    if launch.n_splits == 1 {
        let mut plan = plan.write(&out)?;
        if launch.kernel.starts_with("causal_attention_decode") {
            // no partial results: the two f32 buffers are never touched; bind a buffer at
            // offset 0 (aligned for f32)
            plan = plan.read(&out)?.read(&out)?;
        }
        ex.run(plan.params(&p).grid(launch.groups, tg))?;
        return Ok(Some(out));
    }
    let rows = batch * q_len * n_heads;
    let part_o = output(
        ex,
        (launch.n_splits, rows, head_dim),
        DType::F32,
        "attention_part_o",
    )?; // (n_splits, rows, head_dim)
    let part_ml = output(
        ex,
        (launch.n_splits, rows, 2),
        DType::F32,
        "attention_part_ml",
    )?; // (n_splits, rows, 2): max, sum
    let plan = plan
        .read(&out)?
        .write(&part_o)?
        .write(&part_ml)?
        .params(&p)
        .grid(launch.groups, tg);
    ex.run(plan)?;
    let (groups, tx) = shape.merge_grid();
    let plan = DispatchPlan::new(ATTENTION, merge)
        .read(&part_o)?
        .read(&part_ml)?
        .write(&out)?
        .params(&p)
        .grid(groups, [tx, 1, 1]);
    ex.run(plan)?;
    Ok(Some(out))
}
