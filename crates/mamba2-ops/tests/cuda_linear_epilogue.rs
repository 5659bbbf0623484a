//! The norm-epilogue projections of the captured CUDA decode step (`linear_scaled_b*`,
//! `linear_res_b*` in `kernels/cuda/linear.cu`) against references computed on the CPU from
//! `linear_slow`: the 1 / rms scale from partial sums of squares, the residual add with the next
//! norm's unscaled input and its partial sums, and the B/C conv-state shift, for f32/f16/bf16,
//! batch 1, 3 and 4, with and without bias and scale, f32 and 16-bit residuals; and the step's
//! embedding rows against `index_select`. Each call is recorded as a one-kernel graph on a
//! `StepStream` and replayed; outputs start as NaN. Skips without a CUDA device.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, D};
use mamba2_ops::cuda_graph::{ConvShift, ResidualEpilogue, RowScale, StepStream};
use mamba2_ops::linear_slow;
use rand::{rngs::StdRng, SeedableRng};

mod support;
use support::{check_rel as check, symmetric as rand_t, uniform};

/// Tolerance per dtype: each output is rounded once or twice to the dtype.
fn tol(dt: DType) -> f32 {
    match dt {
        DType::F32 => 2e-6,
        DType::F16 => 2e-3,
        _ => 1.2e-2,
    }
}

fn nan(dims: &[usize], dt: DType, dev: &Device) -> Tensor {
    Tensor::full(f32::NAN, dims, dev)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

/// 1 / sqrt(sum(parts, 1) / dim + eps), `(rows, 1)` f32.
fn inv_rms(parts: &Tensor, dim: usize, eps: f64) -> Tensor {
    let s = parts.sum_keepdim(1).unwrap();
    ((s / dim as f64).unwrap() + eps)
        .unwrap()
        .sqrt()
        .unwrap()
        .recip()
        .unwrap()
}

/// `(x · wᵀ) * inv (+ bias)` in f32 from the rounded inputs.
fn scaled_ref(x: &Tensor, w: &Tensor, inv: Option<&Tensor>, bias: Option<&Tensor>) -> Tensor {
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let mut y = linear_slow(&f(x), &f(w), None).unwrap(); // (rows, n) f32
    if let Some(inv) = inv {
        y = y.broadcast_mul(inv).unwrap();
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&f(b)).unwrap();
    }
    y
}

/// The CUDA device (as a Candle device and as its CUDA handle), with outputs poisoned; `None`
/// (the test skips) without one.
fn cuda() -> Option<(Device, candle_core::CudaDevice)> {
    match support::poisoned_cuda("CUDA linear epilogue test")? {
        Device::Cuda(c) => Some((Device::Cuda(c.clone()), c)),
        _ => None,
    }
}

#[test]
fn scaled_and_residual_projections_match_reference() {
    let Some((dev, cuda)) = cuda() else {
        return;
    };
    let cuda = &cuda;
    let mut rng = StdRng::seed_from_u64(29);
    // (k, n, nparts): in_proj-like (n not a multiple of 4: blocks walk several row groups, the
    // last one partial), out_proj of 1.3b, 2.7b's in_proj width (a row is 1.25 tiles of 256
    // vectors in 16-bit types), a small one (one group per block).
    let shapes = [
        (2048, 4250, 512),
        (4096, 2048, 64),
        (2560, 3001, 97),
        (256, 36, 3),
    ];
    for (k, n, nparts) in shapes {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            for rows in [1, 3, 4] {
                for with_bias in [false, true] {
                    let what = format!("k{k} n{n} rows{rows} bias={with_bias} {dt:?}");
                    let r = |rng: &mut StdRng, d: &[usize], s: f32| {
                        rand_t(rng, d, s).to_dtype(dt).unwrap()
                    };
                    let x = r(&mut rng, &[rows, k], 1.0);
                    let w = r(&mut rng, &[n, k], 1.0 / (k as f32).sqrt());
                    let bias = with_bias.then(|| r(&mut rng, &[n], 0.5));
                    let parts = uniform(
                        &mut rng,
                        &[rows, nparts],
                        0.0,
                        2.0 * k as f32 / nparts as f32,
                    );
                    let eps = 1e-5;
                    let inv = inv_rms(&parts, k, eps);
                    let on = |t: &Tensor| t.to_device(&dev).unwrap();
                    let (xd, wd, bd, pd) = (on(&x), on(&w), bias.as_ref().map(on), on(&parts));
                    let s = StepStream::new(cuda, dt, rows).unwrap();
                    let scale = RowScale {
                        parts: &pd,
                        dim: k,
                        eps,
                    };

                    // linear_scaled, output in the dtype and in f32 (the logits).
                    for out_dt in [dt, DType::F32] {
                        let out = nan(&[rows, n], out_dt, &dev);
                        let mut g = s
                            .capture(|s| s.linear_scaled(&xd, &scale, &wd, bd.as_ref(), &out))
                            .unwrap();
                        g.replay().unwrap();
                        let want = scaled_ref(&x, &w, Some(&inv), bias.as_ref())
                            .to_dtype(out_dt)
                            .unwrap();
                        check(
                            &format!("scaled {what} -> {out_dt:?}"),
                            &out,
                            &want,
                            tol(dt),
                        );
                    }

                    // linear_res with and without the scale; f32 and dtype residuals.
                    for (with_scale, res_dt) in [(true, DType::F32), (false, dt)] {
                        let res = rand_t(&mut rng, &[rows, n], 2.0).to_dtype(res_dt).unwrap();
                        let nw = r(&mut rng, &[n], 1.0);
                        let (resd, nwd) = (on(&res), on(&nw));
                        let rout = nan(&[rows, n], res_dt, &dev);
                        let parts_out = nan(s.residual_parts(n).unwrap().dims(), DType::F32, &dev);
                        let out = nan(&[rows, n], dt, &dev);
                        // A conv state (rows, conv_dim, 4) and an xbc view with a wider row.
                        let (conv_dim, ch0, nch) = (96, 32, 48);
                        let conv = rand_t(&mut rng, &[rows, conv_dim, 4], 1.0);
                        let row = r(&mut rng, &[rows, conv_dim + 8], 1.0);
                        let xbc = row.narrow(1, 8, conv_dim).unwrap();
                        let (convd, rowd) = (on(&conv), on(&row));
                        let xbcd = rowd.narrow(1, 8, conv_dim).unwrap();
                        let epi = ResidualEpilogue {
                            residual: &resd,
                            residual_out: &rout,
                            next_norm_w: &nwd,
                            parts_out: &parts_out,
                        };
                        let shift = ConvShift {
                            conv_state: &convd,
                            xbc: &xbcd,
                            ch0,
                            nch,
                        };
                        let sc = with_scale.then_some(&scale);
                        let mut g = s
                            .capture(|s| {
                                s.linear_residual(
                                    &xd,
                                    sc,
                                    &wd,
                                    bd.as_ref(),
                                    &epi,
                                    Some(&shift),
                                    &out,
                                )
                            })
                            .unwrap();
                        g.replay().unwrap();
                        let o = scaled_ref(&x, &w, with_scale.then_some(&inv), bias.as_ref());
                        let o = o.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap();
                        let h = (o + res.to_dtype(DType::F32).unwrap())
                            .unwrap()
                            .to_dtype(res_dt)
                            .unwrap();
                        let h32 = h.to_dtype(DType::F32).unwrap();
                        let y = h32
                            .broadcast_mul(&nw.to_dtype(DType::F32).unwrap())
                            .unwrap()
                            .to_dtype(dt)
                            .unwrap();
                        let wt = format!("residual {what} scale={with_scale} res {res_dt:?}");
                        check(&format!("{wt} h"), &rout, &h, tol(dt));
                        check(&format!("{wt} next norm input"), &out, &y, tol(dt));
                        let sumsq = h32.sqr().unwrap().sum_keepdim(D::Minus1).unwrap();
                        let got_sums = parts_out.sum_keepdim(1).unwrap();
                        check(&format!("{wt} sums of squares"), &got_sums, &sumsq, 2e-5);
                        // Channels ch0 .. ch0 + nch shifted with xbc appended; the rest untouched.
                        let x_new = xbc
                            .to_dtype(DType::F32)
                            .unwrap()
                            .narrow(1, ch0, nch)
                            .unwrap()
                            .unsqueeze(2)
                            .unwrap();
                        let mid = conv.narrow(1, ch0, nch).unwrap();
                        let shifted =
                            Tensor::cat(&[&mid.narrow(2, 1, 3).unwrap(), &x_new], 2).unwrap();
                        let want_conv = Tensor::cat(
                            &[
                                &conv.narrow(1, 0, ch0).unwrap(),
                                &shifted,
                                &conv.narrow(1, ch0 + nch, conv_dim - ch0 - nch).unwrap(),
                            ],
                            1,
                        )
                        .unwrap();
                        check(&format!("{wt} conv shift"), &convd, &want_conv, 0.0);
                    }
                }
            }
        }
    }
}

/// The captured step's first node (`embedding_rows_*`) against `index_select` on the CPU, for
/// each dtype, batch 1 / 3 / 17, ids at both ends of the table; an id past the table is refused
/// by the model before it gets here, and the kernel writes NaN for it rather than reading out
/// of bounds.
#[test]
fn embedding_rows_match_index_select() {
    let Some((dev, cuda)) = cuda() else {
        return;
    };
    let cuda = &cuda;
    let mut rng = StdRng::seed_from_u64(31);
    let (rows, dim) = (1003, 776);
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let table = rand_t(&mut rng, &[rows, dim], 1.0).to_dtype(dt).unwrap();
        let table_d = table.to_device(&dev).unwrap();
        for batch in [1usize, 3, 17] {
            let ids: Vec<u32> = (0..batch as u32)
                .map(|i| match i % 3 {
                    0 => 0,
                    1 => rows as u32 - 1,
                    _ => (i * 389) % rows as u32,
                })
                .collect();
            let ids_c = Tensor::from_vec(ids, batch, &Device::Cpu).unwrap();
            let ids_d = ids_c.to_device(&dev).unwrap();
            let out = nan(&[batch, dim], dt, &dev);
            let s = StepStream::new(cuda, dt, batch).unwrap();
            let mut g = s.capture(|s| s.embedding(&table_d, &ids_d, &out)).unwrap();
            g.replay().unwrap();
            let want = table.index_select(&ids_c, 0).unwrap();
            check(&format!("embedding {dt:?} batch {batch}"), &out, &want, 0.0);
        }
    }
}
