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
