//! The SSD chunk scan and selective state update Metal kernels (`kernels/metal/ssd.metal`,
//! `state_update.metal`) run on the CPU by the MSL harness and compared with the ops'
//! references, as `metal_harness.rs` does for the conv and norm kernels (split for length).
//!
//! Requires clang >= 17 (see crates/msl-harness/README.md).

#[path = "metal_common.rs"]
mod metal_common;

use candle_core::DType;
use mamba2_ops::metal_params::*;
use mamba2_ops::metal_plan;
use mamba2_ops::*;
use metal_common::*;
use msl_harness::Mode;
use rand::{rngs::StdRng, SeedableRng};

// ---------------------------------------------------------------------------------------- SSD

struct SsdCase {
    batch: usize,
    seqlen: usize,
    nheads: usize,
    headdim: usize,
    ngroups: usize,
    d_state: usize,
    with_d: bool,
    z: bool,
    init: bool,
    seq_idx: bool,
    dt_limit: (f64, f64),
    /// chunk size of the reference (the kernel always uses 64)
    ref_chunk: usize,
    /// `dt_bias` present and softplus applied (Mamba-2); otherwise `dt` is used as given
    /// (then drawn positive)
    dt_processing: bool,
}

fn run_ssd_case(case: &SsdCase, dtype: DType, mode: Mode, seed: u64) {
    let SsdCase {
        batch: bs,
        seqlen: l,
        nheads: h,
        headdim: p,
        ngroups: g,
        d_state: n,
        ..
    } = *case;
    let mut rng = StdRng::seed_from_u64(seed);
    let x = rand_t(&mut rng, &[bs, l, h, p], 1.0, dtype);
    let (dt_lo, dt_hi) = if case.dt_processing {
        (-4.0, -1.0)
    } else {
        (0.005, 0.1)
    };
    let dt = rand_range(&mut rng, &[bs, l, h], dt_lo, dt_hi)
        .to_dtype(dtype)
        .unwrap();
    let a = rand_range(&mut rng, &[h], 0.0, 2.5)
        .exp()
        .unwrap()
        .neg()
        .unwrap();
    let b = rand_t(&mut rng, &[bs, l, g, n], 1.0, dtype);
    let c = rand_t(&mut rng, &[bs, l, g, n], 1.0, dtype);
    let d = case.with_d.then(|| rand_t(&mut rng, &[h], 1.0, DType::F32));
    let z = case.z.then(|| rand_t(&mut rng, &[bs, l, h, p], 2.0, dtype));
    let dt_bias = case
        .dt_processing
        .then(|| rand_range(&mut rng, &[h], -1.0, 0.5));
    let init = case
        .init
        .then(|| rand_t(&mut rng, &[bs, h, p, n], 1.0, DType::F32));
    let seq_idx = case.seq_idx.then(|| seq_ids(&mut rng, bs, l));
    let args = SsdArgs {
        x: &x,
        dt: &dt,
        a: &a,
        b: &b,
        c: &c,
        d: d.as_ref(),
        z: z.as_ref(),
        dt_bias: dt_bias.as_ref(),
        initial_state: init.as_ref(),
        seq_idx: seq_idx.as_ref(),
    };
    let params = SsdParams {
        chunk_size: case.ref_chunk,
        dt_softplus: case.dt_processing,
        dt_limit: case.dt_limit,
    };
    let (y_ref, s_ref) = ssd_chunk_scan_slow(&args, &params).unwrap();
    assert!(
        supports::ssd_chunk_scan(p, n),
        "shape the Metal dispatcher would not send here"
    );

    let ex = HarnessExecutor::new(mode);
    let (y, s) = metal_plan::ssd_chunk_scan(&ex, &args, &params)
        .unwrap_or_else(|e| panic!("ssd {dtype:?} {mode:?}: {e}"))
        .expect("the plan takes this shape");
    let ran: Vec<String> = ex.take_ran().into_iter().map(|r| r.function).collect();
    assert_eq!(
        ran,
        [
            kernel_name("ssd_chunk_cb", dtype),
            kernel_name("ssd_chunk_scan", dtype)
        ]
    );
    let what = format!("ssd {dtype:?} {mode:?} L={l} H={h} P={p} G={g} N={n}");
    assert_close(&y, &y_ref, dtype, &format!("{what} y"));
    // the final state is f32 on both sides, from the same rounded inputs
    assert_close(&s, &s_ref, DType::F32, &format!("{what} state"));
}

fn ssd_cases() -> Vec<SsdCase> {
    let base = SsdCase {
        batch: 2,
        seqlen: 130,
        nheads: 3,
        headdim: 32,
        ngroups: 1,
        d_state: 16,
        with_d: true,
        z: true,
        init: true,
        seq_idx: false,
        dt_limit: (0.0, f64::INFINITY),
        ref_chunk: 32,
        dt_processing: true,
    };
    vec![
        // 2 full chunks + a 2-token tail, 2 row blocks per head, initial state, D, z
        SsdCase { ..base },
        // packed sequences, ngroups 2, dt clamp, no z, a partial single chunk
        SsdCase {
            batch: 1,
            seqlen: 70,
            nheads: 4,
            headdim: 16,
            ngroups: 2,
            d_state: 24,
            z: false,
            seq_idx: true,
            dt_limit: (0.01, 0.5),
            ref_chunk: 256,
            ..base
        },
        // mamba2-130m head shape: headdim 64, d_state 128, ngroups 1, no initial state
        SsdCase {
            batch: 1,
            seqlen: 100,
            nheads: 3,
            headdim: 64,
            ngroups: 1,
            d_state: 128,
            init: false,
            ref_chunk: 256,
            ..base
        },
        // dt used as given (no dt_bias, no softplus), no D, exactly one full chunk
        SsdCase {
            batch: 2,
            seqlen: 64,
            nheads: 2,
            headdim: 16,
            with_d: false,
            dt_processing: false,
            ref_chunk: 64,
            ..base
        },
        // Codestral-like grouping: ngroups 8 (one head per group here), d_state 64
        SsdCase {
            batch: 1,
            seqlen: 65,
            nheads: 8,
            headdim: 64,
            ngroups: 8,
            d_state: 64,
            ref_chunk: 16,
            ..base
        },
    ]
}

#[test]
fn ssd_chunk_scan_matches_reference() {
    let cases = ssd_cases();
    for (i, case) in cases.iter().enumerate() {
        for dtype in DTYPES {
            run_ssd_case(
                case,
                dtype,
                Mode::Shuffled { seed: i as u64 },
                40 + i as u64,
            );
        }
    }
}

#[test]
fn ssd_chunk_scan_checked() {
    // small: 1 full chunk + tail, 2 row blocks, packed sequences with an initial state
    let case = SsdCase {
        batch: 1,
        seqlen: 70,
        nheads: 2,
        headdim: 32,
        ngroups: 1,
        d_state: 16,
        with_d: true,
        z: true,
        init: true,
        seq_idx: true,
        dt_limit: (0.0, f64::INFINITY),
        ref_chunk: 64,
        dt_processing: true,
    };
    run_ssd_case(&case, DType::F32, Mode::Checked, 50);
    run_ssd_case(&case, DType::BF16, Mode::CheckedShuffled { seed: 3 }, 51);
}

// ------------------------------------------------------------------------------ state update

#[allow(clippy::too_many_arguments)]
fn run_state_update(
    batch: usize,
    nheads: usize,
    headdim: usize,
    ngroups: usize,
    d_state: usize,
    optional: bool,
    dtype: DType,
    mode: Mode,
) {
    let (bs, h, p, g, n) = (batch, nheads, headdim, ngroups, d_state);
    let mut rng = StdRng::seed_from_u64((h * 7 + p * 3 + n) as u64);
    let state = rand_t(&mut rng, &[bs, h, p, n], 1.0, DType::F32);
    let x = rand_t(&mut rng, &[bs, h, p], 1.0, dtype);
    let dt = rand_range(&mut rng, &[bs, h], -4.0, 1.0)
        .to_dtype(dtype)
        .unwrap();
    let a = rand_range(&mut rng, &[h], 0.0, 2.5)
        .exp()
        .unwrap()
        .neg()
        .unwrap();
    let b = rand_t(&mut rng, &[bs, g, n], 1.0, dtype);
    let c = rand_t(&mut rng, &[bs, g, n], 1.0, dtype);
    let d = optional.then(|| rand_t(&mut rng, &[h], 1.0, DType::F32));
    let z = optional.then(|| rand_t(&mut rng, &[bs, h, p], 2.0, dtype));
    let dt_bias = optional.then(|| rand_range(&mut rng, &[h], -1.0, 0.5));
    let dt_limit = if optional {
        (0.0, f64::INFINITY)
    } else {
        (0.05, 0.3)
    };
    let state_ref = state.copy().unwrap();
    let args = StateUpdateArgs {
        state: &state_ref,
        x: &x,
        dt: &dt,
        a: &a,
        b: &b,
        c: &c,
        d: d.as_ref(),
        z: z.as_ref(),
        dt_bias: dt_bias.as_ref(),
    };
    let params = SsdParams {
        dt_limit,
        ..SsdParams::default()
    };
    let y_ref = selective_state_update_slow(&args, &params).unwrap();
    assert!(
        supports::state_update(n),
        "shape the Metal dispatcher would not send here"
    );
    let ex = HarnessExecutor::new(mode);
    let y = metal_plan::selective_state_update(
        &ex,
        &StateUpdateArgs {
            state: &state,
            ..args
        },
        &params,
    )
    .unwrap_or_else(|e| panic!("state update {dtype:?} {mode:?}: {e}"))
    .expect("the plan takes this shape");
    let what = format!("state update {dtype:?} {mode:?} H={h} P={p} G={g} N={n}");
    assert_close(&y, &y_ref, dtype, &what);
    assert_close(&state, &state_ref, DType::F32, &format!("{what} state"));
}

#[test]
fn selective_state_update_matches_reference() {
    for dtype in DTYPES {
        // d_state 40: lanes 8..31 idle in the second register slot; headdim 6: a partial
        // threadgroup (2 of 4 simdgroups idle in the second one)
        run_state_update(2, 5, 6, 1, 40, true, dtype, Mode::Shuffled { seed: 1 });
        // mamba2-130m: 24 heads of 64, d_state 128, one group; without D, z, dt_bias, clamp
        run_state_update(2, 24, 64, 1, 128, false, dtype, Mode::Shuffled { seed: 2 });
        // ngroups 8, d_state 256 (the register limit)
        run_state_update(1, 16, 8, 8, 256, true, dtype, Mode::InOrder);
    }
    run_state_update(2, 3, 6, 3, 40, true, DType::F32, Mode::Checked);
    run_state_update(
        1,
        2,
        4,
        1,
        64,
        false,
        DType::F16,
        Mode::CheckedShuffled { seed: 4 },
    );
}
