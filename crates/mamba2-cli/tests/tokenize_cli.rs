//! `mamba2 tokenize` end to end: the bundled model folder and the vocab-only GGUF of its
//! tokenizer give HF tokenizers' ids (crates/mamba2/tests/data/gguf/mamba2-tiny-ids.json, from
//! scripts/gguf_vocab_fixture.py); stdin input; `--add-special-tokens` on a vocabulary that asks
//! for BOS; `--tokenizer` winning over a GGUF's own; clean failures.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn gguf_data(name: &str) -> String {
    repo("crates/mamba2/tests/data/gguf")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn mamba2(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mamba2"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mamba2");
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(pipe);
    child.wait_with_output().unwrap()
}

/// The JSON array on the last line of stdout.
fn ids(o: &Output) -> Vec<u32> {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout.clone()).unwrap();
    let last = out.lines().last().expect("a line on stdout");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{last:?}: {e}"))
}

/// (text, ids without special tokens) of the HF reference.
fn reference() -> Vec<(String, Vec<u32>)> {
    let path = gguf_data("mamba2-tiny-ids.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().unwrap();
            (
                c["text"].as_str().unwrap().to_string(),
                ids.iter().map(|i| i.as_u64().unwrap() as u32).collect(),
            )
        })
        .collect()
}

#[test]
fn folder_and_gguf_give_the_hf_ids() {
    let folder = repo("models/mamba2-tiny").to_string_lossy().into_owned();
    let gguf = gguf_data("mamba2-tiny-vocab.gguf");
    let cases = reference();
    assert!(cases.len() > 25);
    for (text, want) in &cases {
        for model in [&folder, &gguf] {
            let o = mamba2(&["tokenize", "--model", model, "--prompt", text], None);
            assert_eq!(&ids(&o), want, "{model}: {text:?}");
        }
    }
    // Without --model: the bundled model.
    let (text, want) = &cases[3];
    assert_eq!(&ids(&mamba2(&["tokenize", "--prompt", text], None)), want);
}

#[test]
fn stdin_special_tokens_and_override() {
    let (text, want) = reference().swap_remove(13); // several lines
    assert!(text.contains('\n'));
    let gguf = gguf_data("mamba2-tiny-vocab.gguf");
    for args in [
        &["tokenize", "--model", &gguf][..],
        &["tokenize", "--model", &gguf, "--prompt", "-"],
    ] {
        assert_eq!(ids(&mamba2(args, Some(&text))), want);
    }
    // The SentencePiece vocabulary asks for BOS (id 1): only with --add-special-tokens.
    let spm = gguf_data("tiny-spm-vocab.gguf");
    let plain = ids(&mamba2(
        &["tokenize", "--model", &spm, "--prompt", "Hello world"],
        None,
    ));
    let with_bos = ids(&mamba2(
        &[
            "tokenize",
            "--model",
            &spm,
            "--prompt",
            "Hello world",
            "--add-special-tokens",
        ],
        None,
    ));
    assert!(!plain.is_empty() && plain[0] != 1);
    assert_eq!(with_bos, [&[1][..], &plain].concat());
    // --tokenizer wins over the GGUF's own vocabulary (a tokenizer.json or another GGUF).
    let tiny_json = repo("models/mamba2-tiny/tokenizer.json")
        .to_string_lossy()
        .into_owned();
    let (text, want) = &reference()[3];
    for tok in [&tiny_json, &gguf] {
        let o = mamba2(
            &[
                "tokenize",
                "--model",
                &spm,
                "--tokenizer",
                tok,
                "--prompt",
                text,
            ],
            None,
        );
        assert_eq!(&ids(&o), want, "{tok}");
    }
}

#[test]
fn bad_gguf_fails_cleanly_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.gguf");
    let mut bytes = std::fs::read(gguf_data("tiny-spm-vocab.gguf")).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&bad, bytes).unwrap();
    let o = mamba2(
        &[
            "tokenize",
            "--model",
            bad.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        None,
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("broken.gguf") && err.contains("truncated"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(o.stdout.is_empty());
}
