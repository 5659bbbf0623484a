//! `tokenizer_from_gguf` against references nobody here wrote: HF `tokenizers` (python) on the
//! bundled model's tokenizer.json, SentencePiece on a model trained for the test, and (ignored
//! test, needs llama.cpp's sources) the HF ids that llama.cpp ships for its vocab files. Then
//! every metadata problem as a typed error naming the key.
//!
//! Fixtures: `tests/data/gguf/`, written by `scripts/gguf_vocab_fixture.py` (llama.cpp's
//! converter for the GGUF files, HF tokenizers / SentencePiece for the ids).

mod support_gguf;

use std::path::{Path, PathBuf};

use mamba2::gguf::{special_tokens, tokenizer_from_gguf, GgufError, GgufFile, GgufValue};
use mamba2::Error;
use serde_json::Value;
use support_gguf::{f32s, i32s, s, strings, Writer};
use tokenizers::Tokenizer;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/gguf")
        .join(name)
}

struct Case {
    text: String,
    ids: Vec<u32>,
    ids_with_special: Vec<u32>,
    decode: String,
    decode_skip_special: String,
    hf_ids: Option<Vec<u32>>,
    sp_decode: Option<String>,
}

fn cases(file: &str) -> Vec<Case> {
    let json: Value = serde_json::from_str(&std::fs::read_to_string(data(file)).unwrap()).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            ids: ids(&c["ids"]),
            ids_with_special: ids(&c["ids_with_special"]),
            decode: c["decode"].as_str().unwrap().to_string(),
            decode_skip_special: c["decode_skip_special"].as_str().unwrap().to_string(),
            hf_ids: c.get("hf_ids").map(ids),
            sp_decode: c.get("sp_decode").map(|d| d.as_str().unwrap().to_string()),
        })
        .collect()
}

fn encode(t: &Tokenizer, text: &str, special: bool) -> Vec<u32> {
    t.encode(text, special).unwrap().get_ids().to_vec()
}

fn check_against(tokenizer: &Tokenizer, cases: &[Case]) {
    assert!(cases.len() > 25);
    for c in cases {
        assert_eq!(encode(tokenizer, &c.text, false), c.ids, "{:?}", c.text);
        assert_eq!(
            encode(tokenizer, &c.text, true),
            c.ids_with_special,
            "{:?} with special tokens",
            c.text
        );
        assert_eq!(
            tokenizer.decode(&c.ids, false).unwrap(),
            c.decode,
            "{:?}",
            c.text
        );
        assert_eq!(
            tokenizer.decode(&c.ids, true).unwrap(),
            c.decode_skip_special,
            "{:?} skipping special tokens",
            c.text
        );
    }
}

#[test]
fn bundled_vocab_gives_hf_ids_and_decode() {
    let file = GgufFile::open(&data("mamba2-tiny-vocab.gguf")).unwrap();
    assert_eq!(file.get_str("tokenizer.ggml.model").unwrap(), Some("gpt2"));
    assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), Some("gpt-2"));
    let tokenizer = tokenizer_from_gguf(&file).unwrap();
    assert_eq!(tokenizer.get_vocab_size(true), 4096);
    let cases = cases("mamba2-tiny-ids.json");
    // The reference really exercises the special token and multi-token text.
    assert!(cases.iter().any(|c| c.ids.contains(&0) && c.ids.len() > 2));
    check_against(&tokenizer, &cases);

    // Same ids as the original tokenizer.json through the Rust library, on texts the python
    // reference did not see.
    let original = Tokenizer::from_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/mamba2-tiny/tokenizer.json"),
    )
    .unwrap();
    let text = "Elizabeth, feeling all the more than common awkwardness and anxiety of her \
                situation, now forced herself to speak;\n\n\"Well?\" 1797 -- é\u{301}";
    for end in (0..text.len()).filter(|&i| text.is_char_boundary(i)) {
        let t = &text[..end];
        assert_eq!(
            encode(&tokenizer, t, false),
            encode(&original, t, false),
            "{t:?}"
        );
    }
}

#[test]
fn bundled_vocab_special_tokens() {
    let file = GgufFile::open(&data("mamba2-tiny-vocab.gguf")).unwrap();
    let st = special_tokens(&file).unwrap();
    assert_eq!(st.bos, Some(0));
    assert_eq!(st.eos, Some(0));
    assert_eq!(st.padding, Some(0));
    assert_eq!(st.unknown, None);
    assert!(!st.add_bos && !st.add_eos);
}

#[test]
fn sentencepiece_vocab_gives_sentencepiece_ids() {
    let file = GgufFile::open(&data("tiny-spm-vocab.gguf")).unwrap();
    assert_eq!(file.get_str("tokenizer.ggml.model").unwrap(), Some("llama"));
    let st = special_tokens(&file).unwrap();
    // The converter writes no unknown_token_id for SentencePiece models: `<unk>` is found by its
    // token type (2).
    assert_eq!(
        (st.unknown, st.bos, st.eos, st.add_bos),
        (None, Some(1), Some(2), true)
    );
    assert_eq!(
        file.get_array("tokenizer.ggml.token_type")
            .unwrap()
            .unwrap()[0],
        GgufValue::I32(2)
    );
    let tokenizer = tokenizer_from_gguf(&file).unwrap();
    let cases = cases("tiny-spm-ids.json");
    // Byte fallback is exercised (CJK and emoji are not in the 400 pieces).
    let byte_ids = 3..259;
    assert!(cases
        .iter()
        .any(|c| c.ids.iter().any(|i| byte_ids.contains(i))));
    check_against(&tokenizer, &cases);

    // SentencePiece's own decoding agrees except for `<unk>`, which it shows as " ⁇ ".
    for c in cases.iter().filter(|c| !c.ids.contains(&0)) {
        let got = tokenizer.decode(&c.ids, true).unwrap();
        assert_eq!(&got, c.sp_decode.as_ref().unwrap(), "{:?}", c.text);
    }

    // transformers' current LlamaTokenizer prepends `▁` only to a first piece that does not start
    // with a space; where that does not matter, it agrees too.
    let mut compared = 0;
    for c in &cases {
        let specials = ["<s>", "</s>", "<unk>"];
        if !c.text.starts_with(' ') && !specials.iter().any(|s| c.text.contains(s)) {
            assert_eq!(c.hf_ids.as_ref().unwrap(), &c.ids, "{:?}", c.text);
            compared += 1;
        }
    }
    assert!(compared >= 20, "{compared}");
}

/// llama.cpp ships vocab-only GGUF files of real tokenizers with the ids HF's AutoTokenizer gives
/// for ~45 strings (`models/ggml-vocab-*.gguf{,.inp,.out}`, written by its
/// convert_hf_to_gguf_update.py). Too large to commit; run with
/// `eval "$(bash ../shared/tools/llama-cpp.sh)"; cargo test -p mamba2 --test gguf_tokenizer -- --ignored`.
#[test]
#[ignore = "needs llama.cpp's sources: set LLAMA_SRC"]
fn llama_cpp_reference_vocabularies() {
    let src = PathBuf::from(std::env::var("LLAMA_SRC").expect("LLAMA_SRC"));
    let names = [
        "gpt-2",
        "mpt",
        "llama-bpe",
        "qwen2",
        "starcoder",
        "refact",
        "llama-spm",
        "phi-3",
    ];
    for name in names {
        let base = src.join(format!("models/ggml-vocab-{name}.gguf"));
        let file = GgufFile::open(&base).unwrap();
        let tokenizer = tokenizer_from_gguf(&file).unwrap();
        let inp = std::fs::read_to_string(base.with_extension("gguf.inp")).unwrap();
        let out = std::fs::read_to_string(base.with_extension("gguf.out")).unwrap();
        let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        let mut n = 0;
        for (text, line) in texts.iter().zip(out.lines()) {
            let want: Vec<u32> = line
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            assert_eq!(encode(&tokenizer, text, false), want, "{name}: {text:?}");
            n += 1;
        }
        assert!(n > 40, "{name}: {n} cases");
        eprintln!("{name}: {n} cases equal");
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata problems.

/// A valid gpt2 vocabulary of 6 tokens: `a`, `b`, `ab`, `Ġ`, `Ġab`, `<|eos|>`.
fn gpt2_vocab() -> Writer {
    Writer::new(3)
        .kv("general.architecture", s("mamba2"))
        .kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.pre", s("gpt-2"))
        .kv(
            "tokenizer.ggml.tokens",
            strings(&["a", "b", "ab", "Ġ", "Ġab", "<|eos|>"]),
        )
        .kv("tokenizer.ggml.token_type", i32s(&[1, 1, 1, 1, 1, 3]))
        .kv("tokenizer.ggml.merges", strings(&["a b", "Ġ ab"]))
        .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(5))
}

fn set(mut w: Writer, key: &str, value: Option<GgufValue>) -> Writer {
    w.kv.retain(|(k, _)| k != key);
    if let Some(v) = value {
        w.kv.push((key.to_string(), v));
    }
    w
}

fn build(w: &Writer) -> Result<Tokenizer, Error> {
    let file = GgufFile::from_bytes(w.bytes(), "vocab.gguf")?;
    tokenizer_from_gguf(&file)
}

fn gguf_err(r: Result<Tokenizer, Error>) -> GgufError {
    match r {
        Err(Error::Gguf(e)) => {
            assert!(e.to_string().contains("vocab.gguf"), "{e}");
            e
        }
        Err(e) => panic!("not a GGUF error: {e:?}"),
        Ok(_) => panic!("built a tokenizer"),
    }
}

#[test]
fn hand_written_vocabulary_builds_and_tokenizes() {
    let t = build(&gpt2_vocab()).unwrap();
    assert_eq!(encode(&t, "ab ab<|eos|>", false), vec![2, 4, 5]);
    assert_eq!(t.decode(&[2, 4, 5], true).unwrap(), "ab ab");
    assert_eq!(t.decode(&[2, 4, 5], false).unwrap(), "ab ab<|eos|>");
    // add_eos_token puts EOS after the text, only with special tokens asked for.
    let w = set(
        gpt2_vocab(),
        "tokenizer.ggml.add_eos_token",
        Some(GgufValue::Bool(true)),
    );
    let t = build(&w).unwrap();
    assert_eq!(encode(&t, "ab", true), vec![2, 5]);
    assert_eq!(encode(&t, "ab", false), vec![2]);
    // An absent token_type makes every token normal: `<|eos|>` is then plain text.
    let t = build(&set(gpt2_vocab(), "tokenizer.ggml.token_type", None)).unwrap();
    assert_eq!(t.get_added_tokens_decoder().len(), 0);
}

#[test]
fn missing_and_mistyped_keys_name_the_key() {
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
    ] {
        match gguf_err(build(&set(gpt2_vocab(), key, None))) {
            GgufError::MissingKey { key: k, .. } => assert_eq!(k, key),
            e => panic!("{key}: {e:?}"),
        }
    }
    let wrong: [(&str, GgufValue, &str); 5] = [
        (
            "tokenizer.ggml.model",
            GgufValue::U32(2),
            "tokenizer.ggml.model",
        ),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(vec![GgufValue::U32(1); 6]),
            "tokenizer.ggml.tokens[0]",
        ),
        (
            "tokenizer.ggml.token_type",
            strings(&["1", "1", "1", "1", "1", "1"]),
            "tokenizer.ggml.token_type[0]",
        ),
        (
            "tokenizer.ggml.add_bos_token",
            GgufValue::U8(1),
            "tokenizer.ggml.add_bos_token",
        ),
        (
            "tokenizer.ggml.eos_token_id",
            GgufValue::I32(-1),
            "tokenizer.ggml.eos_token_id",
        ),
    ];
    for (key, value, named) in wrong {
        match gguf_err(build(&set(gpt2_vocab(), key, Some(value)))) {
            GgufError::MetadataType { key: k, .. } => assert_eq!(k, named),
            e => panic!("{key}: {e:?}"),
        }
    }
}

#[test]
fn inconsistent_lengths_and_ids_are_refused() {
    let w = set(
        gpt2_vocab(),
        "tokenizer.ggml.token_type",
        Some(i32s(&[1, 1, 3])),
    );
    match gguf_err(build(&w)) {
        GgufError::TokenArrayLength {
            key, len, expected, ..
        } => {
            assert_eq!(
                (key.as_str(), len, expected),
                ("tokenizer.ggml.token_type", 3, 6)
            )
        }
        e => panic!("{e:?}"),
    }
    let w = set(
        gpt2_vocab(),
        "tokenizer.ggml.eos_token_id",
        Some(GgufValue::U32(6)),
    );
    match gguf_err(build(&w)) {
        GgufError::TokenIdOutOfRange { key, id, vocab, .. } => {
            assert_eq!(
                (key.as_str(), id, vocab),
                ("tokenizer.ggml.eos_token_id", 6, 6)
            )
        }
        e => panic!("{e:?}"),
    }
    // add_bos_token without a BOS id.
    let w = set(
        gpt2_vocab(),
        "tokenizer.ggml.add_bos_token",
        Some(GgufValue::Bool(true)),
    );
    match gguf_err(build(&w)) {
        GgufError::MissingKey { key, .. } => assert_eq!(key, "tokenizer.ggml.bos_token_id"),
        e => panic!("{e:?}"),
    }
    // llama vocabularies need scores, one per token.
    let llama = set(gpt2_vocab(), "tokenizer.ggml.model", Some(s("llama")));
    match gguf_err(build(&llama)) {
        GgufError::MissingKey { key, .. } => assert_eq!(key, "tokenizer.ggml.scores"),
        e => panic!("{e:?}"),
    }
    let w = set(llama, "tokenizer.ggml.scores", Some(f32s(&[0.0; 5])));
    match gguf_err(build(&w)) {
        GgufError::TokenArrayLength { key, len, .. } => {
            assert_eq!((key.as_str(), len), ("tokenizer.ggml.scores", 5))
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn bad_merges_and_unknown_kinds() {
    let w = set(
        gpt2_vocab(),
        "tokenizer.ggml.merges",
        Some(strings(&["a b", "ab"])),
    );
    match gguf_err(build(&w)) {
        GgufError::BadMerge {
            index,
            merge,
            reason,
            ..
        } => {
            assert_eq!((index, merge.as_str()), (1, "ab"));
            assert!(reason.contains("no space"), "{reason}");
        }
        e => panic!("{e:?}"),
    }
    // Merges that can never fire (a half or the result outside the vocabulary, as in files whose
    // vocabulary the converter cut to the model's size) are dropped, not fatal.
    let w = set(
        gpt2_vocab(),
        "tokenizer.ggml.merges",
        Some(strings(&["a b", "a c", "b a", "Ġ ab", "x y"])),
    );
    let t = build(&w).unwrap();
    assert_eq!(encode(&t, "ab ab ba", false), vec![2, 4, 3, 1, 0]);
    match gguf_err(build(&set(
        gpt2_vocab(),
        "tokenizer.ggml.model",
        Some(s("bert")),
    ))) {
        GgufError::UnsupportedTokenizer { model, .. } => assert_eq!(model, "bert"),
        e => panic!("{e:?}"),
    }
    let w = set(gpt2_vocab(), "tokenizer.ggml.pre", Some(s("deepseek-llm")));
    match gguf_err(build(&w)) {
        GgufError::UnsupportedPreTokenizer { pre, supported, .. } => {
            assert_eq!(pre, "deepseek-llm");
            assert!(supported.contains("llama-bpe"), "{supported}");
        }
        e => panic!("{e:?}"),
    }
    // An absent pre-tokenizer name is GPT-2's, like `default`.
    let t = build(&set(gpt2_vocab(), "tokenizer.ggml.pre", None)).unwrap();
    assert_eq!(encode(&t, "ab ab", false), vec![2, 4]);
}
