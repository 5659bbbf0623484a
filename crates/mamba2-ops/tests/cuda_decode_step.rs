//! The fused CUDA mixer decode step against its reference (the ops one after another, on the
//! CPU), for f32/f16/bf16, over several consecutive steps with the inputs as views of one
//! projection row, as the model produces them; in both of its modes: normalising (the eager
//! step), and with the norm and the B/C conv-state shift deferred to its consumer (the captured
//! step's norm-epilogue layout, one group). Skips when no CUDA device can be opened.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use mamba2_ops::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod support;
use support::{check_rel as check, symmetric as rand_t};

#[test]
fn fused_decode_step_matches_composed_ops() {
    if support::poisoned_cuda("CUDA decode-step test").is_none() {
        return;
    }
    // Both layouts of the kernel: one block per head, and heads split over up to 4 blocks
    // where batch x heads is below the SM count; and both variants, `n128` (the default for
    // d_state <= 128) and the general one (both options are read at every launch).
    for (split, n128) in [(1, true), (4, true), (1, false)] {
        let mut opts = mamba2_ops::options::current_options();
        opts.cuda.step_split = Some(split);
        opts.cuda.step_n128 = n128;
        println!("blocks per head: up to {split}, n128 variant: {n128}");
        mamba2_ops::options::with_options(&opts, check_cases);
    }
}

fn check_cases() {
    let dev = Device::new_cuda(0).unwrap();
    let mut rng = StdRng::seed_from_u64(13);
    // (batch, nheads, headdim, ngroups, d_state, d_conv, norm_before_gate); headdim 128 gives
    // a warp more than one tile of rows (the rows after the first load their gates late).
    let cases = [
        (1, 64, 64, 1, 128, 4, false),
        (3, 24, 64, 8, 128, 4, false),
        (2, 10, 32, 2, 64, 3, true),
        (16, 48, 64, 1, 128, 4, false),
        (2, 10, 32, 1, 64, 3, true),
        (2, 4, 64, 1, 256, 4, false),
        (2, 6, 128, 1, 64, 4, false),
        (3, 6, 128, 2, 64, 4, true),
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
            let (conv_d, ssm_d) = (on(&conv0, DType::F32, &dev), on(&ssm0, DType::F32, &dev));
            for step in 0..3 {
                // One projection row (batch, z | xBC | dt): the op reads its views.
                let proj = rand_t(&mut rng, &[batch, d_inner + conv_dim + nheads], 1.5);
                let run = |dev: &Device, conv: &Tensor, ssm: &Tensor, mode: Mode| -> Tensor {
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
                        conv_state_next: None,
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
                    match mode {
                        Mode::Reference => mixer_decode_step_slow(&args, &params).unwrap(),
                        Mode::Fused => {
                            let before = cuda_launch_count();
                            let y = mixer_decode_step(&args, &params).unwrap();
                            assert_eq!(cuda_launch_count() - before, 1, "fused step: one launch");
                            y
                        }
                        Mode::Deferred => deferred_step(dev, &args, &params, nheads),
                    }
                };
                let conv_before = conv_d.to_device(&Device::Cpu).unwrap();
                let y_ref = run(&Device::Cpu, &conv_c, &ssm_c, Mode::Reference);
                let y = run(&dev, &conv_g, &ssm_g, Mode::Fused);
                let name = format!("decode step {step} b{batch} h{nheads} p{headdim} g{ngroups} n{d_state} k{d_conv} nbg={nbg} {dtype:?}");
                check(&format!("{name} y"), &y, &y_ref, tol);
                check(&format!("{name} conv state"), &conv_g, &conv_c, 1e-7);
                check(&format!("{name} ssm state"), &ssm_g, &ssm_c, 1e-5);
                // The deferred mode serves the captured step's matrix-vector layout: one group,
                // up to 4 sequences.
                if ngroups == 1 && batch <= 4 {
                    let y_d = run(&dev, &conv_d, &ssm_d, Mode::Deferred);
                    check(
                        &format!("{name} deferred y"),
                        &y_d,
                        &y_ref.to_dtype(DType::F32).unwrap(),
                        tol,
                    );
                    check(&format!("{name} deferred ssm state"), &ssm_d, &ssm_c, 1e-5);
                    // x channels shifted by the step, B/C channels left as they were.
                    let x_ch = |t: &Tensor| t.narrow(1, 0, d_inner).unwrap();
                    let bc_ch = |t: &Tensor| t.narrow(1, d_inner, conv_dim - d_inner).unwrap();
                    check(
                        &format!("{name} deferred conv state x"),
                        &x_ch(&conv_d),
                        &x_ch(&conv_c),
                        1e-7,
                    );
                    check(
                        &format!("{name} deferred conv state B/C"),
                        &bc_ch(&conv_d),
                        &bc_ch(&conv_before),
                        1e-7,
                    );
                    // The consumer's shift, done here from the reference, for the next step.
                    conv_d
                        .slice_set(&conv_c.to_device(&dev).unwrap(), 0, 0)
                        .unwrap();
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Reference,
    Fused,
    Deferred,
}

/// The step in its deferred mode, as the captured step records it (a one-kernel graph,
/// replayed once): returns its unscaled output times the 1 / rms of its own partial sums
/// (what the output projection applies), f32, comparable with the normalised reference.
fn deferred_step(dev: &Device, args: &DecodeStepArgs, params: &SsdParams, nheads: usize) -> Tensor {
    let Device::Cuda(cuda) = dev else {
        unreachable!("the deferred step runs on CUDA")
    };
    let (batch, d_inner) = args.z.dims2().unwrap();
    let s = cuda_graph::StepStream::new(cuda, args.xbc.dtype(), batch).unwrap();
    let scratch = s.scratch(d_inner, nheads, args.ngroups).unwrap();
    // Poisoned: an element the kernel does not write is NaN.
    let out = Tensor::full(f32::NAN, (batch, d_inner), dev)
        .unwrap()
        .to_dtype(args.xbc.dtype())
        .unwrap();
    let mut g = s
        .capture(|s| s.mixer_decode_step_deferred(args, params, &scratch, &out))
        .unwrap();
    g.replay().unwrap();
    let sums = scratch.sums().sum_keepdim(1).unwrap(); // (batch, 1)
    let inv = ((sums / d_inner as f64).unwrap() + args.eps)
        .unwrap()
        .sqrt()
        .unwrap()
        .recip()
        .unwrap();
    out.to_dtype(DType::F32)
        .unwrap()
        .broadcast_mul(&inv)
        .unwrap()
}
