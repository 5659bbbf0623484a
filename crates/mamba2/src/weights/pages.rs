//! Host-memory handling of loaded weights: the mapped file's pages are released once a tensor
//! is copied out of them, and large CPU tensors are moved into memory advised for transparent
//! huge pages. Both are best effort: `madvise` on Unix (the huge-page advice on Linux only);
//! elsewhere they do nothing.

use candle_core::Tensor;
#[cfg(target_os = "linux")]
use candle_core::{DType, Device};
use memmap2::Mmap;

/// A large CPU tensor moved into memory advised for transparent huge pages (Linux), before the
/// first touch, so the kernel backs it with 2 MiB pages where it is configured to on request
/// (`transparent_hugepage=madvise`, the common default). Decode streams every weight once per
/// token, and 4 KiB pages cost it a TLB miss per page and a hardware-prefetch stop at each page
/// boundary. Measured on the 2-core build machine: glibc's `hugetlb` tunable (huge pages for
/// every allocation) gave 130m bf16 decode a median +15 % in A/B pairs (BENCHMARKS.md round
/// 11); this advice on the weights alone was within that machine's ±15 % run-to-run noise
/// (medians 199 -> 203 tok/s over four pairs), with peak RSS unchanged to 2 %. Other devices,
/// small tensors and other systems are returned as they are; the advice is best effort.
pub(super) fn in_huge_pages(t: Tensor) -> candle_core::Result<Tensor> {
    #[cfg(target_os = "linux")]
    {
        const MIN_BYTES: usize = 2 << 20;
        if t.device().is_cpu() && t.elem_count() * t.dtype().size_in_bytes() >= MIN_BYTES {
            return match t.dtype() {
                DType::F32 => huge_copy::<f32>(&t),
                DType::F16 => huge_copy::<half::f16>(&t),
                DType::BF16 => huge_copy::<half::bf16>(&t),
                _ => Ok(t),
            };
        }
    }
    Ok(t)
}

#[cfg(target_os = "linux")]
fn huge_copy<T: candle_core::WithDType>(t: &Tensor) -> candle_core::Result<Tensor> {
    const HUGE: usize = 2 << 20;
    let t = t.contiguous()?;
    let n = t.elem_count();
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("huge_copy: not a CPU tensor")
    };
    let start = layout.start_offset();
    let src = &cpu.as_slice::<T>()?[start..start + n];
    let mut v: Vec<T> = Vec::with_capacity(n);
    let (p, len) = (v.as_mut_ptr() as usize, n * std::mem::size_of::<T>());
    let (a, b) = (p.next_multiple_of(HUGE), (p + len) / HUGE * HUGE);
    if b > a {
        // SAFETY: [a, b) lies inside v's allocation; MADV_HUGEPAGE only changes how the kernel
        // backs the range, never its contents.
        unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
    }
    v.extend_from_slice(src);
    drop(storage);
    Tensor::from_vec(v, t.shape(), &Device::Cpu)
}

/// Drops this process's resident pages of `mmap[lo..hi]` once a tensor has been copied out of
/// them. Without it the mapped file stays resident next to the loaded copy until the weights are
/// dropped, and peak memory is about twice the weights (130m f32: 1001 MiB for 492 MiB of
/// weights). Only whole 64 KiB blocks inside the range are released (a multiple of every
/// common page size, so the advice is never misaligned); best effort: the pages are read-only
/// file pages, so a failure changes nothing but the memory figure.
pub(super) fn release_pages(mmap: &Mmap, lo: usize, hi: usize) {
    #[cfg(unix)]
    {
        const BLOCK: usize = 64 << 10;
        let (a, b) = (lo.next_multiple_of(BLOCK), hi / BLOCK * BLOCK);
        if b > a {
            // SAFETY: the mapping is a read-only shared map of the file and nothing borrows
            // [a, b) now (the tensor was copied out and its slice dropped); a later read of the
            // range (a tied weight loaded again) faults the same file bytes back in.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
            };
        }
    }
    #[cfg(not(unix))]
    let _ = (mmap, lo, hi);
}
