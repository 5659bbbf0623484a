//! The public ops on a real Metal device (fast path where its preconditions hold, reference
//! otherwise) against the reference on the CPU. Needs Apple hardware:
//! `cargo test -p mamba2-ops --features metal --test metal_device -- --ignored`.
//! On Linux these tests compile (they are part of clippy's `--all-targets`) but are ignored.

#[path = "metal_common.rs"]
mod metal_common;

use candle_core::{DType, Device, Tensor};
use mamba2_ops::metal_params::supports;
use mamba2_ops::*;
use metal_common::*;
use rand::{rngs::StdRng, SeedableRng};

fn metal() -> Device {
    Device::new_metal(0).expect("these tests need a Metal device (run them on a Mac)")
}

fn on(t: &Tensor, dev: &Device) -> Tensor {
    t.to_device(dev).unwrap()
}

fn cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

#[test]
#[ignore = "needs a Metal device"]
fn conv1d_ops_on_metal() {
    let dev = metal();
    for dtype in DTYPES {
        let mut rng = StdRng::seed_from_u64(1);
        // d_conv 4 takes the kernel, d_conv 10 falls back to the reference
        for d_conv in [4usize, 10] {
            assert_eq!(supports::conv1d(d_conv), d_conv == 4);
            let x = rand_t(&mut rng, &[2, 70, 100], 1.0, dtype);
            let w = rand_t(&mut rng, &[100, d_conv], 0.5, DType::F32);
            let b = rand_t(&mut rng, &[100], 0.5, DType::F32);
            let init = rand_t(&mut rng, &[2, 100, d_conv], 1.0, DType::F32);
            let ids = seq_ids(&mut rng, 2, 70);
            let args = |x, w, b, i, s| Conv1dArgs {
                x,
                weight: w,
                bias: Some(b),
                initial_state: Some(i),
                seq_idx: Some(s),
                silu: true,
            };
            let (y_ref, s_ref) = causal_conv1d_slow(&args(&x, &w, &b, &init, &ids)).unwrap();
            let (xm, wm, bm, im, sm) = (
                on(&x, &dev),
                on(&w, &dev),
                on(&b, &dev),
                on(&init, &dev),
                on(&ids, &dev),
            );
            let (y, s) = causal_conv1d(&args(&xm, &wm, &bm, &im, &sm)).unwrap();
            assert_close(&cpu(&y), &y_ref, dtype, "conv1d on metal");
            assert_close(&cpu(&s), &s_ref, DType::F32, "conv1d state on metal");

            // one decode step, in place
            let xt = rand_t(&mut rng, &[2, 100], 1.0, dtype);
            let st = s_ref.copy().unwrap();
            let y_ref = causal_conv1d_update_slow(&xt, &st, &w, Some(&b), true).unwrap();
            let stm = on(&s_ref, &dev);
            let y = causal_conv1d_update(&on(&xt, &dev), &stm, &wm, Some(&bm), true).unwrap();
            assert_close(&cpu(&y), &y_ref, dtype, "conv1d update on metal");
            assert_close(&cpu(&stm), &st, DType::F32, "conv1d update state on metal");
        }
        let x = rand_t(&mut rng, &[20, 70], 1.0, dtype);
        let cu = [0usize, 2, 2, 6, 17, 20];
        let want = conv_states_varlen_slow(&x, &cu, 4).unwrap();
        let got = conv_states_varlen(&on(&x, &dev), &cu, 4).unwrap();
        assert_close(&cpu(&got), &want, DType::F32, "conv varlen on metal");
    }
}

/// `[x, dt, a, b, c, d, z, dt_bias, initial_state, seq_idx]` as SSD arguments.
fn ssd_args<'a>(t: &[&'a Tensor; 10]) -> SsdArgs<'a> {
    SsdArgs {
        x: t[0],
        dt: t[1],
        a: t[2],
        b: t[3],
        c: t[4],
        d: Some(t[5]),
        z: Some(t[6]),
        dt_bias: Some(t[7]),
        initial_state: Some(t[8]),
        seq_idx: Some(t[9]),
    }
}

#[test]
#[ignore = "needs a Metal device"]
fn ssd_and_state_update_on_metal() {
    let dev = metal();
    for dtype in DTYPES {
        // headdim 64 takes the kernel, headdim 24 falls back
        for (p, n) in [(64usize, 128usize), (24, 16)] {
            assert_eq!(supports::ssd_chunk_scan(p, n), p == 64);
            let (bs, l, h, g) = (2, 130, 4, 2);
            let mut rng = StdRng::seed_from_u64(2);
            let x = rand_t(&mut rng, &[bs, l, h, p], 1.0, dtype);
            let dt = rand_range(&mut rng, &[bs, l, h], -4.0, -1.0)
                .to_dtype(dtype)
                .unwrap();
            let a = rand_range(&mut rng, &[h], 0.0, 2.5)
                .exp()
                .unwrap()
                .neg()
                .unwrap();
            let b = rand_t(&mut rng, &[bs, l, g, n], 1.0, dtype);
            let c = rand_t(&mut rng, &[bs, l, g, n], 1.0, dtype);
            let d = rand_t(&mut rng, &[h], 1.0, DType::F32);
            let z = rand_t(&mut rng, &[bs, l, h, p], 2.0, dtype);
            let dt_bias = rand_range(&mut rng, &[h], -1.0, 0.5);
            let init = rand_t(&mut rng, &[bs, h, p, n], 1.0, DType::F32);
            let ids = seq_ids(&mut rng, bs, l);
            let params = SsdParams::default();
            let host = [&x, &dt, &a, &b, &c, &d, &z, &dt_bias, &init, &ids];
            let (y_ref, s_ref) = ssd_chunk_scan_slow(&ssd_args(&host), &params).unwrap();
            let dm: Vec<Tensor> = host.iter().map(|t| on(t, &dev)).collect();
            let refs: [&Tensor; 10] = std::array::from_fn(|i| &dm[i]);
            let (y, s) = ssd_chunk_scan(&ssd_args(&refs), &params).unwrap();
            assert_close(&cpu(&y), &y_ref, dtype, "ssd on metal");
            assert_close(&cpu(&s), &s_ref, DType::F32, "ssd state on metal");

            // one decode step from the final state, in place
            let xt = rand_t(&mut rng, &[bs, h, p], 1.0, dtype);
            let dtt = rand_range(&mut rng, &[bs, h], -4.0, 1.0)
                .to_dtype(dtype)
                .unwrap();
            let bt = rand_t(&mut rng, &[bs, g, n], 1.0, dtype);
            let ct = rand_t(&mut rng, &[bs, g, n], 1.0, dtype);
            let state_ref = s_ref.copy().unwrap();
            let state_m = on(&s_ref, &dev);
            let su = |s, x, dt, a, b, c, d, db| StateUpdateArgs {
                state: s,
                x,
                dt,
                a,
                b,
                c,
                d: Some(d),
                z: None,
                dt_bias: Some(db),
            };
            let y_ref = selective_state_update_slow(
                &su(&state_ref, &xt, &dtt, &a, &bt, &ct, &d, &dt_bias),
                &params,
            )
            .unwrap();
            let y = selective_state_update(
                &su(
                    &state_m,
                    &on(&xt, &dev),
                    &on(&dtt, &dev),
                    &dm[2],
                    &on(&bt, &dev),
                    &on(&ct, &dev),
                    &dm[5],
                    &dm[7],
                ),
                &params,
            )
            .unwrap();
            assert_close(&cpu(&y), &y_ref, dtype, "state update on metal");
            assert_close(&cpu(&state_m), &state_ref, DType::F32, "state on metal");
        }
    }
}

#[test]
#[ignore = "needs a Metal device"]
fn norms_on_metal() {
    let dev = metal();
    for dtype in DTYPES {
        let mut rng = StdRng::seed_from_u64(3);
        let x = rand_t(&mut rng, &[3, 5, 1536], 2.0, dtype);
        let z = rand_t(&mut rng, &[3, 5, 1536], 2.0, dtype);
        let w = rand_range(&mut rng, &[1536], 0.5, 1.5);
        let args = |x, z, w| GatedRmsNormArgs {
            x,
            z: Some(z),
            weight: w,
            eps: 1e-5,
            group_size: 192,
            norm_before_gate: false,
        };
        let want = gated_rms_norm_slow(&args(&x, &z, &w)).unwrap();
        let got = gated_rms_norm(&args(&on(&x, &dev), &on(&z, &dev), &on(&w, &dev))).unwrap();
        assert_close(&cpu(&got), &want, dtype, "gated norm on metal");

        // weight in the dtype of x: kernel; f32 weight with half x: reference
        for w_dtype in [dtype, DType::F32] {
            let w = w.to_dtype(w_dtype).unwrap();
            let r = rand_t(&mut rng, &[3, 5, 1536], 2.0, DType::F32);
            let (n_ref, r_ref) = rms_norm_residual_slow(&x, Some(&r), &w, 1e-5, true).unwrap();
            let (n, ro) = rms_norm_residual(
                &on(&x, &dev),
                Some(&on(&r, &dev)),
                &on(&w, &dev),
                1e-5,
                true,
            )
            .unwrap();
            assert_close(&cpu(&n), &n_ref, w_dtype, "residual norm on metal");
            assert_close(&cpu(&ro), &r_ref, DType::F32, "residual out on metal");
        }
    }
}

/// The decode path's kernels on the GPU: the projections' matrix-vector kernel (decode rows;
/// 9 rows take the GEMM), the embedding gather, and the mixer's decode step through the
/// out-projection (fused step + out-projection with the gated norm folded in), the new conv
/// state in the second buffer.
#[test]
#[ignore = "needs a Metal device"]
fn decode_kernels_on_metal() {
    let dev = metal();
    for dtype in DTYPES {
        let mut rng = StdRng::seed_from_u64(4);
        for rows in [1usize, 4, 9] {
            let x = rand_t(&mut rng, &[rows, 768], 1.0, dtype);
            let w = rand_t(&mut rng, &[1000, 768], 0.036, dtype);
            let want = linear_slow(&x, &w, None).unwrap();
            let got = linear(&on(&x, &dev), &on(&w, &dev), None).unwrap();
            assert_close(&cpu(&got), &want, dtype, "linear on metal");
        }
        let table = rand_t(&mut rng, &[300, 256], 1.0, dtype);
        let ids = Tensor::new(&[5u32, 299, 0, 5], &Device::Cpu).unwrap();
        let want = embedding_slow(&ids, &table).unwrap();
        let got = embedding(&on(&ids, &dev), &on(&table, &dev)).unwrap();
        assert_close(&cpu(&got), &want, dtype, "embedding on metal");

        // mixer step: 2 rows, 8 heads of 64, 2 groups of d_state 64, d_model 256
        let (bs, h, p, g, n, d_model) = (2usize, 8usize, 64usize, 2usize, 64usize, 256usize);
        let (di, cd) = (h * p, h * p + 2 * g * n);
        let proj = rand_t(&mut rng, &[bs, di + cd + h], 1.0, dtype);
        let conv_w = rand_t(&mut rng, &[cd, 4], 0.5, DType::F32);
        let conv_b = rand_t(&mut rng, &[cd], 0.2, DType::F32);
        let a = rand_range(&mut rng, &[h], 0.0, 2.5)
            .exp()
            .unwrap()
            .neg()
            .unwrap();
        let d = rand_t(&mut rng, &[h], 1.0, DType::F32);
        let dt_bias = rand_range(&mut rng, &[h], -4.0, -2.0);
        let norm_w = rand_range(&mut rng, &[di], 0.5, 1.5);
        let out_w = rand_t(&mut rng, &[d_model, di], 0.044, dtype);
        let conv0 = rand_t(&mut rng, &[bs, cd, 4], 1.0, DType::F32);
        let ssm0 = rand_t(&mut rng, &[bs, h, p, n], 1.0, DType::F32);
        let t = [&proj, &conv_w, &conv_b, &a, &d, &dt_bias, &norm_w, &out_w];
        let run = |t: [&Tensor; 8], conv: &Tensor, next: Option<&Tensor>, ssm: &Tensor| {
            let args = DecodeStepArgs {
                xbc: &t[0].narrow(1, di, cd).unwrap(),
                dt: &t[0].narrow(1, di + cd, h).unwrap(),
                z: &t[0].narrow(1, 0, di).unwrap(),
                conv_state: conv,
                conv_state_next: next,
                conv_weight: t[1],
                conv_bias: Some(t[2]),
                ssm_state: ssm,
                a: t[3],
                d: Some(t[4]),
                dt_bias: Some(t[5]),
                norm_weight: t[6],
                eps: 1e-5,
                ngroups: g,
                norm_before_gate: false,
            };
            mixer_decode_step_out(&args, &SsdParams::default(), t[7], None).unwrap()
        };
        let (conv_ref, ssm_ref) = (conv0.copy().unwrap(), ssm0.copy().unwrap());
        let want = run(t, &conv_ref, None, &ssm_ref);
        let tm: Vec<Tensor> = t.iter().map(|x| on(x, &dev)).collect();
        let (conv_m, ssm_m) = (on(&conv0, &dev), on(&ssm0, &dev));
        let next_m = conv_m.zeros_like().unwrap();
        let got = run(
            std::array::from_fn(|i| &tm[i]),
            &conv_m,
            Some(&next_m),
            &ssm_m,
        );
        // the normed activations are rounded once more on each side: twice the tolerance
        let (atol, rtol) = tolerance(dtype);
        let diff = (cpu(&got).to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff <= 2.0 * (atol + rtol),
            "mixer step out on metal: {diff}"
        );
        assert_close(&cpu(&next_m), &conv_ref, DType::F32, "conv state on metal");
        assert_close(&cpu(&ssm_m), &ssm_ref, DType::F32, "ssm state on metal");
    }
}
