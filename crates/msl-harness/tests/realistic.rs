//! A kernel written like a product kernel (templates, host_name
//! instantiations, vector loads, simd_sum on float4, static and dynamic
//! threadgroup memory) against a plain reference, in every mode.

use half::f16;
use msl_harness::{Library, Mode};

#[repr(C)]
#[derive(Clone, Copy)]
struct NormParams {
    n: u32,
    eps: f32,
}
unsafe impl msl_harness::Pod for NormParams {}

fn reference(x: &[f32], w: &[f32], n: usize, eps: f32) -> Vec<f32> {
    x.chunks(n)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
            let s = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(v, w)| v * s * w)
        })
        .collect()
}

#[test]
fn rms_norm_matches_reference() {
    let lib = Library::compile(&[format!(
        "{}/tests/kernels/rmsnorm.metal",
        env!("CARGO_MANIFEST_DIR")
    )])
    .unwrap();
    let (rows, n) = (3usize, 200usize);
    let x: Vec<f32> = (0..rows * n)
        .map(|i| ((i * 29 % 17) as f32 - 8.0) / 4.0)
        .collect();
    let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
    let p = NormParams {
        n: n as u32,
        eps: 1e-5,
    };
    let want = reference(&x, &w, n, p.eps);
    // 96 threads: 3 simdgroups; 48 threads: a partial second simdgroup
    for (tg, mode) in [
        (96u32, Mode::InOrder),
        (48, Mode::Shuffled { seed: 3 }),
        (64, Mode::Checked),
    ] {
        let mut y = vec![f32::NAN; rows * n];
        lib.kernel("rms_norm_f32")
            .unwrap()
            .input(0, &x)
            .input(1, &w)
            .buffer(2, &mut y)
            .bytes(3, &p)
            .threadgroup_memory(0, 16 * tg.div_ceil(32).div_ceil(4) as usize)
            .grid([rows as u32, 1, 1])
            .threadgroup([tg, 1, 1])
            .mode(mode)
            .dispatch()
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        for (i, (g, r)) in y.iter().zip(&want).enumerate() {
            assert!(
                (g - r).abs() <= 1e-5 * (1.0 + r.abs()),
                "{mode:?} [{i}] {g} vs {r}"
            );
        }
    }
    let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    let mut y = vec![f16::NAN; rows * n];
    lib.kernel("rms_norm_f16")
        .unwrap()
        .input(0, &xh)
        .input(1, &wh)
        .buffer(2, &mut y)
        .bytes(3, &p)
        .threadgroup_memory(0, 16)
        .grid([rows as u32, 1, 1])
        .threadgroup([64, 1, 1])
        .mode(Mode::Checked)
        .dispatch()
        .unwrap();
    for (i, (g, r)) in y.iter().zip(&want).enumerate() {
        assert!(
            (g.to_f32() - r).abs() <= 2e-3 * (1.0 + r.abs()),
            "f16 [{i}] {g} vs {r}"
        );
    }
}
