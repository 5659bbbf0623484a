//! The `tokenizer.ggml.*` vocabulary of an exported GGUF, from a byte-level BPE `tokenizer.json`.

use super::*;

pub(super) fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

pub(super) fn refuse_tokenizer(message: impl std::fmt::Display) -> Error {
    Error::Unsupported(format!(
        "GGUF export of this tokenizer: {message} (supported: byte-level BPE tokenizers with the \
         pre-tokenizers {})",
        PRE_TOKENIZERS.join(", ")
    ))
}

/// The `tokenizer.ggml.pre` name of a `tokenizer.json` (see [`PRE_TOKENIZERS`]).
pub(super) fn pre_tokenizer_name(json: &Value) -> Result<&'static str> {
    let nfc = match &json["normalizer"] {
        Value::Null => false,
        n if n["type"] == "NFC" => true,
        n => {
            return Err(refuse_tokenizer(format!(
                "normalizer {n} (only none or NFC)"
            )))
        }
    };
    let pre = &json["pre_tokenizer"];
    let steps: Vec<&Value> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        Some(_) => vec![pre],
        None => Vec::new(),
    };
    let byte_level = |v: &Value, regex: bool| {
        v["type"] == "ByteLevel"
            && !v["add_prefix_space"].as_bool().unwrap_or(true)
            && v["use_regex"].as_bool().unwrap_or(true) == regex
    };
    let split = |v: &Value, pattern: &str| {
        v["type"] == "Split"
            && v["pattern"]["Regex"] == pattern
            && v["behavior"] == "Isolated"
            && !v["invert"].as_bool().unwrap_or(false)
    };
    let digits = |v: &Value| v["type"] == "Digits" && v["individual_digits"] == true;
    let ignore_merges = json["model"]["ignore_merges"].as_bool().unwrap_or(false);
    let name = match (nfc, steps.as_slice()) {
        (false, [b]) if byte_level(b, true) => "gpt-2",
        (true, [b]) if byte_level(b, true) => "mpt",
        (false, [s, b]) if split(s, LLAMA3_REGEX) && byte_level(b, false) => "llama-bpe",
        (true, [s, b]) if split(s, QWEN2_REGEX) && byte_level(b, false) => "qwen2",
        (false, [d, b]) if digits(d) && byte_level(b, true) => "starcoder",
        _ => {
            return Err(refuse_tokenizer(format!(
                "normalizer {} with pre-tokenizer {pre} has no llama.cpp pre-tokenizer name",
                if nfc { "NFC" } else { "none" }
            )))
        }
    };
    // llama-bpe vocabularies take whole-word vocabulary hits as is; the others merge.
    if ignore_merges != (name == "llama-bpe") {
        return Err(refuse_tokenizer(format!(
            "pre-tokenizer {name} with BPE ignore_merges {ignore_merges}"
        )));
    }
    Ok(name)
}

/// The converter's `does_token_look_special`.
pub(super) fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// Merges as the converter writes them: `"a b"`; parts of the pair format that contain a
/// space have it encoded as U+0120, as gguf-py does.
pub(super) fn merges_of(model: &Value) -> Result<Vec<String>> {
    let Some(list) = model["merges"].as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) if pair.len() == 2 => {
                let part = |v: &Value| -> Result<String> {
                    let s = v
                        .as_str()
                        .ok_or_else(|| refuse_tokenizer(format!("merge {m}")))?;
                    Ok(s.replace(' ', "\u{120}"))
                };
                Ok(format!("{} {}", part(&pair[0])?, part(&pair[1])?))
            }
            other => Err(refuse_tokenizer(format!("merge {other}"))),
        })
        .collect()
}

/// Special token ids to write, and their `tokenizer.ggml.*_token_id` key stems.
pub(super) struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
}

impl SpecialIds {
    pub(super) fn resolve(c: &Mamba2Config, opts: &GgufExportOptions) -> Self {
        Self {
            bos: opts.bos_token_id.or(c.bos_token_id),
            eos: opts.eos_token_id.or(c.eos_token_ids.first().copied()),
            pad: opts.pad_token_id.or(c.pad_token_id),
        }
    }

    /// The keys for the ids that are tokens of a `vocab`-entry vocabulary; others are skipped
    /// with a warning, as the converter skips them.
    fn metadata(&self, vocab: usize, warnings: &mut Vec<String>) -> Metadata {
        let mut m = Vec::new();
        for (stem, id) in [("bos", self.bos), ("eos", self.eos), ("padding", self.pad)] {
            match id {
                Some(id) if (id as usize) < vocab => m.push((
                    format!("tokenizer.ggml.{stem}_token_id"),
                    GgufValue::U32(id),
                )),
                Some(id) => warnings.push(format!(
                    "{stem} token id {id} is not below the vocabulary size {vocab}: not written"
                )),
                None => {}
            }
        }
        m
    }
}

/// The `tokenizer.ggml.*` keys of a byte-level BPE tokenizer for an embedding of `rows` rows.
pub(super) fn vocab_metadata(
    tokenizer: &Tokenizer,
    rows: usize,
    special: &SpecialIds,
    warnings: &mut Vec<String>,
) -> Result<(Metadata, ExportedVocab)> {
    let json: Value =
        serde_json::from_str(&tokenizer.to_string(false).map_err(tok_err)?).map_err(tok_err)?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(refuse_tokenizer(format!("model type {}", model["type"])));
    }
    for (flag, bad) in [
        ("byte_fallback", model["byte_fallback"] == true),
        ("dropout", !model["dropout"].is_null()),
        (
            "continuing_subword_prefix",
            !model["continuing_subword_prefix"].is_null(),
        ),
        ("end_of_word_suffix", !model["end_of_word_suffix"].is_null()),
    ] {
        if bad {
            return Err(refuse_tokenizer(format!("BPE with {flag} {}", model[flag])));
        }
    }
    let pre = pre_tokenizer_name(&json)?;
    let too_big = |id: u64, token: &str| {
        Error::InvalidInput(format!(
            "tokenizer token {token:?} has id {id}, past the model's {rows} embedding rows"
        ))
    };
    let mut by_id: Vec<Option<(String, i32)>> = vec![None; rows];
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| refuse_tokenizer("BPE without a vocab"))?;
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| refuse_tokenizer(format!("vocab id {id}")))?;
        let slot = by_id
            .get_mut(id as usize)
            .ok_or_else(|| too_big(id, token))?;
        *slot = Some((token.clone(), token_type::NORMAL));
    }
    let added = json["added_tokens"].as_array().cloned().unwrap_or_default();
    for a in &added {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(refuse_tokenizer(format!("added token {a}")));
        };
        // The converter stores added tokens pre-normalized: those the tokenizer does not
        // normalize go through encode + decode.
        let mut text = content.to_string();
        if a["normalized"] == false {
            if let Ok(enc) = tokenizer.encode(content, false) {
                if let Ok(t) = tokenizer.decode(enc.get_ids(), false) {
                    text = t;
                }
            }
        }
        let ty = if a["special"] == true || looks_special(&text) {
            token_type::CONTROL
        } else {
            text = text.replace('\u{2581}', " ");
            token_type::USER_DEFINED
        };
        let slot = by_id
            .get_mut(id as usize)
            .ok_or_else(|| too_big(id, content))?;
        *slot = Some((text, ty));
    }
    let mut tokens = Vec::with_capacity(rows);
    let mut types = Vec::with_capacity(rows);
    let mut padding = 0;
    for (i, entry) in by_id.into_iter().enumerate() {
        let (t, ty) = entry.unwrap_or_else(|| {
            padding += 1;
            (format!("[PAD{i}]"), token_type::UNUSED)
        });
        tokens.push(GgufValue::String(t));
        types.push(GgufValue::I32(ty));
    }
    let merges = merges_of(model)?;
    let summary = ExportedVocab {
        model: "gpt2".into(),
        pre: pre.into(),
        tokens: rows,
        padding,
        merges: merges.len(),
    };
    let mut m: Metadata = vec![
        (
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), GgufValue::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(merges.into_iter().map(GgufValue::String).collect()),
        ),
    ];
    m.extend(special.metadata(rows, warnings));
    m.push((
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(false),
    ));
    m.push((
        "tokenizer.ggml.add_eos_token".into(),
        GgufValue::Bool(false),
    ));
    check_vocab(tokenizer, &m, &added, pre)?;
    Ok((m, summary))
}

/// Reads the vocabulary keys back as this engine's GGUF tokenizer does and compares its ids with
/// the source tokenizer's on [`CHECK_TEXTS`] and on every added token in context.
fn check_vocab(source: &Tokenizer, vocab: &Metadata, added: &[Value], pre: &str) -> Result<()> {
    let mut kv: Metadata = vec![(
        "general.architecture".into(),
        GgufValue::String("mamba2".into()),
    )];
    kv.extend(vocab.iter().cloned());
    let mut bytes = Vec::new();
    write_header(&mut bytes, &kv, &[])?;
    let file = GgufFile::from_bytes(bytes, "<exported vocabulary>")?;
    let written = tokenizer_from_gguf(&file)?;
    // Compare ids only: no padding or truncation a tokenizer.json may switch on.
    let mut source = source.clone();
    source.with_padding(None);
    source.with_truncation(None).map_err(tok_err)?;
    let mut texts: Vec<String> = CHECK_TEXTS.iter().map(|s| s.to_string()).collect();
    texts.extend(
        added
            .iter()
            .take(64)
            .filter_map(|a| a["content"].as_str())
            .map(|c| format!("a{c} b {c}c")),
    );
    for text in &texts {
        let want = source.encode(text.as_str(), false).map_err(tok_err)?;
        let got = written.encode(text.as_str(), false).map_err(tok_err)?;
        if want.get_ids() != got.get_ids() {
            return Err(refuse_tokenizer(format!(
                "the vocabulary written for it (pre-tokenizer {pre}) tokenizes {text:?} as {:?}, \
                 the tokenizer as {:?}",
                got.get_ids(),
                want.get_ids()
            )));
        }
    }
    Ok(())
}
