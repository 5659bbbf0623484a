//! SSD chunked scan: the prefill of the Mamba-2 selective state space model.
//!
//! For each head `h`, with per-step decay `exp(dt_t * A_h)` and input `dt_t * x_t ⊗ B_t`:
//!   state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t B_tᵀ          // (headdim, d_state)
//!   y_t     = state_t C_t + D_h x_t                                // (headdim)
//! computed in chunks of `chunk_size` tokens as in the Mamba-2 paper: a quadratic (attention-like)
//! form inside each chunk, and a linear recurrence over the chunk states between chunks.

use crate::check::{self, groups_to_heads, softplus};
use crate::{Backend, OpError, Result};
use candle_core::{DType, Tensor, D};

const OP: &str = "ssd_chunk_scan";

/// Tensor arguments of [`ssd_chunk_scan`].
#[derive(Debug, Clone, Copy)]
pub struct SsdArgs<'a> {
    /// `(batch, seqlen, nheads, headdim)`.
    pub x: &'a Tensor,
    /// `(batch, seqlen, nheads)`: raw time step, before `dt_bias`, softplus and the limit.
    pub dt: &'a Tensor,
    /// `(nheads)` f32: `A = -exp(A_log)`.
    pub a: &'a Tensor,
    /// `(batch, seqlen, ngroups, d_state)`.
    pub b: &'a Tensor,
    /// `(batch, seqlen, ngroups, d_state)`.
    pub c: &'a Tensor,
    /// `(nheads)`: skip connection `y += D x`.
    pub d: Option<&'a Tensor>,
    /// `(batch, seqlen, nheads, headdim)`: output gate `y *= silu(z)`.
    pub z: Option<&'a Tensor>,
    /// `(nheads)`: added to `dt` before the softplus.
    pub dt_bias: Option<&'a Tensor>,
    /// `(batch, nheads, headdim, d_state)` f32: state before the first token.
    pub initial_state: Option<&'a Tensor>,
    /// `(batch, seqlen)` u32: packed sequences; the state restarts from zero where the id changes.
    pub seq_idx: Option<&'a Tensor>,
}

/// Scalar parameters of [`ssd_chunk_scan`] and of the decode step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SsdParams {
    /// Tokens per chunk (256 in the released checkpoints). Any value >= 1 gives the same result
    /// up to rounding; it only changes how the work is split.
    pub chunk_size: usize,
    /// Apply softplus to `dt + dt_bias` (Mamba-2 always does).
    pub dt_softplus: bool,
    /// Clamp of the processed `dt`: `(min, max)`, `(0, inf)` for no clamp.
    pub dt_limit: (f64, f64),
}

impl Default for SsdParams {
    fn default() -> Self {
        Self {
            chunk_size: 256,
            dt_softplus: true,
            dt_limit: (0.0, f64::INFINITY),
        }
    }
}

pub(crate) struct SsdDims {
    pub batch: usize,
    pub seqlen: usize,
    pub nheads: usize,
    pub headdim: usize,
    pub d_state: usize,
}

pub(crate) fn validate(args: &SsdArgs, params: &SsdParams) -> Result<SsdDims> {
    let [batch, seqlen, nheads, headdim] = check::dims::<4>(OP, "x", args.x)?;
    check::float(OP, "x", args.x)?;
    if seqlen == 0 {
        return Err(OpError::Param {
            op: OP,
            param: "x",
            message: "seqlen must be >= 1".into(),
        });
    }
    check::shape(OP, "dt", args.dt, &[batch, seqlen, nheads])?;
    check::float(OP, "dt", args.dt)?;
    check::same_device(OP, "dt", args.x, args.dt)?;
    check::shape(OP, "a", args.a, &[nheads])?;
    check::f32(OP, "a", args.a)?;
    check::same_device(OP, "a", args.x, args.a)?;
    let [_, _, ngroups, d_state] = check::dims::<4>(OP, "b", args.b)?;
    if ngroups == 0 || nheads % ngroups != 0 {
        return Err(OpError::Shape {
            op: OP,
            arg: "b",
            got: args.b.dims().to_vec(),
            expected: format!("ngroups dividing nheads = {nheads}"),
        });
    }
    check::shape(OP, "b", args.b, &[batch, seqlen, ngroups, d_state])?;
    check::float(OP, "b", args.b)?;
    check::same_device(OP, "b", args.x, args.b)?;
    check::shape(OP, "c", args.c, &[batch, seqlen, ngroups, d_state])?;
    check::float(OP, "c", args.c)?;
    check::same_device(OP, "c", args.x, args.c)?;
    check::opt(OP, "d", args.x, args.d, &[nheads])?;
    check::opt(OP, "z", args.x, args.z, &[batch, seqlen, nheads, headdim])?;
    check::opt(OP, "dt_bias", args.x, args.dt_bias, &[nheads])?;
    if let Some(s) = args.initial_state {
        check::shape(OP, "initial_state", s, &[batch, nheads, headdim, d_state])?;
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
    validate_params(OP, params)?;
    Ok(SsdDims {
        batch,
        seqlen,
        nheads,
        headdim,
        d_state,
    })
}

pub(crate) fn validate_params(op: &'static str, params: &SsdParams) -> Result<()> {
    if params.chunk_size == 0 {
        return Err(OpError::Param {
            op,
            param: "chunk_size",
            message: "must be >= 1".into(),
        });
    }
    let (lo, hi) = params.dt_limit;
    if lo.is_nan() || hi.is_nan() || lo > hi {
        return Err(OpError::Param {
            op,
            param: "dt_limit",
            message: format!("({lo}, {hi}) is not a range"),
        });
    }
    Ok(())
}

/// SSD chunked scan. Returns `(y, final_state)`: `y` is `(batch, seqlen, nheads, headdim)` in
/// the dtype of `x`, `final_state` is `(batch, nheads, headdim, d_state)` f32.
pub fn ssd_chunk_scan(args: &SsdArgs, params: &SsdParams) -> Result<(Tensor, Tensor)> {
    ssd_chunk_scan_with(args, params, Backend::Auto)
}

/// [`ssd_chunk_scan`] with an explicit backend choice.
pub fn ssd_chunk_scan_with(
    args: &SsdArgs,
    params: &SsdParams,
    backend: Backend,
) -> Result<(Tensor, Tensor)> {
    validate(args, params)?;
    crate::dispatch!(
        backend,
        args.x.device(),
        ssd_chunk_scan(args, params),
        ssd_chunk_scan_slow(args, params)
    )
}

/// `dt -> clamp(softplus(dt + dt_bias), lo, hi)` in f32; shared by prefill and decode so both
/// paths see the same time steps.
pub(crate) fn process_dt(
    dt: &Tensor,
    dt_bias: Option<&Tensor>,
    params: &SsdParams,
) -> candle_core::Result<Tensor> {
    let mut dt = dt.to_dtype(DType::F32)?;
    if let Some(bias) = dt_bias {
        dt = dt.broadcast_add(&bias.to_dtype(DType::F32)?)?;
    }
    if params.dt_softplus {
        dt = softplus(&dt)?;
    }
    let (lo, hi) = params.dt_limit;
    if lo > 0.0 || hi < f64::INFINITY {
        dt = dt.clamp(lo, hi.min(f32::MAX as f64))?;
    }
    Ok(dt)
}

/// `segsum(a)[.., i, j] = a[j+1] + ... + a[i]` for `j <= i`, `-inf` above the diagonal.
/// Summing the masked inputs (rather than subtracting two cumulative sums) keeps full f32
/// precision for long chunks.
fn segsum(a: &Tensor) -> candle_core::Result<Tensor> {
    let t = a.dim(D::Minus1)?;
    let dev = a.device();
    let mut dims = a.dims().to_vec();
    dims.push(t);
    // Built transposed, xt[.., j, i] = a[i] for j < i, so the sum over i runs along the last
    // dimension: Candle implements cumsum as a matmul, which needs a unit inner stride.
    let xt = a.unsqueeze(D::Minus2)?.broadcast_as(dims.as_slice())?;
    let strictly_upper =
        Tensor::triu2(t, DType::F32, dev)?.sub(&Tensor::eye(t, DType::F32, dev)?)?;
    let xt = xt.broadcast_mul(&strictly_upper)?.contiguous()?;
    let s = xt.cumsum(D::Minus1)?.t()?.contiguous()?; // s[i, j] = sum_{j < k <= i} a[k]
    let lower = Tensor::tril2(t, DType::U8, dev)?;
    let neg_inf = Tensor::full(f32::NEG_INFINITY, (t, t), dev)?;
    lower
        .broadcast_as(s.shape())?
        .where_cond(&s, &neg_inf.broadcast_as(s.shape())?)
}

/// Batched matmul over any number of leading dimensions (Candle's CPU matmul takes at most two).
pub(crate) fn bmm(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (ad, bd) = (a.dims(), b.dims());
    let r = ad.len();
    let batch: usize = ad[..r - 2].iter().product();
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    let a3 = a.contiguous()?.reshape((batch, m, k))?;
    let b3 = b.contiguous()?.reshape((batch, k, n))?;
    let mut out = ad[..r - 2].to_vec();
    out.extend([m, n]);
    a3.matmul(&b3)?.reshape(out)
}

/// Plain-tensor reference of [`ssd_chunk_scan`], following the minimal SSD algorithm of the
/// Mamba-2 paper. Everything is computed in f32.
pub fn ssd_chunk_scan_slow(args: &SsdArgs, params: &SsdParams) -> Result<(Tensor, Tensor)> {
    let dims = validate(args, params)?;
    if let Some(seq_idx) = args.seq_idx {
        return scan_by_segments(args, params, seq_idx);
    }
    let SsdDims {
        batch,
        seqlen,
        nheads,
        headdim,
        d_state,
        ..
    } = dims;
    let dev = args.x.device();
    let t = params.chunk_size;
    let nchunks = seqlen.div_ceil(t);
    let pad = nchunks * t - seqlen;

    let x = args.x.to_dtype(DType::F32)?; // (batch, seqlen, nheads, headdim)
    let dt = process_dt(args.dt, args.dt_bias, params)?; // (batch, seqlen, nheads)
    let b = groups_to_heads(&args.b.to_dtype(DType::F32)?, 2, nheads)?; // (batch, seqlen, nheads, d_state)
    let c = groups_to_heads(&args.c.to_dtype(DType::F32)?, 2, nheads)?; // (batch, seqlen, nheads, d_state)
                                                                        // Padding tokens get dt = 0: decay 1 and no input, so they change neither outputs nor state.
    let pad_seq = |v: &Tensor| -> candle_core::Result<Tensor> {
        if pad == 0 {
            Ok(v.clone())
        } else {
            v.pad_with_zeros(1, 0, pad)
        }
    };
    let xdt = pad_seq(&x.broadcast_mul(&dt.unsqueeze(3)?)?)?; // (batch, L, nheads, headdim)
    let dt_p = pad_seq(&dt)?; // (batch, L, nheads)
    let b = pad_seq(&b)?;
    let c = pad_seq(&c)?;

    // Chunked views, heads before time: (batch, nchunks, nheads, t, ·)
    let chunked = |v: &Tensor, last: usize| -> candle_core::Result<Tensor> {
        v.reshape((batch, nchunks, t, nheads, last))?
            .transpose(2, 3)?
            .contiguous()
    };
    let xdt = chunked(&xdt, headdim)?; // (batch, nchunks, nheads, t, headdim)
    let b = chunked(&b, d_state)?; // (batch, nchunks, nheads, t, d_state)
    let c = chunked(&c, d_state)?; // (batch, nchunks, nheads, t, d_state)
    let a_dt = dt_p
        .reshape((batch, nchunks, t, nheads))?
        .transpose(2, 3)?
        .broadcast_mul(&args.a.reshape((1, 1, nheads, 1))?)?
        .contiguous()?; // (batch, nchunks, nheads, t)
    let a_cumsum = a_dt.cumsum(D::Minus1)?; // (batch, nchunks, nheads, t)

    // 1. Intra-chunk outputs: y[l] = sum_{s <= l} (C_l · B_s) exp(segsum[l, s]) dt_s x_s
    let decay_in = segsum(&a_dt)?.exp()?; // (batch, nchunks, nheads, t, t)
    let cb = bmm(&c, &b.t()?)?; // (batch, nchunks, nheads, t, t)
    let y_diag = bmm(&(cb * decay_in)?, &xdt)?; // (batch, nchunks, nheads, t, headdim)

    // 2. Each chunk's own contribution to the state at its end.
    let a_last = a_cumsum.narrow(3, t - 1, 1)?; // (batch, nchunks, nheads, 1)
    let decay_to_end = a_last.broadcast_sub(&a_cumsum)?.exp()?; // (batch, nchunks, nheads, t)
    let chunk_states = xdt.broadcast_mul(&decay_to_end.unsqueeze(4)?)?.t()?;
    let chunk_states = bmm(&chunk_states, &b)?; // (batch, nchunks, nheads, headdim, d_state)

    // 3. State passing across chunks: states entering each chunk, and the final state.
    let init = match args.initial_state {
        Some(s) => s.unsqueeze(1)?, // (batch, 1, nheads, headdim, d_state)
        None => Tensor::zeros((batch, 1, nheads, headdim, d_state), DType::F32, dev)?,
    };
    let states = Tensor::cat(&[&init, &chunk_states], 1)?; // (batch, nchunks + 1, nheads, headdim, d_state)
    let chunk_decay = a_last
        .squeeze(3)?
        .transpose(1, 2)?
        .pad_with_zeros(2, 1, 0)?; // (batch, nheads, nchunks + 1)
    let decay_chunks = segsum(&chunk_decay.contiguous()?)?.exp()?; // (batch, nheads, nchunks + 1, nchunks + 1)
    let flat = states.permute((0, 2, 1, 3, 4))?.reshape((
        batch,
        nheads,
        nchunks + 1,
        headdim * d_state,
    ))?; // (batch, nheads, nchunks + 1, headdim * d_state)
    let passed = bmm(&decay_chunks, &flat)?; // (batch, nheads, nchunks + 1, headdim * d_state)
    let passed = passed
        .reshape((batch, nheads, nchunks + 1, headdim, d_state))?
        .permute((0, 2, 1, 3, 4))?; // (batch, nchunks + 1, nheads, headdim, d_state)
    let entering = passed.narrow(1, 0, nchunks)?.contiguous()?; // (batch, nchunks, nheads, headdim, d_state)
    let final_state = passed.narrow(1, nchunks, 1)?.squeeze(1)?.contiguous()?; // (batch, nheads, headdim, d_state)

    // 4. Output from the state entering each chunk: y[l] += exp(a_cumsum[l]) C_l · state
    let decay_from_start = a_cumsum.exp()?.unsqueeze(4)?; // (batch, nchunks, nheads, t, 1)
    let y_off = bmm(&c, &entering.t()?)?.broadcast_mul(&decay_from_start)?; // (batch, nchunks, nheads, t, headdim)

    let y = (y_diag + y_off)?
        .transpose(2, 3)?
        .reshape((batch, nchunks * t, nheads, headdim))?
        .narrow(1, 0, seqlen)?; // (batch, seqlen, nheads, headdim)
    let y = finish_output(y, &x, args.d, args.z)?;
    Ok((y.to_dtype(args.x.dtype())?, final_state))
}

/// `y + D x`, then the optional gate `y * silu(z)`; all f32.
pub(crate) fn finish_output(
    y: Tensor,
    x: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let nheads = x.dim(x.rank() - 2)?;
    let mut y = y;
    if let Some(d) = d {
        let mut shape = vec![1; x.rank()];
        shape[x.rank() - 2] = nheads;
        y = (y + x.broadcast_mul(&d.to_dtype(DType::F32)?.reshape(shape)?)?)?;
    }
    if let Some(z) = z {
        y = (y * z.to_dtype(DType::F32)?.silu()?)?;
    }
    Ok(y)
}

/// Packed sequences: the reference on each run of equal `seq_idx`, the initial state applying to
/// the first run only; the final state is that of the last run.
fn scan_by_segments(
    args: &SsdArgs,
    params: &SsdParams,
    seq_idx: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let ids = seq_idx.to_vec2::<u32>()?;
    let mut ys = Vec::with_capacity(ids.len());
    let mut finals = Vec::with_capacity(ids.len());
    for (bi, row) in ids.iter().enumerate() {
        let row_of = |t: &Tensor| t.narrow(0, bi, 1);
        let mut initial = args.initial_state.map(row_of).transpose()?;
        let mut last = None;
        let mut parts = Vec::new();
        for (start, len) in crate::conv1d::segments(row) {
            let seg = |t: &Tensor| row_of(t).and_then(|t| t.narrow(1, start, len));
            let (x, dt, b, c) = (seg(args.x)?, seg(args.dt)?, seg(args.b)?, seg(args.c)?);
            let z = args.z.map(seg).transpose()?;
            let init = initial.take();
            let seg_args = SsdArgs {
                x: &x,
                dt: &dt,
                b: &b,
                c: &c,
                z: z.as_ref(),
                initial_state: init.as_ref(),
                seq_idx: None,
                ..*args
            };
            let (y, s) = ssd_chunk_scan_slow(&seg_args, params)?;
            parts.push(y);
            last = Some(s);
        }
        ys.push(Tensor::cat(&parts, 1)?);
        finals.push(last.expect("seqlen >= 1 gives at least one segment"));
    }
    Ok((Tensor::cat(&ys, 0)?, Tensor::cat(&finals, 0)?))
}
