//! The conv1d and RMSNorm Metal kernels of `kernels/metal/` (the SSD and state-update kernels:
//! `metal_harness_ssd.rs`) run on the CPU by the MSL harness (`msl-harness`) and
//! compared with the op's plain-tensor reference (`*_slow`), for f32, f16 and bf16, in shuffled
//! and checked modes. Inputs are rounded to the activation dtype first and both sides see the
//! same values; kernel outputs are poisoned with NaN before each dispatch. Every launch is the
//! plan the Metal dispatch encodes (`mamba2_ops::metal_plan`), run by the harness executor.
//!
//! Requires clang >= 17 (see crates/msl-harness/README.md).

#[path = "metal_common.rs"]
mod metal_common;

use candle_core::{DType, Device, Tensor};
use mamba2_ops::metal_params::*;
use mamba2_ops::metal_plan;
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

    let ex = HarnessExecutor::new(mode);
    let (y, s) = metal_plan::causal_conv1d(&ex, &args)
        .unwrap_or_else(|e| panic!("conv1d fwd {dtype:?} {mode:?}: {e}"))
        .expect("the plan takes this shape");
    assert_eq!(ex.take_ran().len(), 1);
    let what = format!("conv1d fwd {dtype:?} {mode:?} seqlen={seqlen} ch={channels}");
    assert_close(&y, &y_ref, dtype, &format!("{what} y"));
    assert_close(&s, &s_ref, DType::F32, &format!("{what} state"));
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
    let state_ref = state.copy().unwrap();
    let y_ref = causal_conv1d_update_slow(&x, &state_ref, &w, b.as_ref(), true).unwrap();
    let ex = HarnessExecutor::new(mode);
    let y = metal_plan::causal_conv1d_update(&ex, &x, &state, &w, b.as_ref(), true)
        .unwrap_or_else(|e| panic!("conv1d update {dtype:?} {mode:?}: {e}"))
        .expect("the plan takes this shape");
    let what = format!("conv1d update {dtype:?} {mode:?}");
    assert_close(&y, &y_ref, dtype, &what);
    assert_close(&state, &state_ref, DType::F32, &format!("{what} state"));
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
    let ex = HarnessExecutor::new(mode);
    let out = metal_plan::conv_states_varlen(&ex, &x, cu, d_conv)
        .unwrap_or_else(|e| panic!("conv varlen {dtype:?} {mode:?}: {e}"))
        .expect("the plan takes this shape");
    assert_close(
        &out,
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
    // dispatches above prove the sizes agree. Here: one field short must be rejected.
    let x = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
    let ex = ShortParams(HarnessExecutor::new(Mode::InOrder));
    let err = metal_plan::conv_states_varlen(&ex, &x, &[0, 4], 4).unwrap_err();
    assert_eq!(
        ex.0.last_fault(),
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
    threads: usize,
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
    let ex = HarnessExecutor::new(mode).max_threads(threads);
    let out = metal_plan::gated_rms_norm(&ex, &args)
        .unwrap_or_else(|e| panic!("gated norm {dtype:?} {mode:?}: {e}"))
        .expect("the plan takes this shape");
    let threads = ex.take_ran()[0].threads[0];
    let what = format!("gated norm {dtype:?} {mode:?} dim={dim} group={group_size} tg={threads}");
    assert_close(&out, &want, dtype, &what);
}

#[test]
fn gated_rms_norm_matches_reference() {
    for dtype in DTYPES {
        // at most 32 threads: one simdgroup walks a group of 40; groups of 40
        run_gated_norm(
            3,
            160,
            40,
            true,
            false,
            32,
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
    run_gated_norm(2, 160, 40, true, false, 32, DType::F32, Mode::Checked);
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
    threads: usize,
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
    let ex = HarnessExecutor::new(mode).max_threads(threads);
    let (normed, res_out) =
        metal_plan::rms_norm_residual(&ex, &x, r.as_ref(), &w, 1e-5, residual_in_fp32)
            .unwrap_or_else(|e| panic!("rms_norm_residual {dtype:?} {mode:?}: {e}"))
            .expect("the plan takes this shape");
    let name = ex.take_ran().remove(0).function;
    let what = format!("{name} {mode:?} dim={dim} residual={with_residual}");
    assert_close(&normed, &normed_ref, dtype, &what);
    assert_close(
        &res_out,
        &res_ref,
        res_dtype,
        &format!("{what} residual_out"),
    );
}

#[test]
fn rms_norm_residual_matches_reference() {
    for dtype in DTYPES {
        for fp32 in [false, true] {
            run_residual_norm(3, 100, true, fp32, 32, dtype, Mode::Shuffled { seed: 6 });
            run_residual_norm(2, 768, true, fp32, 256, dtype, Mode::Shuffled { seed: 7 });
        }
        run_residual_norm(2, 100, false, true, 64, dtype, Mode::InOrder);
        // an odd element count without a residual: the absent buffer is bound with R's size
        run_residual_norm(1, 33, false, true, 64, dtype, Mode::InOrder);
    }
    run_residual_norm(2, 100, true, true, 32, DType::BF16, Mode::Checked);
    run_residual_norm(2, 64, false, false, 32, DType::F32, Mode::Checked);
}

// -------------------------------------------------------------------------------- embedding

fn run_embedding(n: usize, vocab: usize, d: usize, dtype: DType, mode: Mode) {
    let mut rng = StdRng::seed_from_u64((n * d + vocab) as u64);
    let table = rand_t(&mut rng, &[vocab, d], 1.0, dtype);
    let v: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % vocab) as u32).collect();
    let ids = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
    let want = embedding_slow(&ids, &table).unwrap();
    let ex = HarnessExecutor::new(mode);
    let got = metal_plan::embedding(&ex, &ids, &table)
        .unwrap_or_else(|e| panic!("embedding {dtype:?} {mode:?}: {e}"))
        .expect("the plan takes this shape");
    assert_eq!(ex.take_ran().len(), 1);
    // a copy: exact (the NaN poison would differ)
    let what = format!("embedding {dtype:?} {mode:?} n={n} d={d}");
    assert_eq!(got.dims(), want.dims(), "{what}");
    let diff = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff == 0.0, "{what}: max diff {diff}");
}

#[test]
fn embedding_gather_matches_reference() {
    for (i, dtype) in DTYPES.into_iter().enumerate() {
        // one decode row, a batch with repeated ids, a partial threadgroup of columns (100)
        run_embedding(1, 50, 768, dtype, Mode::Shuffled { seed: i as u64 });
        run_embedding(
            13,
            5,
            100,
            dtype,
            Mode::Shuffled {
                seed: 10 + i as u64,
            },
        );
    }
    run_embedding(4, 9, 40, DType::F32, Mode::Checked);
    run_embedding(3, 9, 33, DType::BF16, Mode::Checked);
    // an id past the table: zeros, no read outside it (the model checks ids before)
    let table = Tensor::ones((3, 8), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[1u32, 7], &Device::Cpu).unwrap();
    let ex = HarnessExecutor::new(Mode::Checked);
    let got = metal_plan::embedding(&ex, &ids, &table).unwrap().unwrap();
    let rows = got.to_vec2::<f32>().unwrap();
    assert_eq!((rows[0][0], rows[1][0]), (1.0, 0.0));
}
