//! The Metal Shading Language sources, one constant per file of `metal/`.
//!
//! ```
//! // Every file is listed once in `SOURCES`, by the name the dispatch plans use.
//! let names: Vec<&str> = mamba2_kernels::metal::SOURCES.iter().map(|(n, _)| *n).collect();
//! assert!(names.contains(&"conv1d.metal"));
//! assert_eq!(mamba2_kernels::metal::source("conv1d.metal"), Some(mamba2_kernels::metal::CONV1D));
//! ```

/// `metal/activation.metal`: SwiGLU and ReLU² MLP activations.
pub const ACTIVATION: &str = include_str!("../metal/activation.metal");
/// `metal/attention.metal`: causal GQA attention (decode, split merge, prefill).
pub const ATTENTION: &str = include_str!("../metal/attention.metal");
/// `metal/conv1d.metal`: causal depthwise conv1d (prefill, decode update, varlen states).
pub const CONV1D: &str = include_str!("../metal/conv1d.metal");
/// `metal/decode_step.metal`: the fused Mamba-2 mixer decode step.
pub const DECODE_STEP: &str = include_str!("../metal/decode_step.metal");
/// `metal/embedding.metal`: embedding rows of token ids on the device.
pub const EMBEDDING: &str = include_str!("../metal/embedding.metal");
/// `metal/matvec.metal`: matrix-vector projections for a few rows (decode).
pub const MATVEC: &str = include_str!("../metal/matvec.metal");
/// `metal/rms_norm.metal`: grouped gated RMSNorm and residual-add + RMSNorm.
pub const RMS_NORM: &str = include_str!("../metal/rms_norm.metal");
/// `metal/rotary.metal`: rotary position embedding (HF `rotate_half`, partial rotation).
pub const ROTARY: &str = include_str!("../metal/rotary.metal");
/// `metal/ssd.metal`: SSD chunked scan (the Mamba-2 prefill).
pub const SSD: &str = include_str!("../metal/ssd.metal");
/// `metal/state_update.metal`: selective state update (one decode step).
pub const STATE_UPDATE: &str = include_str!("../metal/state_update.metal");

/// Every source by its file name.
pub const SOURCES: [(&str, &str); 10] = [
    ("activation.metal", ACTIVATION),
    ("attention.metal", ATTENTION),
    ("conv1d.metal", CONV1D),
    ("decode_step.metal", DECODE_STEP),
    ("embedding.metal", EMBEDDING),
    ("matvec.metal", MATVEC),
    ("rms_norm.metal", RMS_NORM),
    ("rotary.metal", ROTARY),
    ("ssd.metal", SSD),
    ("state_update.metal", STATE_UPDATE),
];

/// The source of the file `name` (e.g. `"ssd.metal"`), `None` for a name not shipped.
pub fn source(name: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}
