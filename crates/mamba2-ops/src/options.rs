//! Typed switches of the fast paths: which CPU instruction-set tier runs, the software prefetch
//! of the decode weight streams, the optional GEMM variants, and the CUDA layouts.
//!
//! The library never reads the environment. An application (the `mamba2` CLI, a test harness)
//! builds a [`KernelOptions`] once, from its flags or with [`KernelOptions::from_env`], and hands
//! it over either for one stretch of work ([`with_options`], what `Mamba2Model` does around
//! every forward and step) or for the whole process ([`set_process_options`], once, at start).
//! An op reads the options in force on its calling thread when it starts (a thread-local read),
//! and passes what its kernels need into its parallel sections, so a hot path never looks at the
//! environment.
//!
//! ```
//! use mamba2_ops::options::{with_options, current_options, CpuTier, KernelOptions};
//! let mut opts = KernelOptions::default();
//! opts.cpu.tier = Some(CpuTier::Generic); // the portable loops, whatever the CPU has
//! opts.validate()?;
//! let tier = with_options(&opts, || current_options().cpu.effective_tier());
//! assert_eq!(tier, CpuTier::Generic);
//! // Outside the scope the process options (here the defaults: the best tier) apply again.
//! assert_eq!(current_options().cpu.effective_tier(), CpuTier::detected());
//! # Ok::<(), mamba2_ops::options::OptionsError>(())
//! ```

use std::cell::Cell;
use std::sync::OnceLock;

/// A CPU instruction-set tier of the fast paths. Each tier's kernels run only on a CPU that has
/// its instructions; forcing a lower tier than the CPU's best is for testing and comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuTier {
    /// Portable Rust, compiled for the target's baseline (SSE2 on x86-64, NEON on aarch64).
    Generic,
    /// x86-64 AVX2 + FMA + F16C, 8 f32 lanes.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL (+ VNNI, BF16 where present), 16 f32 lanes.
    Avx512,
    /// aarch64 Advanced SIMD (NEON), 4 f32 lanes, explicit intrinsics.
    Neon,
}

impl CpuTier {
    /// The name used by `MAMBA2_CPU_TIER` and `--cpu-tier`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Generic => "generic",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::Neon => "neon",
        }
    }

    /// Parses a tier name (`generic`, `avx2`, `avx512`, `neon`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "generic" => Self::Generic,
            "avx2" => Self::Avx2,
            "avx512" => Self::Avx512,
            "neon" => Self::Neon,
            _ => return None,
        })
    }

    /// Whether this CPU has every instruction the tier's kernels use.
    pub fn is_supported(self) -> bool {
        match self {
            Self::Generic => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                Self::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "aarch64")]
            Self::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The best tier this CPU supports.
    pub fn detected() -> Self {
        static BEST: OnceLock<CpuTier> = OnceLock::new();
        *BEST.get_or_init(|| {
            [Self::Avx512, Self::Avx2, Self::Neon]
                .into_iter()
                .find(|t| t.is_supported())
                .unwrap_or(Self::Generic)
        })
    }

    /// Every tier this CPU supports, best first.
    pub fn available() -> Vec<Self> {
        [Self::Avx512, Self::Avx2, Self::Neon, Self::Generic]
            .into_iter()
            .filter(|t| t.is_supported())
            .collect()
    }
}

/// Where and how far the decode weight streams are prefetched in software (x86-64 only; other
/// targets ignore it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetch {
    /// No software prefetch.
    Off,
    /// `prefetcht0` (every cache level), this many bytes ahead (0: the kernel's own distance).
    L1(usize),
    /// `prefetcht1` (L2 and below), this many bytes ahead (0: the kernel's own distance).
    L2(usize),
}

impl Default for Prefetch {
    /// Into L2, 4 KiB ahead. Measured on the 2-core AMD EPYC (Zen 4) VM, interleaved, medians
    /// (BENCHMARKS.md, "CPU decode prefetch"): bf16 decode of granite-4.0-h-1b (2.9 GB of
    /// weights per token) 8.3-9.4 tok/s with `l2:4096`, 6.8-7.5 with `l1:8192`, 9.3-9.8 with
    /// none; 130m 104.7 / 87.7 / 99.4 tok/s. A `prefetcht0` stream fills L1's miss buffers that
    /// the demand loads need; `prefetcht1` still crosses the 4 KiB pages where the hardware
    /// prefetchers stop.
    fn default() -> Self {
        Self::L2(4096)
    }
}

impl Prefetch {
    /// Parses `off`, `l1`, `l2`, `l1:BYTES` or `l2:BYTES`; `None` for anything else.
    pub fn parse(v: &str) -> Option<Self> {
        let (level, bytes) = match v.split_once(':') {
            Some((l, b)) => (l, b.parse().ok()?),
            None => (v, 0),
        };
        match level {
            "off" if bytes == 0 => Some(Self::Off),
            "l1" => Some(Self::L1(bytes)),
            "l2" => Some(Self::L2(bytes)),
            _ => None,
        }
    }
}

/// Switches of the CPU fast paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuOptions {
    /// The instruction-set tier; `None` takes the best this CPU has ([`CpuTier::detected`]).
    /// A tier the CPU lacks is refused by [`KernelOptions::validate`]; an op given one anyway
    /// runs the generic tier.
    pub tier: Option<CpuTier>,
    /// Software prefetch of the decode weight and state streams.
    pub prefetch: Prefetch,
    /// bf16 prefill projections through AVX-512 BF16's `vdpbf16ps` GEMM (where the CPU has it);
    /// `false` widens to f32 instead.
    pub bf16_gemm: bool,
    /// Q8_0 prefill through the AVX-512 VNNI integer GEMM (activations rounded to Q8_0, as
    /// decode does); `false` multiplies by the exactly dequantized matrix.
    pub q8_0_gemm: bool,
    /// Q8_0 decode through the AVX-512 VNNI dot product; `false` uses Candle's.
    pub q8_0_vnni: bool,
}

impl Default for CpuOptions {
    fn default() -> Self {
        Self {
            tier: None,
            prefetch: Prefetch::default(),
            bf16_gemm: true,
            q8_0_gemm: true,
            q8_0_vnni: true,
        }
    }
}

impl CpuOptions {
    /// The tier the kernels run: the requested one when this CPU supports it, the generic one
    /// when it does not, the best detected one when none is requested.
    pub fn effective_tier(&self) -> CpuTier {
        match self.tier {
            None => CpuTier::detected(),
            Some(t) if t.is_supported() => t,
            Some(_) => CpuTier::Generic,
        }
    }
}

/// Switches of the CUDA kernels (read on the host when a launch is planned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaOptions {
    /// Matrix-vector products with the weight rows resident per block group (the default)
    /// instead of one block per row group.
    pub matvec_resident: bool,
    /// Upper bound on the blocks the fused decode step splits a head's state over; `None`: the
    /// kernel's own choice.
    pub step_split: Option<usize>,
    /// The decode-step variant specialised for d_state <= 128 and d_conv <= 4.
    pub step_n128: bool,
    /// The norms folded into the projections' epilogues in the captured decode step.
    pub norm_epilogues: bool,
    /// Programmatic dependent launch in the captured decode step (where the GPU supports it).
    pub pdl: bool,
    /// Fill output buffers with NaN before kernels run, so an element a kernel forgets to write
    /// shows up (tests).
    pub poison: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            matvec_resident: true,
            step_split: None,
            step_n128: true,
            norm_epilogues: true,
            pdl: true,
            poison: false,
        }
    }
}

/// Every switch of the fast paths. `Default` is what the project measured fastest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOptions {
    /// CPU fast paths.
    pub cpu: CpuOptions,
    /// CUDA kernels.
    pub cuda: CudaOptions,
}

/// A switch with a value it cannot take, or options set twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// An environment variable with a value outside its set.
    #[error("{var}={value:?}: expected {expected}")]
    BadValue {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What it may be.
        expected: &'static str,
    },
    /// A CPU tier this machine lacks.
    #[error("CPU tier {} is not supported by this CPU (best: {})", .0.name(), CpuTier::detected().name())]
    TierUnsupported(CpuTier),
    /// [`set_process_options`] was already called.
    #[error("the process kernel options were already set")]
    AlreadySet,
}

/// The environment variables [`KernelOptions::from_env`] reads, with their values.
pub const ENV_VARS: [(&str, &str); 11] = [
    ("MAMBA2_CPU_TIER", "auto | avx512 | avx2 | neon | generic"),
    ("MAMBA2_CPU_PREFETCH", "off | l1[:BYTES] | l2[:BYTES]"),
    ("MAMBA2_CPU_BF16_GEMM", "1 | 0"),
    ("MAMBA2_CPU_Q8_0_GEMM", "1 | 0"),
    ("MAMBA2_CPU_Q8_0_VNNI", "1 | 0"),
    ("MAMBA2_CUDA_MATVEC_RESIDENT", "1 | 0"),
    ("MAMBA2_CUDA_STEP_SPLIT", "a positive integer"),
    ("MAMBA2_CUDA_STEP_N128", "1 | 0"),
    ("MAMBA2_CUDA_NORM_EPILOGUES", "1 | 0"),
    ("MAMBA2_CUDA_PDL", "1 | 0"),
    ("MAMBA2_CUDA_POISON", "1 | 0"),
];

impl KernelOptions {
    /// The defaults overridden by the environment variables of [`ENV_VARS`] that are set. For
    /// applications and test harnesses, once at start; the library itself never calls it.
    pub fn from_env() -> Result<Self, OptionsError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`KernelOptions::from_env`] over any lookup (tests, config files).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, OptionsError> {
        let mut o = Self::default();
        let bad = |var: &'static str, value: &str| OptionsError::BadValue {
            var,
            value: value.to_string(),
            expected: ENV_VARS
                .iter()
                .find(|(k, _)| *k == var)
                .map_or("", |(_, e)| e),
        };
        let switch = |var: &'static str, default: bool| -> Result<bool, OptionsError> {
            match get(var).as_deref() {
                None => Ok(default),
                Some("1") => Ok(true),
                Some("0") => Ok(false),
                Some(v) => Err(bad(var, v)),
            }
        };
        if let Some(v) = get("MAMBA2_CPU_TIER") {
            o.cpu.tier = match v.as_str() {
                "auto" => None,
                s => Some(CpuTier::parse(s).ok_or_else(|| bad("MAMBA2_CPU_TIER", s))?),
            };
        }
        if let Some(v) = get("MAMBA2_CPU_PREFETCH") {
            o.cpu.prefetch = Prefetch::parse(&v).ok_or_else(|| bad("MAMBA2_CPU_PREFETCH", &v))?;
        }
        o.cpu.bf16_gemm = switch("MAMBA2_CPU_BF16_GEMM", o.cpu.bf16_gemm)?;
        o.cpu.q8_0_gemm = switch("MAMBA2_CPU_Q8_0_GEMM", o.cpu.q8_0_gemm)?;
        o.cpu.q8_0_vnni = switch("MAMBA2_CPU_Q8_0_VNNI", o.cpu.q8_0_vnni)?;
        o.cuda.matvec_resident = switch("MAMBA2_CUDA_MATVEC_RESIDENT", o.cuda.matvec_resident)?;
        if let Some(v) = get("MAMBA2_CUDA_STEP_SPLIT") {
            o.cuda.step_split = Some(
                v.parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad("MAMBA2_CUDA_STEP_SPLIT", &v))?,
            );
        }
        o.cuda.step_n128 = switch("MAMBA2_CUDA_STEP_N128", o.cuda.step_n128)?;
        o.cuda.norm_epilogues = switch("MAMBA2_CUDA_NORM_EPILOGUES", o.cuda.norm_epilogues)?;
        o.cuda.pdl = switch("MAMBA2_CUDA_PDL", o.cuda.pdl)?;
        o.cuda.poison = switch("MAMBA2_CUDA_POISON", o.cuda.poison)?;
        o.validate()?;
        Ok(o)
    }

    /// Refuses a CPU tier this machine cannot run.
    pub fn validate(&self) -> Result<(), OptionsError> {
        match self.cpu.tier {
            Some(t) if !t.is_supported() => Err(OptionsError::TierUnsupported(t)),
            _ => Ok(()),
        }
    }
}

static PROCESS: OnceLock<KernelOptions> = OnceLock::new();

thread_local! {
    static SCOPED: Cell<Option<KernelOptions>> = const { Cell::new(None) };
}

/// Sets the options of every op call outside a [`with_options`] scope, for the rest of the
/// process (once, at start; a second call is refused). Without it they are the defaults.
pub fn set_process_options(opts: KernelOptions) -> Result<(), OptionsError> {
    opts.validate()?;
    PROCESS.set(opts).map_err(|_| OptionsError::AlreadySet)
}

/// Runs `f` with `opts` in force for the ops it calls on this thread (scopes nest; the previous
/// options return when `f` ends, also by a panic).
pub fn with_options<R>(opts: &KernelOptions, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<KernelOptions>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPED.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SCOPED.with(|s| s.replace(Some(*opts))));
    f()
}

/// The options in force on this thread: the innermost [`with_options`] scope's, else the
/// process options.
pub fn current_options() -> KernelOptions {
    SCOPED
        .with(|s| s.get())
        .unwrap_or_else(|| PROCESS.get().copied().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(kv: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| kv.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn from_vars_parses_every_switch() {
        let o = KernelOptions::from_vars(vars(&[
            ("MAMBA2_CPU_TIER", "generic"),
            ("MAMBA2_CPU_PREFETCH", "l1:8192"),
            ("MAMBA2_CPU_BF16_GEMM", "0"),
            ("MAMBA2_CPU_Q8_0_GEMM", "0"),
            ("MAMBA2_CPU_Q8_0_VNNI", "0"),
            ("MAMBA2_CUDA_MATVEC_RESIDENT", "0"),
            ("MAMBA2_CUDA_STEP_SPLIT", "3"),
            ("MAMBA2_CUDA_STEP_N128", "0"),
            ("MAMBA2_CUDA_NORM_EPILOGUES", "0"),
            ("MAMBA2_CUDA_PDL", "0"),
            ("MAMBA2_CUDA_POISON", "1"),
        ]))
        .unwrap();
        assert_eq!(o.cpu.tier, Some(CpuTier::Generic));
        assert_eq!(o.cpu.prefetch, Prefetch::L1(8192));
        assert!(!o.cpu.bf16_gemm && !o.cpu.q8_0_gemm && !o.cpu.q8_0_vnni);
        let c = o.cuda;
        assert!(!c.matvec_resident && !c.step_n128 && !c.norm_epilogues && !c.pdl && c.poison);
        assert_eq!(c.step_split, Some(3));
        assert_eq!(
            KernelOptions::from_vars(|_| None).unwrap(),
            KernelOptions::default()
        );
        let auto = KernelOptions::from_vars(vars(&[("MAMBA2_CPU_TIER", "auto")])).unwrap();
        assert_eq!(auto.cpu.tier, None);
    }

    #[test]
    fn bad_values_are_typed_errors() {
        for (k, v) in [
            ("MAMBA2_CPU_TIER", "sse9"),
            ("MAMBA2_CPU_PREFETCH", "l3"),
            ("MAMBA2_CPU_BF16_GEMM", "yes"),
            ("MAMBA2_CUDA_STEP_SPLIT", "0"),
            ("MAMBA2_CUDA_POISON", ""),
        ] {
            match KernelOptions::from_vars(vars(&[(k, v)])) {
                Err(OptionsError::BadValue { var, value, .. }) => {
                    assert_eq!((var, value.as_str()), (k, v))
                }
                other => panic!("{k}={v}: {other:?}"),
            }
        }
        // A tier of the other architecture is never supported.
        let foreign = if cfg!(target_arch = "aarch64") {
            "avx2"
        } else {
            "neon"
        };
        assert_eq!(
            KernelOptions::from_vars(vars(&[("MAMBA2_CPU_TIER", foreign)])),
            Err(OptionsError::TierUnsupported(
                CpuTier::parse(foreign).unwrap()
            ))
        );
    }

    #[test]
    fn prefetch_policy_parses() {
        assert_eq!(Prefetch::parse("off"), Some(Prefetch::Off));
        assert_eq!(Prefetch::parse("l1"), Some(Prefetch::L1(0)));
        assert_eq!(Prefetch::parse("l2:4096"), Some(Prefetch::L2(4096)));
        for bad in ["", "l3", "l2:", "l2:x", "off:5", "L1"] {
            assert_eq!(Prefetch::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn scopes_nest_and_restore() {
        let mut a = KernelOptions::default();
        a.cpu.bf16_gemm = false;
        let mut b = a;
        b.cpu.tier = Some(CpuTier::Generic);
        with_options(&a, || {
            assert_eq!(current_options(), a);
            with_options(&b, || assert_eq!(current_options(), b));
            assert_eq!(current_options(), a);
            // Another thread does not see this thread's scope.
            std::thread::scope(|s| {
                s.spawn(|| assert_ne!(current_options(), a));
            });
        });
        assert_ne!(current_options(), a);
        let r = std::panic::catch_unwind(|| with_options(&b, || panic!("inside")));
        assert!(r.is_err());
        assert_ne!(current_options(), b);
    }

    #[test]
    fn tiers() {
        let best = CpuTier::detected();
        assert!(best.is_supported());
        let all = CpuTier::available();
        assert_eq!(all[0], best);
        assert_eq!(*all.last().unwrap(), CpuTier::Generic);
        for t in all {
            assert_eq!(CpuTier::parse(t.name()), Some(t));
            let o = CpuOptions {
                tier: Some(t),
                ..CpuOptions::default()
            };
            assert_eq!(o.effective_tier(), t);
        }
    }
}
