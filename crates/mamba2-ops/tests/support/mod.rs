//! Helpers shared by the op test binaries (each `mod support;` compiles its own copy, so not
//! every binary uses every helper).
#![allow(dead_code)]

pub mod quantized;

use candle_core::{DType, Device, Tensor};
use mamba2_ops::options::{current_options, set_process_options, KernelOptions};
use rand::{rngs::StdRng, Rng};

/// Installs this test binary's kernel options once: the defaults overridden by the environment
/// (`MAMBA2_CPU_TIER=avx2` runs every CPU fast path on the AVX2 kernels, ...; see
/// `mamba2_ops::options::ENV_VARS`). The test harness is the edge where the environment is
/// read; helpers call this before their first op.
/// CUDA outputs are always NaN-poisoned in the tests, so that an element a kernel forgets to
/// write fails the comparison.
pub fn init_options() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut opts = KernelOptions::from_env().expect("kernel options from the environment");
        opts.cuda.poison = true;
        set_process_options(opts).expect("options set once");
    });
}

/// The ops whose CPU fast paths have kernels per instruction-set tier (AVX-512, AVX2, NEON,
/// generic) and record which one ran.
pub const TIERED_OPS: [&str; 5] = [
    "linear",
    "selective_state_update",
    "causal_conv1d_update",
    "gated_rms_norm",
    "rms_norm_residual",
];

/// Asserts that the last fast-path call of `op` on this thread ran the kernels of the tier in
/// force (the forced one, or the best this CPU has: NEON on aarch64, not the portable loops).
/// Nothing to check for ops without tier-specific kernels.
#[track_caller]
pub fn assert_tier(op: &str) {
    if TIERED_OPS.contains(&op) {
        let want = current_options().cpu.effective_tier();
        assert_eq!(
            mamba2_ops::fast_path_tier(op),
            Some(want),
            "{op}: kernels of the wrong instruction-set tier ran"
        );
    }
}

/// `dims` of values uniform in `[lo, hi)`, f32 on the CPU.
pub fn uniform(rng: &mut StdRng, dims: &[usize], lo: f32, hi: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| lo + rng.random::<f32>() * (hi - lo))
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// `dims` of values uniform in `[-scale, scale)`, f32 on the CPU.
pub fn symmetric(rng: &mut StdRng, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// The elements of `t` (any device, any float dtype) as f32, row-major.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Relative L2 error of `got` against `want`; a non-finite element of `got` (an unwritten,
/// NaN-poisoned output) gives NaN, which fails every `<=`.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    let (g, w) = (flat(got), flat(want));
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in g.iter().zip(&w) {
        if !a.is_finite() {
            return f32::NAN;
        }
        num += ((a - b) as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    (num.sqrt() / den.sqrt().max(1e-30)) as f32
}

/// Asserts `rel_err(got, want) <= tol`, printing the error (`--nocapture` records it).
#[track_caller]
pub fn check_rel(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let e = rel_err(got, want);
    println!("{what}: rel err {e:.3e} (tol {tol:.1e})");
    assert!(e <= tol, "{what}: rel err {e} > {tol}");
}

/// Asserts `|fast - reference| <= atol + rtol |reference|` elementwise, with equal shapes and
/// dtypes; NaN anywhere fails.
#[track_caller]
pub fn assert_close(what: &str, fast: &Tensor, reference: &Tensor, (atol, rtol): (f32, f32)) {
    assert_eq!(fast.dims(), reference.dims(), "{what}: shape");
    assert_eq!(fast.dtype(), reference.dtype(), "{what}: dtype");
    let (a, b) = (flat(fast), flat(reference));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if excess.is_nan() || excess > 0.0 {
            panic!("{what}: element {i}: fast {x} vs reference {y} (atol {atol}, rtol {rtol})");
        }
    }
}

/// The CUDA device with every output of the fast paths NaN-poisoned (the process options of
/// [`init_options`]), or `None` without one: the test `test` then skips and says why.
pub fn poisoned_cuda(test: &str) -> Option<Device> {
    init_options();
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("skipping {test}: no CUDA device ({e})");
            None
        }
    }
}
