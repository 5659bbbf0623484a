//! Fused decode step of a Mamba-2 mixer, between `in_proj` and `out_proj`: conv update + SiLU,
//! selective state update with the `D` skip, then the grouped gated RMSNorm, for one token.
//!
//! Decode of small models is launch-bound: the unfused step costs one launch per op plus the
//! copies that make the split projection contiguous; the CUDA path does all of it in one launch
//! reading the projection's views in place; Metal runs the fused conv + state-update kernel and
//! the gated-norm kernel (two dispatches; the plan in `metal_plan::mixer_decode_step`). The CPU
//! runs [`mixer_decode_step_slow`], the composition of the ops' own dispatchers.

use crate::check;
use crate::{
    causal_conv1d_update, gated_rms_norm, selective_state_update, GatedRmsNormArgs, OpError,
    Result, SsdParams, StateUpdateArgs,
};
use candle_core::Tensor;

const OP: &str = "mixer_decode_step";

/// Arguments of [`mixer_decode_step`] (Mamba-2 layout: `conv_dim = d_inner + 2 ngroups d_state`,
/// the conv channels ordered x, B, C; B/C groups are also the norm groups).
#[derive(Debug, Clone, Copy)]
pub struct DecodeStepArgs<'a> {
    /// `(batch, conv_dim)`: the xBC part of the projection, before the conv.
    pub xbc: &'a Tensor,
    /// `(batch, nheads)`: raw time step.
    pub dt: &'a Tensor,
    /// `(batch, d_inner)`: the gate.
    pub z: &'a Tensor,
    /// `(batch, conv_dim, d_conv)` f32, contiguous: updated in place, unless `conv_state_next`
    /// is given.
    pub conv_state: &'a Tensor,
    /// `(batch, conv_dim, d_conv)` f32, contiguous, another buffer than `conv_state`: when
    /// given, the new conv state is written here and `conv_state` is left unspecified (the
    /// caller swaps the two for the next step). The fused Metal kernel needs it: its threads
    /// read channels other threads roll, so it cannot update the state in place.
    pub conv_state_next: Option<&'a Tensor>,
    /// `(conv_dim, d_conv)`.
    pub conv_weight: &'a Tensor,
    /// `(conv_dim)`.
    pub conv_bias: Option<&'a Tensor>,
    /// `(batch, nheads, headdim, d_state)` f32, contiguous: updated in place.
    pub ssm_state: &'a Tensor,
    /// `(nheads)` f32: `A = -exp(A_log)`.
    pub a: &'a Tensor,
    /// `(nheads)`.
    pub d: Option<&'a Tensor>,
    /// `(nheads)`.
    pub dt_bias: Option<&'a Tensor>,
    /// `(d_inner)`: gated RMSNorm weight.
    pub norm_weight: &'a Tensor,
    pub eps: f64,
    pub ngroups: usize,
    pub norm_before_gate: bool,
}

pub(crate) struct StepDims {
    pub batch: usize,
    pub nheads: usize,
    pub headdim: usize,
    pub d_state: usize,
    pub d_inner: usize,
}

pub(crate) fn validate(args: &DecodeStepArgs) -> Result<StepDims> {
    let [batch, nheads, headdim, d_state] = check::dims::<4>(OP, "ssm_state", args.ssm_state)?;
    let [_, d_inner] = check::dims::<2>(OP, "z", args.z)?;
    let ngroups = args.ngroups;
    if ngroups == 0 || !nheads.is_multiple_of(ngroups) || nheads * headdim != d_inner {
        return Err(OpError::Param {
            op: OP,
            param: "ngroups",
            message: format!(
                "need nheads ({nheads}) * headdim ({headdim}) = d_inner ({d_inner}) and ngroups ({ngroups}) dividing nheads"
            ),
        });
    }
    check::shape(
        OP,
        "xbc",
        args.xbc,
        &[batch, d_inner + 2 * ngroups * d_state],
    )?;
    check::shape(OP, "dt", args.dt, &[batch, nheads])?;
    check::shape(OP, "z", args.z, &[batch, d_inner])?;
    if let Some(next) = args.conv_state_next {
        check::shape(OP, "conv_state_next", next, args.conv_state.dims())?;
        if next.dtype() != candle_core::DType::F32 || !next.is_contiguous() {
            return Err(OpError::Param {
                op: OP,
                param: "conv_state_next",
                message: "must be f32 and contiguous".into(),
            });
        }
    }
    Ok(StepDims {
        batch,
        nheads,
        headdim,
        d_state,
        d_inner,
    })
}

/// One decode step of a mixer: returns the normed `(batch, d_inner)` output in the dtype of
/// `xbc` (the input of `out_proj`), and advances both states in place.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use mamba2_ops::{mixer_decode_step, DecodeStepArgs, SsdParams};
/// let dev = Device::Cpu;
/// let (batch, nheads, headdim, ngroups, d_state, d_conv) = (2, 4, 8, 2, 16, 4);
/// let d_inner = nheads * headdim;
/// let conv_dim = d_inner + 2 * ngroups * d_state;
/// // One row of in_proj's output: (z | xBC | dt); the op reads the three views in place.
/// let proj = Tensor::randn(0f32, 1.0, (batch, d_inner + conv_dim + nheads), &dev)?;
/// let conv_state = Tensor::zeros((batch, conv_dim, d_conv), DType::F32, &dev)?;
/// let ssm_state = Tensor::zeros((batch, nheads, headdim, d_state), DType::F32, &dev)?;
/// let y = mixer_decode_step(
///     &DecodeStepArgs {
///         xbc: &proj.narrow(1, d_inner, conv_dim)?,
///         dt: &proj.narrow(1, d_inner + conv_dim, nheads)?,
///         z: &proj.narrow(1, 0, d_inner)?,
///         conv_state: &conv_state,
///         conv_state_next: None,
///         conv_weight: &Tensor::randn(0f32, 0.5, (conv_dim, d_conv), &dev)?,
///         conv_bias: None,
///         ssm_state: &ssm_state,
///         a: &Tensor::full(-1f32, nheads, &dev)?,
///         d: None,
///         dt_bias: None,
///         norm_weight: &Tensor::ones(d_inner, DType::F32, &dev)?,
///         eps: 1e-5,
///         ngroups,
///         norm_before_gate: false,
///     },
///     &SsdParams::default(),
/// )?;
/// assert_eq!(y.dims(), &[batch, d_inner]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn mixer_decode_step(args: &DecodeStepArgs, params: &SsdParams) -> Result<Tensor> {
    mixer_decode_step_with(crate::Backend::Auto, args, params)
}

/// [`mixer_decode_step`] with an explicit backend choice. The CUDA kernel updates the conv
/// state in place: with a `conv_state_next` the reference runs there.
pub fn mixer_decode_step_with(
    backend: crate::Backend,
    args: &DecodeStepArgs,
    params: &SsdParams,
) -> Result<Tensor> {
    validate(args)?;
    let backend = match (args.conv_state_next, args.xbc.device()) {
        (Some(_), candle_core::Device::Cuda(_)) => crate::Backend::Reference,
        _ => backend,
    };
    crate::dispatch!(
        backend,
        args.xbc.device(),
        mixer_decode_step(args, params),
        mixer_decode_step_slow(args, params),
        no_cpu_kernel
    )
}

/// One decode step of a mixer through its out-projection: `linear(mixer_decode_step(args),
/// out_proj, out_bias)` `(batch, d_model)` in the dtype of `xbc`; both states advance as in
/// [`mixer_decode_step`]. On Metal (with `conv_state_next`) two dispatches: the fused step, and
/// the out-projection's matrix-vector kernel with the gated norm folded in front. `out_proj`
/// is `(d_model, d_inner)`, `out_bias` `(d_model)`.
pub fn mixer_decode_step_out(
    args: &DecodeStepArgs,
    params: &SsdParams,
    out_proj: &Tensor,
    out_bias: Option<&Tensor>,
) -> Result<Tensor> {
    validate(args)?;
    crate::dispatch!(
        crate::Backend::Auto,
        args.xbc.device(),
        mixer_decode_step_out(args, params, out_proj, out_bias),
        mixer_decode_step_out_slow(args, params, out_proj, out_bias),
        metal_only
    )
}

/// Reference of [`mixer_decode_step_out`]: the decode step, then the `linear` op.
pub fn mixer_decode_step_out_slow(
    args: &DecodeStepArgs,
    params: &SsdParams,
    out_proj: &Tensor,
    out_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let y = mixer_decode_step(args, params)?; // (batch, d_inner)
    crate::linear(&y, out_proj, out_bias) // (batch, d_model)
}

/// Reference of [`mixer_decode_step`]: the ops one after another.
pub fn mixer_decode_step_slow(args: &DecodeStepArgs, params: &SsdParams) -> Result<Tensor> {
    let StepDims {
        batch,
        nheads,
        headdim,
        d_state,
        d_inner,
    } = validate(args)?;
    let g = args.ngroups;
    let conv_state = match args.conv_state_next {
        Some(next) => {
            next.slice_set(args.conv_state, 0, 0)?;
            next
        }
        None => args.conv_state,
    };
    let xbc = causal_conv1d_update(
        &args.xbc.contiguous()?,
        conv_state,
        args.conv_weight,
        args.conv_bias,
        true,
    )?; // (batch, conv_dim)
    let x = xbc
        .narrow(1, 0, d_inner)?
        .reshape((batch, nheads, headdim))?; // (batch, nheads, headdim)
    let b = xbc
        .narrow(1, d_inner, g * d_state)?
        .reshape((batch, g, d_state))?; // (batch, ngroups, d_state)
    let c = xbc
        .narrow(1, d_inner + g * d_state, g * d_state)?
        .reshape((batch, g, d_state))?; // (batch, ngroups, d_state)
    let y = selective_state_update(
        &StateUpdateArgs {
            state: args.ssm_state,
            x: &x,
            dt: args.dt,
            a: args.a,
            b: &b,
            c: &c,
            d: args.d,
            z: None,
            dt_bias: args.dt_bias,
        },
        params,
    )?; // (batch, nheads, headdim)
    gated_rms_norm(&GatedRmsNormArgs {
        x: &y.reshape((batch, d_inner))?,
        z: Some(args.z),
        weight: args.norm_weight,
        eps: args.eps,
        group_size: d_inner / g,
        norm_before_gate: args.norm_before_gate,
    }) // (batch, d_inner)
}
