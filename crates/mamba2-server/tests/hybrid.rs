//! A hybrid model (attention + Mamba-2 blocks; a random HF fixture with the bundled tokenizer,
//! whose first 128 ids cover the fixture's vocabulary): concurrent requests run one row per step
//! and equal the same requests alone; a prompt extending an earlier one restores that state,
//! KV caches included, and answers as a server without the cache does.

mod support;
use futures_util::future::join_all;
use mamba2::pipeline::{load_model, TextGenerator};
use mamba2_server::engine::EngineConfig;
use mamba2_server::routes::HttpConfig;
use mamba2_server::Server;
use serde_json::{json, Value};
use std::sync::Arc;

async fn start(prompt_cache_bytes: usize) -> (String, Arc<mamba2_server::routes::AppState>) {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/hybrid/granite_nope_tied_b2/hf"
    );
    let files = mamba2::hub::resolve_model(dir, &Default::default()).unwrap();
    let model = load_model(&files, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(model.config().n_kv_blocks() > 0);
    let tok = support::generator().tokenizer().clone();
    let generator = TextGenerator::new(Arc::new(model), tok, Vec::new(), None);
    let engine = EngineConfig {
        prompt_cache_bytes,
        ..Default::default()
    };
    let server = Server::new(generator, HttpConfig::new("hybrid"), engine);
    let state = server.state().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(server.serve(listener, std::future::pending()));
    (base, state)
}

async fn complete(base: &str, prompt: &[u32], max_tokens: u32) -> Value {
    reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "hybrid", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn prompt(i: u32) -> Vec<u32> {
    (0..3 + i).map(|k| 40 + (i * 7 + k * 3) % 80).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_rows_decode_alone_and_reuse_states_with_kv() {
    let (base, state) = start(64 << 20).await;
    let mut alone = Vec::new();
    for i in 0..4 {
        alone.push(complete(&base, &prompt(i), 6).await["choices"][0]["text"].clone());
    }
    let together = join_all((0..4).map(|i| {
        let base = base.clone();
        async move { complete(&base, &prompt(i), 6).await["choices"][0]["text"].clone() }
    }))
    .await;
    assert_eq!(alone, together);
    // Each decode step of a hybrid model advances one row.
    let s = state.engine().stats();
    assert!(s.decode_steps > 0);
    assert_eq!(s.decode_rows, s.decode_steps);

    // A prompt extending an earlier one: the earlier prompt's state (KV caches included)
    // is restored and only the extension is prefilled.
    let (plain_base, _) = start(0).await;
    let first: Vec<u32> = (0..20).map(|k| 30 + (k * 11) % 90).collect();
    let mut longer = first.clone();
    longer.extend([55, 66, 77, 88]);
    complete(&base, &first, 3).await;
    let reused = complete(&base, &longer, 8).await;
    let plain = complete(&plain_base, &longer, 8).await;
    let cached = reused["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= first.len() as u64, "{reused}");
    assert_eq!(reused["timings"]["prompt_n"], longer.len() as u64 - cached);
    assert_eq!(plain["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(reused["choices"][0]["text"], plain["choices"][0]["text"]);
}
