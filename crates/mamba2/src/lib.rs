//! Mamba-2 language model inference on Candle.
//!
//! Load a checkpoint (Hub id or local folder, safetensors or `pytorch_model.bin`, mamba_ssm or
//! HF-transformers layout), run prefill and decode through the ops of [`mamba2_ops`], and generate
//! text with streaming and cancellation.

pub mod config;
pub mod error;
pub mod hub;
pub mod sampling;
pub mod text_stream;
pub mod weights;

pub use error::{Error, Result};
