//! `mamba2 perplexity` end to end on the bundled model and its held-out validation text
//! (`models/mamba2-tiny/validation.txt`, ~60k tokens).
//!
//! To keep CI fast the quality checks score the first 24 chunks of 512 tokens (6,120 scored
//! tokens, ~3-5 s a run), not all 118; the full-text figures are in BENCHMARKS.md ("Perplexity:
//! quantized weights vs bf16, and vs llama-perplexity").

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
}

fn validation() -> String {
    repo("models/mamba2-tiny/validation.txt")
        .to_string_lossy()
        .into_owned()
}

fn mamba2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mamba2"))
        .arg("perplexity")
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run mamba2")
}

/// Runs `perplexity` on the bundled model (no --model: the default) and returns the JSON of the
/// last stdout line and the stderr text.
fn ppl(args: &[&str]) -> (serde_json::Value, String) {
    let file = validation();
    let mut all = vec!["--file", &file, "--device", "cpu"];
    all.extend_from_slice(args);
    let o = mamba2(&all);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{all:?}: {err}");
    let out = String::from_utf8(o.stdout).unwrap();
    let last = out.lines().last().expect("a JSON line on stdout");
    (serde_json::from_str(last).unwrap(), err)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b
}

/// bf16 (the checkpoint's own dtype) as the baseline; f32 agrees with it; Q8_0 within 1 % and
/// Q4_K within 5 % (issue 17's targets); the level is sane against the training record.
///
/// The quantized runs use f32 activations: that is how llama.cpp computes with block-quantized
/// weights on the CPU (so the figure is the one to compare with llama-perplexity), and since the
/// checkpoint's weights are bf16, which f32 holds exactly, the gap to bf16 is then the weight
/// quantization plus bf16's own activation rounding (measured: f32 vs bf16 0.02 %).
#[test]
fn quantized_perplexity_is_within_the_issue_targets() {
    let chunks = ["--chunks", "24"];
    let (bf16, err) = ppl(&[&chunks[..], &["--dtype", "bf16"]].concat());
    let (f32_, _) = ppl(&chunks);
    let (q8, _) = ppl(&[&chunks[..], &["--quantize", "q8_0"]].concat());
    let (q4k, _) = ppl(&[&chunks[..], &["--quantize", "q4_k"]].concat());

    // llama-perplexity's progress line and final estimate on stderr
    assert!(err.contains("[1]") && err.contains("[24]"), "{err}");
    assert!(err.contains("Final estimate: PPL = "), "{err}");
    // the JSON contract
    for (v, dtype, quant) in [
        (&bf16, "bf16", None),
        (&f32_, "f32", None),
        (&q8, "f32", Some("Q8_0")),
        (&q4k, "f32", Some("Q4_K")),
    ] {
        assert_eq!(v["chunks"], 24, "{v}");
        assert_eq!(v["ctx"], 512, "{v}");
        assert_eq!(v["scored_tokens"], 24 * 255, "{v}");
        assert_eq!(v["dtype"], dtype, "{v}");
        assert_eq!(v["quantization"].as_str(), quant, "{v}");
        assert_eq!(v["bos"], serde_json::Value::Null, "{v}");
        let (p, nll) = (v["ppl"].as_f64().unwrap(), v["nll_mean"].as_f64().unwrap());
        assert!((p - nll.exp()).abs() < 1e-9 * p, "{v}");
        // llama.cpp's propagation: ppl_stderr = ppl * stderr of the mean NLL
        let e = v["ppl_stderr"].as_f64().unwrap();
        assert!(
            (e - p * v["nll_stderr"].as_f64().unwrap()).abs() < 1e-9 * e,
            "{v}"
        );
        assert!(e > 0.0 && e < 0.1 * p, "{v}");
    }
    let b = bf16["ppl"].as_f64().unwrap();
    let f = f32_["ppl"].as_f64().unwrap();
    let q8p = q8["ppl"].as_f64().unwrap();
    let q4p = q4k["ppl"].as_f64().unwrap();
    eprintln!("ppl bf16 {b:.4} f32 {f:.4} q8_0 {q8p:.4} q4_k {q4p:.4}");
    // Same weights (bf16 in the checkpoint), activations rounded to bf16 or not: 0.02 % measured;
    // 0.5 % leaves room for other CPUs' summation orders while catching a real activation bug.
    assert!(rel(f, b) < 5e-3, "f32 {f} vs bf16 {b}");
    assert!(rel(q8p, b) < 0.01, "q8_0 {q8p} vs bf16 {b}: target 1 %");
    assert!(rel(q4p, b) < 0.05, "q4_k {q4p} vs bf16 {b}: target 5 %");
    // Training record: val_ppl_f32 57.9 over the whole text in windows of 256 with every token
    // scored (0-255 tokens of context). Here each scored token has 256-510 tokens of context and
    // only the first 24 chunks count (measured 53.8; 57.3 over all 118 chunks): same ballpark,
    // so a loose range that still catches a broken model or a shifted target (ppl in the hundreds).
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("models/mamba2-tiny/training_meta.json")).unwrap(),
    )
    .unwrap();
    let train = meta["val_ppl_f32"].as_f64().unwrap();
    assert!(
        b > 0.75 * train && b < 1.1 * train,
        "bf16 {b} vs training {train}"
    );
}

/// Chunks per forward do not change the result; 7 chunks in batches of 3 leaves a last batch of
/// one. Dense f32 and block-quantized with bf16 activations.
#[test]
fn batch_does_not_change_the_result() {
    for extra in [&[][..], &["--quantize", "q4_k", "--dtype", "bf16"][..]] {
        let base = [&["--chunks", "7"][..], extra].concat();
        let (one, _) = ppl(&[&base[..], &["--batch", "1"]].concat());
        let (three, _) = ppl(&[&base[..], &["--batch", "3"]].concat());
        let (a, b) = (one["ppl"].as_f64().unwrap(), three["ppl"].as_f64().unwrap());
        assert!(rel(b, a) < 1e-4, "{extra:?}: batch 1 {a} vs batch 3 {b}");
        assert_eq!(one["scored_tokens"], three["scored_tokens"]);
        assert_eq!(three["batch"], 3);
    }
}

/// A GGUF model brings its own tokenizer (`tokenizer.ggml.*`, add_bos_token false: no BOS).
#[test]
fn gguf_model_with_its_own_tokenizer() {
    let model = repo("tests/fixtures/gguf/m2_h256_g2_quant/q8_0.gguf");
    let (v, _) = ppl(&[
        "--model",
        model.to_str().unwrap(),
        "--ctx",
        "64",
        "--chunks",
        "3",
    ]);
    assert_eq!(v["ctx"], 64);
    assert_eq!(v["scored_tokens"], 3 * 31);
    assert_eq!(v["bos"], serde_json::Value::Null);
    assert!(v["ppl"].as_f64().unwrap().is_finite());
}

#[test]
fn bad_input_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "It is a truth universally acknowledged.").unwrap();
    let missing = dir.path().join("missing.txt");
    let v = validation();
    let cases: [(Vec<&str>, &str); 6] = [
        (vec!["--file", empty.to_str().unwrap()], "is empty"),
        (
            vec!["--file", short.to_str().unwrap()],
            "fewer than one chunk of --ctx 512",
        ),
        (vec!["--file", &v, "--ctx", "1"], "--ctx must be at least"),
        (vec!["--file", &v, "--ctx", "2"], "--ctx must be at least"),
        (vec!["--file", missing.to_str().unwrap()], "reading"),
        (vec!["--file", &v, "--batch", "0"], "--batch"),
    ];
    for (args, want) in cases {
        let o = mamba2(&[&args[..], &["--device", "cpu"]].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(
            err.contains("Error") && err.contains(want),
            "{args:?}: {err}"
        );
        assert!(o.stdout.is_empty(), "{args:?}: no JSON on failure");
    }
}
