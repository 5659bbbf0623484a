//! Every error status with OpenAI's error JSON: 400 (malformed JSON, missing field, invalid
//! parameter), 404 (unknown model), 413 (prompt over the limit), 503 with `Retry-After` (queue
//! full). Raw HTTP for the statuses and headers; `async-openai` to show a client reads the
//! error object.

mod support;
use mamba2_server::engine::EngineConfig;
use mamba2_server::routes::HttpConfig;
use serde_json::{json, Value};
use support::{TestServer, MODEL};

async fn post(server: &TestServer, path: &str, body: String) -> (u16, Option<String>, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", server.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, r.json().await.unwrap())
}

fn assert_error(body: &Value, kind: &str, param: Option<&str>, code: Option<&str>) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(e["type"], kind, "{body}");
    assert_eq!(e["param"].as_str(), param, "{body}");
    assert_eq!(e["code"].as_str(), code, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_400() {
    let server = TestServer::default().await;
    let chat = "/v1/chat/completions";
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        (chat, "{\"model\": ".into(), None),
        (chat, "not json".into(), None),
        (chat, json!({"model": MODEL}).to_string(), None),
        (
            chat,
            json!({"model": MODEL, "messages": []}).to_string(),
            Some("messages"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}).to_string(),
            Some("messages[0].role"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 3.5}).to_string(),
            Some("temperature"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}).to_string(),
            Some("top_p"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).to_string(),
            Some("max_tokens"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}).to_string(),
            Some("n"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}).to_string(),
            Some("stop"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": ""}).to_string(),
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": ["one", "two"]}).to_string(),
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": [1, 2, 999999]}).to_string(),
            Some("prompt"),
        ),
    ];
    for (path, body, param) in cases {
        let (status, _, v) = post(&server, path, body.clone()).await;
        assert_eq!(status, 400, "{body} -> {v}");
        assert_error(&v, "invalid_request_error", param, None);
    }
    // The client reads the same object.
    let req = async_openai::types::completions::CreateCompletionRequestArgs::default()
        .model(MODEL)
        .prompt("hi")
        .temperature(9.0)
        .build()
        .unwrap();
    match server.client().completions().create(req).await {
        Err(async_openai::error::OpenAIError::ApiError(e)) => {
            assert_eq!(e.param.as_deref(), Some("temperature"));
            assert_eq!(e.r#type.as_deref(), Some("invalid_request_error"));
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_404() {
    let server = TestServer::default().await;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, v) = post(&server, "/v1/chat/completions", body.to_string()).await;
    assert_eq!(status, 404);
    assert_error(
        &v,
        "invalid_request_error",
        Some("model"),
        Some("model_not_found"),
    );
    let body = json!({"model": "nope", "prompt": "hi"});
    let (status, _, _) = post(&server, "/v1/completions", body.to_string()).await;
    assert_eq!(status, 404);
    let req = async_openai::types::completions::CreateCompletionRequestArgs::default()
        .model("nope")
        .prompt("hi")
        .build()
        .unwrap();
    match server.client().completions().create(req).await {
        Err(async_openai::error::OpenAIError::ApiError(e)) => {
            assert_eq!(e.code.as_deref(), Some("model_not_found"))
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_over_the_limit_is_413() {
    let mut http = HttpConfig::new(MODEL);
    http.max_prompt_tokens = 16;
    let server = TestServer::start(EngineConfig::default(), http).await;
    let long = "the cat sat on the mat ".repeat(10);
    let body = json!({"model": MODEL, "prompt": long, "max_tokens": 2});
    let (status, _, v) = post(&server, "/v1/completions", body.to_string()).await;
    assert_eq!(status, 413);
    assert_error(
        &v,
        "invalid_request_error",
        Some("messages"),
        Some("context_length_exceeded"),
    );
    // Just under the limit is served.
    let body = json!({"model": MODEL, "prompt": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], "max_tokens": 2});
    let (status, _, v) = post(&server, "/v1/completions", body.to_string()).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_503_with_retry_after() {
    let engine = EngineConfig {
        max_batch: 1,
        max_queue: 1,
        ..Default::default()
    };
    let server = TestServer::start(engine, HttpConfig::new(MODEL)).await;
    // Two long streams take the slot and the queue place.
    let long = json!({"model": MODEL, "prompt": "Once", "max_tokens": 30000, "stream": true});
    let client = reqwest::Client::new();
    let mut held = Vec::new();
    for _ in 0..2 {
        let r = client
            .post(format!("{}/v1/completions", server.base))
            .json(&long)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        held.push(r);
    }
    let body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 2});
    let (status, retry, v) = post(&server, "/v1/completions", body.to_string()).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_error(&v, "server_error", None, Some("server_busy"));
    // Closing the streams frees the places: the next request is served.
    drop(held);
    let mut served = false;
    for _ in 0..200 {
        let (status, _, _) = post(&server, "/v1/completions", body.to_string()).await;
        if status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(served, "the server stayed full after its clients left");
}
