//! The HTTP surface: OpenAI's `/v1/models`, `/v1/completions` and `/v1/chat/completions`
//! (JSON or Server-Sent Events), and `/health`.

use crate::api::{
    ChatChoice, ChatChunk, ChatCompletion, ChatCompletionRequest, ChunkChoice, CommonParams,
    Completion, CompletionChoice, CompletionRequest, Delta, MessageContent, ModelCard, ModelList,
    PromptSpec, PromptTokensDetails, ResponseMessage, Timings, Usage,
};
use crate::engine::{Engine, Event, Finish, GenRequest};
use crate::error::ApiError;
use crate::template::{render_chat, Message, Role, CHAT_STOP};
use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mamba2::chat_template::{ChatMessage, ChatOptions};
use mamba2::pipeline::TextGenerator;
use mamba2::sampling::SamplingParams;
use serde::de::DeserializeOwned;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;

/// Request limits and defaults of the HTTP layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// The model id clients must name (`GET /v1/models` lists it).
    pub model_id: String,
    /// Longest prompt accepted, in tokens (longer ones get 413).
    pub max_prompt_tokens: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Largest `max_tokens` accepted.
    pub max_tokens_limit: usize,
}

impl HttpConfig {
    /// Defaults for `model_id`: prompts up to 32768 tokens, 256 new tokens unless asked,
    /// at most 32768.
    pub fn new(model_id: impl Into<String>) -> Self {
        Self {
            model_id: model_id.into(),
            max_prompt_tokens: 32768,
            default_max_tokens: 256,
            max_tokens_limit: 32768,
        }
    }
}

/// What every handler shares.
pub struct AppState {
    generator: TextGenerator,
    engine: Engine,
    config: HttpConfig,
    created: u64,
    counter: AtomicU64,
}

impl AppState {
    /// The state for `generator` (whose model and tokenizer the engine uses) and `engine`.
    pub fn new(generator: TextGenerator, engine: Engine, config: HttpConfig) -> Self {
        Self {
            generator,
            engine,
            config,
            created: now(),
            counter: AtomicU64::new(0),
        }
    }

    /// The engine (for its counters).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.created)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

const FINGERPRINT: &str = concat!("mamba2-rs-", env!("CARGO_PKG_VERSION"));

/// The router with every endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(state)
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let stats = s.engine.stats();
    let mut body = serde_json::to_value(stats).unwrap_or_default();
    body["status"] = "ok".into();
    body["model"] = s.config.model_id.clone().into();
    body["max_batch"] = s.engine.config().max_batch.into();
    Json(body).into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: s.config.model_id.clone(),
            object: "model",
            created: s.created,
            owned_by: "mamba2-rs",
        }],
    })
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// The generation settings of a request, checked against OpenAI's ranges.
fn gen_settings(
    p: &CommonParams,
    config: &HttpConfig,
) -> Result<(usize, SamplingParams, Vec<String>), ApiError> {
    if let Some(n) = p.n {
        if n != 1 {
            return Err(ApiError::param("n", "only n = 1 is supported"));
        }
    }
    let mut sampling = SamplingParams::greedy();
    if let Some(t) = p.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::param(
                "temperature",
                format!("temperature must be between 0 and 2, got {t}"),
            ));
        }
        sampling.temperature = t;
    } else {
        // OpenAI's default temperature is 1.
        sampling.temperature = 1.0;
    }
    if let Some(tp) = p.top_p {
        if !(tp > 0.0 && tp <= 1.0) {
            return Err(ApiError::param(
                "top_p",
                format!("top_p must be in (0, 1], got {tp}"),
            ));
        }
        sampling.top_p = Some(tp);
    }
    if let Some(seed) = p.seed {
        sampling.seed = seed as u64;
    }
    let max_tokens = match p.max_completion_tokens.or(p.max_tokens) {
        None => config.default_max_tokens,
        Some(0) => {
            return Err(ApiError::param(
                "max_tokens",
                "max_tokens must be at least 1",
            ))
        }
        Some(n) if n as usize > config.max_tokens_limit => {
            return Err(ApiError::param(
                "max_tokens",
                format!(
                    "max_tokens is {n}, more than this server's limit of {}",
                    config.max_tokens_limit
                ),
            ))
        }
        Some(n) => n as usize,
    };
    let stop = p.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::param("stop", "at most 4 stop sequences"));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::param("stop", "stop sequences must not be empty"));
    }
    Ok((max_tokens, sampling, stop))
}

fn check_model(s: &AppState, model: &str) -> Result<(), ApiError> {
    if model != s.config.model_id {
        return Err(ApiError::ModelNotFound(model.to_string()));
    }
    Ok(())
}

fn check_prompt(s: &AppState, prompt: &[u32], param: &str) -> Result<(), ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::param(param, "the prompt is empty"));
    }
    if prompt.len() > s.config.max_prompt_tokens {
        return Err(ApiError::PromptTooLong {
            tokens: prompt.len(),
            limit: s.config.max_prompt_tokens,
        });
    }
    let rows = s.generator.model().vocab_rows();
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= rows) {
        return Err(ApiError::param(
            param,
            format!("token id {id} is out of range (vocabulary of {rows})"),
        ));
    }
    Ok(())
}

fn encode(s: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    s.generator
        .encode(text)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// The messages of a chat request, as the template reads them.
pub fn chat_messages(req: &ChatCompletionRequest) -> Result<Vec<Message>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = Role::parse(&m.role).ok_or_else(|| {
                ApiError::param(
                    &format!("messages[{i}].role"),
                    format!("unsupported role `{}`", m.role),
                )
            })?;
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => parts
                    .iter()
                    .filter(|p| p.kind == "text")
                    .filter_map(|p| p.text.as_deref())
                    .collect::<Vec<_>>()
                    .join("\n"),
            };
            Ok(Message { role, content })
        })
        .collect()
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    match chat_inner(s, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(s: Arc<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse(&body)?;
    check_model(&s, &req.model)?;
    let (max_tokens, sampling, mut stop) = gen_settings(&req.params, &s.config)?;
    let messages = chat_messages(&req)?;
    let text = match s.generator.chat_template() {
        // The model's own template; its turns end with an EOS token, not with a next turn.
        Some(template) => {
            let msgs: Vec<ChatMessage> = messages
                .iter()
                .map(|m| ChatMessage::new(m.role.name(), m.content.clone()))
                .collect();
            let opts = ChatOptions {
                add_generation_prompt: true,
                ..Default::default()
            };
            template
                .render(&msgs, &opts)
                .map_err(|e| ApiError::param("messages", e.to_string()))?
        }
        None => {
            stop.push(CHAT_STOP.to_string());
            render_chat(&messages)
        }
    };
    let prompt = encode(&s, &text)?;
    check_prompt(&s, &prompt, "messages")?;
    let rx = s.engine.submit(GenRequest {
        prompt,
        max_tokens,
        sampling,
        stop,
    })?;
    let meta = Meta {
        id: s.next_id("chatcmpl"),
        created: now(),
        model: s.config.model_id.clone(),
        chat: true,
    };
    if req.params.stream {
        let include_usage = req.params.stream_options.is_some_and(|o| o.include_usage);
        return Ok(sse(rx, meta, include_usage));
    }
    let (text, finish) = collect(rx).await?;
    Ok(Json(ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: FINGERPRINT.into(),
        choices: vec![ChatChoice {
            index: 0,
            message: ResponseMessage {
                role: "assistant",
                content: text,
            },
            logprobs: None,
            finish_reason: finish.reason.as_str(),
        }],
        usage: usage(&finish),
        timings: timings(&finish),
    })
    .into_response())
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    match completions_inner(s, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(s: Arc<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body)?;
    check_model(&s, &req.model)?;
    let (max_tokens, sampling, stop) = gen_settings(&req.params, &s.config)?;
    let one_prompt = || ApiError::param("prompt", "exactly one prompt per request is supported");
    let prompt = match &req.prompt {
        PromptSpec::Text(t) => encode(&s, t)?,
        PromptSpec::Texts(v) if v.len() == 1 => encode(&s, &v[0])?,
        PromptSpec::Tokens(ids) => ids.clone(),
        PromptSpec::TokenLists(v) if v.len() == 1 => v[0].clone(),
        _ => return Err(one_prompt()),
    };
    check_prompt(&s, &prompt, "prompt")?;
    let rx = s.engine.submit(GenRequest {
        prompt,
        max_tokens,
        sampling,
        stop,
    })?;
    let meta = Meta {
        id: s.next_id("cmpl"),
        created: now(),
        model: s.config.model_id.clone(),
        chat: false,
    };
    if req.params.stream {
        let include_usage = req.params.stream_options.is_some_and(|o| o.include_usage);
        return Ok(sse(rx, meta, include_usage));
    }
    let (text, finish) = collect(rx).await?;
    Ok(Json(Completion {
        id: meta.id,
        object: "text_completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: FINGERPRINT.into(),
        choices: vec![CompletionChoice {
            text,
            index: 0,
            logprobs: None,
            finish_reason: Some(finish.reason.as_str()),
        }],
        usage: Some(usage(&finish)),
        timings: Some(timings(&finish)),
    })
    .into_response())
}

fn usage(f: &Finish) -> Usage {
    Usage {
        prompt_tokens: f.prompt_tokens as u32,
        completion_tokens: f.completion_tokens as u32,
        total_tokens: (f.prompt_tokens + f.completion_tokens) as u32,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: f.cached_tokens as u32,
        },
    }
}

fn timings(f: &Finish) -> Timings {
    Timings {
        cached_n: f.cached_tokens as u32,
        prompt_n: (f.prompt_tokens - f.cached_tokens) as u32,
        prompt_ms: f.prefill_ms,
        predicted_n: f.completion_tokens as u32,
        predicted_ms: f.decode_ms,
    }
}

/// Waits for the whole generation. Dropping this future (the client went away) drops the
/// receiver, which cancels the request.
async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<(String, Finish), ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done(f) => return Ok((text, f)),
            Event::Error(m) => return Err(ApiError::Internal(m)),
        }
    }
    Err(ApiError::Internal(
        "the engine stopped before finishing".into(),
    ))
}

/// What every chunk of one response repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    chat: bool,
}

impl Meta {
    fn chunk(&self, text: Option<String>, finish: Option<&'static str>, first: bool) -> String {
        let json = if self.chat {
            serde_json::to_string(&ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                system_fingerprint: FINGERPRINT.into(),
                choices: vec![ChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: first.then_some("assistant"),
                        content: text,
                    },
                    logprobs: None,
                    finish_reason: finish,
                }],
                usage: None,
                timings: None,
            })
        } else {
            serde_json::to_string(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                system_fingerprint: FINGERPRINT.into(),
                choices: vec![CompletionChoice {
                    text: text.unwrap_or_default(),
                    index: 0,
                    logprobs: None,
                    finish_reason: finish,
                }],
                usage: None,
                timings: None,
            })
        };
        json.expect("serializable")
    }

    fn usage_chunk(&self, f: &Finish) -> String {
        let json = if self.chat {
            serde_json::to_string(&ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                system_fingerprint: FINGERPRINT.into(),
                choices: vec![],
                usage: Some(usage(f)),
                timings: Some(timings(f)),
            })
        } else {
            serde_json::to_string(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                system_fingerprint: FINGERPRINT.into(),
                choices: vec![],
                usage: Some(usage(f)),
                timings: Some(timings(f)),
            })
        };
        json.expect("serializable")
    }
}

struct StreamState {
    rx: UnboundedReceiver<Event>,
    meta: Meta,
    include_usage: bool,
    queue: VecDeque<String>,
    done: bool,
}

/// The response as Server-Sent Events: `data: <chunk JSON>` per piece of text, a last chunk
/// with the finish reason, the usage chunk when asked, then `data: [DONE]`. An engine error
/// is sent as `data: {"error": ...}` and ends the stream.
fn sse(rx: UnboundedReceiver<Event>, meta: Meta, include_usage: bool) -> Response {
    let mut queue = VecDeque::new();
    if meta.chat {
        queue.push_back(meta.chunk(Some(String::new()), None, true));
    }
    let state = StreamState {
        rx,
        meta,
        include_usage,
        queue,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(data) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some(Event::Text(t)) => st.queue.push_back(st.meta.chunk(Some(t), None, false)),
                Some(Event::Done(f)) => {
                    let empty = if st.meta.chat {
                        None
                    } else {
                        Some(String::new())
                    };
                    st.queue
                        .push_back(st.meta.chunk(empty, Some(f.reason.as_str()), false));
                    if st.include_usage {
                        st.queue.push_back(st.meta.usage_chunk(&f));
                    }
                    st.queue.push_back("[DONE]".into());
                    st.done = true;
                }
                Some(Event::Error(m)) => {
                    st.queue.push_back(ApiError::Internal(m).body().to_string());
                    st.done = true;
                }
                None => {
                    let e = ApiError::Internal("the engine stopped before finishing".into());
                    st.queue.push_back(e.body().to_string());
                    st.done = true;
                }
            }
        }
    });
    Sse::new(stream).into_response()
}
