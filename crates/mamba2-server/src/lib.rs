//! An OpenAI-compatible HTTP server for Mamba-2 and hybrid models (`mamba2 serve`), on
//! axum/tokio.
//!
//! - `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (JSON, or
//!   Server-Sent Events with `"stream": true`), `GET /health`; errors as OpenAI's error JSON
//!   ([`error::ApiError`]).
//! - Continuous batching ([`scheduler`]): every generating request advances by one batched
//!   decode step per token; requests join and leave between steps; prompts are prefilled in
//!   bounded pieces between steps.
//! - Prompt-state reuse ([`prompt_cache`]): a request whose prompt extends an earlier one
//!   (the next turn of a chat) restores that state and prefills only the new tokens.
//! - A client that disconnects frees its slot before the next step.
//!
//! ```no_run
//! use mamba2::pipeline::{LoadOptions, TextGenerator};
//! use mamba2_server::{engine::EngineConfig, routes::HttpConfig, Server};
//! # async fn run() -> Result<(), mamba2_server::error::ServeError> {
//! let generator = TextGenerator::load("models/mamba2-tiny", &LoadOptions::default())?;
//! let server = Server::new(generator, HttpConfig::new("mamba2-tiny"), EngineConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.unwrap();
//! server.serve(listener, std::future::pending()).await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod engine;
pub mod error;
pub mod prompt_cache;
pub mod routes;
pub mod scheduler;
pub mod template;

use engine::{Engine, EngineConfig};
use error::ServeError;
use mamba2::pipeline::TextGenerator;
use routes::{AppState, HttpConfig};
use std::future::Future;
use std::sync::Arc;

/// A model behind the HTTP API: the engine thread is running once this exists.
pub struct Server {
    state: Arc<AppState>,
}

impl Server {
    /// Starts the engine for `generator`'s model.
    pub fn new(generator: TextGenerator, http: HttpConfig, engine: EngineConfig) -> Self {
        let engine = Engine::start(
            generator.model().clone(),
            generator.tokenizer().clone(),
            generator.eos_token_ids().to_vec(),
            engine,
        );
        Self {
            state: Arc::new(AppState::new(generator, engine, http)),
        }
    }

    /// The shared state (engine counters).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The axum router, to mount elsewhere or serve yourself.
    pub fn router(&self) -> axum::Router {
        routes::router(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| ServeError::Io {
                context: "serving HTTP".into(),
                source,
            })
    }
}
