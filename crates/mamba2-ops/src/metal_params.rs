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
    /// `causal_attention_*`: threads per threadgroup (4 simdgroups).
    pub const ATTN_THREADS: u32 = 128;
    /// `causal_attention_decode_*`: query rows (head × position) per threadgroup.
    pub const ATTN_DECODE_ROWS: u32 = 4;
    /// `causal_attention_prefill_*`: query rows per threadgroup (8 per simdgroup).
    pub const ATTN_PREFILL_ROWS: u32 = 32;
    /// Largest `q_len` the attention dispatch sends to the decode kernel.
    pub const ATTN_DECODE_MAX_Q: usize = 8;
    /// Largest head_dim of the attention variants without the `_hd256` suffix.
    pub const ATTN_SMALL_HEAD_DIM: usize = 128;
    /// Largest head_dim of any attention variant.
    pub const ATTN_MAX_HEAD_DIM: usize = 256;
    /// Decode: the key splits aim at this many threadgroups in all ...
    pub const ATTN_TARGET_GROUPS: usize = 256;
    /// ... with at least this many keys per split ...
    pub const ATTN_MIN_SPLIT_KEYS: usize = 128;
    /// ... and at most this many splits.
    pub const ATTN_MAX_SPLITS: usize = 64;
    /// `rotary_embedding_*`, `swiglu_*`, `relu_squared_*`: threads per threadgroup.
    pub const ELEMENTWISE_THREADS: u32 = 256;
    /// `linear_matvec_*`: output rows per simdgroup.
    pub const MV_OUTS_PER_SIMD: u32 = 4;
    /// `linear_matvec_*`: simdgroups per threadgroup.
    pub const MV_SIMDS: u32 = 4;
    /// `linear_matvec_*`: most activation rows per dispatch (decode batches); more rows take
    /// the GEMM.
    pub const MV_MAX_ROWS: usize = 8;
    /// `linear_matvec_gated_norm_*`: most norm groups (their inverse RMS in threadgroup memory).
    pub const MV_MAX_GROUPS: usize = 8;
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

    /// `causal_attention_decode_*`: head_dim in registers, 8 elements per lane at most.
    pub fn attention_decode(head_dim: usize) -> bool {
        (1..=layout::ATTN_MAX_HEAD_DIM).contains(&head_dim)
    }

    /// `linear_matvec_*`: a few activation rows (the accumulators live in registers).
    pub fn matvec(rows: usize) -> bool {
        (1..=layout::MV_MAX_ROWS).contains(&rows)
    }

    /// `linear_matvec_gated_norm_*`: [`matvec`] rows, and at most
    /// [`layout::MV_MAX_GROUPS`] norm groups dividing in_features.
    pub fn matvec_gated_norm(rows: usize, k: usize, group_size: usize) -> bool {
        matvec(rows)
            && group_size > 0
            && k.is_multiple_of(group_size)
            && k / group_size <= layout::MV_MAX_GROUPS
    }

    /// `causal_attention_prefill_*`: head_dim in 8-wide simdgroup-matrix tiles.
    pub fn attention_prefill(head_dim: usize) -> bool {
        attention_decode(head_dim) && head_dim.is_multiple_of(8)
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
    /// Row strides in elements of `xbc`, `dt` and `z` (views of one in-projection row).
    pub xbc_stride: u32,
    pub dt_stride: u32,
    pub z_stride: u32,
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

/// `attention.metal`: `causal_attention_{decode,merge,prefill}[_hd256]_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttentionParams {
    pub batch: u32,
    pub q_len: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub kv_len: u32,
    /// Strides of k in elements: batch, position, head (the channel stride is 1).
    pub k_sb: u32,
    pub k_st: u32,
    pub k_sh: u32,
    /// Strides of v in elements.
    pub v_sb: u32,
    pub v_st: u32,
    pub v_sh: u32,
    /// Decode: key ranges per (batch, kv head, row block), the grid's x; 1 for prefill.
    pub n_splits: u32,
    /// Decode: keys per range.
    pub split_len: u32,
    pub scale: f32,
}

/// `rotary.metal`: `rotary_embedding_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RotaryParams {
    pub batch: u32,
    pub seqlen: u32,
    pub n_heads: u32,
    pub head_dim: u32,
    pub rotary_dim: u32,
    pub position_offset: u32,
    /// Strides of x in elements: batch, token, head (the channel stride is 1).
    pub x_sb: u32,
    pub x_st: u32,
    pub x_sh: u32,
}

/// `activation.metal`: `swiglu_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SwigluParams {
    pub rows: u32,
    /// Output columns (half the input's).
    pub n: u32,
}

/// `matvec.metal`: `linear_matvec_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MatvecParams {
    pub rows: u32,
    pub k: u32,
    pub n_out: u32,
    pub has_bias: u32,
}

/// `matvec.metal`: `linear_matvec_gated_norm_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MatvecGatedNormParams {
    pub rows: u32,
    pub k: u32,
    pub n_out: u32,
    pub has_bias: u32,
    pub group_size: u32,
    pub norm_before_gate: u32,
    pub eps: f32,
    /// Row stride of `z` in elements (a view of the in-projection output).
    pub z_stride: u32,
}

/// `embedding.metal`: `embedding_gather_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EmbeddingParams {
    pub n: u32,
    pub d: u32,
    pub vocab: u32,
}

/// `activation.metal`: `relu_squared_<dtype>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ReluSquaredParams {
    pub count: u32,
}

impl KernelParams for Conv1dParams {}
impl KernelParams for ConvUpdateParams {}
impl KernelParams for ConvVarlenParams {}
impl KernelParams for SsdScanParams {}
impl KernelParams for StateUpdateParams {}
impl KernelParams for DecodeStepParams {}
impl KernelParams for GatedRmsNormParams {}
impl KernelParams for RmsNormResidualParams {}
impl KernelParams for AttentionParams {}
impl KernelParams for RotaryParams {}
impl KernelParams for SwigluParams {}
impl KernelParams for ReluSquaredParams {}
impl KernelParams for MatvecParams {}
impl KernelParams for EmbeddingParams {}
impl KernelParams for MatvecGatedNormParams {}

/// Sizes of a `causal_attention` call, for [`AttentionShape::launch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub q_len: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub kv_len: usize,
}

/// The kernel, grid and key splits of one attention dispatch (threadgroups of
/// [`layout::ATTN_THREADS`] threads). When `n_splits > 1` the decode kernel writes partial
/// results and `causal_attention_merge_*` runs over [`AttentionLaunch::merge_grid`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionLaunch {
    /// Kernel name without its `_<dtype>` suffix.
    pub kernel: &'static str,
    /// Threadgroups per grid.
    pub groups: [usize; 3],
    /// Decode: key ranges (the grid's x); 1 for prefill.
    pub n_splits: usize,
    /// Decode: keys per range; `kv_len` for prefill.
    pub split_len: usize,
}

impl AttentionShape {
    /// Query rows per kv head (the query heads of a group times the positions).
    pub fn rows(&self) -> usize {
        self.n_heads / self.n_kv_heads * self.q_len
    }

    /// What the Metal dispatch runs: the decode kernel for `q_len <= 8` (and for any `q_len`
    /// when head_dim is not a multiple of 8), the prefill kernel otherwise; `None` (the
    /// reference runs) for an empty or unsupported shape.
    pub fn launch(&self) -> Option<AttentionLaunch> {
        if self.q_len <= layout::ATTN_DECODE_MAX_Q || !supports::attention_prefill(self.head_dim) {
            let base = self.decode(1)?.groups.iter().product::<usize>();
            let want = layout::ATTN_TARGET_GROUPS.div_ceil(base);
            let most = self.kv_len.div_ceil(layout::ATTN_MIN_SPLIT_KEYS);
            self.decode(want.min(most).clamp(1, layout::ATTN_MAX_SPLITS))
        } else {
            self.prefill()
        }
    }

    fn valid(&self) -> bool {
        self.batch > 0
            && self.q_len > 0
            && self.n_kv_heads > 0
            && self.n_heads.is_multiple_of(self.n_kv_heads)
            && self.n_heads > 0
            && self.kv_len >= self.q_len
    }

    /// The decode kernel with `n_splits` key ranges (fewer when the keys run out first).
    pub fn decode(&self, n_splits: usize) -> Option<AttentionLaunch> {
        if !self.valid() || !supports::attention_decode(self.head_dim) || n_splits == 0 {
            return None;
        }
        let split_len = self.kv_len.div_ceil(n_splits);
        let n_splits = self.kv_len.div_ceil(split_len);
        let kernel = if self.head_dim <= layout::ATTN_SMALL_HEAD_DIM {
            "causal_attention_decode"
        } else {
            "causal_attention_decode_hd256"
        };
        let row_blocks = self.rows().div_ceil(layout::ATTN_DECODE_ROWS as usize);
        Some(AttentionLaunch {
            kernel,
            groups: [n_splits, self.n_kv_heads * row_blocks, self.batch],
            n_splits,
            split_len,
        })
    }

    /// The prefill kernel.
    pub fn prefill(&self) -> Option<AttentionLaunch> {
        if !self.valid() || !supports::attention_prefill(self.head_dim) {
            return None;
        }
        let kernel = if self.head_dim <= layout::ATTN_SMALL_HEAD_DIM {
            "causal_attention_prefill"
        } else {
            "causal_attention_prefill_hd256"
        };
        let blocks = self.rows().div_ceil(layout::ATTN_PREFILL_ROWS as usize);
        Some(AttentionLaunch {
            kernel,
            groups: [blocks, self.n_kv_heads, self.batch],
            n_splits: 1,
            split_len: self.kv_len,
        })
    }

    /// Grid and threadgroup width of `causal_attention_merge_*`: one thread per output element.
    pub fn merge_grid(&self) -> ([usize; 3], usize) {
        let tx = self.head_dim.next_multiple_of(32).min(256);
        let rows = self.batch * self.q_len * self.n_heads;
        ([self.head_dim.div_ceil(tx), rows, 1], tx)
    }
}

/// `inv_freq[c] = 1 / theta^(2c / rotary_dim)` in f32, as torch computes it: the table the
/// rotary kernel reads.
pub fn rotary_inv_freq(rotary_dim: usize, theta: f64) -> Vec<f32> {
    crate::rotary::inv_freq(rotary_dim, theta)
}

/// Threadgroup shape and grid (in threadgroups) of `rotary_embedding_*` for `items` work items
/// per head row (`rotary_dim / 2 + head_dim - rotary_dim`) and `rows` head rows.
pub fn rotary_grid(items: usize, rows: usize) -> ([usize; 3], [usize; 3]) {
    let total = layout::ELEMENTWISE_THREADS as usize;
    let tx = items.next_multiple_of(32).min(total);
    let ty = (total / tx).max(1);
    ([items.div_ceil(tx), rows.div_ceil(ty), 1], [tx, ty, 1])
}

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
        assert_eq!(size_of::<DecodeStepParams>(), 18 * 4);
        assert_eq!(size_of::<RmsNormResidualParams>(), 4 * 4);
        assert_eq!(size_of::<AttentionParams>(), 15 * 4);
        assert_eq!(size_of::<RotaryParams>(), 9 * 4);
    }

    #[test]
    fn attention_launches() {
        let shape = |q_len, n_heads, n_kv_heads, head_dim, kv_len| AttentionShape {
            batch: 1,
            q_len,
            n_heads,
            n_kv_heads,
            head_dim,
            kv_len,
        };
        // Nemotron-H-8B decode at 4k context: 8 groups, split 32 ways (128 keys each)
        let l = shape(1, 32, 8, 128, 4096).launch().unwrap();
        assert_eq!(l.kernel, "causal_attention_decode");
        assert_eq!((l.groups, l.n_splits, l.split_len), ([32, 8, 1], 32, 128));
        // a short context is not split below 128 keys per range
        let l = shape(1, 32, 8, 128, 200).launch().unwrap();
        assert_eq!((l.n_splits, l.split_len), (2, 100));
        // prefill: 32 rows per block (8 positions x 4 heads)
        let l = shape(100, 32, 8, 128, 100).launch().unwrap();
        assert_eq!(
            (l.kernel, l.groups),
            ("causal_attention_prefill", [13, 8, 1])
        );
        assert_eq!(
            shape(9, 4, 4, 256, 9).launch().unwrap().kernel,
            "causal_attention_prefill_hd256"
        );
        // head_dim 36: the decode kernel for any q_len; head_dim 320: the reference
        assert_eq!(
            shape(50, 4, 2, 36, 50).launch().unwrap().kernel,
            "causal_attention_decode"
        );
        assert!(shape(1, 4, 2, 320, 5).launch().is_none());
        assert!(shape(1, 4, 3, 64, 5).launch().is_none());
        assert_eq!(shape(3, 2, 1, 64, 5).merge_grid(), ([1, 6, 1], 64));
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
        assert!(supports::attention_prefill(80) && supports::attention_prefill(256));
        assert!(supports::attention_decode(36) && !supports::attention_prefill(36));
        assert!(!supports::attention_decode(0) && !supports::attention_decode(264));
    }

    #[test]
    fn clamp_flag() {
        assert_eq!(dt_clamp((0.0, f64::INFINITY)).0, 0);
        assert_eq!(dt_clamp((0.001, 0.1)), (1, 0.001, 0.1));
    }
}
