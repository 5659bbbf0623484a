//! Routed experts whose matrices stay in ggml blocks (a quantized GGUF's `ffn_*_exps`), so that
//! a decode step reads only the chosen experts' quantized bytes; the routing is
//! [`crate::moe_experts`]'s (`moe.rs`), each expert's projections go through
//! [`crate::quantized_linear`].
//!
//! Shapes: x `(tokens, hidden)`, ids / gates `(tokens, top_k)`; each expert's up projection
//! `(up_rows, hidden)` given as consecutive row blocks (Granite's `[gate | up]` is stored as two
//! GGUF tensors, `ffn_gate_exps` and `ffn_up_exps`: their outputs are concatenated), its down
//! projection `(hidden, inter)`. Reference: [`moe_experts_quantized_slow`], every expert
//! dequantized exactly and run through [`crate::moe_experts_slow`]; the fast path differs from it
//! by the activation rounding of [`crate::quantized_linear`]'s matrix-vector products.
//!
//! Memory: as `moe_experts`, plus one dequantized expert at a time where the quantized
//! projection dequantizes for a GEMM (prefill rows on the CPU).

use crate::moe::{param, run_experts, validate_routing, OP_EXPERTS};
use crate::{
    moe_experts_slow, quantized_linear, relu_squared, swiglu, ExpertActivation, ExpertsPath,
    MoeExpertsArgs, OpError, QuantizedMatrix, Result,
};
use candle_core::{DType, Tensor, D};

/// One routed expert in ggml blocks.
#[derive(Debug, Clone)]
pub struct QuantizedExpert {
    /// The up projection `(up_rows, hidden)` as row blocks whose outputs are concatenated in
    /// order (for SwiGLU the first `up_rows / 2` rows are the gate).
    pub up: Vec<QuantizedMatrix>,
    /// `(hidden, inter)`.
    pub down: QuantizedMatrix,
}

impl QuantizedExpert {
    fn up_rows(&self) -> usize {
        self.up.iter().map(|m| m.out_features()).sum()
    }

    /// Bytes of the expert's blocks: what one token routed to it reads.
    pub fn storage_bytes(&self) -> usize {
        self.up.iter().map(|m| m.storage_bytes()).sum::<usize>() + self.down.storage_bytes()
    }

    /// Weights of the expert.
    pub fn parameters(&self) -> usize {
        let count = |m: &QuantizedMatrix| m.out_features() * m.in_features();
        self.up.iter().map(count).sum::<usize>() + count(&self.down)
    }

    fn forward(&self, x: &Tensor, act: ExpertActivation) -> Result<Tensor> {
        let parts = self
            .up
            .iter()
            .map(|m| quantized_linear(x, m, None))
            .collect::<Result<Vec<_>>>()?;
        let hid = Tensor::cat(&parts, D::Minus1)?; // (n, up_rows)
        let hid = match act {
            ExpertActivation::SwiGlu => swiglu(&hid)?,
            ExpertActivation::ReluSquared => relu_squared(&hid)?,
        }; // (n, inter)
        quantized_linear(&hid, &self.down, None) // (n, hidden)
    }
}

/// Arguments of [`moe_experts_quantized`].
#[derive(Debug, Clone, Copy)]
pub struct MoeQuantizedExpertsArgs<'a> {
    /// `(tokens, hidden)`, f32 / f16 / bf16.
    pub x: &'a Tensor,
    /// `(tokens, top_k)` u32, each `< experts.len()`.
    pub ids: &'a Tensor,
    /// `(tokens, top_k)` f32.
    pub gates: &'a Tensor,
    pub experts: &'a [QuantizedExpert],
    pub activation: ExpertActivation,
}

/// Returns `(tokens, hidden, top_k, n_experts)`.
fn validate(a: &MoeQuantizedExpertsArgs<'_>) -> Result<(usize, usize, usize, usize)> {
    let (t, h, k) = validate_routing(a.x, a.ids, a.gates)?;
    let Some(first) = a.experts.first() else {
        return Err(param(OP_EXPERTS, "experts", "no experts".into()));
    };
    let up_rows = first.up_rows();
    let inter = match a.activation {
        ExpertActivation::SwiGlu => up_rows / 2,
        ExpertActivation::ReluSquared => up_rows,
    };
    for (i, ex) in a.experts.iter().enumerate() {
        let up_ok = !ex.up.is_empty()
            && ex.up.iter().all(|m| m.in_features() == h)
            && ex.up_rows() == up_rows
            && (a.activation != ExpertActivation::SwiGlu || up_rows % 2 == 0);
        let down_ok = (ex.down.out_features(), ex.down.in_features()) == (h, inter);
        if !up_ok || !down_ok {
            return Err(param(
                OP_EXPERTS,
                "experts",
                format!(
                    "expert {i}: up {:?} / down ({}, {}), expected ({up_rows} rows, {h}) / ({h}, \
                     {inter}) like expert 0",
                    ex.up
                        .iter()
                        .map(|m| (m.out_features(), m.in_features()))
                        .collect::<Vec<_>>(),
                    ex.down.out_features(),
                    ex.down.in_features()
                ),
            ));
        }
        let on_x = |m: &QuantizedMatrix| m.device().same_device(a.x.device());
        if !ex.up.iter().all(on_x) || !on_x(&ex.down) {
            return Err(OpError::Device {
                op: OP_EXPERTS,
                arg: "experts",
            });
        }
    }
    Ok((t, h, k, a.experts.len()))
}

/// [`crate::moe_experts`] with block-quantized experts: only the chosen experts' blocks are
/// read. Few rows (`tokens · top_k <= n_experts`) take the per-token path, more rows are grouped
/// by expert.
///
/// ```
/// use candle_core::{quantized::GgmlDType, Device, Tensor};
/// use mamba2_ops::{moe_experts_quantized, moe_experts_quantized_slow, ExpertActivation,
///                  MoeQuantizedExpertsArgs, QuantizedExpert, QuantizedMatrix};
/// let dev = Device::Cpu;
/// let q = |r, c| QuantizedMatrix::quantize(&Tensor::randn(0f32, 0.3, (r, c), &dev)?, GgmlDType::Q8_0);
/// let experts = (0..4)
///     .map(|_| Ok(QuantizedExpert { up: vec![q(32, 64)?], down: q(64, 32)? }))
///     .collect::<mamba2_ops::Result<Vec<_>>>()?;
/// let x = Tensor::randn(0f32, 1.0, (2, 64), &dev)?;
/// let ids = Tensor::new(&[[0u32, 2], [3, 1]], &dev)?;
/// let gates = Tensor::new(&[[0.7f32, 0.3], [0.5, 0.5]], &dev)?;
/// let args = MoeQuantizedExpertsArgs { x: &x, ids: &ids, gates: &gates, experts: &experts,
///                                      activation: ExpertActivation::ReluSquared };
/// let (got, want) = (moe_experts_quantized(&args)?, moe_experts_quantized_slow(&args)?);
/// let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 0.05 * want.abs()?.max_all()?.to_scalar::<f32>()?);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn moe_experts_quantized(args: &MoeQuantizedExpertsArgs<'_>) -> Result<Tensor> {
    let dims @ (t, _, k, e) = validate(args)?;
    let path = if t * k <= e {
        ExpertsPath::PerToken
    } else {
        ExpertsPath::Grouped
    };
    run(args, dims, path)
}

/// [`moe_experts_quantized`] through the given path (for tests).
pub fn moe_experts_quantized_path(
    args: &MoeQuantizedExpertsArgs<'_>,
    path: ExpertsPath,
) -> Result<Tensor> {
    run(args, validate(args)?, path)
}

/// The experts of validated `args` through `path`.
fn run(
    args: &MoeQuantizedExpertsArgs<'_>,
    dims: (usize, usize, usize, usize),
    path: ExpertsPath,
) -> Result<Tensor> {
    let mlp = |xs: &Tensor, ex: usize| args.experts[ex].forward(xs, args.activation);
    run_experts(args.x, args.ids, args.gates, dims, path, &mlp)
}

/// Plain-tensor reference of [`moe_experts_quantized`]: every expert dequantized exactly to f32
/// and stacked, through [`crate::moe_experts_slow`] in f32; the result in x's dtype.
pub fn moe_experts_quantized_slow(args: &MoeQuantizedExpertsArgs<'_>) -> Result<Tensor> {
    validate(args)?;
    let dev = args.x.device();
    let mut ups = Vec::with_capacity(args.experts.len());
    let mut downs = Vec::with_capacity(args.experts.len());
    for ex in args.experts {
        let parts = ex
            .up
            .iter()
            .map(|m| m.dequantize(dev))
            .collect::<Result<Vec<_>>>()?;
        ups.push(Tensor::cat(&parts, 0)?); // (up_rows, hidden)
        downs.push(ex.down.dequantize(dev)?); // (hidden, inter)
    }
    let (up, down) = (Tensor::stack(&ups, 0)?, Tensor::stack(&downs, 0)?);
    let x = args.x.to_dtype(DType::F32)?;
    let y = moe_experts_slow(&MoeExpertsArgs {
        x: &x,
        ids: args.ids,
        gates: args.gates,
        up: &up,
        down: &down,
        activation: args.activation,
    })?;
    Ok(y.to_dtype(args.x.dtype())?)
}
