//! The plain-tensor references against scalar loops written straight from the recurrences.
//! These loops are the independent check of the references; the fast backends are then tested
//! against the references.

use candle_core::{DType, Device, Tensor};
use mamba2_ops::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn rand_t(rng: &mut StdRng, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn softplus(v: f32) -> f32 {
    if v > 20.0 {
        v
    } else {
        v.exp().ln_1p()
    }
}

/// Sequential scan, one token at a time, in f64.
#[allow(clippy::too_many_arguments)]
fn naive_scan(
    x: &[f32],
    dt: &[f32],
    a: &[f32],
    b: &[f32],
    c: &[f32],
    d: &[f32],
    z: Option<&[f32]>,
    dt_bias: &[f32],
    init: Option<&[f32]>,
    seq_idx: Option<&[u32]>,
    (batch, seqlen, nheads, headdim, ngroups, d_state): (usize, usize, usize, usize, usize, usize),
    limit: (f32, f32),
) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; batch * seqlen * nheads * headdim];
    let mut fin = vec![0f32; batch * nheads * headdim * d_state];
    let rep = nheads / ngroups;
    for bi in 0..batch {
        for h in 0..nheads {
            let g = h / rep;
            let mut s = vec![0f64; headdim * d_state];
            if let Some(init) = init {
                for i in 0..headdim * d_state {
                    s[i] = init[((bi * nheads + h) * headdim) * d_state + i] as f64;
                }
            }
            for t in 0..seqlen {
                if let Some(ids) = seq_idx {
                    if t > 0 && ids[bi * seqlen + t] != ids[bi * seqlen + t - 1] {
                        s.iter_mut().for_each(|v| *v = 0.0);
                    }
                }
                let dtv = softplus(dt[(bi * seqlen + t) * nheads + h] + dt_bias[h])
                    .clamp(limit.0, limit.1) as f64;
                let decay = (dtv * a[h] as f64).exp();
                for p in 0..headdim {
                    let xv = x[((bi * seqlen + t) * nheads + h) * headdim + p] as f64;
                    let mut acc = 0f64;
                    for n in 0..d_state {
                        let bv = b[((bi * seqlen + t) * ngroups + g) * d_state + n] as f64;
                        let cv = c[((bi * seqlen + t) * ngroups + g) * d_state + n] as f64;
                        let sv = &mut s[p * d_state + n];
                        *sv = *sv * decay + dtv * xv * bv;
                        acc += *sv * cv;
                    }
                    let mut out = acc + d[h] as f64 * xv;
                    if let Some(z) = z {
                        let zv = z[((bi * seqlen + t) * nheads + h) * headdim + p] as f64;
                        out *= zv / (1.0 + (-zv).exp());
                    }
                    y[((bi * seqlen + t) * nheads + h) * headdim + p] = out as f32;
                }
            }
            for i in 0..headdim * d_state {
                fin[((bi * nheads + h) * headdim) * d_state + i] = s[i] as f32;
            }
        }
    }
    (y, fin)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn ssd_reference_matches_sequential_recurrence() {
    let mut rng = StdRng::seed_from_u64(1);
    // (batch, seqlen, nheads, headdim, ngroups, d_state, chunk, init, z, seq_idx, limit)
    let cases = [
        (
            1,
            37,
            3,
            8,
            1,
            16,
            8,
            false,
            false,
            false,
            (0.0, f32::INFINITY),
        ),
        (2, 50, 6, 16, 2, 32, 16, true, true, false, (0.01, 0.05)),
        (
            3,
            5,
            4,
            8,
            4,
            8,
            16,
            true,
            false,
            false,
            (0.0, f32::INFINITY),
        ),
        (
            2,
            33,
            8,
            4,
            8,
            64,
            32,
            false,
            false,
            true,
            (0.0, f32::INFINITY),
        ),
        (
            1,
            64,
            2,
            64,
            1,
            128,
            64,
            true,
            true,
            false,
            (0.0, f32::INFINITY),
        ),
    ];
    for (
        batch,
        seqlen,
        nheads,
        headdim,
        ngroups,
        d_state,
        chunk,
        with_init,
        with_z,
        with_seq,
        limit,
    ) in cases
    {
        let x = rand_t(&mut rng, &[batch, seqlen, nheads, headdim], 1.0);
        let dt = rand_t(&mut rng, &[batch, seqlen, nheads], 2.0);
        let a_log: Vec<f32> = (0..nheads).map(|_| rng.random_range(0.0f32..2.5)).collect();
        let a = Tensor::from_vec(
            a_log.iter().map(|v| -v.exp()).collect::<Vec<_>>(),
            nheads,
            &Device::Cpu,
        )
        .unwrap();
        let b = rand_t(&mut rng, &[batch, seqlen, ngroups, d_state], 1.0);
        let c = rand_t(&mut rng, &[batch, seqlen, ngroups, d_state], 1.0);
        let d = rand_t(&mut rng, &[nheads], 1.0);
        let dt_bias = rand_t(&mut rng, &[nheads], 1.0);
        let z = rand_t(&mut rng, &[batch, seqlen, nheads, headdim], 2.0);
        let init = rand_t(&mut rng, &[batch, nheads, headdim, d_state], 1.0);
        let ids: Vec<u32> = (0..batch * seqlen)
            .map(|i| ((i % seqlen) / 11) as u32)
            .collect();
        let seq_idx = Tensor::from_vec(ids.clone(), (batch, seqlen), &Device::Cpu).unwrap();
        let args = SsdArgs {
            x: &x,
            dt: &dt,
            a: &a,
            b: &b,
            c: &c,
            d: Some(&d),
            z: with_z.then_some(&z),
            dt_bias: Some(&dt_bias),
            initial_state: with_init.then_some(&init),
            seq_idx: with_seq.then_some(&seq_idx),
        };
        let params = SsdParams {
            chunk_size: chunk,
            dt_softplus: true,
            dt_limit: (limit.0 as f64, limit.1 as f64),
        };
        let (y, fin) = ssd_chunk_scan_slow(&args, &params).unwrap();
        let (ny, nfin) = naive_scan(
            &flat(&x),
            &flat(&dt),
            &flat(&a),
            &flat(&b),
            &flat(&c),
            &flat(&d),
            with_z.then(|| flat(&z)).as_deref(),
            &flat(&dt_bias),
            with_init.then(|| flat(&init)).as_deref(),
            with_seq.then_some(&ids[..]),
            (batch, seqlen, nheads, headdim, ngroups, d_state),
            limit,
        );
        let ny = Tensor::from_vec(ny, y.shape(), &Device::Cpu).unwrap();
        let nfin = Tensor::from_vec(nfin, fin.shape(), &Device::Cpu).unwrap();
        let (ey, es) = (max_diff(&y, &ny), max_diff(&fin, &nfin));
        assert!(ey < 2e-4 && es < 2e-4, "case b{batch} l{seqlen} h{nheads} p{headdim} g{ngroups} n{d_state}: y err {ey}, state err {es}");
    }
}

#[test]
fn state_update_steps_equal_scan() {
    let mut rng = StdRng::seed_from_u64(2);
    let (batch, seqlen, nheads, headdim, ngroups, d_state) = (2, 9, 6, 16, 2, 32);
    let x = rand_t(&mut rng, &[batch, seqlen, nheads, headdim], 1.0);
    let dt = rand_t(&mut rng, &[batch, seqlen, nheads], 2.0);
    let a = (rand_t(&mut rng, &[nheads], 1.0).abs().unwrap() + 0.1)
        .unwrap()
        .neg()
        .unwrap();
    let b = rand_t(&mut rng, &[batch, seqlen, ngroups, d_state], 1.0);
    let c = rand_t(&mut rng, &[batch, seqlen, ngroups, d_state], 1.0);
    let d = rand_t(&mut rng, &[nheads], 1.0);
    let z = rand_t(&mut rng, &[batch, seqlen, nheads, headdim], 1.0);
    let dt_bias = rand_t(&mut rng, &[nheads], 1.0);
    let init = rand_t(&mut rng, &[batch, nheads, headdim, d_state], 1.0);
    let params = SsdParams {
        chunk_size: 4,
        dt_softplus: true,
        dt_limit: (0.02, 3.0),
    };
    let args = SsdArgs {
        x: &x,
        dt: &dt,
        a: &a,
        b: &b,
        c: &c,
        d: Some(&d),
        z: Some(&z),
        dt_bias: Some(&dt_bias),
        initial_state: Some(&init),
        seq_idx: None,
    };
    let (y, fin) = ssd_chunk_scan_slow(&args, &params).unwrap();
    let state = init.copy().unwrap();
    for t in 0..seqlen {
        let at = |v: &Tensor| v.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
        let (xt, dtt, bt, ct, zt) = (at(&x), at(&dt), at(&b), at(&c), at(&z));
        let yt = selective_state_update_slow(
            &StateUpdateArgs {
                state: &state,
                x: &xt,
                dt: &dtt,
                a: &a,
                b: &bt,
                c: &ct,
                d: Some(&d),
                z: Some(&zt),
                dt_bias: Some(&dt_bias),
            },
            &params,
        )
        .unwrap();
        assert!(max_diff(&yt, &at(&y)) < 1e-4, "step {t}");
    }
    assert!(max_diff(&state, &fin) < 1e-4);
}

#[test]
fn conv_reference_matches_loop_and_update() {
    let mut rng = StdRng::seed_from_u64(3);
    let (batch, seqlen, ch, k) = (2, 7, 5, 4);
    let x = rand_t(&mut rng, &[batch, seqlen, ch], 1.0);
    let w = rand_t(&mut rng, &[ch, k], 1.0);
    let bias = rand_t(&mut rng, &[ch], 1.0);
    let init = rand_t(&mut rng, &[batch, ch, k], 1.0);
    let (y, fin) = causal_conv1d_slow(&Conv1dArgs {
        x: &x,
        weight: &w,
        bias: Some(&bias),
        initial_state: Some(&init),
        seq_idx: None,
        silu: true,
    })
    .unwrap();
    let (xv, wv, bv, iv) = (flat(&x), flat(&w), flat(&bias), flat(&init));
    let yv = flat(&y);
    for bi in 0..batch {
        for c in 0..ch {
            // history = [init[1..k], x[0..seqlen]]
            let mut hist: Vec<f32> = (1..k).map(|j| iv[(bi * ch + c) * k + j]).collect();
            hist.extend((0..seqlen).map(|t| xv[(bi * seqlen + t) * ch + c]));
            for t in 0..seqlen {
                let mut acc = bv[c];
                for j in 0..k {
                    acc += wv[c * k + j] * hist[t + j];
                }
                let want = acc / (1.0 + (-acc).exp());
                let got = yv[(bi * seqlen + t) * ch + c];
                assert!(
                    (want - got).abs() < 1e-5,
                    "b{bi} c{c} t{t}: {want} vs {got}"
                );
            }
        }
    }
    // token-by-token update from the same initial state gives the same outputs and final state
    let state = init.copy().unwrap();
    for t in 0..seqlen {
        let xt = x.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
        let yt = causal_conv1d_update_slow(&xt, &state, &w, Some(&bias), true).unwrap();
        assert!(max_diff(&yt, &y.narrow(1, t, 1).unwrap().squeeze(1).unwrap()) < 1e-5);
    }
    assert!(max_diff(&state, &fin) < 1e-6);
    // packed varlen states equal per-sequence final states
    let packed = Tensor::cat(
        &[
            x.get(0).unwrap().narrow(0, 0, 2).unwrap(),
            x.get(1).unwrap(),
        ],
        0,
    )
    .unwrap();
    let states = conv_states_varlen_slow(&packed, &[0, 2, 2 + seqlen], k).unwrap();
    let (_, f0) = causal_conv1d_slow(&Conv1dArgs {
        x: &x.narrow(0, 0, 1).unwrap().narrow(1, 0, 2).unwrap(),
        weight: &w,
        bias: None,
        initial_state: None,
        seq_idx: None,
        silu: true,
    })
    .unwrap();
    let (_, f1) = causal_conv1d_slow(&Conv1dArgs {
        x: &x.narrow(0, 1, 1).unwrap(),
        weight: &w,
        bias: None,
        initial_state: None,
        seq_idx: None,
        silu: true,
    })
    .unwrap();
    assert!(max_diff(&states, &Tensor::cat(&[f0, f1], 0).unwrap()) < 1e-7);
}
