//! A generation session: one sequence's recurrent state on a shared model, the tokens it has
//! seen, and token-level generation with sampling, EOS, streaming and cancellation.

pub use crate::session_file::SESSION_FORMAT;

use crate::cache::Mamba2Cache;
use crate::model::Mamba2Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::{Error, Result};
use candle_core::Device;
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
        self.flush_cancellable(&CancelToken::new())
    }

    /// Tokens given to [`Session::feed`] that the state has not seen yet.
    pub fn pending(&self) -> &[u32] {
        &self.pending
    }

    /// Makes the session hold exactly `tokens` (seen or pending): when the tokens it holds are
    /// a prefix of `tokens` only the rest is fed, otherwise it starts over from an empty state
    /// (a recurrent state cannot be rewound). Returns how many tokens were reused. This is how
    /// a chat keeps its state across turns: each turn's prompt extends the last.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use candle_core::{DType, Device};
    /// use mamba2::{Mamba2Config, Mamba2Model, session::Session};
    /// let mut cfg = Mamba2Config::preset("130m")?;
    /// cfg.n_layer = 1; cfg.d_model = 64; cfg.d_inner = 128; cfg.nheads = 2; cfg.d_state = 16;
    /// cfg.vocab_size = 50; cfg.pad_vocab_size_multiple = 1;
    /// let mut s = Session::new(Arc::new(Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 7)?))?;
    /// assert_eq!(s.sync_tokens(&[1, 2, 3])?, 0);
    /// assert_eq!(s.sync_tokens(&[1, 2, 3, 4])?, 3); // extends: only 4 is fed
    /// assert_eq!(s.sync_tokens(&[1, 5])?, 0);       // diverges: starts over
    /// assert_eq!(s.pending(), &[1, 5]);
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn sync_tokens(&mut self, tokens: &[u32]) -> Result<usize> {
        let held = self.tokens.len() + self.pending.len();
        let extends =
            held <= tokens.len() && self.tokens.iter().chain(&self.pending).eq(&tokens[..held]);
        if extends {
            self.feed(&tokens[held..])?;
            Ok(held)
        } else {
            self.reset()?;
            self.feed(tokens)?;
            Ok(0)
        }
    }

    /// Drops the pending tokens (e.g. the rest of a prompt whose prefill was cancelled).
    pub fn discard_pending(&mut self) {
        self.pending.clear();
    }

    /// [`Session::flush`] that checks `cancel` before every prefill piece of
    /// [`Mamba2Model::max_prefill_tokens`] tokens. When cancelled it returns
    /// [`Error::Cancelled`]; the pieces already run stay in the state (and in
    /// [`Session::tokens`]), the rest stays [`Session::pending`], so a later flush or generation
    /// continues where it stopped (or [`Session::discard_pending`] drops it).
    pub fn flush_cancellable(&mut self, cancel: &CancelToken) -> Result<usize> {
        self.flush_with_progress(cancel, |_, _| {})
    }

    /// [`Session::flush_cancellable`] that calls `on_piece(done, total)` after every prefill
    /// piece (pending tokens prefilled so far, pending tokens in all).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use candle_core::{DType, Device};
    /// use mamba2::{Mamba2Config, Mamba2Model, session::{Session, CancelToken}};
    /// let mut cfg = Mamba2Config::preset("130m")?;
    /// cfg.n_layer = 1; cfg.d_model = 64; cfg.d_inner = 128; cfg.nheads = 2; cfg.d_state = 16;
    /// cfg.vocab_size = 50; cfg.pad_vocab_size_multiple = 1; cfg.chunk_size = 4;
    /// let mut model = Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 7)?;
    /// model.set_max_prefill_tokens(4);
    /// let mut session = Session::new(Arc::new(model))?;
    /// session.feed(&[1; 10])?;
    /// let cancel = CancelToken::new();
    /// let err = session.flush_with_progress(&cancel, |done, _total| if done >= 4 { cancel.cancel() });
    /// assert!(matches!(err, Err(mamba2::Error::Cancelled)));
    /// assert_eq!((session.tokens().len(), session.pending().len()), (4, 6));
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn flush_with_progress(
        &mut self,
        cancel: &CancelToken,
        mut on_piece: impl FnMut(usize, usize) + Send,
    ) -> Result<usize> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let pending = std::mem::take(&mut self.pending);
        let start = self.cache.seqlen_offset();
        // Ids were checked against the embedding in `feed`; the model checks them again on the
        // host, never on the device.
        let result = if pending.len() == 1 {
            let r = self.model.step_tokens(&pending, &mut self.cache);
            if r.is_ok() {
                on_piece(1, 1);
            }
            r
        } else {
            self.model.prefill_tokens_with_progress(
                &pending,
                &mut self.cache,
                cancel,
                &mut on_piece,
            )
        };
        let done = self.cache.seqlen_offset() - start;
        let logits = match result {
            Ok(l) => l.squeeze(0)?, // (vocab_rows)
            Err(e) => {
                // Keep tokens and state in step: what ran is seen, the rest is pending again.
                self.tokens.extend_from_slice(&pending[..done]);
                self.pending = pending[done..].to_vec();
                if done > 0 {
                    // The logits of a partial prefill were not kept; they are recomputed from
                    // the rest of the prompt, which must be fed before generating.
                    self.last_logits = None;
                }
                return Err(e);
            }
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
    /// an early stop) the state has seen exactly [`Session::tokens`]. Pending prompt tokens are
    /// prefilled first, checking `cancel` between pieces: a cancel during that prefill returns
    /// [`Error::Cancelled`] (see [`Session::flush_cancellable`]); one during decoding ends with
    /// [`StopReason::Cancelled`] and the tokens generated so far. An EOS token ends the
    /// generation without being passed to `on_token` (it is in the summary's tokens).
    pub fn generate(
        &mut self,
        opts: &GenerateOptions,
        cancel: &CancelToken,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<GenerationSummary> {
        let mut tokens = self.stream(opts, cancel)?;
        while let Some(tok) = tokens.next() {
            if on_token(tok?).is_break() {
                tokens.stop();
                break;
            }
        }
        Ok(tokens.finish())
    }

    /// The pull-style form of [`Session::generate`]: prefills the pending tokens (checking
    /// `cancel` between pieces), then returns an iterator that samples, feeds back and yields
    /// one token per `next()`: exactly the tokens `generate` passes to its callback, in order.
    /// Dropping the iterator (or calling [`TokenStream::stop`]) ends the generation with
    /// [`StopReason::Callback`]; [`TokenStream::finish`] gives the summary.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use candle_core::{DType, Device};
    /// use mamba2::{Mamba2Config, Mamba2Model, session::{Session, GenerateOptions, CancelToken}};
    /// let mut cfg = Mamba2Config::preset("130m")?;
    /// cfg.n_layer = 1; cfg.d_model = 64; cfg.d_inner = 128; cfg.nheads = 2; cfg.d_state = 16;
    /// cfg.vocab_size = 50; cfg.pad_vocab_size_multiple = 1;
    /// let model = Arc::new(Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 7)?);
    /// let mut session = Session::new(model)?;
    /// session.feed(&[1, 2, 3])?;
    /// let opts = GenerateOptions { max_new_tokens: 4, ..Default::default() };
    /// let mut stream = session.stream(&opts, &CancelToken::new())?;
    /// let first_two: Vec<u32> = stream.by_ref().take(2).collect::<Result<_, _>>()?;
    /// let summary = stream.finish(); // stopped after two tokens
    /// assert_eq!(summary.tokens, first_two);
    /// assert_eq!(session.tokens().len(), 5);
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn stream<'a>(
        &'a mut self,
        opts: &GenerateOptions,
        cancel: &CancelToken,
    ) -> Result<TokenStream<'a>> {
        let mut sampler = Sampler::new(opts.sampling.clone())?;
        if let Some((seed, state)) = self.rng {
            if seed == opts.sampling.seed {
                sampler.set_rng_state(state)?;
            }
        }
        let t0 = Instant::now();
        let prompt_tokens = self.flush_cancellable(cancel)?;
        let prompt_s = t0.elapsed().as_secs_f64();
        if self.last_logits.is_none() {
            return Err(Error::EmptyPrompt);
        }
        Ok(TokenStream {
            allowed: self.model.config().vocab_size.min(self.model.vocab_rows()),
            session: self,
            sampler,
            seed: opts.sampling.seed,
            max_new_tokens: opts.max_new_tokens,
            eos_token_ids: opts.eos_token_ids.clone(),
            cancel: cancel.clone(),
            out: Vec::new(),
            stop_reason: None,
            prompt_tokens,
            prompt_s,
            t1: Instant::now(),
            decode_s: None,
        })
    }
}

/// The tokens of one generation, pulled one at a time (see [`Session::stream`]). Yields
/// `Ok(token)` per sampled token, `Err` once if a step fails, then `None`.
pub struct TokenStream<'a> {
    session: &'a mut Session,
    sampler: Sampler,
    seed: u64,
    allowed: usize,
    max_new_tokens: usize,
    eos_token_ids: Vec<u32>,
    cancel: CancelToken,
    out: Vec<u32>,
    stop_reason: Option<StopReason>,
    prompt_tokens: usize,
    prompt_s: f64,
    t1: Instant,
    decode_s: Option<f64>,
}

impl TokenStream<'_> {
    /// Why the generation ended, once it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop_reason
    }

    /// Tokens produced so far (including a final EOS).
    pub fn tokens(&self) -> &[u32] {
        &self.out
    }

    /// Ends the generation now (as a callback returning `Break` would): later `next()` calls
    /// return `None`. Does nothing once it has ended.
    pub fn stop(&mut self) {
        self.end(StopReason::Callback);
    }

    fn end(&mut self, reason: StopReason) {
        if self.stop_reason.is_none() {
            self.stop_reason = Some(reason);
            self.decode_s = Some(self.t1.elapsed().as_secs_f64());
            // Later turns with the same seed continue this random stream.
            self.session.rng = Some((self.seed, self.sampler.rng_state()));
        }
    }

    /// Ends the generation ([`TokenStream::stop`] if it is still running) and returns what it
    /// did.
    pub fn finish(mut self) -> GenerationSummary {
        self.stop();
        let decode_s = self.decode_s.unwrap_or_default();
        GenerationSummary {
            prompt_tokens: self.prompt_tokens,
            prompt_tok_s: if self.prompt_tokens > 0 {
                self.prompt_tokens as f64 / self.prompt_s.max(1e-9)
            } else {
                0.0
            },
            decode_tok_s: self.out.len() as f64 / decode_s.max(1e-9),
            tokens: std::mem::take(&mut self.out),
            stop_reason: self.stop_reason.unwrap_or(StopReason::Callback),
        }
    }

    fn sample_one(&mut self) -> Result<u32> {
        let logits = self
            .session
            .last_logits
            .as_deref()
            .ok_or(Error::EmptyPrompt)?;
        let tok = self
            .sampler
            .sample(logits, &self.session.tokens, self.allowed)?;
        self.out.push(tok);
        self.session.feed(&[tok])?;
        self.session.flush()?;
        Ok(tok)
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<u32>;

    fn next(&mut self) -> Option<Result<u32>> {
        if self.stop_reason.is_some() {
            return None;
        }
        if self.out.len() >= self.max_new_tokens {
            self.end(StopReason::MaxTokens);
            return None;
        }
        if self.cancel.is_cancelled() {
            self.end(StopReason::Cancelled);
            return None;
        }
        match self.sample_one() {
            Err(e) => {
                self.end(StopReason::Callback);
                Some(Err(e))
            }
            Ok(tok) if self.eos_token_ids.contains(&tok) => {
                self.end(StopReason::Eos);
                None
            }
            Ok(tok) => Some(Ok(tok)),
        }
    }
}

impl Drop for TokenStream<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}
