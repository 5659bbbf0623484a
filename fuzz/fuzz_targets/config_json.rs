//! `Mamba2Config::from_json_str` on arbitrary text: a typed error or a config whose derived sizes
//! can be computed without overflow; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mamba2::{Error, Mamba2Config};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Mamba2Config::from_json_str(&text, "fuzz/config.json") {
        Ok(cfg) => {
            // What the loader computes from an accepted config, before any tensor is read.
            let _ = cfg.padded_vocab_size();
            let _ = cfg.conv_dim();
            let _ = cfg.d_in_proj();
            for canonical in ["d_model", "nheads", "dt_limit", "headdim"] {
                let _ = cfg.field_name(canonical);
            }
            assert!(cfg.validate().is_ok());
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(
                matches!(
                    e,
                    Error::ConfigParse { .. } | Error::ConfigField { .. } | Error::Unsupported(_)
                ),
                "unexpected error kind: {e:?}"
            );
        }
    }
});
