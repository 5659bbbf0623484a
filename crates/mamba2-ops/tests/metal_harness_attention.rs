//! The causal attention Metal kernels (`kernels/metal/attention.metal`: decode + merge,
//! prefill, each in the head_dim <= 128 and `_hd256` variants) run on the CPU by the MSL
//! harness and compared with `causal_attention_slow`, for f32, f16 and bf16, in shuffled and
//! checked (race, bounds, uninitialised threadgroup reads) modes. K and V are views narrowed out
//! of larger caches (capacity > kv_len, a start offset, V in another layout), bound as the Metal
//! dispatch binds them: the cache's storage from the view's start offset on, with the view's
//! strides in the parameters. Outputs and partial results are NaN-poisoned before each run.
//! Every launch is the plan of `metal_plan::causal_attention_as` (kernel names, grids and key
//! splits from `metal_params::AttentionShape`), as the Metal dispatch encodes it.
//!
//! Requires clang >= 17 (see crates/msl-harness/README.md).

#[path = "metal_common.rs"]
mod metal_common;

use candle_core::{DType, Tensor};
use mamba2_ops::metal_params::*;
use mamba2_ops::metal_plan;
use mamba2_ops::*;
use metal_common::*;
use msl_harness::Mode;
use rand::{rngs::StdRng, SeedableRng};

/// `(atol, rtol)` of the attention output per dtype: `|got - want| <= atol + rtol |want|`.
/// Both sides compute in f32 from the same rounded inputs and round once: f32 differs by the
/// order of the sums (keys in another order, the scale folded into q, split and simdgroup
/// merges), f16/bf16 by that plus one rounding of the output (2^-11, 2^-8 relative).
const TOLERANCE: [(DType, f32, f32); 3] = [
    (DType::F32, 1e-5, 1e-4),
    (DType::F16, 2e-3, 2e-3),
    (DType::BF16, 1e-2, 1e-2),
];

fn tol(dtype: DType) -> (f32, f32) {
    let &(_, atol, rtol) = TOLERANCE.iter().find(|t| t.0 == dtype).unwrap();
    (atol, rtol)
}

/// Element-wise check against the table above; NaN anywhere fails. Reports the worst element.
fn check(got: &Tensor, want: &Tensor, dtype: DType, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let v = |t: &Tensor| -> Vec<f32> {
        let t = t.to_dtype(DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (g, w) = (v(got), v(want));
    let (atol, rtol) = tol(dtype);
    let mut worst: Option<(usize, f32)> = None;
    let mut bad = 0;
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        let excess = (a - b).abs() - (atol + rtol * b.abs());
        let excess = if excess.is_nan() {
            f32::INFINITY
        } else {
            excess
        };
        if excess > 0.0 {
            bad += 1;
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
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

/// Which kernel a case runs.
#[derive(Clone, Copy, Debug)]
enum Kernel {
    /// The decode kernel with the dispatch's own key splits.
    Decode,
    /// The decode kernel with this many key splits (the merge kernel when > 1).
    DecodeSplits(usize),
    /// The prefill kernel.
    Prefill,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    q_len: usize,
    kv_len: usize,
    /// Positions of the K and V caches (`>= start + kv_len`; 3 more for a head-major V).
    cap: usize,
    /// First cache position of the K/V views.
    start: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// V cache laid out `(batch, n_kv_heads, cap, head_dim)` (the view is its transpose).
    v_head_major: bool,
}

fn run_case(case: &Case, kernel: Kernel, dtype: DType, mode: Mode, seed: u64) {
    let Case {
        batch,
        q_len,
        kv_len,
        cap,
        start,
        n_heads,
        n_kv_heads: nkv,
        head_dim: hd,
        ..
    } = *case;
    let mut rng = StdRng::seed_from_u64(seed);
    // |q| up to 4: scores spread over a few units, so the softmax is far from uniform
    let q = rand_t(&mut rng, &[batch, q_len, n_heads, hd], 4.0, dtype);
    let k_cache = rand_t(&mut rng, &[batch, cap, nkv, hd], 1.0, dtype);
    let k = k_cache.narrow(1, start, kv_len).unwrap();
    let (_v_cache, v) = if case.v_head_major {
        let c = rand_t(&mut rng, &[batch, nkv, cap + 3, hd], 1.0, dtype);
        let v = c.transpose(1, 2).unwrap().narrow(1, start, kv_len).unwrap();
        (c, v)
    } else {
        let c = rand_t(&mut rng, &[batch, cap, nkv, hd], 1.0, dtype);
        let v = c.narrow(1, start, kv_len).unwrap();
        (c, v)
    };
    let scale = (hd as f64).powf(-0.5);
    let want = causal_attention_slow(&AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        scale,
    })
    .unwrap();

    let shape = AttentionShape {
        batch,
        q_len,
        n_heads,
        n_kv_heads: nkv,
        head_dim: hd,
        kv_len,
    };
    let launch = match kernel {
        Kernel::Decode => {
            let l = shape.launch().unwrap();
            assert!(l.kernel.starts_with("causal_attention_decode"), "{l:?}");
            l
        }
        Kernel::DecodeSplits(n) => shape.decode(n).unwrap(),
        Kernel::Prefill => shape.prefill().unwrap(),
    };
    let ex = HarnessExecutor::new(mode);
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        scale,
    };
    let what = format!(
        "{} {mode:?} {case:?} splits={}",
        kernel_name(launch.kernel, dtype),
        launch.n_splits
    );
    let out = metal_plan::causal_attention_as(&ex, &args, launch)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .expect("the plan takes this shape");
    let ran: Vec<String> = ex.take_ran().into_iter().map(|r| r.function).collect();
    let mut expect = vec![kernel_name(launch.kernel, dtype)];
    if launch.n_splits > 1 {
        expect.push(kernel_name("causal_attention_merge", dtype));
    }
    assert_eq!(ran, expect, "{what}");
    check(&out, &want, dtype, &what);
}

#[allow(clippy::too_many_arguments)]
fn case(
    batch: usize,
    q_len: usize,
    kv_len: usize,
    cap: usize,
    start: usize,
    heads: (usize, usize),
    head_dim: usize,
    v_head_major: bool,
) -> Case {
    Case {
        batch,
        q_len,
        kv_len,
        cap,
        start,
        n_heads: heads.0,
        n_kv_heads: heads.1,
        head_dim,
        v_head_major,
    }
}

/// Small decode shapes: one and several key splits, GQA and MHA, head_dim 64/80/32/256/36.
fn decode_cases() -> Vec<(Case, Kernel)> {
    vec![
        // one token, 37 cached positions of 50
        (case(1, 1, 37, 50, 0, (4, 2), 64, false), Kernel::Decode),
        // 3 speculative tokens, batch 3, V head-major, 3 splits merged
        (
            case(3, 3, 70, 81, 5, (6, 2), 80, true),
            Kernel::DecodeSplits(3),
        ),
        // MHA (rep 1), q_len == kv_len: the last splits are hidden from the first rows
        (
            case(2, 8, 8, 8, 0, (2, 2), 32, false),
            Kernel::DecodeSplits(4),
        ),
        // head_dim 256 (the _hd256 variant), 2 splits
        (
            case(1, 2, 20, 24, 2, (2, 1), 256, false),
            Kernel::DecodeSplits(2),
        ),
        // head_dim 36 (not a multiple of 8): the dispatch takes the decode kernel for 12 queries
        (case(1, 12, 30, 32, 0, (4, 2), 36, false), Kernel::Decode),
    ]
}

/// Small prefill shapes: prompt, continued prefill, a single query, head_dim 64/80/128/256.
fn prefill_cases() -> Vec<Case> {
    vec![
        // prompt of 13: rows 26 (a partial block), one key tile
        case(1, 13, 13, 16, 0, (4, 2), 64, false),
        // continued prefill: 20 new tokens after 25 cached, batch 3, V head-major, 2 key tiles
        case(3, 20, 45, 64, 3, (6, 3), 80, true),
        // one query through the prefill kernel
        case(2, 1, 40, 48, 0, (4, 1), 128, false),
        // head_dim 256: 16-key tiles
        case(1, 9, 21, 24, 1, (2, 1), 256, false),
        // rep 3: the block boundary (row 32) falls inside position 10's heads
        case(1, 14, 14, 14, 0, (3, 1), 64, false),
    ]
}

#[test]
fn attention_decode_matches_reference() {
    for (i, (c, kernel)) in decode_cases().iter().enumerate() {
        for dtype in DTYPES {
            let mode = Mode::Shuffled { seed: i as u64 };
            run_case(c, *kernel, dtype, mode, 100 + i as u64);
        }
    }
}

#[test]
fn attention_prefill_matches_reference() {
    for (i, c) in prefill_cases().iter().enumerate() {
        for dtype in DTYPES {
            let mode = Mode::Shuffled { seed: i as u64 };
            run_case(c, Kernel::Prefill, dtype, mode, 200 + i as u64);
        }
    }
}

#[test]
fn attention_checked() {
    // races, bounds and uninitialised threadgroup reads on small shapes
    let small = case(2, 3, 21, 24, 1, (4, 2), 64, true);
    run_case(
        &small,
        Kernel::DecodeSplits(3),
        DType::F32,
        Mode::Checked,
        300,
    );
    run_case(&small, Kernel::Decode, DType::BF16, Mode::Checked, 301);
    let prefill = case(1, 11, 40, 40, 0, (4, 2), 64, false);
    run_case(&prefill, Kernel::Prefill, DType::F32, Mode::Checked, 302);
    let mode = Mode::CheckedShuffled { seed: 7 };
    run_case(&prefill, Kernel::Prefill, DType::F16, mode, 303);
}

#[test]
fn attention_real_configs() {
    // Nemotron-H-8B: 32 heads, 8 kv heads, head_dim 128; one decode token after 299 cached
    // (the dispatch's own split: 3 ranges of 100 keys, merged)
    let nemotron = case(1, 1, 300, 320, 0, (32, 8), 128, false);
    let shape = AttentionShape {
        batch: 1,
        q_len: 1,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        kv_len: 300,
    };
    assert_eq!(shape.launch().unwrap().n_splits, 3);
    // Falcon-H1-1.5B: 8 heads, 2 kv heads, head_dim 128; batch 3, 2 speculative tokens
    let falcon_decode = case(3, 2, 150, 160, 0, (8, 2), 128, false);
    // Bamba-9B: 32 heads, 8 kv heads, head_dim 128; 16 prompt tokens after 24 cached
    let bamba = case(1, 16, 40, 48, 0, (32, 8), 128, false);
    // Falcon-H1-1.5B prefill, batch 3: 12 tokens
    let falcon_prefill = case(3, 12, 12, 16, 0, (8, 2), 128, true);
    for (i, dtype) in DTYPES.into_iter().enumerate() {
        let mode = Mode::Shuffled { seed: i as u64 };
        run_case(&nemotron, Kernel::Decode, dtype, mode, 400);
        run_case(&falcon_decode, Kernel::Decode, dtype, mode, 401);
        run_case(&bamba, Kernel::Prefill, dtype, mode, 402);
        run_case(&falcon_prefill, Kernel::Prefill, dtype, mode, 403);
    }
}

#[test]
fn attention_params_size_matches_kernel_reads() {
    // The dispatches above bind exactly size_of::<AttentionParams>() bytes; one field short
    // must be a binding fault, so the kernel's struct is exactly that size.
    let shape = AttentionShape {
        batch: 1,
        q_len: 1,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 8,
        kv_len: 1,
    };
    let l = shape.prefill().unwrap();
    let x = Tensor::full(0.5f32, (1, 1, 1, 8), &candle_core::Device::Cpu).unwrap();
    let args = AttentionArgs {
        q: &x,
        k: &x,
        v: &x,
        scale: 1.0,
    };
    let ex = ShortParams(HarnessExecutor::new(Mode::InOrder));
    let err = metal_plan::causal_attention_as(&ex, &args, l).unwrap_err();
    assert_eq!(
        ex.0.last_fault(),
        Some(msl_harness::FaultKind::Binding),
        "{err}"
    );
}
