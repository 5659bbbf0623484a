//! The prompt-state cache: states of sequences the server has run, keyed by a hash of the tokens
//! each state has seen, so that a request whose prompt extends one of them (the next turn of a
//! chat, a shared prefix) restores that state and prefills only the rest.
//!
//! A Mamba-2 state is constant in size whatever the length of the text behind it, so one entry
//! stands for a whole conversation; hybrid models' entries include their KV caches, whose size
//! grows with the text. Memory is bounded in bytes (state tensors plus token lists); the least
//! recently used entries go first.

use mamba2::{batch, Mamba2Cache};
use std::collections::HashMap;

/// FNV-1a over the tokens' little-endian bytes: stable across runs and platforms, and cheap to
/// extend one token at a time, which the longest-prefix lookup needs.
fn extend_hash(mut h: u64, token: u32) -> u64 {
    for b in token.to_le_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Hash of a whole token sequence (the cache key).
pub fn token_hash(tokens: &[u32]) -> u64 {
    tokens.iter().fold(FNV_OFFSET, |h, &t| extend_hash(h, t))
}

struct Entry {
    tokens: Vec<u32>,
    state: Mamba2Cache,
    bytes: usize,
    last_used: u64,
}

/// Least-recently-used states keyed by their token prefix, within a byte budget.
///
/// ```
/// use candle_core::{DType, Device};
/// use mamba2::{Mamba2Config, Mamba2Model};
/// use mamba2_server::prompt_cache::PromptCache;
/// let mut cfg = Mamba2Config::preset("130m")?;
/// cfg.n_layer = 1; cfg.d_model = 64; cfg.d_inner = 128; cfg.nheads = 2; cfg.d_state = 16;
/// cfg.vocab_size = 50; cfg.pad_vocab_size_multiple = 1;
/// let model = Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 7)?;
/// let mut cache = PromptCache::new(1 << 20);
/// cache.insert(&[1, 2, 3], model.new_cache(1)?);
/// let (len, _state) = cache.lookup(&[1, 2, 3, 4, 5])?.expect("a prefix is cached");
/// assert_eq!(len, 3);                                  // prefill only tokens 4 and 5
/// assert!(cache.lookup(&[1, 2, 3])?.is_none());        // at least one token is left to run
/// # Ok::<(), mamba2::Error>(())
/// ```
pub struct PromptCache {
    max_bytes: usize,
    bytes: usize,
    tick: u64,
    entries: HashMap<u64, Entry>,
}

impl PromptCache {
    /// An empty cache holding at most `max_bytes` (0 disables it).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            bytes: 0,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    /// Number of states held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no state is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held (state tensors and token lists).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The state after the longest cached proper prefix of `prompt` (at least one token of the
    /// prompt is left to run, whose logits start the generation): `(prefix length, a copy of
    /// the state)`, or `None`.
    pub fn lookup(&mut self, prompt: &[u32]) -> mamba2::Result<Option<(usize, Mamba2Cache)>> {
        if self.entries.is_empty() || prompt.len() < 2 {
            return Ok(None);
        }
        let mut hashes = Vec::with_capacity(prompt.len() - 1);
        let mut h = FNV_OFFSET;
        for &t in &prompt[..prompt.len() - 1] {
            h = extend_hash(h, t);
            hashes.push(h);
        }
        for len in (1..prompt.len()).rev() {
            let Some(e) = self.entries.get_mut(&hashes[len - 1]) else {
                continue;
            };
            // A hash collision must not hand out another text's state.
            if e.tokens.as_slice() != &prompt[..len] {
                continue;
            }
            self.tick += 1;
            e.last_used = self.tick;
            return Ok(Some((len, e.state.deep_clone()?)));
        }
        Ok(None)
    }

    /// Stores `state`, the state after `tokens` (the caller hands over a copy it no longer
    /// steps), evicting least recently used entries to stay within the budget. A state larger
    /// than the whole budget is not stored.
    pub fn insert(&mut self, tokens: &[u32], state: Mamba2Cache) {
        let bytes = batch::state_bytes(&state) + 4 * tokens.len();
        if tokens.is_empty() || bytes > self.max_bytes {
            return;
        }
        let key = token_hash(tokens);
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= old.bytes;
        }
        while self.bytes + bytes > self.max_bytes {
            let Some((&oldest, _)) = self.entries.iter().min_by_key(|(_, e)| e.last_used) else {
                break;
            };
            let e = self.entries.remove(&oldest).expect("key just found");
            self.bytes -= e.bytes;
        }
        self.tick += 1;
        self.entries.insert(
            key,
            Entry {
                tokens: tokens.to_vec(),
                state,
                bytes,
                last_used: self.tick,
            },
        );
        self.bytes += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use mamba2::{Mamba2Config, Mamba2Model};

    fn model() -> Mamba2Model {
        let mut cfg = Mamba2Config::preset("130m").unwrap();
        cfg.n_layer = 1;
        cfg.d_model = 64;
        cfg.d_inner = 128;
        cfg.nheads = 2;
        cfg.d_state = 16;
        cfg.vocab_size = 50;
        cfg.pad_vocab_size_multiple = 1;
        Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 7).unwrap()
    }

    fn state_after(m: &Mamba2Model, tokens: &[u32]) -> Mamba2Cache {
        let mut c = m.new_cache(1).unwrap();
        let ids = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        m.prefill(&ids, &mut c).unwrap();
        c
    }

    #[test]
    fn longest_prefix_wins_and_returns_that_state() {
        let m = model();
        let mut cache = PromptCache::new(1 << 24);
        let (a, b) = (state_after(&m, &[1, 2]), state_after(&m, &[1, 2, 3, 4]));
        cache.insert(&[1, 2], a.deep_clone().unwrap());
        cache.insert(&[1, 2, 3, 4], b.deep_clone().unwrap());
        cache.insert(&[9, 9, 9], a.deep_clone().unwrap());
        let (len, got) = cache.lookup(&[1, 2, 3, 4, 5, 6]).unwrap().unwrap();
        assert_eq!(len, 4);
        let d = (got.ssm_state(0) - b.ssm_state(0))
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
        assert_eq!(cache.lookup(&[1, 2, 3]).unwrap().unwrap().0, 2);
        assert!(cache.lookup(&[2, 1, 3]).unwrap().is_none());
        assert!(
            cache.lookup(&[1, 2]).unwrap().is_none(),
            "a whole prompt is never a hit"
        );
    }

    #[test]
    fn byte_budget_evicts_least_recently_used() {
        let m = model();
        let s = state_after(&m, &[1]);
        let one = batch::state_bytes(&s) + 4 * 2;
        let mut cache = PromptCache::new(2 * one + one / 2);
        cache.insert(&[1, 1], s.deep_clone().unwrap());
        cache.insert(&[2, 2], s.deep_clone().unwrap());
        // Touch [1, 1]: [2, 2] becomes the least recently used.
        assert!(cache.lookup(&[1, 1, 5]).unwrap().is_some());
        cache.insert(&[3, 3], s.deep_clone().unwrap());
        assert_eq!(cache.len(), 2);
        assert!(cache.bytes() <= 2 * one + one / 2);
        assert!(cache.lookup(&[2, 2, 5]).unwrap().is_none());
        assert!(cache.lookup(&[1, 1, 5]).unwrap().is_some());
        assert!(cache.lookup(&[3, 3, 5]).unwrap().is_some());
        // Re-inserting a key replaces it instead of counting it twice.
        cache.insert(&[3, 3], s.deep_clone().unwrap());
        assert_eq!(cache.bytes(), 2 * one);
        let mut off = PromptCache::new(0);
        off.insert(&[1, 1], s.deep_clone().unwrap());
        assert!(off.is_empty());
    }

    #[test]
    fn hash_is_prefix_incremental() {
        let t = [5u32, 6, 7];
        let mut h = FNV_OFFSET;
        for &x in &t {
            h = extend_hash(h, x);
        }
        assert_eq!(h, token_hash(&t));
        assert_ne!(token_hash(&[1, 2]), token_hash(&[2, 1]));
    }
}
