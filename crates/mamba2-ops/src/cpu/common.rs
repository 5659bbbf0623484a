//! Shared pieces of the CPU kernels: dtype-erased strided views of input tensors, output buffers
//! written in parallel, vectorizable f32 math, and the f32 GEMM.
//!
//! Every kernel computes in f32. Inputs are read a contiguous run at a time (a row of the last
//! dimension) and converted in bulk (`half`'s slice conversions use F16C when available), so the
//! dtype is dispatched once per row instead of once per element, and mixed input dtypes need no
//! extra monomorphisation.

use crate::options::Prefetch;
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};

/// A tensor whose last dimension has unit stride (other strides arbitrary): the kernels read it
/// row by row without a copy. Anything else is made contiguous first.
pub(crate) fn unit_last(t: &Tensor) -> candle_core::Result<Tensor> {
    let last_ok = match (t.dims().last(), t.stride().last()) {
        (Some(&n), Some(&s)) => n <= 1 || s == 1,
        _ => true,
    };
    if last_ok {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Hints the CPU to fetch the 64-byte lines that lie `ahead` bytes past the `n` elements at `p`
/// (one prefetch per line, into the level and at the distance `policy` says, `ahead` when it
/// names none; nothing off x86-64). For loops
/// that stream a large buffer once (decode weights, the SSM state): the hardware prefetchers
/// stop at each 4 KiB page, software prefetch does not. Prefetches never fault and the address
/// is formed with wrapping arithmetic, so running past the end of the buffer is harmless.
#[inline(always)]
pub(crate) fn prefetch_ahead<T>(policy: Prefetch, p: *const T, n: usize, ahead: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        let (l1, dist) = match policy {
            Prefetch::Off => return,
            Prefetch::L1(d) => (true, d),
            Prefetch::L2(d) => (false, d),
        };
        let ahead = if dist > 0 { dist } else { ahead };
        let base = (p as *const i8).wrapping_add(ahead);
        let bytes = n * std::mem::size_of::<T>();
        let mut off = 0;
        while off < bytes {
            // SAFETY: SSE is part of the x86-64 baseline; a prefetch reads nothing
            // architecturally and cannot fault.
            unsafe {
                if l1 {
                    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(off))
                } else {
                    _mm_prefetch::<_MM_HINT_T1>(base.wrapping_add(off))
                }
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (policy, p, n, ahead);
}

/// Borrowed CPU data of one float dtype.
#[derive(Clone, Copy)]
pub(crate) enum Data<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

/// A read-only strided view: element `idx` of a rank-`r` tensor (padded on the left to rank 4)
/// lives at `off + sum(idx[i] * stride[i])`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    data: Data<'a>,
    off: usize,
    stride: [usize; 4],
}

impl<'a> View<'a> {
    /// `None` for storage that is not CPU float storage.
    pub(crate) fn new(storage: &'a Storage, layout: &Layout) -> Option<Self> {
        let Storage::Cpu(cpu) = storage else {
            return None;
        };
        let data = match cpu {
            CpuStorage::F32(v) => Data::F32(v),
            CpuStorage::F16(v) => Data::F16(v),
            CpuStorage::BF16(v) => Data::Bf16(v),
            _ => return None,
        };
        let s = layout.stride();
        if s.len() > 4 {
            return None;
        }
        let mut stride = [0usize; 4];
        stride[4 - s.len()..].copy_from_slice(s);
        Some(Self {
            data,
            off: layout.start_offset(),
            stride,
        })
    }

    /// Flat index of a (left-padded) rank-4 position.
    #[inline]
    pub(crate) fn at(&self, i: [usize; 4]) -> usize {
        self.off
            + i[0] * self.stride[0]
            + i[1] * self.stride[1]
            + i[2] * self.stride[2]
            + i[3] * self.stride[3]
    }

    /// Converts `dst.len()` consecutive elements starting at flat index `start` into `dst`.
    #[inline]
    pub(crate) fn load(&self, start: usize, dst: &mut [f32]) {
        let end = start + dst.len();
        match self.data {
            Data::F32(s) => dst.copy_from_slice(&s[start..end]),
            Data::F16(s) => s[start..end].convert_to_f32_slice(dst),
            // Exact: bf16 is the top half of an f32. `half`'s slice conversion is a scalar loop
            // (it also quiets signalling NaNs, a difference no result can show); this vectorizes.
            Data::Bf16(s) => s[start..end]
                .iter()
                .zip(dst)
                .for_each(|(v, d)| *d = f32::from_bits((v.to_bits() as u32) << 16)),
        }
    }

    /// The underlying buffer, for kernels that read it in its own dtype.
    #[inline]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn data(&self) -> Data<'a> {
        self.data
    }

    /// One element (for per-head / per-channel parameters, never in an inner loop).
    #[inline]
    pub(crate) fn get(&self, i: [usize; 4]) -> f32 {
        let k = self.at(i);
        match self.data {
            Data::F32(s) => s[k],
            Data::F16(s) => s[k].to_f32(),
            Data::Bf16(s) => s[k].to_f32(),
        }
    }

    /// The elements `start..start + len` as an f32 slice when the data is f32 (no conversion).
    #[inline]
    pub(crate) fn f32_slice(&self, start: usize, len: usize) -> Option<&'a [f32]> {
        match self.data {
            Data::F32(s) => Some(&s[start..start + len]),
            _ => None,
        }
    }

    pub(crate) fn is_contiguous_from(&self, rank: usize, dims: &[usize]) -> bool {
        let mut expect = 1;
        for i in (0..rank).rev() {
            if dims[i] > 1 && self.stride[4 - rank + i] != expect {
                return false;
            }
            expect *= dims[i];
        }
        true
    }

    /// Address range of the whole underlying buffer, to detect aliasing with an in-place target.
    pub(crate) fn addr_range(&self) -> std::ops::Range<usize> {
        match self.data {
            Data::F32(s) => addr(s),
            Data::F16(s) => addr(s),
            Data::Bf16(s) => addr(s),
        }
    }
}

pub(crate) fn addr<T>(s: &[T]) -> std::ops::Range<usize> {
    let r = s.as_ptr_range();
    r.start as usize..r.end as usize
}

pub(crate) fn overlaps(a: &std::ops::Range<usize>, b: &std::ops::Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Binds `$v` to a [`View`] of tensor `$t` (made unit-stride in its last dimension when needed);
/// returns `Ok(None)` from the enclosing function when the storage is not CPU float storage.
macro_rules! view {
    ($v:ident = $t:expr) => {
        let owned = $crate::cpu::common::unit_last($t)?;
        let (guard, layout) = owned.storage_and_layout();
        let Some($v) = $crate::cpu::common::View::new(&guard, layout) else {
            return Ok(None);
        };
    };
}
pub(crate) use view;

/// Same as [`view!`] for an optional tensor.
macro_rules! view_opt {
    ($v:ident = $t:expr) => {
        let owned = $t.map($crate::cpu::common::unit_last).transpose()?;
        let guard = owned.as_ref().map(|t| t.storage_and_layout());
        let $v = match &guard {
            Some((g, l)) => match $crate::cpu::common::View::new(g, l) {
                Some(v) => Some(v),
                None => return Ok(None),
            },
            None => None,
        };
    };
}
pub(crate) use view_opt;

/// An output buffer of one float dtype. In debug builds (and so in the tests) it starts as NaN,
/// so any element a kernel forgets to write shows up in the parity tests.
pub(crate) enum OutVec {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl OutVec {
    pub(crate) fn new(dtype: DType, len: usize) -> Option<Self> {
        let poison = cfg!(debug_assertions);
        Some(match dtype {
            DType::F32 => Self::F32(vec![if poison { f32::NAN } else { 0.0 }; len]),
            DType::F16 => Self::F16(vec![if poison { f16::NAN } else { f16::ZERO }; len]),
            DType::BF16 => Self::Bf16(vec![if poison { bf16::NAN } else { bf16::ZERO }; len]),
            _ => return None,
        })
    }

    /// A raw writer for kernels that fill disjoint parts of the buffer from several threads.
    pub(crate) fn writer(&mut self) -> OutPtr {
        match self {
            Self::F32(v) => OutPtr::F32(v.as_mut_ptr(), v.len()),
            Self::F16(v) => OutPtr::F16(v.as_mut_ptr(), v.len()),
            Self::Bf16(v) => OutPtr::Bf16(v.as_mut_ptr(), v.len()),
        }
    }

    pub(crate) fn into_tensor(self, shape: &[usize]) -> candle_core::Result<Tensor> {
        let dev = candle_core::Device::Cpu;
        match self {
            Self::F32(v) => Tensor::from_vec(v, shape, &dev),
            Self::F16(v) => Tensor::from_vec(v, shape, &dev),
            Self::Bf16(v) => Tensor::from_vec(v, shape, &dev),
        }
    }
}

/// Raw pointer into an [`OutVec`] (with its length, for bounds checks).
#[derive(Clone, Copy)]
pub(crate) enum OutPtr {
    F32(*mut f32, usize),
    F16(*mut f16, usize),
    Bf16(*mut bf16, usize),
}

// SAFETY: the buffer outlives every parallel section that uses the pointer (the `OutVec` is only
// turned into a tensor after the section joins), and callers write disjoint ranges.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Converts `src` into the buffer at flat index `start`.
    ///
    /// # Safety
    /// No other thread may access `start..start + src.len()` concurrently.
    #[inline]
    pub(crate) unsafe fn store(&self, start: usize, src: &[f32]) {
        let n = src.len();
        match *self {
            Self::F32(p, len) => {
                assert!(start + n <= len);
                std::slice::from_raw_parts_mut(p.add(start), n).copy_from_slice(src)
            }
            Self::F16(p, len) => {
                assert!(start + n <= len);
                std::slice::from_raw_parts_mut(p.add(start), n).convert_from_f32_slice(src)
            }
            Self::Bf16(p, len) => {
                assert!(start + n <= len);
                std::slice::from_raw_parts_mut(p.add(start), n).convert_from_f32_slice(src)
            }
        }
    }
}

thread_local! {
    /// Per-thread f32 scratch reused across calls, so that a decode step allocates no
    /// temporaries after the first token.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch (contents unspecified). The buffer is taken
/// out of the thread-local for the duration, so a nested call (a rayon worker stealing another
/// op's job while it waits) gets a fresh buffer instead of a borrow panic.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut v = SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    if v.len() < len {
        v.resize(len, 0.0);
    }
    let r = f(&mut v[..len]);
    SCRATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.len() < v.len() {
            *slot = v;
        }
    });
    r
}

/// `exp(x)` in f32, branch-free so that loops over it vectorize: 2^n · p(r) with
/// `x = n ln2 + r`, `|r| <= ln2 / 2`, and a degree-6 minimax polynomial for `exp(r)` (about 1 ulp).
/// Returns 0 below the smallest normal result, and saturates at `exp(88)`.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split into a part exact in f32 and a remainder, so `x - n ln2` loses no bits.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = e * scale;
    if x < -87.0 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// `v * sigmoid(v)`.
#[inline(always)]
pub(crate) fn silu_f32(v: f32) -> f32 {
    v / (1.0 + exp_f32(-v))
}

/// `log(1 + exp(v))` as in the reference: `max(v, 0) + log1p(exp(-|v|))`.
#[inline]
pub(crate) fn softplus_f32(v: f32) -> f32 {
    v.max(0.0) + (-v.abs()).exp().ln_1p()
}

/// `dst (m×n) = alpha·dst + beta·lhs (m×k) · rhs (k×n)`, f32, each matrix given by its row and
/// column strides (in elements). `alpha = None` overwrites `dst` (it is not read, so it may hold
/// garbage). Single-threaded: the callers already run one GEMM per rayon task.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    alpha: Option<f32>,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        match alpha {
            None => {
                for i in 0..m {
                    for j in 0..n {
                        dst[i * dst_rs + j * dst_cs] = 0.0;
                    }
                }
            }
            Some(a) => {
                for i in 0..m {
                    for j in 0..n {
                        dst[i * dst_rs + j * dst_cs] *= a;
                    }
                }
            }
        }
        return;
    }
    // The last element each matrix touches must be inside its slice.
    assert!((m - 1) * dst_rs + (n - 1) * dst_cs < dst.len());
    assert!((m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len());
    assert!((k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len());
    // SAFETY: the asserts above bound every access; the slices do not overlap (`dst` is a
    // unique borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            alpha.is_some(),
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            alpha.unwrap_or(0.0),
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Index of the run (maximal stretch of equal ids) each position belongs to; `None` without
/// `seq_idx`. Runs, not ids, decide what may interact: a repeated id after another one is a new
/// sequence, as in the reference.
pub(crate) fn run_ids(seq_idx: Option<&Tensor>) -> candle_core::Result<Option<Vec<Vec<u32>>>> {
    let Some(s) = seq_idx else { return Ok(None) };
    let rows = s.to_vec2::<u32>()?;
    Ok(Some(
        rows.into_iter()
            .map(|row| {
                let mut run = 0u32;
                let mut out = Vec::with_capacity(row.len());
                for (t, id) in row.iter().enumerate() {
                    if t > 0 && *id != row[t - 1] {
                        run += 1;
                    }
                    out.push(run);
                }
                out
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_f32(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
