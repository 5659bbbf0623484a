//! Op-level CUDA benchmarks at the mamba2-1.3b shapes (bf16): the fast paths against the
//! plain-tensor references run by Candle's own CUDA ops (what a model built from Candle ops alone,
//! like candle-transformers' mamba2, executes), in one run.
//!
//! Not a test: `#[ignore]`d and asserting nothing about time; run it on a GPU with
//! `cargo test --release --features cuda --test cuda_bench -- --ignored --nocapture`.
//! Times are medians of 7 repetitions of a loop of launches, after warm-up, bracketed by device
//! synchronisation.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use mamba2_ops::*;
use std::time::Instant;

/// Median over 7 runs of the mean time per call of `f` (microseconds), `iters` calls per run.
fn time_us(dev: &Device, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    dev.synchronize().unwrap();
    let mut runs: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            dev.synchronize().unwrap();
            t.elapsed().as_secs_f64() * 1e6 / iters as f64
        })
        .collect();
    runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    runs[3]
}

fn randn(dims: &[usize], dtype: DType, dev: &Device) -> Tensor {
    Tensor::randn(0f32, 1.0, dims, dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

// mamba2-1.3b: d_model 2048, expand 2, headdim 64, d_state 128, ngroups 1, d_conv 4, 48 layers.
const D_MODEL: usize = 2048;
const NHEADS: usize = 64;
const HEADDIM: usize = 64;
const D_STATE: usize = 128;
const NGROUPS: usize = 1;
const D_CONV: usize = 4;
const D_INNER: usize = NHEADS * HEADDIM;
const CONV_DIM: usize = D_INNER + 2 * NGROUPS * D_STATE;

#[test]
#[ignore = "benchmark: run on a GPU with --ignored --nocapture"]
fn bench_ops_1_3b_bf16() {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("skipping CUDA benchmark: no CUDA device ({e})");
            return;
        }
    };
    let dt16 = DType::BF16;
    // Device copy bandwidth (bytes read + written), the decode roofline's denominator.
    if let Device::Cuda(cd) = &dev {
        let n = 1usize << 31; // 2 GiB
        let src = cd.alloc_zeros::<u8>(n).unwrap();
        let mut dst = cd.alloc_zeros::<u8>(n).unwrap();
        let us = time_us(&dev, 5, || cd.memcpy_dtod(&src, &mut dst).unwrap());
        let bw = 2.0 * n as f64 / (us * 1e-6) / 1e12;
        println!("copy bandwidth: {bw:.2} TB/s (2 GiB device-to-device copy, {us:.0} us)");
    }

    let a = (Tensor::randn(0f32, 1.0, NHEADS, &dev)
        .unwrap()
        .abs()
        .unwrap()
        .neg()
        .unwrap())
    .contiguous()
    .unwrap();
    let d = randn(&[NHEADS], dt16, &dev);
    let dt_bias = randn(&[NHEADS], dt16, &dev);
    let conv_w = randn(&[CONV_DIM, D_CONV], dt16, &dev);
    let conv_b = randn(&[CONV_DIM], dt16, &dev);
    let norm_w = randn(&[D_INNER], dt16, &dev);
    let res_w = randn(&[D_MODEL], dt16, &dev);
    let params = SsdParams::default();
    println!("| op (1.3b shape, bf16) | fast us | reference us | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    let row = |name: &str, fast: f64, slow: f64| {
        println!("| {name} | {fast:.1} | {slow:.1} | {:.1}x |", slow / fast);
    };

    {
        let seqlen = 2048usize;
        let batch = 1;
        // Prefill: the x / B / C views of one conv output, as in the mixer.
        let xbc = randn(&[batch, seqlen, CONV_DIM], dt16, &dev);
        let z = randn(&[batch, seqlen, NHEADS, HEADDIM], dt16, &dev);
        let dt = randn(&[batch, seqlen, NHEADS], dt16, &dev);
        let conv = |b: Backend| {
            causal_conv1d_with(
                &Conv1dArgs {
                    x: &xbc,
                    weight: &conv_w,
                    bias: Some(&conv_b),
                    initial_state: None,
                    seq_idx: None,
                    silu: true,
                },
                b,
            )
            .unwrap()
        };
        let f = time_us(&dev, 20, || drop(conv(Backend::Auto)));
        let s = time_us(&dev, 5, || drop(conv(Backend::Reference)));
        row(&format!("causal_conv1d prefill {seqlen}"), f, s);

        let x = xbc
            .narrow(2, 0, D_INNER)
            .unwrap()
            .reshape((batch, seqlen, NHEADS, HEADDIM))
            .unwrap();
        let b = xbc
            .narrow(2, D_INNER, NGROUPS * D_STATE)
            .unwrap()
            .reshape((batch, seqlen, NGROUPS, D_STATE))
            .unwrap();
        let c = xbc
            .narrow(2, D_INNER + NGROUPS * D_STATE, NGROUPS * D_STATE)
            .unwrap()
            .reshape((batch, seqlen, NGROUPS, D_STATE))
            .unwrap();
        let args = SsdArgs {
            x: &x,
            dt: &dt,
            a: &a,
            b: &b,
            c: &c,
            d: Some(&d),
            z: Some(&z),
            dt_bias: Some(&dt_bias),
            initial_state: None,
            seq_idx: None,
        };
        let f = time_us(&dev, 20, || {
            drop(ssd_chunk_scan_with(&args, &params, Backend::Auto).unwrap())
        });
        let s = time_us(&dev, 3, || {
            drop(ssd_chunk_scan_with(&args, &params, Backend::Reference).unwrap())
        });
        row(
            &format!("ssd_chunk_scan prefill {seqlen} (chunk 256 ref)"),
            f,
            s,
        );
        let flops = 2.0
            * (batch * NHEADS) as f64
            * (seqlen as f64 * 64.0 * (D_STATE + HEADDIM) as f64 // C Bᵀ and M x within chunks
                + 2.0 * seqlen as f64 * (HEADDIM * D_STATE) as f64); // chunk states + state term
        println!(
            "ssd prefill: {:.1} TFLOP/s of chunk products, {:.0} tokens/s per layer",
            flops / (f * 1e-6) / 1e12,
            seqlen as f64 / (f * 1e-6)
        );

        let y = randn(&[batch, seqlen, D_INNER], dt16, &dev);
        let zz = randn(&[batch, seqlen, D_INNER], dt16, &dev);
        let gargs = GatedRmsNormArgs {
            x: &y,
            z: Some(&zz),
            weight: &norm_w,
            eps: 1e-5,
            group_size: D_INNER / NGROUPS,
            norm_before_gate: false,
        };
        let f = time_us(&dev, 20, || {
            drop(gated_rms_norm_with(&gargs, Backend::Auto).unwrap())
        });
        let s = time_us(&dev, 5, || {
            drop(gated_rms_norm_with(&gargs, Backend::Reference).unwrap())
        });
        row(&format!("gated_rms_norm prefill {seqlen}"), f, s);

        let h = randn(&[batch, seqlen, D_MODEL], dt16, &dev);
        let r = randn(&[batch, seqlen, D_MODEL], DType::F32, &dev);
        let f = time_us(&dev, 20, || {
            drop(rms_norm_residual_with(&h, Some(&r), &res_w, 1e-5, true, Backend::Auto).unwrap())
        });
        let s = time_us(&dev, 5, || {
            drop(
                rms_norm_residual_with(&h, Some(&r), &res_w, 1e-5, true, Backend::Reference)
                    .unwrap(),
            )
        });
        row(&format!("rms_norm_residual prefill {seqlen}"), f, s);
    }

    for batch in [1usize, 16] {
        let x = randn(&[batch, CONV_DIM], dt16, &dev);
        let conv_state = randn(&[batch, CONV_DIM, D_CONV], DType::F32, &dev);
        let f = time_us(&dev, 200, || {
            drop(
                causal_conv1d_update_with(
                    &x,
                    &conv_state,
                    &conv_w,
                    Some(&conv_b),
                    true,
                    Backend::Auto,
                )
                .unwrap(),
            )
        });
        let s = time_us(&dev, 50, || {
            drop(
                causal_conv1d_update_with(
                    &x,
                    &conv_state,
                    &conv_w,
                    Some(&conv_b),
                    true,
                    Backend::Reference,
                )
                .unwrap(),
            )
        });
        row(&format!("causal_conv1d_update batch {batch}"), f, s);

        let state = randn(&[batch, NHEADS, HEADDIM, D_STATE], DType::F32, &dev);
        let xs = randn(&[batch, NHEADS, HEADDIM], dt16, &dev);
        let zs = randn(&[batch, NHEADS, HEADDIM], dt16, &dev);
        let dts = randn(&[batch, NHEADS], dt16, &dev);
        let bs = randn(&[batch, NGROUPS, D_STATE], dt16, &dev);
        let cs = randn(&[batch, NGROUPS, D_STATE], dt16, &dev);
        let sargs = StateUpdateArgs {
            state: &state,
            x: &xs,
            dt: &dts,
            a: &a,
            b: &bs,
            c: &cs,
            d: Some(&d),
            z: Some(&zs),
            dt_bias: Some(&dt_bias),
        };
        let before = cuda_launch_count();
        let f = time_us(&dev, 200, || {
            drop(selective_state_update_with(&sargs, &params, Backend::Auto).unwrap())
        });
        let launches = (cuda_launch_count() - before) as f64 / (3 + 7 * 200) as f64;
        let s = time_us(&dev, 50, || {
            drop(selective_state_update_with(&sargs, &params, Backend::Reference).unwrap())
        });
        row(
            &format!("selective_state_update batch {batch} ({launches} launch/call)"),
            f,
            s,
        );
        let bytes = (batch * NHEADS * HEADDIM * D_STATE * 4 * 2) as f64;
        println!(
            "state update batch {batch}: {:.2} TB/s of state traffic",
            bytes / (f * 1e-6) / 1e12
        );

        // The whole mixer step between in_proj and out_proj: fused (one launch) against the
        // same ops one after another (their fast paths, plus the copies of the split views).
        let proj = randn(&[batch, D_INNER + CONV_DIM + NHEADS], dt16, &dev);
        let step_args = DecodeStepArgs {
            xbc: &proj.narrow(1, D_INNER, CONV_DIM).unwrap(),
            dt: &proj.narrow(1, D_INNER + CONV_DIM, NHEADS).unwrap(),
            z: &proj.narrow(1, 0, D_INNER).unwrap(),
            conv_state: &conv_state,
            conv_state_next: None,
            conv_weight: &conv_w,
            conv_bias: Some(&conv_b),
            ssm_state: &state,
            a: &a,
            d: Some(&d),
            dt_bias: Some(&dt_bias),
            norm_weight: &norm_w,
            eps: 1e-5,
            ngroups: NGROUPS,
            norm_before_gate: false,
        };
        let f = time_us(&dev, 200, || {
            drop(mixer_decode_step(&step_args, &params).unwrap())
        });
        let s = time_us(&dev, 200, || {
            drop(mixer_decode_step_slow(&step_args, &params).unwrap())
        });
        println!("| mixer decode step batch {batch}: fused vs unfused fast ops | {f:.1} | {s:.1} | {:.1}x |", s / f);

        let y = randn(&[batch, D_INNER], dt16, &dev);
        let zz = randn(&[batch, D_INNER], dt16, &dev);
        let gargs = GatedRmsNormArgs {
            x: &y,
            z: Some(&zz),
            weight: &norm_w,
            eps: 1e-5,
            group_size: D_INNER / NGROUPS,
            norm_before_gate: false,
        };
        let f = time_us(&dev, 200, || {
            drop(gated_rms_norm_with(&gargs, Backend::Auto).unwrap())
        });
        let s = time_us(&dev, 50, || {
            drop(gated_rms_norm_with(&gargs, Backend::Reference).unwrap())
        });
        row(&format!("gated_rms_norm decode batch {batch}"), f, s);
    }
}
