//! Plans of the Mamba-2 mixer kernels: causal conv1d (`conv1d.metal`), the SSD chunk scan
//! (`ssd.metal`), the selective state update (`state_update.metal`), the RMSNorms
//! (`rms_norm.metal`) and the projections (`matvec.metal`). Each function returns `Ok(None)` when its preconditions do not hold (the
//! dispatcher then runs the reference); arguments have already been validated by the op.

use super::{dtype_suffix, f32_param, flag, output, require, rows_arg, some, u32_of};
use super::{DispatchPlan, PlanExecutor};
use crate::metal_params::{self as mp, layout};
use crate::{Conv1dArgs, GatedRmsNormArgs, Result, SsdArgs, SsdParams, StateUpdateArgs};
use candle_core::{DType, Tensor};

const CONV1D: &str = "conv1d.metal";
const SSD: &str = "ssd.metal";
const STATE_UPDATE: &str = "state_update.metal";
const RMS_NORM: &str = "rms_norm.metal";
const MATVEC: &str = "matvec.metal";

/// `causal_conv1d_fwd_<dtype>`: one thread per channel walking 32 tokens with the window in
/// registers; `(y, final conv state)`.
pub fn causal_conv1d(ex: &dyn PlanExecutor, args: &Conv1dArgs) -> Result<Option<(Tensor, Tensor)>> {
    let suffix = some!(dtype_suffix(args.x.dtype()));
    let (batch, seqlen, channels) = args.x.dims3()?;
    let d_conv = args.weight.dim(1)?;
    require!(mp::supports::conv1d(d_conv));
    let p = mp::Conv1dParams {
        batch: some!(u32_of(batch)),
        seqlen: some!(u32_of(seqlen)),
        channels: some!(u32_of(channels)),
        d_conv: d_conv as u32,
        has_bias: flag(args.bias.is_some()),
        has_init: flag(args.initial_state.is_some()),
        has_seq_idx: flag(args.seq_idx.is_some()),
        silu: flag(args.silu),
    };
    let name = format!("causal_conv1d_fwd_{suffix}");
    let tg = [layout::CONV_CHANNELS_PER_GROUP as usize, 1, 1];
    require!(some!(ex.pipeline(CONV1D, &name)?) >= tg[0]);
    let x = args.x.contiguous()?;
    let w = f32_param(args.weight)?;
    let bias = args.bias.map(f32_param).transpose()?;
    let init = args.initial_state.map(|t| t.contiguous()).transpose()?;
    let seq = args.seq_idx.map(|t| t.contiguous()).transpose()?;
    let y = output(ex, (batch, seqlen, channels), x.dtype(), "conv1d_y")?; // (batch, seqlen, channels)
    let state = output(ex, (batch, channels, d_conv), DType::F32, "conv1d_state")?; // (batch, channels, d_conv)
    let groups = [
        channels.div_ceil(layout::CONV_CHANNELS_PER_GROUP as usize),
        seqlen.div_ceil(layout::CONV_TOKENS_PER_THREAD as usize),
        batch,
    ];
    let plan = DispatchPlan::new(CONV1D, name)
        .read(&x)?
        .read(&w)?
        .read_opt(bias.as_ref(), &w)?
        .read_opt(init.as_ref(), &w)?
        .read_opt(seq.as_ref(), &w)?
        .write(&y)?
        .write(&state)?
        .params(&p)
        .grid(groups, tg);
    ex.run(plan)?;
    Ok(Some((y, state)))
}

/// `causal_conv1d_update_<dtype>`: one token, the conv state `(batch, channels, d_conv)` f32
/// shifted in place; returns `y` `(batch, channels)`.
pub fn causal_conv1d_update(
    ex: &dyn PlanExecutor,
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<Option<Tensor>> {
    let suffix = some!(dtype_suffix(x.dtype()));
    let (batch, channels) = x.dims2()?;
    let d_conv = weight.dim(1)?;
    require!(mp::supports::conv1d(d_conv));
    let p = mp::ConvUpdateParams {
        batch: some!(u32_of(batch)),
        channels: some!(u32_of(channels)),
        d_conv: d_conv as u32,
        has_bias: flag(bias.is_some()),
        silu: flag(silu),
    };
    let name = format!("causal_conv1d_update_{suffix}");
    let max = some!(ex.pipeline(CONV1D, &name)?);
    let x = x.contiguous()?;
    let w = f32_param(weight)?;
    let bias = bias.map(f32_param).transpose()?;
    let y = output(ex, (batch, channels), x.dtype(), "conv1d_update_y")?; // (batch, channels)
    let tg = channels.min(256).min(max);
    // conv_state is contiguous (validated): updated in place
    let plan = DispatchPlan::new(CONV1D, name)
        .read(&x)?
        .write(conv_state)?
        .read(&w)?
        .read_opt(bias.as_ref(), &w)?
        .write(&y)?
        .params(&p)
        .grid([channels.div_ceil(tg), batch, 1], [tg, 1, 1]);
    ex.run(plan)?;
    Ok(Some(y))
}

/// `conv_states_varlen_<dtype>`: the last `d_conv` inputs of each packed sequence, as conv
/// states `(nseq, channels, d_conv)` f32.
pub fn conv_states_varlen(
    ex: &dyn PlanExecutor,
    x: &Tensor,
    cu_seqlens: &[usize],
    d_conv: usize,
) -> Result<Option<Tensor>> {
    let suffix = some!(dtype_suffix(x.dtype()));
    let (total, channels) = x.dims2()?;
    let nseq = cu_seqlens.len() - 1;
    let cu: Vec<u32> = some!(cu_seqlens
        .iter()
        .map(|&v| u32_of(v))
        .collect::<Option<Vec<u32>>>());
    let p = mp::ConvVarlenParams {
        nseq: some!(u32_of(nseq)),
        channels: some!(u32_of(channels)),
        d_conv: some!(u32_of(d_conv)),
        total: some!(u32_of(total)),
    };
    let name = format!("conv_states_varlen_{suffix}");
    let max = some!(ex.pipeline(CONV1D, &name)?);
    let x = x.contiguous()?;
    let cu = Tensor::from_vec(cu, nseq + 1, x.device())?;
    let states = output(ex, (nseq, channels, d_conv), DType::F32, "conv_states")?; // (nseq, channels, d_conv)
    let tg = channels.min(256).min(max);
    let plan = DispatchPlan::new(CONV1D, name)
        .read(&x)?
        .read(&cu)?
        .write(&states)?
        .params(&p)
        .grid([channels.div_ceil(tg), nseq, 1], [tg, 1, 1]);
    ex.run(plan)?;
    Ok(Some(states))
}

/// The SSD chunk scan in two launches: `ssd_chunk_cb_<dtype>` (C Bᵀ per batch, group and
/// chunk, shared by the heads of a group) into a scratch buffer, then `ssd_chunk_scan_<dtype>`
/// (the scan over chunks); `(y, final state)`.
pub fn ssd_chunk_scan(
    ex: &dyn PlanExecutor,
    args: &SsdArgs,
    params: &SsdParams,
) -> Result<Option<(Tensor, Tensor)>> {
    let dtype = args.x.dtype();
    let suffix = some!(dtype_suffix(dtype));
    let (batch, seqlen, nheads, headdim) = args.x.dims4()?;
    let (_, _, ngroups, d_state) = args.b.dims4()?;
    // 16-row threadgroups and 8-wide d_state tiles (simdgroup_float8x8)
    require!(mp::supports::ssd_chunk_scan(headdim, d_state));
    // the kernel reads dt, B, C, z in the activation dtype
    for t in [Some(args.dt), Some(args.b), Some(args.c), args.z]
        .into_iter()
        .flatten()
    {
        require!(t.dtype() == dtype);
    }
    let (dt_clamp, dt_min, dt_max) = mp::dt_clamp(params.dt_limit);
    let p = mp::SsdScanParams {
        batch: some!(u32_of(batch)),
        seqlen: some!(u32_of(seqlen)),
        nheads: some!(u32_of(nheads)),
        headdim: some!(u32_of(headdim)),
        ngroups: some!(u32_of(ngroups)),
        d_state: some!(u32_of(d_state)),
        has_d: flag(args.d.is_some()),
        has_z: flag(args.z.is_some()),
        has_dt_bias: flag(args.dt_bias.is_some()),
        has_init: flag(args.initial_state.is_some()),
        has_seq_idx: flag(args.seq_idx.is_some()),
        dt_softplus: flag(params.dt_softplus),
        dt_clamp,
        dt_min,
        dt_max,
    };
    let (cb_name, scan_name) = (
        format!("ssd_chunk_cb_{suffix}"),
        format!("ssd_chunk_scan_{suffix}"),
    );
    let tg = [layout::SSD_THREADS as usize, 1, 1];
    require!(some!(ex.pipeline(SSD, &cb_name)?) >= tg[0]);
    require!(some!(ex.pipeline(SSD, &scan_name)?) >= tg[0]);
    let c = |t: &Tensor| t.contiguous();
    let (x, dt, b, cm) = (c(args.x)?, c(args.dt)?, c(args.b)?, c(args.c)?);
    let a = f32_param(args.a)?;
    let d = args.d.map(f32_param).transpose()?;
    let z = args.z.map(c).transpose()?;
    let dt_bias = args.dt_bias.map(f32_param).transpose()?;
    let init = args.initial_state.map(c).transpose()?;
    let seq = args.seq_idx.map(c).transpose()?;
    let y = output(ex, (batch, seqlen, nheads, headdim), dtype, "ssd_y")?; // (batch, seqlen, nheads, headdim)
    let state = output(
        ex,
        (batch, nheads, headdim, d_state),
        DType::F32,
        "ssd_state",
    )?; // (batch, nheads, headdim, d_state)
    let chunk = layout::SSD_CHUNK as usize;
    let nchunks = seqlen.div_ceil(chunk);
    let cb = output(
        ex,
        (batch, ngroups, nchunks, chunk, chunk),
        DType::F32,
        "ssd_cb",
    )?; // (batch, ngroups, nchunks, chunk, chunk)
    let stage1 = DispatchPlan::new(SSD, cb_name)
        .read(&b)?
        .read(&cm)?
        .write(&cb)?
        .params(&p)
        .grid([nchunks, ngroups, batch], tg);
    ex.run(stage1)?;
    let stage2 = DispatchPlan::new(SSD, scan_name)
        .read(&x)?
        .read(&dt)?
        .read(&a)?
        .read(&b)?
        .read(&cm)?
        .read_opt(d.as_ref(), &a)?
        .read_opt(z.as_ref(), &a)?
        .read_opt(dt_bias.as_ref(), &a)?
        .read_opt(init.as_ref(), &a)?
        .read_opt(seq.as_ref(), &a)?
        .write(&y)?
        .write(&state)?
        .read(&cb)?
        .params(&p)
        .grid([headdim / layout::SSD_ROWS as usize, nheads, batch], tg);
    ex.run(stage2)?;
    Ok(Some((y, state)))
}

/// `selective_state_update_<dtype>`: one token, the f32 state updated in place, one simdgroup
/// per headdim row; returns `y` `(batch, nheads, headdim)`.
pub fn selective_state_update(
    ex: &dyn PlanExecutor,
    args: &StateUpdateArgs,
    params: &SsdParams,
) -> Result<Option<Tensor>> {
    let dtype = args.x.dtype();
    let suffix = some!(dtype_suffix(dtype));
    let (batch, nheads, headdim) = args.x.dims3()?;
    let (_, ngroups, d_state) = args.b.dims3()?;
    require!(mp::supports::state_update(d_state));
    for t in [Some(args.dt), Some(args.b), Some(args.c), args.z]
        .into_iter()
        .flatten()
    {
        require!(t.dtype() == dtype);
    }
    let (dt_clamp, dt_min, dt_max) = mp::dt_clamp(params.dt_limit);
    let p = mp::StateUpdateParams {
        batch: some!(u32_of(batch)),
        nheads: some!(u32_of(nheads)),
        headdim: some!(u32_of(headdim)),
        ngroups: some!(u32_of(ngroups)),
        d_state: d_state as u32,
        has_d: flag(args.d.is_some()),
        has_z: flag(args.z.is_some()),
        has_dt_bias: flag(args.dt_bias.is_some()),
        dt_softplus: flag(params.dt_softplus),
        dt_clamp,
        dt_min,
        dt_max,
    };
    let name = format!("selective_state_update_{suffix}");
    let rows = layout::SSU_ROWS as usize;
    require!(some!(ex.pipeline(STATE_UPDATE, &name)?) >= 32 * rows);
    let c = |t: &Tensor| t.contiguous();
    let (x, dt, b, cm) = (c(args.x)?, c(args.dt)?, c(args.b)?, c(args.c)?);
    let a = f32_param(args.a)?;
    let d = args.d.map(f32_param).transpose()?;
    let z = args.z.map(c).transpose()?;
    let dt_bias = args.dt_bias.map(f32_param).transpose()?;
    let y = output(ex, (batch, nheads, headdim), dtype, "ssu_y")?; // (batch, nheads, headdim)
                                                                   // the state is contiguous (validated): updated in place
    let plan = DispatchPlan::new(STATE_UPDATE, name)
        .write(args.state)?
        .read(&x)?
        .read(&dt)?
        .read(&a)?
        .read(&b)?
        .read(&cm)?
        .read_opt(d.as_ref(), &a)?
        .read_opt(z.as_ref(), &a)?
        .read_opt(dt_bias.as_ref(), &a)?
        .write(&y)?
        .params(&p)
        .grid([headdim.div_ceil(rows), nheads, batch], [32 * rows, 1, 1]);
    ex.run(plan)?;
    Ok(Some(y))
}

/// `gated_rms_norm_<dtype>`: one threadgroup per (row, group).
pub fn gated_rms_norm(ex: &dyn PlanExecutor, args: &GatedRmsNormArgs) -> Result<Option<Tensor>> {
    let dtype = args.x.dtype();
    let suffix = some!(dtype_suffix(dtype));
    if let Some(z) = args.z {
        require!(z.dtype() == dtype);
    }
    let dims = args.x.dims().to_vec();
    let dim = *some!(dims.last());
    let rows = args.x.elem_count() / dim.max(1);
    require!(rows > 0);
    let p = mp::GatedRmsNormParams {
        rows: some!(u32_of(rows)),
        dim: some!(u32_of(dim)),
        group_size: some!(u32_of(args.group_size)),
        has_z: flag(args.z.is_some()),
        norm_before_gate: flag(args.norm_before_gate),
        eps: args.eps as f32,
    };
    let name = format!("gated_rms_norm_{suffix}");
    let max = some!(ex.pipeline(RMS_NORM, &name)?);
    let x = args.x.contiguous()?;
    let z = args.z.map(|t| t.contiguous()).transpose()?;
    let w = f32_param(args.weight)?;
    let out = output(ex, dims.as_slice(), dtype, "gated_rms_norm")?; // like x
    let tg = args.group_size.next_multiple_of(32).min(256).min(max);
    let plan = DispatchPlan::new(RMS_NORM, name)
        .read(&x)?
        .read_opt(z.as_ref(), &w)?
        .read(&w)?
        .write(&out)?
        .params(&p)
        .grid([dim / args.group_size, rows, 1], [tg, 1, 1]);
    ex.run(plan)?;
    Ok(Some(out))
}

/// `rms_norm_residual[_f32res]_<dtype>`: one threadgroup per row; `(normed, residual out)`.
pub fn rms_norm_residual(
    ex: &dyn PlanExecutor,
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    residual_in_fp32: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    let dtype = x.dtype();
    let suffix = some!(dtype_suffix(dtype));
    // normed comes back in the weight's dtype: the kernel writes the dtype of x
    require!(weight.dtype() == dtype);
    let res_dtype = if residual_in_fp32 { DType::F32 } else { dtype };
    if let Some(r) = residual {
        require!(r.dtype() == res_dtype);
    }
    let dims = x.dims().to_vec();
    let dim = *some!(dims.last());
    let rows = x.elem_count() / dim.max(1);
    require!(rows > 0);
    let p = mp::RmsNormResidualParams {
        rows: some!(u32_of(rows)),
        dim: some!(u32_of(dim)),
        has_residual: flag(residual.is_some()),
        eps: eps as f32,
    };
    let name = if res_dtype == dtype {
        format!("rms_norm_residual_{suffix}")
    } else {
        format!("rms_norm_residual_f32res_{suffix}")
    };
    let max = some!(ex.pipeline(RMS_NORM, &name)?);
    let x = x.contiguous()?;
    let r = residual.map(|t| t.contiguous()).transpose()?;
    // read in x's dtype by the kernel (the model keeps block norms in the model dtype)
    let w = weight.contiguous()?;
    let normed = output(ex, dims.as_slice(), dtype, "rms_norm_normed")?; // like x
    let res_out = output(ex, dims.as_slice(), res_dtype, "rms_norm_residual")?; // like x
    let tg = dim.next_multiple_of(32).min(1024).min(max);
    let plan = DispatchPlan::new(RMS_NORM, name)
        .read(&x)?
        // absent: bound to a buffer of the residual dtype R (never read)
        .read_opt(r.as_ref(), &res_out)?
        .read(&w)?
        .write(&normed)?
        .write(&res_out)?
        .params(&p)
        .grid([rows, 1, 1], [tg, 1, 1]);
    ex.run(plan)?;
    Ok(Some((normed, res_out)))
}

/// The projections: `linear_matvec_<dtype>` for decode rows (at most
/// [`layout::MV_MAX_ROWS`]), Candle's matmul in the activation dtype for more (the reference
/// would round-trip through f32).
pub fn linear(
    ex: &dyn PlanExecutor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if let Some(y) = linear_matvec(ex, x, weight, bias)? {
        return Ok(Some(y));
    }
    Ok(Some(crate::linear::linear_native(x, weight, bias)?))
}

/// `linear_matvec_<dtype>`: `y (..., n_out) = x (..., k) · weightᵀ (+ bias)` for at most
/// [`layout::MV_MAX_ROWS`] rows, the weight read once; `None` outside its preconditions (more
/// rows, a strided weight, sizes beyond u32).
pub fn linear_matvec(
    ex: &dyn PlanExecutor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let suffix = some!(dtype_suffix(x.dtype()));
    let (n_out, k) = weight.dims2()?;
    let rows = x.elem_count() / k.max(1);
    require!(mp::supports::matvec(rows) && k > 0 && n_out > 0);
    // the weight is read in place; copying a strided one would cost more than the GEMM
    require!(weight.is_contiguous() && weight.dtype() == x.dtype());
    // the kernel reads the bias in the activation dtype (no per-call cast)
    require!(bias.is_none_or(|b| b.dtype() == x.dtype()));
    require!(u32_of(n_out * k).is_some());
    let p = mp::MatvecParams {
        rows: rows as u32,
        k: some!(u32_of(k)),
        n_out: some!(u32_of(n_out)),
        has_bias: flag(bias.is_some()),
    };
    let name = format!("linear_matvec_{suffix}");
    let threads = 32 * layout::MV_SIMDS as usize;
    require!(some!(ex.pipeline(MATVEC, &name)?) >= threads);
    let xc = x.contiguous()?;
    let b = bias.map(|t| t.contiguous()).transpose()?;
    let mut dims = x.dims().to_vec();
    *some!(dims.last_mut()) = n_out;
    let y = output(ex, dims.as_slice(), x.dtype(), "matvec_y")?; // (..., n_out)
    let per_group = (layout::MV_SIMDS * layout::MV_OUTS_PER_SIMD) as usize;
    let plan = DispatchPlan::new(MATVEC, name)
        .read(&xc)?
        .read(weight)?
        .read_opt(b.as_ref(), weight)?
        .write(&y)?
        .params(&p)
        .grid([n_out.div_ceil(per_group), 1, 1], [threads, 1, 1]);
    ex.run(plan)?;
    Ok(Some(y))
}

/// `linear_matvec_gated_norm_<dtype>`: `linear(gated_rms_norm(norm), weight, bias)` in one
/// launch, the grouped gated RMSNorm computed in front of the matrix-vector product (the decode
/// out-projection); `None` outside its preconditions (those of [`linear_matvec`], at most
/// [`layout::MV_MAX_GROUPS`] groups, z present in the activation dtype).
pub fn linear_gated_norm(
    ex: &dyn PlanExecutor,
    norm: &GatedRmsNormArgs,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let x = norm.x;
    let z = some!(norm.z);
    let suffix = some!(dtype_suffix(x.dtype()));
    let (n_out, k) = weight.dims2()?;
    let rows = x.elem_count() / k.max(1);
    require!(mp::supports::matvec_gated_norm(rows, k, norm.group_size) && n_out > 0);
    require!(z.dtype() == x.dtype() && z.dims() == x.dims());
    require!(weight.is_contiguous() && weight.dtype() == x.dtype());
    require!(bias.is_none_or(|b| b.dtype() == x.dtype()));
    require!(u32_of(n_out * k).is_some());
    let p = mp::MatvecGatedNormParams {
        rows: rows as u32,
        k: some!(u32_of(k)),
        n_out: some!(u32_of(n_out)),
        has_bias: flag(bias.is_some()),
        group_size: norm.group_size as u32,
        norm_before_gate: flag(norm.norm_before_gate),
        eps: norm.eps as f32,
        z_stride: 0,
    };
    let name = format!("linear_matvec_gated_norm_{suffix}");
    let threads = 32 * layout::MV_SIMDS as usize;
    require!(some!(ex.pipeline(MATVEC, &name)?) >= threads);
    let xc = x.contiguous()?;
    // z (a view of the in-projection row) is read in place through its row stride
    let z2 = if z.rank() == 2 {
        z.clone()
    } else {
        z.reshape((rows, k))? // (rows, k): a view when z is contiguous
    };
    let (zb, z_stride) = some!(rows_arg(&z2)?);
    let p = mp::MatvecGatedNormParams { z_stride, ..p };
    let nw = f32_param(norm.weight)?;
    let b = bias.map(|t| t.contiguous()).transpose()?;
    let mut dims = x.dims().to_vec();
    *some!(dims.last_mut()) = n_out;
    let y = output(ex, dims.as_slice(), x.dtype(), "matvec_gated_norm_y")?; // (..., n_out)
    let per_group = (layout::MV_SIMDS * layout::MV_OUTS_PER_SIMD) as usize;
    let plan = DispatchPlan::new(MATVEC, name)
        .read(&xc)?
        .push(zb)
        .read(&nw)?
        .read(weight)?
        .read_opt(b.as_ref(), weight)?
        .write(&y)?
        .params(&p)
        .grid([n_out.div_ceil(per_group), 1, 1], [threads, 1, 1]);
    ex.run(plan)?;
    Ok(Some(y))
}
