//! The generation loop (continuous batching). Each iteration:
//!
//! 1. takes new requests into free slots, restoring the longest cached prefix of each prompt
//!    from the prompt-state cache;
//! 2. drops sequences whose client has gone (their receiver was dropped);
//! 3. prefills at most `prefill_chunk` prompt tokens, in pieces, round-robin over the sequences
//!    still reading their prompt; a sequence that finishes its prompt samples its first token;
//! 4. runs one decode step for every generating sequence at once and samples each row's next
//!    token.
//!
//! Pure Mamba-2 models keep the generating sequences' states stacked in one batched cache;
//! rows join and leave it between steps ([`mamba2::batch`]). Models with attention blocks run
//! each generating sequence as its own batch-1 step, because rows whose KV caches differ in
//! length cannot share a batched attention call.
//!
//! Each piece of a sequence's prompt has the same boundaries whatever else is running, and a
//! row's decode step computes the same values in any batch, so a greedy generation does not
//! depend on the other requests.

use crate::engine::{EngineConfig, Event, Finish, FinishReason, GenRequest, Job, Stats};
use crate::prompt_cache::PromptCache;
use candle_core::Tensor;
use mamba2::sampling::Sampler;
use mamba2::text_stream::TextStream;
use mamba2::{batch, Mamba2Cache, Mamba2Model};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;

/// One request holding a slot.
struct Sequence {
    id: u64,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    max_tokens: usize,
    sampler: Sampler,
    stream: TextStream,
    /// Prompt, then every sampled token.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens the state has seen (a prefix of `tokens`).
    fed: usize,
    cached: usize,
    /// The sequence's own state; `None` while its row lives in the shared batch.
    state: Option<Mamba2Cache>,
    /// A sampled token the next decode step feeds.
    pending: Option<u32>,
    /// The generation has ended by length; the last token is fed so that the saved state covers
    /// the whole text, then the sequence leaves and reports its end. Reporting only after the
    /// state is in the prompt cache lets a client's next turn, sent as soon as it has the answer,
    /// find the whole conversation there.
    finishing: bool,
    generated: usize,
    /// The client went away (a send failed).
    gone: bool,
    prefill_time: Duration,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl Sequence {
    fn finish(&mut self, reason: FinishReason) {
        if !self.stream.stopped() {
            if let Ok(rest) = self.stream.finish() {
                if !rest.is_empty() {
                    let _ = self.events.send(Event::Text(rest));
                }
            }
        }
        let decode_ms = match (self.first_token, self.last_token) {
            (Some(a), Some(b)) => (b - a).as_secs_f64() * 1e3,
            _ => 0.0,
        };
        let _ = self.events.send(Event::Done(Finish {
            reason,
            prompt_tokens: self.prompt_len,
            cached_tokens: self.cached,
            completion_tokens: self.generated,
            prefill_ms: self.prefill_time.as_secs_f64() * 1e3,
            decode_ms,
        }));
    }
}

/// What to do with a sequence after a token.
enum Next {
    Continue,
    /// Leave now; save the state when true.
    Leave(bool),
}

pub(crate) struct Scheduler {
    model: Arc<Mamba2Model>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    config: EngineConfig,
    stats: Arc<Stats>,
    jobs: mpsc::Receiver<Job>,
    waiting: VecDeque<Job>,
    seqs: Vec<Sequence>,
    /// Pure Mamba-2 models: the generating rows (sequence ids, in row order) and their states.
    batch: Option<(Vec<u64>, Mamba2Cache)>,
    batchable: bool,
    cache: PromptCache,
    next_id: u64,
    round_robin: usize,
}

impl Scheduler {
    pub(crate) fn new(
        model: Arc<Mamba2Model>,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        config: EngineConfig,
        stats: Arc<Stats>,
        jobs: mpsc::Receiver<Job>,
    ) -> Self {
        let batchable = model.config().n_kv_blocks() == 0;
        let cache = PromptCache::new(config.prompt_cache_bytes);
        Self {
            model,
            tokenizer,
            eos,
            config,
            stats,
            jobs,
            waiting: VecDeque::new(),
            seqs: Vec::new(),
            batch: None,
            batchable,
            cache,
            next_id: 0,
            round_robin: 0,
        }
    }

    pub(crate) fn run(mut self) {
        loop {
            if self.seqs.is_empty() && self.waiting.is_empty() {
                match self.jobs.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = self.jobs.try_recv() {
                self.waiting.push_back(job);
            }
            self.admit();
            self.drop_cancelled();
            self.prefill();
            self.decode();
            self.stats.active.store(self.seqs.len(), Ordering::SeqCst);
            self.stats
                .cache_entries
                .store(self.cache.len(), Ordering::SeqCst);
            self.stats
                .cache_bytes
                .store(self.cache.bytes(), Ordering::SeqCst);
        }
    }

    fn release_slot(&self, cancelled: bool) {
        self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        let counter = if cancelled {
            &self.stats.cancelled
        } else {
            &self.stats.completed
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    fn admit(&mut self) {
        while self.seqs.len() < self.config.max_batch {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            if job.events.is_closed() {
                self.release_slot(true);
                continue;
            }
            match self.start(job.request, job.events.clone()) {
                Ok(seq) => self.seqs.push(seq),
                Err(e) => {
                    let _ = job.events.send(Event::Error(e.to_string()));
                    self.release_slot(false);
                }
            }
        }
        self.stats.active.store(self.seqs.len(), Ordering::SeqCst);
    }

    fn start(
        &mut self,
        req: GenRequest,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
    ) -> mamba2::Result<Sequence> {
        let sampler = Sampler::new(req.sampling)?;
        let (cached, state) = match self.cache.lookup(&req.prompt)? {
            Some(hit) => hit,
            None => (0, self.model.new_cache(1)?),
        };
        self.stats
            .cached_tokens
            .fetch_add(cached as u64, Ordering::SeqCst);
        let mut stream = TextStream::new(self.tokenizer.clone(), req.stop);
        stream.set_context(&req.prompt)?;
        self.next_id += 1;
        Ok(Sequence {
            id: self.next_id,
            events,
            max_tokens: req.max_tokens,
            sampler,
            stream,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            fed: cached,
            cached,
            state: Some(state),
            pending: None,
            finishing: false,
            generated: 0,
            gone: false,
            prefill_time: Duration::ZERO,
            first_token: None,
            last_token: None,
        })
    }

    fn drop_cancelled(&mut self) {
        let before = self.seqs.len();
        self.seqs.retain(|s| !s.events.is_closed());
        for _ in self.seqs.len()..before {
            self.release_slot(true);
        }
    }

    /// Samples the token after `logits` for `seqs[i]` and reports it.
    fn take_token(&mut self, i: usize, logits: &[f32]) -> Next {
        let allowed = self.model.config().vocab_size.min(self.model.vocab_rows());
        let seq = &mut self.seqs[i];
        let tok = match seq.sampler.sample(logits, &seq.tokens, allowed) {
            Ok(t) => t,
            Err(e) => {
                let _ = seq.events.send(Event::Error(e.to_string()));
                return Next::Leave(false);
            }
        };
        let now = Instant::now();
        seq.first_token.get_or_insert(now);
        seq.last_token = Some(now);
        seq.tokens.push(tok);
        seq.generated += 1;
        if self.eos.contains(&tok) {
            seq.finish(FinishReason::Stop);
            return Next::Leave(true);
        }
        match seq.stream.push(tok) {
            Ok(chunk) => {
                if !chunk.text.is_empty() && seq.events.send(Event::Text(chunk.text)).is_err() {
                    seq.gone = true;
                    return Next::Leave(false);
                }
                if chunk.stopped {
                    seq.finish(FinishReason::Stop);
                    return Next::Leave(true);
                }
            }
            Err(e) => {
                let _ = seq.events.send(Event::Error(e.to_string()));
                return Next::Leave(false);
            }
        }
        seq.pending = Some(tok);
        if seq.generated >= seq.max_tokens {
            seq.finishing = true;
        }
        Next::Continue
    }

    fn prefill(&mut self) {
        let n = self.seqs.len();
        if n == 0 {
            return;
        }
        let mut budget = self.config.prefill_chunk;
        let mut leaving = Vec::new();
        for k in 0..n {
            if budget == 0 {
                break;
            }
            let i = (self.round_robin + k) % n;
            let seq = &mut self.seqs[i];
            if seq.fed >= seq.prompt_len {
                continue;
            }
            let len = self.config.prefill_chunk.min(seq.prompt_len - seq.fed);
            budget = budget.saturating_sub(len);
            let t0 = Instant::now();
            let result = (|| -> mamba2::Result<Option<Vec<f32>>> {
                let state = seq
                    .state
                    .as_mut()
                    .expect("prefilling sequences own their state");
                let ids = Tensor::new(&seq.tokens[seq.fed..seq.fed + len], self.model.device())?
                    .unsqueeze(0)?; // (1, len)
                let logits = self.model.prefill(&ids, state)?; // (1, vocab_rows)
                seq.fed += len;
                if seq.fed < seq.prompt_len {
                    return Ok(None);
                }
                Ok(Some(logits.squeeze(0)?.to_vec1::<f32>()?))
            })();
            seq.prefill_time += t0.elapsed();
            self.stats
                .prefill_tokens
                .fetch_add(len as u64, Ordering::SeqCst);
            match result {
                Ok(None) => {}
                Ok(Some(logits)) => {
                    let seq = &self.seqs[i];
                    if let Ok(copy) = seq.state.as_ref().expect("own state").deep_clone() {
                        self.cache.insert(&seq.tokens[..seq.fed], copy);
                    }
                    if let Next::Leave(save) = self.take_token(i, &logits) {
                        leaving.push((i, save));
                    }
                }
                Err(e) => {
                    let _ = self.seqs[i].events.send(Event::Error(e.to_string()));
                    leaving.push((i, false));
                }
            }
        }
        self.round_robin = self.round_robin.wrapping_add(1);
        self.leave(leaving);
    }

    /// Removes `seqs[i]` for each `(i, save)`, saving its state first when asked.
    fn leave(&mut self, mut leaving: Vec<(usize, bool)>) {
        leaving.sort_unstable_by_key(|l| std::cmp::Reverse(l.0));
        leaving.dedup_by_key(|l| l.0);
        for (i, save) in leaving {
            let mut seq = self.seqs.remove(i);
            if save && self.config.prompt_cache_bytes > 0 {
                let state = match (&seq.state, &self.batch) {
                    (Some(s), _) => Some(s.deep_clone()),
                    (None, Some((ids, cache))) => ids
                        .iter()
                        .position(|&id| id == seq.id)
                        .map(|r| batch::select_rows(cache, &[r])),
                    (None, None) => None,
                };
                if let Some(Ok(state)) = state {
                    self.cache.insert(&seq.tokens[..seq.fed], state);
                }
            }
            if seq.finishing {
                seq.finish(FinishReason::Length);
            }
            self.release_slot(seq.gone);
        }
    }

    /// Makes the shared batch hold exactly the sequences with a pending token: rows still
    /// generating keep their order, new ones are appended.
    fn sync_batch(&mut self) -> mamba2::Result<()> {
        let want: Vec<u64> = self
            .seqs
            .iter()
            .filter(|s| s.pending.is_some())
            .map(|s| s.id)
            .collect();
        let (old_ids, old_cache) = match self.batch.take() {
            Some((ids, cache)) => (ids, Some(cache)),
            None => (Vec::new(), None),
        };
        let keep: Vec<usize> = (0..old_ids.len())
            .filter(|&r| want.contains(&old_ids[r]))
            .collect();
        let mut ids: Vec<u64> = keep.iter().map(|&r| old_ids[r]).collect();
        let joining: Vec<u64> = want
            .iter()
            .filter(|id| !ids.contains(id))
            .copied()
            .collect();
        if want.is_empty() {
            return Ok(());
        }
        if joining.is_empty() && keep.len() == old_ids.len() {
            self.batch = Some((old_ids, old_cache.expect("rows imply a cache")));
            return Ok(());
        }
        let kept = match old_cache {
            Some(cache) if keep.len() == old_ids.len() => Some(cache),
            Some(cache) if !keep.is_empty() => Some(batch::select_rows(&cache, &keep)?),
            _ => None,
        };
        let mut parts: Vec<Mamba2Cache> = kept.into_iter().collect();
        for id in &joining {
            let seq = self.seqs.iter_mut().find(|s| s.id == *id).expect("wanted");
            parts.push(seq.state.take().expect("a joining row owns its state"));
            ids.push(*id);
        }
        let merged = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            batch::concat_rows(&parts.iter().collect::<Vec<_>>())?
        };
        self.batch = Some((ids, merged));
        Ok(())
    }

    fn decode(&mut self) {
        let rows: Vec<usize> = (0..self.seqs.len())
            .filter(|&i| self.seqs[i].pending.is_some())
            .collect();
        if rows.is_empty() {
            self.batch = None;
            return;
        }
        // (sequence index, logits) per row stepped; rows of a failed step get the error.
        let stepped: Vec<(usize, mamba2::Result<Vec<f32>>)> = if self.batchable {
            self.step_batched()
        } else {
            rows.iter().map(|&i| (i, self.step_alone(i))).collect()
        };
        let steps = if self.batchable { 1 } else { stepped.len() };
        self.stats
            .decode_steps
            .fetch_add(steps as u64, Ordering::SeqCst);
        self.stats
            .decode_rows
            .fetch_add(stepped.len() as u64, Ordering::SeqCst);
        let mut leaving = Vec::new();
        for (i, result) in stepped {
            let seq = &mut self.seqs[i];
            seq.pending = None;
            match result {
                // The answer is complete; only its state is not saved.
                Err(_) if seq.finishing => leaving.push((i, false)),
                Err(e) => {
                    let _ = seq.events.send(Event::Error(e.to_string()));
                    leaving.push((i, false));
                }
                Ok(_) if seq.finishing => leaving.push((i, true)),
                Ok(logits) => {
                    if let Next::Leave(save) = self.take_token(i, &logits) {
                        leaving.push((i, save));
                    }
                }
            }
        }
        self.leave(leaving);
    }

    fn step_batched(&mut self) -> Vec<(usize, mamba2::Result<Vec<f32>>)> {
        let fail = |s: &Self, e: mamba2::Error| {
            let msg = e.to_string();
            (0..s.seqs.len())
                .filter(|&i| s.seqs[i].pending.is_some())
                .map(|i| (i, Err(mamba2::Error::InvalidInput(msg.clone()))))
                .collect()
        };
        if let Err(e) = self.sync_batch() {
            self.batch = None;
            return fail(self, e);
        }
        let (ids, cache) = self.batch.as_mut().expect("rows were pending");
        let index: Vec<usize> = ids
            .iter()
            .map(|id| self.seqs.iter().position(|s| s.id == *id).expect("row"))
            .collect();
        let tokens: Vec<u32> = index
            .iter()
            .map(|&i| self.seqs[i].pending.expect("pending"))
            .collect();
        let result = (|| -> mamba2::Result<Vec<Vec<f32>>> {
            let ids = Tensor::new(tokens.as_slice(), self.model.device())?; // (rows)
            let logits = self.model.step(&ids, cache)?; // (rows, vocab_rows)
            Ok(logits.to_vec2::<f32>()?)
        })();
        match result {
            Ok(rows) => {
                for &i in &index {
                    self.seqs[i].fed += 1;
                }
                index.into_iter().zip(rows.into_iter().map(Ok)).collect()
            }
            Err(e) => {
                self.batch = None;
                fail(self, e)
            }
        }
    }

    fn step_alone(&mut self, i: usize) -> mamba2::Result<Vec<f32>> {
        let seq = &mut self.seqs[i];
        let tok = seq.pending.expect("pending");
        let state = seq.state.as_mut().expect("unbatched rows own their state");
        let ids = Tensor::new(&[tok], self.model.device())?;
        let logits = self.model.step(&ids, state)?; // (1, vocab_rows)
        seq.fed += 1;
        Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
    }
}
