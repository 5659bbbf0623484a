//! A generation session: one sequence's recurrent state on a shared model, the tokens it has
//! seen, and token-level generation with sampling, EOS, streaming and cancellation.

use crate::cache::Mamba2Cache;
use crate::model::Mamba2Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A cheap, cloneable flag that stops a running generation between two tokens.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Requests cancellation; the generation stops before sampling its next token.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// Clears the flag so the token can be reused.
    pub fn reset(&self) {
        self.0.store(false, Ordering::SeqCst)
    }
}

/// Token-level generation options.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Sampling (greedy by default).
    pub sampling: SamplingParams,
    /// Generation stops after producing one of these (the EOS token is emitted, then it stops).
    pub eos_token_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingParams::greedy(),
            eos_token_ids: Vec::new(),
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum StopReason {
    /// An EOS token was produced.
    Eos,
    /// `max_new_tokens` reached.
    MaxTokens,
    /// The callback asked to stop (e.g. a stop string matched).
    Callback,
    /// The [`CancelToken`] was cancelled.
    Cancelled,
}

/// What a generation did, with its speed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GenerationSummary {
    /// Tokens produced (including a final EOS).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Tokens fed before generating (pending prompt tokens).
    pub prompt_tokens: usize,
    /// Prompt tokens per second (0 when no prompt was pending).
    pub prompt_tok_s: f64,
    /// Generated tokens per second.
    pub decode_tok_s: f64,
}

/// One sequence on a shared model. `Send`: move it to a worker thread; the model behind the
/// `Arc` is shared read-only by every session.
///
/// ```
/// use std::sync::Arc;
/// use candle_core::{DType, Device};
/// use mamba2::{Mamba2Config, Mamba2Model, session::{Session, GenerateOptions, CancelToken}};
/// let mut cfg = Mamba2Config::preset("130m")?;
/// cfg.n_layer = 1; cfg.d_model = 64; cfg.d_inner = 128; cfg.nheads = 2; cfg.d_state = 16;
/// cfg.vocab_size = 50; cfg.pad_vocab_size_multiple = 1;
/// let model = Arc::new(Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 7)?);
/// let mut session = Session::new(model.clone())?;
/// session.feed(&[1, 2, 3])?;
/// let opts = GenerateOptions { max_new_tokens: 4, ..Default::default() };
/// let out = session.generate(&opts, &CancelToken::new(), |_tok| std::ops::ControlFlow::Continue(()))?;
/// assert_eq!(out.tokens.len(), 4);
/// assert_eq!(session.tokens().len(), 7); // the state has seen every emitted token
/// # Ok::<(), mamba2::Error>(())
/// ```
#[derive(Debug)]
pub struct Session {
    model: Arc<Mamba2Model>,
    cache: Mamba2Cache,
    tokens: Vec<u32>,
    /// Tokens given to `feed` that are not in the state yet: fed lazily, in one prefill.
    pending: Vec<u32>,
    /// f32 logits `(vocab_rows)` after the last token in the state.
    last_logits: Option<Vec<f32>>,
    /// `(seed, generator state)` after the last generation, so that later turns with the same
    /// seed continue one random stream instead of replaying it.
    rng: Option<(u64, [u64; 4])>,
}

impl Session {
    /// A fresh session (empty state).
    pub fn new(model: Arc<Mamba2Model>) -> Result<Self> {
        let cache = model.new_cache(1)?;
        Ok(Self {
            model,
            cache,
            tokens: Vec::new(),
            pending: Vec::new(),
            last_logits: None,
            rng: None,
        })
    }

    /// Rebuilds a session from saved parts (used by the session file loader).
    pub(crate) fn from_parts(
        model: Arc<Mamba2Model>,
        cache: Mamba2Cache,
        tokens: Vec<u32>,
        last_logits: Option<Vec<f32>>,
        rng: Option<(u64, [u64; 4])>,
    ) -> Self {
        Self {
            model,
            cache,
            tokens,
            pending: Vec::new(),
            last_logits,
            rng,
        }
    }

    /// `(seed, generator state)` of the sampler after the last generation.
    pub(crate) fn rng(&self) -> Option<(u64, [u64; 4])> {
        self.rng
    }

    /// The shared model.
    pub fn model(&self) -> &Arc<Mamba2Model> {
        &self.model
    }

    /// Every token the state has seen, in order (prompt and generated).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The recurrent state.
    pub fn cache(&self) -> &Mamba2Cache {
        &self.cache
    }

    /// Logits after the last token, `(vocab_rows)` f32; `None` before any token.
    pub fn last_logits(&self) -> Option<&[f32]> {
        self.last_logits.as_deref()
    }

    /// Queues tokens (a prompt, or a new user turn); they are run through the model, in one
    /// chunked prefill, before the next generation or on [`Session::flush`].
    pub fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        let rows = self.model.vocab_rows();
        if let Some((pos, &id)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= rows)
        {
            return Err(Error::TokenOutOfRange {
                id: id as i64,
                position: pos,
                vocab: rows,
            });
        }
        self.pending.extend_from_slice(tokens);
        Ok(())
    }

    /// Runs pending tokens through the model now. Returns how many were processed.
    pub fn flush(&mut self) -> Result<usize> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let pending = std::mem::take(&mut self.pending);
        let logits = if pending.len() == 1 {
            let ids = Tensor::new(&pending[..], self.model.device())?; // (1)
            self.model.step(&ids, &mut self.cache)?.squeeze(0)? // (vocab_rows)
        } else {
            let ids = Tensor::new(&pending[..], self.model.device())?.unsqueeze(0)?; // (1, n)
            self.model.prefill(&ids, &mut self.cache)?.squeeze(0)?
        };
        self.last_logits = Some(logits.to_device(&Device::Cpu)?.to_vec1::<f32>()?);
        self.tokens.extend_from_slice(&pending);
        Ok(pending.len())
    }

    /// Forgets everything: empty state, no tokens.
    pub fn reset(&mut self) -> Result<()> {
        self.cache.reset()?;
        self.tokens.clear();
        self.pending.clear();
        self.last_logits = None;
        self.rng = None;
        Ok(())
    }

    /// An independent copy of this session (same model, copied state).
    pub fn fork(&self) -> Result<Self> {
        Ok(Self {
            model: self.model.clone(),
            cache: self.cache.deep_clone()?,
            tokens: self.tokens.clone(),
            pending: self.pending.clone(),
            last_logits: self.last_logits.clone(),
            rng: self.rng,
        })
    }

    /// Generates up to `opts.max_new_tokens` tokens, calling `on_token` with each as soon as it
    /// is sampled. Every emitted token is fed back, so after return (also after cancellation or
    /// an early stop) the state has seen exactly [`Session::tokens`].
    pub fn generate(
        &mut self,
        opts: &GenerateOptions,
        cancel: &CancelToken,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<GenerationSummary> {
        let mut sampler = Sampler::new(opts.sampling.clone())?;
        if let Some((seed, state)) = self.rng {
            if seed == opts.sampling.seed {
                sampler.set_rng_state(state)?;
            }
        }
        let t0 = Instant::now();
        let prompt_tokens = self.flush()?;
        let prompt_s = t0.elapsed().as_secs_f64();
        if self.last_logits.is_none() {
            return Err(Error::EmptyPrompt);
        }
        let allowed = self.model.config().vocab_size.min(self.model.vocab_rows());
        let t1 = Instant::now();
        let mut out = Vec::new();
        let mut stop_reason = StopReason::MaxTokens;
        while out.len() < opts.max_new_tokens {
            if cancel.is_cancelled() {
                stop_reason = StopReason::Cancelled;
                break;
            }
            let logits = self.last_logits.as_deref().expect("flushed above");
            let tok = sampler.sample(logits, &self.tokens, allowed)?;
            out.push(tok);
            self.feed(&[tok])?;
            self.flush()?;
            if opts.eos_token_ids.contains(&tok) {
                stop_reason = StopReason::Eos;
                break;
            }
            if on_token(tok).is_break() {
                stop_reason = StopReason::Callback;
                break;
            }
        }
        self.rng = Some((opts.sampling.seed, sampler.rng_state()));
        let decode_s = t1.elapsed().as_secs_f64();
        Ok(GenerationSummary {
            prompt_tokens,
            prompt_tok_s: if prompt_tokens > 0 {
                prompt_tokens as f64 / prompt_s.max(1e-9)
            } else {
                0.0
            },
            decode_tok_s: out.len() as f64 / decode_s.max(1e-9),
            tokens: out,
            stop_reason,
        })
    }
}
