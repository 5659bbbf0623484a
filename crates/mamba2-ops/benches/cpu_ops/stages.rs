//! `-- stages`: one decode token of a mamba2-130m / 370m-shape model built from the ops exactly
//! as `Mamba2Model::step` calls them (per layer: residual add + RMSNorm, `in_proj`, the mixer
//! decode step's CPU composition (conv update, state update, gated norm), `out_proj`; then the final norm and the tied LM head), run inside the Rayon pool
//! as the model does, with the time of each stage summed over the layers. Random weights; the
//! states start at zero. `STAGES_SHAPE=370m` for the larger shape, `STAGES_DTYPES=bf16,f16`.
//!
//! Why: a decode token is a few milliseconds of weight streaming plus ~100 short ops whose cost
//! the end-to-end benchmark cannot separate; this names where the rest goes.

use super::randn;
use candle_core::{DType, Device, Tensor};
use mamba2_ops::*;
use std::time::Instant;

struct Layer {
    norm: Tensor,
    in_proj: Tensor,
    conv_w: Tensor,
    conv_b: Tensor,
    dt_bias: Tensor,
    a: Tensor,
    d: Tensor,
    gate_norm: Tensor,
    out_proj: Tensor,
    conv_state: Tensor,
    ssm_state: Tensor,
}

const STAGES: [&str; 8] = [
    "rms_norm_residual",
    "in_proj",
    "conv1d_update",
    "state_update",
    "gated_rms_norm",
    "out_proj",
    "lm_head",
    "logits to f32",
];

pub fn bench_stages() {
    let shape = std::env::var("STAGES_SHAPE").unwrap_or_else(|_| "130m".into());
    let (d_model, n_layer) = if shape == "370m" {
        (1024, 48)
    } else {
        (768, 24)
    };
    let (d_state, headdim, vocab) = (128, 64, 50288);
    let d_inner = 2 * d_model;
    let nheads = d_inner / headdim;
    let conv_dim = d_inner + 2 * d_state;
    let d_in_proj = d_inner + conv_dim + nheads;
    let dtypes = std::env::var("STAGES_DTYPES").unwrap_or_else(|_| "f32,f16,bf16".into());
    for name in dtypes.split(',') {
        let dtype = match name {
            "f32" => DType::F32,
            "f16" => DType::F16,
            _ => DType::BF16,
        };
        let f32z = |d: &[usize]| Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap();
        let layers: Vec<Layer> = (0..n_layer)
            .map(|_| Layer {
                norm: randn(&[d_model], dtype),
                in_proj: (randn(&[d_in_proj, d_model], dtype) * 0.03).unwrap(),
                conv_w: randn(&[conv_dim, 4], dtype),
                conv_b: randn(&[conv_dim], dtype),
                dt_bias: (randn(&[nheads], DType::F32) - 3.0).unwrap(),
                a: (randn(&[nheads], DType::F32).abs().unwrap() + 1.0)
                    .unwrap()
                    .neg()
                    .unwrap(),
                d: randn(&[nheads], DType::F32),
                gate_norm: randn(&[d_inner], dtype),
                out_proj: (randn(&[d_model, d_inner], dtype) * 0.02).unwrap(),
                conv_state: f32z(&[1, conv_dim, 4]),
                ssm_state: f32z(&[1, nheads, headdim, d_state]),
            })
            .collect();
        let head = (randn(&[vocab, d_model], dtype) * 0.02).unwrap();
        let norm_f = randn(&[d_model], dtype);
        let prm = SsdParams::default();
        let mut spent = [0f64; STAGES.len()];
        let mut total = 0f64;
        let tokens = 64;
        let token = |timed: bool, spent: &mut [f64; STAGES.len()]| {
            let mut t = Instant::now();
            let mut lap = |i: usize, spent: &mut [f64; STAGES.len()]| {
                let now = Instant::now();
                if timed {
                    spent[i] += (now - t).as_secs_f64();
                }
                t = now;
            };
            let mut hidden = randn(&[1, d_model], dtype);
            let mut residual: Option<Tensor> = None;
            for l in &layers {
                let (normed, res) =
                    rms_norm_residual(&hidden, residual.as_ref(), &l.norm, 1e-5, true).unwrap();
                residual = Some(res);
                lap(0, spent);
                let zxbcdt = linear(&normed, &l.in_proj, None).unwrap(); // (1, d_in_proj)
                lap(1, spent);
                let z = zxbcdt.narrow(1, 0, d_inner).unwrap();
                let xbc = zxbcdt.narrow(1, d_inner, conv_dim).unwrap();
                let dt = zxbcdt.narrow(1, d_inner + conv_dim, nheads).unwrap();
                // The CPU path of `mixer_decode_step` (`mixer_decode_step_slow`), op by op.
                let xbc = causal_conv1d_update(
                    &xbc.contiguous().unwrap(),
                    &l.conv_state,
                    &l.conv_w,
                    Some(&l.conv_b),
                    true,
                )
                .unwrap(); // (1, conv_dim)
                lap(2, spent);
                let x = xbc.narrow(1, 0, d_inner).unwrap();
                let y = selective_state_update(
                    &StateUpdateArgs {
                        state: &l.ssm_state,
                        x: &x.reshape((1, nheads, headdim)).unwrap(),
                        dt: &dt,
                        a: &l.a,
                        b: &xbc
                            .narrow(1, d_inner, d_state)
                            .unwrap()
                            .reshape((1, 1, d_state))
                            .unwrap(),
                        c: &xbc
                            .narrow(1, d_inner + d_state, d_state)
                            .unwrap()
                            .reshape((1, 1, d_state))
                            .unwrap(),
                        d: Some(&l.d),
                        z: None,
                        dt_bias: Some(&l.dt_bias),
                    },
                    &prm,
                )
                .unwrap(); // (1, nheads, headdim)
                lap(3, spent);
                let y = gated_rms_norm(&GatedRmsNormArgs {
                    x: &y.reshape((1, d_inner)).unwrap(),
                    z: Some(&z),
                    weight: &l.gate_norm,
                    eps: 1e-5,
                    group_size: d_inner,
                    norm_before_gate: false,
                })
                .unwrap(); // (1, d_inner)
                lap(4, spent);
                hidden = linear(&y, &l.out_proj, None).unwrap(); // (1, d_model)
                lap(5, spent);
            }
            let (normed, _) =
                rms_norm_residual(&hidden, residual.as_ref(), &norm_f, 1e-5, true).unwrap();
            lap(0, spent);
            let logits = linear(&normed, &head, None).unwrap();
            lap(6, spent);
            let _ = logits.to_dtype(DType::F32).unwrap();
            lap(7, spent);
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .build()
            .unwrap();
        pool.install(|| {
            for _ in 0..8 {
                token(false, &mut spent);
            }
            let t0 = Instant::now();
            for _ in 0..tokens {
                token(true, &mut spent);
            }
            total = t0.elapsed().as_secs_f64();
        });
        let per = |s: f64| s / tokens as f64 * 1e3;
        println!(
            "decode stages {shape} {dtype:?}: {:.3} ms per token ({:.1} tok/s)",
            per(total),
            tokens as f64 / total
        );
        for (name, s) in STAGES.iter().zip(spent) {
            println!("  {name:18} {:7.3} ms  {:5.1} %", per(s), 100.0 * s / total);
        }
    }
}
