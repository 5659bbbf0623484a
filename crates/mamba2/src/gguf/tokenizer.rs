//! A `tokenizers::Tokenizer` built from a GGUF file's `tokenizer.ggml.*` metadata, equal to the
//! HF tokenizer the file was converted from.
//!
//! Two vocabulary kinds (`tokenizer.ggml.model`):
//! - `gpt2`: byte-level BPE. `tokens` are byte-level strings (`Ġthe`), `merges` are `"Ġ t"`
//!   pairs in rank order, `pre` names the pre-tokenizer (see [`SUPPORTED_PRE`]).
//! - `llama`: SentencePiece BPE. `tokens` use `▁` for spaces, `scores` rank the pieces, byte
//!   pieces `<0xNN>` take any character the vocabulary lacks, and `add_space_prefix` (default
//!   true) puts a `▁` before the text and after every special token, as SentencePiece and
//!   llama.cpp do. HF's BPE model needs merges, which SentencePiece files do not have: every
//!   split of a normal piece into two pieces is a merge, ranked by the whole piece's score
//!   (highest first), which makes HF's BPE pick the same pair SentencePiece's does.
//!
//! Token types (`token_type`): 2 (unknown) and 3 (control) become special added tokens (matched
//! in the text, skipped by `decode(.., true)`), 4 (user-defined) non-special added tokens, the
//! rest stay plain vocabulary. The post-processor adds BOS/EOS only when `add_bos_token` /
//! `add_eos_token` is true, so `encode(text, false)` and `encode(text, true)` behave as the HF
//! tokenizer's do. (llama.cpp adds BOS to `llama` vocabularies when the key is absent; the
//! converter writes the key whenever the source tokenizer says.)

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer};

use super::error::GgufError;
use super::pretokenizer::byte_level_pipeline;
pub use super::pretokenizer::SUPPORTED_PRE;
use super::{GgufFile, GgufValue};
use crate::error::Result;

/// Token types of `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

/// SentencePiece's visible space.
const SPACE: &str = "\u{2581}";

/// Special token ids and flags from `tokenizer.ggml.*`, each id checked to be in the vocabulary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GgufSpecialTokens {
    /// `bos_token_id`.
    pub bos: Option<u32>,
    /// `eos_token_id`.
    pub eos: Option<u32>,
    /// `eot_token_id` (end of turn, chat models).
    pub eot: Option<u32>,
    /// `unknown_token_id`.
    pub unknown: Option<u32>,
    /// `padding_token_id`.
    pub padding: Option<u32>,
    /// `seperator_token_id` (llama.cpp's spelling).
    pub separator: Option<u32>,
    /// `add_bos_token` (false when absent).
    pub add_bos: bool,
    /// `add_eos_token` (false when absent).
    pub add_eos: bool,
}

/// The special tokens of `file`'s vocabulary.
///
/// ```
/// use mamba2::gguf::{special_tokens, GgufFile};
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/gguf/mamba2-tiny-vocab.gguf");
/// let s = special_tokens(&GgufFile::open(std::path::Path::new(path))?)?;
/// assert_eq!((s.bos, s.eos, s.add_bos), (Some(0), Some(0), false));
/// # Ok::<(), mamba2::Error>(())
/// ```
pub fn special_tokens(file: &GgufFile) -> Result<GgufSpecialTokens> {
    let vocab = match file.get_array("tokenizer.ggml.tokens")? {
        Some(tokens) => tokens.len(),
        None => return Err(missing(file, "tokenizer.ggml.tokens")),
    };
    let id = |name: &str| -> Result<Option<u32>> {
        let key = format!("tokenizer.ggml.{name}_token_id");
        match file.get_u64(&key)? {
            None => Ok(None),
            Some(id) if id < vocab as u64 => Ok(Some(id as u32)),
            Some(id) => Err(GgufError::TokenIdOutOfRange {
                path: file.name(),
                key,
                id,
                vocab,
            }
            .into()),
        }
    };
    Ok(GgufSpecialTokens {
        bos: id("bos")?,
        eos: id("eos")?,
        eot: id("eot")?,
        unknown: id("unknown")?,
        padding: id("padding")?,
        separator: id("seperator")?,
        add_bos: file
            .get_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false),
        add_eos: file
            .get_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false),
    })
}

/// Builds the tokenizer `file`'s metadata describes (see the module doc).
///
/// ```
/// use mamba2::gguf::{tokenizer_from_gguf, GgufFile};
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/gguf/mamba2-tiny-vocab.gguf");
/// let tokenizer = tokenizer_from_gguf(&GgufFile::open(std::path::Path::new(path))?)?;
/// let enc = tokenizer.encode("It is a truth universally acknowledged", false).unwrap();
/// let text = tokenizer.decode(enc.get_ids(), false).unwrap();
/// assert_eq!(text, "It is a truth universally acknowledged");
/// # Ok::<(), mamba2::Error>(())
/// ```
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let model = file
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| missing(file, "tokenizer.ggml.model"))?;
    let tokens = string_array(file, "tokenizer.ggml.tokens")?
        .ok_or_else(|| missing(file, "tokenizer.ggml.tokens"))?;
    let types = match file.get("tokenizer.ggml.token_type") {
        // Absent: every token is normal (llama.cpp's reading too).
        None => vec![token_type::NORMAL; tokens.len()],
        Some(_) => {
            let types = int_array(file, "tokenizer.ggml.token_type")?.unwrap_or_default();
            check_len(file, "tokenizer.ggml.token_type", types.len(), tokens.len())?;
            types
        }
    };
    let special = special_tokens(file)?;
    let vocab = vocab_map(&tokens);
    let mut tokenizer = match model {
        "gpt2" => byte_level_bpe(file, &tokens, &vocab)?,
        "llama" => sentencepiece_bpe(file, &tokens, &types, &vocab, &special)?,
        other => {
            return Err(GgufError::UnsupportedTokenizer {
                path: file.name(),
                model: other.to_string(),
            }
            .into())
        }
    };
    add_typed_tokens(&mut tokenizer, &tokens, &types);
    let byte_level = model == "gpt2";
    tokenizer.with_post_processor(post_processor(file, &tokens, &special, byte_level)?);
    Ok(tokenizer)
}

fn byte_level_bpe(file: &GgufFile, tokens: &[&str], vocab: &Vocab) -> Result<Tokenizer> {
    let pre = file.get_str("tokenizer.ggml.pre")?;
    let pipeline = byte_level_pipeline(pre).ok_or_else(|| GgufError::UnsupportedPreTokenizer {
        path: file.name(),
        pre: pre.unwrap_or_default().to_string(),
        supported: SUPPORTED_PRE.join(", "),
    })?;
    let merges = string_array(file, "tokenizer.ggml.merges")?
        .ok_or_else(|| missing(file, "tokenizer.ggml.merges"))?;
    let merges = parse_merges(file, &merges, vocab)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .ignore_merges(pipeline.ignore_merges)
        .build()
        .map_err(|e| build_error(file, e))?;
    debug_assert!(tokens.len() >= vocab.len());
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(pipeline.normalizer)
        .with_pre_tokenizer(Some(pipeline.pre_tokenizer))
        .with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// `"left right"` merges, split at the first space after the first character (a token may be a
/// lone space in some vocabularies, as llama.cpp allows). A merge without a space is an error; a
/// merge whose halves or result are not tokens is dropped, since it can never produce a token:
/// llama.cpp's converter writes such merges when it cuts a built-in vocabulary to a model's
/// `vocab_size` (50 009 GPT-NeoX merges beside 96 tokens), and llama.cpp loads those files.
fn parse_merges(file: &GgufFile, merges: &[&str], vocab: &Vocab) -> Result<Merges> {
    let mut out = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let split = m.char_indices().skip(1).find(|&(_, c)| c == ' ');
        let Some((at, _)) = split else {
            return Err(GgufError::BadMerge {
                path: file.name(),
                index: i,
                merge: m.chars().take(60).collect(),
                reason: "no space separating two tokens".into(),
            }
            .into());
        };
        let (left, right) = (&m[..at], &m[at + 1..]);
        if vocab.contains_key(left)
            && vocab.contains_key(right)
            && vocab.contains_key(&format!("{left}{right}"))
        {
            out.push((left.to_string(), right.to_string()));
        }
    }
    Ok(out)
}

fn sentencepiece_bpe(
    file: &GgufFile,
    tokens: &[&str],
    types: &[i64],
    vocab: &Vocab,
    special: &GgufSpecialTokens,
) -> Result<Tokenizer> {
    let scores = float_array(file, "tokenizer.ggml.scores")?
        .ok_or_else(|| missing(file, "tokenizer.ggml.scores"))?;
    check_len(file, "tokenizer.ggml.scores", scores.len(), tokens.len())?;
    let add_space_prefix = file
        .get_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let merges = merges_from_scores(tokens, types, &scores, vocab);
    let unknown = special.unknown.or_else(|| {
        types
            .iter()
            .position(|&t| t == token_type::UNKNOWN)
            .map(|i| i as u32)
    });
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unknown {
        builder = builder.unk_token(tokens[unk as usize].to_string());
    }
    let bpe = builder.build().map_err(|e| build_error(file, e))?;

    let to_space = |from: &str, to: &str| Replace::new(from, to).map_err(|e| build_error(file, e));
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new(SPACE.into()).into());
    }
    normalizers.push(to_space(" ", SPACE)?.into());
    let mut decoders: Vec<DecoderWrapper> = vec![
        to_space(SPACE, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        // The prefix space the normalizer added comes back first in the decoded text.
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Pieces longer than this get no merges. Finding a piece's splits costs O(length^2), so without
/// a bound one huge token in a hostile file would take hours; SentencePiece's trainer caps pieces
/// at 16 characters by default and real vocabularies stay far below this.
const MAX_MERGED_PIECE_BYTES: usize = 1024;

/// Every split of a normal piece into two vocabulary pieces, most valuable piece first; ties in
/// score (which trained SentencePiece models do not have) go to the lower id, then to the split
/// with the lower ids.
fn merges_from_scores(tokens: &[&str], types: &[i64], scores: &[f32], vocab: &Vocab) -> Merges {
    let normal = |id: usize| types[id] == token_type::NORMAL;
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !normal(id)
            || piece.len() > MAX_MERGED_PIECE_BYTES
            || vocab.get(*piece) != Some(&(id as u32))
        {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = (vocab.get(&piece[..at]), vocab.get(&piece[at..]));
            if let (Some(&l), Some(&r)) = (l, r) {
                if normal(l as usize) && normal(r as usize) {
                    ranked.push((scores[id], id as u32, l, r));
                }
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    ranked
        .into_iter()
        .map(|(_, _, l, r)| {
            (
                tokens[l as usize].to_string(),
                tokens[r as usize].to_string(),
            )
        })
        .collect()
}

/// Token string -> id. When a string appears twice, the first id keeps it (the second can still
/// be decoded only if it is an added token).
fn vocab_map(tokens: &[&str]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(id as u32);
    }
    vocab
}

/// Unknown and control tokens as special added tokens, user-defined ones as plain added tokens,
/// all matched on the raw text (the converter stores them pre-normalized).
fn add_typed_tokens(tokenizer: &mut Tokenizer, tokens: &[&str], types: &[i64]) {
    let added = |wanted: &[i64], special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(types)
            .filter(|(t, ty)| !t.is_empty() && wanted.contains(ty))
            .map(|(t, _)| AddedToken::from(t.to_string(), special).normalized(false))
            .collect()
    };
    tokenizer.add_special_tokens(&added(&[token_type::UNKNOWN, token_type::CONTROL], true));
    tokenizer.add_tokens(&added(&[token_type::USER_DEFINED], false));
}

/// BOS/EOS around the text only when the file says to add them; byte-level vocabularies keep
/// HF's `ByteLevel` processor (it only adjusts offsets).
fn post_processor(
    file: &GgufFile,
    tokens: &[&str],
    special: &GgufSpecialTokens,
    byte_level: bool,
) -> Result<Option<PostProcessorWrapper>> {
    let byte_level = byte_level.then(|| ByteLevelProcessor::new(false, false, true).into());
    if !special.add_bos && !special.add_eos {
        return Ok(byte_level);
    }
    let mut specials = Vec::new();
    for (wanted, name, id, key) in [
        (
            special.add_bos,
            "BOS",
            special.bos,
            "tokenizer.ggml.bos_token_id",
        ),
        (
            special.add_eos,
            "EOS",
            special.eos,
            "tokenizer.ggml.eos_token_id",
        ),
    ] {
        if wanted {
            let id = id.ok_or_else(|| missing(file, key))?;
            let content = tokens[id as usize].to_string();
            specials.push(
                SpecialToken::new(name.into(), vec![id], vec![content])
                    .map_err(|e| build_error(file, e))?,
            );
        }
    }
    // HF's templates: `BOS $A EOS` and `BOS $A EOS BOS:1 $B:1 EOS:1` (the parts that apply).
    let wrap = |seq: &'static str, type_id: &'static str| {
        let mut parts = Vec::new();
        if special.add_bos {
            parts.push(format!("BOS{type_id}"));
        }
        parts.push(format!("{seq}{type_id}"));
        if special.add_eos {
            parts.push(format!("EOS{type_id}"));
        }
        parts
    };
    let single = wrap("$A", "");
    let pair = [single.clone(), wrap("$B", ":1")].concat();
    let template = TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| build_error(file, e))?
        .special_tokens(specials)
        .build()
        .map_err(|e| build_error(file, e))?;
    Ok(Some(match byte_level {
        Some(bl) => ProcessorSequence::new(vec![bl, template.into()]).into(),
        None => template.into(),
    }))
}

/// The strings of a string array (`Ok(None)` when absent); a non-string element is a
/// [`GgufError::MetadataType`] naming its index.
fn string_array<'a>(file: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>> {
    typed_array(file, key, "a string", GgufValue::as_str)
}

/// The integers of an integer array of any integer element type.
fn int_array(file: &GgufFile, key: &str) -> Result<Option<Vec<i64>>> {
    typed_array(file, key, "an integer", GgufValue::as_i64)
}

/// The floats of an f32 or f64 array.
fn float_array(file: &GgufFile, key: &str) -> Result<Option<Vec<f32>>> {
    typed_array(file, key, "a float", |v| v.as_f64().map(|f| f as f32))
}

fn typed_array<'a, T>(
    file: &'a GgufFile,
    key: &str,
    expected: &str,
    convert: impl Fn(&'a GgufValue) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(items) = file.get_array(key)? else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, v) in items.iter().enumerate() {
        match convert(v) {
            Some(t) => out.push(t),
            None => {
                return Err(GgufError::MetadataType {
                    path: file.name(),
                    key: format!("{key}[{i}]"),
                    expected: expected.into(),
                    got: v.describe(),
                }
                .into())
            }
        }
    }
    Ok(Some(out))
}

fn check_len(file: &GgufFile, key: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        return Ok(());
    }
    Err(GgufError::TokenArrayLength {
        path: file.name(),
        key: key.into(),
        len,
        expected,
    }
    .into())
}

fn missing(file: &GgufFile, key: &str) -> crate::Error {
    GgufError::MissingKey {
        path: file.name(),
        key: key.into(),
    }
    .into()
}

fn build_error(file: &GgufFile, e: impl std::fmt::Display) -> crate::Error {
    GgufError::TokenizerBuild {
        path: file.name(),
        message: e.to_string(),
    }
    .into()
}
