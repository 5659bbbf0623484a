//! Prompt-state reuse and cancellation.
//!
//! - The second turn of a chat restores the first turn's state and prefills only its new
//!   tokens, and its output equals a server's that has no cache.
//! - A client that disconnects mid-stream frees its slot; the server keeps serving.

mod support;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessageArgs, ChatCompletionRequestMessage,
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
    CreateChatCompletionResponse,
};
use futures_util::StreamExt;
use mamba2_server::engine::EngineConfig;
use mamba2_server::routes::HttpConfig;
use mamba2_server::template::{render_chat, Message, Role};
use serde_json::json;
use support::{generator, TestServer, MODEL};

fn user(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessageArgs::default()
        .content(text)
        .build()
        .unwrap()
        .into()
}

fn assistant(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestAssistantMessageArgs::default()
        .content(text)
        .build()
        .unwrap()
        .into()
}

async fn chat(
    server: &TestServer,
    messages: Vec<ChatCompletionRequestMessage>,
) -> (CreateChatCompletionResponse, serde_json::Value) {
    // Raw JSON as well, for the timings extension the typed response drops.
    let req = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages(messages)
        .max_completion_tokens(8u32)
        .temperature(0.0)
        .build()
        .unwrap();
    let raw: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", server.base))
        .json(&req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let typed = serde_json::from_value(raw.clone()).unwrap();
    (typed, raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_turn_prefills_only_new_tokens_with_identical_output() {
    let cached = TestServer::default().await;
    let uncached = TestServer::start(
        EngineConfig {
            prompt_cache_bytes: 0,
            ..Default::default()
        },
        HttpConfig::new(MODEL),
    )
    .await;
    let q1 = "Tell me about Mr. Bingley and his sisters at the ball.";
    let q2 = "And what did Mrs. Bennet think of him?";
    let (turn1, _) = chat(&cached, vec![user(q1)]).await;
    let reply = turn1.choices[0].message.content.clone().unwrap();
    let u1 = turn1.usage.unwrap();
    assert_eq!(u1.completion_tokens, 8, "turn 1 ends by length: {reply:?}");
    let turn2_msgs = vec![user(q1), assistant(&reply), user(q2)];
    let (turn2, raw2) = chat(&cached, turn2_msgs.clone()).await;
    let (turn2_plain, raw_plain) = chat(&uncached, turn2_msgs).await;

    // The first turn's whole text (prompt and reply) came from the cache ...
    let u2 = turn2.usage.unwrap();
    let hit = u2.prompt_tokens_details.unwrap().cached_tokens.unwrap();
    assert_eq!(hit, u1.prompt_tokens + u1.completion_tokens);
    // ... so only the new tokens were prefilled: the second user message and its framing.
    let render = |msgs: &[(Role, &str)]| {
        let m: Vec<Message> = msgs
            .iter()
            .map(|(role, c)| Message {
                role: *role,
                content: c.to_string(),
            })
            .collect();
        generator().encode(&render_chat(&m)).unwrap()
    };
    let full = render(&[
        (Role::User, q1),
        (Role::Assistant, &reply),
        (Role::User, q2),
    ]);
    assert_eq!(u2.prompt_tokens as usize, full.len());
    let new_tokens = full.len() - hit as usize;
    assert_eq!(raw2["timings"]["prompt_n"], new_tokens);
    assert!(
        new_tokens < full.len() / 2,
        "{new_tokens} of {}",
        full.len()
    );
    // Without the cache the whole conversation is prefilled, and the answer is the same.
    let plain = turn2_plain.usage.unwrap();
    assert_eq!(plain.prompt_tokens_details.unwrap().cached_tokens, Some(0));
    assert_eq!(raw_plain["timings"]["prompt_n"], full.len());
    assert_eq!(
        turn2.choices[0].message.content,
        turn2_plain.choices[0].message.content
    );
    eprintln!(
        "turn 2: {} prompt tokens; with the cache {} prefilled in {} ms, without {} in {} ms",
        full.len(),
        new_tokens,
        raw2["timings"]["prompt_ms"],
        full.len(),
        raw_plain["timings"]["prompt_ms"]
    );
    let h = cached.health().await;
    assert!(h["prompt_cache_entries"].as_u64().unwrap() >= 2, "{h}");
    assert_eq!(h["cached_tokens"], hit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_stream_frees_the_slot() {
    let server = TestServer::default().await;
    let body =
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 30000, "stream": true});
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", server.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut bytes = r.bytes_stream();
    let mut seen = 0;
    while seen < 5 {
        let chunk = bytes.next().await.unwrap().unwrap();
        seen += chunk.windows(5).filter(|w| w == b"data:").count();
    }
    assert_eq!(server.health().await["active"], 1);
    drop(bytes);
    let mut freed = None;
    for _ in 0..400 {
        let h = server.health().await;
        if h["active"] == 0 {
            freed = Some(h);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let h = freed.expect("the slot of a disconnected client was not freed");
    assert_eq!(h["cancelled"], 1);
    assert_eq!(h["completed"], 0);
    let steps = h["decode_steps"].as_u64().unwrap();
    assert!(steps < 30000, "generation ran to its end: {steps} steps");
    // The server goes on serving.
    let req = async_openai::types::completions::CreateCompletionRequestArgs::default()
        .model(MODEL)
        .prompt("Hello")
        .max_tokens(3u32)
        .build()
        .unwrap();
    let r = server.client().completions().create(req).await.unwrap();
    assert_eq!(r.usage.unwrap().completion_tokens, 3);
}
