//! CUDA kernels against the plain-tensor references (run on the CPU), for f32, f16 and bf16.
//!
//! Runs only with `--features cuda`, and skips (prints and returns) when no CUDA device can be
//! opened, as on the GPU-less CI machine. Outputs are poisoned (NaN-filled) before the kernels
//! write them (`MAMBA2_CUDA_POISON`), so an unwritten element fails the comparison. Each check
//! also asserts, through `cuda_launch_count`, that the fast path ran and not the fallback.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use mamba2_ops::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod support;
use support::{check_rel as check, symmetric as rand_t};

/// Tolerances on the relative L2 error `|gpu - ref| / |ref|`, per dtype, about 3-10x the largest
/// error seen on the H200 (BENCHMARKS.md): f32 is exact up to summation order (the SSD chunk
/// products use 3xTF32 tensor-core products; plain TF32 erred by ~7e-4); f16/bf16 elementwise outputs are rounded the
/// same way as the reference's (only rare 1-ulp ties differ, ~2e-5 seen); the SSD also rounds
/// its mma operands to the activation dtype (bf16: ~3e-3 seen).
struct Tol {
    f32: f32,
    f16: f32,
    bf16: f32,
}

const TOL_ELEMENTWISE: Tol = Tol {
    f32: 1e-6,
    f16: 2e-4,
    bf16: 2e-4,
};
const TOL_SSD: Tol = Tol {
    f32: 1e-4,
    f16: 1.5e-3,
    bf16: 1e-2,
};
/// f32 states of the SSD (the rounding of the activations does not reach them directly).
const TOL_SSD_STATE: Tol = Tol {
    f32: 1e-4,
    f16: 1e-3,
    bf16: 6e-3,
};

impl Tol {
    fn of(&self, dt: DType) -> f32 {
        match dt {
            DType::F16 => self.f16,
            DType::BF16 => self.bf16,
            _ => self.f32,
        }
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn gpu() -> Option<Device> {
    support::poisoned_cuda("CUDA parity test")
}

/// `t` rounded to `dt` on the CPU (the reference input) and the same values on the GPU.
fn pair(t: &Tensor, dt: DType, dev: &Device) -> (Tensor, Tensor) {
    let c = t.to_dtype(dt).unwrap();
    let g = c.to_device(dev).unwrap();
    (c, g)
}

/// Runs `f` and asserts it launched at least one kernel of this crate (fast path taken).
fn fast<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let before = cuda_launch_count();
    let out = f();
    assert!(
        cuda_launch_count() > before,
        "{what}: the CUDA fast path did not run"
    );
    out
}

/// The values of `t` in a fresh buffer, starting one element in: contiguous, but misaligned for
/// 16-byte vector loads.
fn offset1(t: &Tensor) -> Tensor {
    let flat = t.flatten_all().unwrap();
    let pad = Tensor::zeros(1, t.dtype(), t.device()).unwrap();
    Tensor::cat(&[&pad, &flat], 0)
        .unwrap()
        .narrow(0, 1, flat.elem_count())
        .unwrap()
        .reshape(t.shape())
        .unwrap()
}

fn neg_exp_a(rng: &mut StdRng, nheads: usize) -> Tensor {
    let a: Vec<f32> = (0..nheads)
        .map(|_| -rng.random_range(0.0f32..2.5).exp())
        .collect();
    Tensor::from_vec(a, nheads, &Device::Cpu).unwrap()
}

#[test]
fn ssd_chunk_scan_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(6);
    // (batch, seqlen, nheads, headdim, ngroups, d_state, init, z, layout, dt_limit); layout:
    // "strided": x, B, C are views (token stride > row) like the parts of a projection;
    // "offset1": x, B, C, z start one element into their buffer (no 16-byte vector loads).
    let cases = [
        (
            2,
            300,
            24,
            64,
            8,
            128,
            true,
            true,
            "strided",
            (0.0, f64::INFINITY),
        ),
        (
            1,
            200,
            10,
            64,
            1,
            64,
            false,
            false,
            "contiguous",
            (0.0, f64::INFINITY),
        ),
        (3, 77, 6, 32, 2, 64, true, true, "offset1", (0.001, 0.1)),
        (
            1,
            1,
            4,
            64,
            1,
            128,
            true,
            false,
            "strided",
            (0.0, f64::INFINITY),
        ),
        (
            2,
            129,
            5,
            64,
            5,
            16,
            false,
            true,
            "offset1",
            (0.0, f64::INFINITY),
        ),
        (
            1,
            1000,
            64,
            64,
            1,
            128,
            true,
            true,
            "strided",
            (0.0, f64::INFINITY),
        ),
    ];
    for (batch, seqlen, nheads, headdim, ngroups, d_state, with_init, with_z, layout, limit) in
        cases
    {
        let strided = layout == "strided";
        let extra = usize::from(strided);
        let xw = rand_t(&mut rng, &[batch, seqlen, nheads + extra, headdim], 1.0);
        let bcw = rand_t(&mut rng, &[batch, seqlen, 2 * ngroups, d_state], 1.0);
        let dt = rand_t(&mut rng, &[batch, seqlen, nheads], 2.0);
        let a = neg_exp_a(&mut rng, nheads);
        let d = rand_t(&mut rng, &[nheads], 1.0);
        let dt_bias = rand_t(&mut rng, &[nheads], 1.0);
        let z = rand_t(&mut rng, &[batch, seqlen, nheads, headdim], 2.0);
        let init = rand_t(&mut rng, &[batch, nheads, headdim, d_state], 1.0);
        for dtype in DTYPES {
            let view = |t: &Tensor, start: usize, len: usize| {
                let v = t.narrow(2, start, len).unwrap();
                if strided {
                    v
                } else {
                    v.contiguous().unwrap()
                }
            };
            let (xw_c, xw_g) = pair(&xw, dtype, &dev);
            let (bcw_c, bcw_g) = pair(&bcw, dtype, &dev);
            let (xc, xg) = (view(&xw_c, 0, nheads), view(&xw_g, 0, nheads));
            let (bc, bg) = (view(&bcw_c, 0, ngroups), view(&bcw_g, 0, ngroups));
            let (cc, cg) = (
                view(&bcw_c, ngroups, ngroups),
                view(&bcw_g, ngroups, ngroups),
            );
            let (dtc, dtg) = pair(&dt, dtype, &dev);
            let (dc, dg) = pair(&d, dtype, &dev);
            let (dbc, dbg) = pair(&dt_bias, dtype, &dev);
            let (zc, zg) = pair(&z, dtype, &dev);
            let (xc, xg, bc, bg, cc, cg, zc, zg) = if layout == "offset1" {
                let m = |t: &Tensor| offset1(t);
                (
                    m(&xc),
                    m(&xg),
                    m(&bc),
                    m(&bg),
                    m(&cc),
                    m(&cg),
                    m(&zc),
                    m(&zg),
                )
            } else {
                (xc, xg, bc, bg, cc, cg, zc, zg)
            };
            let (ic, ig) = pair(&init, DType::F32, &dev);
            let ag = a.to_device(&dev).unwrap();
            let params = SsdParams {
                chunk_size: 256,
                dt_softplus: true,
                dt_limit: limit,
            };
            let cpu_args = SsdArgs {
                x: &xc,
                dt: &dtc,
                a: &a,
                b: &bc,
                c: &cc,
                d: Some(&dc),
                z: with_z.then_some(&zc),
                dt_bias: Some(&dbc),
                initial_state: with_init.then_some(&ic),
                seq_idx: None,
            };
            let gpu_args = SsdArgs {
                x: &xg,
                dt: &dtg,
                a: &ag,
                b: &bg,
                c: &cg,
                d: Some(&dg),
                z: with_z.then_some(&zg),
                dt_bias: Some(&dbg),
                initial_state: with_init.then_some(&ig),
                seq_idx: None,
            };
            let (y_ref, s_ref) = ssd_chunk_scan_slow(&cpu_args, &params).unwrap();
            let (y, s) = fast("ssd", || ssd_chunk_scan(&gpu_args, &params).unwrap());
            let name = format!("ssd b{batch} l{seqlen} h{nheads} p{headdim} g{ngroups} n{d_state} init={with_init} z={with_z} layout={layout} {dtype:?}");
            check(&format!("{name} y"), &y, &y_ref, TOL_SSD.of(dtype));
            check(
                &format!("{name} state"),
                &s,
                &s_ref,
                TOL_SSD_STATE.of(dtype),
            );
        }
    }
}

#[test]
fn ssd_falls_back_when_preconditions_fail() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(7);
    // headdim 24 is not a multiple of 16: the reference runs, on the GPU.
    let (batch, seqlen, nheads, headdim, d_state) = (1, 40, 3, 24, 16);
    let x = rand_t(&mut rng, &[batch, seqlen, nheads, headdim], 1.0);
    let dt = rand_t(&mut rng, &[batch, seqlen, nheads], 1.0);
    let a = neg_exp_a(&mut rng, nheads);
    let b = rand_t(&mut rng, &[batch, seqlen, 1, d_state], 1.0);
    let c = rand_t(&mut rng, &[batch, seqlen, 1, d_state], 1.0);
    let g = |t: &Tensor| t.to_device(&dev).unwrap();
    let mk = |x, dt, a, b, c| SsdArgs {
        x,
        dt,
        a,
        b,
        c,
        d: None,
        z: None,
        dt_bias: None,
        initial_state: None,
        seq_idx: None,
    };
    let params = SsdParams::default();
    let (y_ref, _) = ssd_chunk_scan_slow(&mk(&x, &dt, &a, &b, &c), &params).unwrap();
    let (xg, dtg, ag, bg, cg) = (g(&x), g(&dt), g(&a), g(&b), g(&c));
    let before = cuda_launch_count();
    let (y, _) = ssd_chunk_scan(&mk(&xg, &dtg, &ag, &bg, &cg), &params).unwrap();
    assert_eq!(
        cuda_launch_count(),
        before,
        "headdim 24 must take the fallback"
    );
    check("ssd fallback", &y, &y_ref, 1e-5);
}

#[test]
fn selective_state_update_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(8);
    // (batch, nheads, headdim, ngroups, d_state, z, limit)
    let cases = [
        (3, 24, 64, 8, 128, true, (0.0, f64::INFINITY)),
        (1, 10, 64, 1, 64, false, (0.0, f64::INFINITY)),
        (16, 64, 64, 1, 128, true, (0.0, f64::INFINITY)),
        (2, 6, 32, 2, 16, true, (0.01, 0.2)),
        (2, 5, 24, 5, 40, false, (0.0, f64::INFINITY)),
    ];
    for (batch, nheads, headdim, ngroups, d_state, with_z, limit) in cases {
        let x = rand_t(&mut rng, &[batch, nheads, headdim], 1.0);
        let dt = rand_t(&mut rng, &[batch, nheads], 2.0);
        let a = neg_exp_a(&mut rng, nheads);
        let b = rand_t(&mut rng, &[batch, ngroups, d_state], 1.0);
        let c = rand_t(&mut rng, &[batch, ngroups, d_state], 1.0);
        let d = rand_t(&mut rng, &[nheads], 1.0);
        let dt_bias = rand_t(&mut rng, &[nheads], 1.0);
        let z = rand_t(&mut rng, &[batch, nheads, headdim], 2.0);
        let state = rand_t(&mut rng, &[batch, nheads, headdim, d_state], 1.0);
        for dtype in DTYPES {
            let (xc, xg) = pair(&x, dtype, &dev);
            let (dtc, dtg) = pair(&dt, dtype, &dev);
            let (bc, bg) = pair(&b, dtype, &dev);
            let (cc, cg) = pair(&c, dtype, &dev);
            let (dc, dg) = pair(&d, dtype, &dev);
            let (dbc, dbg) = pair(&dt_bias, dtype, &dev);
            let (zc, zg) = pair(&z, dtype, &dev);
            let (sc, sg) = pair(&state, DType::F32, &dev);
            let sc = sc.copy().unwrap();
            let ag = a.to_device(&dev).unwrap();
            let params = SsdParams {
                chunk_size: 256,
                dt_softplus: true,
                dt_limit: limit,
            };
            let y_ref = selective_state_update_slow(
                &StateUpdateArgs {
                    state: &sc,
                    x: &xc,
                    dt: &dtc,
                    a: &a,
                    b: &bc,
                    c: &cc,
                    d: Some(&dc),
                    z: with_z.then_some(&zc),
                    dt_bias: Some(&dbc),
                },
                &params,
            )
            .unwrap();
            let y = fast("state update", || {
                selective_state_update(
                    &StateUpdateArgs {
                        state: &sg,
                        x: &xg,
                        dt: &dtg,
                        a: &ag,
                        b: &bg,
                        c: &cg,
                        d: Some(&dg),
                        z: with_z.then_some(&zg),
                        dt_bias: Some(&dbg),
                    },
                    &params,
                )
                .unwrap()
            });
            let name = format!(
                "state update b{batch} h{nheads} p{headdim} g{ngroups} n{d_state} {dtype:?}"
            );
            check(&format!("{name} y"), &y, &y_ref, TOL_ELEMENTWISE.of(dtype));
            check(&format!("{name} state"), &sg, &sc, 1e-5);
        }
    }
}

/// One-shot prefill on the GPU = prefill of a prefix + token-by-token decode on the GPU.
#[test]
fn prefill_equals_prefill_then_decode_on_gpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(9);
    let (batch, seqlen, split, nheads, headdim, ngroups, d_state) = (2, 90, 70, 12, 64, 2, 64);
    let g = |t: Tensor| t.to_device(&dev).unwrap();
    let x = g(rand_t(&mut rng, &[batch, seqlen, nheads, headdim], 1.0));
    let dt = g(rand_t(&mut rng, &[batch, seqlen, nheads], 2.0));
    let a = g(neg_exp_a(&mut rng, nheads));
    let b = g(rand_t(&mut rng, &[batch, seqlen, ngroups, d_state], 1.0));
    let c = g(rand_t(&mut rng, &[batch, seqlen, ngroups, d_state], 1.0));
    let d = g(rand_t(&mut rng, &[nheads], 1.0));
    let z = g(rand_t(&mut rng, &[batch, seqlen, nheads, headdim], 2.0));
    let params = SsdParams::default();
    let args = |l0: usize, len: usize, init: Option<&Tensor>| -> (Tensor, Tensor) {
        let n = |t: &Tensor| t.narrow(1, l0, len).unwrap();
        let (x, dt, b, c, z) = (n(&x), n(&dt), n(&b), n(&c), n(&z));
        ssd_chunk_scan(
            &SsdArgs {
                x: &x,
                dt: &dt,
                a: &a,
                b: &b,
                c: &c,
                d: Some(&d),
                z: Some(&z),
                dt_bias: None,
                initial_state: init,
                seq_idx: None,
            },
            &params,
        )
        .unwrap()
    };
    let (y_all, s_all) = fast("ssd", || args(0, seqlen, None));
    let (y_pre, state) = args(0, split, None);
    // Split prefill: the rest continues from the prefix's final state.
    let (y_rest, s_rest) = args(split, seqlen - split, Some(&state));
    let y_two = Tensor::cat(&[&y_pre, &y_rest], 1).unwrap();
    check("prefill vs split prefill y", &y_two, &y_all, TOL_SSD.f32);
    check(
        "prefill vs split prefill state",
        &s_rest,
        &s_all,
        TOL_SSD_STATE.f32,
    );
    let state = state.copy().unwrap();
    let mut ys = vec![y_pre];
    for t in split..seqlen {
        let step = |v: &Tensor| v.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
        let y = fast("decode", || {
            selective_state_update(
                &StateUpdateArgs {
                    state: &state,
                    x: &step(&x),
                    dt: &step(&dt),
                    a: &a,
                    b: &step(&b),
                    c: &step(&c),
                    d: Some(&d),
                    z: Some(&step(&z)),
                    dt_bias: None,
                },
                &params,
            )
            .unwrap()
        });
        ys.push(y.unsqueeze(1).unwrap());
    }
    let y_split = Tensor::cat(&ys, 1).unwrap();
    check("prefill vs prefill+decode y", &y_split, &y_all, TOL_SSD.f32);
    check(
        "prefill vs prefill+decode state",
        &state,
        &s_all,
        TOL_SSD_STATE.f32,
    );
}

#[test]
fn causal_conv1d_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(10);
    // (batch, seqlen, channels, d_conv, init, bias, seq_idx, strided)
    let cases = [
        (2, 70, 4352, 4, true, true, false, true),
        (1, 3, 1536, 4, true, true, false, false),
        (3, 33, 100, 3, false, false, true, false),
        (2, 45, 257, 4, true, true, true, true),
        (1, 1, 64, 4, false, true, false, false),
    ];
    for (batch, seqlen, channels, d_conv, with_init, with_bias, with_seq, strided) in cases {
        let wide = rand_t(&mut rng, &[batch, seqlen, channels + 16], 1.0);
        let w = rand_t(&mut rng, &[channels, d_conv], 0.5);
        let bias = rand_t(&mut rng, &[channels], 0.5);
        let init = rand_t(&mut rng, &[batch, channels, d_conv], 1.0);
        let ids: Vec<u32> = (0..batch * seqlen)
            .map(|i| ((i % seqlen) / 7 + (i % seqlen) / 19) as u32)
            .collect();
        let seq = Tensor::from_vec(ids, (batch, seqlen), &Device::Cpu).unwrap();
        for dtype in DTYPES {
            let (wc, wg) = pair(&wide, dtype, &dev);
            let view = |t: &Tensor| {
                if strided {
                    t.narrow(2, 8, channels).unwrap()
                } else {
                    t.narrow(2, 8, channels).unwrap().contiguous().unwrap()
                }
            };
            let (xc, xg) = (view(&wc), view(&wg));
            let (w_c, w_g) = pair(&w, dtype, &dev);
            let (bc, bg) = pair(&bias, dtype, &dev);
            let (ic, ig) = pair(&init, DType::F32, &dev);
            let seq_g = seq.to_device(&dev).unwrap();
            let mk = |x, w, b, i, s| Conv1dArgs {
                x,
                weight: w,
                bias: with_bias.then_some(b),
                initial_state: with_init.then_some(i),
                seq_idx: with_seq.then_some(s),
                silu: true,
            };
            let (y_ref, s_ref) = causal_conv1d_slow(&mk(&xc, &w_c, &bc, &ic, &seq)).unwrap();
            let (y, s) = fast("conv1d", || {
                causal_conv1d(&mk(&xg, &w_g, &bg, &ig, &seq_g)).unwrap()
            });
            let name = format!("conv1d b{batch} l{seqlen} c{channels} k{d_conv} init={with_init} seq={with_seq} strided={strided} {dtype:?}");
            check(&format!("{name} y"), &y, &y_ref, TOL_ELEMENTWISE.of(dtype));
            check(&format!("{name} state"), &s, &s_ref, 1e-6);
        }
    }
}

#[test]
fn conv1d_update_and_varlen_match_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    for (batch, channels, d_conv, with_bias) in
        [(3, 4352, 4, true), (16, 1536, 4, false), (1, 33, 2, true)]
    {
        let x = rand_t(&mut rng, &[batch, channels], 1.0);
        let w = rand_t(&mut rng, &[channels, d_conv], 0.5);
        let bias = rand_t(&mut rng, &[channels], 0.5);
        let state = rand_t(&mut rng, &[batch, channels, d_conv], 1.0);
        for dtype in DTYPES {
            let (xc, xg) = pair(&x, dtype, &dev);
            let (w_c, w_g) = pair(&w, dtype, &dev);
            let (bc, bg) = pair(&bias, dtype, &dev);
            let (sc, sg) = pair(&state, DType::F32, &dev);
            let sc = sc.copy().unwrap();
            let y_ref =
                causal_conv1d_update_slow(&xc, &sc, &w_c, with_bias.then_some(&bc), true).unwrap();
            let y = fast("conv update", || {
                causal_conv1d_update(&xg, &sg, &w_g, with_bias.then_some(&bg), true).unwrap()
            });
            let name = format!("conv update b{batch} c{channels} k{d_conv} {dtype:?}");
            check(&format!("{name} y"), &y, &y_ref, TOL_ELEMENTWISE.of(dtype));
            check(&format!("{name} state"), &sg, &sc, 1e-7);
        }
    }
    for (lens, channels, d_conv) in [
        (vec![5usize, 1, 0, 40, 3], 4352usize, 4usize),
        (vec![100], 64, 4),
        (vec![2, 2], 10, 3),
    ] {
        let mut cu = vec![0usize];
        for l in &lens {
            cu.push(cu.last().unwrap() + l);
        }
        let total = *cu.last().unwrap();
        let x = rand_t(&mut rng, &[total, channels], 1.0);
        for dtype in DTYPES {
            let (xc, xg) = pair(&x, dtype, &dev);
            let s_ref = conv_states_varlen_slow(&xc, &cu, d_conv).unwrap();
            let s = fast("varlen", || conv_states_varlen(&xg, &cu, d_conv).unwrap());
            check(
                &format!("varlen {lens:?} c{channels} {dtype:?}"),
                &s,
                &s_ref,
                1e-7,
            );
        }
    }
}

/// (leading dims, dim, group_size, z, norm_before_gate, strided z)
type GatedCase = (&'static [usize], usize, usize, bool, bool, bool);
/// (leading dims, dim, residual, residual dtype f32, residual_in_fp32, weight f32)
type ResidualCase = (&'static [usize], usize, bool, bool, bool, bool);

#[test]
fn rms_norms_match_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(12);
    // gated: (leading dims, dim, group_size, z, norm_before_gate, strided z)
    let cases: [GatedCase; 5] = [
        (&[2, 37], 4096, 512, true, false, true),
        (&[1, 5], 4096, 4096, true, false, false),
        (&[16], 1536, 1536, true, true, true),
        (&[3, 2, 4], 96, 32, false, false, false),
        (&[7], 200, 40, true, true, false),
    ];
    for (lead, dim, group_size, with_z, nbg, strided) in cases {
        let mut shape = lead.to_vec();
        shape.push(dim);
        let x = rand_t(&mut rng, &shape, 2.0);
        let mut wide = lead.to_vec();
        wide.push(2 * dim);
        let zw = rand_t(&mut rng, &wide, 2.0);
        let w = rand_t(&mut rng, &[dim], 1.0);
        for dtype in DTYPES {
            let (xc, xg) = pair(&x, dtype, &dev);
            let last = lead.len();
            let zview = |t: &Tensor| {
                if strided {
                    t.narrow(last, dim, dim).unwrap()
                } else {
                    t.narrow(last, dim, dim).unwrap().contiguous().unwrap()
                }
            };
            let (zc, zg) = pair(&zw, dtype, &dev);
            let (zc, zg) = (zview(&zc), zview(&zg));
            let (wc, wg) = pair(&w, dtype, &dev);
            let mk = |x, z, w| GatedRmsNormArgs {
                x,
                z: with_z.then_some(z),
                weight: w,
                eps: 1e-5,
                group_size,
                norm_before_gate: nbg,
            };
            let y_ref = gated_rms_norm_slow(&mk(&xc, &zc, &wc)).unwrap();
            let y = fast("gated norm", || gated_rms_norm(&mk(&xg, &zg, &wg)).unwrap());
            check(
                &format!("gated norm {shape:?} g{group_size} z={with_z} nbg={nbg} {dtype:?}"),
                &y,
                &y_ref,
                TOL_ELEMENTWISE.of(dtype),
            );
        }
    }
    // residual: (leading dims, dim, residual, residual dtype f32, residual_in_fp32, weight f32)
    let cases: [ResidualCase; 5] = [
        (&[2, 33], 2048, true, true, true, false),
        (&[1, 7], 768, false, false, true, false),
        (&[5], 2560, true, false, false, true),
        (&[4], 2048, false, false, false, false),
        (&[2, 3, 2], 64, true, false, true, true),
    ];
    for (lead, dim, with_res, res_f32, in_fp32, w_f32) in cases {
        let mut shape = lead.to_vec();
        shape.push(dim);
        let x = rand_t(&mut rng, &shape, 2.0);
        let r = rand_t(&mut rng, &shape, 2.0);
        let w = rand_t(&mut rng, &[dim], 1.0);
        for dtype in DTYPES {
            let (xc, xg) = pair(&x, dtype, &dev);
            let (rc, rg) = pair(&r, if res_f32 { DType::F32 } else { dtype }, &dev);
            let (wc, wg) = pair(&w, if w_f32 { DType::F32 } else { dtype }, &dev);
            let (n_ref, r_ref) =
                rms_norm_residual_slow(&xc, with_res.then_some(&rc), &wc, 1e-5, in_fp32).unwrap();
            let (n, ro) = fast("residual norm", || {
                rms_norm_residual(&xg, with_res.then_some(&rg), &wg, 1e-5, in_fp32).unwrap()
            });
            assert_eq!(n.dtype(), n_ref.dtype());
            assert_eq!(ro.dtype(), r_ref.dtype());
            let name = format!("residual norm {shape:?} res={with_res} fp32={in_fp32} {dtype:?}");
            check(
                &format!("{name} normed"),
                &n,
                &n_ref,
                TOL_ELEMENTWISE.of(n_ref.dtype()),
            );
            check(&format!("{name} residual"), &ro, &r_ref, 1e-7);
        }
    }
}
