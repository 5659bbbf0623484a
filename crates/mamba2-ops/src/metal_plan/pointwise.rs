//! Plans of the rotary embedding, the MLP activations and the embedding gather
//! (`kernels/metal/rotary.metal`, `activation.metal`, `embedding.metal`): one thread per
//! rotated pair / pass-through channel, per output element.
//!
//! Preconditions, otherwise `Ok(None)` and the reference runs: a Metal float dtype, a non-empty
//! input, sizes, strides and positions within u32. The rotary input is read in place through
//! its strides when its channels are unit-stride (e.g. q or k narrowed out of a fused
//! projection), made contiguous otherwise; the activations make their input contiguous.

use super::{dtype_suffix, output, require, some, strided_arg, u32_of};
use super::{DispatchPlan, PlanExecutor};
use crate::metal_params::{self as mp, layout};
use crate::{Result, RotaryArgs};
use candle_core::Tensor;

const ROTARY: &str = "rotary.metal";
const ACTIVATION: &str = "activation.metal";

/// `rotary_embedding_<dtype>`; the output is contiguous, like x.
pub fn rotary_embedding(ex: &dyn PlanExecutor, args: &RotaryArgs) -> Result<Option<Tensor>> {
    let dtype = args.x.dtype();
    let suffix = some!(dtype_suffix(dtype));
    let (batch, seqlen, n_heads, head_dim) = args.x.dims4()?;
    let rd = args.rotary_dim;
    // rotary_dim 0 is the identity, which the reference returns without a copy
    require!(rd > 0 && args.x.elem_count() > 0);
    let rows = batch * seqlen * n_heads;
    let items = rd / 2 + (head_dim - rd);
    require!(u32_of(rows).is_some() && u32_of(args.position_offset + seqlen).is_some());
    let name = format!("rotary_embedding_{suffix}");
    let (grid, tg) = mp::rotary_grid(items, rows);
    require!(some!(ex.pipeline(ROTARY, &name)?) >= tg[0] * tg[1]);
    let x = if args.x.stride()[3] == 1 {
        args.x.clone()
    } else {
        args.x.contiguous()?
    };
    let (xb, xs) = some!(strided_arg(&x));
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
    let inv_freq = Tensor::from_vec(mp::rotary_inv_freq(rd, args.theta), rd / 2, args.x.device())?; // (rotary_dim / 2)
    let out = output(ex, args.x.dims(), dtype, "rotary_out")?; // (batch, seqlen, n_heads, head_dim)
    let plan = DispatchPlan::new(ROTARY, name)
        .push(xb)
        .read(&inv_freq)?
        .write(&out)?
        .params(&p)
        .grid(grid, tg);
    ex.run(plan)?;
    Ok(Some(out))
}

/// `swiglu_<dtype>`: `silu(gate) * up` over the two halves of the last dimension.
pub fn swiglu(ex: &dyn PlanExecutor, x: &Tensor) -> Result<Option<Tensor>> {
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
    let name = format!("swiglu_{suffix}");
    let max = some!(ex.pipeline(ACTIVATION, &name)?);
    let tx = n
        .next_multiple_of(32)
        .min(layout::ELEMENTWISE_THREADS as usize)
        .min(max);
    let x = x.contiguous()?;
    *some!(dims.last_mut()) = n;
    let out = output(ex, dims.as_slice(), x.dtype(), "swiglu_out")?; // (..., n)
    let plan = DispatchPlan::new(ACTIVATION, name)
        .read(&x)?
        .write(&out)?
        .params(&p)
        .grid([n.div_ceil(tx), rows, 1], [tx, 1, 1]);
    ex.run(plan)?;
    Ok(Some(out))
}

/// `relu_squared_<dtype>`: element-wise `relu(x)^2`.
pub fn relu_squared(ex: &dyn PlanExecutor, x: &Tensor) -> Result<Option<Tensor>> {
    let suffix = some!(dtype_suffix(x.dtype()));
    let count = x.elem_count();
    require!(count > 0);
    let p = mp::ReluSquaredParams {
        count: some!(u32_of(count)),
    };
    let name = format!("relu_squared_{suffix}");
    let max = some!(ex.pipeline(ACTIVATION, &name)?);
    let tx = (layout::ELEMENTWISE_THREADS as usize).min(max);
    let x = x.contiguous()?;
    let out = output(ex, x.dims(), x.dtype(), "relu_squared_out")?; // like x
    let plan = DispatchPlan::new(ACTIVATION, name)
        .read(&x)?
        .write(&out)?
        .params(&p)
        .grid([count.div_ceil(tx), 1, 1], [tx, 1, 1]);
    ex.run(plan)?;
    Ok(Some(out))
}

const EMBEDDING: &str = "embedding.metal";

/// `embedding_gather_<dtype>`: rows `ids` `(n)` u32 of `table` `(vocab, d)`, one thread per
/// output element.
pub fn embedding(ex: &dyn PlanExecutor, ids: &Tensor, table: &Tensor) -> Result<Option<Tensor>> {
    let suffix = some!(dtype_suffix(table.dtype()));
    let (vocab, d) = table.dims2()?;
    let n = ids.dim(0)?;
    require!(n > 0 && d > 0 && table.is_contiguous());
    require!(u32_of(vocab).is_some() && u32_of(n * d).is_some());
    let p = mp::EmbeddingParams {
        n: n as u32,
        d: d as u32,
        vocab: vocab as u32,
    };
    let name = format!("embedding_gather_{suffix}");
    let max = some!(ex.pipeline(EMBEDDING, &name)?);
    let tx = d
        .next_multiple_of(32)
        .min(layout::ELEMENTWISE_THREADS as usize)
        .min(max);
    let ids = ids.contiguous()?;
    let out = output(ex, (n, d), table.dtype(), "embedding_out")?; // (n, d)
    let plan = DispatchPlan::new(EMBEDDING, name)
        .read(&ids)?
        .read(table)?
        .write(&out)?
        .params(&p)
        .grid([d.div_ceil(tx), n, 1], [tx, 1, 1]);
    ex.run(plan)?;
    Ok(Some(out))
}
