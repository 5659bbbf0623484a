//! Errors: what a request can get wrong (answered as OpenAI's error JSON with the matching
//! HTTP status) and what can stop the server from starting.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A failed request, answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a missing field or a parameter out of range: 400.
    #[error("{message}")]
    BadRequest {
        message: String,
        /// The offending request field, when one is to blame.
        param: Option<String>,
    },
    /// The request names a model this server does not serve: 404.
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    /// The prompt has more tokens than the server accepts: 413.
    #[error("The prompt has {tokens} tokens, more than this server's limit of {limit}")]
    PromptTooLong { tokens: usize, limit: usize },
    /// Every batch slot and queue place is taken: 503 with `Retry-After`.
    #[error("The server is at capacity ({capacity} requests running or queued); retry later")]
    QueueFull { capacity: usize, retry_after_s: u64 },
    /// The engine failed on this request (a model error) or has stopped: 500.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// A 400 with no particular field to blame.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PromptTooLong { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error object, as OpenAI writes it.
    pub fn body(&self) -> serde_json::Value {
        let (kind, param, code) = match self {
            ApiError::BadRequest { param, .. } => ("invalid_request_error", param.clone(), None),
            ApiError::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model".to_string()),
                Some("model_not_found"),
            ),
            ApiError::PromptTooLong { .. } => (
                "invalid_request_error",
                Some("messages".to_string()),
                Some("context_length_exceeded"),
            ),
            ApiError::QueueFull { .. } => ("server_error", None, Some("server_busy")),
            ApiError::Internal(_) => ("server_error", None, None),
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if let ApiError::QueueFull { retry_after_s, .. } = self {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&retry_after_s.to_string()).expect("digits"),
            );
        }
        response
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Loading the model or tokenizer failed.
    #[error(transparent)]
    Model(#[from] mamba2::Error),
    /// Binding or serving the socket failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A setting is out of range.
    #[error("invalid server setting: {0}")]
    Config(String),
}
