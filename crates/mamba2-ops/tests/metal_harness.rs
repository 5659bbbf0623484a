//! The conv1d and RMSNorm Metal kernels of `kernels/metal/` (the SSD and state-update kernels:
//! `metal_harness_ssd.rs`) run on the CPU by the MSL harness (`msl-harness`) and
//! compared with the op's plain-tensor reference (`*_slow`), for f32, f16 and bf16, in shuffled
//! and checked modes. Inputs are rounded to the activation dtype first and both sides see the
//! same values; kernel outputs are poisoned with NaN before each dispatch. The parameter blocks
//! are the `#[repr(C)]` structs of `mamba2_ops::metal_params`, as bound by the Metal dispatch.
//!
//! Requires clang >= 17 (see crates/msl-harness/README.md).

#[path = "metal_common.rs"]
mod metal_common;

use candle_core::DType;
use mamba2_ops::metal_params::*;
use mamba2_ops::*;
use metal_common::*;
use msl_harness::Mode;
use rand::{rngs::StdRng, SeedableRng};

// ------------------------------------------------------------------------------------- conv1d

struct ConvCase {
    batch: usize,
    seqlen: usize,
    channels: usize,
    d_conv: usize,
    bias: bool,
    init: bool,
    seq_idx: bool,
    silu: bool,
}

fn run_conv_case(case: &ConvCase, dtype: DType, mode: Mode, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let ConvCase {
        batch,
        seqlen,
        channels,
        d_conv,
        ..
    } = *case;
    let x = rand_t(&mut rng, &[batch, seqlen, channels], 1.0, dtype);
    let w = rand_t(&mut rng, &[channels, d_conv], 0.5, DType::F32);
    let bias = case
        .bias
        .then(|| rand_t(&mut rng, &[channels], 0.5, DType::F32));
    let init = case
        .init
        .then(|| rand_t(&mut rng, &[batch, channels, d_conv], 1.0, DType::F32));
    let seq_idx = case.seq_idx.then(|| seq_ids(&mut rng, batch, seqlen));
    let args = Conv1dArgs {
        x: &x,
        weight: &w,
        bias: bias.as_ref(),
        initial_state: init.as_ref(),
        seq_idx: seq_idx.as_ref(),
        silu: case.silu,
    };
    let (y_ref, s_ref) = causal_conv1d_slow(&args).unwrap();
    assert!(
        supports::conv1d(d_conv),
        "shape the Metal dispatcher would not send here"
    );

    let p = Conv1dParams {
        batch: batch as u32,
        seqlen: seqlen as u32,
        channels: channels as u32,
        d_conv: d_conv as u32,
        has_bias: case.bias as u32,
        has_init: case.init as u32,
        has_seq_idx: case.seq_idx as u32,
        silu: case.silu as u32,
    };
    let xb = HostBuf::from_tensor(&x);
    let wb = HostBuf::from_tensor(&w);
    let bb = HostBuf::opt(bias.as_ref(), DType::F32);
    let ib = HostBuf::opt(init.as_ref(), DType::F32);
    let sb = HostBuf::opt(seq_idx.as_ref(), DType::U32);
    let mut y = HostBuf::poisoned(dtype, batch * seqlen * channels);
    let mut s = HostBuf::poisoned(DType::F32, batch * channels * d_conv);
    let lib = library("conv1d.metal");
    let mut k = lib
        .kernel(&kernel_name("causal_conv1d_fwd", dtype))
        .unwrap();
    xb.input(&mut k, 0);
    wb.input(&mut k, 1);
    bb.input(&mut k, 2);
    ib.input(&mut k, 3);
    sb.input(&mut k, 4);
    y.output(&mut k, 5);
    s.output(&mut k, 6);
    k.raw_bytes(7, p.as_bytes())
        .grid([
            (channels as u32).div_ceil(layout::CONV_CHANNELS_PER_GROUP),
            (seqlen as u32).div_ceil(layout::CONV_TOKENS_PER_THREAD),
            batch as u32,
        ])
        .threadgroup([layout::CONV_CHANNELS_PER_GROUP, 1, 1])
        .mode(mode)
        .dispatch()
        .unwrap_or_else(|e| panic!("conv1d fwd {dtype:?} {mode:?}: {e}"));
    let what = format!("conv1d fwd {dtype:?} {mode:?} seqlen={seqlen} ch={channels}");
    assert_close(
        &y.to_tensor(y_ref.dims()),
        &y_ref,
        dtype,
        &format!("{what} y"),
    );
    assert_close(
        &s.to_tensor(s_ref.dims()),
        &s_ref,
        DType::F32,
        &format!("{what} state"),
    );
}

#[test]
fn conv1d_fwd_matches_reference() {
    let cases = [
        // partial threadgroup of channels (100 = 64 + 36), partial token tile (70 = 2*32 + 6)
        ConvCase {
            batch: 2,
            seqlen: 70,
            channels: 100,
            d_conv: 4,
            bias: true,
            init: true,
            seq_idx: false,
            silu: true,
        },
        // packed sequences with an initial state, no bias, no SiLU, short filter
        ConvCase {
            batch: 3,
            seqlen: 45,
            channels: 40,
            d_conv: 3,
            bias: false,
            init: true,
            seq_idx: true,
            silu: false,
        },
        // sequence shorter than the filter, no initial state
        ConvCase {
            batch: 1,
            seqlen: 2,
            channels: 33,
            d_conv: 4,
            bias: true,
            init: false,
            seq_idx: false,
            silu: true,
        },
        // mamba2-130m conv: d_inner 1536 + 2 * 128 (B, C)
        ConvCase {
            batch: 2,
            seqlen: 37,
            channels: 1792,
            d_conv: 4,
            bias: true,
            init: false,
            seq_idx: true,
            silu: true,
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        for dtype in DTYPES {
            run_conv_case(
                case,
                dtype,
                Mode::Shuffled { seed: i as u64 },
                10 + i as u64,
            );
        }
    }
    // checked mode (races, bounds, uninitialised reads) on the small shapes
    for (i, case) in cases[..3].iter().enumerate() {
        run_conv_case(case, DType::F32, Mode::Checked, 20 + i as u64);
    }
    run_conv_case(&cases[1], DType::BF16, Mode::Checked, 30);
}

fn run_conv_update(
    batch: usize,
    channels: usize,
    d_conv: usize,
    bias: bool,
    dtype: DType,
    mode: Mode,
) {
    let mut rng = StdRng::seed_from_u64(batch as u64 * 31 + channels as u64);
    let x = rand_t(&mut rng, &[batch, channels], 1.0, dtype);
    let state = rand_t(&mut rng, &[batch, channels, d_conv], 1.0, DType::F32);
    let w = rand_t(&mut rng, &[channels, d_conv], 0.5, DType::F32);
    let b = bias.then(|| rand_t(&mut rng, &[channels], 0.5, DType::F32));
    let mut sb = HostBuf::from_tensor(&state);
    let state_ref = state.copy().unwrap();
    let y_ref = causal_conv1d_update_slow(&x, &state_ref, &w, b.as_ref(), true).unwrap();
    let p = ConvUpdateParams {
        batch: batch as u32,
        channels: channels as u32,
        d_conv: d_conv as u32,
        has_bias: bias as u32,
        silu: 1,
    };
    let xb = HostBuf::from_tensor(&x);
    let wb = HostBuf::from_tensor(&w);
    let bb = HostBuf::opt(b.as_ref(), DType::F32);
    let mut y = HostBuf::poisoned(dtype, batch * channels);
    let lib = library("conv1d.metal");
    let mut k = lib
        .kernel(&kernel_name("causal_conv1d_update", dtype))
        .unwrap();
    xb.input(&mut k, 0);
    sb.output(&mut k, 1);
    wb.input(&mut k, 2);
    bb.input(&mut k, 3);
    y.output(&mut k, 4);
    let tg = (channels as u32).min(256);
    k.raw_bytes(5, p.as_bytes())
        .threads([channels as u32, batch as u32, 1])
        .threadgroup([tg, 1, 1])
        .mode(mode)
        .dispatch()
        .unwrap_or_else(|e| panic!("conv1d update {dtype:?} {mode:?}: {e}"));
    let what = format!("conv1d update {dtype:?} {mode:?}");
    assert_close(&y.to_tensor(y_ref.dims()), &y_ref, dtype, &what);
    assert_close(
        &sb.to_tensor(state_ref.dims()),
        &state_ref,
        DType::F32,
        &format!("{what} state"),
    );
}

#[test]
fn conv1d_update_matches_reference() {
    for dtype in DTYPES {
        run_conv_update(3, 300, 4, true, dtype, Mode::Shuffled { seed: 5 });
        run_conv_update(1, 1792, 4, false, dtype, Mode::InOrder);
    }
    run_conv_update(2, 40, 3, true, DType::F32, Mode::Checked);
    run_conv_update(2, 40, 4, true, DType::F16, Mode::Checked);
}

fn run_conv_varlen(cu: &[usize], channels: usize, d_conv: usize, dtype: DType, mode: Mode) {
    let total = *cu.last().unwrap();
    let mut rng = StdRng::seed_from_u64(total as u64);
    let x = rand_t(&mut rng, &[total, channels], 1.0, dtype);
    let want = conv_states_varlen_slow(&x, cu, d_conv).unwrap();
    let nseq = cu.len() - 1;
    let p = ConvVarlenParams {
        nseq: nseq as u32,
        channels: channels as u32,
        d_conv: d_conv as u32,
        total: total as u32,
    };
    let xb = HostBuf::from_tensor(&x);
    let cub = HostBuf::U32(cu.iter().map(|&v| v as u32).collect());
    let mut out = HostBuf::poisoned(DType::F32, nseq * channels * d_conv);
    let lib = library("conv1d.metal");
    let mut k = lib
        .kernel(&kernel_name("conv_states_varlen", dtype))
        .unwrap();
    xb.input(&mut k, 0);
    cub.input(&mut k, 1);
    out.output(&mut k, 2);
    k.raw_bytes(3, p.as_bytes())
        .threads([channels as u32, nseq as u32, 1])
        .threadgroup([(channels as u32).min(256), 1, 1])
        .mode(mode)
        .dispatch()
        .unwrap_or_else(|e| panic!("conv varlen {dtype:?} {mode:?}: {e}"));
    assert_close(
        &out.to_tensor(want.dims()),
        &want,
        DType::F32,
        &format!("conv varlen {dtype:?} {mode:?}"),
    );
}

#[test]
fn conv_states_varlen_matches_reference() {
    // sequences shorter than, equal to and longer than d_conv, and an empty one
    let cu = [0usize, 2, 2, 6, 17, 20];
    for dtype in DTYPES {
        run_conv_varlen(&cu, 70, 4, dtype, Mode::Shuffled { seed: 9 });
    }
    run_conv_varlen(&cu, 70, 4, DType::F32, Mode::Checked);
    run_conv_varlen(&[0, 1, 300], 1792, 4, DType::BF16, Mode::InOrder);
}

#[test]
fn params_struct_sizes_match_kernel_reads() {
    // A params block shorter than the kernel's struct is a binding fault in the harness; the
    // dispatches above prove the sizes agree. Here: one byte short must be rejected.
    let p = ConvVarlenParams {
        nseq: 1,
        channels: 4,
        d_conv: 4,
        total: 4,
    };
    let x = HostBuf::F32(vec![0.0; 16]);
    let cu = HostBuf::U32(vec![0, 4]);
    let mut out = HostBuf::poisoned(DType::F32, 16);
    let lib = library("conv1d.metal");
    let mut k = lib.kernel("conv_states_varlen_f32").unwrap();
    x.input(&mut k, 0);
    cu.input(&mut k, 1);
    out.output(&mut k, 2);
    let bytes = p.as_bytes();
    let err = k
        .raw_bytes(3, &bytes[..bytes.len() - 4])
        .threads([4, 1, 1])
        .threadgroup([4, 1, 1])
        .dispatch()
        .unwrap_err();
    assert_eq!(
        err.fault_kind(),
        Some(msl_harness::FaultKind::Binding),
        "{err}"
    );
}

// --------------------------------------------------------------------------------- RMSNorms

#[allow(clippy::too_many_arguments)]
fn run_gated_norm(
    rows: usize,
    dim: usize,
    group_size: usize,
    gate: bool,
    norm_before_gate: bool,
    threads: u32,
    dtype: DType,
    mode: Mode,
) {
    let mut rng = StdRng::seed_from_u64((rows * dim + group_size) as u64);
    let x = rand_t(&mut rng, &[rows, dim], 2.0, dtype);
    let z = gate.then(|| rand_t(&mut rng, &[rows, dim], 2.0, dtype));
    let w = rand_range(&mut rng, &[dim], 0.5, 1.5);
    let args = GatedRmsNormArgs {
        x: &x,
        z: z.as_ref(),
        weight: &w,
        eps: 1e-5,
        group_size,
        norm_before_gate,
    };
    let want = gated_rms_norm_slow(&args).unwrap();
    let prm = GatedRmsNormParams {
        rows: rows as u32,
        dim: dim as u32,
        group_size: group_size as u32,
        has_z: gate as u32,
        norm_before_gate: norm_before_gate as u32,
        eps: 1e-5,
    };
    let xb = HostBuf::from_tensor(&x);
    let zb = HostBuf::opt(z.as_ref(), dtype);
    let wb = HostBuf::from_tensor(&w);
    let mut out = HostBuf::poisoned(dtype, rows * dim);
    let lib = library("rms_norm.metal");
    let mut k = lib.kernel(&kernel_name("gated_rms_norm", dtype)).unwrap();
    xb.input(&mut k, 0);
    zb.input(&mut k, 1);
    wb.input(&mut k, 2);
    out.output(&mut k, 3);
    k.raw_bytes(4, prm.as_bytes())
        .grid([(dim / group_size) as u32, rows as u32, 1])
        .threadgroup([threads, 1, 1])
        .mode(mode)
        .dispatch()
        .unwrap_or_else(|e| panic!("gated norm {dtype:?} {mode:?}: {e}"));
    let what = format!("gated norm {dtype:?} {mode:?} dim={dim} group={group_size} tg={threads}");
    assert_close(&out.to_tensor(want.dims()), &want, dtype, &what);
}

#[test]
fn gated_rms_norm_matches_reference() {
    for dtype in DTYPES {
        // 48 threads: a partial second simdgroup; groups of 40
        run_gated_norm(
            3,
            160,
            40,
            true,
            false,
            48,
            dtype,
            Mode::Shuffled { seed: 1 },
        );
        run_gated_norm(2, 96, 96, true, true, 64, dtype, Mode::Shuffled { seed: 2 });
        run_gated_norm(2, 50, 25, false, false, 32, dtype, Mode::InOrder);
        // mamba2-130m: d_inner 1536, one group; Codestral-like: 8 groups of 512
        run_gated_norm(
            2,
            1536,
            1536,
            true,
            false,
            256,
            dtype,
            Mode::Shuffled { seed: 3 },
        );
        run_gated_norm(1, 4096, 512, true, false, 256, dtype, Mode::InOrder);
    }
    run_gated_norm(2, 160, 40, true, false, 48, DType::F32, Mode::Checked);
    run_gated_norm(
        2,
        96,
        96,
        true,
        true,
        64,
        DType::BF16,
        Mode::CheckedShuffled { seed: 5 },
    );
}

#[allow(clippy::too_many_arguments)]
fn run_residual_norm(
    rows: usize,
    dim: usize,
    with_residual: bool,
    residual_in_fp32: bool,
    threads: u32,
    dtype: DType,
    mode: Mode,
) {
    let mut rng = StdRng::seed_from_u64((rows * dim) as u64 + residual_in_fp32 as u64);
    let res_dtype = if residual_in_fp32 { DType::F32 } else { dtype };
    let x = rand_t(&mut rng, &[rows, dim], 2.0, dtype);
    let r = with_residual.then(|| rand_t(&mut rng, &[rows, dim], 2.0, res_dtype));
    let w = rand_range(&mut rng, &[dim], 0.5, 1.5)
        .to_dtype(dtype)
        .unwrap();
    let (normed_ref, res_ref) =
        rms_norm_residual_slow(&x, r.as_ref(), &w, 1e-5, residual_in_fp32).unwrap();
    let prm = RmsNormResidualParams {
        rows: rows as u32,
        dim: dim as u32,
        has_residual: with_residual as u32,
        eps: 1e-5,
    };
    let xb = HostBuf::from_tensor(&x);
    let rb = HostBuf::opt(r.as_ref(), res_dtype);
    // the kernel reads the weight in f32 (the host casts it)
    let wb = HostBuf::from_tensor(&w.to_dtype(DType::F32).unwrap());
    let mut normed = HostBuf::poisoned(dtype, rows * dim);
    let mut res_out = HostBuf::poisoned(res_dtype, rows * dim);
    let name = if residual_in_fp32 && dtype != DType::F32 {
        kernel_name("rms_norm_residual_f32res", dtype)
    } else {
        kernel_name("rms_norm_residual", dtype)
    };
    let lib = library("rms_norm.metal");
    let mut k = lib.kernel(&name).unwrap();
    xb.input(&mut k, 0);
    rb.input(&mut k, 1);
    wb.input(&mut k, 2);
    normed.output(&mut k, 3);
    res_out.output(&mut k, 4);
    k.raw_bytes(5, prm.as_bytes())
        .grid([rows as u32, 1, 1])
        .threadgroup([threads, 1, 1])
        .mode(mode)
        .dispatch()
        .unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
    let what = format!("{name} {mode:?} dim={dim} residual={with_residual}");
    assert_close(
        &normed.to_tensor(normed_ref.dims()),
        &normed_ref,
        dtype,
        &what,
    );
    assert_close(
        &res_out.to_tensor(res_ref.dims()),
        &res_ref,
        res_dtype,
        &format!("{what} residual_out"),
    );
}

#[test]
fn rms_norm_residual_matches_reference() {
    for dtype in DTYPES {
        for fp32 in [false, true] {
            run_residual_norm(3, 100, true, fp32, 48, dtype, Mode::Shuffled { seed: 6 });
            run_residual_norm(2, 768, true, fp32, 256, dtype, Mode::Shuffled { seed: 7 });
        }
        run_residual_norm(2, 100, false, true, 64, dtype, Mode::InOrder);
    }
    run_residual_norm(2, 100, true, true, 48, DType::BF16, Mode::Checked);
    run_residual_norm(2, 64, false, false, 32, DType::F32, Mode::Checked);
}
