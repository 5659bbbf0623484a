//! Errors of the Mamba-2 ops: shape and dtype problems are reported with the op and argument name.

/// Errors returned by the ops of this crate.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// An argument's shape disagrees with the others.
    #[error("{op}: argument `{arg}` has shape {got:?}, expected {expected}")]
    Shape {
        op: &'static str,
        arg: &'static str,
        got: Vec<usize>,
        expected: String,
    },
    /// An argument has a dtype the op does not accept.
    #[error("{op}: argument `{arg}` has dtype {got:?}, expected {expected}")]
    Dtype {
        op: &'static str,
        arg: &'static str,
        got: candle_core::DType,
        expected: &'static str,
    },
    /// Arguments live on different devices.
    #[error("{op}: argument `{arg}` is on another device than the input")]
    Device { op: &'static str, arg: &'static str },
    /// A scalar parameter is out of range.
    #[error("{op}: parameter `{param}`: {message}")]
    Param {
        op: &'static str,
        param: &'static str,
        message: String,
    },
    /// An error from Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`OpError`].
pub type Result<T> = std::result::Result<T, OpError>;
