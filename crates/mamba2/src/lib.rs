//! Mamba-2 language model inference on Candle.
//!
//! Load a checkpoint (Hub id or local folder, safetensors or `pytorch_model.bin`, mamba_ssm or
//! HF-transformers layout), run prefill and decode through the ops of [`mamba2_ops`], and generate
//! text with streaming and cancellation.

pub mod batch;
mod bundled;
pub mod cache;
pub mod chat_template;
pub mod config;
pub mod device;
pub mod error;
pub mod gguf;
pub mod gguf_export;
pub mod hub;
pub mod model;
mod pickle_guard;
pub mod pipeline;
mod random;
pub mod sampling;
pub mod session;
mod session_file;
pub mod text_stream;
pub mod threads;
pub mod weights;

pub use cache::Mamba2Cache;
/// The Candle version this crate is built on, so that applications build tensors and devices of
/// the same version without naming it in their own manifest.
pub use candle_core;
pub use config::Mamba2Config;
pub use error::{Error, Result};
pub use model::Mamba2Model;
