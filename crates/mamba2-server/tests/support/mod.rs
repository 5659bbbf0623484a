//! Starts a server on the bundled model in the test process, on a free local port.
#![allow(dead_code)]

use async_openai::{config::OpenAIConfig, Client};
use mamba2::pipeline::{LoadOptions, TextGenerator};
use mamba2_server::engine::EngineConfig;
use mamba2_server::routes::HttpConfig;
use mamba2_server::Server;
use std::sync::OnceLock;

pub const MODEL: &str = "mamba2-tiny";

/// The bundled model, loaded once per test binary.
pub fn generator() -> TextGenerator {
    static GEN: OnceLock<TextGenerator> = OnceLock::new();
    GEN.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/mamba2-tiny");
        TextGenerator::load(dir, &LoadOptions::default()).expect("bundled model")
    })
    .clone()
}

pub struct TestServer {
    pub base: String,
    pub server_state: std::sync::Arc<mamba2_server::routes::AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    pub async fn start(engine: EngineConfig, http: HttpConfig) -> Self {
        let server = Server::new(generator(), http, engine);
        let state = server.state().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            server
                .serve(listener, async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            base: format!("http://{addr}"),
            server_state: state,
            shutdown: Some(tx),
        }
    }

    pub async fn default() -> Self {
        Self::start(EngineConfig::default(), HttpConfig::new(MODEL)).await
    }

    pub fn client(&self) -> Client<OpenAIConfig> {
        Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("{}/v1", self.base))
                .with_api_key("unused"),
        )
    }

    pub async fn health(&self) -> serde_json::Value {
        reqwest::get(format!("{}/health", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
