//! The byte-level BPE pre-tokenizers named by `tokenizer.ggml.pre`, rebuilt the way the HF
//! `tokenizer.json` they were converted from defines them.
//!
//! llama.cpp's converter records a name for the pre-tokenizer it recognised (by hashing the
//! original tokenizer's output on a fixed text); llama.cpp then applies its own regexes for that
//! name. Here each supported name maps back to the HF pipeline of that tokenizer family, so that
//! ids equal what `tokenizers` gives on the original `tokenizer.json`:
//!
//! | names | HF pipeline |
//! | --- | --- |
//! | `gpt-2`, `default`, unset, `phi-2` | `ByteLevel` with the GPT-2 regex |
//! | `mpt`, `olmo` (GPT-NeoX-20B vocabularies, used by the Mamba-2 checkpoints) | NFC, then as GPT-2 |
//! | `llama-bpe`, `llama3`, `llama-v3`, `falcon3`, `falcon-h1` | `Split` on the Llama-3 regex, `ByteLevel` without regex; merges ignored for whole-word vocabulary hits |
//! | `qwen2`, `deepseek-r1-qwen` | NFC, `Split` on the Qwen2 regex (single digits), `ByteLevel` without regex |
//! | `starcoder`, `refact` | single `Digits`, then `ByteLevel` with the GPT-2 regex |
//!
//! `default` and an absent key are files written before the converter recorded a name; their
//! tokenizers are almost always GPT-2 style, and llama.cpp's own fallback regex list for them
//! matches no HF tokenizer, so GPT-2 is the closest sound choice. Any other name is refused with
//! [`GgufError::UnsupportedPreTokenizer`](super::GgufError) rather than guessed.

use tokenizers::normalizers::{NormalizerWrapper, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

/// Every `tokenizer.ggml.pre` value [`super::tokenizer_from_gguf`] accepts for `gpt2` vocabularies
/// (an absent key is accepted too, as `default`).
pub const SUPPORTED_PRE: &[&str] = &[
    "default",
    "gpt-2",
    "phi-2",
    "mpt",
    "olmo",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "falcon3",
    "falcon-h1",
    "qwen2",
    "deepseek-r1-qwen",
    "starcoder",
    "refact",
];

/// Llama-3's split regex, as in its `tokenizer.json`.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama-3's with one digit per piece.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The HF pipeline pieces a pre-tokenizer name stands for.
pub(crate) struct BytePipeline {
    pub normalizer: Option<NormalizerWrapper>,
    pub pre_tokenizer: PreTokenizerWrapper,
    /// BPE `ignore_merges`: a pre-token that is a whole vocabulary entry is taken as is.
    pub ignore_merges: bool,
}

/// The pipeline for `pre` (`None`: the key is absent), or `None` for an unknown name.
pub(crate) fn byte_level_pipeline(pre: Option<&str>) -> Option<BytePipeline> {
    // add_prefix_space false everywhere: llama.cpp's converter only produces files for BPE
    // tokenizers without it, and HF's GPT-2 family does not add one either.
    let gpt2 = || ByteLevel::new(false, true, true);
    let split = |regex: &str| -> Option<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .ok()?;
        Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])))
    };
    Some(match pre.unwrap_or("default") {
        "default" | "gpt-2" | "phi-2" => BytePipeline {
            normalizer: None,
            pre_tokenizer: gpt2().into(),
            ignore_merges: false,
        },
        "mpt" | "olmo" => BytePipeline {
            normalizer: Some(NFC.into()),
            pre_tokenizer: gpt2().into(),
            ignore_merges: false,
        },
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "falcon-h1" => BytePipeline {
            normalizer: None,
            pre_tokenizer: split(LLAMA3_REGEX)?,
            ignore_merges: true,
        },
        "qwen2" | "deepseek-r1-qwen" => BytePipeline {
            normalizer: Some(NFC.into()),
            pre_tokenizer: split(QWEN2_REGEX)?,
            ignore_merges: false,
        },
        "starcoder" | "refact" => BytePipeline {
            normalizer: None,
            pre_tokenizer: PreTokenizerWrapper::Sequence(Sequence::new(vec![
                Digits::new(true).into(),
                gpt2().into(),
            ])),
            ignore_merges: false,
        },
        _ => return None,
    })
}
