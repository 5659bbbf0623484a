//! Incremental detokenization with stop strings.
//!
//! Decoding token by token is wrong in two ways: a token of a byte-level BPE or a byte-fallback
//! tokenizer may end in the middle of a multi-byte UTF-8 character (decoded alone it gives
//! U+FFFD), and decoders that strip or add a leading space (Metaspace, `Strip`) treat the first
//! token of a decode call differently from the same token in context. Re-decoding the whole
//! history every step fixes both but costs `O(n)` per token.
//!
//! [`TextStream`] keeps two offsets into the token list: `read_offset` (everything before it has
//! been turned into text) and `prefix_offset` (a few tokens of context before that). Each push
//! decodes only `ids[prefix_offset..]` and compares it with the cached decode of
//! `ids[prefix_offset..read_offset]`; the difference is the new text, unless it ends in U+FFFD,
//! in which case the character is not complete yet and the tokens wait for the next push.
//!
//! Stop strings are matched on the decoded text, so they work across token boundaries. Text that
//! could still become a stop string is held back until the next tokens decide it.

use crate::error::{Error, Result};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// A decoding that still ends in U+FFFD after this many undecided tokens is not an incomplete
/// character (no UTF-8 character needs more than 4 byte tokens): emit it as it is, so that
/// malformed output or a long run of tokens that decode to nothing cannot make each push
/// re-decode an ever-growing window.
const MAX_UNDECIDED_TOKENS: usize = 16;

/// How many prompt tokens [`TextStream::set_context`] keeps as decoding context.
const CONTEXT_TOKENS: usize = 4;

/// What one [`TextStream::push`] produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamChunk {
    /// Newly completed text (may be empty: incomplete character or held-back stop prefix).
    pub text: String,
    /// True once a stop string has been matched; the caller should end generation.
    pub stopped: bool,
}

/// Incremental detokenizer: turns token ids into text as they are generated.
///
/// * Never splits a UTF-8 character: a token that ends inside a multi-byte character yields
///   nothing until the character is complete.
/// * Works with byte-level BPE (GPT-2/NeoX) and byte-fallback (SentencePiece/Llama) tokenizers,
///   and with decoders that strip or add leading spaces: the concatenation of all chunks plus
///   [`TextStream::finish`] equals `tokenizer.decode(all_ids, skip_special_tokens)`.
/// * Costs one short decode per token (two when text is emitted), not a decode of the history.
/// * Stop strings: text that might be the start of a stop string is held back; when a stop
///   string completes, the text before it is returned, [`TextStream::stopped`] becomes true and
///   the stop string itself and anything after it are dropped.
///
/// * To continue a prompt, call [`TextStream::set_context`] with the prompt ids first, so the
///   first generated token is decoded in context.
///
/// Special tokens are skipped by default ([`TextStream::with_skip_special_tokens`]).
///
/// ```
/// use std::sync::Arc;
/// use mamba2::text_stream::TextStream;
/// use tokenizers::{decoders::fuse::Fuse, models::bpe::BPE, Tokenizer};
///
/// // A tiny character-level tokenizer; real code loads `tokenizer.json`.
/// let vocab = [("a", 0), ("b", 1), ("c", 2)].map(|(t, i)| (t.to_string(), i));
/// let bpe = BPE::builder()
///     .vocab_and_merges(vocab, vec![])
///     .build()
///     .unwrap();
/// let mut tokenizer = Tokenizer::new(bpe);
/// tokenizer.with_decoder(Some(Fuse::new()));
/// let tokenizer = Arc::new(tokenizer);
///
/// let mut stream = TextStream::new(tokenizer, vec!["cc".to_string()]);
/// let mut out = String::new();
/// for id in [0, 1, 2, 0, 2, 2, 1] {
///     let chunk = stream.push(id)?;
///     out.push_str(&chunk.text);
///     if chunk.stopped {
///         break;
///     }
/// }
/// out.push_str(&stream.finish()?);
/// assert!(stream.stopped());
/// assert_eq!(out, "abca");
/// assert_eq!(stream.text(), "abca");
/// # Ok::<(), mamba2::Error>(())
/// ```
///
pub struct TextStream {
    tokenizer: Arc<Tokenizer>,
    stop_strings: Vec<String>,
    /// Length in bytes of the longest stop string.
    max_stop_len: usize,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Number of leading `ids` that are prompt context from [`TextStream::set_context`].
    context_len: usize,
    prefix_offset: usize,
    read_offset: usize,
    /// `decode(ids[prefix_offset..read_offset])`.
    prefix_text: String,
    /// Decoded text not yet returned because it may begin a stop string.
    held: String,
    emitted: String,
    stop_index: Option<usize>,
    finished: bool,
}

impl std::fmt::Debug for TextStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextStream")
            .field("stop_strings", &self.stop_strings)
            .field("skip_special_tokens", &self.skip_special_tokens)
            .field("tokens", &self.ids.len())
            .field("prefix_offset", &self.prefix_offset)
            .field("read_offset", &self.read_offset)
            .field("held", &self.held)
            .field("stopped", &self.stopped())
            .field("finished", &self.finished)
            .finish()
    }
}

impl TextStream {
    /// A stream over `tokenizer` that stops at the first of `stop_strings` (empty strings are
    /// ignored).
    pub fn new(tokenizer: Arc<Tokenizer>, stop_strings: Vec<String>) -> Self {
        let mut stops: Vec<String> = Vec::with_capacity(stop_strings.len());
        for s in stop_strings {
            if !s.is_empty() && !stops.contains(&s) {
                stops.push(s);
            }
        }
        let max_stop_len = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            tokenizer,
            stop_strings: stops,
            max_stop_len,
            skip_special_tokens: true,
            ids: Vec::new(),
            context_len: 0,
            prefix_offset: 0,
            read_offset: 0,
            prefix_text: String::new(),
            held: String::new(),
            emitted: String::new(),
            stop_index: None,
            finished: false,
        }
    }

    /// Whether special tokens (EOS, padding, ...) are left out of the text (default `true`).
    pub fn with_skip_special_tokens(mut self, skip: bool) -> Self {
        self.skip_special_tokens = skip;
        self
    }

    /// Adds one generated token and returns the text it completes.
    ///
    /// After a stop string has matched, further pushes are ignored and return an empty chunk with
    /// `stopped: true`. Pushing after [`TextStream::finish`] without [`TextStream::reset`] is an
    /// [`Error::InvalidInput`]; a decoding failure is an [`Error::Tokenizer`].
    pub fn push(&mut self, token: u32) -> Result<StreamChunk> {
        if self.stop_index.is_some() {
            return Ok(StreamChunk {
                text: String::new(),
                stopped: true,
            });
        }
        if self.finished {
            return Err(Error::InvalidInput(
                "TextStream::push after finish(); call reset() to start a new text".into(),
            ));
        }
        self.ids.push(token);
        let text = self.decode(&self.ids[self.prefix_offset..])?;
        let incomplete = text.ends_with(char::REPLACEMENT_CHARACTER);
        let nothing_new = text.len() <= self.prefix_text.len();
        let undecided = self.ids.len() - self.read_offset;
        if (incomplete || nothing_new) && undecided < MAX_UNDECIDED_TOKENS {
            // Wait for more tokens, keeping the context window as it is.
            return Ok(StreamChunk::default());
        }
        let delta = text
            .get(self.prefix_text.len()..)
            .unwrap_or_default()
            .to_string();
        self.advance()?;
        Ok(self.release(&delta, false))
    }

    /// Ends the stream: decodes any tokens still waiting (an incomplete final character comes
    /// out as U+FFFD, as `Tokenizer::decode` gives it) and returns the held-back text, which can
    /// no longer become a stop string. Returns `""` after a stop; may itself match a stop string
    /// (check [`TextStream::stopped`]). Calling it again returns `""`.
    pub fn finish(&mut self) -> Result<String> {
        if self.finished || self.stop_index.is_some() {
            self.finished = true;
            return Ok(String::new());
        }
        self.finished = true;
        let mut delta = String::new();
        if self.read_offset < self.ids.len() {
            let text = self.decode(&self.ids[self.prefix_offset..])?;
            delta = text
                .get(self.prefix_text.len()..)
                .unwrap_or_default()
                .to_string();
            self.advance()?;
        }
        Ok(self.release(&delta, true).text)
    }

    /// All text returned so far by [`TextStream::push`] and [`TextStream::finish`].
    pub fn text(&self) -> &str {
        &self.emitted
    }

    /// All tokens pushed so far, without the context (tokens pushed after a stop are not
    /// recorded).
    pub fn tokens(&self) -> &[u32] {
        &self.ids[self.context_len..]
    }

    /// Starts a new text (as [`TextStream::reset`]) that continues `prompt_ids`: the last few
    /// prompt tokens become decoding context, so the first generated token decodes as it does
    /// after the prompt. Without it, decoders that strip a leading space (SentencePiece /
    /// Metaspace, `Strip`) drop the space before the first generated word. The prompt's own
    /// text is not emitted and not searched for stop strings. An empty `prompt_ids` is a plain
    /// reset.
    pub fn set_context(&mut self, prompt_ids: &[u32]) -> Result<()> {
        self.reset();
        let n = prompt_ids.len();
        if n == 0 {
            return Ok(());
        }
        // A window that starts inside a multi-byte character decodes to U+FFFD first; widen it
        // (a character spans at most 4 byte tokens) until it starts cleanly.
        let mut start = n.saturating_sub(CONTEXT_TOKENS);
        while start > 0
            && start + CONTEXT_TOKENS + 4 > n
            && self
                .decode(&prompt_ids[start..])?
                .starts_with(char::REPLACEMENT_CHARACTER)
        {
            start -= 1;
        }
        self.ids.extend_from_slice(&prompt_ids[start..]);
        self.context_len = self.ids.len();
        // If the prompt ends inside a character, the generated tokens complete it: leave those
        // tokens undecided so that the character is emitted whole.
        let mut read = self.ids.len();
        let mut text = self.decode(&self.ids)?;
        while read > 0 && self.ids.len() - read < 4 && text.ends_with(char::REPLACEMENT_CHARACTER) {
            read -= 1;
            text = self.decode(&self.ids[..read])?;
        }
        self.read_offset = read;
        self.prefix_text = text;
        Ok(())
    }

    /// True once a stop string has matched.
    pub fn stopped(&self) -> bool {
        self.stop_index.is_some()
    }

    /// The stop string that matched, if any.
    pub fn matched_stop_string(&self) -> Option<&str> {
        self.stop_index.map(|i| self.stop_strings[i].as_str())
    }

    /// Forgets all tokens and text, keeping the tokenizer, stop strings and options.
    pub fn reset(&mut self) {
        self.ids.clear();
        self.context_len = 0;
        self.prefix_offset = 0;
        self.read_offset = 0;
        self.prefix_text.clear();
        self.held.clear();
        self.emitted.clear();
        self.stop_index = None;
        self.finished = false;
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decoding token ids {ids:?}: {e}")))
    }

    /// Marks every pushed token as turned into text; the last emitted span becomes the context
    /// for the next decode.
    fn advance(&mut self) -> Result<()> {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.prefix_text = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        Ok(())
    }

    /// Runs new text through the stop-string matcher and returns what can be emitted.
    fn release(&mut self, delta: &str, flush: bool) -> StreamChunk {
        self.held.push_str(delta);
        // Earlier text never ended in a proper prefix of a stop string (it would be held), so
        // any match starts inside `held`.
        let found = self
            .stop_strings
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|pos| (pos, i)))
            .min();
        if let Some((pos, i)) = found {
            self.held.truncate(pos);
            let text = std::mem::take(&mut self.held);
            self.emitted.push_str(&text);
            self.stop_index = Some(i);
            return StreamChunk {
                text,
                stopped: true,
            };
        }
        let keep = if flush { 0 } else { self.stop_prefix_len() };
        let rest = self.held.split_off(self.held.len() - keep);
        let text = std::mem::replace(&mut self.held, rest);
        self.emitted.push_str(&text);
        StreamChunk {
            text,
            stopped: false,
        }
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    fn stop_prefix_len(&self) -> usize {
        let held = self.held.as_str();
        let longest = held.len().min(self.max_stop_len.saturating_sub(1));
        (1..=longest)
            .rev()
            .filter(|&k| held.is_char_boundary(held.len() - k))
            .find(|&k| {
                let tail = &held[held.len() - k..];
                self.stop_strings.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::AddedToken;

    /// Character-level tokenizer over "a".."z" plus a special token, decoder Fuse.
    fn letters() -> Arc<Tokenizer> {
        let vocab: Vocab = (b'a'..=b'z')
            .map(|c| ((c as char).to_string(), (c - b'a') as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_decoder(Some(Fuse::new()));
        tokenizer.add_special_tokens(&[AddedToken::from("<eos>", true)]);
        Arc::new(tokenizer)
    }

    /// The decode window must not grow with the text: that is what keeps a push O(1).
    #[test]
    fn decode_window_stays_short() {
        let mut stream = TextStream::new(letters(), vec!["zzz".into()]);
        let mut out = String::new();
        for i in 0..3000u32 {
            out.push_str(&stream.push(i % 25).unwrap().text);
            assert!(
                stream.ids.len() - stream.prefix_offset <= 2,
                "window grew at token {i}"
            );
        }
        out.push_str(&stream.finish().unwrap());
        let expected: String = (0..3000u32)
            .map(|i| (b'a' + (i % 25) as u8) as char)
            .collect();
        assert_eq!(out, expected);
    }

    /// Tokens that decode to nothing (skipped special tokens) keep the window open only up to
    /// MAX_UNDECIDED_TOKENS, and the text stays right.
    #[test]
    fn long_runs_of_empty_tokens_are_bounded() {
        let tokenizer = letters();
        let eos = tokenizer.token_to_id("<eos>").unwrap();
        let mut stream = TextStream::new(tokenizer.clone(), vec![]);
        let mut ids = vec![0, 1];
        ids.extend(std::iter::repeat_n(eos, 100));
        ids.extend([2, 3]);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&stream.push(id).unwrap().text);
            assert!(stream.ids.len() - stream.prefix_offset <= 2 * MAX_UNDECIDED_TOKENS);
        }
        out.push_str(&stream.finish().unwrap());
        assert_eq!(out, tokenizer.decode(&ids, true).unwrap());
        assert_eq!(out, "abcd");
    }
}
