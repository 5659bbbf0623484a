//! Device selection by name: `cpu`, `cuda[:N]`, `metal[:N]`, `auto`.

use crate::{Error, Result};
use candle_core::Device;
use std::str::FromStr;

/// A device request, parsed from the command line or an app setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The best compiled-in backend that is present: CUDA, then Metal, then CPU.
    Auto,
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (name, ordinal) = match s.split_once(':') {
            Some((n, o)) => (
                n,
                Some(
                    o.parse::<usize>()
                        .map_err(|_| Error::Device(format!("bad device ordinal in `{s}`")))?,
                ),
            ),
            None => (s, None),
        };
        match (name.to_ascii_lowercase().as_str(), ordinal) {
            ("auto", None) => Ok(Self::Auto),
            ("cpu", None) => Ok(Self::Cpu),
            ("cuda", o) => Ok(Self::Cuda(o.unwrap_or(0))),
            ("metal", o) => Ok(Self::Metal(o.unwrap_or(0))),
            _ => Err(Error::Device(format!(
                "unknown device `{s}`: use cpu, cuda[:N], metal[:N] or auto"
            ))),
        }
    }
}

impl DeviceChoice {
    /// Opens the device. A backend that is not compiled in, or not present, is an error that
    /// says which; `Auto` never fails (it falls back to the CPU).
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(i) => open_cuda(i),
            Self::Metal(i) => open_metal(i),
            Self::Auto => Ok(open_cuda(0)
                .or_else(|_| open_metal(0))
                .unwrap_or(Device::Cpu)),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(i: usize) -> Result<Device> {
    Device::new_cuda(i).map_err(|e| Error::Device(format!("CUDA device {i} is not available: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_: usize) -> Result<Device> {
    Err(Error::Device(
        "this build has no CUDA support: rebuild with `--features cuda`".into(),
    ))
}

#[cfg(feature = "metal")]
fn open_metal(i: usize) -> Result<Device> {
    Device::new_metal(i)
        .map_err(|e| Error::Device(format!("Metal device {i} is not available: {e}")))
}

#[cfg(not(feature = "metal"))]
fn open_metal(_: usize) -> Result<Device> {
    Err(Error::Device(
        "this build has no Metal support: rebuild with `--features metal` on macOS".into(),
    ))
}

/// Parses `f32`, `f16`, `bf16`.
pub fn parse_dtype(s: &str) -> Result<candle_core::DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(candle_core::DType::F32),
        "f16" | "float16" | "half" => Ok(candle_core::DType::F16),
        "bf16" | "bfloat16" => Ok(candle_core::DType::BF16),
        _ => Err(Error::Dtype(format!(
            "unknown dtype `{s}`: use f32, f16 or bf16"
        ))),
    }
}

/// Parses a block format for quantizing at load, in llama.cpp's spelling (case-insensitive):
/// `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q2_k`, `q3_k`, `q4_k`, `q5_k`, `q6_k`.
///
/// ```
/// use candle_core::quantized::GgmlDType;
/// assert_eq!(mamba2::device::parse_quant_type("Q4_K")?, GgmlDType::Q4K);
/// assert!(mamba2::device::parse_quant_type("iq2_xs").is_err());
/// # Ok::<(), mamba2::Error>(())
/// ```
pub fn parse_quant_type(s: &str) -> Result<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType as G;
    Ok(match s.to_ascii_lowercase().as_str() {
        "q8_0" => G::Q8_0,
        "q4_0" => G::Q4_0,
        "q4_1" => G::Q4_1,
        "q5_0" => G::Q5_0,
        "q5_1" => G::Q5_1,
        "q2_k" => G::Q2K,
        "q3_k" => G::Q3K,
        "q4_k" => G::Q4K,
        "q5_k" => G::Q5K,
        "q6_k" => G::Q6K,
        _ => {
            return Err(Error::Dtype(format!(
                "unknown quantization `{s}`: use q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, \
                 q5_k or q6_k"
            )))
        }
    })
}
