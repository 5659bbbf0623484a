//! Host-memory handling of loaded weights: the mapped file's pages are released once a tensor
//! is copied out of them, and large CPU tensors are moved into memory advised for transparent
//! huge pages. Both are best effort: `madvise` on Unix (the huge-page advice on Linux only);
//! elsewhere they do nothing.

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

/// Smallest tensor worth moving into huge pages (one 2 MiB page may fit inside it).
#[cfg(target_os = "linux")]
const MIN_BYTES: usize = 2 << 20;

/// A large CPU tensor moved into memory advised for transparent huge pages (Linux), before the
/// first touch, so the kernel backs it with 2 MiB pages where it is configured to on request
/// (`transparent_hugepage=madvise`, the common default). Decode streams every weight once per
/// token, and 4 KiB pages cost it a TLB miss per page and a hardware-prefetch stop at each page
/// boundary. Measured on the 2-core build machine: glibc's `hugetlb` tunable (huge pages for
/// every allocation) gave 130m bf16 decode a median +15 % in A/B pairs (BENCHMARKS.md,
/// "CPU"); this advice on the weights alone was within that machine's ±15 % run-to-run noise
/// (medians 199 -> 203 tok/s over four pairs), with peak RSS unchanged to 2 %. Other devices,
/// small tensors and other systems are returned as they are; the advice is best effort.
pub(crate) fn in_huge_pages(t: Tensor) -> candle_core::Result<Tensor> {
    #[cfg(target_os = "linux")]
    {
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

/// A CPU tensor of `dtype` and `shape` holding `bytes` (native byte order, as
/// `Tensor::from_raw_buffer`), built directly in huge-page-advised memory where
/// [`in_huge_pages`] would move it (when `huge`): one copy out of the mapped file instead of two.
pub(super) fn cpu_tensor_from_bytes(
    bytes: &[u8],
    dtype: DType,
    shape: &[usize],
    huge: bool,
) -> candle_core::Result<Tensor> {
    #[cfg(target_os = "linux")]
    if huge && bytes.len() >= MIN_BYTES {
        let t = match dtype {
            DType::F32 => advised_from_bytes::<f32>(bytes, shape),
            DType::F16 => advised_from_bytes::<half::f16>(bytes, shape),
            DType::BF16 => advised_from_bytes::<half::bf16>(bytes, shape),
            _ => None,
        };
        if let Some(t) = t {
            return t;
        }
    }
    Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)
}

/// `None` when `bytes` is not a whole number of `T` (`from_raw_buffer` then reports it).
#[cfg(target_os = "linux")]
fn advised_from_bytes<T: candle_core::WithDType>(
    bytes: &[u8],
    shape: &[usize],
) -> Option<candle_core::Result<Tensor>> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return None;
    }
    let n = bytes.len() / size;
    let mut v = advised_vec::<T>(n);
    // SAFETY: the capacity is n elements = bytes.len() bytes, all of which are written here;
    // every bit pattern is a valid f32 / f16 / bf16.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, bytes.len());
        v.set_len(n);
    }
    Some(Tensor::from_vec(v, shape, &Device::Cpu))
}

#[cfg(target_os = "linux")]
fn huge_copy<T: candle_core::WithDType>(t: &Tensor) -> candle_core::Result<Tensor> {
    let t = t.contiguous()?;
    let n = t.elem_count();
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("huge_copy: not a CPU tensor")
    };
    let start = layout.start_offset();
    let mut v = advised_vec::<T>(n);
    v.extend_from_slice(&cpu.as_slice::<T>()?[start..start + n]);
    drop(storage);
    Tensor::from_vec(v, t.shape(), &Device::Cpu)
}

/// An empty vector with room for `n` elements whose whole 2 MiB pages are advised for
/// transparent huge pages before anything touches them.
#[cfg(target_os = "linux")]
fn advised_vec<T>(n: usize) -> Vec<T> {
    const HUGE: usize = 2 << 20;
    let v: Vec<T> = Vec::with_capacity(n);
    let (p, len) = (v.as_ptr() as usize, n * std::mem::size_of::<T>());
    let (a, b) = (p.next_multiple_of(HUGE), (p + len) / HUGE * HUGE);
    if b > a {
        // SAFETY: [a, b) lies inside v's allocation; MADV_HUGEPAGE only changes how the kernel
        // backs the range, never its contents.
        unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
    }
    v
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The `VmFlags` of the mapping of this process that holds address `p` (from
    /// `/proc/self/smaps`); `hg` marks memory advised with `MADV_HUGEPAGE`.
    pub(crate) fn vm_flags(p: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= p && p < b;
                    continue;
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.split_whitespace().map(String::from).collect();
                }
            }
        }
        panic!("no mapping holds {p:#x}")
    }

    /// Address of the middle of a CPU tensor's buffer (inside its advised whole pages).
    pub(crate) fn middle(t: &Tensor) -> usize {
        let (s, _) = t.storage_and_layout();
        let candle_core::Storage::Cpu(c) = &*s else {
            panic!("not a CPU tensor")
        };
        let v = c.as_slice::<f32>().expect("f32");
        v.as_ptr() as usize + v.len() * 2
    }

    /// Whether this kernel has transparent huge pages at all (else madvise refuses the advice
    /// and there is nothing to check).
    fn thp_available() -> bool {
        std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    }

    #[test]
    fn large_weights_land_in_advised_memory_unless_switched_off() {
        if !thp_available() {
            eprintln!("no transparent huge pages in this kernel: skipped");
            return;
        }
        let n = 3 << 20; // 12 MiB of f32: several whole 2 MiB pages
        let bytes: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_ne_bytes()).collect();
        let on = cpu_tensor_from_bytes(&bytes, DType::F32, &[n], true).unwrap();
        assert!(vm_flags(middle(&on)).iter().any(|f| f == "hg"), "advised");
        let off = cpu_tensor_from_bytes(&bytes, DType::F32, &[n], false).unwrap();
        assert!(
            !vm_flags(middle(&off)).iter().any(|f| f == "hg"),
            "not advised"
        );
        // Same values either way.
        assert_eq!(on.to_vec1::<f32>().unwrap(), off.to_vec1::<f32>().unwrap());
        // A converted tensor is moved into advised memory too.
        let moved = in_huge_pages(off).unwrap();
        assert!(vm_flags(middle(&moved)).iter().any(|f| f == "hg"), "moved");
        // Small tensors stay where they are.
        let small = cpu_tensor_from_bytes(&bytes[..4096], DType::F32, &[1024], true).unwrap();
        assert_eq!(small.dims(), &[1024]);
    }
}
