//! Kernel sources of [mamba2-rs](https://github.com/mamba2-rs/mamba2-rs): the Metal Shading
//! Language files and the CUDA PTX of the Mamba-2 ops (causal depthwise conv1d, SSD chunked
//! scan, selective state update, grouped gated RMSNorm, the fused decode step, matrix-vector
//! projections) and of the hybrid models' attention, rotary embedding, MLP activations and
//! embedding rows.
//!
//! Like Candle's `candle-metal-kernels` and `candle-kernels`, this crate only carries the
//! sources: one constant per kernel file. `mamba2-ops` compiles the Metal sources at run time on
//! the device and loads the PTX into Candle's CUDA device. Each kernel's header comment names
//! its reference function in `mamba2-ops`, its argument shapes and its threadgroup / shared
//! memory budget; kernel names follow `<op>_<variant>_<f32|f16|bf16>`.
//!
//! - [`metal`]: the `.metal` sources, always available (they are plain text).
//! - `ptx` (feature `cuda`): the `.cu` files compiled to PTX by this crate's build script with
//!   `nvcc` (`NVCC` or `CUDA_HOME`, and `CUDA_COMPUTE_CAP`, at least 80, select the compiler and
//!   the virtual architecture).
//!
//! ```
//! use mamba2_kernels::metal;
//!
//! // Each source by its file name, as the dispatch plans of mamba2-ops name them.
//! let ssd = metal::source("ssd.metal").expect("shipped");
//! assert_eq!(ssd, metal::SSD);
//! assert!(ssd.contains("kernel void"));
//! assert!(metal::source("missing.metal").is_none());
//! ```

pub mod metal;

/// PTX of the CUDA kernels, one `&str` per `.cu` file (`CONV1D`, `SSD`, `DECODE_STEP`, ...) and
/// [`ptx::ALL`] by file name, built with nvcc by the build script.
#[cfg(feature = "cuda")]
pub mod ptx {
    include!(concat!(env!("OUT_DIR"), "/cuda_ptx.rs"));
}
