//! Mixture-of-experts ops: the router's top-k choice and the routed experts.
//!
//! Reference: HF transformers 5.24 `GraniteMoeHybridTopKRouter` / `NemotronHTopkRouter` (routing)
//! and `GraniteMoeHybridExperts` / `NemotronHExperts` (experts). Shapes:
//! - [`moe_route`]: router logits `(tokens, n_experts)` f32 (+ Nemotron's correction bias
//!   `(n_experts)` f32) -> expert ids `(tokens, top_k)` u32 and gates `(tokens, top_k)` f32;
//! - [`moe_experts`]: x `(tokens, hidden)`, ids / gates `(tokens, top_k)`, stacked expert weights
//!   `up (n_experts, up_rows, hidden)` (`[gate | up]` rows for SwiGLU) and
//!   `down (n_experts, hidden, inter)` -> `sum_k gate_k · expert_{id_k}(x)` `(tokens, hidden)` in
//!   x's dtype, accumulated in f32.
//!
//! Ties: an expert with a larger score wins; between equal scores the lower expert id wins (what
//! `torch.topk` returns on CPU for these sizes; torch documents no order). NaN scores rank above
//! every number, as in `torch.topk`. Ids are returned best first.
//!
//! Memory: the router copies the logits to the host (`tokens · n_experts` f32; routing is
//! a per-token selection that no device kernel of this crate does yet); the experts need one f32
//! `(tokens, hidden)` accumulator plus the activations of the tokens of one expert at a time.

use crate::check;
use crate::{linear, relu_squared, swiglu, Backend, OpError, Result};
use candle_core::{DType, Device, Tensor, D};

const OP_ROUTE: &str = "moe_route";
pub(crate) const OP_EXPERTS: &str = "moe_experts";

/// How the router turns logits into experts and gates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MoeRouting {
    /// Granite: the `top_k` largest logits; gates = softmax over those logits.
    Softmax,
    /// Nemotron-H (DeepSeek-V3 style): `s = sigmoid(logits)`; choice scores `s + bias`; each of
    /// `n_group` equal groups is scored by the sum of its two best choice scores and only the
    /// `topk_group` best groups compete; the `top_k` best choice scores among them win. Gates are
    /// the winners' `s` (without the bias), divided by `sum + 1e-20` when `norm_topk_prob`, times
    /// `routed_scaling_factor`.
    SigmoidGrouped {
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        routed_scaling_factor: f64,
    },
}

/// Arguments of [`moe_route`].
#[derive(Debug, Clone, Copy)]
pub struct MoeRouteArgs<'a> {
    /// `(tokens, n_experts)` f32.
    pub logits: &'a Tensor,
    /// `(n_experts)` f32, added to the scores for the choice only (Nemotron-H's
    /// `e_score_correction_bias`); `None` for none.
    pub correction_bias: Option<&'a Tensor>,
    pub top_k: usize,
    pub routing: MoeRouting,
}

/// The activation of the experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertActivation {
    /// `down(silu(gate) · up)`, `up` rows `[gate | up]` (Granite).
    SwiGlu,
    /// `down(relu(up)²)` (Nemotron-H).
    ReluSquared,
}

/// Arguments of [`moe_experts`].
#[derive(Debug, Clone, Copy)]
pub struct MoeExpertsArgs<'a> {
    /// `(tokens, hidden)`, f32 / f16 / bf16.
    pub x: &'a Tensor,
    /// `(tokens, top_k)` u32, each `< n_experts`.
    pub ids: &'a Tensor,
    /// `(tokens, top_k)` f32.
    pub gates: &'a Tensor,
    /// `(n_experts, up_rows, hidden)` in x's dtype (`up_rows = 2 · inter` for SwiGLU).
    pub up: &'a Tensor,
    /// `(n_experts, hidden, inter)` in x's dtype.
    pub down: &'a Tensor,
    pub activation: ExpertActivation,
}

pub(crate) fn param(op: &'static str, param: &'static str, message: String) -> OpError {
    OpError::Param { op, param, message }
}

/// Returns `(tokens, n_experts)`.
fn validate_route(a: &MoeRouteArgs<'_>) -> Result<(usize, usize)> {
    let [t, e] = check::dims(OP_ROUTE, "logits", a.logits)?;
    check::f32(OP_ROUTE, "logits", a.logits)?;
    if let Some(b) = a.correction_bias {
        check::shape(OP_ROUTE, "correction_bias", b, &[e])?;
        check::f32(OP_ROUTE, "correction_bias", b)?;
        if !b.device().same_device(a.logits.device()) {
            return Err(OpError::Device {
                op: OP_ROUTE,
                arg: "correction_bias",
            });
        }
    }
    if a.top_k == 0 || a.top_k > e {
        return Err(param(
            OP_ROUTE,
            "top_k",
            format!("{} must be in 1..={e} (experts)", a.top_k),
        ));
    }
    if let MoeRouting::SigmoidGrouped {
        n_group,
        topk_group,
        ..
    } = a.routing
    {
        if n_group == 0 || e % n_group != 0 || (n_group > 1 && e / n_group < 2) {
            return Err(param(
                OP_ROUTE,
                "n_group",
                format!("{n_group} must divide the {e} experts into groups of at least 2"),
            ));
        }
        if topk_group == 0 || topk_group > n_group || a.top_k > topk_group * (e / n_group) {
            return Err(param(
                OP_ROUTE,
                "topk_group",
                format!(
                    "{topk_group} groups of {} must be in 1..={n_group} and hold top_k {}",
                    e / n_group,
                    a.top_k
                ),
            ));
        }
    }
    Ok((t, e))
}

/// `a` ranks before `b`: larger first, NaN above numbers, then the lower index.
fn ranks_before((ia, a): (usize, f32), (ib, b): (usize, f32)) -> bool {
    match (a.is_nan(), b.is_nan()) {
        (true, false) => true,
        (false, true) => false,
        (true, true) => ia < ib,
        _ => a > b || (a == b && ia < ib),
    }
}

/// The indices of the `k` best of `v` among `allowed`, best first.
fn top_k_of(v: &[f32], k: usize, allowed: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(k + 1);
    for i in (0..v.len()).filter(|&i| allowed(i)) {
        let pos = best
            .iter()
            .position(|&j| ranks_before((i, v[i]), (j, v[j])))
            .unwrap_or(best.len());
        if pos < k {
            best.insert(pos, i);
            best.truncate(k);
        }
    }
    best
}

/// One token's routing: `(ids, gates)`, best first.
fn route_row(
    logits: &[f32],
    bias: Option<&[f32]>,
    top_k: usize,
    r: MoeRouting,
) -> (Vec<usize>, Vec<f32>) {
    match r {
        MoeRouting::Softmax => {
            let ids = top_k_of(logits, top_k, |_| true);
            let max = logits[ids[0]];
            let exps: Vec<f32> = ids.iter().map(|&i| (logits[i] - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            (ids, exps.iter().map(|e| e / sum).collect())
        }
        MoeRouting::SigmoidGrouped {
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        } => {
            let scores: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
            let choice: Vec<f32> = match bias {
                Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                None => scores.clone(),
            };
            let per = logits.len() / n_group;
            let group_scores: Vec<f32> = choice
                .chunks(per)
                .map(|g| {
                    top_k_of(g, 2.min(per), |_| true)
                        .iter()
                        .map(|&i| g[i])
                        .sum()
                })
                .collect();
            let kept = top_k_of(&group_scores, topk_group, |_| true);
            let ids = top_k_of(&choice, top_k, |i| kept.contains(&(i / per)));
            let mut gates: Vec<f32> = ids.iter().map(|&i| scores[i]).collect();
            if norm_topk_prob {
                let denom = gates.iter().sum::<f32>() + 1e-20;
                gates.iter_mut().for_each(|g| *g /= denom);
            }
            let scale = routed_scaling_factor as f32;
            gates.iter_mut().for_each(|g| *g *= scale);
            (ids, gates)
        }
    }
}

/// The router: experts `(tokens, top_k)` u32 (best first) and their gates `(tokens, top_k)` f32.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use mamba2_ops::{moe_route, MoeRouteArgs, MoeRouting};
/// let logits = Tensor::new(&[[0.5f32, 2.0, -1.0, 1.0]], &Device::Cpu)?;
/// let args = MoeRouteArgs { logits: &logits, correction_bias: None, top_k: 2, routing: MoeRouting::Softmax };
/// let (ids, gates) = moe_route(&args)?;
/// assert_eq!(ids.to_vec2::<u32>()?, vec![vec![1, 3]]);
/// let g = gates.to_vec2::<f32>()?;
/// assert!((g[0][0] - 1.0 / (1.0 + (-1f32).exp())).abs() < 1e-6); // softmax of [2, 1]
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn moe_route(args: &MoeRouteArgs<'_>) -> Result<(Tensor, Tensor)> {
    moe_route_with(args, Backend::Auto)
}

/// [`moe_route`] with an explicit backend choice.
pub fn moe_route_with(args: &MoeRouteArgs<'_>, backend: Backend) -> Result<(Tensor, Tensor)> {
    let (t, e) = validate_route(args)?;
    if backend == Backend::Reference {
        return moe_route_slow(args);
    }
    let logits = args.logits.flatten_all()?.to_vec1::<f32>()?;
    let bias = match args.correction_bias {
        Some(b) => Some(b.to_vec1::<f32>()?),
        None => None,
    };
    let (mut ids, mut gates) = (Vec::with_capacity(t * args.top_k), Vec::new());
    for row in logits.chunks(e.max(1)) {
        let (i, g) = route_row(row, bias.as_deref(), args.top_k, args.routing);
        ids.extend(i.into_iter().map(|i| i as u32));
        gates.extend(g);
    }
    let dev = args.logits.device();
    Ok((
        Tensor::from_vec(ids, (t, args.top_k), dev)?,
        Tensor::from_vec(gates, (t, args.top_k), dev)?,
    ))
}

/// The k best along the last dimension, best first. Ties go to the lower index because Candle's
/// CPU arg-sort is a stable `sort_by` (the reference is meant for CPU tests).
fn top_k_slow(v: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let order = v.arg_sort_last_dim(false)?.narrow(D::Minus1, 0, k)?;
    let order = order.contiguous()?;
    let vals = v.contiguous()?.gather(&order, D::Minus1)?;
    Ok((order, vals))
}

/// Plain-tensor reference of [`moe_route`]: HF's router written with sort / gather / mask.
pub fn moe_route_slow(args: &MoeRouteArgs<'_>) -> Result<(Tensor, Tensor)> {
    let (t, e) = validate_route(args)?;
    let k = args.top_k;
    let logits = args.logits; // (tokens, n_experts)
    match args.routing {
        MoeRouting::Softmax => {
            let (ids, top) = top_k_slow(logits, k)?; // (tokens, k)
            let max = top.max_keepdim(D::Minus1)?;
            let ex = top.broadcast_sub(&max)?.exp()?;
            let gates = ex.broadcast_div(&ex.sum_keepdim(D::Minus1)?)?;
            Ok((ids, gates))
        }
        MoeRouting::SigmoidGrouped {
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        } => {
            let scores = candle_nn_sigmoid(logits)?; // (tokens, n_experts)
            let choice = match args.correction_bias {
                Some(b) => scores.broadcast_add(b)?,
                None => scores.clone(),
            };
            let per = e / n_group;
            let grouped = choice.reshape((t, n_group, per))?; // (tokens, n_group, per)
            let (_, best2) = top_k_slow(&grouped, 2.min(per))?;
            let group_scores = best2.sum(D::Minus1)?; // (tokens, n_group)
            let (kept, _) = top_k_slow(&group_scores, topk_group)?; // (tokens, topk_group)
            let ones = Tensor::ones((t, topk_group), DType::F32, logits.device())?;
            let group_mask = Tensor::zeros((t, n_group), DType::F32, logits.device())?
                .scatter_add(&kept, &ones, D::Minus1)?; // (tokens, n_group) 1 = kept
            let mask = group_mask
                .unsqueeze(2)?
                .broadcast_as((t, n_group, per))?
                .reshape((t, e))?; // (tokens, n_experts)
            let neg = Tensor::full(f32::NEG_INFINITY, (t, e), logits.device())?;
            let masked = mask.ne(0f32)?.where_cond(&choice, &neg)?;
            let (ids, _) = top_k_slow(&masked, k)?; // (tokens, k)
            let mut gates = scores.gather(&ids, D::Minus1)?;
            if norm_topk_prob {
                let denom = (gates.sum_keepdim(D::Minus1)? + 1e-20)?;
                gates = gates.broadcast_div(&denom)?;
            }
            Ok((ids, gates.affine(routed_scaling_factor, 0.0)?))
        }
    }
}

fn candle_nn_sigmoid(x: &Tensor) -> Result<Tensor> {
    // 1 / (1 + exp(-x)), in f32.
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// Returns `(tokens, hidden, top_k, n_experts, inter)`.
/// The routing arguments every expert op takes: x `(tokens, hidden)` float, ids `(tokens, top_k)`
/// u32 and gates `(tokens, top_k)` f32 on x's device. Returns `(tokens, hidden, top_k)`.
pub(crate) fn validate_routing(
    x: &Tensor,
    ids: &Tensor,
    gates: &Tensor,
) -> Result<(usize, usize, usize)> {
    let [t, h] = check::dims(OP_EXPERTS, "x", x)?;
    check::float(OP_EXPERTS, "x", x)?;
    let [_, k] = check::dims(OP_EXPERTS, "ids", ids)?;
    check::shape(OP_EXPERTS, "ids", ids, &[t, k])?;
    if ids.dtype() != DType::U32 {
        return Err(OpError::Dtype {
            op: OP_EXPERTS,
            arg: "ids",
            got: ids.dtype(),
            expected: "u32",
        });
    }
    check::shape(OP_EXPERTS, "gates", gates, &[t, k])?;
    check::f32(OP_EXPERTS, "gates", gates)?;
    for (arg, w) in [("ids", ids), ("gates", gates)] {
        if !w.device().same_device(x.device()) {
            return Err(OpError::Device {
                op: OP_EXPERTS,
                arg,
            });
        }
    }
    Ok((t, h, k))
}

fn validate_experts(a: &MoeExpertsArgs<'_>) -> Result<(usize, usize, usize, usize, usize)> {
    let (t, h, k) = validate_routing(a.x, a.ids, a.gates)?;
    let [e, rows, hu] = check::dims(OP_EXPERTS, "up", a.up)?;
    let inter = match a.activation {
        ExpertActivation::SwiGlu => rows / 2,
        ExpertActivation::ReluSquared => rows,
    };
    if hu != h || (a.activation == ExpertActivation::SwiGlu && rows % 2 != 0) {
        return Err(OpError::Shape {
            op: OP_EXPERTS,
            arg: "up",
            got: a.up.dims().to_vec(),
            expected: format!("(n_experts, up_rows, {h}), up_rows even for SwiGLU"),
        });
    }
    check::shape(OP_EXPERTS, "down", a.down, &[e, h, inter])?;
    for (arg, w) in [("up", a.up), ("down", a.down)] {
        if w.dtype() != a.x.dtype() {
            return Err(OpError::Dtype {
                op: OP_EXPERTS,
                arg,
                got: w.dtype(),
                expected: "x's dtype",
            });
        }
    }
    for (arg, w) in [("up", a.up), ("down", a.down)] {
        if !w.device().same_device(a.x.device()) {
            return Err(OpError::Device {
                op: OP_EXPERTS,
                arg,
            });
        }
    }
    Ok((t, h, k, e, inter))
}

fn expert_mlp(x: &Tensor, up: &Tensor, down: &Tensor, act: ExpertActivation) -> Result<Tensor> {
    let hid = linear(x, up, None)?; // (n, up_rows)
    let hid = match act {
        ExpertActivation::SwiGlu => swiglu(&hid)?,
        ExpertActivation::ReluSquared => relu_squared(&hid)?,
    }; // (n, inter)
    linear(&hid, down, None) // (n, hidden)
}

/// The routed experts: `out[t] = sum_k gates[t, k] · expert_{ids[t, k]}(x[t])`, only the chosen
/// experts' weights read. Few rows (a decode step: `tokens · top_k <= n_experts`) take the
/// per-token path, each row through its own experts' matrices; more rows are grouped by expert,
/// one matmul per expert over its tokens, scattered back weighted by the gates. Accumulated in
/// f32, returned in x's dtype.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use mamba2_ops::{moe_experts, moe_experts_slow, ExpertActivation, MoeExpertsArgs};
/// let dev = Device::Cpu;
/// let x = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
/// let up = Tensor::randn(0f32, 0.3, (4, 12, 8), &dev)?; // 4 experts, [gate | up] 2 x 6 rows
/// let down = Tensor::randn(0f32, 0.3, (4, 8, 6), &dev)?;
/// let ids = Tensor::new(&[[0u32, 2], [3, 1], [2, 3]], &dev)?;
/// let gates = Tensor::new(&[[0.7f32, 0.3], [0.5, 0.5], [0.9, 0.1]], &dev)?;
/// let args = MoeExpertsArgs { x: &x, ids: &ids, gates: &gates, up: &up, down: &down,
///                             activation: ExpertActivation::SwiGlu };
/// let diff = (moe_experts(&args)? - moe_experts_slow(&args)?)?.abs()?.max_all()?;
/// assert!(diff.to_scalar::<f32>()? < 1e-5);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn moe_experts(args: &MoeExpertsArgs<'_>) -> Result<Tensor> {
    moe_experts_with(args, Backend::Auto)
}

/// Which path [`moe_experts`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertsPath {
    /// Per token: gather its experts' matrices, matrix-vector products.
    PerToken,
    /// Tokens grouped by expert, one matmul per expert.
    Grouped,
}

/// [`moe_experts`] with an explicit backend choice (`Reference`: [`moe_experts_slow`]).
pub fn moe_experts_with(args: &MoeExpertsArgs<'_>, backend: Backend) -> Result<Tensor> {
    let (t, _, k, e, _) = validate_experts(args)?;
    match backend {
        Backend::Reference => moe_experts_slow(args),
        Backend::Auto if t * k <= e => moe_experts_path(args, ExpertsPath::PerToken),
        Backend::Auto => moe_experts_path(args, ExpertsPath::Grouped),
    }
}

/// [`moe_experts`] through the given path (both give the same result; for tests).
pub fn moe_experts_path(args: &MoeExpertsArgs<'_>, path: ExpertsPath) -> Result<Tensor> {
    let (t, h, k, e, _) = validate_experts(args)?;
    let mlp = |xs: &Tensor, ex: usize| {
        expert_mlp(xs, &args.up.get(ex)?, &args.down.get(ex)?, args.activation)
    };
    run_experts(args.x, args.ids, args.gates, (t, h, k, e), path, &mlp)
}

/// The routing shared by the dense and the block-quantized experts: `mlp(xs, e)` maps the rows
/// `xs` `(n, hidden)` through expert `e`; the result `(tokens, hidden)` in x's dtype is the
/// gate-weighted sum over each token's experts, accumulated in f32. Checks that every id is an
/// expert.
pub(crate) fn run_experts(
    x: &Tensor,     // (tokens, hidden)
    ids: &Tensor,   // (tokens, top_k) u32
    gates: &Tensor, // (tokens, top_k) f32
    (t, h, k, e): (usize, usize, usize, usize),
    path: ExpertsPath,
    mlp: &dyn Fn(&Tensor, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let ids = ids.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= e) {
        return Err(param(
            OP_EXPERTS,
            "ids",
            format!("expert id {bad} out of range (n_experts {e})"),
        ));
    }
    let dev: &Device = x.device();
    let gates = gates.flatten_all()?.to_vec1::<f32>()?;
    let out = match path {
        ExpertsPath::PerToken => {
            let mut rows = Vec::with_capacity(t);
            for tok in 0..t {
                let xr = x.narrow(0, tok, 1)?; // (1, hidden)
                let mut acc = Tensor::zeros((1, h), DType::F32, dev)?;
                for slot in 0..k {
                    let y = mlp(&xr, ids[tok * k + slot] as usize)?; // (1, hidden)
                    acc = (acc
                        + y.to_dtype(DType::F32)?
                            .affine(gates[tok * k + slot] as f64, 0.0)?)?;
                }
                rows.push(acc);
            }
            Tensor::cat(&rows, 0)? // (tokens, hidden) f32
        }
        ExpertsPath::Grouped => {
            // (token, gate) pairs of each expert, in token order.
            let mut members: Vec<Vec<(u32, f32)>> = vec![Vec::new(); e];
            for (i, (&ex, &g)) in ids.iter().zip(&gates).enumerate() {
                members[ex as usize].push(((i / k) as u32, g));
            }
            let mut acc = Tensor::zeros((t, h), DType::F32, dev)?;
            for (ex, m) in members.iter().enumerate().filter(|(_, m)| !m.is_empty()) {
                let toks: Vec<u32> = m.iter().map(|p| p.0).collect();
                let g: Vec<f32> = m.iter().map(|p| p.1).collect();
                let toks = Tensor::from_vec(toks, m.len(), dev)?;
                let g = Tensor::from_vec(g, (m.len(), 1), dev)?;
                let xs = x.index_select(&toks, 0)?; // (n, hidden)
                let y = mlp(&xs, ex)?; // (n, hidden)
                let y = y.to_dtype(DType::F32)?.broadcast_mul(&g)?;
                acc = acc.index_add(&toks, &y, 0)?;
            }
            acc
        }
    };
    Ok(out.to_dtype(x.dtype())?)
}

/// Plain-tensor reference of [`moe_experts`], as HF's dense loop: every expert runs on every
/// token in f32, weighted by that token's gate for the expert (0 where not chosen).
pub fn moe_experts_slow(args: &MoeExpertsArgs<'_>) -> Result<Tensor> {
    let (t, h, _, e, _) = validate_experts(args)?;
    let x = args.x.to_dtype(DType::F32)?; // (tokens, hidden)
    let mut out = Tensor::zeros((t, h), DType::F32, args.x.device())?;
    for ex in 0..e {
        // (tokens, 1): the summed gate of expert `ex` per token.
        let hit = args.ids.eq(ex as u32)?.to_dtype(DType::F32)?; // (tokens, top_k)
        let coef = (hit * args.gates)?.sum_keepdim(1)?;
        let up = args.up.get(ex)?.to_dtype(DType::F32)?; // (up_rows, hidden)
        let down = args.down.get(ex)?.to_dtype(DType::F32)?; // (hidden, inter)
        let hid = x.matmul(&up.t()?)?; // (tokens, up_rows)
        let hid = match args.activation {
            ExpertActivation::SwiGlu => {
                let n = hid.dim(1)? / 2;
                let gate = hid.narrow(1, 0, n)?;
                let silu = (&gate * candle_nn_sigmoid(&gate)?)?;
                (silu * hid.narrow(1, n, n)?)?
            }
            ExpertActivation::ReluSquared => hid.relu()?.sqr()?,
        }; // (tokens, inter)
        let y = hid.matmul(&down.t()?)?; // (tokens, hidden)
        out = (out + y.broadcast_mul(&coef)?)?;
    }
    Ok(out.to_dtype(args.x.dtype())?)
}
