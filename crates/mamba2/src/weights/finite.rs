//! Whether a loaded weight is all finite (the loader's opt-in check, on by default in the
//! pipeline): an exponent-bit scan of contiguous CPU tensors, the tensor-op form elsewhere.

use candle_core::{DType, Tensor};

/// Whether every element of a float tensor is finite. `x * 0` is 0 for finite x and NaN for
/// NaN/inf, so a slice's sum is NaN iff one of its elements is not finite; in slices of 2^20
/// elements, so the check never holds a second copy of a whole (embedding-sized) tensor.
pub(super) fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    if let Some(finite) = cpu_all_finite(t) {
        return Ok(finite);
    }
    const SLICE: usize = 1 << 20;
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    let mut at = 0;
    while at < n {
        let len = SLICE.min(n - at);
        let s = (flat.narrow(0, at, len)? * 0.0)?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if s.is_nan() {
            return Ok(false);
        }
        at += len;
    }
    Ok(true)
}

/// [`all_finite`] on a contiguous CPU tensor, by its exponent bits (all ones = inf or NaN), in
/// parallel chunks; `None` for other devices and layouts. Why: the tensor-op form above costs
/// two passes, an allocation per slice and no vector code for 16-bit types, and measured about
/// half of a 3 GB bf16 checkpoint's 25 s load (BENCHMARKS.md, "Hybrid models on the CPU").
fn cpu_all_finite(t: &Tensor) -> Option<bool> {
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;
    /// Elements per parallel work item.
    const CHUNK: usize = 1 << 16;
    fn none_all_ones<T: Copy + Sync>(v: &[T], bits: impl Fn(T) -> u32 + Sync, mask: u32) -> bool {
        // An OR over a branch-free chunk vectorizes; `all` stops at the first bad chunk.
        v.par_chunks(CHUNK).all(|c| {
            c.iter()
                .fold(0u32, |acc, &x| acc | u32::from(bits(x) & mask == mask))
                == 0
        })
    }
    if !t.device().is_cpu() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    Some(match cpu {
        CpuStorage::F32(v) => none_all_ones(&v[start..end], f32::to_bits, 0x7f80_0000),
        CpuStorage::BF16(v) => none_all_ones(&v[start..end], |x| u32::from(x.to_bits()), 0x7f80),
        CpuStorage::F16(v) => none_all_ones(&v[start..end], |x| u32::from(x.to_bits()), 0x7c00),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The tensor-op form of [`all_finite`], which the CPU bit scan replaces there.
    fn all_finite_slow(t: &Tensor) -> bool {
        (t.to_dtype(DType::F32).unwrap() * 0.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .is_finite()
    }

    /// Every float dtype, a value at the first, a middle (past the first parallel chunk) and the
    /// last element, on whole tensors and on a narrowed view (a storage offset).
    #[test]
    fn bit_scan_agrees_with_the_tensor_ops_on_nan_and_inf() {
        let n = 3 * (1 << 16) + 5;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e6, -0.0] {
                for at in [0, 1 << 16, n / 2, n - 1] {
                    let mut v: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01 - 0.4).collect();
                    v[at] = bad;
                    let t = Tensor::from_vec(v, n, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    // 1e6 is past f16's range: inf in f16, finite in the others.
                    let want = all_finite_slow(&t);
                    assert_eq!(cpu_all_finite(&t), Some(want), "{dtype:?} {bad} at {at}");
                    assert_eq!(all_finite(&t).unwrap(), want);
                    let skip = at.min(7);
                    let view = t.narrow(0, skip, n - skip).unwrap();
                    assert_eq!(cpu_all_finite(&view), Some(all_finite_slow(&view)));
                }
            }
        }
        // Non-contiguous: the tensor-op path.
        let t = Tensor::zeros((4, 6), DType::F32, &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert_eq!(cpu_all_finite(&t), None);
        assert!(all_finite(&t).unwrap());
    }
}
