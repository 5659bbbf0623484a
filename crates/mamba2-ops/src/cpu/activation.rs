//! CPU MLP activations (`swiglu`, `relu_squared`) and the rotary embedding: row-wise maps.
//!
//! Reference: [`crate::activation::swiglu_slow`], [`crate::activation::relu_squared_slow`],
//! [`crate::rotary::rotary_embedding_slow`]. Shapes: swiglu x `(..., 2n)` -> `(..., n)`;
//! relu_squared any shape; rotary x `(batch, seqlen, n_heads, head_dim)`.
//!
//! Each row (the last dimension; a token's heads for the rotary embedding) is loaded to f32 once
//! through its strides (a narrowed view of a wider projection needs no copy as long as the last
//! dimension is unit-stride), mapped and stored in the output dtype. Rows are split over rayon
//! tasks for prefill; small inputs (decode) run on the calling thread in its reused scratch.
//! The rotary embedding computes the `rotary_dim / 2` angles of a token once for all its heads,
//! with the same f32 operations as the reference (`f32::cos` / `f32::sin` of `p · inv_freq`),
//! so in f32 the two agree to the bit.

use super::common::{silu_f32, view, OutVec};
use super::rms_norm::{as_2d, for_rows, row_start};
use crate::{Result, RotaryArgs};
use candle_core::Tensor;

/// `(rows, dim)` of a tensor seen as rows of its last dimension; `None` when empty (the
/// reference handles empty tensors).
fn rows_dim(t: &Tensor) -> Option<(usize, usize)> {
    let dims = t.dims();
    let dim = *dims.last()?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    (dim > 0 && rows > 0).then_some((rows, dim))
}

pub(crate) fn swiglu(x: &Tensor) -> Result<Option<Tensor>> {
    let Some((rows, dim)) = rows_dim(x) else {
        return Ok(None);
    };
    let n = dim / 2;
    let x2 = as_2d(x)?;
    let vdims = x2.dims().to_vec();
    view!(xv = &x2);
    let Some(mut out) = OutVec::new(x.dtype(), rows * n) else {
        return Ok(None);
    };
    let writer = out.writer();
    for_rows(rows, dim, dim, |r, s| {
        xv.load(row_start(&xv, &vdims, r), s);
        let (gate, up) = s.split_at_mut(n);
        gate.iter_mut()
            .zip(up.iter())
            .for_each(|(g, &u)| *g = silu_f32(*g) * u);
        // SAFETY: row r is written by this task only.
        unsafe { writer.store(r * n, gate) };
    });
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    Ok(Some(out.into_tensor(&dims)?))
}

pub(crate) fn relu_squared(x: &Tensor) -> Result<Option<Tensor>> {
    let Some((rows, dim)) = rows_dim(x) else {
        return Ok(None);
    };
    let x2 = as_2d(x)?;
    let vdims = x2.dims().to_vec();
    view!(xv = &x2);
    let Some(mut out) = OutVec::new(x.dtype(), rows * dim) else {
        return Ok(None);
    };
    let writer = out.writer();
    for_rows(rows, dim, dim, |r, s| {
        xv.load(row_start(&xv, &vdims, r), s);
        s.iter_mut().for_each(|v| {
            let p = v.max(0.0);
            *v = p * p;
        });
        // SAFETY: row r is written by this task only.
        unsafe { writer.store(r * dim, s) };
    });
    Ok(Some(out.into_tensor(x.dims())?))
}

pub(crate) fn rotary_embedding(args: &RotaryArgs) -> Result<Option<Tensor>> {
    let dims = args.x.dims().to_vec();
    let [batch, seqlen, n_heads, head_dim] = [dims[0], dims[1], dims[2], dims[3]];
    let (rd, half) = (args.rotary_dim, args.rotary_dim / 2);
    let rows = batch * seqlen;
    if rows * n_heads * head_dim == 0 {
        return Ok(None);
    }
    let inv_freq = crate::rotary::inv_freq(rd, args.theta);
    view!(xv = args.x);
    let Some(mut out) = OutVec::new(args.x.dtype(), rows * n_heads * head_dim) else {
        return Ok(None);
    };
    let writer = out.writer();
    // Scratch per row: cos and sin of the token's angles (rotary_dim / 2 each), one head.
    for_rows(rows, n_heads * head_dim, rd + head_dim, |r, s| {
        let (bi, t) = (r / seqlen, r % seqlen);
        let (trig, head) = s.split_at_mut(rd);
        let (cos, sin) = trig.split_at_mut(half);
        let pos = (args.position_offset + t) as f32;
        for i in 0..half {
            let f = pos * inv_freq[i];
            cos[i] = f.cos();
            sin[i] = f.sin();
        }
        for h in 0..n_heads {
            xv.load(xv.at([bi, t, h, 0]), head);
            let (x1, x2) = head[..rd].split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                // out[i] = a cos + (-b) sin, out[half + i] = b cos + a sin (as the reference)
                x1[i] = a * cos[i] + (-b) * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
            // SAFETY: row r (all its heads) is written by this task only.
            unsafe { writer.store((r * n_heads + h) * head_dim, head) };
        }
    });
    Ok(Some(out.into_tensor(&dims)?))
}
