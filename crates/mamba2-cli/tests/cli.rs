//! The `mamba2` binary end to end: the `logits` contract against HF's reference logits, and the
//! JSON of `bench` and `info`, and clean failures.

#[path = "../../../tests/common/mod.rs"]
mod common;
use candle_core::{DType, Device};
use common::max_abs_diff;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn mamba2(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mamba2"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run mamba2")
}

#[test]
fn logits_follows_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    for (case, layout) in [
        ("g8_ds16_hd16_b3_untied", "ssm"),
        ("g1_ds128_hd64_padvocab", "hf"),
    ] {
        let fx = fixture(case);
        let reference =
            candle_core::safetensors::load(fx.join("reference.safetensors"), &Device::Cpu).unwrap();
        let ids = &reference["input_ids"];
        assert_eq!(ids.dtype(), DType::I64);
        let input = dir.path().join("in.safetensors");
        let out = dir.path().join("out.safetensors");
        candle_core::safetensors::save(
            &[("input_ids".to_string(), ids.clone())]
                .into_iter()
                .collect(),
            &input,
        )
        .unwrap();
        let p = reference["prefill_len"].to_vec1::<i64>().unwrap()[0].to_string();
        let model = fx.join(layout);
        let o = mamba2(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--prefill-len",
            &p,
            "--device",
            "cpu",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        for key in ["logits_prefill", "logits_decode"] {
            let (g, r) = (&got[key], &reference[key]);
            assert_eq!(g.dtype(), DType::F32, "{key}");
            assert_eq!(g.dims(), r.dims(), "{key}: [batch, seq, vocab rows]");
            let e = max_abs_diff(g, r);
            assert!(e < 5e-5, "{case} {key}: {e}");
        }
        // default prefill length seq/2 also works, and bf16 stays within the bf16 tolerance
        let o = mamba2(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--dtype",
            "bf16",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        assert!(max_abs_diff(&got["logits_decode"], &reference["logits_prefill"]) < 0.15);
    }
}

#[test]
fn bench_and_info_print_json() {
    let model = fixture("g2_ds16_seq3_b2").join("hf");
    let o = mamba2(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prefill",
        "20",
        "--decode",
        "4",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["prefill_tok_s"].as_f64().unwrap() > 0.0 && v["decode_tok_s"].as_f64().unwrap() > 0.0
    );
    assert_eq!(v["prefill_s"].as_array().unwrap().len(), 2);
    assert_eq!(v["dtype"], "f32");
    let o = mamba2(&["info", "--model", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["config"]["ngroups"], 2);
    assert!(v["parameters"].as_u64().unwrap() > 0);
}

#[test]
fn bad_arguments_fail_cleanly() {
    let model = fixture("g2_ds16_seq3_b2").join("hf");
    for args in [
        vec!["info", "--model", "/nonexistent/model"],
        vec![
            "info",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "tpu",
        ],
        vec!["info", "--model", model.to_str().unwrap(), "--dtype", "f8"],
        vec!["bench", "--shape", "999b"],
    ] {
        let o = mamba2(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(err.contains("Error"), "{args:?}: {err}");
    }
}

#[test]
fn generate_with_the_bundled_model_prints_hf_greedy_text() {
    let golden =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/mamba2_tiny_golden.json");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
    let p = &meta["prompts"][0];
    let n = p["greedy_ids"].as_array().unwrap().len().to_string();
    // no --model: the bundled model
    let o = mamba2(&[
        "generate",
        "--device",
        "cpu",
        "--temperature",
        "0",
        "--ignore-eos",
        "-n",
        &n,
        "--prompt",
        p["prompt"].as_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(
        text.trim_end_matches('\n'),
        p["full_text"].as_str().unwrap()
    );
}

/// A word-level tokenizer of `n` tokens `t0 … t{n-1}` (the hybrid fixtures ship none).
fn word_tokenizer(n: usize) -> String {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..n).map(|i| (format!("t{i}"), i.into())).collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    })
    .to_string()
}

#[test]
fn hybrids_run_logits_info_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    for (case, layout, pattern) in [
        ("bamba_b2", "hf", "M-*-M-*-"),
        ("granite_nope_tied_b2", "hub", "M-*-M-*-"),
        ("falcon_h1_rmsnorm_g2_b2", "hf", "P-P-"),
        ("nemotron_h_hd80_b1", "hub", "*M-M*-"),
    ] {
        let fx = fixture("hybrid").join(case);
        let reference =
            candle_core::safetensors::load(fx.join("reference.safetensors"), &Device::Cpu).unwrap();
        let input = dir.path().join("in.safetensors");
        let out = dir.path().join("out.safetensors");
        let ids = reference["input_ids"].clone();
        candle_core::safetensors::save(
            &[("input_ids".to_string(), ids)].into_iter().collect(),
            &input,
        )
        .unwrap();
        let p = reference["prefill_len"].to_vec1::<i64>().unwrap()[0].to_string();
        let model = fx.join(layout);
        let (m, i, o) = (
            model.to_str().unwrap(),
            input.to_str().unwrap(),
            out.to_str().unwrap(),
        );
        let run = mamba2(&[
            "logits",
            "--model",
            m,
            "--input",
            i,
            "--out",
            o,
            "--prefill-len",
            &p,
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        for key in ["logits_prefill", "logits_decode"] {
            let e = max_abs_diff(&got[key], &reference[key]);
            assert!(e < 1e-4, "{case} {key}: {e}");
        }

        let run = mamba2(&["info", "--model", m]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        assert_eq!(v["layer_pattern"], pattern, "{case}");
        let a = &v["config"]["attention"];
        let n_attn = pattern.chars().filter(|c| matches!(c, '*' | 'P')).count() as u64;
        let kv =
            n_attn * 2 * a["num_kv_heads"].as_u64().unwrap() * a["head_dim"].as_u64().unwrap() * 4;
        assert_eq!(v["kv_bytes_per_token"].as_u64().unwrap(), kv, "{case}");
        assert!(v["state_bytes_per_sequence"].as_u64().unwrap() > 0);

        // generate with the model folder's own tokenizer
        let with_tok = dir.path().join(case);
        std::fs::create_dir_all(&with_tok).unwrap();
        for f in std::fs::read_dir(&model).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, with_tok.join(f.file_name().unwrap())).unwrap();
        }
        std::fs::write(with_tok.join("tokenizer.json"), word_tokenizer(128)).unwrap();
        let run = mamba2(&[
            "generate",
            "--model",
            with_tok.to_str().unwrap(),
            "--prompt",
            "t5 t9 t1",
            "-n",
            "6",
            "--temperature",
            "0",
        ]);
        assert!(
            run.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        // The prompt echoed, then six generated words of the model's vocabulary.
        let text = String::from_utf8_lossy(&run.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(words.len(), 3 + 6, "{case}: {text}");
        assert!(
            words[3..].iter().all(|w| w.starts_with('t')),
            "{case}: {text}"
        );
    }
}
