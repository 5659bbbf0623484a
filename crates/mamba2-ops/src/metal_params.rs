//! Parameter blocks of the Metal kernels in `kernels/metal/`.
//!
//! Each struct mirrors, field for field, the `constant …Params& p [[buffer(i)]]` struct of its
//! kernel family. They compile without the `metal` feature so that the MSL-on-CPU harness tests
//! (`tests/metal_harness.rs`) bind exactly the bytes the Metal dispatch binds with `setBytes`.
//! All fields are 4-byte `u32`/`f32`, so the `#[repr(C)]` layout has no padding and matches MSL's.
//! Flags are `u32` 0/1 (MSL `bool` has no fixed size in a constant struct).
//!
//! ```
//! use mamba2_ops::metal_params::{KernelParams, GatedRmsNormParams};
//! let p = GatedRmsNormParams { rows: 2, dim: 8, group_size: 4, has_z: 1, norm_before_gate: 0, eps: 1e-5 };
//! assert_eq!(p.as_bytes().len(), 24);
//! ```

/// Byte view of a parameter block, for `setBytes` (Metal) or `raw_bytes` (harness).
pub trait KernelParams: Copy + Sized + 'static {
    /// The struct's bytes, exactly as the kernel reads them.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: implemented only for the `#[repr(C)]` structs below, whose fields are all
        // 4-byte u32/f32 (no padding, every byte initialised).
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }
}

/// Threads per threadgroup of the kernels whose layout is fixed in their `.metal` header.
pub mod layout {
    /// `causal_conv1d_fwd_*`: channels per threadgroup.
    pub const CONV_CHANNELS_PER_GROUP: u32 = 64;
    /// `causal_conv1d_fwd_*`: tokens walked by one thread (sliding window in registers).
    pub const CONV_TOKENS_PER_THREAD: u32 = 32;
    /// Largest `d_conv` the conv kernels hold in registers.
    pub const MAX_D_CONV: usize = 8;
    /// `ssd_chunk_scan_*`: tokens per chunk.
    pub const SSD_CHUNK: u32 = 64;
    /// `ssd_chunk_scan_*`: headdim rows per threadgroup.
    pub const SSD_ROWS: u32 = 16;
    /// `ssd_chunk_scan_*`: threads per threadgroup (4 simdgroups).
    pub const SSD_THREADS: u32 = 128;
    /// `selective_state_update_*` / `mamba2_decode_step_*`: headdim rows (simdgroups) per group.
    pub const SSU_ROWS: u32 = 4;
    /// Largest `d_state` the decode kernels hold in registers (8 per lane).
    pub const MAX_D_STATE_DECODE: usize = 256;
}

/// Preconditions of the Metal fast paths on shapes: the dispatcher runs a kernel only when its
/// predicate holds and falls back to the reference otherwise. (Dtype and device conditions are
/// checked by the dispatcher itself.)
pub mod supports {
    use super::layout;

    /// `causal_conv1d_fwd_*` and `causal_conv1d_update_*` hold the filter in registers.
    pub fn conv1d(d_conv: usize) -> bool {
        (1..=layout::MAX_D_CONV).contains(&d_conv)
    }

    /// `ssd_chunk_scan_*`: 16-row threadgroups over headdim, 8-wide d_state tiles.
    pub fn ssd_chunk_scan(headdim: usize, d_state: usize) -> bool {
        headdim > 0
            && headdim.is_multiple_of(layout::SSD_ROWS as usize)
            && d_state > 0
            && d_state.is_multiple_of(8)
    }

    /// `selective_state_update_*`: the state row in registers, 8 elements per lane.
    pub fn state_update(d_state: usize) -> bool {
        (1..=layout::MAX_D_STATE_DECODE).contains(&d_state)
    }

    /// `mamba2_decode_step_*`: both of the above.
    pub fn decode_step(d_state: usize, d_conv: usize) -> bool {
        state_update(d_state) && conv1d(d_conv)
    }
}

/// `conv1d.metal`: `causal_conv1d_fwd_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Conv1dParams {
    pub batch: u32,
    pub seqlen: u32,
    pub channels: u32,
    pub d_conv: u32,
    pub has_bias: u32,
    pub has_init: u32,
    pub has_seq_idx: u32,
    pub silu: u32,
}

/// `conv1d.metal`: `causal_conv1d_update_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ConvUpdateParams {
    pub batch: u32,
    pub channels: u32,
    pub d_conv: u32,
    pub has_bias: u32,
    pub silu: u32,
}

/// `conv1d.metal`: `conv_states_varlen_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ConvVarlenParams {
    pub nseq: u32,
    pub channels: u32,
    pub d_conv: u32,
    pub total: u32,
}

/// `ssd.metal`: `ssd_chunk_scan_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SsdScanParams {
    pub batch: u32,
    pub seqlen: u32,
    pub nheads: u32,
    pub headdim: u32,
    pub ngroups: u32,
    pub d_state: u32,
    pub has_d: u32,
    pub has_z: u32,
    pub has_dt_bias: u32,
    pub has_init: u32,
    pub has_seq_idx: u32,
    pub dt_softplus: u32,
    /// 1 when `dt_limit` is not `(0, inf)`.
    pub dt_clamp: u32,
    pub dt_min: f32,
    pub dt_max: f32,
}

/// `state_update.metal`: `selective_state_update_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StateUpdateParams {
    pub batch: u32,
    pub nheads: u32,
    pub headdim: u32,
    pub ngroups: u32,
    pub d_state: u32,
    pub has_d: u32,
    pub has_z: u32,
    pub has_dt_bias: u32,
    pub dt_softplus: u32,
    pub dt_clamp: u32,
    pub dt_min: f32,
    pub dt_max: f32,
}

/// `decode_step.metal`: `mamba2_decode_step_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DecodeStepParams {
    pub batch: u32,
    pub nheads: u32,
    pub headdim: u32,
    pub ngroups: u32,
    pub d_state: u32,
    pub d_conv: u32,
    /// `nheads * headdim + 2 * ngroups * d_state`: channels of `xBC`.
    pub conv_dim: u32,
    pub has_conv_bias: u32,
    pub has_d: u32,
    pub has_z: u32,
    pub has_dt_bias: u32,
    pub dt_softplus: u32,
    pub dt_clamp: u32,
    pub dt_min: f32,
    pub dt_max: f32,
}

/// `rms_norm.metal`: `gated_rms_norm_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GatedRmsNormParams {
    pub rows: u32,
    pub dim: u32,
    pub group_size: u32,
    pub has_z: u32,
    pub norm_before_gate: u32,
    pub eps: f32,
}

/// `rms_norm.metal`: `rms_norm_residual_<dtype>` and `rms_norm_residual_f32res_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RmsNormResidualParams {
    pub rows: u32,
    pub dim: u32,
    pub has_residual: u32,
    pub eps: f32,
}

impl KernelParams for Conv1dParams {}
impl KernelParams for ConvUpdateParams {}
impl KernelParams for ConvVarlenParams {}
impl KernelParams for SsdScanParams {}
impl KernelParams for StateUpdateParams {}
impl KernelParams for DecodeStepParams {}
impl KernelParams for GatedRmsNormParams {}
impl KernelParams for RmsNormResidualParams {}

/// The `(min, max)` clamp of the processed time step as the kernels take it: `(flag, min, max)`.
/// `(0, inf)` means no clamp, as in [`crate::SsdParams`].
pub fn dt_clamp(dt_limit: (f64, f64)) -> (u32, f32, f32) {
    let (lo, hi) = dt_limit;
    let clamp = lo > 0.0 || hi < f64::INFINITY;
    (clamp as u32, lo as f32, hi.min(f32::MAX as f64) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_padding() {
        assert_eq!(size_of::<Conv1dParams>(), 8 * 4);
        assert_eq!(size_of::<SsdScanParams>(), 15 * 4);
        assert_eq!(size_of::<DecodeStepParams>(), 15 * 4);
        assert_eq!(size_of::<RmsNormResidualParams>(), 4 * 4);
    }

    #[test]
    fn preconditions() {
        // real configs take the fast paths
        assert!(supports::ssd_chunk_scan(64, 128) && supports::ssd_chunk_scan(64, 64));
        assert!(supports::state_update(128) && supports::decode_step(256, 4));
        assert!(supports::conv1d(4));
        // and the others fall back
        assert!(!supports::ssd_chunk_scan(24, 16) && !supports::ssd_chunk_scan(64, 12));
        assert!(!supports::state_update(257) && !supports::conv1d(9) && !supports::conv1d(0));
        assert!(!supports::decode_step(128, 9));
    }

    #[test]
    fn clamp_flag() {
        assert_eq!(dt_clamp((0.0, f64::INFINITY)).0, 0);
        assert_eq!(dt_clamp((0.001, 0.1)), (1, 0.001, 0.1));
    }
}
