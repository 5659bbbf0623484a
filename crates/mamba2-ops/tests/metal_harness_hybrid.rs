//! The rotary-embedding and MLP-activation Metal kernels of the hybrid models
//! (`kernels/metal/rotary.metal`, `activation.metal`) run on the CPU by the MSL harness and
//! compared with `rotary_embedding_slow`, `swiglu_slow` and `relu_squared_slow`, for f32, f16
//! and bf16, in shuffled and checked modes, outputs NaN-poisoned. The rotary input is also a
//! strided view (heads narrowed out of a wider projection), bound as the Metal dispatch binds
//! it: the parent's storage from the view's start offset on, the view's strides in the
//! parameters. Every launch is the plan of `mamba2_ops::metal_plan`, as the Metal dispatch
//! encodes it. The attention kernels: `metal_harness_attention.rs`.
//!
//! Requires clang >= 17 (see crates/msl-harness/README.md).

#[path = "metal_common.rs"]
mod metal_common;

use candle_core::{DType, Device, Tensor};
use mamba2_ops::metal_plan;
use mamba2_ops::*;
use metal_common::*;
use msl_harness::Mode;
use rand::{rngs::StdRng, SeedableRng};

/// `(atol, rtol)` per output dtype: `|got - want| <= atol + rtol |want|`. Kernels and
/// references do the same f32 operations on the same rounded inputs (the harness uses the C
/// library's cosf/sinf/expf, as Candle's CPU ops do), so f32 is nearly exact and f16/bf16 allow
/// one rounding step of the output (2^-11, 2^-8 relative); on a Mac, Metal's `exp` and
/// contractions differ by a few f32 ulps.
const TOLERANCE: [(DType, f32, f32); 3] = [
    (DType::F32, 1e-6, 1e-5),
    (DType::F16, 1e-3, 1e-3),
    (DType::BF16, 8e-3, 8e-3),
];

fn check(got: &Tensor, want: &Tensor, dtype: DType, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let &(_, atol, rtol) = TOLERANCE.iter().find(|t| t.0 == dtype).unwrap();
    let v = |t: &Tensor| -> Vec<f32> {
        let t = t.to_dtype(DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (g, w) = (v(got), v(want));
    // false for NaN on either side
    let within = |a: f32, b: f32| (a - b).abs() <= atol + rtol * b.abs();
    let bad: Vec<usize> = (0..g.len()).filter(|&i| !within(g[i], w[i])).collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{what}: {}/{} elements out of tolerance ({atol}, {rtol}); first [{i}] got {} want {}",
            bad.len(),
            g.len(),
            g[i],
            w[i]
        );
    }
}

// ------------------------------------------------------------------------------------ rotary

#[derive(Clone, Copy, Debug)]
struct RotaryCase {
    batch: usize,
    seqlen: usize,
    n_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    position_offset: usize,
    theta: f64,
    /// x is heads `1..=n_heads` of a `(batch, seqlen, n_heads + 2, head_dim)` tensor.
    strided: bool,
}

fn run_rotary(case: &RotaryCase, dtype: DType, mode: Mode, seed: u64) {
    let RotaryCase {
        batch,
        seqlen,
        n_heads,
        head_dim,
        rotary_dim,
        ..
    } = *case;
    let mut rng = StdRng::seed_from_u64(seed);
    let parent_heads = if case.strided { n_heads + 2 } else { n_heads };
    let parent = rand_t(
        &mut rng,
        &[batch, seqlen, parent_heads, head_dim],
        2.0,
        dtype,
    );
    let x = if case.strided {
        parent.narrow(2, 1, n_heads).unwrap()
    } else {
        parent.clone()
    };
    let args = RotaryArgs {
        x: &x,
        position_offset: case.position_offset,
        rotary_dim,
        theta: case.theta,
    };
    let want = rotary_embedding_slow(&args).unwrap();

    let ex = HarnessExecutor::new(mode);
    let what = format!(
        "{} {mode:?} {case:?}",
        kernel_name("rotary_embedding", dtype)
    );
    let out = metal_plan::rotary_embedding(&ex, &args)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .expect("the plan takes this shape");
    assert_eq!(ex.take_ran().len(), 1);
    check(&out, &want, dtype, &what);
}

#[allow(clippy::too_many_arguments)]
fn rotary(
    batch: usize,
    seqlen: usize,
    n_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    position_offset: usize,
    theta: f64,
    strided: bool,
) -> RotaryCase {
    RotaryCase {
        batch,
        seqlen,
        n_heads,
        head_dim,
        rotary_dim,
        position_offset,
        theta,
        strided,
    }
}

#[test]
fn rotary_embedding_matches_reference() {
    let cases = [
        // full rotation, a partial threadgroup (8 pairs), batch 3
        rotary(3, 5, 2, 16, 16, 7, 1e4, false),
        // partial rotation (half the head), strided view
        rotary(2, 4, 3, 64, 32, 100, 1e4, true),
        // head_dim 80, full rotation from position 0
        rotary(1, 6, 2, 80, 80, 0, 1e6, true),
        // head_dim 64, a quarter rotated
        rotary(3, 2, 4, 64, 16, 33, 5e5, false),
    ];
    for (i, c) in cases.iter().enumerate() {
        for dtype in DTYPES {
            run_rotary(c, dtype, Mode::Shuffled { seed: i as u64 }, 10 + i as u64);
        }
    }
    run_rotary(&cases[1], DType::F32, Mode::Checked, 20);
    run_rotary(
        &cases[0],
        DType::BF16,
        Mode::CheckedShuffled { seed: 3 },
        21,
    );
}

#[test]
fn rotary_embedding_real_configs() {
    for (i, dtype) in DTYPES.into_iter().enumerate() {
        let mode = Mode::Shuffled { seed: i as u64 };
        // Bamba-9B: 32 query heads of 128, partial rotary 64, theta 1e4, decode at 4093
        run_rotary(
            &rotary(1, 1, 32, 128, 64, 4093, 1e4, false),
            dtype,
            mode,
            30,
        );
        // Bamba-9B keys (8 kv heads), a strided slice of a fused projection, 3 tokens
        run_rotary(&rotary(1, 3, 8, 128, 64, 17, 1e4, true), dtype, mode, 31);
        // Falcon-H1-1.5B: 8 heads of 128, full rotary, theta 1e11, batch 3 at position 70000
        run_rotary(
            &rotary(3, 2, 8, 128, 128, 70_000, 1e11, false),
            dtype,
            mode,
            32,
        );
    }
}

// -------------------------------------------------------------------------------- activations

fn run_swiglu(rows: usize, n: usize, dtype: DType, mode: Mode) {
    let mut rng = StdRng::seed_from_u64((rows * n) as u64);
    let x = rand_t(&mut rng, &[rows, 2 * n], 6.0, dtype);
    let want = swiglu_slow(&x).unwrap();
    let ex = HarnessExecutor::new(mode);
    let what = format!(
        "{} {mode:?} rows={rows} n={n}",
        kernel_name("swiglu", dtype)
    );
    let out = metal_plan::swiglu(&ex, &x)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .expect("the plan takes this shape");
    check(&out, &want, dtype, &what);
}

fn run_relu_squared(count: usize, dtype: DType, mode: Mode) {
    let mut rng = StdRng::seed_from_u64(count as u64);
    let x = rand_t(&mut rng, &[count], 4.0, dtype);
    let want = relu_squared_slow(&x).unwrap();
    let ex = HarnessExecutor::new(mode);
    let what = format!(
        "{} {mode:?} count={count}",
        kernel_name("relu_squared", dtype)
    );
    let out = metal_plan::relu_squared(&ex, &x)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .expect("the plan takes this shape");
    check(&out, &want, dtype, &what);
}

#[test]
fn activations_match_reference() {
    for (i, dtype) in DTYPES.into_iter().enumerate() {
        let mode = Mode::Shuffled { seed: i as u64 };
        // partial threadgroups: 37 columns, 1000 elements
        run_swiglu(15, 37, dtype, mode);
        run_relu_squared(1000, dtype, mode);
        // Falcon-H1-1.5B MLP width 4096 (gate | up = 8192), 2 tokens; Nemotron-H-8B's
        // relu² MLP width 21504, 2 tokens
        run_swiglu(2, 4096, dtype, mode);
        run_relu_squared(2 * 21504, dtype, mode);
    }
    run_swiglu(3, 40, DType::F32, Mode::Checked);
    run_swiglu(3, 40, DType::BF16, Mode::CheckedShuffled { seed: 1 });
    run_relu_squared(300, DType::F16, Mode::Checked);
}

#[test]
fn params_sizes_match_kernel_reads() {
    // The dispatches above bind exactly the struct's bytes; one field short must be a binding
    // fault, so each kernel's struct has exactly the Rust struct's size.
    let x = Tensor::full(0.5f32, (1, 1, 1, 8), &Device::Cpu).unwrap();
    let rot = RotaryArgs {
        x: &x,
        position_offset: 0,
        rotary_dim: 8,
        theta: 10_000.0,
    };
    let ex = ShortParams(HarnessExecutor::new(Mode::InOrder));
    type Run<'a> = Box<dyn Fn() -> Result<Option<Tensor>> + 'a>;
    let runs: [(&str, Run); 3] = [
        (
            "rotary",
            Box::new(|| metal_plan::rotary_embedding(&ex, &rot)),
        ),
        ("swiglu", Box::new(|| metal_plan::swiglu(&ex, &x))),
        (
            "relu_squared",
            Box::new(|| metal_plan::relu_squared(&ex, &x)),
        ),
    ];
    for (what, run) in runs {
        let err = run().unwrap_err();
        assert_eq!(
            ex.0.last_fault(),
            Some(msl_harness::FaultKind::Binding),
            "{what}: {err}"
        );
    }
}
