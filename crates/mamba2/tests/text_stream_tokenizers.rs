//! TextStream against real tokenizers built here with the `tokenizers` crate: a trained
//! byte-level BPE (GPT-2 / GPT-NeoX style) and a byte-fallback BPE with a Llama-style decoder
//! that strips the leading space. The reference is always `Tokenizer::decode` of all ids.

use mamba2::text_stream::{StreamChunk, TextStream};
use mamba2::Error;
use std::collections::HashMap;
use std::sync::Arc;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BpeTrainer, Vocab, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{AddedToken, DecoderWrapper, Tokenizer};

const CORPUS: &str = "héllo wörld 日本語 🙂
héllo héllo wörld wörld the world says hello
日本語 is written in 日本 and 🙂 is a smile 🙂🙂
the quick brown fox jumps over the lazy dog
naïve café über straße 日本語のテキスト";

/// Texts with characters the trainer never saw (so their bytes come out as separate tokens) as
/// well as ones it merged.
const TEXTS: &[&str] = &[
    "héllo wörld 日本語 🙂",
    "the world says héllo 🙂🙂 and 日本語!",
    "€ 𝄞 ñ ☃ — “quoted” 🦀 café",
    " leading space and  double  spaces\nnew line\ttab",
    "x",
];

fn byte_level_tokenizer() -> Arc<Tokenizer> {
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(330)
        .min_frequency(1)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .build()
        .into();
    tokenizer
        .train(&mut trainer, CORPUS.lines())
        .expect("training the test tokenizer");
    Arc::new(tokenizer)
}

/// Llama-like: Metaspace pre-tokenizer, BPE with byte fallback (`<0xXX>` tokens for anything not
/// in the vocab), decoder Replace(▁ → space) · ByteFallback · Fuse · Strip(one leading space).
fn byte_fallback_tokenizer() -> Arc<Tokenizer> {
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), b);
    }
    let mut next = 256;
    let mut add = |t: &str, vocab: &mut HashMap<String, u32>| {
        if !vocab.contains_key(t) {
            vocab.insert(t.to_string(), next);
            next += 1;
        }
    };
    for t in [
        "▁", "a", "c", "d", "e", "f", "h", "l", "o", "r", "s", "t", "w", "é", "!",
    ] {
        add(t, &mut vocab);
    }
    let merges: Vec<(String, String)> = [
        ("l", "l"),
        ("▁", "w"),
        ("o", "r"),
        ("▁", "h"),
        ("▁h", "é"),
        ("▁w", "or"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    for (a, b) in &merges {
        add(&format!("{a}{b}"), &mut vocab);
    }
    add("</s>", &mut vocab);
    let vocab: Vocab = vocab.into_iter().collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .build()
        .unwrap();
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
    let decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").unwrap().into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ];
    tokenizer.with_decoder(Some(Sequence::new(decoders)));
    tokenizer.add_special_tokens(&[AddedToken::from("</s>", true)]);
    Arc::new(tokenizer)
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
    tokenizer.encode(text, false).unwrap().get_ids().to_vec()
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    tokenizer.decode(ids, true).unwrap()
}

/// Streams `ids` and checks, after every push, that the text so far is exactly the decode of
/// the ids so far whenever that decode is complete, and a prefix of the final text otherwise.
/// (ByteFallback turns a whole run of byte tokens into U+FFFDs while it is invalid UTF-8, so an
/// incomplete decode is not always a prefix of the final one.)
fn stream_all(tokenizer: &Arc<Tokenizer>, ids: &[u32]) -> Vec<String> {
    let full = decode(tokenizer, ids);
    let mut stream = TextStream::new(tokenizer.clone(), vec![]);
    let mut chunks = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let StreamChunk { text, stopped } = stream.push(id).unwrap();
        assert!(!stopped);
        assert!(
            !text.contains('\u{FFFD}'),
            "chunk {text:?} holds a broken character"
        );
        chunks.push(text);
        let so_far = decode(tokenizer, &ids[..=i]);
        if so_far.ends_with('\u{FFFD}') {
            assert!(
                full.starts_with(stream.text()),
                "{:?} vs {full:?}",
                stream.text()
            );
        } else {
            assert_eq!(
                stream.text(),
                so_far,
                "after token {i}: text is late or wrong"
            );
        }
    }
    chunks.push(stream.finish().unwrap());
    assert_eq!(chunks.concat(), stream.text());
    chunks
}

/// True when some token of `ids` does not decode to whole characters by itself.
fn splits_characters(tokenizer: &Tokenizer, ids: &[u32]) -> bool {
    ids.iter()
        .any(|&id| decode(tokenizer, &[id]).contains('\u{FFFD}'))
}

#[test]
fn byte_level_stream_equals_decode_and_never_splits_characters() {
    let tokenizer = byte_level_tokenizer();
    let mut any_split = false;
    for text in TEXTS {
        let ids = encode(&tokenizer, text);
        any_split |= splits_characters(&tokenizer, &ids);
        let chunks = stream_all(&tokenizer, &ids);
        assert_eq!(chunks.concat(), decode(&tokenizer, &ids), "{text:?}");
        assert_eq!(chunks.concat(), *text);
    }
    assert!(
        any_split,
        "the test texts must contain characters split across tokens"
    );
}

#[test]
fn byte_fallback_stream_equals_decode_with_leading_space_stripping() {
    let tokenizer = byte_fallback_tokenizer();
    let mut any_split = false;
    for text in TEXTS {
        let ids = encode(&tokenizer, text);
        any_split |= splits_characters(&tokenizer, &ids);
        let chunks = stream_all(&tokenizer, &ids);
        assert_eq!(chunks.concat(), decode(&tokenizer, &ids), "{text:?}");
    }
    assert!(any_split);
    // Decoding token by token would lose every word's space; the stream must not.
    let ids = encode(&tokenizer, "héllo wörld");
    let naive: String = ids.iter().map(|&id| decode(&tokenizer, &[id])).collect();
    assert_ne!(
        naive, "héllo wörld",
        "the decoder should strip spaces per decode call"
    );
    assert_eq!(stream_all(&tokenizer, &ids).concat(), "héllo wörld");
}

#[test]
fn special_tokens_are_skipped_or_kept_like_decode() {
    for tokenizer in [byte_level_tokenizer(), byte_fallback_tokenizer()] {
        let special = tokenizer
            .get_vocab(true)
            .into_iter()
            .find(|(t, _)| t == "<|endoftext|>" || t == "</s>");
        let special = special.expect("special token").1;
        let mut ids = encode(&tokenizer, "héllo wörld");
        ids.insert(2, special);
        ids.push(special);
        ids.extend(encode(&tokenizer, " 🙂 wörld"));
        for skip in [true, false] {
            let mut stream =
                TextStream::new(tokenizer.clone(), vec![]).with_skip_special_tokens(skip);
            let mut out = String::new();
            for &id in &ids {
                out.push_str(&stream.push(id).unwrap().text);
            }
            out.push_str(&stream.finish().unwrap());
            assert_eq!(out, tokenizer.decode(&ids, skip).unwrap(), "skip={skip}");
        }
    }
}

#[test]
fn incomplete_final_character_is_flushed_by_finish() {
    let tokenizer = byte_level_tokenizer();
    let ids = encode(&tokenizer, "ok 🦀");
    // Drop tokens from the end until the text ends inside the crab.
    let cut = (1..ids.len())
        .rev()
        .find(|&n| decode(&tokenizer, &ids[..n]).ends_with('\u{FFFD}'))
        .expect("the crab spans several tokens");
    let mut stream = TextStream::new(tokenizer.clone(), vec![]);
    let mut out = String::new();
    for &id in &ids[..cut] {
        out.push_str(&stream.push(id).unwrap().text);
    }
    assert_eq!(out, "ok ");
    out.push_str(&stream.finish().unwrap());
    assert_eq!(out, decode(&tokenizer, &ids[..cut]));
    assert_eq!(
        stream.finish().unwrap(),
        "",
        "a second finish returns nothing"
    );
    assert!(matches!(stream.push(ids[cut]), Err(Error::InvalidInput(_))));
    stream.reset();
    let chunks: String = ids
        .iter()
        .map(|&id| stream.push(id).unwrap().text)
        .collect();
    assert_eq!(chunks + &stream.finish().unwrap(), "ok 🦀");
}

/// What the stream may show of `visible` (complete text, no stop string in it yet): all but
/// the longest suffix that is a proper prefix of a stop string. Brute force, as the spec says.
fn expected_visible<'a>(visible: &'a str, stops: &[&str]) -> &'a str {
    for (start, _) in visible.char_indices() {
        let tail = &visible[start..];
        if stops
            .iter()
            .any(|s| s.len() > tail.len() && s.starts_with(tail))
        {
            return &visible[..start];
        }
    }
    visible
}

/// Streams `text` with `stops`, checking after each push that the stream shows exactly the
/// decoded text minus what could still start a stop string. Returns (chunks + finish, stopped,
/// matched stop).
fn run_with_stops(
    tokenizer: &Arc<Tokenizer>,
    text: &str,
    stops: &[&str],
) -> (String, bool, Option<String>) {
    let stops_owned: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
    let mut stream = TextStream::new(tokenizer.clone(), stops_owned);
    let mut out = String::new();
    let mut stopped = false;
    let ids = encode(tokenizer, text);
    for (i, &id) in ids.iter().enumerate() {
        let chunk = stream.push(id).unwrap();
        assert!(!chunk.text.contains('\u{FFFD}'));
        out.push_str(&chunk.text);
        if chunk.stopped {
            stopped = true;
            assert!(stream.stopped());
            // Further tokens are ignored.
            let after = stream.push(id).unwrap();
            assert_eq!(
                after,
                StreamChunk {
                    text: String::new(),
                    stopped: true
                }
            );
            break;
        }
        let visible = decode(tokenizer, &ids[..=i]);
        if !visible.ends_with('\u{FFFD}') {
            assert_eq!(
                out,
                expected_visible(&visible, stops),
                "after token {i}, stops {stops:?}"
            );
        }
    }
    out.push_str(&stream.finish().unwrap());
    assert_eq!(out, stream.text());
    (
        out,
        stopped,
        stream.matched_stop_string().map(str::to_string),
    )
}

#[test]
fn stop_strings_spanning_tokens_false_prefixes_and_earliest_match() {
    for tokenizer in [byte_level_tokenizer(), byte_fallback_tokenizer()] {
        let text = "héllo wörld 日本語 🙂 héllo again";
        let ids = encode(&tokenizer, text);
        let full = decode(&tokenizer, &ids);

        // A stop string spread over several tokens, made of multi-byte characters.
        let (out, stopped, which) = run_with_stops(&tokenizer, text, &["日本"]);
        assert!(stopped);
        assert_eq!(which.as_deref(), Some("日本"));
        assert_eq!(out, full[..full.find("日本").unwrap()]);

        // False prefixes: "wörld" and "héllo" start stop strings that never complete; the text
        // is held back, then released, and the whole text comes out.
        let (out, stopped, _) =
            run_with_stops(&tokenizer, text, &["wörld!", "héllo world", "🙂🙂"]);
        assert!(!stopped);
        assert_eq!(out, full);

        // A stop prefix still held at the end comes out in finish().
        let (out, stopped, _) = run_with_stops(&tokenizer, "say héllo", &["héllo!"]);
        assert!(!stopped);
        assert_eq!(out, decode(&tokenizer, &encode(&tokenizer, "say héllo")));

        // Of several stop strings, the one that occurs first in the text wins.
        let (out, stopped, which) = run_with_stops(&tokenizer, text, &["🙂", "wör", "again"]);
        assert!(stopped);
        assert_eq!(which.as_deref(), Some("wör"));
        assert_eq!(out, full[..full.find("wör").unwrap()]);

        // A stop string at the very start gives no text at all.
        let (out, stopped, _) = run_with_stops(&tokenizer, text, &["hé"]);
        assert!(stopped);
        assert_eq!(out, full[..full.find("hé").unwrap()]);

        // Empty stop strings are ignored rather than matching everywhere.
        let (out, stopped, _) = run_with_stops(&tokenizer, text, &[""]);
        assert!(!stopped);
        assert_eq!(out, full);
    }
}

#[test]
fn reset_starts_a_new_text() {
    let tokenizer = byte_level_tokenizer();
    let mut stream = TextStream::new(tokenizer.clone(), vec!["🙂".into()]);
    for _ in 0..2 {
        let mut out = String::new();
        for id in encode(&tokenizer, "héllo 🙂 wörld") {
            let chunk = stream.push(id).unwrap();
            out.push_str(&chunk.text);
            if chunk.stopped {
                break;
            }
        }
        assert_eq!(out, "héllo ");
        assert!(stream.stopped());
        assert_eq!(stream.finish().unwrap(), "");
        stream.reset();
        assert!(!stream.stopped() && stream.text().is_empty() && stream.tokens().is_empty());
    }
}

/// Continuing a prompt: with `set_context`, prompt text + streamed text == decode(prompt + new)
/// at every split point, also where the prompt ends inside a character (the character then
/// comes out whole, from the last complete prompt prefix on).
#[test]
fn set_context_continues_a_prompt_at_every_split() {
    for (name, tokenizer) in [
        ("byte-level", byte_level_tokenizer()),
        ("byte-fallback", byte_fallback_tokenizer()),
    ] {
        let ids = encode(&tokenizer, "héllo wörld 🦀 日本語 € héllo");
        let full = decode(&tokenizer, &ids);
        let mut without_context_differs = false;
        let mut mid_char_splits = 0;
        let mut stream = TextStream::new(tokenizer.clone(), vec![]);
        for k in 1..ids.len() {
            let complete = (0..=k)
                .rev()
                .find(|&r| !decode(&tokenizer, &ids[..r]).ends_with('\u{FFFD}'))
                .unwrap();
            if complete < k {
                mid_char_splits += 1;
            }
            let shown = decode(&tokenizer, &ids[..complete]);
            stream.set_context(&ids[..k]).unwrap();
            let mut out = String::new();
            for &id in &ids[k..] {
                let chunk = stream.push(id).unwrap();
                assert!(
                    !chunk.text.contains('\u{FFFD}'),
                    "{name} split {k}: {:?}",
                    chunk.text
                );
                out.push_str(&chunk.text);
            }
            out.push_str(&stream.finish().unwrap());
            assert_eq!(format!("{shown}{out}"), full, "{name}, prompt = {k} tokens");
            assert_eq!(stream.tokens(), &ids[k..]);

            let mut fresh = TextStream::new(tokenizer.clone(), vec![]);
            let mut plain = String::new();
            for &id in &ids[k..] {
                plain.push_str(&fresh.push(id).unwrap().text);
            }
            plain.push_str(&fresh.finish().unwrap());
            without_context_differs |= complete == k && format!("{shown}{plain}") != full;
        }
        assert!(
            mid_char_splits > 0,
            "{name}: some split must fall inside a character"
        );
        if name == "byte-fallback" {
            assert!(
                without_context_differs,
                "the space-stripping decoder needs the context"
            );
        }
    }
}
