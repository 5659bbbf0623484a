//! Load: 32 concurrent streaming requests through `async-openai` decode as one batch; every
//! stream completes with exactly the text the same request gets alone (greedy, so no token is
//! lost, duplicated or taken from another row); memory stays flat over 200 requests.

mod support;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions,
    CreateChatCompletionRequestArgs,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use futures_util::future::join_all;
use futures_util::StreamExt;
use mamba2_server::engine::EngineConfig;
use mamba2_server::routes::HttpConfig;
use support::{TestServer, MODEL};

const WORDS: [&str; 8] = [
    "Elizabeth",
    "The carriage",
    "Mr. Darcy",
    "In the morning",
    "Her sister",
    "Jane",
    "At Netherfield",
    "Mrs. Bennet",
];

/// Distinct prompts of different lengths (so the rows of a batch sit at different positions).
fn prompt(i: usize) -> String {
    let mut p = WORDS[i % WORDS.len()].to_string();
    for k in 0..(i % 5) {
        p.push_str(&format!(
            " {}",
            WORDS[(i + k + 3) % WORDS.len()].to_lowercase()
        ));
    }
    p
}

/// One streamed request; returns (text, finish reason, completion tokens). Chat for odd `i`,
/// completions for even.
async fn stream_one(server: &TestServer, i: usize, max_tokens: u32) -> (String, String, u32) {
    let client = server.client();
    let (mut text, mut finish, mut tokens) = (String::new(), String::new(), 0);
    let usage_opts = ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    };
    if i.is_multiple_of(2) {
        let mut req = CreateCompletionRequestArgs::default()
            .model(MODEL)
            .prompt(prompt(i))
            .max_tokens(max_tokens)
            .temperature(0.0)
            .build()
            .unwrap();
        req.stream = Some(true);
        req.stream_options = Some(usage_opts);
        let mut s = client.completions().create_stream(req).await.unwrap();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.unwrap();
            if let Some(u) = chunk.usage {
                tokens = u.completion_tokens;
            }
            for c in chunk.choices {
                text.push_str(&c.text);
                if let Some(f) = c.finish_reason {
                    finish = format!("{f:?}");
                }
            }
        }
    } else {
        let mut req = CreateChatCompletionRequestArgs::default()
            .model(MODEL)
            .messages(vec![ChatCompletionRequestUserMessageArgs::default()
                .content(prompt(i))
                .build()
                .unwrap()
                .into()])
            .max_completion_tokens(max_tokens)
            .temperature(0.0)
            .build()
            .unwrap();
        req.stream = Some(true);
        req.stream_options = Some(usage_opts);
        let mut s = client.chat().create_stream(req).await.unwrap();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.unwrap();
            if let Some(u) = chunk.usage {
                tokens = u.completion_tokens;
            }
            for c in chunk.choices {
                text.push_str(c.delta.content.as_deref().unwrap_or(""));
                if let Some(f) = c.finish_reason {
                    finish = format!("{f:?}");
                }
            }
        }
    }
    (text, finish, tokens)
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_streams_equal_single_runs_and_memory_stays_flat() {
    let engine = EngineConfig {
        max_batch: 32,
        prompt_cache_bytes: 8 << 20,
        ..Default::default()
    };
    let server = TestServer::start(engine, HttpConfig::new(MODEL)).await;
    let max_tokens = 12;
    let mut alone = Vec::new();
    for i in 0..32 {
        alone.push(stream_one(&server, i, max_tokens).await);
    }
    let before = server.health().await;
    let together = join_all((0..32).map(|i| stream_one(&server, i, max_tokens))).await;
    let after = server.health().await;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i} ({:?}) differs when batched", prompt(i));
        assert!(!t.1.is_empty(), "request {i}: no finish reason");
        assert!(t.2 >= 1 && t.2 <= max_tokens, "request {i}: {} tokens", t.2);
    }
    let steps = after["decode_steps"].as_u64().unwrap() - before["decode_steps"].as_u64().unwrap();
    let rows = after["decode_rows"].as_u64().unwrap() - before["decode_rows"].as_u64().unwrap();
    // Alone, every row is its own step; together, the rows share steps.
    assert!(
        rows >= 4 * steps,
        "32 concurrent requests ran {rows} rows in {steps} steps (mean batch < 4)"
    );
    eprintln!(
        "32 concurrent: {rows} rows in {steps} steps, mean batch {:.1}",
        rows as f64 / steps as f64
    );

    // 200 more requests in waves of 32: resident memory after the first waves and at the end.
    let mut measured = Vec::new();
    for wave in 0..7 {
        let n = if wave < 6 { 32 } else { 200 - 6 * 32 };
        let outs = join_all((0..n).map(|i| stream_one(&server, wave * 32 + i, max_tokens))).await;
        assert!(
            outs.iter().all(|o| !o.1.is_empty()),
            "wave {wave}: a stream did not finish"
        );
        measured.push(rss_bytes());
    }
    // The allocator's arenas make single readings jump by tens of MB; a leak of even 0.5 MB
    // per request would add 100 MB over the 200.
    // A leak raises every later reading, so the smallest of the last three is compared.
    let early = measured[0].max(measured[1]);
    let last = *measured[measured.len() - 3..].iter().min().unwrap();
    eprintln!(
        "RSS after waves: {:?} MB",
        measured.iter().map(|b| b >> 20).collect::<Vec<_>>()
    );
    assert!(
        last <= early + (64 << 20),
        "resident memory grew from {} MB to {} MB over 200 requests",
        early >> 20,
        last >> 20
    );
    // Rows that ended by length run one more step (their last token enters the saved state).
    let mut h = server.health().await;
    for _ in 0..200 {
        if h["active"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        h = server.health().await;
    }
    assert_eq!(h["active"], 0, "{h}");
    assert_eq!(h["completed"], 32 + 32 + 200);
    assert!(h["prompt_cache_bytes"].as_u64().unwrap() <= 8 << 20);
}
