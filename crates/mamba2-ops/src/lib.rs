//! Mamba-2 ops for Candle.
//!
//! Every op has a plain-tensor reference, named `*_slow` as in `candle-nn`, that reads like the
//! paper and is the spec for the fast paths. The public entry points (`causal_conv1d`,
//! `ssd_chunk_scan`, ...) dispatch on the device of their input: a fast path when one is compiled
//! in and its preconditions hold, the reference otherwise.
//!
//! The attention layers and MLPs of the hybrid models (Granite-4.0-H, Nemotron-H, Falcon-H1,
//! Bamba) use [`causal_attention`], [`rotary_embedding`], [`swiglu`] and [`relu_squared`], with
//! CPU, CUDA and Metal fast paths.
//!
//! Conventions shared by all ops:
//! - activations are `(batch, seqlen, ...)` and may be f32, f16 or bf16;
//! - recurrent state (conv state and SSM state) is always f32, and so is all accumulation;
//! - `a` is the per-head decay `A = -exp(A_log)`, in f32.
//!
//! ```
//! use candle_core::{Device, DType, Tensor};
//! use mamba2_ops::{gated_rms_norm, GatedRmsNormArgs};
//! let dev = Device::Cpu;
//! let y = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev)?; // (batch, seqlen, d_inner)
//! let z = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev)?;
//! let w = Tensor::ones(8, DType::F32, &dev)?;
//! let out = gated_rms_norm(&GatedRmsNormArgs { x: &y, z: Some(&z), weight: &w, eps: 1e-5, group_size: 4, norm_before_gate: false })?;
//! assert_eq!(out.dims(), &[2, 5, 8]);
//! # Ok::<(), mamba2_ops::OpError>(())
//! ```

pub mod activation;
pub mod attention;
mod check;
pub mod conv1d;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod decode_step;
pub mod embedding;
mod error;
pub mod linear;
#[cfg(feature = "metal")]
mod metal;
pub mod metal_params;
pub mod metal_plan;
pub mod metal_support;
pub mod moe;
pub mod moe_quantized;
pub mod options;
pub mod quantized;
pub mod rms_norm;
pub mod rotary;
pub mod ssd;
pub mod state_update;

pub use activation::{
    relu_squared, relu_squared_slow, relu_squared_with, swiglu, swiglu_slow, swiglu_with,
};
pub use attention::{
    causal_attention, causal_attention_slow, causal_attention_with, AttentionArgs,
};
pub use conv1d::{
    causal_conv1d, causal_conv1d_slow, causal_conv1d_update, causal_conv1d_update_slow,
    causal_conv1d_update_with, causal_conv1d_with, conv_states_varlen, conv_states_varlen_slow,
    conv_states_varlen_with, Conv1dArgs,
};
#[doc(hidden)]
pub use cpu::quantized::{q8_0_dot_both, q8_0_prefill_rounds_activations};
#[doc(hidden)]
pub use cpu::{fast_path_count, fast_path_tier};
#[cfg(feature = "cuda")]
pub use cuda::launch_count as cuda_launch_count;
/// A decode step captured as one CUDA graph (see the module docs of `cuda/graph.rs`).
#[cfg(feature = "cuda")]
pub mod cuda_graph {
    pub use crate::cuda::graph::{
        ConvShift, ResidualEpilogue, RowScale, StepGraph, StepScratch, StepStream,
    };
}
pub use decode_step::{
    mixer_decode_step, mixer_decode_step_out, mixer_decode_step_out_slow, mixer_decode_step_slow,
    mixer_decode_step_with, DecodeStepArgs,
};
pub use embedding::{embedding, embedding_slow};
pub use error::{OpError, Result};
pub use linear::{linear, linear_slow, linear_with};
pub use moe::{
    moe_experts, moe_experts_path, moe_experts_slow, moe_experts_with, moe_route, moe_route_slow,
    moe_route_with, ExpertActivation, ExpertsPath, MoeExpertsArgs, MoeRouteArgs, MoeRouting,
};
pub use moe_quantized::{
    moe_experts_quantized, moe_experts_quantized_path, moe_experts_quantized_slow,
    MoeQuantizedExpertsArgs, QuantizedExpert,
};
pub use quantized::{
    quantized_embedding, quantized_embedding_slow, quantized_linear, quantized_linear_slow,
    quantized_linear_with, QuantizedMatrix, SharedBytes,
};
pub use rms_norm::{
    gated_rms_norm, gated_rms_norm_slow, gated_rms_norm_with, rms_norm_residual,
    rms_norm_residual_slow, rms_norm_residual_with, GatedRmsNormArgs,
};
pub use rotary::{rotary_embedding, rotary_embedding_slow, rotary_embedding_with, RotaryArgs};
pub use ssd::{ssd_chunk_scan, ssd_chunk_scan_slow, ssd_chunk_scan_with, SsdArgs, SsdParams};
pub use state_update::{
    selective_state_update, selective_state_update_slow, selective_state_update_with,
    StateUpdateArgs,
};

/// Which implementation the dispatcher should use. `Auto` picks the fast path for the device
/// when its preconditions hold; `Reference` forces the plain-tensor reference (tests, debugging).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    #[default]
    Auto,
    Reference,
}

/// Calls the fast path of the input's device when `backend` allows it and the fast path accepts
/// the arguments (`Some`), the reference otherwise. Metal runs the plans of [`metal_plan`]; so
/// does the CPU while a test emulates Metal ([`metal_plan::emulate_on_cpu`]).
macro_rules! dispatch {
    // An op whose CPU side is its reference (composed of other ops' dispatchers).
    ($backend:expr, $device:expr, $name:ident ( $($arg:expr),* ), $slow:expr, no_cpu_kernel) => {{
        let fast = match ($backend, $device) {
            ($crate::Backend::Reference, _) => None,
            (_, candle_core::Device::Cpu) => match $crate::metal_plan::emulated() {
                Some(ex) => $crate::metal_plan::$name(&*ex, $($arg),*)?,
                None => None,
            },
            #[cfg(feature = "cuda")]
            (_, candle_core::Device::Cuda(_)) => $crate::cuda::$name($($arg),*)?,
            #[cfg(feature = "metal")]
            (_, candle_core::Device::Metal(d)) => {
                $crate::metal_plan::$name(&$crate::metal::MetalExecutor::new(d), $($arg),*)?
            }
            #[allow(unreachable_patterns)]
            _ => None,
        };
        match fast {
            Some(out) => Ok(out),
            None => $slow,
        }
    }};
    // An op with a Metal plan only: the reference (composed of other ops' dispatchers)
    // elsewhere.
    ($backend:expr, $device:expr, $name:ident ( $($arg:expr),* ), $slow:expr, metal_only) => {{
        let fast = match ($backend, $device) {
            ($crate::Backend::Reference, _) => None,
            (_, candle_core::Device::Cpu) => match $crate::metal_plan::emulated() {
                Some(ex) => $crate::metal_plan::$name(&*ex, $($arg),*)?,
                None => None,
            },
            #[cfg(feature = "metal")]
            (_, candle_core::Device::Metal(d)) => {
                $crate::metal_plan::$name(&$crate::metal::MetalExecutor::new(d), $($arg),*)?
            }
            #[allow(unreachable_patterns)]
            _ => None,
        };
        match fast {
            Some(out) => Ok(out),
            None => $slow,
        }
    }};
    ($backend:expr, $device:expr, $name:ident ( $($arg:expr),* ), $slow:expr) => {{
        let fast = match ($backend, $device) {
            ($crate::Backend::Reference, _) => None,
            (_, candle_core::Device::Cpu) => match $crate::metal_plan::emulated() {
                Some(ex) => $crate::metal_plan::$name(&*ex, $($arg),*)?,
                None => $crate::cpu::$name($($arg),*)?,
            },
            #[cfg(feature = "cuda")]
            (_, candle_core::Device::Cuda(_)) => $crate::cuda::$name($($arg),*)?,
            #[cfg(feature = "metal")]
            (_, candle_core::Device::Metal(d)) => {
                $crate::metal_plan::$name(&$crate::metal::MetalExecutor::new(d), $($arg),*)?
            }
            #[allow(unreachable_patterns)]
            _ => None,
        };
        match fast {
            Some(out) => Ok(out),
            None => $slow,
        }
    }};
}
pub(crate) use dispatch;
