//! `rotary_embedding`, `swiglu` and `relu_squared`: the CPU fast paths against the plain-tensor
//! references, the references against per-element loops from the formulas, fallbacks and bad
//! inputs.
//!
//! Tolerances, `|fast - reference| <= atol + rtol |reference|` per element:
//!
//! | op                 | f32          | f16          | bf16         | why                           |
//! |--------------------|--------------|--------------|--------------|-------------------------------|
//! | rotary_embedding   | exact        | exact        | exact        | the same f32 operations (`f32::cos`/`sin`, no FMA), rounded once |
//! | relu_squared       | exact        | exact        | exact        | the same f32 operations       |
//! | swiglu             | (1e-6, 1e-5) | (1e-5, 2e-3) | (1e-5, 1e-2) | `exp` within 1 ulp of std's; 16-bit: one rounding step |
//!
//! Every fast call is checked to have taken the fast path (`fast_path_count`); the fast paths
//! start from NaN-poisoned outputs in debug builds (the test profile), and every element is
//! compared, on shapes that are not multiples of any vector width.
//!
//! Model shapes: Bamba-9B attention (32 heads of 128, partial rotary 64, theta 1e4),
//! Granite-4.0-H-1B (assumed 12 heads of 128, full rotary, theta 1e4), Falcon-H1-1.5B
//! (8 heads of 128, full rotary, theta 1e11), Nemotron-H-8B's MLP (relu², 21504 wide).

use candle_core::{DType, Device, Tensor};
use mamba2_ops::*;
use rand::{rngs::StdRng, SeedableRng};

mod support;
use support::{assert_close, flat};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn swiglu_tol(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-6, 1e-5),
        DType::F16 => (1e-5, 2e-3),
        DType::BF16 => (1e-5, 1e-2),
        _ => unreachable!(),
    }
}

/// Runs `f` and checks it took the CPU fast path of `op` exactly `n` times.
#[track_caller]
fn fast<T>(op: &str, n: usize, f: impl FnOnce() -> T) -> T {
    support::init_options();
    let before = fast_path_count(op);
    let out = f();
    assert_eq!(fast_path_count(op) - before, n, "{op}: fast path calls");
    out
}

fn rand_t(rng: &mut StdRng, dims: &[usize], scale: f32, dtype: DType) -> Tensor {
    support::symmetric(rng, dims, scale)
        .to_dtype(dtype)
        .unwrap()
}

// ---------------------------------------------------------------- rotary

/// Accepts the expected error of a bad-input case.
type ErrCheck = dyn Fn(&OpError) -> bool;

#[derive(Clone, Copy, Debug)]
struct Rope {
    dims: [usize; 4],
    rotary_dim: usize,
    theta: f64,
    offset: usize,
}

fn rope(dims: [usize; 4], rotary_dim: usize, theta: f64, offset: usize) -> Rope {
    Rope {
        dims,
        rotary_dim,
        theta,
        offset,
    }
}

fn rope_cases() -> Vec<Rope> {
    vec![
        rope([1, 70, 32, 128], 64, 1e4, 0), // Bamba-9B prefill, partial rotary
        rope([2, 1, 8, 128], 64, 1e4, 4097), // Bamba-9B kv heads, decode
        rope([1, 300, 12, 128], 128, 1e4, 0), // Granite-4.0-H-1B (assumed), parallel rows
        rope([1, 3, 8, 128], 128, 1e11, 100_000), // Falcon-H1-1.5B, far positions
        rope([3, 5, 4, 16], 8, 1e6, 7),
        rope([1, 9, 3, 80], 80, 5e5, 0),
        rope([2, 4, 2, 6], 0, 1e4, 3), // nothing rotated
        rope([1, 2, 1, 2], 2, 10.0, 1),
    ]
}

#[test]
fn rotary_matches_reference() {
    let mut rng = StdRng::seed_from_u64(21);
    for c in rope_cases() {
        for dtype in DTYPES {
            let x = rand_t(&mut rng, &c.dims, 2.0, dtype);
            // also as a view of the query part of a fused q/k/v projection
            let [b, s, h, d] = c.dims;
            let fused = rand_t(&mut rng, &[b, s, h + 3, d], 2.0, dtype);
            let xv = fused.narrow(2, 1, h).unwrap();
            for x in [&x, &xv] {
                let args = RotaryArgs {
                    x,
                    position_offset: c.offset,
                    rotary_dim: c.rotary_dim,
                    theta: c.theta,
                };
                let y = fast("rotary_embedding", 1, || rotary_embedding(&args).unwrap());
                let yr = rotary_embedding_with(&args, Backend::Reference).unwrap();
                assert_close(&format!("{c:?} {dtype:?}"), &y, &yr, (0.0, 0.0));
            }
        }
    }
}

/// The formula, per element, with the angle of each frequency computed in f32 as torch does
/// and the rotation in f64.
fn rope_naive(c: &Rope, x: &[f32]) -> Vec<f32> {
    let [b, s, h, d] = c.dims;
    let (rd, half) = (c.rotary_dim, c.rotary_dim / 2);
    let mut out = x.to_vec();
    for bi in 0..b {
        for t in 0..s {
            let pos = (c.offset + t) as f32;
            for hi in 0..h {
                let row = ((bi * s + t) * h + hi) * d;
                for i in 0..rd {
                    let f = i % half;
                    let inv = 1.0 / (c.theta as f32).powf((2 * f) as f32 / rd as f32);
                    let angle = (pos * inv) as f64;
                    let rot = if i < half {
                        -(x[row + i + half] as f64)
                    } else {
                        x[row + i - half] as f64
                    };
                    out[row + i] = (x[row + i] as f64 * angle.cos() + rot * angle.sin()) as f32;
                }
            }
        }
    }
    out
}

#[test]
fn rotary_reference_matches_formula() {
    let mut rng = StdRng::seed_from_u64(22);
    for c in rope_cases() {
        let x = rand_t(&mut rng, &c.dims, 2.0, DType::F32);
        let args = RotaryArgs {
            x: &x,
            position_offset: c.offset,
            rotary_dim: c.rotary_dim,
            theta: c.theta,
        };
        let want = Tensor::from_vec(rope_naive(&c, &flat(&x)), &c.dims, &Device::Cpu).unwrap();
        let got = rotary_embedding_slow(&args).unwrap();
        // f32 cos/sin of angles up to 1e5 rad vs f64 ones of the same f32 angle
        assert_close(&format!("{c:?}"), &got, &want, (2e-6, 2e-6));
    }
}

/// Rotating a sequence at once equals rotating its pieces at their own offsets; position 0 is
/// the identity.
#[test]
fn rotary_pieces_and_identity() {
    let mut rng = StdRng::seed_from_u64(23);
    let x = rand_t(&mut rng, &[2, 50, 4, 32], 1.0, DType::BF16);
    fn args(x: &Tensor, position_offset: usize) -> RotaryArgs<'_> {
        RotaryArgs {
            x,
            position_offset,
            rotary_dim: 16,
            theta: 1e4,
        }
    }
    let full = rotary_embedding(&args(&x, 10)).unwrap();
    let mut pieces = vec![];
    for (a, b) in [(0, 17), (17, 18), (18, 50)] {
        let xs = x.narrow(1, a, b - a).unwrap();
        pieces.push(rotary_embedding(&args(&xs, 10 + a)).unwrap());
    }
    assert_close(
        "pieces",
        &Tensor::cat(&pieces, 1).unwrap(),
        &full,
        (0.0, 0.0),
    );
    let x0 = x.narrow(1, 0, 1).unwrap();
    assert_close(
        "identity",
        &rotary_embedding(&args(&x0, 0)).unwrap(),
        &x0,
        (0.0, 0.0),
    );
}

#[test]
fn rotary_fallbacks_and_bad_inputs() {
    let dev = Device::Cpu;
    let x = Tensor::ones((1, 2, 3, 8), DType::F32, &dev).unwrap();
    let args = |x, rotary_dim, theta| RotaryArgs {
        x,
        position_offset: 0,
        rotary_dim,
        theta,
    };
    fast("rotary_embedding", 0, || {
        rotary_embedding_with(&args(&x, 8, 1e4), Backend::Reference).unwrap()
    });
    let empty = x.narrow(1, 0, 0).unwrap();
    let y = fast("rotary_embedding", 0, || {
        rotary_embedding(&args(&empty, 8, 1e4)).unwrap()
    });
    assert_eq!(y.dims(), &[1, 0, 3, 8]);
    let param = |p: &'static str| move |e: &OpError| matches!(e, OpError::Param { param, .. } if *param == p);
    let x3 = Tensor::ones((2, 3, 8), DType::F32, &dev).unwrap();
    let xi = Tensor::ones((1, 2, 3, 8), DType::U32, &dev).unwrap();
    let cases: [(&str, RotaryArgs, &ErrCheck); 8] = [
        ("odd rotary_dim", args(&x, 5, 1e4), &param("rotary_dim")),
        (
            "rotary_dim > head_dim",
            args(&x, 10, 1e4),
            &param("rotary_dim"),
        ),
        ("theta 0", args(&x, 8, 0.0), &param("theta")),
        ("theta < 0", args(&x, 8, -1e4), &param("theta")),
        ("theta NaN", args(&x, 8, f64::NAN), &param("theta")),
        ("theta inf", args(&x, 8, f64::INFINITY), &param("theta")),
        ("rank 3", args(&x3, 8, 1e4), &|e| {
            matches!(e, OpError::Shape { arg: "x", .. })
        }),
        ("u32", args(&xi, 8, 1e4), &|e| {
            matches!(e, OpError::Dtype { arg: "x", .. })
        }),
    ];
    for (what, a, ok) in cases {
        for r in [
            rotary_embedding(&a),
            rotary_embedding_with(&a, Backend::Reference),
            rotary_embedding_slow(&a),
        ] {
            match r {
                Err(e) => assert!(ok(&e), "{what}: unexpected error {e}"),
                Ok(_) => panic!("{what}: accepted"),
            }
        }
    }
}

// ---------------------------------------------------------------- MLP activations

/// Inputs of the activation tests: contiguous tensors of several ranks, a narrowed view of a
/// wider projection (strided rows), and large enough ones for the parallel path.
fn activation_inputs(rng: &mut StdRng, dtype: DType) -> Vec<Tensor> {
    let mut v = vec![
        rand_t(rng, &[2], 4.0, dtype),
        rand_t(rng, &[3, 10], 4.0, dtype),
        rand_t(rng, &[1, 7, 2 * 37], 4.0, dtype),
        rand_t(rng, &[2, 3, 1, 2, 18], 4.0, dtype), // rank 5: flattened
        rand_t(rng, &[300, 2 * 144], 4.0, dtype),   // parallel rows
        rand_t(rng, &[1, 2, 2 * 21504], 4.0, dtype), // Nemotron-H-8B MLP width
    ];
    let wide = rand_t(rng, &[2, 5, 3 + 2 * 24 + 7], 4.0, dtype);
    v.push(wide.narrow(2, 3, 2 * 24).unwrap());
    v
}

#[test]
fn swiglu_matches_reference_and_formula() {
    let mut rng = StdRng::seed_from_u64(31);
    for dtype in DTYPES {
        for x in activation_inputs(&mut rng, dtype) {
            let y = fast("swiglu", 1, || swiglu(&x).unwrap());
            let yr = swiglu_with(&x, Backend::Reference).unwrap();
            let what = format!("swiglu {:?} {dtype:?}", x.dims());
            assert_close(&what, &y, &yr, swiglu_tol(dtype));
            // the reference against silu(gate) · up per element, in f64
            let n = x.dims().last().unwrap() / 2;
            let xs = flat(&x);
            let want: Vec<f32> = xs
                .chunks_exact(2 * n)
                .flat_map(|row| {
                    (0..n).map(move |i| {
                        let (g, u) = (row[i] as f64, row[n + i] as f64);
                        (g / (1.0 + (-g).exp()) * u) as f32
                    })
                })
                .collect();
            let want = Tensor::from_vec(want, yr.dims(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            assert_close(&format!("{what} vs formula"), &yr, &want, swiglu_tol(dtype));
        }
    }
}

#[test]
fn relu_squared_matches_reference_and_formula() {
    let mut rng = StdRng::seed_from_u64(32);
    for dtype in DTYPES {
        for x in activation_inputs(&mut rng, dtype) {
            let y = fast("relu_squared", 1, || relu_squared(&x).unwrap());
            let yr = relu_squared_with(&x, Backend::Reference).unwrap();
            let what = format!("relu_squared {:?} {dtype:?}", x.dims());
            assert_close(&what, &y, &yr, (0.0, 0.0));
            let want: Vec<f32> = flat(&x).iter().map(|v| v.max(0.0) * v.max(0.0)).collect();
            let want = Tensor::from_vec(want, x.dims(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            assert_close(&format!("{what} vs formula"), &yr, &want, (0.0, 0.0));
        }
    }
}

#[test]
fn activation_fallbacks_and_bad_inputs() {
    let dev = Device::Cpu;
    let x = Tensor::ones((2, 6), DType::BF16, &dev).unwrap();
    fast("swiglu", 0, || swiglu_with(&x, Backend::Reference).unwrap());
    fast("relu_squared", 0, || {
        relu_squared_with(&x, Backend::Reference).unwrap()
    });
    // empty and rank-0 inputs take the reference
    let empty = x.narrow(0, 0, 0).unwrap();
    let y = fast("swiglu", 0, || swiglu(&empty).unwrap());
    assert_eq!(y.dims(), &[0, 3]);
    let scalar = Tensor::new(-2f32, &dev).unwrap();
    let y = fast("relu_squared", 0, || relu_squared(&scalar).unwrap());
    assert_eq!(y.to_scalar::<f32>().unwrap(), 0.0);

    let shape = |e: &OpError| {
        matches!(
            e,
            OpError::Shape {
                op: "swiglu",
                arg: "x",
                ..
            }
        )
    };
    let dtype = |e: &OpError| matches!(e, OpError::Dtype { arg: "x", .. });
    let odd = Tensor::ones((2, 5), DType::F32, &dev).unwrap();
    let int = Tensor::ones((2, 6), DType::U32, &dev).unwrap();
    for (what, t, ok) in [
        ("odd last dim", &odd, &shape as &ErrCheck),
        ("rank 0", &scalar, &shape),
        ("u32", &int, &dtype),
    ] {
        for r in [
            swiglu(t),
            swiglu_with(t, Backend::Reference),
            swiglu_slow(t),
        ] {
            match r {
                Err(e) => assert!(ok(&e), "swiglu {what}: unexpected error {e}"),
                Ok(_) => panic!("swiglu {what}: accepted"),
            }
        }
    }
    for r in [
        relu_squared(&int),
        relu_squared_with(&int, Backend::Reference),
        relu_squared_slow(&int),
    ] {
        assert!(
            matches!(r, Err(ref e) if dtype(e)),
            "relu_squared u32: {r:?}"
        );
    }
}
