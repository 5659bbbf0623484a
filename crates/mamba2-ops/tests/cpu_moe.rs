//! MoE ops on CPU (issue 16): the fused router and both expert paths against their plain-tensor
//! references, on random shapes including Granite-4.0-H-Tiny's and Nemotron-3-Nano's.
//!
//! Real shapes, from the published configs as recalled here (the Hub is unreachable from this
//! machine, so they could not be re-read): ibm-granite/granite-4.0-h-tiny hidden 1536, 64 experts,
//! 6 per token, expert intermediate 512; nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B hidden 2688, 128
//! routed experts, 6 per token, 1 group, `norm_topk_prob`, `routed_scaling_factor` 2.5, expert
//! intermediate 1856. The routers run at those sizes; the expert weights of 64/128 experts
//! (~0.4 GB f32) are too large for a unit test, so the expert tests keep the real hidden and
//! intermediate widths and top-k with 12 experts.

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};

mod support;
use mamba2_ops::{
    moe_experts, moe_experts_path, moe_experts_slow, moe_route, moe_route_slow, ExpertActivation,
    ExpertsPath, MoeExpertsArgs, MoeRouteArgs, MoeRouting, OpError,
};
use support::quantized::randn;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn grouped(n_group: usize, topk_group: usize, norm: bool, scale: f64) -> MoeRouting {
    MoeRouting::SigmoidGrouped {
        n_group,
        topk_group,
        norm_topk_prob: norm,
        routed_scaling_factor: scale,
    }
}

/// Fast router == reference: same ids (best first), gates within 1e-6.
fn check_route(tokens: usize, experts: usize, top_k: usize, routing: MoeRouting, bias: bool) {
    let dev = Device::Cpu;
    let logits = Tensor::randn(0f32, 2.0, (tokens, experts), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.3, experts, &dev).unwrap();
    let args = MoeRouteArgs {
        logits: &logits,
        correction_bias: bias.then_some(&b),
        top_k,
        routing,
    };
    let (ids, gates) = moe_route(&args).unwrap();
    let (ids_ref, gates_ref) = moe_route_slow(&args).unwrap();
    assert_eq!(ids.dims(), &[tokens, top_k]);
    assert_eq!(
        ids.to_vec2::<u32>().unwrap(),
        ids_ref.to_vec2::<u32>().unwrap(),
        "{routing:?}"
    );
    let d = max_diff(&gates, &gates_ref);
    assert!(d < 1e-6, "{routing:?}: gates differ by {d}");
    // Distinct experts per token.
    for row in ids.to_vec2::<u32>().unwrap() {
        let mut r = row.clone();
        r.sort();
        r.dedup();
        assert_eq!(r.len(), top_k);
    }
}

#[test]
fn router_matches_reference_on_random_shapes() {
    for (t, e, k) in [(1, 4, 1), (7, 8, 3), (33, 64, 6), (5, 40, 8)] {
        check_route(t, e, k, MoeRouting::Softmax, false);
    }
    for (t, e, k, g, tg, norm) in [
        (1, 8, 2, 1, 1, true),
        (9, 8, 3, 4, 2, true),
        (17, 128, 6, 1, 1, true),
        (6, 128, 8, 8, 4, false),
        (11, 12, 4, 3, 2, false),
    ] {
        check_route(t, e, k, grouped(g, tg, norm, 2.5), true);
        check_route(t, e, k, grouped(g, tg, norm, 1.0), false);
    }
}

#[test]
fn router_values_by_hand() {
    let dev = Device::Cpu;
    // 4 experts in 2 groups [0, 1] [2, 3]; sigmoid scores s; bias lifts expert 3.
    let logits = Tensor::new(&[[2.0f32, 1.0, 1.5, -1.0]], &dev).unwrap();
    let bias = Tensor::new(&[0f32, 0.0, 0.0, 3.0], &dev).unwrap();
    let s = |l: f32| 1.0 / (1.0 + (-l).exp());
    let args = MoeRouteArgs {
        logits: &logits,
        correction_bias: Some(&bias),
        top_k: 2,
        routing: grouped(2, 1, true, 2.0),
    };
    for (ids, gates) in [moe_route(&args).unwrap(), moe_route_slow(&args).unwrap()] {
        // Group scores: s(2)+s(1) = 1.612 vs s(1.5)+s(-1)+3 = 4.086: group 1 only; inside it,
        // choice 3.269 (expert 3) then 0.818 (expert 2). Gates use s without the bias.
        assert_eq!(ids.to_vec2::<u32>().unwrap(), vec![vec![3, 2]]);
        let (a, b) = (s(-1.0), s(1.5));
        let want = [2.0 * a / (a + b), 2.0 * b / (a + b)];
        let got = gates.to_vec2::<f32>().unwrap()[0].clone();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
}

#[test]
fn router_ties_go_to_the_lower_expert_id() {
    let dev = Device::Cpu;
    let logits = Tensor::new(
        &[[1.0f32, 3.0, 3.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]],
        &dev,
    )
    .unwrap();
    for routing in [MoeRouting::Softmax, grouped(1, 1, true, 1.0)] {
        let args = MoeRouteArgs {
            logits: &logits,
            correction_bias: None,
            top_k: 2,
            routing,
        };
        for (ids, _) in [moe_route(&args).unwrap(), moe_route_slow(&args).unwrap()] {
            assert_eq!(
                ids.to_vec2::<u32>().unwrap(),
                vec![vec![1, 2], vec![0, 1]],
                "{routing:?}"
            );
        }
    }
}

fn random_experts(
    rng: &mut StdRng,
    e: usize,
    h: usize,
    inter: usize,
    act: ExpertActivation,
    dtype: DType,
) -> (Tensor, Tensor) {
    let rows = match act {
        ExpertActivation::SwiGlu => 2 * inter,
        ExpertActivation::ReluSquared => inter,
    };
    let up = (randn(rng, &[e, rows, h], DType::F32) / (h as f64).sqrt()).unwrap();
    let down = (randn(rng, &[e, h, inter], DType::F32) / (inter as f64).sqrt()).unwrap();
    (up.to_dtype(dtype).unwrap(), down.to_dtype(dtype).unwrap())
}

/// Random routing of `tokens` rows (each row its own experts) through both paths and the
/// reference.
#[allow(clippy::too_many_arguments)]
fn check_experts(
    tokens: usize,
    e: usize,
    k: usize,
    h: usize,
    inter: usize,
    act: ExpertActivation,
    dtype: DType,
    tol: f32,
) {
    // Seeded: with unseeded draws a tiny ReLU² case (one token, 4 intermediate values) was all
    // zeros about once in 16 runs and failed the non-trivial-output check.
    let seed = [tokens, e, k, h, inter, act as usize]
        .iter()
        .fold(17u64, |a, &v| {
            a.wrapping_mul(1_000_003).wrapping_add(v as u64)
        });
    let mut rng = StdRng::seed_from_u64(seed);
    let (up, down) = random_experts(&mut rng, e, h, inter, act, dtype);
    let x = randn(&mut rng, &[tokens, h], dtype);
    let logits = randn(&mut rng, &[tokens, e], DType::F32);
    let route = MoeRouteArgs {
        logits: &logits,
        correction_bias: None,
        top_k: k,
        routing: MoeRouting::Softmax,
    };
    let (ids, gates) = moe_route(&route).unwrap();
    let args = MoeExpertsArgs {
        x: &x,
        ids: &ids,
        gates: &gates,
        up: &up,
        down: &down,
        activation: act,
    };
    let want = moe_experts_slow(&args).unwrap();
    assert_eq!(want.dims(), &[tokens, h]);
    assert!(
        max_diff(&want, &want.zeros_like().unwrap()) > 1e-3,
        "trivial output"
    );
    for path in [ExpertsPath::PerToken, ExpertsPath::Grouped] {
        let got = moe_experts_path(&args, path).unwrap();
        assert_eq!(got.dtype(), dtype);
        let d = max_diff(&got, &want);
        assert!(
            d < tol,
            "{path:?} {act:?} {dtype:?} t{tokens} e{e} k{k}: {d}"
        );
    }
    let d = max_diff(&moe_experts(&args).unwrap(), &want);
    assert!(d < tol, "dispatcher: {d}");
}

#[test]
fn experts_match_reference_on_random_shapes() {
    use ExpertActivation::*;
    for (t, e, k, h, i) in [
        (1, 4, 1, 8, 4),
        (3, 8, 2, 16, 12),
        (20, 8, 3, 32, 16),
        (9, 6, 6, 24, 8),
    ] {
        for act in [SwiGlu, ReluSquared] {
            check_experts(t, e, k, h, i, act, DType::F32, 1e-4);
        }
    }
    check_experts(13, 8, 3, 32, 16, SwiGlu, DType::BF16, 0.1);
    check_experts(2, 8, 3, 32, 16, ReluSquared, DType::F16, 0.02);
}

#[test]
fn experts_at_granite_tiny_width() {
    // hidden 1536, expert intermediate 512, 6 of 12 experts: a decode step of a batch of 2 rows
    // (per-token path) and a 24-token prefill (grouped path).
    check_experts(
        2,
        12,
        6,
        1536,
        512,
        ExpertActivation::SwiGlu,
        DType::F32,
        1e-4,
    );
    check_experts(
        24,
        12,
        6,
        1536,
        512,
        ExpertActivation::SwiGlu,
        DType::F32,
        1e-4,
    );
}

#[test]
fn experts_at_nemotron_nano_width() {
    check_experts(
        3,
        12,
        6,
        2688,
        1856,
        ExpertActivation::ReluSquared,
        DType::F32,
        2e-4,
    );
}

#[test]
fn bad_arguments_are_typed_errors() {
    let dev = Device::Cpu;
    let logits = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let route = |top_k, routing| MoeRouteArgs {
        logits: &logits,
        correction_bias: None,
        top_k,
        routing,
    };
    for args in [
        route(9, MoeRouting::Softmax),
        route(0, MoeRouting::Softmax),
        route(2, grouped(4, 5, true, 1.0)),
        route(2, grouped(3, 1, true, 1.0)),
        route(3, grouped(4, 1, true, 1.0)),
    ] {
        for r in [moe_route(&args), moe_route_slow(&args)] {
            assert!(matches!(r, Err(OpError::Param { .. })), "{args:?}: {r:?}");
        }
    }
    let half = logits.to_dtype(DType::BF16).unwrap();
    let args = MoeRouteArgs {
        logits: &half,
        correction_bias: None,
        top_k: 2,
        routing: MoeRouting::Softmax,
    };
    assert!(matches!(moe_route(&args), Err(OpError::Dtype { .. })));

    let (up, down) = random_experts(
        &mut StdRng::seed_from_u64(1),
        4,
        8,
        4,
        ExpertActivation::SwiGlu,
        DType::F32,
    );
    let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let gates = Tensor::ones((2, 2), DType::F32, &dev).unwrap();
    let ids = Tensor::new(&[[0u32, 4], [1, 2]], &dev).unwrap();
    let args = MoeExpertsArgs {
        x: &x,
        ids: &ids,
        gates: &gates,
        up: &up,
        down: &down,
        activation: ExpertActivation::SwiGlu,
    };
    for path in [ExpertsPath::PerToken, ExpertsPath::Grouped] {
        let r = moe_experts_path(&args, path);
        assert!(
            matches!(r, Err(OpError::Param { param: "ids", .. })),
            "{r:?}"
        );
    }
    let ids = Tensor::new(&[[0u32, 3], [1, 2]], &dev).unwrap();
    let wrong_down = down.narrow(2, 0, 3).unwrap();
    let bad = MoeExpertsArgs {
        ids: &ids,
        down: &wrong_down,
        ..args
    };
    assert!(matches!(
        moe_experts(&bad),
        Err(OpError::Shape { arg: "down", .. })
    ));
    let half_up = up.to_dtype(DType::BF16).unwrap();
    let bad = MoeExpertsArgs {
        ids: &ids,
        up: &half_up,
        ..args
    };
    assert!(matches!(
        moe_experts(&bad),
        Err(OpError::Dtype { arg: "up", .. })
    ));
    let ids_i64 = ids.to_dtype(DType::I64).unwrap();
    let bad = MoeExpertsArgs {
        ids: &ids_i64,
        ..args
    };
    assert!(matches!(
        moe_experts_slow(&bad),
        Err(OpError::Dtype { arg: "ids", .. })
    ));
}
