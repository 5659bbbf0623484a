//! Per-op CPU timings at the mamba2-130m mixer shapes (d_inner 1536, 24 heads of 64, d_state 128,
//! ngroups 1): fast path vs reference, prefill (512 and 2048 tokens) and one decode step.
//!
//! Then `linear` (the projections): fast path vs Candle's matmul in the weight's own dtype (what
//! the model called before) at the 130m projection shapes, over a sweep of row counts, with the
//! weight bytes streamed per second.
//!
//! `cargo bench -p mamba2-ops --bench cpu_ops` (median of several runs, milliseconds per call);
//! `cargo bench -p mamba2-ops --bench cpu_ops -- linear` runs only the `linear` part,
//! `-- decode` only the decode-token projection chain (weight GB/s vs the machine's read
//! bandwidth), `-- step` only the one-token decode ops, `-- stages` one whole decode token split
//! into its stages (see `cpu_ops/stages.rs`), `-- attention` the attention-layer ops of the
//! hybrid models (see `cpu_ops/attention.rs`), `-- quantized` the block-quantized projections.

use candle_core::{DType, Device, Tensor};
use mamba2_ops::*;
use std::time::Instant;

#[path = "cpu_ops/attention.rs"]
mod attention;
#[path = "cpu_ops/stages.rs"]
mod stages;

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut v: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn randn(dims: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// `linear` at the mamba2-130m projection shapes: `in_proj` (3352 x 768), `out_proj`
/// (768 x 1536), the tied LM head (50288 x 768).
fn bench_linear() {
    // LINEAR_ONLY=lm_head, LINEAR_ROWS=1,16: a subset, for quick comparisons.
    let only = std::env::var("LINEAR_ONLY").ok();
    let row_list: Vec<usize> = std::env::var("LINEAR_ROWS")
        .map(|v| v.split(',').filter_map(|r| r.parse().ok()).collect())
        .unwrap_or_else(|_| vec![1, 2, 4, 16, 64, 512, 2048]);
    let shapes = [
        ("in_proj", 3352, 768),
        ("out_proj", 768, 1536),
        ("lm_head", 50288, 768),
        // granite-4.0-h-1b: Mamba in_proj, SwiGLU up (gate|up) and down.
        ("g_in", 6448, 1536),
        ("g_up", 8192, 1536),
        ("g_down", 1536, 4096),
    ];
    // LINEAR_DTYPES=bf16: a subset of the dtypes.
    let dtypes: Vec<DType> = match std::env::var("LINEAR_DTYPES").as_deref() {
        Ok("bf16") => vec![DType::BF16],
        _ => vec![DType::F32, DType::F16, DType::BF16],
    };
    for dtype in dtypes {
        for (name, out_f, in_f) in shapes {
            let w = randn(&[out_f, in_f], dtype);
            let bytes = (out_f * in_f * dtype.size_in_bytes()) as f64;
            if only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            for &rows in &row_list {
                let x = randn(&[1, rows, in_f], dtype);
                let runs = if name == "lm_head" { 9 } else { 31 };
                let fast = median_ms(runs, || {
                    linear(&x, &w, None).unwrap();
                });
                let wt = w.t().unwrap();
                let candle = median_ms(runs.min(9), || {
                    x.broadcast_matmul(&wt).unwrap();
                });
                println!(
                    "linear {name:8} {dtype:?} rows {rows:2}: fast {fast:8.3} ms ({:5.1} GB/s)  candle matmul {candle:8.3} ms ({:5.1} GB/s)  ({:.2}x)",
                    bytes / fast / 1e6,
                    bytes / candle / 1e6,
                    candle / fast
                );
            }
        }
    }
}

/// Read bandwidth of this machine on the Rayon pool: sum of a 512 MiB f32 buffer (GB/s, median
/// of 5), the yardstick for the decode projections below.
fn read_bandwidth_gbs() -> f64 {
    use rayon::prelude::*;
    let buf = vec![1f32; 128 << 20];
    let mut sink = 0f32;
    let ms = median_ms(5, || {
        sink += buf
            .par_chunks(1 << 16)
            .map(|c| {
                // 16 independent partial sums, so that the loop vectorizes.
                let mut acc = [0f32; 16];
                for v in c.chunks_exact(16) {
                    for l in 0..16 {
                        acc[l] += v[l];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum::<f32>();
    });
    assert!(sink > 0.0);
    (buf.len() * 4) as f64 / ms / 1e6
}

/// One decode token's projections at the mamba2-130m shape, one row: 24 x (`in_proj`,
/// `out_proj`) and the tied LM head, each weight read once, as in `Mamba2Model::step`. Reports
/// the weight bytes streamed per second against [`read_bandwidth_gbs`].
fn bench_decode_projections() {
    let bw = read_bandwidth_gbs();
    println!("read bandwidth (Rayon pool, 512 MiB sum): {bw:.1} GB/s");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .build()
        .unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let layers: Vec<(Tensor, Tensor)> = (0..24)
            .map(|_| (randn(&[3352, 768], dtype), randn(&[768, 1536], dtype)))
            .collect();
        let head = randn(&[50288, 768], dtype);
        let (u, y) = (randn(&[1, 768], dtype), randn(&[1, 1536], dtype));
        let bytes = ((24 * (3352 * 768 + 768 * 1536) + 50288 * 768) * dtype.size_in_bytes()) as f64;
        let token = || {
            for (w_in, w_out) in &layers {
                linear(&u, w_in, None).unwrap();
                linear(&y, w_out, None).unwrap();
            }
            linear(&u, &head, None).unwrap();
        };
        // Called from the main thread (each op wakes the pool and waits on it), and from inside
        // the pool (`install`: the ops' parallel sections are then plain fork-joins).
        let outside = median_ms(9, token);
        let inside = median_ms(9, || pool.install(token));
        for (where_, ms) in [("main thread", outside), ("in pool", inside)] {
            println!(
                "decode projections 130m {dtype:?} ({where_}): {ms:7.3} ms per token, {:5.1} GB/s ({:.0}% of read bandwidth)",
                bytes / ms / 1e6,
                100.0 * bytes / ms / 1e6 / bw
            );
        }
    }
}

/// `quantized_linear` at the mamba2-130m projection shapes in Q8_0 and Q4_K, decode (1 row) and
/// prefill (512 rows) row counts, with the multiply-adds per second. Run twice with
/// `MAMBA2_CPU_Q8_0_GEMM=0` / `1` to compare Q8_0 prefill's two paths.
fn bench_quantized() {
    use candle_core::quantized::GgmlDType;
    for ty in [GgmlDType::Q8_0, GgmlDType::Q4K] {
        for (name, out_f, in_f) in [("in_proj", 3352, 768), ("out_proj", 768, 1536)] {
            let w = QuantizedMatrix::quantize(&randn(&[out_f, in_f], DType::F32), ty).unwrap();
            for rows in [1, 512] {
                let x = randn(&[rows, in_f], DType::F32);
                let ms = median_ms(if rows == 1 { 51 } else { 9 }, || {
                    quantized_linear(&x, &w, None).unwrap();
                });
                println!(
                    "quantized_linear {ty:?} {name:8} rows {rows:3}: {ms:8.3} ms ({:6.1} GMAC/s)",
                    (rows * out_f * in_f) as f64 / ms / 1e6
                );
            }
        }
    }
}

fn main() {
    // The bench is an edge: the kernel switches (`MAMBA2_CPU_*`) come from the environment.
    let opts = mamba2_ops::options::KernelOptions::from_env().unwrap_or_else(|e| panic!("{e}"));
    mamba2_ops::options::set_process_options(opts).expect("set once");
    if std::env::args().any(|a| a == "quantized") {
        bench_quantized();
        return;
    }
    if std::env::args().any(|a| a == "attention") {
        attention::bench_attention();
        return;
    }
    if std::env::args().any(|a| a == "stages") {
        stages::bench_stages();
        return;
    }
    if std::env::args().any(|a| a == "decode") {
        bench_decode_projections();
        return;
    }
    if std::env::args().any(|a| a == "linear") {
        bench_linear();
        return;
    }
    let (h, p, n, conv) = (24, 64, 128, 1536 + 256);
    let a = (randn(&[h], DType::F32).abs().unwrap() + 1.0)
        .unwrap()
        .neg()
        .unwrap();
    // `-- step`: only the one-token decode ops.
    let step_only = std::env::args().any(|a| a == "step");
    for dtype in [DType::F32, DType::BF16] {
        for l in [512usize, 2048] {
            if step_only {
                break;
            }
            let x = randn(&[1, l, h, p], dtype);
            let dt = randn(&[1, l, h], dtype);
            let b = randn(&[1, l, 1, n], dtype);
            let c = randn(&[1, l, 1, n], dtype);
            let d = randn(&[h], dtype);
            let bias = randn(&[h], dtype);
            let args = SsdArgs {
                x: &x,
                dt: &dt,
                a: &a,
                b: &b,
                c: &c,
                d: Some(&d),
                z: None,
                dt_bias: Some(&bias),
                initial_state: None,
                seq_idx: None,
            };
            let prm = SsdParams::default();
            let runs = if l > 1000 { 3 } else { 5 };
            let fast = median_ms(runs, || {
                ssd_chunk_scan(&args, &prm).unwrap();
            });
            let slow = median_ms(runs, || {
                ssd_chunk_scan_with(&args, &prm, Backend::Reference).unwrap();
            });
            println!("ssd_chunk_scan     {dtype:?} L={l:5}: fast {fast:8.2} ms  reference {slow:8.2} ms  ({:.1}x)", slow / fast);
            let xc = randn(&[1, l, conv], dtype);
            let w = randn(&[conv, 4], dtype);
            let cb = randn(&[conv], dtype);
            let cargs = Conv1dArgs {
                x: &xc,
                weight: &w,
                bias: Some(&cb),
                initial_state: None,
                seq_idx: None,
                silu: true,
            };
            let fast = median_ms(runs, || {
                causal_conv1d(&cargs).unwrap();
            });
            let slow = median_ms(runs, || {
                causal_conv1d_with(&cargs, Backend::Reference).unwrap();
            });
            println!("causal_conv1d      {dtype:?} L={l:5}: fast {fast:8.2} ms  reference {slow:8.2} ms  ({:.1}x)", slow / fast);
            let y = randn(&[1, l, 1536], dtype);
            let z = randn(&[1, l, 1536], dtype);
            let nw = randn(&[1536], dtype);
            let gargs = GatedRmsNormArgs {
                x: &y,
                z: Some(&z),
                weight: &nw,
                eps: 1e-5,
                group_size: 1536,
                norm_before_gate: false,
            };
            let fast = median_ms(runs, || {
                gated_rms_norm(&gargs).unwrap();
            });
            let slow = median_ms(runs, || {
                gated_rms_norm_with(&gargs, Backend::Reference).unwrap();
            });
            println!("gated_rms_norm     {dtype:?} L={l:5}: fast {fast:8.2} ms  reference {slow:8.2} ms  ({:.1}x)", slow / fast);
        }
        // Decode step.
        let state = Tensor::zeros((1, h, p, n), DType::F32, &Device::Cpu).unwrap();
        let x = randn(&[1, h, p], dtype);
        let dt = randn(&[1, h], dtype);
        let b = randn(&[1, 1, n], dtype);
        let c = randn(&[1, 1, n], dtype);
        let d = randn(&[h], dtype);
        let bias = randn(&[h], dtype);
        let args = StateUpdateArgs {
            state: &state,
            x: &x,
            dt: &dt,
            a: &a,
            b: &b,
            c: &c,
            d: Some(&d),
            z: None,
            dt_bias: Some(&bias),
        };
        let prm = SsdParams::default();
        let fast = median_ms(200, || {
            selective_state_update(&args, &prm).unwrap();
        });
        let slow = median_ms(50, || {
            selective_state_update_with(&args, &prm, Backend::Reference).unwrap();
        });
        println!(
            "state_update       {dtype:?} 1 token: fast {:8.1} us  reference {:8.1} us  ({:.1}x)",
            fast * 1e3,
            slow * 1e3,
            slow / fast
        );
        let cs = Tensor::zeros((1, conv, 4), DType::F32, &Device::Cpu).unwrap();
        let xc = randn(&[1, conv], dtype);
        let w = randn(&[conv, 4], dtype);
        let cb = randn(&[conv], dtype);
        let fast = median_ms(200, || {
            causal_conv1d_update(&xc, &cs, &w, Some(&cb), true).unwrap();
        });
        let slow = median_ms(50, || {
            causal_conv1d_update_with(&xc, &cs, &w, Some(&cb), true, Backend::Reference).unwrap();
        });
        println!(
            "conv1d_update      {dtype:?} 1 token: fast {:8.1} us  reference {:8.1} us  ({:.1}x)",
            fast * 1e3,
            slow * 1e3,
            slow / fast
        );
        let hs = randn(&[1, 768], dtype);
        let res = randn(&[1, 768], DType::F32);
        let nw = randn(&[768], dtype);
        let fast = median_ms(200, || {
            rms_norm_residual(&hs, Some(&res), &nw, 1e-5, true).unwrap();
        });
        let slow = median_ms(50, || {
            rms_norm_residual_with(&hs, Some(&res), &nw, 1e-5, true, Backend::Reference).unwrap();
        });
        println!(
            "rms_norm_residual  {dtype:?} 1 token: fast {:8.1} us  reference {:8.1} us  ({:.1}x)",
            fast * 1e3,
            slow * 1e3,
            slow / fast
        );
    }
    bench_linear();
    bench_decode_projections();
}
