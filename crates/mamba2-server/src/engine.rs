//! The engine: one thread that owns the generation loop ([`crate::scheduler`]) and a handle
//! the HTTP handlers submit requests through. Requests beyond the batch wait in a bounded
//! queue; a full queue is refused at once ([`ApiError::QueueFull`]).

use crate::error::ApiError;
use crate::scheduler::Scheduler;
use mamba2::sampling::SamplingParams;
use mamba2::Mamba2Model;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Scheduling limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most sequences generating at once (rows of a batched decode step).
    pub max_batch: usize,
    /// Most requests waiting for a slot; more are refused with 503.
    pub max_queue: usize,
    /// Prompt tokens prefilled between two decode steps (in pieces of at most this size, one
    /// sequence after another), so that a long prompt delays the others' next token by one
    /// piece only.
    pub prefill_chunk: usize,
    /// Byte budget of the prompt-state cache (0 turns it off).
    pub prompt_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_queue: 256,
            prefill_chunk: 256,
            prompt_cache_bytes: 1 << 30,
        }
    }
}

/// One generation request, tokenized and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// Prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (at least one).
    pub max_tokens: usize,
    /// Sampler settings (validated).
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings; they are not sent.
    pub stop: Vec<String>,
}

/// Why a generation ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// OpenAI's `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The end of a generation, with its counts and timings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens restored from the prompt-state cache (not prefilled).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

/// What the engine sends back for one request, in order: text pieces, then one `Done` or
/// `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Newly generated text (never a split UTF-8 character).
    Text(String),
    /// The generation ended.
    Done(Finish),
    /// The model failed on this request.
    Error(String),
}

/// Counters, readable from any thread (`GET /health` shows them).
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) in_flight: AtomicUsize,
    pub(crate) active: AtomicUsize,
    pub(crate) completed: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) decode_steps: AtomicU64,
    pub(crate) decode_rows: AtomicU64,
    pub(crate) prefill_tokens: AtomicU64,
    pub(crate) cached_tokens: AtomicU64,
    pub(crate) cache_entries: AtomicUsize,
    pub(crate) cache_bytes: AtomicUsize,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Sequences holding a batch slot (prefilling or generating).
    pub active: usize,
    /// Requests waiting for a slot.
    pub queued: usize,
    /// Requests finished (any reason) and cancelled (client gone).
    pub completed: u64,
    pub cancelled: u64,
    /// Decode steps run, and rows summed over them (rows / steps = mean batch).
    pub decode_steps: u64,
    pub decode_rows: u64,
    /// Prompt tokens prefilled, and prompt tokens restored from the prompt-state cache.
    pub prefill_tokens: u64,
    pub cached_tokens: u64,
    /// Prompt-state cache entries and bytes.
    pub prompt_cache_entries: usize,
    pub prompt_cache_bytes: usize,
}

impl Stats {
    /// The current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        let in_flight = self.in_flight.load(Ordering::SeqCst);
        let active = self.active.load(Ordering::SeqCst);
        StatsSnapshot {
            active,
            queued: in_flight.saturating_sub(active),
            completed: self.completed.load(Ordering::SeqCst),
            cancelled: self.cancelled.load(Ordering::SeqCst),
            decode_steps: self.decode_steps.load(Ordering::SeqCst),
            decode_rows: self.decode_rows.load(Ordering::SeqCst),
            prefill_tokens: self.prefill_tokens.load(Ordering::SeqCst),
            cached_tokens: self.cached_tokens.load(Ordering::SeqCst),
            prompt_cache_entries: self.cache_entries.load(Ordering::SeqCst),
            prompt_cache_bytes: self.cache_bytes.load(Ordering::SeqCst),
        }
    }
}

/// A submitted request as the scheduler receives it.
pub(crate) struct Job {
    pub request: GenRequest,
    pub events: UnboundedSender<Event>,
}

/// Handle to the engine thread. Dropping the last handle lets the thread finish its running
/// requests' current step and exit once idle.
pub struct Engine {
    jobs: Mutex<mpsc::Sender<Job>>,
    stats: Arc<Stats>,
    config: EngineConfig,
}

impl Engine {
    /// Starts the engine thread for `model`. `eos_token_ids` end a generation; `tokenizer`
    /// turns tokens into streamed text.
    pub fn start(
        model: Arc<Mamba2Model>,
        tokenizer: Arc<Tokenizer>,
        eos_token_ids: Vec<u32>,
        config: EngineConfig,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let scheduler = Scheduler::new(
            model,
            tokenizer,
            eos_token_ids,
            config.clone(),
            stats.clone(),
            rx,
        );
        std::thread::Builder::new()
            .name("mamba2-engine".into())
            .spawn(move || scheduler.run())
            .expect("spawning the engine thread");
        Self {
            jobs: Mutex::new(tx),
            stats,
            config,
        }
    }

    /// Queues `request`; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request (its slot is freed before the next decode step).
    pub fn submit(&self, request: GenRequest) -> Result<UnboundedReceiver<Event>, ApiError> {
        let capacity = self.config.max_batch + self.config.max_queue;
        let before = self.stats.in_flight.fetch_add(1, Ordering::SeqCst);
        if before >= capacity {
            self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::QueueFull {
                capacity,
                retry_after_s: 1,
            });
        }
        let (events, rx) = unbounded_channel();
        let sent = self
            .jobs
            .lock()
            .map_err(|_| ApiError::Internal("the engine lock is poisoned".into()))?
            .send(Job { request, events });
        if sent.is_err() {
            self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::Internal("the engine has stopped".into()));
        }
        Ok(rx)
    }

    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The limits the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
}
