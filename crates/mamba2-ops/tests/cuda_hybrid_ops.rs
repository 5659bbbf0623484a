//! CUDA kernels of the hybrid models' ops (`causal_attention`, `rotary_embedding`, `swiglu`,
//! `relu_squared`) against their plain-tensor references run on the CPU, f32 / f16 / bf16.
//!
//! Runs with `--features cuda`, and skips (prints and returns) when no CUDA device can be
//! opened, as on the GPU-less build machine. Outputs are NaN-poisoned before the kernels write
//! them (`support::poisoned_cuda`), so an unwritten element fails; every fast call is checked
//! to have launched a kernel of this crate (`cuda_launch_count`), every fallback to have
//! launched none. KV caches are allocated with spare capacity whose unused positions hold NaN:
//! a kernel that reads past the `kv_len` view fails too.
//!
//! Tolerances, per element `|gpu - ref| <= atol + rtol |ref|` (`support::assert_close`), and
//! on the relative L2 error of the whole output:
//!
//! | op                  | dtype | atol | rtol | rel L2 | why                                       |
//! |---------------------|-------|------|------|--------|-------------------------------------------|
//! | attention           | f32   | 1e-5 | 1e-4 | 1e-5   | f32 throughout; online softmax, expf      |
//! | attention           | f16   | 1e-3 | 4e-3 | 2e-3   | output rounded once; P rounded (u 4.9e-4) |
//! | attention           | bf16  | 6e-3 | 2e-2 | 1e-2   | likewise in bf16 (u 3.9e-3)               |
//! | rotary, activations | f32   | 1e-6 | 1e-5 | 1e-6   | cosf/sinf/expf within an ulp or two       |
//! | rotary, activations | f16   | 1e-5 | 1e-3 | 2e-4   | rare one-step rounding differences        |
//! | rotary, activations | bf16  | 1e-5 | 8e-3 | 2e-4   | likewise, one bf16 step                   |
//!
//! rtol covers the output rounding of both sides (two steps at most). The tensor-core prefill
//! rounds the softmax weights P to the activation dtype for the P·V product (as FlashAttention
//! does): with |v| <= 1 that moves an output by at most the unit roundoff u (|Σ δ_j p_j v_j| /
//! Σ p_j <= u max |v|), which sets the f16/bf16 attention atol.
//!
//! Model shapes (heads / kv heads / head_dim): Nemotron-H-8B 32/8/128, Falcon-H1-1.5B 8/2/128,
//! Bamba-9B 32/8/128 (partial rotary 64), plus head_dim 64, 80, 36 and 256.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use mamba2_ops::*;
use rand::{rngs::StdRng, SeedableRng};

mod support;
use support::{assert_close, rel_err, symmetric};

/// `(atol, rtol, rel_l2)` per dtype, f32 / f16 / bf16 (see the table above).
type Tol = [(f32, f32, f32); 3];
const TOL_ATTENTION: Tol = [(1e-5, 1e-4, 1e-5), (1e-3, 4e-3, 2e-3), (6e-3, 2e-2, 1e-2)];
const TOL_POINTWISE: Tol = [(1e-6, 1e-5, 1e-6), (1e-5, 1e-3, 2e-4), (1e-5, 8e-3, 2e-4)];

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn gpu(test: &str) -> Option<Device> {
    support::poisoned_cuda(test)
}

/// Asserts `got` (GPU) against `want` (CPU reference) with the tolerances of `dtype`.
#[track_caller]
fn check(what: &str, got: &Tensor, want: &Tensor, tol: &Tol) {
    let dtype = want.dtype();
    let (atol, rtol, l2) = tol[DTYPES.iter().position(|&d| d == dtype).unwrap()];
    let got = got.to_device(&Device::Cpu).unwrap();
    assert_eq!(got.dtype(), dtype, "{what}: dtype");
    let e = rel_err(&got, want);
    println!("{what}: rel L2 {e:.2e} (tol {l2:.0e})");
    assert_close(what, &got, want, (atol, rtol));
    assert!(e <= l2, "{what}: rel L2 {e} > {l2}");
}

/// Runs `f` and asserts it launched exactly `fast` (`true`: at least one) kernels of this crate.
#[track_caller]
fn launches<T>(what: &str, fast: bool, f: impl FnOnce() -> T) -> T {
    let before = cuda_launch_count();
    let out = f();
    let n = cuda_launch_count() - before;
    assert_eq!(
        n > 0,
        fast,
        "{what}: {n} CUDA launches (fast path expected: {fast})"
    );
    out
}

/// The values of `t` in a fresh buffer starting one element in: contiguous, but every row start
/// misaligned for vector loads (and for the tensor-core kernel's 16-byte copies).
fn misaligned(t: &Tensor) -> Tensor {
    let flat = t.flatten_all().unwrap();
    let pad = Tensor::zeros(1, t.dtype(), t.device()).unwrap();
    Tensor::cat(&[&pad, &flat], 0)
        .unwrap()
        .narrow(0, 1, flat.elem_count())
        .unwrap()
        .reshape(t.shape())
        .unwrap()
}

// ------------------------------------------------------------------------------- attention

#[derive(Clone, Copy, Debug)]
struct Attn {
    batch: usize,
    q_len: usize,
    kv_len: usize,
    /// KV-cache capacity (dim 1); k and v are its first kv_len positions.
    cap: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// q's amplitude (inputs are uniform in [-amp, amp)): sharper softmax when larger.
    amp: f32,
    /// Scale of q·k; `None`: head_dim^-0.5.
    scale: Option<f64>,
    /// q, k and v start one element into their buffers (no vector loads).
    misalign: bool,
}

fn attn(
    (batch, q_len, kv_len, cap): (usize, usize, usize, usize),
    (heads, kv_heads, head_dim): (usize, usize, usize),
) -> Attn {
    Attn {
        batch,
        q_len,
        kv_len,
        cap,
        heads,
        kv_heads,
        head_dim,
        amp: 1.0,
        scale: None,
        misalign: false,
    }
}

/// Decode shapes (q_len <= 8: the decode kernel, key splits and merge).
fn decode_cases() -> Vec<Attn> {
    vec![
        attn((1, 1, 4096, 4160), (32, 8, 128)), // Nemotron-H-8B at 4k context
        attn((3, 1, 1500, 1600), (32, 8, 128)), // Nemotron-H-8B, batch 3
        attn((1, 1, 3001, 3072), (8, 2, 128)),  // Falcon-H1-1.5B
        attn((3, 1, 517, 600), (32, 8, 128)),   // Bamba-9B, batch 3
        attn((1, 1, 2049, 2100), (16, 4, 64)),  // head_dim 64
        attn((2, 1, 777, 800), (12, 4, 80)),    // head_dim 80, rep 3
        attn((1, 4, 300, 320), (32, 8, 128)),   // 4 queries: two row blocks per kv head
        attn((2, 8, 100, 128), (16, 2, 64)),    // 8 queries, rep 8: eight row blocks
        attn((1, 1, 700, 720), (8, 1, 256)),    // head_dim 256 (4 rows per block)
        attn((2, 3, 50, 64), (6, 2, 36)),       // head_dim 36, a few queries
        attn((1, 1, 1, 8), (4, 2, 64)),         // the first token: one key
        attn((1, 1, 200, 256), (4, 4, 128)),    // no grouping (rep 1)
        Attn {
            misalign: true,
            ..attn((1, 1, 1000, 1024), (32, 8, 128))
        },
        Attn {
            amp: 3.0,
            scale: Some(1.0),
            ..attn((2, 2, 900, 1000), (8, 2, 64)) // sharp softmax
        },
    ]
}

/// Prefill shapes (q_len > 8: the tensor-core kernel for aligned f16/bf16 with head_dim % 16 ==
/// 0 and <= 128, the CUDA-core kernel otherwise); kv_len > q_len is a continued prefill.
fn prefill_cases() -> Vec<Attn> {
    vec![
        attn((1, 2048, 2048, 2048), (8, 2, 128)), // Falcon-H1-1.5B, 2k prompt
        attn((3, 333, 433, 500), (32, 8, 128)),   // Nemotron-H-8B, continued, batch 3
        attn((1, 500, 500, 512), (32, 8, 128)),   // Bamba-9B
        attn((3, 130, 130, 160), (16, 4, 64)),    // head_dim 64
        attn((1, 257, 300, 320), (20, 5, 80)),    // head_dim 80, continued
        attn((1, 100, 150, 160), (4, 2, 256)),    // head_dim 256: CUDA-core kernel
        attn((2, 77, 77, 80), (6, 3, 36)),        // head_dim 36: CUDA-core kernel
        attn((1, 9, 9, 16), (8, 2, 128)),         // one query above the decode kernel
        attn((1, 65, 65, 65), (2, 2, 128)),       // one row past a 64-row tile, rep 1
        attn((1, 17, 4096, 4096), (8, 2, 128)),   // a few queries after a 4k context
        Attn {
            misalign: true, // f16/bf16 too through the CUDA-core kernel
            ..attn((1, 200, 250, 256), (8, 2, 128))
        },
        Attn {
            amp: 3.0,
            scale: Some(1.0),
            ..attn((2, 100, 164, 200), (8, 2, 64)) // sharp softmax
        },
        Attn {
            scale: Some(0.015625), // Granite's attention_multiplier style
            ..attn((1, 96, 96, 96), (12, 4, 128))
        },
    ]
}

/// q, k, v of a case on the CPU in `dtype` (k, v narrowed out of a NaN-padded cache).
fn attn_inputs(rng: &mut StdRng, c: &Attn, dtype: DType) -> (Tensor, Tensor, Tensor) {
    let q = symmetric(rng, &[c.batch, c.q_len, c.heads, c.head_dim], c.amp);
    let cache = |rng: &mut StdRng| {
        let dims = [c.batch, c.cap, c.kv_heads, c.head_dim];
        let filled = symmetric(rng, &[c.batch, c.kv_len, c.kv_heads, c.head_dim], 1.0);
        let t = if c.cap > c.kv_len {
            let pad_dims = [c.batch, c.cap - c.kv_len, c.kv_heads, c.head_dim];
            let pad = Tensor::full(f32::NAN, &pad_dims, &Device::Cpu).unwrap();
            Tensor::cat(&[&filled, &pad], 1).unwrap()
        } else {
            filled
        };
        assert_eq!(t.dims(), &dims);
        t.to_dtype(dtype).unwrap()
    };
    let (k, v) = (cache(rng), cache(rng));
    (q.to_dtype(dtype).unwrap(), k, v)
}

fn run_attention(cases: &[Attn], test: &str, seed: u64) {
    let Some(dev) = gpu(test) else { return };
    let mut rng = StdRng::seed_from_u64(seed);
    for c in cases {
        for dtype in DTYPES {
            let (q, kc, vc) = attn_inputs(&mut rng, c, dtype);
            let scale = c.scale.unwrap_or((c.head_dim as f64).powf(-0.5));
            let view = |t: &Tensor| t.narrow(1, 0, c.kv_len).unwrap();
            let want = causal_attention_slow(&AttentionArgs {
                q: &q,
                k: &view(&kc),
                v: &view(&vc),
                scale,
            })
            .unwrap();
            let to_gpu = |t: &Tensor| {
                let g = t.to_device(&dev).unwrap();
                if c.misalign {
                    misaligned(&g)
                } else {
                    g
                }
            };
            let (qg, kg, vg) = (to_gpu(&q), to_gpu(&kc), to_gpu(&vc));
            let (kg, vg) = (view(&kg), view(&vg));
            let args = AttentionArgs {
                q: &qg,
                k: &kg,
                v: &vg,
                scale,
            };
            let what = format!("{c:?} {dtype:?}");
            let got = launches(&what, true, || causal_attention(&args).unwrap());
            check(&what, &got, &want, &TOL_ATTENTION);
        }
    }
}

#[test]
fn attention_decode_matches_reference() {
    run_attention(&decode_cases(), "attention decode", 1);
}

#[test]
fn attention_prefill_matches_reference() {
    run_attention(&prefill_cases(), "attention prefill", 2);
}

/// q as the query part of a fused projection (strided heads, read in place).
#[test]
fn attention_reads_strided_q() {
    let Some(dev) = gpu("attention strided q") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(3);
    for c in [
        attn((2, 1, 600, 640), (8, 2, 128)),
        attn((2, 70, 90, 96), (8, 2, 128)),
    ] {
        for dtype in DTYPES {
            let (_, kc, vc) = attn_inputs(&mut rng, &c, dtype);
            let fused = symmetric(&mut rng, &[c.batch, c.q_len, c.heads + 4, c.head_dim], 1.0)
                .to_dtype(dtype)
                .unwrap();
            let (k, v) = (
                kc.narrow(1, 0, c.kv_len).unwrap(),
                vc.narrow(1, 0, c.kv_len).unwrap(),
            );
            let q = fused.narrow(2, 1, c.heads).unwrap();
            let want = causal_attention_slow(&AttentionArgs {
                q: &q,
                k: &k,
                v: &v,
                scale: 0.1,
            })
            .unwrap();
            let g = |t: &Tensor| t.to_device(&dev).unwrap();
            let (qg, kg, vg) = (g(&fused).narrow(2, 1, c.heads).unwrap(), g(&k), g(&v));
            let args = AttentionArgs {
                q: &qg,
                k: &kg,
                v: &vg,
                scale: 0.1,
            };
            let what = format!("strided q {c:?} {dtype:?}");
            let got = launches(&what, true, || causal_attention(&args).unwrap());
            check(&what, &got, &want, &TOL_ATTENTION);
        }
    }
}

// ---------------------------------------------------------------------------------- rotary

/// `(dims, rotary_dim, theta, position_offset)`
type Rope = ([usize; 4], usize, f64, usize);

fn rope_args(x: &Tensor, position_offset: usize, rotary_dim: usize, theta: f64) -> RotaryArgs<'_> {
    RotaryArgs {
        x,
        position_offset,
        rotary_dim,
        theta,
    }
}

fn rope_cases() -> Vec<Rope> {
    vec![
        ([1, 2048, 32, 128], 128, 1e4, 0),    // Nemotron-H-8B q, 2k prompt
        ([3, 17, 32, 128], 64, 1e4, 4000),    // Bamba-9B, partial rotary, continued
        ([3, 1, 8, 128], 128, 1e6, 4095),     // decode (kv heads)
        ([1, 3, 8, 128], 128, 1e11, 100_000), // Falcon-H1, far positions
        ([2, 33, 12, 80], 80, 5e5, 7),        // head_dim 80
        ([1, 5, 4, 64], 32, 1e4, 12_345),     // head_dim 64, partial
        ([1, 3, 2, 256], 256, 1e4, 9),        // the largest table (128 pairs)
        ([2, 4, 3, 6], 2, 10.0, 1),           // tiny
    ]
}

#[test]
fn rotary_matches_reference() {
    let Some(dev) = gpu("rotary") else { return };
    let mut rng = StdRng::seed_from_u64(11);
    for (dims, rd, theta, off) in rope_cases() {
        for dtype in DTYPES {
            let [b, s, h, d] = dims;
            // contiguous, a view of the query part of a fused projection, misaligned
            let x = symmetric(&mut rng, &dims, 2.0).to_dtype(dtype).unwrap();
            let fused = symmetric(&mut rng, &[b, s, h + 3, d], 2.0)
                .to_dtype(dtype)
                .unwrap();
            let xv = fused.narrow(2, 2, h).unwrap();
            let fused_g = fused.to_device(&dev).unwrap();
            let layouts = [
                ("contiguous", x.clone(), x.to_device(&dev).unwrap()),
                ("view", xv.clone(), fused_g.narrow(2, 2, h).unwrap()),
                (
                    "misaligned",
                    x.clone(),
                    misaligned(&x.to_device(&dev).unwrap()),
                ),
            ];
            for (layout, xc, xg) in layouts {
                let want = rotary_embedding_slow(&rope_args(&xc, off, rd, theta)).unwrap();
                let what = format!("rotary {dims:?} rd {rd} pos {off} {layout} {dtype:?}");
                let args = rope_args(&xg, off, rd, theta);
                let got = launches(&what, true, || rotary_embedding(&args).unwrap());
                check(&what, &got, &want, &TOL_POINTWISE);
            }
        }
    }
}

// ----------------------------------------------------------------------------- activations

/// The layouts an activation input is tested in: `(name, cpu, gpu)`.
fn activation_layouts(
    rng: &mut StdRng,
    dims: &[usize],
    dtype: DType,
    dev: &Device,
) -> Vec<(String, Tensor, Tensor)> {
    let x = symmetric(rng, dims, 4.0).to_dtype(dtype).unwrap();
    let xg = x.to_device(dev).unwrap();
    let mut out = vec![
        ("contiguous".to_string(), x.clone(), xg.clone()),
        ("misaligned".to_string(), x.clone(), misaligned(&xg)),
    ];
    // a narrowed view of a wider last dimension (row stride > row length)
    let mut wide = dims.to_vec();
    *wide.last_mut().unwrap() += 24;
    let w = symmetric(rng, &wide, 4.0).to_dtype(dtype).unwrap();
    let last = dims.len() - 1;
    let wv = w.narrow(last, 8, dims[last]).unwrap();
    let wg = w
        .to_device(dev)
        .unwrap()
        .narrow(last, 8, dims[last])
        .unwrap();
    out.push(("view".to_string(), wv, wg));
    out
}

#[test]
fn swiglu_matches_reference() {
    let Some(dev) = gpu("swiglu") else { return };
    let mut rng = StdRng::seed_from_u64(12);
    let shapes: [&[usize]; 7] = [
        &[1, 1, 2 * 8192],   // decode, an 8k MLP
        &[3, 77, 2 * 4096],  // prefill, batch 3
        &[1, 300, 2 * 5504], // n % 8 == 0 but not % 64
        &[2, 5, 2 * 5],      // n odd: element by element
        &[2, 3, 4, 2 * 48],  // rank 4 (made contiguous)
        &[2 * 100],          // rank 1
        &[7, 2 * 36],        // rank 2
    ];
    for dims in shapes {
        for dtype in DTYPES {
            for (layout, xc, xg) in activation_layouts(&mut rng, dims, dtype, &dev) {
                let want = swiglu_slow(&xc).unwrap();
                let what = format!("swiglu {dims:?} {layout} {dtype:?}");
                let got = launches(&what, true, || swiglu(&xg).unwrap());
                check(&what, &got, &want, &TOL_POINTWISE);
            }
        }
    }
}

#[test]
fn relu_squared_matches_reference() {
    let Some(dev) = gpu("relu_squared") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(13);
    let shapes: [&[usize]; 6] = [
        &[1, 1, 21504],  // Nemotron-H-8B decode (intermediate 21504)
        &[3, 50, 12288], // prefill, batch 3
        &[7, 13],        // odd rows: element by element
        &[1001],         // rank 1
        &[2, 3, 4, 40],  // rank 4
        &[5, 3, 8],      // short rows, vectorised
    ];
    for dims in shapes {
        for dtype in DTYPES {
            for (layout, xc, xg) in activation_layouts(&mut rng, dims, dtype, &dev) {
                let want = relu_squared_slow(&xc).unwrap();
                let what = format!("relu_squared {dims:?} {layout} {dtype:?}");
                let got = launches(&what, true, || relu_squared(&xg).unwrap());
                check(&what, &got, &want, &TOL_POINTWISE);
            }
        }
    }
}

// ------------------------------------------------------------------------------- fallbacks

/// Both sides of the dispatcher on CUDA: where a precondition of the kernels fails (head_dim >
/// 256, rotary_dim > 256 or 0) the CUDA fast path declines and the reference runs on
/// the device, launching none of this crate's kernels; `Backend::Reference` never asks the fast
/// path. Either way the result is the CPU reference's.
#[test]
fn failed_preconditions_fall_back_to_reference() {
    let Some(dev) = gpu("fallbacks") else { return };
    let mut rng = StdRng::seed_from_u64(14);
    let g = |t: &Tensor| t.to_device(&dev).unwrap();
    for dtype in DTYPES {
        // attention: head_dim 288 declined; head_dim 64 forced to the reference
        for (c, backend, fast) in [
            (attn((1, 3, 20, 24), (4, 2, 288)), Backend::Auto, false),
            (attn((1, 12, 20, 24), (4, 2, 64)), Backend::Reference, false),
            (attn((1, 12, 20, 24), (4, 2, 64)), Backend::Auto, true),
        ] {
            let (q, kc, vc) = attn_inputs(&mut rng, &c, dtype);
            let (k, v) = (
                kc.narrow(1, 0, c.kv_len).unwrap(),
                vc.narrow(1, 0, c.kv_len).unwrap(),
            );
            let want = causal_attention_slow(&AttentionArgs {
                q: &q,
                k: &k,
                v: &v,
                scale: 0.2,
            })
            .unwrap();
            let (qg, kg, vg) = (g(&q), g(&k), g(&v));
            let args = AttentionArgs {
                q: &qg,
                k: &kg,
                v: &vg,
                scale: 0.2,
            };
            let what = format!("attention {backend:?} {c:?} {dtype:?}");
            let got = launches(&what, fast, || {
                causal_attention_with(&args, backend).unwrap()
            });
            check(&what, &got, &want, &TOL_ATTENTION);
        }
        // rotary: rotary_dim 288 (> 256 channels of table) declined; forced reference
        for (dims, rd, backend, fast) in [
            ([1, 3, 2, 320], 288, Backend::Auto, false),
            ([1, 3, 2, 128], 64, Backend::Reference, false),
            ([1, 3, 2, 128], 0, Backend::Auto, false), // identity: the reference's clone
        ] {
            let x = symmetric(&mut rng, &dims, 2.0).to_dtype(dtype).unwrap();
            let want = rotary_embedding_slow(&rope_args(&x, 5, rd, 1e4)).unwrap();
            let xg = g(&x);
            let args = rope_args(&xg, 5, rd, 1e4);
            let what = format!("rotary {backend:?} {dims:?} rd {rd} {dtype:?}");
            let got = launches(&what, fast, || {
                rotary_embedding_with(&args, backend).unwrap()
            });
            check(&what, &got, &want, &TOL_POINTWISE);
        }
        // activations: no precondition a real input fails (any float dtype, layout and size
        // is served; empty inputs are not launched on CUDA at all): the forced reference only
        let x = symmetric(&mut rng, &[2, 3, 16], 2.0)
            .to_dtype(dtype)
            .unwrap();
        let xg = g(&x);
        let what = format!("swiglu reference {dtype:?}");
        let got = launches(&what, false, || {
            swiglu_with(&xg, Backend::Reference).unwrap()
        });
        check(&what, &got, &swiglu_slow(&x).unwrap(), &TOL_POINTWISE);
        let what = format!("relu_squared reference {dtype:?}");
        let got = launches(&what, false, || {
            relu_squared_with(&xg, Backend::Reference).unwrap()
        });
        check(&what, &got, &relu_squared_slow(&x).unwrap(), &TOL_POINTWISE);
    }
}
