//! The fused decode-step kernel against the unfused reference ops, and one full Mamba-2 mixer
//! layer (in_proj, conv, SSD, gated RMSNorm, out_proj; prefill then 8 decode steps) with every
//! op run by the Metal kernels in the MSL harness, against the same layer built from the
//! reference ops. The projections are Candle CPU matmuls on both sides. The kernels run
//! through the plans of `mamba2_ops::metal_plan`, as the Metal dispatch encodes them.

#[path = "metal_common.rs"]
mod metal_common;

use candle_core::{DType, Tensor, D};
use mamba2_ops::metal_plan::{self, PlanExecutor};
use mamba2_ops::*;
use metal_common::*;
use msl_harness::Mode;
use rand::{rngs::StdRng, SeedableRng};

/// Mixer shapes.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    d_model: usize,
    nheads: usize,
    headdim: usize,
    ngroups: usize,
    d_state: usize,
    d_conv: usize,
}

impl Dims {
    fn d_inner(&self) -> usize {
        self.nheads * self.headdim
    }
    fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.ngroups * self.d_state
    }
}

/// Parameters of one mixer layer (projection weights in the activation dtype, the rest f32).
struct Layer {
    in_proj: Tensor,  // (2 d_inner + 2 ngroups d_state + nheads, d_model)
    conv_w: Tensor,   // (conv_dim, d_conv)
    conv_b: Tensor,   // (conv_dim)
    dt_bias: Tensor,  // (nheads)
    a: Tensor,        // (nheads)
    d: Tensor,        // (nheads)
    norm_w: Tensor,   // (d_inner)
    out_proj: Tensor, // (d_model, d_inner)
}

fn layer(dims: Dims, dtype: DType, rng: &mut StdRng) -> Layer {
    let di = dims.d_inner();
    let proj = 2 * di + 2 * dims.ngroups * dims.d_state + dims.nheads;
    let s_in = 1.0 / (dims.d_model as f32).sqrt();
    Layer {
        in_proj: rand_t(rng, &[proj, dims.d_model], s_in, dtype),
        conv_w: rand_t(rng, &[dims.conv_dim(), dims.d_conv], 0.5, DType::F32),
        conv_b: rand_t(rng, &[dims.conv_dim()], 0.2, DType::F32),
        dt_bias: rand_range(rng, &[dims.nheads], -4.0, -2.0),
        a: rand_range(rng, &[dims.nheads], 0.0, 2.5)
            .exp()
            .unwrap()
            .neg()
            .unwrap(),
        d: rand_t(rng, &[dims.nheads], 1.0, DType::F32),
        norm_w: rand_range(rng, &[di], 0.5, 1.5),
        out_proj: rand_t(rng, &[dims.d_model, di], 1.0 / (di as f32).sqrt(), dtype),
    }
}

/// `u (.., d_model) -> (z, xBC, dt)` of the in-projection.
fn in_proj(l: &Layer, dims: Dims, u: &Tensor) -> (Tensor, Tensor, Tensor) {
    let zxbcdt = u.broadcast_matmul(&l.in_proj.t().unwrap()).unwrap();
    let di = dims.d_inner();
    let last = zxbcdt.rank() - 1;
    let z = zxbcdt.narrow(last, 0, di).unwrap().contiguous().unwrap();
    let xbc = zxbcdt
        .narrow(last, di, dims.conv_dim())
        .unwrap()
        .contiguous()
        .unwrap();
    let dt = zxbcdt
        .narrow(last, di + dims.conv_dim(), dims.nheads)
        .unwrap()
        .contiguous()
        .unwrap();
    (z, xbc, dt)
}

fn split_xbc(dims: Dims, xbc: &Tensor) -> (Tensor, Tensor, Tensor) {
    let (di, gn) = (dims.d_inner(), dims.ngroups * dims.d_state);
    let last = xbc.rank() - 1;
    let part = |s, n| xbc.narrow(last, s, n).unwrap().contiguous().unwrap();
    (part(0, di), part(di, gn), part(di + gn, gn))
}

/// What both implementations provide: the four op families of one layer.
trait Ops {
    fn conv(&self, x: &Tensor, l: &Layer, dims: Dims) -> (Tensor, Tensor);
    fn ssd(&self, a: &SsdArgs) -> (Tensor, Tensor);
    fn norm(&self, y: &Tensor, z: &Tensor, l: &Layer, dims: Dims) -> Tensor;
    /// One decode step: returns y (batch, d_inner) before the norm; updates the states.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        xbc: &Tensor,
        dt: &Tensor,
        z: &Tensor,
        conv_state: &mut Tensor,
        ssm_state: &mut Tensor,
        l: &Layer,
        dims: Dims,
    ) -> Tensor;
}

struct Reference;

impl Ops for Reference {
    fn conv(&self, x: &Tensor, l: &Layer, _dims: Dims) -> (Tensor, Tensor) {
        causal_conv1d_slow(&Conv1dArgs {
            x,
            weight: &l.conv_w,
            bias: Some(&l.conv_b),
            initial_state: None,
            seq_idx: None,
            silu: true,
        })
        .unwrap()
    }
    fn ssd(&self, a: &SsdArgs) -> (Tensor, Tensor) {
        ssd_chunk_scan_slow(a, &SsdParams::default()).unwrap()
    }
    fn norm(&self, y: &Tensor, z: &Tensor, l: &Layer, dims: Dims) -> Tensor {
        gated_rms_norm_slow(&GatedRmsNormArgs {
            x: y,
            z: Some(z),
            weight: &l.norm_w,
            eps: 1e-5,
            group_size: dims.d_inner() / dims.ngroups,
            norm_before_gate: false,
        })
        .unwrap()
    }
    fn step(
        &self,
        xbc: &Tensor,
        dt: &Tensor,
        _z: &Tensor,
        conv_state: &mut Tensor,
        ssm_state: &mut Tensor,
        l: &Layer,
        dims: Dims,
    ) -> Tensor {
        // the layer gates in the norm: no z in the SSM step
        reference_step(xbc, dt, StepOpts::default(), conv_state, ssm_state, l, dims)
    }
}

/// Options of a decode step beyond the layer's own use.
#[derive(Clone, Copy)]
struct StepOpts<'a> {
    /// `(batch, d_inner)`: gate inside the step.
    z: Option<&'a Tensor>,
    dt_limit: (f64, f64),
}

impl Default for StepOpts<'_> {
    fn default() -> Self {
        StepOpts {
            z: None,
            dt_limit: (0.0, f64::INFINITY),
        }
    }
}

/// Unfused reference step: conv update (in place) then selective state update (in place).
fn reference_step(
    xbc: &Tensor,
    dt: &Tensor,
    opts: StepOpts,
    conv_state: &Tensor,
    ssm_state: &Tensor,
    l: &Layer,
    dims: Dims,
) -> Tensor {
    let act = causal_conv1d_update_slow(xbc, conv_state, &l.conv_w, Some(&l.conv_b), true).unwrap();
    let (x, b, c) = split_xbc(dims, &act);
    let (bs, h, p, g, n) = (
        dims.batch,
        dims.nheads,
        dims.headdim,
        dims.ngroups,
        dims.d_state,
    );
    let z = opts.z.map(|z| z.reshape((bs, h, p)).unwrap());
    let y = selective_state_update_slow(
        &StateUpdateArgs {
            state: ssm_state,
            x: &x.reshape((bs, h, p)).unwrap(),
            dt,
            a: &l.a,
            b: &b.reshape((bs, g, n)).unwrap(),
            c: &c.reshape((bs, g, n)).unwrap(),
            d: Some(&l.d),
            z: z.as_ref(),
            dt_bias: Some(&l.dt_bias),
        },
        &SsdParams {
            dt_limit: opts.dt_limit,
            ..SsdParams::default()
        },
    )
    .unwrap();
    y.reshape((bs, h * p)).unwrap()
}

/// The Metal plans, run by the harness executor.
struct Harness {
    ex: HarnessExecutor,
}

impl Ops for Harness {
    fn conv(&self, x: &Tensor, l: &Layer, _dims: Dims) -> (Tensor, Tensor) {
        let args = Conv1dArgs {
            x,
            weight: &l.conv_w,
            bias: Some(&l.conv_b),
            initial_state: None,
            seq_idx: None,
            silu: true,
        };
        metal_plan::causal_conv1d(&self.ex, &args).unwrap().unwrap()
    }

    fn ssd(&self, a: &SsdArgs) -> (Tensor, Tensor) {
        metal_plan::ssd_chunk_scan(&self.ex, a, &SsdParams::default())
            .unwrap()
            .unwrap()
    }

    fn norm(&self, y: &Tensor, z: &Tensor, l: &Layer, dims: Dims) -> Tensor {
        let args = GatedRmsNormArgs {
            x: y,
            z: Some(z),
            weight: &l.norm_w,
            eps: 1e-5,
            group_size: dims.d_inner() / dims.ngroups,
            norm_before_gate: false,
        };
        metal_plan::gated_rms_norm(&self.ex, &args)
            .unwrap()
            .unwrap()
    }

    fn step(
        &self,
        xbc: &Tensor,
        dt: &Tensor,
        _z: &Tensor,
        conv_state: &mut Tensor,
        ssm_state: &mut Tensor,
        l: &Layer,
        _dims: Dims,
    ) -> Tensor {
        let (y, conv_out) = run_decode_step(
            &self.ex,
            xbc,
            dt,
            StepOpts::default(),
            conv_state,
            ssm_state,
            l,
        );
        *conv_state = conv_out;
        y
    }
}

/// The fused decode step's plan in the harness: returns `(y, new conv state)`; the SSM state
/// is updated in place.
#[allow(clippy::too_many_arguments)]
fn run_decode_step(
    ex: &HarnessExecutor,
    xbc: &Tensor,
    dt: &Tensor,
    opts: StepOpts,
    conv_state: &Tensor,
    ssm_state: &Tensor,
    l: &Layer,
) -> (Tensor, Tensor) {
    // the kernel writes the rolled conv state to a second buffer
    let conv_out = ex
        .output(&conv_state.shape().clone(), DType::F32, "conv_out")
        .unwrap();
    let args = metal_plan::FusedStepArgs {
        xbc,
        conv_state_in: conv_state,
        conv_state_out: &conv_out,
        conv_weight: &l.conv_w,
        conv_bias: Some(&l.conv_b),
        dt,
        a: &l.a,
        d: Some(&l.d),
        z: opts.z,
        dt_bias: Some(&l.dt_bias),
        state: ssm_state,
    };
    let params = SsdParams {
        dt_limit: opts.dt_limit,
        ..SsdParams::default()
    };
    let y = metal_plan::mamba2_decode_step(ex, &args, &params)
        .unwrap_or_else(|e| panic!("decode step {:?}: {e}", xbc.dtype()))
        .expect("the plan takes this shape");
    (y, conv_out)
}

/// Prefill of `u` then `steps` decode steps; returns the outputs `(batch, L + steps, d_model)`
/// and the final `(conv_state, ssm_state)`.
fn run_layer(
    ops: &dyn Ops,
    l: &Layer,
    dims: Dims,
    u: &Tensor,
    steps: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let (bs, len, _) = u.dims3().unwrap();
    let (h, p, g, n) = (dims.nheads, dims.headdim, dims.ngroups, dims.d_state);
    // prefill
    let (z, xbc, dt) = in_proj(l, dims, u);
    let (act, mut conv_state) = ops.conv(&xbc, l, dims);
    let (x, b, c) = split_xbc(dims, &act);
    let (y, mut ssm_state) = ops.ssd(&SsdArgs {
        x: &x.reshape((bs, len, h, p)).unwrap(),
        dt: &dt,
        a: &l.a,
        b: &b.reshape((bs, len, g, n)).unwrap(),
        c: &c.reshape((bs, len, g, n)).unwrap(),
        d: Some(&l.d),
        z: None,
        dt_bias: Some(&l.dt_bias),
        initial_state: None,
        seq_idx: None,
    });
    let y = ops.norm(&y.reshape((bs, len, h * p)).unwrap(), &z, l, dims);
    let mut outs = vec![y.broadcast_matmul(&l.out_proj.t().unwrap()).unwrap()];
    // decode
    for t in 0..steps.dim(1).unwrap() {
        let ut = steps.narrow(1, t, 1).unwrap().squeeze(1).unwrap(); // (batch, d_model)
        let (z, xbc, dt) = in_proj(l, dims, &ut);
        let y = ops.step(&xbc, &dt, &z, &mut conv_state, &mut ssm_state, l, dims);
        let y = ops.norm(&y, &z, l, dims);
        outs.push(
            y.matmul(&l.out_proj.t().unwrap())
                .unwrap()
                .unsqueeze(1)
                .unwrap(),
        );
    }
    (Tensor::cat(&outs, 1).unwrap(), conv_state, ssm_state)
}

#[test]
fn mixer_layer_prefill_then_decode_matches_reference() {
    // 2 groups of 2 heads, headdim 32, d_state 32; prefill of 75 tokens = a full 64-token
    // chunk + an 11-token tail; then 8 decode steps.
    let dims = Dims {
        batch: 2,
        d_model: 48,
        nheads: 4,
        headdim: 32,
        ngroups: 2,
        d_state: 32,
        d_conv: 4,
    };
    check_layer(dims, 75, &DTYPES, 60);
}

#[test]
fn mixer_layer_real_head_shape_matches_reference() {
    // mamba2-130m head shape (headdim 64, d_state 128, one group) with 3 heads; 2 full chunks
    // + a 2-token tail
    let dims = Dims {
        batch: 1,
        d_model: 32,
        nheads: 3,
        headdim: 64,
        ngroups: 1,
        d_state: 128,
        d_conv: 4,
    };
    check_layer(dims, 130, &[DType::F32, DType::BF16], 80);
}

/// Prefill of `len` tokens then 8 decode steps, harness kernels vs reference ops.
fn check_layer(dims: Dims, len: usize, dtypes: &[DType], seed: u64) {
    for (i, &dtype) in dtypes.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(seed + i as u64);
        let l = layer(dims, dtype, &mut rng);
        let u = rand_t(&mut rng, &[dims.batch, len, dims.d_model], 1.0, dtype);
        let steps = rand_t(&mut rng, &[dims.batch, 8, dims.d_model], 1.0, dtype);
        let (out_ref, conv_ref, ssm_ref) = run_layer(&Reference, &l, dims, &u, &steps);
        let harness = Harness {
            ex: HarnessExecutor::new(Mode::Shuffled { seed: i as u64 }),
        };
        let (out, conv, ssm) = run_layer(&harness, &l, dims, &u, &steps);
        // Kernel and reference differ by f32 summation order in every op; through the layer
        // (two projections around them) that stays within twice the per-op tolerance.
        let what = format!("mixer layer {dtype:?}");
        let (atol, rtol) = tolerance(dtype);
        let scale = out_ref
            .to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(D::Minus1)
            .unwrap()
            .max_keepdim(1)
            .unwrap()
            .max(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let diff = (out.to_dtype(DType::F32).unwrap() - out_ref.to_dtype(DType::F32).unwrap())
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
            diff <= 2.0 * (atol + rtol * scale),
            "{what}: max |out - ref| = {diff} (output scale {scale})"
        );
        assert!(scale > 0.1, "{what}: degenerate output scale {scale}");
        assert_close(&conv, &conv_ref, dtype, &format!("{what} conv state"));
        assert_close(&ssm, &ssm_ref, dtype, &format!("{what} ssm state"));
    }
}

#[test]
fn decode_step_matches_unfused_reference() {
    // real-config head shapes (headdim 64, d_state 128, 1 group; and 8 groups of 64) plus a
    // headdim that leaves simdgroups idle in the last threadgroup (6) and d_state 40
    let configs = [(2, 24, 64, 1, 128), (1, 16, 64, 8, 64), (2, 4, 6, 2, 40)];
    for (ci, &(batch, nheads, headdim, ngroups, d_state)) in configs.iter().enumerate() {
        let dims = Dims {
            batch,
            d_model: 16,
            nheads,
            headdim,
            ngroups,
            d_state,
            d_conv: 4,
        };
        for dtype in DTYPES {
            let mut rng = StdRng::seed_from_u64(70 + ci as u64);
            let l = layer(dims, dtype, &mut rng);
            let xbc = rand_t(&mut rng, &[batch, dims.conv_dim()], 1.0, dtype);
            let dt = rand_range(&mut rng, &[batch, nheads], -1.0, 1.0)
                .to_dtype(dtype)
                .unwrap();
            // a view with a row stride, as the in-projection's gate is
            let z = rand_t(&mut rng, &[batch, dims.d_inner() + 5], 1.0, dtype)
                .narrow(1, 3, dims.d_inner())
                .unwrap();
            let conv0 = rand_t(&mut rng, &[batch, dims.conv_dim(), 4], 1.0, DType::F32);
            let ssm0 = rand_t(
                &mut rng,
                &[batch, nheads, headdim, d_state],
                1.0,
                DType::F32,
            );
            let (conv_ref, ssm_ref) = (conv0.copy().unwrap(), ssm0.copy().unwrap());
            // gate inside the step for two configs, a dt clamp for the other
            let opts = StepOpts {
                z: (ci != 1).then_some(&z),
                dt_limit: if ci == 1 {
                    (0.05, 0.5)
                } else {
                    (0.0, f64::INFINITY)
                },
            };
            let y_ref = reference_step(&xbc, &dt, opts, &conv_ref, &ssm_ref, &l, dims);
            let mode = if ci == 2 {
                Mode::Checked
            } else {
                Mode::Shuffled { seed: ci as u64 }
            };
            let ex = HarnessExecutor::new(mode);
            let (y, conv) = run_decode_step(&ex, &xbc, &dt, opts, &conv0, &ssm0, &l);
            let ssm = ssm0;
            let what = format!(
                "decode step {dtype:?} {mode:?} H={nheads} P={headdim} G={ngroups} N={d_state}"
            );
            assert_close(&y, &y_ref, dtype, &what);
            assert_close(&conv, &conv_ref, DType::F32, &format!("{what} conv state"));
            assert_close(&ssm, &ssm_ref, DType::F32, &format!("{what} ssm state"));
        }
    }
}

/// What [`mixer_decode_step_plan_matches_reference`] runs.
#[derive(Clone, Copy, PartialEq)]
enum StepRun {
    Reference,
    /// `metal_plan::mixer_decode_step`: fused step + gated norm.
    Plan,
    /// `metal_plan::mixer_decode_step_out`: fused step + out-projection with the norm folded.
    PlanOut,
}

/// The mixer's decode-step plans (the new conv state in the second buffer) against the
/// composed reference updating one buffer in place; the reference given a second buffer (the
/// CPU path of a cache that holds one); the plans declining without one.
#[test]
fn mixer_decode_step_plan_matches_reference() {
    let dims = Dims {
        batch: 2,
        d_model: 16,
        nheads: 4,
        headdim: 16,
        ngroups: 2,
        d_state: 32,
        d_conv: 4,
    };
    for (i, dtype) in DTYPES.into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(90 + i as u64);
        let l = layer(dims, dtype, &mut rng);
        let (bs, di, cd) = (dims.batch, dims.d_inner(), dims.conv_dim());
        // one row of in_proj's output, (z | xBC | dt), read through views as the model does
        let proj = rand_t(&mut rng, &[bs, di + cd + dims.nheads], 1.0, dtype);
        let conv0 = rand_t(&mut rng, &[bs, cd, 4], 1.0, DType::F32);
        let ssm0 = rand_t(&mut rng, &[bs, 4, 16, 32], 1.0, DType::F32);
        let ex = HarnessExecutor::new(Mode::Shuffled { seed: i as u64 });
        // returns (output, the conv state after the step, the ssm state), None when the plan
        // declines
        let run = |what: StepRun, next: bool| {
            let (conv, ssm) = (conv0.copy().unwrap(), ssm0.copy().unwrap());
            let second =
                next.then(|| Tensor::zeros(conv.shape(), DType::F32, conv.device()).unwrap());
            let a = DecodeStepArgs {
                xbc: &proj.narrow(1, di, cd).unwrap(),
                dt: &proj.narrow(1, di + cd, dims.nheads).unwrap(),
                z: &proj.narrow(1, 0, di).unwrap(),
                conv_state: &conv,
                conv_state_next: second.as_ref(),
                conv_weight: &l.conv_w,
                conv_bias: Some(&l.conv_b),
                ssm_state: &ssm,
                a: &l.a,
                d: Some(&l.d),
                dt_bias: Some(&l.dt_bias),
                norm_weight: &l.norm_w,
                eps: 1e-5,
                ngroups: dims.ngroups,
                norm_before_gate: false,
            };
            let p = SsdParams::default();
            let out = match what {
                StepRun::Reference => Some(mixer_decode_step_slow(&a, &p).unwrap()),
                StepRun::Plan => metal_plan::mixer_decode_step(&ex, &a, &p).unwrap(),
                StepRun::PlanOut => {
                    metal_plan::mixer_decode_step_out(&ex, &a, &p, &l.out_proj, None).unwrap()
                }
            };
            out.map(|o| (o, second.unwrap_or(conv), ssm))
        };
        let (y_ref, conv_ref, ssm_ref) = run(StepRun::Reference, false).unwrap();
        let out_ref = linear_slow(&y_ref, &l.out_proj, None).unwrap();
        let sfx = kernel_name("", dtype);
        for (what, next) in [
            (StepRun::Reference, true),
            (StepRun::Plan, true),
            (StepRun::PlanOut, true),
        ] {
            let name = match what {
                StepRun::Reference => "reference with a second buffer",
                StepRun::Plan => "plan",
                StepRun::PlanOut => "plan through out_proj",
            };
            let label = format!("mixer decode step {dtype:?} {name}");
            let (out, conv, ssm) = run(what, next).expect("the plan takes this shape");
            let ran: Vec<String> = ex.take_ran().into_iter().map(|r| r.function).collect();
            match what {
                StepRun::Reference => assert!(ran.is_empty()),
                StepRun::Plan => assert_eq!(
                    ran,
                    [
                        format!("mamba2_decode_step{sfx}"),
                        format!("gated_rms_norm{sfx}")
                    ]
                ),
                StepRun::PlanOut => assert_eq!(
                    ran,
                    [
                        format!("mamba2_decode_step{sfx}"),
                        format!("linear_matvec_gated_norm{sfx}")
                    ]
                ),
            }
            if what == StepRun::PlanOut {
                // one more rounding of the normed activations on both sides: twice the op
                // tolerance (|out| ~ 1)
                let (atol, rtol) = tolerance(dtype);
                let diff = (out.to_dtype(DType::F32).unwrap()
                    - out_ref.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
                assert!(diff <= 2.0 * (atol + rtol), "{label}: {diff}");
            } else {
                assert_close(&out, &y_ref, dtype, &label);
            }
            assert_close(&conv, &conv_ref, DType::F32, &format!("{label} conv state"));
            assert_close(&ssm, &ssm_ref, DType::F32, &format!("{label} ssm state"));
        }
        // no second buffer: both plans decline before running anything
        assert!(run(StepRun::Plan, false).is_none() && run(StepRun::PlanOut, false).is_none());
        assert!(ex.take_ran().is_empty());
    }
}
