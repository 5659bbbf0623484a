//! Bad inputs that the other test files did not cover (see docs/robustness.md for the full
//! table): non-finite and absurd numbers in size fields, config files that are not text or nest
//! too deep, ragged batches, dtypes a model cannot run in, NaN weights behind the opt-in check,
//! and the messages of session-file, device and dtype errors. Each asserts the typed error and
//! that its message names the file, field or tensor.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use mamba2::pipeline::{load_model, load_model_with_check};
use mamba2::session::{CancelToken, GenerateOptions, Session};
use mamba2::weights::Weights;
use mamba2::{Error, Mamba2Config, Mamba2Model};

fn fixture_hf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/g2_ds16_seq3_b2/hf")
}

fn small_config() -> Mamba2Config {
    let mut c = Mamba2Config::preset("130m").unwrap();
    (
        c.d_model,
        c.n_layer,
        c.headdim,
        c.nheads,
        c.d_inner,
        c.d_state,
        c.vocab_size,
        c.pad_vocab_size_multiple,
    ) = (32, 2, 16, 4, 64, 16, 50, 1);
    c
}

/// An HF config with every size field set and `field` replaced by the raw JSON text `value`.
fn hf_with(field: &str, value: &str) -> String {
    let mut fields = vec![
        ("model_type", r#""mamba2""#.to_string()),
        ("hidden_size", "64".into()),
        ("num_hidden_layers", "2".into()),
        ("vocab_size", "100".into()),
        ("num_heads", "8".into()),
        ("head_dim", "16".into()),
        ("n_groups", "2".into()),
        ("state_size", "16".into()),
        ("expand", "2".into()),
        ("conv_kernel", "4".into()),
        ("chunk_size", "64".into()),
    ];
    for f in fields.iter_mut() {
        if f.0 == field {
            f.1 = value.to_string();
        }
    }
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\": {v}"))
        .collect();
    format!("{{{}}}", body.join(", "))
}

#[test]
fn non_finite_and_absurd_numbers_in_size_fields_name_the_field() {
    assert!(Mamba2Config::from_json_str(&hf_with("hidden_size", "64"), "c.json").is_ok());
    let fields = [
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "num_heads",
        "head_dim",
        "n_groups",
        "state_size",
        "expand",
        "conv_kernel",
        "chunk_size",
    ];
    // Python's bare literals, transformers' tagged form, out-of-range and non-integral numbers.
    let values = [
        "Infinity",
        "-Infinity",
        "NaN",
        r#"{"__float__": "Infinity"}"#,
        "1e300",
        "18446744073709551616",
        "-1",
        "2.5",
        r#""64""#,
        "true",
        "[64]",
    ];
    for field in fields {
        for value in values {
            match Mamba2Config::from_json_str(&hf_with(field, value), "dir/config.json") {
                Err(e @ Error::ConfigParse { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains("dir/config.json"), "{msg}");
                    assert!(
                        msg.contains(&format!("`{field}`")),
                        "{field}={value}: {msg}"
                    );
                }
                other => panic!("{field} = {value}: expected ConfigParse, got {other:?}"),
            }
        }
    }
    // Integral but absurd: bounded before anything is allocated from it.
    for field in [
        "hidden_size",
        "num_hidden_layers",
        "state_size",
        "chunk_size",
    ] {
        match Mamba2Config::from_json_str(&hf_with(field, "4294967296"), "c.json") {
            Err(e @ Error::ConfigField { .. }) => {
                assert!(e.to_string().contains(field), "{e}")
            }
            other => panic!("{field}: expected ConfigField, got {other:?}"),
        }
    }
    match Mamba2Config::from_json_str(&hf_with("vocab_size", "4294967296"), "c.json") {
        Err(e @ Error::ConfigField { .. }) => assert!(e.to_string().contains("vocab_size"), "{e}"),
        other => panic!("expected ConfigField, got {other:?}"),
    }
}

#[test]
fn config_file_not_text_or_nested_too_deep() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, b"{\"hidden_size\": \xff\xfe}").unwrap();
    match Mamba2Config::from_file(&path) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("config.json"), "{e}"),
        other => panic!("expected Io, got {other:?}"),
    }
    // serde_json's recursion limit (128) turns a deeply nested file into a parse error.
    let deep = format!(
        "{{\"hidden_size\": {}1{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    std::fs::write(&path, deep).unwrap();
    match Mamba2Config::from_file(&path) {
        Err(e @ Error::ConfigParse { .. }) => assert!(e.to_string().contains("config.json"), "{e}"),
        other => panic!("expected ConfigParse, got {other:?}"),
    }
}

#[test]
fn ragged_batches_cannot_be_built_and_rows_of_a_rectangular_batch_are_independent() {
    // The model takes a rectangular (batch, seq) tensor; a ragged Vec<Vec<u32>> is refused by
    // Candle when the tensor is built, before the model sees it.
    let ragged = vec![vec![1u32, 2, 3], vec![4u32]];
    assert!(Tensor::new(ragged, &Device::Cpu).is_err());
    assert!(Tensor::from_vec(vec![1u32, 2, 3, 4], (2, 3), &Device::Cpu).is_err());
    // A cache made for another batch size is the model's own typed error, naming both sizes.
    let model = Mamba2Model::random(&small_config(), DType::F32, &Device::Cpu, 3).unwrap();
    let mut cache = model.new_cache(2).unwrap();
    let one = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    match model.forward(&one, Some(&mut cache)) {
        Err(e @ Error::InvalidInput(_)) => {
            let msg = e.to_string();
            assert!(msg.contains('1') && msg.contains('2'), "{msg}");
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    // Prompts of different lengths go into one session each (there is no padding mask: a padded
    // row would run its pad tokens through the state). Equal-length rows of one batch give each
    // row exactly what it gives alone.
    let batch = Tensor::new(&[[1u32, 2, 3, 4], [9, 8, 7, 6]], &Device::Cpu).unwrap();
    let both = model.forward(&batch, None).unwrap(); // (2, 4, vocab)
    for row in 0..2 {
        let alone = model
            .forward(&batch.narrow(0, row, 1).unwrap(), None)
            .unwrap();
        let diff = (both.narrow(0, row, 1).unwrap() - alone)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "row {row}: {diff}");
    }
}

#[test]
fn model_dtypes_f16_runs_on_cpu_and_unsupported_dtypes_are_named() {
    let cfg = small_config();
    // f16 and bf16 are implemented on the CPU backend (the only one on this machine): they run.
    for dt in [DType::F16, DType::BF16] {
        let m = Mamba2Model::random(&cfg, dt, &Device::Cpu, 5).unwrap();
        let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        let logits = m.forward(&ids, None).unwrap();
        let finite = logits
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite());
        assert!(finite, "{dt:?}");
    }
    for dt in [DType::F64, DType::U8, DType::I64] {
        match Mamba2Model::random(&cfg, dt, &Device::Cpu, 5) {
            Err(e @ Error::Dtype(_)) => assert!(e.to_string().contains(&format!("{dt:?}")), "{e}"),
            other => panic!("{dt:?}: expected Dtype, got {other:?}"),
        }
    }
    match mamba2::device::parse_dtype("f8") {
        Err(e @ Error::Dtype(_)) => assert!(e.to_string().contains("f8"), "{e}"),
        other => panic!("expected Dtype, got {other:?}"),
    }
}

#[test]
fn device_errors_name_the_device() {
    for bad in ["tpu", "cuda:x", "gpu:0"] {
        match bad.parse::<mamba2::device::DeviceChoice>() {
            Err(e @ Error::Device(_)) => assert!(e.to_string().contains(bad), "{e}"),
            other => panic!("{bad}: expected Device, got {other:?}"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    match mamba2::device::DeviceChoice::Cuda(0).open() {
        Err(e @ Error::Device(_)) => assert!(e.to_string().to_lowercase().contains("cuda"), "{e}"),
        other => panic!("expected Device, got {other:?}"),
    }
    #[cfg(not(feature = "metal"))]
    match mamba2::device::DeviceChoice::Metal(0).open() {
        Err(e @ Error::Device(_)) => {
            assert!(e.to_string().to_lowercase().contains("metal"), "{e}")
        }
        other => panic!("expected Device, got {other:?}"),
    }
}

#[test]
fn nan_weights_load_silently_unless_the_finite_check_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_hf();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let name = "backbone.layers.1.mixer.out_proj.weight";
    let w = &tensors[name];
    let mut values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[3] = f32::NAN;
    tensors.insert(
        name.into(),
        Tensor::from_vec(values, w.dims(), &Device::Cpu).unwrap(),
    );
    let weights_path = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights_path).unwrap();
    let cfg = Mamba2Config::from_file(&src.join("config.json")).unwrap();
    let weights = Weights::from_files(std::slice::from_ref(&weights_path), &Device::Cpu).unwrap();
    // Off (the default): it loads, and the NaN reaches the logits.
    let model = Mamba2Model::from_weights(&cfg, &weights, DType::F32).unwrap();
    let ids = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    let logits = model.forward(&ids, None).unwrap();
    let any_nan = logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .any(|v| v.is_nan());
    assert!(any_nan);
    // On: the load fails on that tensor, by name.
    let checked = weights.with_finite_check(true);
    match Mamba2Model::from_weights(&cfg, &checked, DType::F32) {
        Err(e @ Error::NonFinite { .. }) => assert!(e.to_string().contains(name), "{e}"),
        other => panic!("expected NonFinite, got {other:?}"),
    }
    // The pipeline's loader checks by default, and can be told not to.
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let files = mamba2::hub::ModelFiles {
        dir: dir.path().into(),
        config: dir.path().join("config.json"),
        weights: vec![weights_path.clone()],
        tokenizer: None,
        generation_config: None,
    };
    match load_model(&files, DType::F32, &Device::Cpu) {
        Err(e @ Error::NonFinite { .. }) => assert!(e.to_string().contains(name), "{e}"),
        other => panic!("expected NonFinite from load_model, got {other:?}"),
    }
    assert!(load_model_with_check(&files, DType::F32, &Device::Cpu, false).is_ok());
}

#[test]
fn f32_weights_past_the_f16_range_are_refused_in_an_f16_load() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_hf();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let name = "backbone.layers.0.mixer.in_proj.weight";
    let w = &tensors[name];
    let mut values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[0] = 1e6; // finite in f32 and bf16, inf in f16
    tensors.insert(
        name.into(),
        Tensor::from_vec(values, w.dims(), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let files = mamba2::hub::ModelFiles {
        dir: dir.path().into(),
        config: dir.path().join("config.json"),
        weights: vec![dir.path().join("model.safetensors")],
        tokenizer: None,
        generation_config: None,
    };
    assert!(load_model(&files, DType::F32, &Device::Cpu).is_ok());
    assert!(load_model(&files, DType::BF16, &Device::Cpu).is_ok());
    match load_model(&files, DType::F16, &Device::Cpu) {
        Err(e @ Error::NonFinite { .. }) => assert!(e.to_string().contains(name), "{e}"),
        other => panic!("expected NonFinite for an f16 load, got {other:?}"),
    }
}

#[test]
fn session_file_errors_name_the_file_and_the_reason() {
    let cfg = small_config();
    let model = Arc::new(Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 1).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::new(model.clone()).unwrap();
    s.feed(&[1, 2, 3]).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 3,
        ..Default::default()
    };
    s.generate(&opts, &CancelToken::new(), |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    let good = dir.path().join("chat.session");
    s.save(&good).unwrap();
    assert_eq!(
        Session::load(model.clone(), &good).unwrap().tokens(),
        s.tokens()
    );
    let expect = |path: &Path, model: &Arc<Mamba2Model>, needle: &str| match Session::load(
        model.clone(),
        path,
    ) {
        Err(e @ Error::SessionFile { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(needle), "{msg} lacks {needle:?}");
        }
        other => panic!("{}: expected SessionFile, got {other:?}", path.display()),
    };
    // Another model: a different shape, and the same shapes with other weights.
    let mut wider = cfg.clone();
    wider.d_state = 32;
    let other = Arc::new(Mamba2Model::random(&wider, DType::F32, &Device::Cpu, 1).unwrap());
    let reseeded = Arc::new(Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 99).unwrap());
    for (m, what) in [(&other, "model"), (&reseeded, "weights")] {
        match Session::load(m.clone(), &good) {
            Err(e @ Error::SessionModelMismatch { .. }) => {
                assert!(matches!(&e, Error::SessionModelMismatch { what: w, .. } if *w == what));
                let msg = e.to_string();
                assert!(msg.contains(&good.display().to_string()), "{msg}");
                assert!(msg.contains("another model"), "{msg}");
            }
            other => panic!("expected SessionModelMismatch {what}, got {other:?}"),
        }
    }
    // Truncated at several points, empty, and a file that is not a session at all.
    let bytes = std::fs::read(&good).unwrap();
    let bad = dir.path().join("bad.session");
    for cut in [0, 7, 40, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        expect(&bad, &model, "");
    }
    candle_core::safetensors::save(
        &[("x".to_string(), Tensor::new(&[1f32], &Device::Cpu).unwrap())]
            .into_iter()
            .collect(),
        &bad,
    )
    .unwrap();
    expect(&bad, &model, "not a mamba2-rs-session-v3 file");
    // A missing file is an Io error with the path.
    let missing = dir.path().join("nope.session");
    assert!(matches!(
        Session::load(model.clone(), &missing),
        Err(Error::Io { path, .. }) if path == missing
    ));
}

#[test]
fn session_and_text_level_token_ids_out_of_range() {
    let model =
        Arc::new(Mamba2Model::random(&small_config(), DType::F32, &Device::Cpu, 2).unwrap());
    let mut s = Session::new(model).unwrap();
    match s.feed(&[1, 2, 50, 3]) {
        Err(e @ Error::TokenOutOfRange { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("50") && msg.contains("position 2"), "{msg}");
        }
        other => panic!("expected TokenOutOfRange, got {other:?}"),
    }
    // Nothing of the refused call was queued: the session is still empty.
    assert!(s.tokens().is_empty());
    assert!(matches!(
        s.generate(&GenerateOptions::default(), &CancelToken::new(), |_| {
            std::ops::ControlFlow::Continue(())
        }),
        Err(Error::EmptyPrompt)
    ));
}
