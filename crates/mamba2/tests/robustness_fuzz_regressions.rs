//! Inputs found by the fuzz targets in `fuzz/` (see docs/robustness.md), replayed the way each
//! target feeds them, in the normal test suite (no nightly, no sanitizer needed).

use std::path::{Path, PathBuf};

use mamba2::{Error, Mamba2Config};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz")
        .join(name)
}

/// fuzz target `config_json`, crash-df05dbb8: a wrong-typed string field whose text has
/// multi-byte characters around byte 57 made the error message's truncation panic
/// (`String::truncate` off a char boundary, config/json.rs `type_err`).
#[test]
fn config_type_error_with_multibyte_value_does_not_panic() {
    let bytes = std::fs::read(data("config_json-crash-df05dbb8.json")).unwrap();
    let text = String::from_utf8_lossy(&bytes); // as the fuzz target feeds it
    match Mamba2Config::from_json_str(&text, "fuzz/config.json") {
        Err(e @ Error::ConfigParse { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("`num_heads`"), "{msg}");
            assert!(msg.ends_with("..."), "{msg}");
        }
        other => panic!("expected ConfigParse, got {other:?}"),
    }
    // The same shape written by hand: every cut position around the 57-byte limit.
    for pad in 0..8 {
        let value = format!("{}{}", "a".repeat(pad), "é".repeat(40));
        let json = format!(
            r#"{{"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2,
                 "vocab_size": 100, "head_dim": "{value}"}}"#
        );
        match Mamba2Config::from_json_str(&json, "c.json") {
            Err(e @ Error::ConfigParse { .. }) => assert!(e.to_string().contains("`head_dim`")),
            other => panic!("pad {pad}: expected ConfigParse, got {other:?}"),
        }
    }
}

/// Loads `file` (a whole `pytorch_model.bin`) in a child process limited to a 4 GiB address
/// space, so that the test runner survives an out-of-memory abort; true if the child got a typed
/// `WeightFile` error.
fn loads_to_a_typed_error_in_bounded_memory(test_name: &str, file: &Path) -> bool {
    const CHILD: &str = "MAMBA2_BOUNDED_MEMORY_CHILD";
    if let Some(path) = std::env::var_os(CHILD) {
        let r =
            mamba2::weights::Weights::from_files(&[PathBuf::from(path)], &candle_core::Device::Cpu);
        assert!(matches!(r, Err(Error::WeightFile { .. })), "{r:?}");
        println!("{}", r.unwrap_err());
        // A distinct exit code proves the child really ran this load (a filtered-out run exits 0).
        std::process::exit(42);
    }
    let exe = std::env::current_exe().unwrap();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4194304; exec \"$0\" --include-ignored --exact \"$1\" --test-threads=1 --nocapture")
        .arg(exe)
        .arg(test_name)
        .env(CHILD, file)
        .status()
        .unwrap();
    status.code() == Some(42)
}

/// Found while building the `pytorch_bin` fuzz target: Candle 0.11's pickle reader deep-clones
/// memo entries on every BINPUT/BINGET, so `tests/data/hostile_memo_blowup.bin` (336 bytes: an
/// empty list appended to itself 40 times through the memo; see make_malicious_pickles.py) needs
/// 2^40 objects. Fixed by our bounded pre-scan of `data.pkl` (`pickle_guard.rs`), which refuses
/// it before Candle's reader runs.
#[test]
fn pickle_memo_blowup_is_refused_within_bounded_memory() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hostile_memo_blowup.bin");
    assert!(loads_to_a_typed_error_in_bounded_memory(
        "pickle_memo_blowup_is_refused_within_bounded_memory",
        &file
    ));
}

/// Fixed by `pickle_guard`: fuzz target `pytorch_bin`, oom-5d3e9bc3 (raw mode: the file is the
/// input without its first byte). A BINUNICODE opcode declares a 0xFF000027-byte string and
/// Candle's reader allocates it (`vec![0u8; len]`, 4.28 GB) before reading: an allocation driven by
/// an unchecked size field. The pre-scan bounds every declared length by the data left (this
/// file also fails the zip CRC check first; `pickle_guard`'s unit tests cover the length check).
#[test]
fn pickle_huge_string_length_is_refused_within_bounded_memory() {
    let input = std::fs::read(data("pytorch_bin-oom-5d3e9bc3.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pytorch_model.bin");
    std::fs::write(&file, &input[1..]).unwrap();
    assert!(loads_to_a_typed_error_in_bounded_memory(
        "pickle_huge_string_length_is_refused_within_bounded_memory",
        &file
    ));
}
