//! The fused CUDA mixer decode step against its reference (the ops one after another, on the
//! CPU), for f32/f16/bf16, over several consecutive steps with the inputs as views of one
//! projection row, as the model produces them. Skips when no CUDA device can be opened.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use mamba2_ops::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod support;
use support::{check_rel as check, symmetric as rand_t};

#[test]
fn fused_decode_step_matches_composed_ops() {
    std::env::set_var("MAMBA2_CUDA_POISON", "1");
    if let Err(e) = Device::new_cuda(0) {
        println!("skipping CUDA decode-step test: no CUDA device ({e})");
        return;
    }
    // Both layouts of the kernel: one block per head, and heads split over up to 4 blocks
    // where batch x heads is below the SM count (split() reads this at every launch).
    for split in ["1", "4"] {
        std::env::set_var("MAMBA2_CUDA_STEP_SPLIT", split);
        println!("blocks per head: up to {split}");
        check_cases();
    }
}

fn check_cases() {
    let dev = Device::new_cuda(0).unwrap();
    let mut rng = StdRng::seed_from_u64(13);
    // (batch, nheads, headdim, ngroups, d_state, d_conv, norm_before_gate)
    let cases = [
        (1, 64, 64, 1, 128, 4, false),
        (3, 24, 64, 8, 128, 4, false),
        (2, 10, 32, 2, 64, 3, true),
        (16, 48, 64, 1, 128, 4, false),
    ];
    for (batch, nheads, headdim, ngroups, d_state, d_conv, nbg) in cases {
        let d_inner = nheads * headdim;
        let conv_dim = d_inner + 2 * ngroups * d_state;
        let a: Vec<f32> = (0..nheads)
            .map(|_| -rng.random_range(0.0f32..2.5).exp())
            .collect();
        let a = Tensor::from_vec(a, nheads, &Device::Cpu).unwrap();
        let conv_w = rand_t(&mut rng, &[conv_dim, d_conv], 0.5);
        let conv_b = rand_t(&mut rng, &[conv_dim], 0.5);
        let d = rand_t(&mut rng, &[nheads], 1.0);
        let dt_bias = rand_t(&mut rng, &[nheads], 1.0);
        let norm_w = rand_t(&mut rng, &[d_inner], 1.0);
        let conv0 = rand_t(&mut rng, &[batch, conv_dim, d_conv], 1.0);
        let ssm0 = rand_t(&mut rng, &[batch, nheads, headdim, d_state], 1.0);
        let params = SsdParams::default();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let tol = match dtype {
                DType::F32 => 1e-5,
                DType::F16 => 1e-3,
                _ => 5e-3,
            };
            let on = |t: &Tensor, dt: DType, dev: &Device| {
                t.to_dtype(dt).unwrap().to_device(dev).unwrap()
            };
            let (conv_c, ssm_c) = (conv0.copy().unwrap(), ssm0.copy().unwrap());
            let (conv_g, ssm_g) = (on(&conv0, DType::F32, &dev), on(&ssm0, DType::F32, &dev));
            for step in 0..3 {
                // One projection row (batch, z | xBC | dt): the op reads its views.
                let proj = rand_t(&mut rng, &[batch, d_inner + conv_dim + nheads], 1.5);
                let run = |dev: &Device, conv: &Tensor, ssm: &Tensor, fused: bool| -> Tensor {
                    let p = on(&proj, dtype, dev);
                    let z = p.narrow(1, 0, d_inner).unwrap();
                    let xbc = p.narrow(1, d_inner, conv_dim).unwrap();
                    let dt = p.narrow(1, d_inner + conv_dim, nheads).unwrap();
                    let (cw, cb, dd, db, nw) = (
                        on(&conv_w, dtype, dev),
                        on(&conv_b, dtype, dev),
                        on(&d, dtype, dev),
                        on(&dt_bias, dtype, dev),
                        on(&norm_w, dtype, dev),
                    );
                    let aa = on(&a, DType::F32, dev);
                    let args = DecodeStepArgs {
                        xbc: &xbc,
                        dt: &dt,
                        z: &z,
                        conv_state: conv,
                        conv_weight: &cw,
                        conv_bias: Some(&cb),
                        ssm_state: ssm,
                        a: &aa,
                        d: Some(&dd),
                        dt_bias: Some(&db),
                        norm_weight: &nw,
                        eps: 1e-5,
                        ngroups,
                        norm_before_gate: nbg,
                    };
                    if fused {
                        let before = cuda_launch_count();
                        let y = mixer_decode_step(&args, &params).unwrap();
                        assert_eq!(cuda_launch_count() - before, 1, "fused step: one launch");
                        y
                    } else {
                        mixer_decode_step_slow(&args, &params).unwrap()
                    }
                };
                let y_ref = run(&Device::Cpu, &conv_c, &ssm_c, false);
                let y = run(&dev, &conv_g, &ssm_g, true);
                let name = format!("decode step {step} b{batch} h{nheads} p{headdim} g{ngroups} n{d_state} k{d_conv} nbg={nbg} {dtype:?}");
                check(&format!("{name} y"), &y, &y_ref, tol);
                check(&format!("{name} conv state"), &conv_g, &conv_c, 1e-7);
                check(&format!("{name} ssm state"), &ssm_g, &ssm_c, 1e-5);
            }
        }
    }
}
