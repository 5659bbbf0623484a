//! The decode step captured as a CUDA graph against the eager step (the same kernels launched
//! one by one) and against the CPU model: logits and final conv/SSM states after a prefill and
//! several steps, for f32 and bf16, batch 1 / 3 (matrix-vector projections, programmatic
//! dependent launches; both layouts of the norms: kernels of their own, or epilogues of the
//! projections with the gated norm deferred at one group and kept in the step at two) and
//! 16 / 17 (cuBLAS projections captured on the step's stream), ngroups 1 and 2, d_state 64 and
//! 128, nheads not a multiple of 32, with and without conv bias and fp32 residual. Skips without
//! a CUDA device (`cargo test --features cuda --test cuda_graph`).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use mamba2::{config::Mamba2Config, Mamba2Cache, Mamba2Model};

fn config(
    ngroups: usize,
    d_state: usize,
    nheads: usize,
    conv_bias: bool,
    res32: bool,
) -> Mamba2Config {
    let mut c = Mamba2Config::preset("130m").unwrap();
    c.n_layer = 3;
    c.d_model = nheads * 32; // expand 2: d_inner = nheads * headdim
    c.expand = 2;
    c.headdim = 64;
    c.nheads = nheads;
    c.d_inner = nheads * 64;
    c.ngroups = ngroups;
    c.d_state = d_state;
    c.vocab_size = 1000;
    c.pad_vocab_size_multiple = 8;
    c.conv_bias = conv_bias;
    c.residual_in_fp32 = res32;
    c.validate().unwrap();
    c
}

fn ids(batch: usize, seqlen: usize, salt: u32) -> Tensor {
    let v: Vec<u32> = (0..batch * seqlen)
        .map(|i| (i as u32 * 2654435761u32.wrapping_add(salt)) % 1000)
        .collect();
    Tensor::from_vec(v, (batch, seqlen), &Device::Cpu).unwrap()
}

/// Prefill 37 tokens, then `steps` decode steps; returns every step's logits and the cache.
fn run(model: &Mamba2Model, batch: usize, steps: usize) -> (Vec<Tensor>, Mamba2Cache) {
    let (logits, cache, _) = run_counted(model, batch, steps);
    (logits, cache)
}

/// [`run`], also returning the kernels this crate launched during the decode steps (a graph
/// replay counts as one).
fn run_counted(model: &Mamba2Model, batch: usize, steps: usize) -> (Vec<Tensor>, Mamba2Cache, u64) {
    let mut cache = model.new_cache(batch).unwrap();
    model.forward(&ids(batch, 37, 1), Some(&mut cache)).unwrap();
    let mut out = Vec::new();
    let before = mamba2_ops::cuda_launch_count();
    for s in 0..steps {
        let step_ids = ids(batch, 1, 100 + s as u32).squeeze(1).unwrap();
        out.push(model.step(&step_ids, &mut cache).unwrap());
    }
    let launches = mamba2_ops::cuda_launch_count() - before;
    (out, cache, launches)
}

fn compare(
    what: &str,
    a: &(Vec<Tensor>, Mamba2Cache),
    b: &(Vec<Tensor>, Mamba2Cache),
    tol_logits: f32,
    tol_state: f32,
) {
    for (i, (x, y)) in a.0.iter().zip(&b.0).enumerate() {
        let d = max_abs_diff(
            &x.to_device(&Device::Cpu).unwrap(),
            &y.to_device(&Device::Cpu).unwrap(),
        );
        assert!(
            d <= tol_logits,
            "{what}: step {i} logits differ by {d} (tol {tol_logits})"
        );
    }
    for l in 0..a.1.n_layer() {
        for (name, x, y) in [
            ("conv", a.1.conv_state(l), b.1.conv_state(l)),
            ("ssm", a.1.ssm_state(l), b.1.ssm_state(l)),
        ] {
            let d = max_abs_diff(
                &x.to_device(&Device::Cpu).unwrap(),
                &y.to_device(&Device::Cpu).unwrap(),
            );
            assert!(
                d <= tol_state,
                "{what}: layer {l} {name} state differs by {d} (tol {tol_state})"
            );
        }
    }
    println!("{what}: ok");
}

#[test]
fn captured_step_matches_eager_step_and_cpu() {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("skipping CUDA graph test: no CUDA device ({e})");
            return;
        }
    };
    // Both layouts of the captured layer (read at each capture): norm kernels of their own,
    // norms in the projections' epilogues (the default).
    for epilogues in [false, true] {
        println!("norm epilogues: {epilogues}");
        check_layout(&dev, epilogues);
    }
}

fn check_layout(dev: &Device, epilogues: bool) {
    let configs = [
        ("ng1 N128 h8 bias res32", config(1, 128, 8, true, true)),
        ("ng2 N64 h10 nobias res16", config(2, 64, 10, false, false)),
    ];
    for (name, cfg) in &configs {
        for dtype in [DType::F32, DType::BF16] {
            let mut graph = Mamba2Model::random(cfg, dtype, dev, 5).unwrap();
            let mut opts = mamba2_ops::options::KernelOptions::default();
            opts.cuda.norm_epilogues = epilogues;
            graph.set_kernel_options(opts).unwrap();
            let mut eager = graph.clone();
            eager.set_cuda_graphs(false);
            let cpu = Mamba2Model::random(cfg, dtype, &Device::Cpu, 5).unwrap();
            let (tl, ts) = if dtype == DType::F32 {
                (2e-4, 2e-4)
            } else {
                (0.1, 0.05)
            };
            for batch in [1, 3, 16, 17] {
                let what = format!("{name} {dtype:?} batch {batch}");
                let (gl, gc, launches) = run_counted(&graph, batch, 6);
                let g = (gl, gc);
                let e = run(&eager, batch, 6);
                // Graph vs eager: with the norm kernels, the same kernels (the logits differ
                // only by the eager path rounding them to the model dtype before f32); with the
                // epilogues, the norms' scale is applied after the products instead of before
                // (other rounding points) at batches up to 4, so the reference's tolerance.
                let ts_eager = if epilogues && batch <= 4 {
                    ts
                } else {
                    ts * 0.1
                };
                compare(&format!("{what} graph vs eager"), &g, &e, tl, ts_eager);
                compare(
                    &format!("{what} graph vs cpu"),
                    &g,
                    &run(&cpu, batch, 6),
                    tl,
                    ts,
                );
                // With the graph, each step after the first (which captures) is one launch.
                let first = 4 * cfg.n_layer + 3; // at most, for the capture's recording
                assert!(
                    launches >= 6 && launches <= 7 + first as u64,
                    "{what}: the 6 captured steps launched {launches} kernels"
                );
                let (_, _, eager_launches) = run_counted(&eager, batch, 6);
                assert!(
                    eager_launches >= 6 * (cfg.n_layer as u64 + 1),
                    "{what}: eager steps launched only {eager_launches} kernels"
                );
            }
        }
    }
}

#[test]
fn graph_follows_model_and_cache_changes() {
    let Ok(dev) = Device::new_cuda(0) else {
        println!("skipping: no CUDA device");
        return;
    };
    let cfg = config(1, 64, 4, true, true);
    let a = Mamba2Model::random(&cfg, DType::F32, &dev, 1).unwrap();
    let b = Mamba2Model::random(&cfg, DType::F32, &dev, 2).unwrap();
    let mut b_eager = b.clone();
    b_eager.set_cuda_graphs(false);
    let t = ids(2, 1, 3).squeeze(1).unwrap();
    // One step of b through the graph on `cg` and eagerly on `ce`: the same logits.
    let same_step = |cg: &mut Mamba2Cache, ce: &mut Mamba2Cache, what: &str| {
        let got = b.step(&t, cg).unwrap().to_device(&Device::Cpu).unwrap();
        let want = b_eager
            .step(&t, ce)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "{what}: logits differ by {d}");
    };
    // One cache stepped by model a, then by model b: b's steps must be b's (re-captured).
    let mut c1 = a.new_cache(2).unwrap();
    let mut c2 = a.new_cache(2).unwrap();
    a.step(&t, &mut c1).unwrap();
    a.step(&t, &mut c2).unwrap();
    same_step(&mut c1, &mut c2, "after a model switch");
    // reset() zeroes the states in place: the graph keeps serving the same cache.
    c1.reset().unwrap();
    c2.reset().unwrap();
    same_step(&mut c1, &mut c2, "after reset");
    // A deep clone gets its own graph; the original is untouched by the clone's steps.
    let mut c3 = c1.deep_clone().unwrap();
    let mut c4 = c2.deep_clone().unwrap();
    for _ in 0..3 {
        same_step(&mut c3, &mut c4, "on a deep clone");
    }
    same_step(&mut c1, &mut c2, "on the original after its clone stepped");
}
