//! Which kernel dtypes a Metal device can run, decided from its Metal Shading Language version
//! and GPU family.
//!
//! The bf16 kernels use MSL's `bfloat`, which needs MSL 3.1 (macOS 14 / iOS 17); every
//! `.metal` file instantiates them under `#if __METAL_VERSION__ >= 310`. Relying on the
//! function simply being absent is not enough: the runtime compiler's default language version
//! is not always the newest the OS has (then `bfloat` is missing on a macOS that supports it),
//! and Candle's own bf16 kernels are absent on older systems, so a bf16 model cannot fall back
//! to Candle's ops there either. Hence:
//!
//! * the sources are compiled with MSL 3.1 requested where the OS has it
//!   ([`MetalSupport::compile_version`]; 3.1 is also what the MSL harness preprocesses with);
//! * a bf16 kernel is looked up only when [`MetalSupport::bf16`] holds;
//! * a bf16 model on a device without bf16 runs in f32 ([`MetalSupport::kernel_dtype`]).
//!
//! The decisions are pure functions of [`MetalSupport`], tested on every platform; only
//! reading the device ([`device_support`]) needs the `metal` feature.

use candle_core::DType;

/// A Metal Shading Language version, e.g. 3.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MslVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl MslVersion {
    /// MSL 3.1: the first with `bfloat`.
    pub const V3_1: MslVersion = MslVersion { major: 3, minor: 1 };

    /// The newest MSL version the runtime compiler of macOS `major.minor` accepts, after
    /// Apple's `MTLLanguageVersion` availability (11 -> 2.3, 12 -> 2.4, 13 -> 3.0, 14 -> 3.1,
    /// 15 -> 3.2, 26 -> 4.0); `None` before macOS 11.
    pub fn for_macos(major: u32, minor: u32) -> Option<MslVersion> {
        let (ma, mi) = match (major, minor) {
            (26.., _) => (4, 0),
            (15, _) => (3, 2),
            (14, _) => (3, 1),
            (13, _) => (3, 0),
            (12, _) => (2, 4),
            (11, _) => (2, 3),
            // 10.15 Catalina: 2.2; older ones predate what these kernels need anyway
            (10, 15..) => (2, 2),
            _ => return None,
        };
        Some(MslVersion {
            major: ma,
            minor: mi,
        })
    }

    /// The `MTLLanguageVersion` value (`major << 16 | minor`).
    pub fn mtl_value(self) -> usize {
        ((self.major as usize) << 16) | self.minor as usize
    }
}

/// What a Metal device offers, as far as kernel choice goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MetalSupport {
    /// Newest MSL version the OS compiles, `None` when unknown.
    pub msl: Option<MslVersion>,
    /// Highest `MTLGPUFamilyApple<N>` the GPU reports (7 for M1, 8 for M2, 9 for M3/M4), `None`
    /// for a GPU outside the Apple families.
    pub apple_family: Option<u32>,
    /// Whether the GPU reports `MTLGPUFamilyMetal3`.
    pub metal3: bool,
}

impl MetalSupport {
    /// Whether the bf16 kernels can run: MSL 3.1 for the `bfloat` type, on a GPU of the
    /// families Apple's feature tables list for it (Apple6 or later, or Metal3). An unknown OS
    /// version counts as unsupported: a wrong "yes" fails to compile, a wrong "no" only costs
    /// speed.
    pub fn bf16(&self) -> bool {
        self.msl.is_some_and(|v| v >= MslVersion::V3_1)
            && (self.apple_family.is_some_and(|f| f >= 6) || self.metal3)
    }

    /// The language version to compile the kernel sources with: MSL 3.1 where the OS has it,
    /// otherwise `None` (the compiler's default, under which the bf16 instantiations are left
    /// out by their `#if`).
    pub fn compile_version(&self) -> Option<MslVersion> {
        self.msl
            .filter(|&v| v >= MslVersion::V3_1)
            .map(|_| MslVersion::V3_1)
    }

    /// Whether kernel function `name` (`<op>_<variant>_<dtype>`) may be looked up: the bf16
    /// variants only where [`MetalSupport::bf16`] holds; `false` makes the op take its
    /// reference path.
    pub fn has_kernel(&self, name: &str) -> bool {
        !name.ends_with("_bf16") || self.bf16()
    }

    /// The dtype a model asked to run in `dtype` should use on this device: `dtype` itself where
    /// the kernels (and Candle's) have it; bf16 without bf16 support falls back to f32, which
    /// holds every bf16 value exactly (f16 would not: its range ends at 65504, bf16's at ~3e38).
    pub fn kernel_dtype(&self, dtype: DType) -> DType {
        match dtype {
            DType::BF16 if !self.bf16() => DType::F32,
            d => d,
        }
    }
}

/// The support of `device`, `None` when it is not a Metal device (or this build has no Metal).
pub fn device_support(device: &candle_core::Device) -> Option<MetalSupport> {
    match device {
        #[cfg(feature = "metal")]
        candle_core::Device::Metal(d) => Some(probe::of_device(d)),
        _ => None,
    }
}

/// The dtype to load a model in on `device` when `dtype` was asked for (see
/// [`MetalSupport::kernel_dtype`]); `dtype` on every non-Metal device.
pub fn dtype_for_device(device: &candle_core::Device, dtype: DType) -> DType {
    device_support(device).map_or(dtype, |s| s.kernel_dtype(dtype))
}

#[cfg(feature = "metal")]
pub(crate) use probe::{new_library, of_device};

#[cfg(feature = "metal")]
mod probe {
    use super::{MetalSupport, MslVersion};
    use candle_core::MetalDevice;
    use candle_metal_kernels::metal::Library;
    use objc2_metal::{MTLCompileOptions, MTLDevice, MTLGPUFamily, MTLLanguageVersion};
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    /// The support of one device, probed once per process.
    pub(crate) fn of_device(device: &MetalDevice) -> MetalSupport {
        static CACHE: OnceLock<Mutex<HashMap<candle_core::metal_backend::DeviceId, MetalSupport>>> =
            OnceLock::new();
        let mut cache = CACHE
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *cache.entry(device.id()).or_insert_with(|| {
            let raw = device.metal_device().as_ref();
            let apple_family = (1..=12u32)
                .rev()
                .find(|&n| raw.supportsFamily(MTLGPUFamily(1000 + n as isize)));
            MetalSupport {
                msl: macos_version().and_then(|(ma, mi)| MslVersion::for_macos(ma, mi)),
                apple_family,
                metal3: raw.supportsFamily(MTLGPUFamily::Metal3),
            }
        })
    }

    /// macOS `major.minor` from `SystemVersion.plist` (no Foundation call needed).
    fn macos_version() -> Option<(u32, u32)> {
        let plist =
            std::fs::read_to_string("/System/Library/CoreServices/SystemVersion.plist").ok()?;
        let after = &plist[plist.find("<key>ProductVersion</key>")?..];
        let value = &after[after.find("<string>")? + 8..];
        let value = &value[..value.find('<')?];
        let mut parts = value.split('.');
        let major = parts.next()?.trim().parse().ok()?;
        let minor = parts
            .next()
            .and_then(|m| m.trim().parse().ok())
            .unwrap_or(0);
        Some((major, minor))
    }

    /// Compiles a kernel source with [`MetalSupport::compile_version`] of `device`.
    pub(crate) fn new_library(device: &MetalDevice, source: &str) -> crate::Result<Library> {
        let options = MTLCompileOptions::new();
        if let Some(v) = of_device(device).compile_version() {
            options.setLanguageVersion(MTLLanguageVersion(v.mtl_value() as _));
        }
        Ok(device
            .metal_device()
            .new_library_with_source(source, Some(&options))
            .map_err(|e| candle_core::Error::msg(e.to_string()))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn support(macos: (u32, u32), apple_family: Option<u32>, metal3: bool) -> MetalSupport {
        MetalSupport {
            msl: MslVersion::for_macos(macos.0, macos.1),
            apple_family,
            metal3,
        }
    }

    #[test]
    fn macos_to_msl() {
        let v = |ma, mi| MslVersion::for_macos(ma, mi).map(|v| (v.major, v.minor));
        assert_eq!(v(13, 6), Some((3, 0)));
        assert_eq!(v(14, 0), Some((3, 1)));
        assert_eq!(v(15, 2), Some((3, 2)));
        assert_eq!(v(26, 1), Some((4, 0)));
        assert_eq!(v(10, 14), None);
        assert_eq!(MslVersion::V3_1.mtl_value(), 0x30001);
    }

    #[test]
    fn bf16_needs_msl_3_1_and_a_bf16_family() {
        // M1 (Apple7, Metal3) on macOS 13: no bfloat in the language
        let m1_ventura = support((13, 6), Some(7), true);
        assert!(!m1_ventura.bf16());
        assert!(!m1_ventura.has_kernel("ssd_chunk_scan_bf16"));
        assert!(m1_ventura.has_kernel("ssd_chunk_scan_f16"));
        assert_eq!(m1_ventura.kernel_dtype(DType::BF16), DType::F32);
        assert_eq!(m1_ventura.kernel_dtype(DType::F16), DType::F16);
        assert_eq!(m1_ventura.compile_version(), None);
        // the same Mac on macOS 14
        let m1_sonoma = support((14, 0), Some(7), true);
        assert!(m1_sonoma.bf16());
        assert!(m1_sonoma.has_kernel("ssd_chunk_scan_bf16"));
        assert_eq!(m1_sonoma.kernel_dtype(DType::BF16), DType::BF16);
        assert_eq!(m1_sonoma.compile_version(), Some(MslVersion::V3_1));
        // newer OS: still compiled as 3.1, the version the harness checks
        assert_eq!(
            support((26, 0), Some(9), true).compile_version(),
            Some(MslVersion::V3_1)
        );
        // an Intel Mac GPU outside Metal3 on macOS 14: the language has bfloat, the GPU is not
        // in a listed family
        let old_gpu = support((14, 2), None, false);
        assert!(!old_gpu.bf16());
        assert_eq!(old_gpu.kernel_dtype(DType::BF16), DType::F32);
        assert_eq!(old_gpu.compile_version(), Some(MslVersion::V3_1));
        // unknown OS version: no bf16
        assert!(!MetalSupport {
            msl: None,
            apple_family: Some(9),
            metal3: true
        }
        .bf16());
    }

    #[test]
    fn other_devices_keep_their_dtype() {
        let cpu = candle_core::Device::Cpu;
        assert_eq!(device_support(&cpu), None);
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(dtype_for_device(&cpu, d), d);
        }
    }
}
