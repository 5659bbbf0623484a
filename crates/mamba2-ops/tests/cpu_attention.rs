//! `causal_attention`: the CPU fast path against the plain-tensor reference, the reference
//! against a per-element loop, prefill / continued prefill / decode invariance, fallbacks and
//! bad inputs.
//!
//! Tolerances, `|fast - reference| <= atol + rtol |reference|` per element (`support::assert_close`):
//!
//! | dtype | atol | rtol | why                                                             |
//! |-------|------|------|-----------------------------------------------------------------|
//! | f32   | 1e-6 | 1e-5 | f32 throughout; online vs one-shot softmax, `exp` within 1 ulp  |
//! | f16   | 1e-5 | 2e-3 | both round an f32 value once: at most one f16 step (2^-10) apart |
//! | bf16  | 1e-5 | 1e-2 | likewise, one bf16 step (2^-7 = 7.8e-3 relative)                |
//!
//! Inputs are uniform in [-1, 1) (f32 rounded to the dtype); outputs are O(1) for short
//! prefills and O(0.05) for decode against thousands of keys (hence the small atol). Every fast
//! call is checked to have taken the fast path (`fast_path_count`), and in debug builds (the test
//! profile) the fast path starts from a NaN-poisoned output, so an element it never writes fails
//! the comparison; q_len and kv_len are mostly not multiples of the kernel's blocks (query blocks
//! of 128 / rep positions, key blocks of 256), and head_dims 8, 40 and 80 leave vector tails.
//!
//! Model shapes (attention heads / kv heads / head_dim): Nemotron-H-8B 32/8/128; Granite-4.0-H-1B
//! 12/4/128 (assumed: hidden 1536, not checked against the released config); Falcon-H1-1.5B
//! 8/2/128 (hidden 2048); Bamba-9B 32/8/128 (its partial rotary is in `cpu_rotary_mlp.rs`).

use candle_core::{DType, Device, Tensor};
use mamba2_ops::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod support;
use support::{assert_close, flat};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn tol(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-6, 1e-5),
        DType::F16 => (1e-5, 2e-3),
        DType::BF16 => (1e-5, 1e-2),
        _ => unreachable!(),
    }
}

/// Runs `f` and checks it took the CPU fast path of `causal_attention` exactly `n` times.
#[track_caller]
fn fast<T>(n: usize, f: impl FnOnce() -> T) -> T {
    support::init_options();
    let before = fast_path_count("causal_attention");
    let out = f();
    assert_eq!(
        fast_path_count("causal_attention") - before,
        n,
        "fast path calls"
    );
    out
}

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    q_len: usize,
    kv_len: usize,
    /// KV-cache capacity (dim 1); k and v are narrowed out of it from `start`.
    cap: usize,
    start: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

fn case(
    (batch, q_len, kv_len, cap): (usize, usize, usize, usize),
    (heads, kv_heads, head_dim): (usize, usize, usize),
) -> Case {
    Case {
        batch,
        q_len,
        kv_len,
        cap,
        start: 0,
        heads,
        kv_heads,
        head_dim,
        scale: (head_dim as f64).powf(-0.5),
    }
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

impl Inputs {
    fn new(rng: &mut StdRng, c: &Case, dtype: DType) -> Self {
        let cache = |rng: &mut StdRng| {
            support::symmetric(rng, &[c.batch, c.cap, c.kv_heads, c.head_dim], 1.0)
                .to_dtype(dtype)
                .unwrap()
                .narrow(1, c.start, c.kv_len)
                .unwrap()
        };
        let q = support::symmetric(rng, &[c.batch, c.q_len, c.heads, c.head_dim], 1.0)
            .to_dtype(dtype)
            .unwrap();
        Self {
            q,
            k: cache(rng),
            v: cache(rng),
        }
    }

    fn args(&self, scale: f64) -> AttentionArgs<'_> {
        AttentionArgs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            scale,
        }
    }
}

fn parity_cases() -> Vec<Case> {
    let mut cases = vec![
        // Nemotron-H-8B: prefill (130 = 4 query blocks + 2), decode against a 600-key cache
        case((1, 130, 130, 160), (32, 8, 128)),
        case((1, 1, 600, 700), (32, 8, 128)),
        // Granite-4.0-H-1B (assumed 12/4/128): continued prefill, batch 2
        case((2, 40, 300, 320), (12, 4, 128)),
        // Falcon-H1-1.5B: prefill; decode (2 items: the keys are split and merged)
        case((1, 100, 100, 100), (8, 2, 128)),
        case((1, 1, 1500, 1600), (8, 2, 128)),
        // Bamba-9B: prefill longer than a key block, batch 3
        case((3, 70, 270, 300), (32, 8, 128)),
        // head_dim 16 and 80, MHA and MQA, first token, cache exactly full
        case((3, 37, 37, 50), (6, 3, 16)),
        case((1, 5, 19, 19), (4, 1, 80)),
        case((1, 1, 1, 8), (4, 2, 64)),
        case((2, 9, 300, 333), (3, 3, 16)),
        // MQA decode and a 3-query continuation against a long cache: split keys, q_len > 1
        case((1, 1, 2100, 2200), (4, 1, 64)),
        case((1, 3, 1030, 1100), (2, 1, 32)),
    ];
    // A window of the cache not starting at 0, a peaky softmax (scale 1 on |q·k| up to ~16),
    // a negative scale (the max is taken after scaling).
    cases.push(Case {
        start: 7,
        ..case((2, 20, 50, 64), (4, 2, 16))
    });
    cases.push(Case {
        scale: 1.0,
        ..case((1, 33, 33, 40), (2, 1, 16))
    });
    cases.push(Case {
        scale: -0.3,
        ..case((1, 17, 25, 25), (2, 2, 8))
    });
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..4 {
        let kv_heads = rng.random_range(1..4);
        let q_len = rng.random_range(1..150);
        let kv_len = q_len + rng.random_range(0..400);
        cases.push(case(
            (
                rng.random_range(1..4),
                q_len,
                kv_len,
                kv_len + rng.random_range(0..20),
            ),
            (
                kv_heads * rng.random_range(1..5),
                kv_heads,
                [8, 16, 40, 64, 128][rng.random_range(0..5)],
            ),
        ));
    }
    cases
}

#[test]
fn fast_path_matches_reference() {
    let mut rng = StdRng::seed_from_u64(1);
    for c in parity_cases() {
        for dtype in DTYPES {
            let inp = Inputs::new(&mut rng, &c, dtype);
            if c.cap > c.kv_len && c.batch > 1 {
                assert!(!inp.k.is_contiguous(), "k should be a narrowed cache view");
            }
            let out = fast(1, || causal_attention(&inp.args(c.scale)).unwrap());
            let want = causal_attention_with(&inp.args(c.scale), Backend::Reference).unwrap();
            assert_close(&format!("{c:?} {dtype:?}"), &out, &want, tol(dtype));
        }
    }
}

/// Per element, straight from the definition, in f64: no blocks, no masking tensor.
fn naive(c: &Case, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let (h, kh, d, ql, kl) = (c.heads, c.kv_heads, c.head_dim, c.q_len, c.kv_len);
    let mut out = vec![0f32; c.batch * ql * h * d];
    for b in 0..c.batch {
        for hi in 0..h {
            let g = hi / (h / kh);
            for i in 0..ql {
                let pos = kl - ql + i;
                let qi = &q[((b * ql + i) * h + hi) * d..][..d];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let kj = &k[((b * kl + j) * kh + g) * d..][..d];
                        let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                        dot * c.scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for e in 0..d {
                    let acc: f64 = (0..=pos)
                        .map(|j| w[j] * v[((b * kl + j) * kh + g) * d + e] as f64)
                        .sum();
                    out[((b * ql + i) * h + hi) * d + e] = (acc / z) as f32;
                }
            }
        }
    }
    out
}

#[test]
fn reference_matches_naive_loop() {
    let mut rng = StdRng::seed_from_u64(2);
    let cases = [
        case((2, 7, 7, 9), (4, 2, 8)),
        case((1, 1, 30, 40), (6, 2, 16)),
        case((3, 5, 12, 12), (3, 1, 5)),
        Case {
            scale: 2.0,
            start: 3,
            ..case((1, 130, 140, 150), (2, 2, 4)) // more than one reference query block
        },
    ];
    for c in cases {
        let inp = Inputs::new(&mut rng, &c, DType::F32);
        let want = naive(&c, &flat(&inp.q), &flat(&inp.k), &flat(&inp.v));
        let want = Tensor::from_vec(want, inp.q.dims(), &Device::Cpu).unwrap();
        let got = causal_attention_slow(&inp.args(c.scale)).unwrap();
        assert_close(&format!("reference {c:?}"), &got, &want, (2e-6, 2e-6));
        let got = causal_attention(&inp.args(c.scale)).unwrap();
        assert_close(&format!("fast {c:?}"), &got, &want, tol(DType::F32));
    }
}

/// Full prefill == prefill of a first part, then continuation pieces (queries split, keys
/// growing), then token-by-token decode, all against one pre-filled cache.
#[test]
fn prefill_continuation_and_decode_agree() {
    let mut rng = StdRng::seed_from_u64(3);
    for (c, backend) in [
        (case((2, 300, 300, 320), (8, 2, 64)), Backend::Auto),
        (case((1, 70, 70, 80), (12, 4, 32)), Backend::Auto),
        (case((1, 70, 70, 80), (4, 2, 16)), Backend::Reference),
    ] {
        for dtype in DTYPES {
            let inp = Inputs::new(&mut rng, &c, dtype);
            let full = causal_attention_with(&inp.args(c.scale), backend).unwrap();
            // pieces: a first part, two continuations (one longer than a query block), then
            // the remaining tokens one at a time
            let first = c.q_len / 3;
            let mut bounds = vec![0, first, first + 1, c.q_len - 6];
            bounds.extend(c.q_len - 5..=c.q_len);
            let mut outs = vec![];
            for w in bounds.windows(2) {
                let (a, b) = (w[0], w[1]);
                let q = inp.q.narrow(1, a, b - a).unwrap();
                let k = inp.k.narrow(1, 0, b).unwrap();
                let v = inp.v.narrow(1, 0, b).unwrap();
                let args = AttentionArgs {
                    q: &q,
                    k: &k,
                    v: &v,
                    scale: c.scale,
                };
                let n = usize::from(backend == Backend::Auto);
                outs.push(fast(n, || causal_attention_with(&args, backend).unwrap()));
            }
            let pieces = Tensor::cat(&outs, 1).unwrap();
            assert_close(
                &format!("{c:?} {dtype:?} {backend:?}"),
                &pieces,
                &full,
                tol(dtype),
            );
        }
    }
}

/// A strided head_dim in K or V falls back to the reference (no copy of the cache); so do
/// `Backend::Reference` and empty inputs.
#[test]
fn falls_back_when_preconditions_fail() {
    let mut rng = StdRng::seed_from_u64(4);
    let c = case((2, 6, 10, 10), (4, 2, 16));
    for dtype in DTYPES {
        let inp = Inputs::new(&mut rng, &c, dtype);
        // (batch, kv_len, head_dim, n_kv_heads) transposed: head_dim has stride n_kv_heads
        let strided = |t: &Tensor| {
            let s = t.transpose(2, 3).unwrap().contiguous().unwrap();
            s.transpose(2, 3).unwrap()
        };
        let (kt, vt) = (strided(&inp.k), strided(&inp.v));
        assert_eq!(kt.dims(), inp.k.dims());
        assert_ne!(kt.stride()[3], 1);
        for (k, v) in [(&kt, &inp.v), (&inp.k, &vt)] {
            let args = AttentionArgs {
                q: &inp.q,
                k,
                v,
                scale: c.scale,
            };
            let out = fast(0, || causal_attention(&args).unwrap());
            let want = causal_attention_slow(&args).unwrap();
            assert_close("strided head_dim", &out, &want, (0.0, 0.0));
            // and the values are those of the unit-stride layout
            let same = fast(1, || causal_attention(&inp.args(c.scale)).unwrap());
            assert_close("layout-independent", &out, &same, tol(dtype));
        }
        fast(0, || {
            causal_attention_with(&inp.args(c.scale), Backend::Reference).unwrap()
        });
        // q_len 0: nothing to compute, the reference returns the empty output
        let q0 = inp.q.narrow(1, 0, 0).unwrap();
        let args = AttentionArgs {
            q: &q0,
            ..inp.args(c.scale)
        };
        let out = fast(0, || causal_attention(&args).unwrap());
        assert_eq!(out.dims(), &[2, 0, 4, 16]);
        assert_eq!(out.dtype(), dtype);
    }
}

/// Asserts that every entry point rejects `(q, k, v, scale)` with an error `ok` accepts.
#[track_caller]
fn rejects(
    what: &str,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    scale: f64,
    ok: fn(&OpError) -> bool,
) {
    let args = AttentionArgs { q, k, v, scale };
    for (entry, r) in [
        ("auto", causal_attention(&args)),
        (
            "reference",
            causal_attention_with(&args, Backend::Reference),
        ),
        ("slow", causal_attention_slow(&args)),
    ] {
        match r {
            Err(e) => assert!(ok(&e), "{what} ({entry}): unexpected error {e}"),
            Ok(_) => panic!("{what} ({entry}): accepted"),
        }
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let t = |dims: &[usize], dtype: DType| Tensor::zeros(dims, dtype, &Device::Cpu).unwrap();
    let f = DType::F32;
    let (q, k) = (t(&[2, 3, 4, 8], f), t(&[2, 5, 2, 8], f));
    let shape_q: fn(&OpError) -> bool = |e| matches!(e, OpError::Shape { arg: "q", .. });
    let shape_k: fn(&OpError) -> bool = |e| matches!(e, OpError::Shape { arg: "k", .. });
    let bad_k = |dims: &[usize]| t(dims, f);
    rejects("q rank 3", (&t(&[2, 3, 32], f), &k, &k), 1.0, shape_q);
    rejects("k rank 5", (&q, &bad_k(&[2, 5, 2, 8, 1]), &k), 1.0, shape_k);
    for (what, dims) in [
        ("head_dim", [2, 5, 2, 16]),
        ("batch", [1, 5, 2, 8]),
        ("kv heads not dividing heads", [2, 5, 3, 8]),
        ("no kv heads", [2, 5, 0, 8]),
        ("kv_len < q_len", [2, 2, 2, 8]),
    ] {
        let kk = bad_k(&dims);
        rejects(what, (&q, &kk, &kk), 1.0, shape_k);
    }
    rejects("v shape", (&q, &k, &bad_k(&[2, 4, 2, 8])), 1.0, |e| {
        matches!(e, OpError::Shape { arg: "v", .. })
    });
    rejects(
        "q dtype",
        (&t(&[2, 3, 4, 8], DType::U32), &k, &k),
        1.0,
        |e| matches!(e, OpError::Dtype { arg: "q", .. }),
    );
    rejects(
        "k dtype",
        (&q, &t(&[2, 5, 2, 8], DType::F16), &k),
        1.0,
        |e| matches!(e, OpError::Dtype { arg: "k", .. }),
    );
    rejects(
        "v dtype",
        (&q, &k, &t(&[2, 5, 2, 8], DType::BF16)),
        1.0,
        |e| matches!(e, OpError::Dtype { arg: "v", .. }),
    );
    for scale in [f64::NAN, f64::INFINITY] {
        rejects("scale", (&q, &k, &k), scale, |e| {
            matches!(e, OpError::Param { param: "scale", .. })
        });
    }
    // Devices: a second device needs a GPU; `check::same_device` is shared with the other ops.
}
