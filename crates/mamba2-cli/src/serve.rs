//! `mamba2 serve`: the OpenAI-compatible HTTP server of `mamba2-server` on one model.

use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use mamba2::pipeline::TextGenerator;
use mamba2_server::engine::EngineConfig;
use mamba2_server::routes::HttpConfig;
use mamba2_server::Server;
use std::path::Path;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most requests generating at once (rows of one batched decode step).
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Most requests waiting for a slot; beyond it requests get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Prompt tokens prefilled between two decode steps, so that a long prompt delays the
    /// other streams by one piece at a time.
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// Memory for the prompt-state cache, in MiB (0 turns it off).
    #[arg(long, default_value_t = 1024)]
    prompt_cache_mib: usize,
    /// Longest prompt accepted, in tokens (longer ones get 413).
    #[arg(long, default_value_t = 32768)]
    max_prompt_tokens: usize,
    /// `max_tokens` of requests that give none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// The model id clients name (default: the model's folder or file name, or its repo id).
    #[arg(long)]
    model_id: Option<String>,
}

/// The id of `spec`: the last component of a local path (without `.gguf`), else the repo id.
fn default_model_id(spec: &str) -> String {
    let p = Path::new(spec);
    if p.exists() {
        let name = p
            .file_stem()
            .or_else(|| p.file_name())
            .map(|s| s.to_string_lossy().into_owned());
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            // The bundled model's cache folder carries a content hash after its name.
            return match name.strip_prefix("mamba2-tiny-") {
                Some(_) => "mamba2-tiny".into(),
                None => name,
            };
        }
    }
    spec.to_string()
}

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 || a.prefill_chunk == 0 {
        bail!("--max-batch and --prefill-chunk must be at least 1");
    }
    let spec = a.model.model_spec()?;
    let generator = TextGenerator::load(&spec, &a.model.load_options()?)
        .with_context(|| format!("loading {spec}"))?;
    let model_id = a
        .model_id
        .clone()
        .unwrap_or_else(|| default_model_id(&spec));
    let http = HttpConfig {
        max_prompt_tokens: a.max_prompt_tokens,
        default_max_tokens: a.default_max_tokens,
        ..HttpConfig::new(model_id.clone())
    };
    let engine = EngineConfig {
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        prefill_chunk: a.prefill_chunk,
        prompt_cache_bytes: a.prompt_cache_mib << 20,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("binding {}:{}", a.host, a.port))?;
        let server = Server::new(generator, http, engine);
        eprintln!(
            "mamba2 serve: model `{model_id}` on http://{} (max batch {}, queue {})",
            listener.local_addr()?,
            a.max_batch,
            a.max_queue
        );
        server
            .serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::default_model_id;

    #[test]
    fn model_ids() {
        assert_eq!(
            default_model_id("state-spaces/mamba2-130m"),
            "state-spaces/mamba2-130m"
        );
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("my-model");
        std::fs::create_dir(&m).unwrap();
        assert_eq!(default_model_id(m.to_str().unwrap()), "my-model");
        let f = dir.path().join("tiny-q8_0.gguf");
        std::fs::write(&f, b"").unwrap();
        assert_eq!(default_model_id(f.to_str().unwrap()), "tiny-q8_0");
        let b = dir.path().join("mamba2-tiny-0123abcd");
        std::fs::create_dir(&b).unwrap();
        assert_eq!(default_model_id(b.to_str().unwrap()), "mamba2-tiny");
    }
}
