//! CUDA SSD chunked scan, the Mamba-2 prefill (`kernels/cuda/ssd.cu`): chunk states, state
//! passing and chunk scan, three launches, tensor cores for the chunk products.

use super::launch::{
    allow_smem, cfg, code, device, func, launch, opt_ptr, output, ptr, ptx, rows, suffix, Result,
};
use super::state_update::dt_params;
use crate::{SsdArgs, SsdParams};
use candle_core::{DType, Tensor};

/// Tokens per chunk inside the kernels (`SSD_L`); independent of `SsdParams::chunk_size`, which
/// only changes how the reference splits the work.
const L: usize = 64;
const THREADS: u32 = 128;

fn align128(v: usize) -> usize {
    v.div_ceil(128) * 128
}

/// `WT<T>::PAD` of ssd.cu: one 16-byte row padding against bank conflicts.
fn pad(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

/// `chunk_state_smem<T>` of ssd.cu.
fn chunk_state_smem(dtype: DType, p: usize, n: usize) -> usize {
    let (s, pd) = (dtype.size_in_bytes(), pad(dtype));
    align128(L * 4) * 2 + align128(L * (p + pd) * s) + align128(L * (n + pd) * s)
}

/// `chunk_scan_smem<T>` of ssd.cu.
fn chunk_scan_smem(dtype: DType, p: usize, n: usize) -> usize {
    let (s, pd) = (dtype.size_in_bytes(), pad(dtype));
    align128(L * 4) * 3
        + align128(L * (n + pd) * s)
        + align128(L.max(p) * (n + pd) * s)
        + align128(L * (p + pd) * s)
        + align128(L * (L + pd) * s)
        + align128(L * (L.max(p) + 4) * 4)
}

pub(crate) fn ssd_chunk_scan(
    args: &SsdArgs,
    params: &SsdParams,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(dev) = device(args.x) else {
        return Ok(None);
    };
    let (batch, seqlen, nheads, headdim) = args.x.dims4()?;
    let (_, _, ngroups, d_state) = args.b.dims4()?;
    let dtype = args.x.dtype();
    let Some(sfx) = suffix(dtype) else {
        return Ok(None);
    };
    // Preconditions of the tensor-core path: 16-multiples for the mma tiles, one activation
    // dtype for the mma operands, no packed sequences (the reference handles seq_idx).
    if args.seq_idx.is_some()
        || !headdim.is_multiple_of(16)
        || !d_state.is_multiple_of(16)
        || args.b.dtype() != dtype
        || args.c.dtype() != dtype
        || args.z.is_some_and(|z| z.dtype() != dtype)
    {
        return Ok(None);
    }
    let nchunks = seqlen.div_ceil(L);
    let smem_state = chunk_state_smem(dtype, headdim, d_state);
    let smem_scan = chunk_scan_smem(dtype, headdim, d_state);
    let grid = (nchunks as u64, nheads as u64, batch as u64);
    let (Some(c_state), Some(c_scan)) = (
        cfg(grid, THREADS, smem_state),
        cfg(grid, THREADS, smem_scan),
    ) else {
        return Ok(None);
    };
    let pn = headdim * d_state;
    let Some(c_pass) = cfg(
        (pn.div_ceil(256) as u64, nheads as u64, batch as u64),
        256,
        0,
    ) else {
        return Ok(None);
    };
    let f_state = func(&dev, "ssd", ptx::SSD, &format!("ssd_chunk_state_{sfx}"))?;
    let f_scan = func(&dev, "ssd", ptx::SSD, &format!("ssd_chunk_scan_{sfx}"))?;
    let f_pass = func(&dev, "ssd", ptx::SSD, "ssd_state_passing")?;
    if !allow_smem(&dev, &f_state, smem_state)? || !allow_smem(&dev, &f_scan, smem_scan)? {
        return Ok(None);
    }

    let (x, xs) = rows(args.x, 2)?; // (batch, seqlen, nheads, headdim)
    let (dt, dts) = rows(args.dt, 1)?; // (batch, seqlen, nheads)
    let (b, bs) = rows(args.b, 2)?; // (batch, seqlen, ngroups, d_state)
    let (c, cs) = rows(args.c, 2)?; // (batch, seqlen, ngroups, d_state)
    let z = args.z.map(|z| rows(z, 2)).transpose()?; // (batch, seqlen, nheads, headdim)
    let a = args.a.contiguous()?; // (nheads) f32
    let d = args.d.map(|t| t.contiguous()).transpose()?; // (nheads)
    let dt_bias = args.dt_bias.map(|t| t.contiguous()).transpose()?; // (nheads)
    let init = args.initial_state.map(|s| s.contiguous()).transpose()?; // (batch, nheads, headdim, d_state)
    let (softplus, clamp, lo, hi) = dt_params(params);
    // 16-byte vector loads when every row of x / B / C / z starts 16-byte aligned.
    let esz = dtype.size_in_bytes();
    let mut aligned = vec![ptr(&x, &dev)?, ptr(&b, &dev)?, ptr(&c, &dev)?];
    let mut strides: Vec<usize> = [&xs, &bs, &cs]
        .iter()
        .flat_map(|s| s.iter().copied())
        .collect();
    if let Some((zt, zs)) = &z {
        aligned.push(ptr(zt, &dev)?);
        strides.extend(zs.iter().copied());
    }
    let vec = aligned.iter().all(|p| p.is_multiple_of(16))
        && strides.iter().all(|s| (s * esz).is_multiple_of(16));

    // Every element of these is written by a kernel before it is read.
    let states = output((batch, nchunks, nheads, headdim, d_state), DType::F32, &dev)?;
    let da_tot = output((batch, nheads, nchunks), DType::F32, &dev)?;
    let final_state = output((batch, nheads, headdim, d_state), DType::F32, &dev)?;
    let y = output((batch, seqlen, nheads, headdim), dtype, &dev)?;
    let opt_code = |t: Option<&Tensor>| code(t.map_or(DType::F32, |t| t.dtype()));

    launch!(
        f_state,
        c_state,
        ptr(&x, &dev)?,
        xs[0] as i64,
        xs[1] as i64,
        ptr(&dt, &dev)?,
        code(dt.dtype()),
        dts[0] as i64,
        dts[1] as i64,
        ptr(&a, &dev)?,
        opt_ptr(dt_bias.as_ref(), &dev)?,
        opt_code(dt_bias.as_ref()),
        ptr(&b, &dev)?,
        bs[0] as i64,
        bs[1] as i64,
        ptr(&states, &dev)?,
        ptr(&da_tot, &dev)?,
        seqlen as i64,
        nheads as i64,
        headdim as i32,
        d_state as i32,
        ngroups as i64,
        softplus,
        clamp,
        lo,
        hi,
        vec as i32,
    )?;
    launch!(
        f_pass,
        c_pass,
        ptr(&states, &dev)?,
        ptr(&da_tot, &dev)?,
        opt_ptr(init.as_ref(), &dev)?,
        ptr(&final_state, &dev)?,
        nchunks as i64,
        nheads as i64,
        pn as i64,
    )?;
    launch!(
        f_scan,
        c_scan,
        ptr(&x, &dev)?,
        xs[0] as i64,
        xs[1] as i64,
        ptr(&dt, &dev)?,
        code(dt.dtype()),
        dts[0] as i64,
        dts[1] as i64,
        ptr(&a, &dev)?,
        opt_ptr(dt_bias.as_ref(), &dev)?,
        opt_code(dt_bias.as_ref()),
        ptr(&b, &dev)?,
        bs[0] as i64,
        bs[1] as i64,
        ptr(&c, &dev)?,
        cs[0] as i64,
        cs[1] as i64,
        ptr(&states, &dev)?,
        opt_ptr(d.as_ref(), &dev)?,
        opt_code(d.as_ref()),
        opt_ptr(z.as_ref().map(|z| &z.0), &dev)?,
        z.as_ref().map_or(0, |z| z.1[0] as i64),
        z.as_ref().map_or(0, |z| z.1[1] as i64),
        ptr(&y, &dev)?,
        seqlen as i64,
        nheads as i64,
        headdim as i32,
        d_state as i32,
        ngroups as i64,
        softplus,
        clamp,
        lo,
        hi,
        vec as i32,
    )?;
    Ok(Some((y, final_state)))
}
