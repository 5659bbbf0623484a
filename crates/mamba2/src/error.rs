//! The library's one error type. Every failure a user can cause (bad files, bad
//! config, bad input) is a variant that names the offending file, field or tensor.

use std::path::PathBuf;

/// Errors returned by the `mamba2` library. New variants may be added in minor releases: match
/// with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A config file could not be parsed as JSON, or a field had the wrong type.
    #[error("config {path}: {message}")]
    ConfigParse { path: String, message: String },
    /// A config field is missing, out of range or inconsistent with another field.
    #[error("config field `{field}`: {message}")]
    ConfigField { field: String, message: String },
    /// A checkpoint feature this engine does not implement (MLP layers, attention layers, ...).
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from {source_desc}")]
    MissingTensor { name: String, source_desc: String },
    /// A tensor has a shape other than the one the config implies.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A tensor is stored with a dtype the engine cannot use for it.
    #[error("tensor `{name}` has dtype {got}, expected {expected}")]
    TensorDtype {
        name: String,
        expected: String,
        got: String,
    },
    /// A weight file is unreadable, truncated or malformed.
    #[error("weight file {path}: {message}")]
    WeightFile { path: PathBuf, message: String },
    /// A tensor contains NaN or infinite values (opt-in check).
    #[error("tensor `{name}` contains non-finite values")]
    NonFinite { name: String },
    /// A model could not be found locally, in the Hub cache or on the Hub.
    #[error("model `{model}`: {message}")]
    ModelNotFound { model: String, message: String },
    /// Hub download failure.
    #[error("hub: {0}")]
    Hub(String),
    /// Tokenizer load or encode/decode failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A token id is not a row of the embedding.
    #[error("token id {id} at position {position} is out of range (vocab size {vocab})")]
    TokenOutOfRange {
        id: i64,
        position: usize,
        vocab: usize,
    },
    /// An empty prompt was given where at least one token is needed.
    #[error("empty prompt: at least one token is required")]
    EmptyPrompt,
    /// Inputs whose shapes do not agree (batch of different lengths, wrong rank, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A requested device is unknown, not compiled in or not present.
    #[error("device: {0}")]
    Device(String),
    /// A dtype not supported on the requested device or for this operation.
    #[error("dtype: {0}")]
    Dtype(String),
    /// Invalid generation parameters (temperature < 0, top_p outside (0, 1], ...).
    #[error("generation parameter `{field}`: {message}")]
    GenerationParam { field: String, message: String },
    /// A saved session file that is truncated or corrupt.
    #[error("session file {path}: {message}")]
    SessionFile { path: PathBuf, message: String },
    /// A session file in a format version this library does not read (an older one without
    /// the weights fingerprint, or a newer one).
    #[error("session file {path}: format `{found}` is not read by this version (it reads `{supported}`); save the session again with this version")]
    SessionVersion {
        path: PathBuf,
        found: String,
        supported: String,
    },
    /// A session file saved from another model: another architecture or shape (`what` =
    /// `model`), or the same shapes with other weights (`what` = `weights`, e.g. a fine-tune).
    #[error("session file {path} was saved from another model: its {what} is `{saved}`, this model's is `{current}`")]
    SessionModelMismatch {
        path: PathBuf,
        what: &'static str,
        saved: String,
        current: String,
    },
    /// A download, a load or a prefill was cancelled through its [`crate::session::CancelToken`]
    /// (a decode that is cancelled ends with [`crate::session::StopReason::Cancelled`] instead,
    /// keeping the tokens generated so far).
    #[error("cancelled")]
    Cancelled,
    /// A chat template that does not compile, or that failed while rendering (including the
    /// template's own `raise_exception`), with the template engine's message.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// An error from one of the Mamba-2 ops.
    #[error(transparent)]
    Op(#[from] mamba2_ops::OpError),
    /// A malformed GGUF file, or GGUF tokenizer metadata that cannot be used.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// An error from Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An I/O error with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `Result` with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::ConfigField {
            field: field.into(),
            message: message.into(),
        }
    }
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
