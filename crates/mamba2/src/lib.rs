//! Mamba-2 language model inference on Candle.
//!
//! Load a checkpoint (Hub id or local folder, safetensors or `pytorch_model.bin`, mamba_ssm or
//! HF-transformers layout), run prefill and decode through the ops of [`mamba2_ops`], and generate
//! text with streaming and cancellation.
//!
//! ```
//! use mamba2::pipeline::{bundled_model_dir, LoadOptions, TextGenerator, TextOptions};
//! use mamba2::session::CancelToken;
//! use std::ops::ControlFlow;
//!
//! // The small model embedded by the default `bundled-model` feature; a Hub id such as
//! // "state-spaces/mamba2-130m" or a local folder loads the same way.
//! let gen = TextGenerator::load(&bundled_model_dir()?.to_string_lossy(), &LoadOptions::default())?;
//! let mut session = gen.new_session()?;
//! let opts = TextOptions { max_new_tokens: 8, ..Default::default() };
//! let mut text = String::new();
//! gen.generate(&mut session, "The old man said", &opts, &CancelToken::new(), |piece| {
//!     text.push_str(piece);
//!     ControlFlow::Continue(())
//! })?;
//! assert!(!text.is_empty());
//! # Ok::<(), mamba2::Error>(())
//! ```

pub mod batch;
mod bundled;
pub mod cache;
mod chat;
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
pub mod progress;
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
