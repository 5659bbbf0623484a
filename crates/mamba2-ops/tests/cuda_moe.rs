//! MoE ops on CUDA (issue 16): the router and both expert paths with the tensors on the GPU,
//! against the plain-tensor references computed on the CPU from the same values. Shapes include
//! Granite-4.0-H-Tiny's (hidden 1536, expert intermediate 512, SwiGLU, top 6) and
//! Nemotron-3-Nano's (hidden 2688, intermediate 1856, ReLU², grouped sigmoid router, top 6) with
//! 12 experts (the real 64 / 128 experts only change how many matrices are skipped). Batch > 1
//! rows choose different experts. Skips without a CUDA device.
//!
//! On CUDA the experts' matrix-vector products and GEMMs run through `mamba2_ops::linear`'s CUDA
//! kernels (decode: one matrix-vector product per chosen expert, reading only its rows); the
//! routing decision is made on the host from the f32 logits (one `(tokens, n_experts)` copy).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use mamba2_ops::{
    moe_experts, moe_experts_path, moe_experts_slow, moe_route, moe_route_slow, ExpertActivation,
    ExpertsPath, MoeExpertsArgs, MoeRouteArgs, MoeRouting,
};

mod support;
use support::flat;

fn cuda() -> Option<Device> {
    support::poisoned_cuda("CUDA MoE test")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    flat(a)
        .iter()
        .zip(flat(b))
        .map(|(x, y)| (x - y).abs())
        .fold(
            0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

fn nemotron_routing() -> MoeRouting {
    MoeRouting::SigmoidGrouped {
        n_group: 4,
        topk_group: 2,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
    }
}

#[test]
fn router_on_cuda_matches_reference() {
    let Some(dev) = cuda() else { return };
    for (t, e, k, routing) in [
        (1, 64, 6, MoeRouting::Softmax),
        (37, 64, 6, MoeRouting::Softmax),
        (1, 128, 6, nemotron_routing()),
        (29, 128, 6, nemotron_routing()),
    ] {
        let logits = Tensor::randn(0f32, 2.0, (t, e), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 0.3, e, &Device::Cpu).unwrap();
        let with_bias = matches!(routing, MoeRouting::SigmoidGrouped { .. });
        let cpu = MoeRouteArgs {
            logits: &logits,
            correction_bias: with_bias.then_some(&bias),
            top_k: k,
            routing,
        };
        let (g_logits, g_bias) = (
            logits.to_device(&dev).unwrap(),
            bias.to_device(&dev).unwrap(),
        );
        let gpu = MoeRouteArgs {
            logits: &g_logits,
            correction_bias: with_bias.then_some(&g_bias),
            ..cpu
        };
        let (ids, gates) = moe_route(&gpu).unwrap();
        assert!(ids.device().is_cuda() && gates.device().is_cuda());
        let (ids_ref, gates_ref) = moe_route_slow(&cpu).unwrap();
        assert_eq!(
            ids.to_device(&Device::Cpu)
                .unwrap()
                .to_vec2::<u32>()
                .unwrap(),
            ids_ref.to_vec2::<u32>().unwrap(),
            "{routing:?} t{t}"
        );
        let d = max_diff(&gates, &gates_ref);
        assert!(d < 1e-6, "{routing:?}: gates differ by {d}");
    }
}

/// `tokens` rows routed at random through both paths on the GPU; the reference runs on the CPU.
#[allow(clippy::too_many_arguments)]
fn check_experts(
    dev: &Device,
    tokens: usize,
    e: usize,
    k: usize,
    h: usize,
    inter: usize,
    act: ExpertActivation,
    dtype: DType,
    tol: f32,
) {
    let cpu = Device::Cpu;
    let rows = match act {
        ExpertActivation::SwiGlu => 2 * inter,
        ExpertActivation::ReluSquared => inter,
    };
    let up = Tensor::randn(0f32, 1.0 / (h as f32).sqrt(), (e, rows, h), &cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let down = Tensor::randn(0f32, 1.0 / (inter as f32).sqrt(), (e, h, inter), &cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let x = Tensor::randn(0f32, 1.0, (tokens, h), &cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let logits = Tensor::randn(0f32, 1.0, (tokens, e), &cpu).unwrap();
    let (ids, gates) = moe_route(&MoeRouteArgs {
        logits: &logits,
        correction_bias: None,
        top_k: k,
        routing: MoeRouting::Softmax,
    })
    .unwrap();
    let want = moe_experts_slow(&MoeExpertsArgs {
        x: &x,
        ids: &ids,
        gates: &gates,
        up: &up,
        down: &down,
        activation: act,
    })
    .unwrap();
    assert!(
        max_diff(&want, &want.zeros_like().unwrap()) > 1e-3,
        "trivial output"
    );
    let on = |t: &Tensor| t.to_device(dev).unwrap();
    let (gx, gids, ggates, gup, gdown) = (on(&x), on(&ids), on(&gates), on(&up), on(&down));
    let args = MoeExpertsArgs {
        x: &gx,
        ids: &gids,
        gates: &ggates,
        up: &gup,
        down: &gdown,
        activation: act,
    };
    for path in [ExpertsPath::PerToken, ExpertsPath::Grouped] {
        let got = moe_experts_path(&args, path).unwrap();
        assert!(got.device().is_cuda());
        assert_eq!(got.dtype(), dtype);
        let d = max_diff(&got, &want);
        assert!(
            d < tol,
            "{path:?} {act:?} {dtype:?} t{tokens} e{e} k{k}: {d}"
        );
    }
    let d = max_diff(&moe_experts(&args).unwrap(), &want);
    assert!(d < tol, "dispatcher {act:?} {dtype:?} t{tokens}: {d}");
}

#[test]
fn experts_on_cuda_at_granite_tiny_width() {
    let Some(dev) = cuda() else { return };
    for (tokens, dtype, tol) in [
        (1, DType::F32, 1e-4),
        (2, DType::F32, 1e-4),
        (24, DType::F32, 1e-4),
        (2, DType::BF16, 0.1),
        (24, DType::BF16, 0.1),
    ] {
        check_experts(
            &dev,
            tokens,
            12,
            6,
            1536,
            512,
            ExpertActivation::SwiGlu,
            dtype,
            tol,
        );
    }
}

#[test]
fn experts_on_cuda_at_nemotron_nano_width() {
    let Some(dev) = cuda() else { return };
    for (tokens, dtype, tol) in [
        (1, DType::F32, 2e-4),
        (3, DType::F32, 2e-4),
        (19, DType::F32, 2e-4),
        (3, DType::BF16, 0.15),
    ] {
        check_experts(
            &dev,
            tokens,
            12,
            6,
            2688,
            1856,
            ExpertActivation::ReluSquared,
            dtype,
            tol,
        );
    }
}
