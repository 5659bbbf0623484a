//! The binary on GGUF files and with `--quantize`: `generate` from a lone `.gguf` (tokenizer and
//! config from the file, nothing beside it), `logits` against llama.cpp-made fixtures' HF
//! reference, `info` naming the format, and clear failures for a missing file, an unknown
//! quantization and a non-GGUF file named `.gguf`.

#[path = "../../../tests/common/mod.rs"]
mod common;
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gguf")
        .join(rel)
}

fn mamba2(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mamba2"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run mamba2")
}

fn stdout(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn generate_from_a_lone_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let lone = dir.path().join("model.gguf");
    std::fs::copy(fixture("m2_h256_g2_quant/q4_k_m.gguf"), &lone).unwrap();
    let args = [
        "generate",
        "--model",
        lone.to_str().unwrap(),
        "--prompt",
        "It is a truth",
    ];
    let out = mamba2(
        &[
            &args[..],
            &["-n", "8", "--temperature", "0", "--device", "cpu"],
        ]
        .concat(),
    );
    let text = stdout(&out);
    assert!(text.starts_with("It is a truth"), "{text}");
    // Eight more tokens were generated (random weights: any text).
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("8 generated"), "{stderr}");
}

#[test]
fn logits_of_a_gguf_match_the_hf_reference() {
    let dir = tempfile::tempdir().unwrap();
    let reference = candle_core::safetensors::load(
        fixture("m2_h64_g2_untied_tok300/f32.reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let input = dir.path().join("in.safetensors");
    let out = dir.path().join("out.safetensors");
    let ids = reference["input_ids"]
        .to_dtype(candle_core::DType::I64)
        .unwrap();
    candle_core::safetensors::save(&[("input_ids".to_string(), ids)].into(), &input).unwrap();
    let gguf = fixture("m2_h64_g2_untied_tok300/f32.gguf");
    let o = mamba2(&[
        "logits",
        "--model",
        gguf.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--prefill-len",
        "20",
        "--device",
        "cpu",
    ]);
    stdout(&o);
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    for key in ["logits_prefill", "logits_decode"] {
        let d = common::max_abs_diff(&got[key], &reference["logits"]);
        assert!(d < 1e-4, "{key}: {d}");
    }
}

#[test]
fn info_names_the_format_and_quantize_shrinks_the_bytes() {
    let gguf = fixture("m2_h256_g2_quant/q8_0.gguf");
    let v: serde_json::Value = serde_json::from_str(&stdout(&mamba2(&[
        "info",
        "--model",
        gguf.to_str().unwrap(),
    ])))
    .unwrap();
    assert_eq!(v["quantization"], "Q8_0");
    let dense: serde_json::Value =
        serde_json::from_str(&stdout(&mamba2(&["info", "--device", "cpu"]))).unwrap();
    let q4: serde_json::Value = serde_json::from_str(&stdout(&mamba2(&[
        "info",
        "--device",
        "cpu",
        "--quantize",
        "q4_k",
    ])))
    .unwrap();
    assert_eq!(dense["quantization"], serde_json::Value::Null);
    assert_eq!(q4["quantization"], "Q4_K");
    let (d, q) = (
        dense["weight_bytes_per_token"].as_u64().unwrap(),
        q4["weight_bytes_per_token"].as_u64().unwrap(),
    );
    // f32 -> 4.5 bits per weight for nearly all bytes.
    assert!(q * 6 < d, "{q} vs {d}");
}

#[test]
fn bad_gguf_arguments_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let o = mamba2(&[
        "generate",
        "--model",
        missing.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such GGUF file"));
    let fake = dir.path().join("fake.gguf");
    std::fs::write(&fake, b"not a gguf at all").unwrap();
    let o = mamba2(&["info", "--model", fake.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a GGUF file"));
    let o = mamba2(&["info", "--quantize", "iq2_xs"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown quantization"));
}
