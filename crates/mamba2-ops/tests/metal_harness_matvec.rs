//! The matrix-vector kernel of the decode projections and the LM head
//! (`kernels/metal/matvec.metal`, `linear_matvec_<dtype>`) run on the CPU by the MSL harness
//! through its dispatch plan (`metal_plan::linear`), against the `linear` op's reference
//! (`linear_slow`: f32 products of the same rounded inputs, one rounding to the dtype), for
//! f32, f16 and bf16, outputs NaN-poisoned: random shapes (partial simdgroups of outputs,
//! in_features not a multiple of 32, 1 to 8 rows, with and without bias), real projection
//! shapes, checked mode, and the plan's fallbacks (more rows than the kernel takes, a strided
//! weight) which must not run it. The same for `linear_matvec_gated_norm_<dtype>` (the decode
//! out-projection with the mixer's gated RMSNorm folded in) against
//! `linear_slow(gated_rms_norm_slow(..))`.
//!
//! Requires clang >= 17 (see crates/msl-harness/README.md).

#[path = "metal_common.rs"]
mod metal_common;

use candle_core::{DType, Tensor};
use mamba2_ops::metal_plan;
use mamba2_ops::*;
use metal_common::*;
use msl_harness::Mode;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// `(atol, rtol)` per dtype, `|got - want| <= atol + rtol |want|`: both sides sum f32 products
/// of the same rounded inputs (|y| ~ 1: x in [-1, 1), w scaled by 1 / sqrt(k)); f32 differs by
/// the summation order over k (up to 1536 terms), f16 / bf16 also by one rounding of the output
/// (2^-11, 2^-8 relative).
const TOLERANCE: [(DType, f32, f32); 3] = [
    (DType::F32, 2e-5, 1e-4),
    (DType::F16, 2e-3, 2e-3),
    (DType::BF16, 1e-2, 1e-2),
];

fn check(got: &Tensor, want: &Tensor, dtype: DType, what: &str) {
    let &(_, atol, rtol) = TOLERANCE.iter().find(|t| t.0 == dtype).unwrap();
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let v = |t: &Tensor| -> Vec<f32> {
        let t = t.to_dtype(DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (g, w) = (v(got), v(want));
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        // false for NaN (an unwritten output)
        let ok = (a - b).abs() <= atol + rtol * b.abs();
        assert!(
            ok,
            "{what}: [{i}] got {a} want {b} (tolerance {atol}, {rtol})"
        );
    }
}

/// `x (rows, k)` times `w (n_out, k)ᵀ` through the plan; asserts that exactly one matvec ran.
#[allow(clippy::too_many_arguments)]
fn run(
    rows: usize,
    k: usize,
    n_out: usize,
    bias: bool,
    lead: bool,
    dtype: DType,
    mode: Mode,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = rand_t(&mut rng, &[rows, k], 1.0, dtype);
    // (1, rows, k) as the model's decode rows come; the output keeps the leading dims
    let x = if lead { x.unsqueeze(0).unwrap() } else { x };
    let w = rand_t(&mut rng, &[n_out, k], 1.0 / (k as f32).sqrt(), dtype);
    let b = bias.then(|| rand_t(&mut rng, &[n_out], 0.5, dtype));
    let want = linear_slow(&x, &w, b.as_ref()).unwrap();
    let ex = HarnessExecutor::new(mode);
    let what =
        format!("linear_matvec {dtype:?} {mode:?} rows={rows} k={k} n_out={n_out} bias={bias}");
    let got = metal_plan::linear(&ex, &x, &w, b.as_ref())
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .unwrap();
    let ran: Vec<String> = ex.take_ran().into_iter().map(|r| r.function).collect();
    assert_eq!(ran, [kernel_name("linear_matvec", dtype)], "{what}");
    check(&got, &want, dtype, &what);
}

#[test]
fn matvec_random_shapes_match_reference() {
    let mut rng = StdRng::seed_from_u64(7);
    for case in 0..12u64 {
        let rows = rng.random_range(1..=8);
        let k = rng.random_range(1..=300);
        let n_out = rng.random_range(1..=90);
        let bias = rng.random::<bool>();
        for (i, dtype) in DTYPES.into_iter().enumerate() {
            let mode = Mode::Shuffled {
                seed: case * 3 + i as u64,
            };
            run(rows, k, n_out, bias, case % 2 == 0, dtype, mode, 100 + case);
        }
    }
}

#[test]
fn matvec_real_shapes_match_reference() {
    // mamba2-130m: in_proj (768 -> 2*1536 + 2*128 + 24 = 3352) for one row, out_proj
    // (1536 -> 768) for a batch of 4; mamba2-1.3b's out_proj (4096 -> 2048) for one row
    for (i, dtype) in DTYPES.into_iter().enumerate() {
        let mode = Mode::Shuffled { seed: i as u64 };
        run(1, 768, 3352, false, true, dtype, mode, 200);
        run(4, 1536, 768, false, true, dtype, mode, 201);
    }
    run(1, 4096, 2048, false, true, DType::BF16, Mode::InOrder, 202);
}

#[test]
fn matvec_checked() {
    // races, bounds (the last simdgroup's outputs past n_out), uninitialised reads
    run(3, 70, 21, true, false, DType::F32, Mode::Checked, 300);
    run(
        8,
        40,
        16,
        false,
        false,
        DType::BF16,
        Mode::CheckedShuffled { seed: 2 },
        301,
    );
    run(1, 33, 5, true, true, DType::F16, Mode::Checked, 302);
}

#[test]
fn matvec_preconditions_fall_back() {
    let mut rng = StdRng::seed_from_u64(9);
    let ex = HarnessExecutor::new(Mode::InOrder);
    // 9 rows: the GEMM, not the kernel
    let x = rand_t(&mut rng, &[9, 32], 1.0, DType::F32);
    let w = rand_t(&mut rng, &[20, 32], 0.2, DType::F32);
    assert!(metal_plan::linear_matvec(&ex, &x, &w, None)
        .unwrap()
        .is_none());
    let y = metal_plan::linear(&ex, &x, &w, None).unwrap().unwrap();
    check(
        &y,
        &linear_slow(&x, &w, None).unwrap(),
        DType::F32,
        "9 rows",
    );
    // a transposed (strided) weight: not read in place
    let wt = rand_t(&mut rng, &[32, 20], 0.2, DType::F32).t().unwrap();
    let x1 = x.narrow(0, 0, 1).unwrap();
    assert!(metal_plan::linear_matvec(&ex, &x1, &wt, None)
        .unwrap()
        .is_none());
    assert!(ex.take_ran().is_empty());
}

/// `linear(gated_rms_norm(y, z, norm_w), w, bias)` through `linear_matvec_gated_norm_<dtype>`.
#[allow(clippy::too_many_arguments)]
fn run_gated(
    rows: usize,
    ngroups: usize,
    group_size: usize,
    n_out: usize,
    norm_before_gate: bool,
    bias: bool,
    dtype: DType,
    mode: Mode,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let k = ngroups * group_size;
    let y = rand_t(&mut rng, &[rows, k], 2.0, dtype);
    let z = rand_t(&mut rng, &[rows, k], 2.0, dtype);
    let nw = rand_t(&mut rng, &[k], 1.0, DType::F32)
        .affine(0.5, 1.0)
        .unwrap();
    let w = rand_t(&mut rng, &[n_out, k], 1.0 / (k as f32).sqrt(), dtype);
    let b = bias.then(|| rand_t(&mut rng, &[n_out], 0.5, dtype));
    let norm = GatedRmsNormArgs {
        x: &y,
        z: Some(&z),
        weight: &nw,
        eps: 1e-5,
        group_size,
        norm_before_gate,
    };
    let want = linear_slow(&gated_rms_norm_slow(&norm).unwrap(), &w, b.as_ref()).unwrap();
    let ex = HarnessExecutor::new(mode);
    let what = format!(
        "linear_matvec_gated_norm {dtype:?} {mode:?} rows={rows} groups={ngroups}x{group_size} n_out={n_out} before_gate={norm_before_gate}"
    );
    let got = metal_plan::linear_gated_norm(&ex, &norm, &w, b.as_ref())
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .expect("the plan takes this shape");
    let ran: Vec<String> = ex.take_ran().into_iter().map(|r| r.function).collect();
    assert_eq!(
        ran,
        [kernel_name("linear_matvec_gated_norm", dtype)],
        "{what}"
    );
    check(&got, &want, dtype, &what);
}

#[test]
fn matvec_gated_norm_matches_reference() {
    let mut rng = StdRng::seed_from_u64(11);
    for case in 0..8u64 {
        let rows = rng.random_range(1..=8);
        let ngroups = rng.random_range(1..=8);
        let group_size = rng.random_range(1..=80);
        let n_out = rng.random_range(1..=70);
        for (i, dtype) in DTYPES.into_iter().enumerate() {
            let mode = Mode::Shuffled {
                seed: case * 3 + i as u64,
            };
            let (nbg, bias) = (case % 2 == 1, case % 3 == 0);
            run_gated(
                rows,
                ngroups,
                group_size,
                n_out,
                nbg,
                bias,
                dtype,
                mode,
                400 + case,
            );
        }
    }
    // mamba2-130m's out_proj (one group of 1536 -> 768), Codestral-like 8 groups of 512
    for (i, dtype) in DTYPES.into_iter().enumerate() {
        let mode = Mode::Shuffled {
            seed: 50 + i as u64,
        };
        run_gated(1, 1, 1536, 768, false, false, dtype, mode, 420);
    }
    run_gated(2, 8, 512, 64, false, false, DType::BF16, Mode::InOrder, 421);
    // checked: the threadgroup inverse-RMS table, the barrier, outputs past n_out
    run_gated(3, 3, 24, 21, false, true, DType::F32, Mode::Checked, 430);
    let mode = Mode::CheckedShuffled { seed: 4 };
    run_gated(2, 2, 40, 9, true, false, DType::F16, mode, 431);
}

#[test]
fn matvec_gated_norm_preconditions_fall_back() {
    let mut rng = StdRng::seed_from_u64(12);
    let ex = HarnessExecutor::new(Mode::InOrder);
    let y = rand_t(&mut rng, &[1, 90], 1.0, DType::F32);
    let nw = rand_t(&mut rng, &[90], 1.0, DType::F32);
    let w = rand_t(&mut rng, &[4, 90], 0.2, DType::F32);
    let norm = |group_size, z| GatedRmsNormArgs {
        x: &y,
        z,
        weight: &nw,
        eps: 1e-5,
        group_size,
        norm_before_gate: false,
    };
    // 9 groups (more than the table holds), no gate
    assert!(
        metal_plan::linear_gated_norm(&ex, &norm(10, Some(&y)), &w, None)
            .unwrap()
            .is_none()
    );
    assert!(
        metal_plan::linear_gated_norm(&ex, &norm(90, None), &w, None)
            .unwrap()
            .is_none()
    );
    assert!(ex.take_ran().is_empty());
}
