//! `-- attention`: `causal_attention` (fast path vs reference) at Nemotron-H-8B's attention
//! shape (32 heads, 8 kv heads, head_dim 128) and Falcon-H1-1.5B's (8 / 2 / 128): one decode
//! token against a 4096-key cache (k, v narrowed out of a 4352-position cache, as the model
//! holds them) and a 512-token prefill; also the rotary embedding and SwiGLU of such a layer.

use super::{median_ms, randn, read_bandwidth_gbs};
use candle_core::DType;
use mamba2_ops::*;

/// CPU time of this process (all threads), in ms, from `/proc/self/stat` (10 ms ticks; `None`
/// off Linux).
fn process_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 10.0)
}

/// CPU ms per call (all threads together) over `n` calls: robust to other processes taking
/// the cores, which the wall-clock median is not.
fn cpu_ms_per_call(n: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t0 = process_cpu_ms().unwrap_or(f64::NAN);
    for _ in 0..n {
        f();
    }
    (process_cpu_ms().unwrap_or(f64::NAN) - t0) / n as f64
}

pub fn bench_attention() {
    // ATTN_ONLY=decode (prefill, mlp): that part only (attention without the reference); ATTN_KV=n: decode
    // against n keys instead of 4096.
    let only = std::env::var("ATTN_ONLY").ok();
    let decode_kv: usize = std::env::var("ATTN_KV")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    println!(
        "read bandwidth (Rayon pool, 512 MiB sum): {:.1} GB/s",
        read_bandwidth_gbs()
    );
    let cap = 4352.max(decode_kv + 256);
    for (name, heads, kv_heads) in [("nemotron-h-8b", 32, 8), ("falcon-h1-1.5b", 8, 2)] {
        for dtype in [DType::F32, DType::BF16] {
            let d = 128;
            let k_cache = randn(&[1, cap, kv_heads, d], dtype);
            let v_cache = randn(&[1, cap, kv_heads, d], dtype);
            for (what, q_len, kv_len) in [("decode", 1, decode_kv), ("prefill", 512, 512)] {
                if only.as_deref().is_some_and(|o| o != what) {
                    continue;
                }
                let q = randn(&[1, q_len, heads, d], dtype);
                let k = k_cache.narrow(1, 0, kv_len).unwrap();
                let v = v_cache.narrow(1, 0, kv_len).unwrap();
                let args = AttentionArgs {
                    q: &q,
                    k: &k,
                    v: &v,
                    scale: (d as f64).powf(-0.5),
                };
                let fast = median_ms(9, || {
                    causal_attention(&args).unwrap();
                });
                let calls = if q_len == 1 { 400 } else { 40 };
                let cpu = cpu_ms_per_call(calls, || {
                    causal_attention(&args).unwrap();
                });
                let slow = if only.is_some() {
                    f64::NAN
                } else {
                    median_ms(3, || {
                        causal_attention_slow(&args).unwrap();
                    })
                };
                // Decode streams the cache: K/V bytes per second; prefill is arithmetic:
                // GFLOP/s of the causal half (q·k and p·v, 2 flops per multiply-add).
                let rate = if q_len == 1 {
                    let kv_bytes = 2 * kv_len * kv_heads * d * dtype.size_in_bytes();
                    format!("{:5.1} GB/s of K/V", kv_bytes as f64 / fast / 1e6)
                } else {
                    let flops = 4.0 * heads as f64 * d as f64 * (q_len * (q_len + 1) / 2) as f64;
                    format!("{:5.1} GFLOP/s", flops / fast / 1e6)
                };
                println!(
                    "attention {name} {what} q {q_len} kv {kv_len} {dtype:?}: fast {fast:8.3} ms \
                     ({rate}; {cpu:7.3} CPU-ms per call), reference {slow:8.3} ms"
                );
            }
        }
    }
    if only.as_deref().is_some_and(|o| o != "mlp") {
        return;
    }
    for dtype in [DType::F32, DType::BF16] {
        let x = randn(&[1, 512, 32, 128], dtype);
        let args = RotaryArgs {
            x: &x,
            position_offset: 0,
            rotary_dim: 64,
            theta: 1e4,
        };
        let fast = median_ms(9, || {
            rotary_embedding(&args).unwrap();
        });
        let slow = median_ms(3, || {
            rotary_embedding_slow(&args).unwrap();
        });
        println!("rotary 512 x 32 x 128 (rotary 64) {dtype:?}: fast {fast:7.3} ms, reference {slow:7.3} ms");
        let x = randn(&[1, 512, 2 * 4096], dtype);
        let fast = median_ms(9, || {
            swiglu(&x).unwrap();
        });
        let slow = median_ms(3, || {
            swiglu_slow(&x).unwrap();
        });
        println!("swiglu 512 x 8192 {dtype:?}: fast {fast:7.3} ms, reference {slow:7.3} ms");
    }
}
