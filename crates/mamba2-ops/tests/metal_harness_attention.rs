//! The causal attention Metal kernels (`kernels/metal/attention.metal`: decode + merge,
//! prefill, each in the head_dim <= 128 and `_hd256` variants) run on the CPU by the MSL
//! harness and compared with `causal_attention_slow`, for f32, f16 and bf16, in shuffled and
//! checked (race, bounds, uninitialised threadgroup reads) modes. K and V are views narrowed out
//! of larger caches (capacity > kv_len, a start offset, V in another layout), bound as the Metal
//! dispatch binds them: the cache buffer from the view's start offset on, with the view's
//! strides in the parameters. Outputs and partial results are NaN-poisoned before each run.
//! Kernel names, grids and key splits come from `metal_params::AttentionShape`, as in the
//! Metal dispatch (`src/metal/attention.rs`).
//!
//! Requires clang >= 17 (see crates/msl-harness/README.md).

#[path = "metal_common.rs"]
mod metal_common;

use candle_core::{DType, Tensor};
use mamba2_ops::metal_params::*;
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

/// A view's buffer as the Metal dispatch binds it (the cache from the view's start offset on)
/// and the view's strides.
fn view_buf(cache: &Tensor, view: &Tensor) -> (HostBuf, Vec<usize>) {
    let flat = cache.flatten_all().unwrap();
    let start = view.layout().start_offset();
    let n = flat.dim(0).unwrap();
    let buf = HostBuf::from_tensor(&flat.narrow(0, start, n - start).unwrap());
    (buf, view.stride().to_vec())
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
    let (v_cache, v) = if case.v_head_major {
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
    let (kb, ks) = view_buf(&k_cache, &k);
    let (vb, vs) = view_buf(&v_cache, &v);
    let p = AttentionParams {
        batch: batch as u32,
        q_len: q_len as u32,
        n_heads: n_heads as u32,
        n_kv_heads: nkv as u32,
        head_dim: hd as u32,
        kv_len: kv_len as u32,
        k_sb: ks[0] as u32,
        k_st: ks[1] as u32,
        k_sh: ks[2] as u32,
        v_sb: vs[0] as u32,
        v_st: vs[1] as u32,
        v_sh: vs[2] as u32,
        n_splits: launch.n_splits as u32,
        split_len: launch.split_len as u32,
        scale: scale as f32,
    };
    let qb = HostBuf::from_tensor(&q);
    let rows = batch * q_len * n_heads;
    let mut out = HostBuf::poisoned(dtype, rows * hd);
    let lib = library("attention.metal");
    let name = kernel_name(launch.kernel, dtype);
    let what = format!("{name} {mode:?} {case:?} splits={}", launch.n_splits);
    let grid = launch.groups.map(|g| g as u32);
    let tg = [layout::ATTN_THREADS, 1, 1];
    let mut k_run = lib.kernel(&name).unwrap();
    qb.input(&mut k_run, 0);
    kb.input(&mut k_run, 1);
    vb.input(&mut k_run, 2);
    out.output(&mut k_run, 3);
    if launch.kernel.starts_with("causal_attention_decode") {
        let parts = launch.n_splits > 1;
        let n = |len: usize| if parts { launch.n_splits * len } else { 4 };
        let mut part_o = HostBuf::poisoned(DType::F32, n(rows * hd));
        let mut part_ml = HostBuf::poisoned(DType::F32, n(rows * 2));
        part_o.output(&mut k_run, 4);
        part_ml.output(&mut k_run, 5);
        k_run
            .raw_bytes(6, p.as_bytes())
            .grid(grid)
            .threadgroup(tg)
            .mode(mode)
            .dispatch()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        drop(k_run);
        if parts {
            let (groups, tx) = shape.merge_grid();
            let mut m = lib
                .kernel(&kernel_name("causal_attention_merge", dtype))
                .unwrap();
            part_o.input(&mut m, 0);
            part_ml.input(&mut m, 1);
            out.output(&mut m, 2);
            m.raw_bytes(3, p.as_bytes())
                .grid(groups.map(|g| g as u32))
                .threadgroup([tx as u32, 1, 1])
                .mode(mode)
                .dispatch()
                .unwrap_or_else(|e| panic!("{what} merge: {e}"));
        }
    } else {
        k_run
            .raw_bytes(4, p.as_bytes())
            .grid(grid)
            .threadgroup(tg)
            .mode(mode)
            .dispatch()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    check(&out.to_tensor(want.dims()), &want, dtype, &what);
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
    let p = AttentionParams {
        batch: 1,
        q_len: 1,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 8,
        kv_len: 1,
        k_sb: 8,
        k_st: 8,
        k_sh: 8,
        v_sb: 8,
        v_st: 8,
        v_sh: 8,
        n_splits: 1,
        split_len: 1,
        scale: 1.0,
    };
    let x = HostBuf::F32(vec![0.5; 8]);
    let mut out = HostBuf::poisoned(DType::F32, 8);
    let lib = library("attention.metal");
    let mut k = lib.kernel("causal_attention_prefill_f32").unwrap();
    for i in 0..3 {
        x.input(&mut k, i);
    }
    out.output(&mut k, 3);
    let bytes = p.as_bytes();
    let err = k
        .raw_bytes(4, &bytes[..bytes.len() - 4])
        .grid(l.groups.map(|g| g as u32))
        .threadgroup([layout::ATTN_THREADS, 1, 1])
        .dispatch()
        .unwrap_err();
    assert_eq!(
        err.fault_kind(),
        Some(msl_harness::FaultKind::Binding),
        "{err}"
    );
}
