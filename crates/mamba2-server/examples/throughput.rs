//! Aggregate generation throughput of the server at several batch sizes: for each B, B
//! concurrent completion requests of `--tokens` new tokens each (EOS ignored by feeding
//! distinct prompts and counting what `usage` reports), timed from the first request sent to
//! the last answer received.
//!
//! ```text
//! cargo run --release -p mamba2-server --example throughput -- [--shape 130m] [--batches 1,8,32] [--tokens 64]
//! ```
//! Without `--shape` it runs the bundled model; with one, random weights of that preset shape
//! (vocabulary cut to the bundled tokenizer's 4096 ids so generated ids decode).

use mamba2::pipeline::{LoadOptions, TextGenerator};
use mamba2::{Mamba2Config, Mamba2Model};
use mamba2_server::engine::EngineConfig;
use mamba2_server::routes::HttpConfig;
use mamba2_server::Server;
use std::sync::Arc;
use std::time::Instant;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/mamba2-tiny");
    let mut generator = TextGenerator::load(dir, &LoadOptions::default()).expect("bundled model");
    let shape = arg("--shape");
    if let Some(shape) = &shape {
        let mut cfg = Mamba2Config::preset(shape).expect("a preset shape");
        cfg.vocab_size = 4096;
        cfg.pad_vocab_size_multiple = 1;
        let model =
            Mamba2Model::random(&cfg, candle_core::DType::F32, &candle_core::Device::Cpu, 1)
                .expect("random model");
        generator = TextGenerator::new(
            Arc::new(model),
            generator.tokenizer().clone(),
            Vec::new(),
            None,
        );
    }
    let batches: Vec<usize> = arg("--batches")
        .unwrap_or_else(|| "1,8,32".into())
        .split(',')
        .map(|s| s.parse().expect("batch sizes"))
        .collect();
    let tokens: u32 = arg("--tokens").map_or(64, |s| s.parse().expect("--tokens"));
    let max = *batches.iter().max().unwrap();
    let engine = EngineConfig {
        max_batch: max,
        ..Default::default()
    };
    let server = Server::new(generator, HttpConfig::new("bench"), engine);
    let state = server.state().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(server.serve(listener, std::future::pending()));
    let client = reqwest::Client::new();
    let model = shape.as_deref().unwrap_or("bundled mamba2-tiny");
    println!(
        "| model | batch | requests x new tokens | wall s | generated tok/s | mean decode batch |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (round, &b) in batches.iter().enumerate() {
        let before = state.engine().stats();
        let t0 = Instant::now();
        let handles: Vec<_> = (0..b)
            .map(|i| {
                let client = client.clone();
                let url = format!("{base}/v1/completions");
                let body = serde_json::json!({
                    "model": "bench",
                    "prompt": format!("Chapter {} of round {round}. It was", i + 1),
                    "max_tokens": tokens,
                    "temperature": 0.8,
                    "seed": i,
                });
                tokio::spawn(async move {
                    let v: serde_json::Value = client
                        .post(url)
                        .json(&body)
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    v["usage"]["completion_tokens"].as_u64().expect("usage")
                })
            })
            .collect();
        let mut generated = 0;
        for h in handles {
            generated += h.await.unwrap();
        }
        let wall = t0.elapsed().as_secs_f64();
        let after = state.engine().stats();
        let steps = after.decode_steps - before.decode_steps;
        let rows = after.decode_rows - before.decode_rows;
        println!(
            "| {model} | {b} | {b} x {tokens} | {wall:.2} | {:.0} | {:.1} |",
            generated as f64 / wall,
            rows as f64 / steps.max(1) as f64
        );
    }
}
