//! The CPU fast paths against the plain-tensor references, for f32, f16 and bf16 inputs.
//!
//! Every fast call is checked to have really taken the fast path (`fast_path_count`), and in debug
//! builds (the test profile) the fast kernels start from NaN-poisoned output buffers, so an
//! element they fail to write cannot pass the comparison. Fallback cases check the opposite.

use candle_core::{DType, Device, IndexOp, Tensor};
use mamba2_ops::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod support;
use support::assert_close;

fn rand_t(rng: &mut StdRng, dims: &[usize], lo: f32, hi: f32, dtype: DType) -> Tensor {
    support::uniform(rng, dims, lo, hi).to_dtype(dtype).unwrap()
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// `(atol, rtol)` per activation dtype: outputs are compared as `|fast - ref| <= atol + rtol |ref|`.
/// 16-bit outputs may land one rounding step apart (bf16: 2^-8 relative). States are f32 in every
/// case and use the f32 row.
fn tol(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (2e-4, 2e-4),
        DType::F16 => (2e-3, 2e-3),
        DType::BF16 => (1.6e-2, 1.6e-2),
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
    if n > 0 {
        support::assert_tier(op);
    }
    out
}

// ---------------------------------------------------------------- SSD chunk scan

#[derive(Clone, Copy, Debug)]
struct SsdCase {
    batch: usize,
    seqlen: usize,
    nheads: usize,
    headdim: usize,
    ngroups: usize,
    d_state: usize,
    chunk: usize,
    init: bool,
    z: bool,
    d: bool,
    dt_bias: bool,
    limit: (f64, f64),
}

struct SsdInputs {
    x: Tensor,
    dt: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Option<Tensor>,
    z: Option<Tensor>,
    dt_bias: Option<Tensor>,
    init: Option<Tensor>,
}

impl SsdInputs {
    fn new(rng: &mut StdRng, k: &SsdCase, dtype: DType) -> Self {
        let (bt, l, h, p, g, n) = (k.batch, k.seqlen, k.nheads, k.headdim, k.ngroups, k.d_state);
        Self {
            x: rand_t(rng, &[bt, l, h, p], -1.0, 1.0, dtype),
            dt: rand_t(rng, &[bt, l, h], -4.0, 1.0, dtype),
            a: rand_t(rng, &[h], -8.0, -0.5, DType::F32),
            b: rand_t(rng, &[bt, l, g, n], -1.0, 1.0, dtype),
            c: rand_t(rng, &[bt, l, g, n], -1.0, 1.0, dtype),
            d: k.d.then(|| rand_t(rng, &[h], 0.5, 1.5, dtype)),
            z: k.z.then(|| rand_t(rng, &[bt, l, h, p], -2.0, 2.0, dtype)),
            dt_bias: k.dt_bias.then(|| rand_t(rng, &[h], -2.0, 0.0, dtype)),
            init: k
                .init
                .then(|| rand_t(rng, &[bt, h, p, n], -1.0, 1.0, DType::F32)),
        }
    }

    fn args(&self) -> SsdArgs<'_> {
        SsdArgs {
            x: &self.x,
            dt: &self.dt,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: self.d.as_ref(),
            z: self.z.as_ref(),
            dt_bias: self.dt_bias.as_ref(),
            initial_state: self.init.as_ref(),
            seq_idx: None,
        }
    }
}

fn params(k: &SsdCase) -> SsdParams {
    SsdParams {
        chunk_size: k.chunk,
        dt_softplus: true,
        dt_limit: k.limit,
    }
}

const NO_LIMIT: (f64, f64) = (0.0, f64::INFINITY);

fn ssd_cases() -> Vec<SsdCase> {
    let base = SsdCase {
        batch: 1,
        seqlen: 300,
        nheads: 24,
        headdim: 64,
        ngroups: 1,
        d_state: 128,
        chunk: 256,
        init: true,
        z: true,
        d: true,
        dt_bias: true,
        limit: NO_LIMIT,
    };
    let mut cases = vec![
        // mamba2-130m mixer, seqlen not a multiple of the chunk, batch 2
        SsdCase { batch: 2, ..base },
        // ngroups 8, d_state 64, no initial state, binding dt limit, chunk 32
        SsdCase {
            seqlen: 77,
            nheads: 16,
            ngroups: 8,
            d_state: 64,
            chunk: 32,
            init: false,
            limit: (0.05, 0.3),
            ..base
        },
        // seqlen shorter than a chunk, 6 heads, no z/D/dt_bias
        SsdCase {
            batch: 3,
            seqlen: 5,
            nheads: 6,
            z: false,
            d: false,
            dt_bias: false,
            ..base
        },
        // single token
        SsdCase {
            seqlen: 1,
            nheads: 6,
            ngroups: 2,
            d_state: 64,
            ..base
        },
    ];
    // Random shapes (small, so the reference stays quick).
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..4 {
        let ngroups = [1, 2, 3][rng.random_range(0..3)];
        cases.push(SsdCase {
            batch: rng.random_range(1..3),
            seqlen: rng.random_range(1..90),
            nheads: ngroups * rng.random_range(1..4),
            headdim: [8, 16, 64][rng.random_range(0..3)],
            ngroups,
            d_state: [16, 64, 128][rng.random_range(0..3)],
            chunk: rng.random_range(1..40),
            init: rng.random(),
            z: rng.random(),
            d: rng.random(),
            dt_bias: rng.random(),
            limit: if rng.random() { (0.01, 0.5) } else { NO_LIMIT },
        });
    }
    cases
}

#[test]
fn ssd_chunk_scan_matches_reference() {
    let mut rng = StdRng::seed_from_u64(1);
    for case in ssd_cases() {
        for dtype in DTYPES {
            let inp = SsdInputs::new(&mut rng, &case, dtype);
            let p = params(&case);
            let (y, s) = fast("ssd_chunk_scan", 1, || {
                ssd_chunk_scan(&inp.args(), &p).unwrap()
            });
            let (yr, sr) = ssd_chunk_scan_with(&inp.args(), &p, Backend::Reference).unwrap();
            let what = format!("{case:?} {dtype:?}");
            assert_close(&format!("y {what}"), &y, &yr, tol(dtype));
            assert_close(&format!("state {what}"), &s, &sr, tol(DType::F32));
        }
    }
}

#[test]
fn ssd_chunk_scan_strided_inputs() {
    // x, B, C as views into a wider projection (the layout of Mamba-2's in_proj output).
    let mut rng = StdRng::seed_from_u64(2);
    let (l, h, p, n) = (70, 6, 16, 32);
    let wide = rand_t(&mut rng, &[1, l, h * p + 2 * n + 5], -1.0, 1.0, DType::F32);
    let x = wide
        .narrow(2, 0, h * p)
        .unwrap()
        .reshape((1, l, h, p))
        .unwrap();
    let b = wide.narrow(2, h * p, n).unwrap().unsqueeze(2).unwrap();
    let c = wide.narrow(2, h * p + n, n).unwrap().unsqueeze(2).unwrap();
    assert!(!b.is_contiguous());
    let dt = rand_t(&mut rng, &[1, h, l], -3.0, 1.0, DType::F32)
        .transpose(1, 2)
        .unwrap();
    let a = rand_t(&mut rng, &[h], -4.0, -1.0, DType::F32);
    let args = SsdArgs {
        x: &x,
        dt: &dt,
        a: &a,
        b: &b,
        c: &c,
        d: None,
        z: None,
        dt_bias: None,
        initial_state: None,
        seq_idx: None,
    };
    let prm = SsdParams {
        chunk_size: 16,
        ..Default::default()
    };
    let (y, s) = fast("ssd_chunk_scan", 1, || ssd_chunk_scan(&args, &prm).unwrap());
    let (yr, sr) = ssd_chunk_scan_with(&args, &prm, Backend::Reference).unwrap();
    assert_close("y", &y, &yr, tol(DType::F32));
    assert_close("state", &s, &sr, tol(DType::F32));
}

/// Packed sequences (`seq_idx`) give what running each sequence on its own gives.
#[test]
fn ssd_packed_equals_per_sequence() {
    let mut rng = StdRng::seed_from_u64(3);
    let lens = [40usize, 3, 90, 1, 30];
    let total: usize = lens.iter().sum();
    let case = SsdCase {
        batch: 1,
        seqlen: total,
        nheads: 6,
        headdim: 64,
        ngroups: 2,
        d_state: 64,
        chunk: 32,
        init: true,
        z: true,
        d: true,
        dt_bias: true,
        limit: NO_LIMIT,
    };
    for dtype in DTYPES {
        let inp = SsdInputs::new(&mut rng, &case, dtype);
        // ids 0,1,2,1,0: a repeated id after another one is still a new sequence
        let ids: Vec<u32> = lens
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n([0u32, 1, 2, 1, 0][i], n))
            .collect();
        let seq_idx = Tensor::from_vec(ids, (1, total), &Device::Cpu).unwrap();
        let prm = params(&case);
        let packed = SsdArgs {
            seq_idx: Some(&seq_idx),
            ..inp.args()
        };
        let (y, s) = fast("ssd_chunk_scan", 1, || {
            ssd_chunk_scan(&packed, &prm).unwrap()
        });
        let (yr, sr) = ssd_chunk_scan_with(&packed, &prm, Backend::Reference).unwrap();
        assert_close("packed y vs reference", &y, &yr, tol(dtype));
        assert_close("packed state vs reference", &s, &sr, tol(DType::F32));
        // Per-sequence loop with the fast path; the initial state belongs to the first one.
        let mut start = 0;
        let mut last_state = None;
        for (i, &n) in lens.iter().enumerate() {
            let seg = |t: &Tensor| t.narrow(1, start, n).unwrap();
            let (x, dt, b, c) = (seg(&inp.x), seg(&inp.dt), seg(&inp.b), seg(&inp.c));
            let z = inp.z.as_ref().map(seg);
            let args = SsdArgs {
                x: &x,
                dt: &dt,
                b: &b,
                c: &c,
                z: z.as_ref(),
                initial_state: if i == 0 { inp.init.as_ref() } else { None },
                ..inp.args()
            };
            let (ys, ss) = fast("ssd_chunk_scan", 1, || ssd_chunk_scan(&args, &prm).unwrap());
            assert_close(
                &format!("sequence {i} {dtype:?}"),
                &ys,
                &y.narrow(1, start, n).unwrap(),
                tol(dtype),
            );
            last_state = Some(ss);
            start += n;
        }
        assert_close("final state", &s, &last_state.unwrap(), tol(DType::F32));
    }
}

/// One-shot prefill = split prefill (state handed over) = prefill + token-by-token decode.
#[test]
fn ssd_prefill_split_and_decode_agree() {
    let mut rng = StdRng::seed_from_u64(4);
    let case = SsdCase {
        batch: 2,
        seqlen: 150,
        nheads: 24,
        headdim: 64,
        ngroups: 1,
        d_state: 128,
        chunk: 256,
        init: false,
        z: true,
        d: true,
        dt_bias: true,
        limit: NO_LIMIT,
    };
    let inp = SsdInputs::new(&mut rng, &case, DType::F32);
    let prm = params(&case);
    let (y, s) = ssd_chunk_scan(&inp.args(), &prm).unwrap();
    let cut = 137;
    let part = |t: &Tensor, a: usize, n: usize| t.narrow(1, a, n).unwrap();
    let (x1, dt1, b1, c1, z1) = (
        part(&inp.x, 0, cut),
        part(&inp.dt, 0, cut),
        part(&inp.b, 0, cut),
        part(&inp.c, 0, cut),
        part(inp.z.as_ref().unwrap(), 0, cut),
    );
    let first = SsdArgs {
        x: &x1,
        dt: &dt1,
        b: &b1,
        c: &c1,
        z: Some(&z1),
        ..inp.args()
    };
    let (y1, s1) = ssd_chunk_scan(&first, &prm).unwrap();
    assert_close("first part", &y1, &part(&y, 0, cut), tol(DType::F32));
    let rest = case.seqlen - cut;
    let (x2, dt2, b2, c2, z2) = (
        part(&inp.x, cut, rest),
        part(&inp.dt, cut, rest),
        part(&inp.b, cut, rest),
        part(&inp.c, cut, rest),
        part(inp.z.as_ref().unwrap(), cut, rest),
    );
    let second = SsdArgs {
        x: &x2,
        dt: &dt2,
        b: &b2,
        c: &c2,
        z: Some(&z2),
        initial_state: Some(&s1),
        ..inp.args()
    };
    let (y2, s2) = ssd_chunk_scan(&second, &prm).unwrap();
    assert_close("second part", &y2, &part(&y, cut, rest), tol(DType::F32));
    assert_close("split state", &s2, &s, tol(DType::F32));
    // Decode the rest token by token from the first part's state.
    let state = s1.copy().unwrap();
    for t in 0..rest {
        let tok = |v: &Tensor| v.i((.., cut + t)).unwrap();
        let (x, dt, b, c, z) = (
            tok(&inp.x),
            tok(&inp.dt),
            tok(&inp.b),
            tok(&inp.c),
            tok(inp.z.as_ref().unwrap()),
        );
        let args = StateUpdateArgs {
            state: &state,
            x: &x,
            dt: &dt,
            a: &inp.a,
            b: &b,
            c: &c,
            d: inp.d.as_ref(),
            z: Some(&z),
            dt_bias: inp.dt_bias.as_ref(),
        };
        let yt = fast("selective_state_update", 1, || {
            selective_state_update(&args, &prm).unwrap()
        });
        assert_close("decode", &yt, &y.i((.., cut + t)).unwrap(), tol(DType::F32));
    }
    assert_close("decoded state", &state, &s, tol(DType::F32));
}

// ---------------------------------------------------------------- selective state update

#[test]
fn selective_state_update_matches_reference() {
    let mut rng = StdRng::seed_from_u64(5);
    // (batch, nheads, headdim, ngroups, d_state, z, d, dt_bias, limit)
    let cases = [
        (1, 24, 64, 1, 128, true, true, true, NO_LIMIT),
        (3, 32, 64, 8, 128, true, true, true, (0.05, 0.2)),
        (2, 6, 64, 2, 64, false, false, false, NO_LIMIT),
        (1, 5, 20, 5, 37, true, false, true, NO_LIMIT),
    ];
    for (bt, h, p, g, n, has_z, has_d, has_bias, limit) in cases {
        for dtype in DTYPES {
            let prm = SsdParams {
                dt_limit: limit,
                ..Default::default()
            };
            let state = rand_t(&mut rng, &[bt, h, p, n], -1.0, 1.0, DType::F32);
            let state_ref = state.copy().unwrap();
            let a = rand_t(&mut rng, &[h], -8.0, -0.5, DType::F32);
            let d = has_d.then(|| rand_t(&mut rng, &[h], 0.5, 1.5, dtype));
            let bias = has_bias.then(|| rand_t(&mut rng, &[h], -2.0, 0.0, dtype));
            let ptr_before = data_addr(&state);
            // Several steps, so that state errors would compound.
            for step in 0..3 {
                let x = rand_t(&mut rng, &[bt, h, p], -1.0, 1.0, dtype);
                let dt = rand_t(&mut rng, &[bt, h], -4.0, 1.0, dtype);
                let b = rand_t(&mut rng, &[bt, g, n], -1.0, 1.0, dtype);
                let c = rand_t(&mut rng, &[bt, g, n], -1.0, 1.0, dtype);
                let z = has_z.then(|| rand_t(&mut rng, &[bt, h, p], -2.0, 2.0, dtype));
                let mk = |s| StateUpdateArgs {
                    state: s,
                    x: &x,
                    dt: &dt,
                    a: &a,
                    b: &b,
                    c: &c,
                    d: d.as_ref(),
                    z: z.as_ref(),
                    dt_bias: bias.as_ref(),
                };
                let y = fast("selective_state_update", 1, || {
                    selective_state_update(&mk(&state), &prm).unwrap()
                });
                let yr =
                    selective_state_update_with(&mk(&state_ref), &prm, Backend::Reference).unwrap();
                let what = format!("({bt},{h},{p},{g},{n}) {dtype:?} step {step}");
                assert_close(&format!("y {what}"), &y, &yr, tol(dtype));
                assert_close(
                    &format!("state {what}"),
                    &state,
                    &state_ref,
                    tol(DType::F32),
                );
            }
            assert_eq!(
                data_addr(&state),
                ptr_before,
                "the state is updated in place"
            );
        }
    }
}

/// Address of a CPU f32 tensor's buffer: unchanged by an in-place update.
fn data_addr(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.as_ptr() as usize,
        _ => panic!("expected CPU f32 storage"),
    }
}

#[test]
fn selective_state_update_falls_back() {
    let mut rng = StdRng::seed_from_u64(6);
    // headdim beyond the fast path's stack buffers
    let (bt, h, p, n) = (1, 2, 300, 16);
    let state = rand_t(&mut rng, &[bt, h, p, n], -1.0, 1.0, DType::F32);
    let state_ref = state.copy().unwrap();
    let x = rand_t(&mut rng, &[bt, h, p], -1.0, 1.0, DType::F32);
    let dt = rand_t(&mut rng, &[bt, h], -1.0, 1.0, DType::F32);
    let a = rand_t(&mut rng, &[h], -2.0, -1.0, DType::F32);
    let b = rand_t(&mut rng, &[bt, 1, n], -1.0, 1.0, DType::F32);
    let mk = |s| StateUpdateArgs {
        state: s,
        x: &x,
        dt: &dt,
        a: &a,
        b: &b,
        c: &b,
        d: None,
        z: None,
        dt_bias: None,
    };
    let prm = SsdParams::default();
    let y = fast("selective_state_update", 0, || {
        selective_state_update(&mk(&state), &prm).unwrap()
    });
    let yr = selective_state_update_slow(&mk(&state_ref), &prm).unwrap();
    assert_close("fallback y", &y, &yr, (0.0, 0.0));
    assert_close("fallback state", &state, &state_ref, (0.0, 0.0));
    // Backend::Reference never takes the fast path.
    fast("selective_state_update", 0, || {
        selective_state_update_with(&mk(&state), &prm, Backend::Reference).unwrap()
    });
}

// ---------------------------------------------------------------- conv1d

#[test]
fn causal_conv1d_matches_reference() {
    let mut rng = StdRng::seed_from_u64(8);
    // (batch, seqlen, channels, d_conv, bias, init, silu)
    let cases = [
        (2, 300, 1792, 4, true, true, true), // mamba2-130m conv channels
        (1, 3, 64, 4, true, true, true),     // shorter than the filter
        (3, 70, 33, 4, false, false, true),
        (1, 129, 48, 2, true, false, false),
        (2, 1, 40, 3, true, true, true),
    ];
    for (bt, l, ch, k, has_bias, has_init, silu) in cases {
        for dtype in DTYPES {
            let x = rand_t(&mut rng, &[bt, l, ch], -2.0, 2.0, dtype);
            let w = rand_t(&mut rng, &[ch, k], -1.0, 1.0, dtype);
            let bias = has_bias.then(|| rand_t(&mut rng, &[ch], -1.0, 1.0, dtype));
            let init = has_init.then(|| rand_t(&mut rng, &[bt, ch, k], -2.0, 2.0, DType::F32));
            let args = Conv1dArgs {
                x: &x,
                weight: &w,
                bias: bias.as_ref(),
                initial_state: init.as_ref(),
                seq_idx: None,
                silu,
            };
            let (y, s) = fast("causal_conv1d", 1, || causal_conv1d(&args).unwrap());
            let (yr, sr) = causal_conv1d_with(&args, Backend::Reference).unwrap();
            let what = format!("({bt},{l},{ch},{k}) {dtype:?}");
            assert_close(&format!("y {what}"), &y, &yr, tol(dtype));
            assert_close(&format!("state {what}"), &s, &sr, (0.0, 0.0));
        }
    }
}

#[test]
fn causal_conv1d_packed_equals_per_sequence() {
    let mut rng = StdRng::seed_from_u64(9);
    let lens = [70usize, 2, 1, 100];
    let total: usize = lens.iter().sum();
    let (ch, k) = (40, 4);
    for dtype in DTYPES {
        let x = rand_t(&mut rng, &[1, total, ch], -2.0, 2.0, dtype);
        let w = rand_t(&mut rng, &[ch, k], -1.0, 1.0, dtype);
        let bias = rand_t(&mut rng, &[ch], -1.0, 1.0, dtype);
        let init = rand_t(&mut rng, &[1, ch, k], -2.0, 2.0, DType::F32);
        let ids: Vec<u32> = lens
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n([3u32, 4, 3, 9][i], n))
            .collect();
        let seq_idx = Tensor::from_vec(ids, (1, total), &Device::Cpu).unwrap();
        let args = Conv1dArgs {
            x: &x,
            weight: &w,
            bias: Some(&bias),
            initial_state: Some(&init),
            seq_idx: Some(&seq_idx),
            silu: true,
        };
        let (y, s) = fast("causal_conv1d", 1, || causal_conv1d(&args).unwrap());
        let (yr, sr) = causal_conv1d_with(&args, Backend::Reference).unwrap();
        assert_close("packed y", &y, &yr, tol(dtype));
        assert_close("packed state", &s, &sr, (0.0, 0.0));
        let mut start = 0;
        let mut states = vec![];
        for (i, &n) in lens.iter().enumerate() {
            let xs = x.narrow(1, start, n).unwrap();
            let seg = Conv1dArgs {
                x: &xs,
                initial_state: if i == 0 { Some(&init) } else { None },
                seq_idx: None,
                ..args
            };
            let (ys, ss) = fast("causal_conv1d", 1, || causal_conv1d(&seg).unwrap());
            assert_close("sequence", &ys, &y.narrow(1, start, n).unwrap(), tol(dtype));
            states.push(ss);
            start += n;
        }
        assert_close("last state", &s, states.last().unwrap(), (0.0, 0.0));

        // conv_states_varlen on the same packing = each sequence's own final state (no initial
        // state: sequences start from zeros).
        let cu: Vec<usize> = std::iter::once(0)
            .chain(lens.iter().scan(0, |acc, &n| {
                *acc += n;
                Some(*acc)
            }))
            .collect();
        let x2 = x.squeeze(0).unwrap();
        let vs = fast("conv_states_varlen", 1, || {
            conv_states_varlen(&x2, &cu, k).unwrap()
        });
        let vr = conv_states_varlen_with(&x2, &cu, k, Backend::Reference).unwrap();
        assert_close("varlen states", &vs, &vr, (0.0, 0.0));
        for (i, w2) in cu.windows(2).enumerate() {
            let xs = x.narrow(1, w2[0], w2[1] - w2[0]).unwrap();
            let seg = Conv1dArgs {
                x: &xs,
                initial_state: None,
                seq_idx: None,
                ..args
            };
            let (_, ss) = causal_conv1d(&seg).unwrap();
            assert_close(
                "varlen vs per sequence",
                &vs.i(i).unwrap(),
                &ss.i(0).unwrap(),
                (0.0, 0.0),
            );
        }
    }
}

#[test]
fn causal_conv1d_update_matches_reference_and_prefill() {
    let mut rng = StdRng::seed_from_u64(10);
    for (bt, ch, k) in [(1, 1792, 4), (3, 37, 4), (2, 16, 2)] {
        for dtype in DTYPES {
            let l = 6;
            let x = rand_t(&mut rng, &[bt, l, ch], -2.0, 2.0, dtype);
            let w = rand_t(&mut rng, &[ch, k], -1.0, 1.0, dtype);
            let bias = rand_t(&mut rng, &[ch], -1.0, 1.0, dtype);
            let init = rand_t(&mut rng, &[bt, ch, k], -2.0, 2.0, DType::F32);
            let (y_pre, s_pre) = causal_conv1d(&Conv1dArgs {
                x: &x,
                weight: &w,
                bias: Some(&bias),
                initial_state: Some(&init),
                seq_idx: None,
                silu: true,
            })
            .unwrap();
            let state = init.copy().unwrap();
            let state_ref = init.copy().unwrap();
            let addr = data_addr(&state);
            for t in 0..l {
                let xt = x.i((.., t)).unwrap();
                let y = fast("causal_conv1d_update", 1, || {
                    causal_conv1d_update(&xt, &state, &w, Some(&bias), true).unwrap()
                });
                let yr = causal_conv1d_update_with(
                    &xt,
                    &state_ref,
                    &w,
                    Some(&bias),
                    true,
                    Backend::Reference,
                )
                .unwrap();
                assert_close("update y", &y, &yr, tol(dtype));
                assert_close("update state", &state, &state_ref, (0.0, 0.0));
                assert_close(
                    "update vs prefill",
                    &y,
                    &y_pre.i((.., t)).unwrap(),
                    tol(dtype),
                );
            }
            assert_close("state vs prefill", &state, &s_pre, (0.0, 0.0));
            assert_eq!(
                data_addr(&state),
                addr,
                "the conv state is updated in place"
            );
        }
    }
}

#[test]
fn causal_conv1d_update_falls_back_on_aliasing() {
    // x and the conv state are views of one buffer: the fast path would hold a read lock on the
    // storage it must write, so it declines and the reference runs.
    let mut rng = StdRng::seed_from_u64(11);
    let (bt, ch, k) = (2, 8, 4);
    let n = bt * ch * k;
    let buf = rand_t(&mut rng, &[1, n + bt * ch], -1.0, 1.0, DType::F32);
    let state = buf.narrow(1, 0, n).unwrap().reshape((bt, ch, k)).unwrap();
    let x = buf
        .narrow(1, n, bt * ch)
        .unwrap()
        .reshape((bt, ch))
        .unwrap();
    assert!(state.is_contiguous());
    let state_ref = state.copy().unwrap();
    let x_ref = x.copy().unwrap();
    let w = rand_t(&mut rng, &[ch, k], -1.0, 1.0, DType::F32);
    let y = fast("causal_conv1d_update", 0, || {
        causal_conv1d_update(&x, &state, &w, None, true).unwrap()
    });
    let yr = causal_conv1d_update_slow(&x_ref, &state_ref, &w, None, true).unwrap();
    assert_close("aliased y", &y, &yr, (0.0, 0.0));
    assert_close("aliased state", &state, &state_ref, (0.0, 0.0));
}

// ---------------------------------------------------------------- norms

#[test]
fn gated_rms_norm_matches_reference() {
    let mut rng = StdRng::seed_from_u64(12);
    // (leading dims, dim, group_size)
    let cases: [(&[usize], usize, usize); 4] = [
        (&[2, 300], 1536, 1536), // mamba2-130m, ngroups 1
        (&[1, 1], 2048, 256),    // decode, ngroups 8
        (&[3, 7], 96, 32),
        (&[5], 24, 24),
    ];
    for (lead, dim, gs) in cases {
        for dtype in DTYPES {
            let mut dims = lead.to_vec();
            dims.push(dim);
            let x = rand_t(&mut rng, &dims, -2.0, 2.0, dtype);
            let z = rand_t(&mut rng, &dims, -3.0, 3.0, dtype);
            let w = rand_t(&mut rng, &[dim], 0.5, 1.5, dtype);
            for (gate, nbg) in [(true, false), (true, true), (false, false)] {
                let args = GatedRmsNormArgs {
                    x: &x,
                    z: gate.then_some(&z),
                    weight: &w,
                    eps: 1e-5,
                    group_size: gs,
                    norm_before_gate: nbg,
                };
                let y = fast("gated_rms_norm", 1, || gated_rms_norm(&args).unwrap());
                let yr = gated_rms_norm_with(&args, Backend::Reference).unwrap();
                assert_close(
                    &format!("{dims:?} {gs} {dtype:?} {gate} {nbg}"),
                    &y,
                    &yr,
                    tol(dtype),
                );
            }
        }
    }
}

#[test]
fn rms_norm_residual_matches_reference() {
    let mut rng = StdRng::seed_from_u64(13);
    for dims in [vec![2usize, 300, 768], vec![1, 1, 1024], vec![3, 5, 40]] {
        let dim = *dims.last().unwrap();
        for dtype in DTYPES {
            let x = rand_t(&mut rng, &dims, -2.0, 2.0, dtype);
            for (res_dtype, w_dtype) in [(dtype, dtype), (DType::F32, DType::F32)] {
                let res = rand_t(&mut rng, &dims, -2.0, 2.0, res_dtype);
                let w = rand_t(&mut rng, &[dim], 0.5, 1.5, w_dtype);
                for residual in [None, Some(&res)] {
                    for fp32 in [false, true] {
                        let (n, r) = fast("rms_norm_residual", 1, || {
                            rms_norm_residual(&x, residual, &w, 1e-5, fp32).unwrap()
                        });
                        let (nr, rr) = rms_norm_residual_with(
                            &x,
                            residual,
                            &w,
                            1e-5,
                            fp32,
                            Backend::Reference,
                        )
                        .unwrap();
                        let what = format!("{dims:?} {dtype:?} {w_dtype:?} {fp32}");
                        assert_close(
                            &format!("normed {what}"),
                            &n,
                            &nr,
                            tol(w_dtype.max_16(dtype)),
                        );
                        assert_close(&format!("residual {what}"), &r, &rr, tol(r.dtype()));
                    }
                }
            }
        }
    }
}

/// The looser of two dtypes' tolerances (16-bit inputs make an f32 output as coarse as they are).
trait Looser {
    fn max_16(self, other: DType) -> DType;
}
impl Looser for DType {
    fn max_16(self, other: DType) -> DType {
        if self == DType::F32 {
            other
        } else {
            self
        }
    }
}
