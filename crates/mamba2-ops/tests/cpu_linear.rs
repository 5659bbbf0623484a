//! The CPU fast path of `linear` against its reference `linear_slow` (Candle's matmul in f32),
//! for f32, f16 and bf16, on random shapes that include the real projection shapes of the
//! released models (mamba2-130m / 370m / 1.3b `in_proj`, `out_proj` and the 50288-row LM head).
//!
//! Every fast call is checked to have taken the fast path (`fast_path_count("linear")`), and in
//! debug builds (the test profile) the kernel's output starts NaN-poisoned, so an element it
//! fails to write cannot pass; the comparison also rejects NaN outright. The fallback cases (a
//! weight that is not row-major contiguous, `Backend::Reference`) check the opposite.

use candle_core::{DType, Device, IndexOp, Tensor};
use mamba2_ops::{fast_path_count, linear, linear_slow, linear_with, Backend};
use rand::{rngs::StdRng, Rng, SeedableRng};

mod support;
use support::{assert_close, flat};

/// Uniform in `[-scale, scale)`, converted to `dtype`.
fn rand_t(rng: &mut StdRng, dims: &[usize], scale: f32, dtype: DType) -> Tensor {
    support::symmetric(rng, dims, scale)
        .to_dtype(dtype)
        .unwrap()
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// `(atol, rtol)` per dtype, for outputs of magnitude ~1 (the inputs are scaled so): both sides
/// accumulate in f32 (in different orders), and a 16-bit output may land one rounding step apart
/// (f16: 2^-11 relative, bf16: 2^-8).
fn tol(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (2e-5, 2e-5),
        DType::F16 => (2e-3, 2e-3),
        DType::BF16 => (1.6e-2, 1.6e-2),
        _ => unreachable!(),
    }
}

/// How x is presented to the op.
#[derive(Clone, Copy, Debug)]
enum XLayout {
    /// `(rows, in)` contiguous.
    Flat,
    /// `(batch, seqlen, in)` contiguous, `batch * seqlen = rows`.
    Batched,
    /// `(rows, in)` narrowed out of a wider `(rows, in + 5)` tensor: row stride `in + 5`.
    Narrowed,
    /// `(rows, in)` as the transpose of an `(in, rows)` tensor: last dimension not unit-stride.
    Transposed,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    rows: usize,
    in_f: usize,
    out_f: usize,
    bias: bool,
    layout: XLayout,
}

fn make_x(rng: &mut StdRng, c: &Case, dtype: DType) -> Tensor {
    let (r, k) = (c.rows, c.in_f);
    match c.layout {
        XLayout::Flat => rand_t(rng, &[r, k], 1.0, dtype),
        XLayout::Batched => {
            let b = if r % 2 == 0 { 2 } else { 1 };
            rand_t(rng, &[b, r / b, k], 1.0, dtype)
        }
        XLayout::Narrowed => rand_t(rng, &[r, k + 5], 1.0, dtype)
            .narrow(1, 2, k)
            .unwrap(),
        XLayout::Transposed => rand_t(rng, &[k, r], 1.0, dtype).t().unwrap(),
    }
}

/// Runs one case in every dtype: the fast path must be taken once and match the reference.
fn check(rng: &mut StdRng, c: &Case) {
    for dtype in DTYPES {
        let x = make_x(rng, c, dtype); // (..., in_f)
                                       // Scaled so that the outputs are of magnitude ~1 whatever in_f.
        let w = rand_t(rng, &[c.out_f, c.in_f], (3.0 / c.in_f as f32).sqrt(), dtype); // (out_f, in_f)
        let b = c.bias.then(|| rand_t(rng, &[c.out_f], 1.0, dtype)); // (out_f)
        support::init_options();
        let before = fast_path_count("linear");
        let y = linear(&x, &w, b.as_ref()).unwrap(); // (..., out_f)
        assert_eq!(
            fast_path_count("linear") - before,
            1,
            "{c:?} {dtype:?}: fast path not taken"
        );
        support::assert_tier("linear");
        let mut want_dims = x.dims().to_vec();
        *want_dims.last_mut().unwrap() = c.out_f;
        assert_eq!(y.dims(), &want_dims[..], "{c:?} {dtype:?}: output shape");
        let r = linear_slow(&x, &w, b.as_ref()).unwrap();
        assert_close(&format!("{c:?} {dtype:?}"), &y, &r, tol(dtype));
    }
}

/// The projection shapes of the released models, decode row counts (batch 1..16).
#[test]
fn real_projection_shapes() {
    let mut rng = StdRng::seed_from_u64(1);
    // (in_features, out_features): 130m in_proj / out_proj, 370m in_proj / out_proj, 1.3b
    // in_proj / out_proj.
    let shapes = [
        (768, 3352),
        (1536, 768),
        (1024, 4384),
        (2048, 1024),
        (2048, 8512),
        (4096, 2048),
    ];
    for (i, &(in_f, out_f)) in shapes.iter().enumerate() {
        for rows in [1, 2, 3, 4, 5, 8, 16] {
            let layout = [XLayout::Flat, XLayout::Batched][(i + rows) % 2];
            let bias = (i + rows) % 3 == 0;
            check(
                &mut rng,
                &Case {
                    rows,
                    in_f,
                    out_f,
                    bias,
                    layout,
                },
            );
        }
    }
}

/// The tied LM head of the 130m/370m vocabularies: 50288 rows, one and two x rows.
#[test]
fn lm_head_shape() {
    let mut rng = StdRng::seed_from_u64(2);
    for (rows, in_f) in [(1, 768), (2, 1024)] {
        check(
            &mut rng,
            &Case {
                rows,
                in_f,
                out_f: 50288,
                bias: false,
                layout: XLayout::Flat,
            },
        );
    }
}

/// Random shapes, odd sizes (not multiples of the 8/16-lane vectors nor of the 4-row tiles), all
/// x layouts, with and without bias.
#[test]
fn random_shapes_and_layouts() {
    let mut rng = StdRng::seed_from_u64(3);
    let layouts = [
        XLayout::Flat,
        XLayout::Batched,
        XLayout::Narrowed,
        XLayout::Transposed,
    ];
    for i in 0..60 {
        let c = Case {
            rows: rng.random_range(1..=16),
            in_f: rng.random_range(1..=300),
            out_f: rng.random_range(1..=130),
            bias: rng.random::<bool>(),
            layout: layouts[i % layouts.len()],
        };
        check(&mut rng, &c);
    }
}

/// Prefill row counts: several row blocks of the tiles, and (300 rows) the packed GEMM of
/// AVX-512 machines, over more rows than one x chunk (256) holds.
#[test]
fn many_rows() {
    let mut rng = StdRng::seed_from_u64(4);
    for (rows, in_f, out_f, bias) in [(17, 33, 50, true), (37, 64, 29, false), (300, 97, 70, true)]
    {
        check(
            &mut rng,
            &Case {
                rows,
                in_f,
                out_f,
                bias,
                layout: XLayout::Batched,
            },
        );
    }
}

/// Prefill shapes of a bf16 model, which AVX-512 BF16 machines multiply with `vdpbf16ps`
/// (`cpu/linear/gemm_bf16.rs`; even `in`, from 32 rows): a partial and several row panels, x
/// chunks (256 rows), partial 12- and 48-output groups, biases, the 130m and granite-1b
/// projection widths; odd `in` and fewer rows take the other kernels. Every dtype runs, so the
/// f32/f16 paths see the same shapes.
#[test]
fn bf16_prefill_shapes() {
    let mut rng = StdRng::seed_from_u64(6);
    for (i, &(rows, in_f, out_f)) in [
        (32, 2, 1),
        (33, 64, 13),
        (100, 768, 49),
        (300, 1536, 100),
        (513, 96, 48),
        (64, 95, 12),
        (31, 768, 7),
    ]
    .iter()
    .enumerate()
    {
        check(
            &mut rng,
            &Case {
                rows,
                in_f,
                out_f,
                bias: i % 2 == 0,
                layout: [XLayout::Flat, XLayout::Batched, XLayout::Narrowed][i % 3],
            },
        );
    }
}

/// Without NaN poisoning (release test builds) an unwritten element would be 0: check that no
/// element of a product of nonzero positive inputs is 0 or non-finite.
#[test]
fn every_output_element_is_written() {
    for dtype in DTYPES {
        for (rows, in_f, out_f) in [
            (1, 17, 37),
            (5, 40, 33),
            (16, 768, 101),
            (40, 19, 7),
            (300, 19, 50),
            (64, 20, 50),
            (300, 768, 13),
        ] {
            let x = Tensor::ones((rows, in_f), dtype, &Device::Cpu).unwrap();
            let w = Tensor::ones((out_f, in_f), dtype, &Device::Cpu).unwrap();
            let y = linear(&x, &w, None).unwrap();
            for (i, v) in flat(&y).into_iter().enumerate() {
                // Sums of in_f ones: exact in every dtype at these sizes.
                assert_eq!(v, in_f as f32, "{dtype:?} rows {rows}: element {i}");
            }
        }
    }
}

/// A weight that is not row-major contiguous (a transposed view) takes the reference, with the
/// same result; so does `Backend::Reference`.
#[test]
fn fallback_side() {
    let mut rng = StdRng::seed_from_u64(5);
    for dtype in DTYPES {
        let x = rand_t(&mut rng, &[3, 40], 1.0, dtype); // (rows, in)
        let w_t = rand_t(&mut rng, &[40, 24], 0.3, dtype); // (in, out)
        let w = w_t.t().unwrap(); // (out, in), column-major
        let w_c = w.contiguous().unwrap();
        let b = rand_t(&mut rng, &[24], 1.0, dtype);
        let before = fast_path_count("linear");
        let y = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(
            fast_path_count("linear"),
            before,
            "{dtype:?}: fast path taken"
        );
        let want = linear_slow(&x, &w, Some(&b)).unwrap();
        assert_close(
            &format!("transposed weight {dtype:?}"),
            &y,
            &want,
            (0.0, 0.0),
        );
        // The contiguous copy of the same weight does take the fast path, and agrees.
        let y_fast = linear(&x, &w_c, Some(&b)).unwrap();
        assert_eq!(fast_path_count("linear"), before + 1, "{dtype:?}");
        assert_close(
            &format!("contiguous weight {dtype:?}"),
            &y_fast,
            &want,
            tol(dtype),
        );
        let y_ref = linear_with(&x, &w_c, Some(&b), Backend::Reference).unwrap();
        assert_eq!(
            fast_path_count("linear"),
            before + 1,
            "{dtype:?}: Reference"
        );
        let want_c = linear_slow(&x, &w_c, Some(&b)).unwrap();
        assert_close(&format!("Reference {dtype:?}"), &y_ref, &want_c, (0.0, 0.0));
        // A weight slice at an offset (rows 8.. of a bigger matrix) is contiguous: fast path.
        let big = rand_t(&mut rng, &[30, 40], 0.3, dtype);
        let w_off = big.i(8..30).unwrap();
        let y_off = linear(&x, &w_off, None).unwrap();
        assert_eq!(
            fast_path_count("linear"),
            before + 2,
            "{dtype:?}: offset weight"
        );
        let want_off = linear_slow(&x, &w_off, None).unwrap();
        assert_close(
            &format!("offset weight {dtype:?}"),
            &y_off,
            &want_off,
            tol(dtype),
        );
    }
}

/// Bad arguments get typed errors before any path is chosen.
#[test]
fn bad_arguments_are_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((4, 7), DType::F32, &dev).unwrap();
    assert!(linear(&x, &w, None).is_err(), "in_features mismatch");
    let w16 = Tensor::zeros((4, 8), DType::F16, &dev).unwrap();
    assert!(linear(&x, &w16, None).is_err(), "dtype mismatch");
    let w = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
    let b = Tensor::zeros(5, DType::F32, &dev).unwrap();
    assert!(linear(&x, &w, Some(&b)).is_err(), "bias length");
}
