//! Mamba-2 ops for Candle.
mod error;
pub use error::{OpError, Result};
