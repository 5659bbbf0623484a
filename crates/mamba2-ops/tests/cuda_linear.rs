//! The CUDA `linear` fast path (`kernels/cuda/linear.cu`) against its reference computed on the
//! CPU, for f32/f16/bf16, the projection shapes of the real models, every kernel width, biases,
//! strided and misaligned views, and the other paths (cuBLAS beyond 4 rows, the reference for
//! unaligned widths) that must stay correct. Outputs are NaN-poisoned before the kernel runs. Skips without a CUDA device.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use mamba2_ops::{cuda_launch_count, linear, linear_slow};
use rand::{rngs::StdRng, SeedableRng};

mod support;
use support::{rel_err, symmetric as rand_t};

/// Tolerance per dtype: the output is rounded once to the dtype (bf16 8 bits, f16 11 bits).
fn tol(dt: DType) -> f32 {
    match dt {
        DType::F32 => 2e-6,
        DType::F16 => 1e-3,
        _ => 6e-3,
    }
}

fn cuda() -> Option<Device> {
    support::poisoned_cuda("CUDA linear test")
}

/// Runs one case; `fast` says whether the fast path must serve it (one launch) or fall back.
fn case(dev: &Device, rng: &mut StdRng, x32: &Tensor, n: usize, bias: bool, dt: DType, fast: bool) {
    let k = *x32.dims().last().unwrap();
    let w32 = rand_t(rng, &[n, k], 1.0 / (k as f32).sqrt());
    let b32 = bias.then(|| rand_t(rng, &[n], 0.5));
    // Inputs rounded to the dtype once, so the reference sees the same values.
    let x = x32.to_dtype(dt).unwrap();
    let w = w32.to_dtype(dt).unwrap();
    let b = b32.as_ref().map(|b| b.to_dtype(dt).unwrap());
    let want = linear_slow(&x, &w, b.as_ref()).unwrap(); // CPU reference
    let (xd, wd) = (x.to_device(dev).unwrap(), w.to_device(dev).unwrap());
    let bd = b.as_ref().map(|b| b.to_device(dev).unwrap());
    let before = cuda_launch_count();
    let got = linear(&xd, &wd, bd.as_ref()).unwrap();
    let launched = cuda_launch_count() - before;
    let what = format!(
        "linear {:?} x{:?} n={n} bias={bias} {dt:?}",
        x.dims(),
        x.layout().stride()
    );
    assert_eq!(launched, fast as u64, "{what}: fast path launches");
    assert_eq!(got.dims(), want.dims(), "{what}");
    assert_eq!(got.dtype(), dt, "{what}");
    let e = rel_err(&got, &want);
    println!("{what}: rel err {e:.2e}");
    assert!(e <= tol(dt), "{what}: rel err {e} > {}", tol(dt));
}

#[test]
fn linear_matches_reference_on_real_and_odd_shapes() {
    let Some(dev) = cuda() else { return };
    let mut rng = StdRng::seed_from_u64(7);
    // (in, out): mamba2-130m in/out_proj, 1.3b in/out_proj, 2.7b in_proj, odd widths.
    let shapes = [
        (768, 3352),
        (1536, 768),
        (2048, 8512),
        (4096, 2048),
        (2560, 10576),
        (64, 37),
        (24, 5),
    ];
    for dt in [DType::F32, DType::F16, DType::BF16] {
        for (i, &(k, n)) in shapes.iter().enumerate() {
            for rows in [1usize, 2, 3, 5, 8, 13, 16] {
                if k * n > 4_000_000 && rows > 3 && dt != DType::BF16 {
                    continue; // keep the CPU reference quick; bf16 covers every width
                }
                let x = rand_t(&mut rng, &[rows, k], 1.0);
                // Up to 4 rows our kernel; beyond, cuBLAS (no launch of ours).
                case(&dev, &mut rng, &x, n, (i + rows) % 2 == 0, dt, rows <= 4);
            }
        }
    }
}

#[test]
fn linear_lm_head_and_leading_dims() {
    let Some(dev) = cuda() else { return };
    let mut rng = StdRng::seed_from_u64(8);
    // The LM head of the real vocabulary, f32 logits source; and a (batch, 1, k) input.
    for rows in [1, 4, 16] {
        let x = rand_t(&mut rng, &[rows, 768], 1.0);
        case(&dev, &mut rng, &x, 50288, false, DType::BF16, rows <= 4);
    }
    let x = rand_t(&mut rng, &[3, 1, 256], 1.0);
    case(&dev, &mut rng, &x, 100, true, DType::F32, true);
}

#[test]
fn linear_views_and_fallbacks() {
    let Some(dev) = cuda() else { return };
    let mut rng = StdRng::seed_from_u64(9);
    for dt in [DType::F32, DType::BF16] {
        // A view into a wider row (as the projection parts are): aligned, no copy.
        let wide = rand_t(&mut rng, &[4, 512], 1.0).to_dtype(dt).unwrap();
        let xs = wide
            .narrow(1, 128, 256)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let (dev_wide, _) = (wide.to_device(&dev).unwrap(), ());
        let view = dev_wide.narrow(1, 128, 256).unwrap();
        let w = rand_t(&mut rng, &[96, 256], 0.1).to_dtype(dt).unwrap();
        let got = linear(&view, &w.to_device(&dev).unwrap(), None).unwrap();
        let want = linear_slow(&xs.to_dtype(dt).unwrap(), &w, None).unwrap();
        let e = rel_err(&got, &want);
        assert!(e <= tol(dt), "strided view {dt:?}: {e}");
        // A misaligned view (start offset of 3 elements) is copied, then served.
        let view = dev_wide.narrow(1, 3, 256).unwrap();
        let xs = wide.narrow(1, 3, 256).unwrap();
        let got = linear(&view, &w.to_device(&dev).unwrap(), None).unwrap();
        let want = linear_slow(&xs, &w, None).unwrap();
        let e = rel_err(&got, &want);
        assert!(e <= tol(dt), "misaligned view {dt:?}: {e}");
        // More rows than the kernel takes: cuBLAS serves (no launch of ours).
        let x = rand_t(&mut rng, &[17, 64], 1.0);
        case(&dev, &mut rng, &x, 40, true, dt, false);
    }
    // A 16-bit width that is not a multiple of 16 bytes falls back.
    let x = rand_t(&mut rng, &[2, 100], 1.0);
    case(&dev, &mut rng, &x, 33, false, DType::BF16, false);
}

/// Benchmark, not a test (`--ignored --nocapture`): the kernel against Candle's matmul (cuBLAS)
/// on the 1.3b projections for 1..16 rows, median of 50 synchronised calls after warm-up. Picks
/// the row count up to which the model's decode projections use the kernel.
#[test]
#[ignore]
fn bench_linear_vs_cublas() {
    let Some(dev) = cuda() else { return };
    let mut opts = mamba2_ops::options::current_options();
    opts.cuda.poison = false;
    mamba2_ops::options::with_options(&opts, || bench_linear(&dev));
}

fn bench_linear(dev: &Device) {
    let mut rng = StdRng::seed_from_u64(10);
    let time = |f: &dyn Fn()| {
        for _ in 0..5 {
            f();
        }
        dev.synchronize().unwrap();
        let mut t: Vec<f64> = (0..50)
            .map(|_| {
                let t0 = std::time::Instant::now();
                f();
                dev.synchronize().unwrap();
                t0.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[25]
    };
    for (k, n) in [(2048, 8512), (4096, 2048), (2048, 50288)] {
        let w = rand_t(&mut rng, &[n, k], 0.02)
            .to_dtype(DType::BF16)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        for rows in [1, 2, 4, 8, 16] {
            let x = rand_t(&mut rng, &[rows, k], 1.0)
                .to_dtype(DType::BF16)
                .unwrap()
                .to_device(&dev)
                .unwrap();
            let ours = time(&|| {
                linear(&x, &w, None).unwrap();
            });
            let cublas = time(&|| {
                x.matmul(&w.t().unwrap()).unwrap();
            });
            let gbs = (n * k * 2) as f64 / ours / 1e3;
            println!("linear bf16 k={k} n={n} rows={rows}: ours {ours:.1} us ({gbs:.0} GB/s), cuBLAS {cublas:.1} us, ratio {:.2}", cublas / ours);
        }
    }
}
