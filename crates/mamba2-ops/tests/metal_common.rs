//! Helpers shared by the MSL-harness tests (`metal_harness*.rs`, `metal_layer.rs`): the plan
//! executor over the harness (`support/metal_exec.rs`), random inputs, the tolerance table.
//! The tests call the plan functions of `mamba2_ops::metal_plan`, the code the Metal dispatch
//! runs, and never bind buffers themselves.
#![allow(dead_code)]

#[path = "support/metal_exec.rs"]
mod metal_exec;
#[allow(unused_imports)] // not every test binary runs plans
pub use metal_exec::*;

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng};

pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// `(atol, rtol)` per output dtype: a kernel output passes when
/// `|got - want| <= atol + rtol * |want|` element-wise. Kernels and references both compute in
/// f32 and round once to the output dtype, so the half/bfloat tolerances cover one rounding step
/// of the output (2^-11, 2^-8) plus f32 summation-order differences.
pub fn tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (2e-5, 2e-4),
        DType::F16 => (2e-3, 2e-3),
        DType::BF16 => (1e-2, 1e-2),
        other => panic!("no tolerance for {other:?}"),
    }
}

pub fn dtype_suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => panic!("no kernel variant for {other:?}"),
    }
}

pub fn kernel_name(op: &str, dtype: DType) -> String {
    format!("{op}_{}", dtype_suffix(dtype))
}

/// Random values uniform in `[-scale, scale)`, rounded to `dtype`.
pub fn rand_t(rng: &mut StdRng, dims: &[usize], scale: f32, dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Random values uniform in `[lo, hi)`, f32.
pub fn rand_range(rng: &mut StdRng, dims: &[usize], lo: f32, hi: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| lo + rng.random::<f32>() * (hi - lo))
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// `(batch, seqlen)` u32 packed-sequence ids: runs of random lengths, ids increasing, with one
/// id repeated after a different one in row 0 (a new run, not a continuation).
pub fn seq_ids(rng: &mut StdRng, batch: usize, seqlen: usize) -> Tensor {
    let mut v = Vec::with_capacity(batch * seqlen);
    for b in 0..batch {
        let mut id = 0u32;
        let mut row = Vec::with_capacity(seqlen);
        while row.len() < seqlen {
            let len = 1 + rng.random_range(0..(seqlen / 2).max(2));
            for _ in 0..len.min(seqlen - row.len()) {
                row.push(id);
            }
            id += 1;
        }
        if b == 0 && seqlen >= 6 {
            // ids [.., 1, 0, ..]: the reference splits on any change, so 0 again is a new run
            let t = seqlen - 3;
            row[t] = 0;
            row[t + 1] = 0;
        }
        v.extend(row);
    }
    Tensor::from_vec(v, (batch, seqlen), &Device::Cpu).unwrap()
}

/// Element-wise `|got - want| <= atol + rtol * |want|` with the tolerance of `dtype`; NaN
/// anywhere fails. Reports the worst element.
pub fn assert_close(got: &Tensor, want: &Tensor, dtype: DType, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g: Vec<f32> = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f32> = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (atol, rtol) = tolerance(dtype);
    // false for NaN on either side
    let within = |a: f32, b: f32| (a - b).abs() <= atol + rtol * b.abs();
    let excess = |a: f32, b: f32| {
        let e = (a - b).abs() - (atol + rtol * b.abs());
        if e.is_nan() {
            f32::INFINITY
        } else {
            e
        }
    };
    let mut worst: Option<(usize, f32)> = None;
    let mut bad = 0;
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        if !within(a, b) {
            bad += 1;
            let e = excess(a, b);
            if worst.is_none_or(|(_, we)| e > we) {
                worst = Some((i, e));
            }
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: {bad}/{} elements out of tolerance ({atol}, {rtol}); worst [{i}] got {} want {}",
            g.len(),
            g[i],
            w[i]
        );
    }
}
