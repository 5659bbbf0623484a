//! Weights from safetensors: single and sharded files, both name layouts, padded vocab, dtype
//! conversion, and every malformed-file / wrong-tensor case as a typed error.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mamba2::weights::{find_weight_file, WeightFormat, Weights};
use mamba2::Error;
use safetensors::tensor::TensorView;
use safetensors::Dtype as St;

/// A tensor to write: name, safetensors dtype, shape, raw little-endian bytes.
type Raw = (&'static str, St, Vec<usize>, Vec<u8>);

fn f32s(name: &'static str, shape: &[usize], values: impl IntoIterator<Item = f32>) -> Raw {
    let bytes = values.into_iter().flat_map(f32::to_le_bytes).collect();
    (name, St::F32, shape.to_vec(), bytes)
}

/// f32 tensor filled with `start, start + 1, ...`.
fn arange(name: &'static str, shape: &[usize], start: f32) -> Raw {
    let n: usize = shape.iter().product();
    f32s(name, shape, (0..n).map(|i| start + i as f32))
}

fn write_st(path: &Path, tensors: &[Raw]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, shape, data)| {
            (
                n.to_string(),
                TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn open(path: &Path) -> Weights {
    Weights::from_files(&[path.to_path_buf()], &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
}

fn open_err(paths: &[PathBuf]) -> Error {
    match Weights::from_files(paths, &Device::Cpu) {
        Ok(_) => panic!("expected an error opening {paths:?}"),
        Err(e) => e,
    }
}

#[test]
fn hf_names_values_and_dtype_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_st(
        &path,
        &[
            arange("backbone.embeddings.weight", &[3, 2], 0.0),
            arange("backbone.layers.0.mixer.A_log", &[2], 0.5),
            arange("lm_head.weight", &[3, 2], 10.0),
        ],
    );
    let w = open(&path);
    assert_eq!(w.format(), WeightFormat::Safetensors);
    assert_eq!(w.files(), vec![path.as_path()]);
    assert_eq!(
        w.names(),
        [
            "backbone.embeddings.weight",
            "backbone.layers.0.mixer.A_log",
            "lm_head.weight"
        ]
    );
    assert_eq!(w.shape("backbone.embeddings.weight"), Some(vec![3, 2]));
    assert_eq!(w.stored_dtype("lm_head.weight"), Some(DType::F32));
    assert!(w.contains("lm_head.weight"));
    let emb = w
        .tensor("backbone.embeddings.weight", &[3, 2], DType::F32)
        .unwrap();
    assert_eq!(emb.dims(), &[3, 2]);
    assert_eq!(values(&emb), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    for dt in [DType::F16, DType::BF16, DType::F64] {
        let t = w.tensor("lm_head.weight", &[3, 2], dt).unwrap();
        assert_eq!(t.dtype(), dt);
        assert_eq!(values(&t), [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]); // exact in every dtype
    }
    assert_eq!(
        values(
            &w.tensor("backbone.layers.0.mixer.A_log", &[2], DType::F32)
                .unwrap()
        ),
        [0.5, 1.5]
    );
}

#[test]
fn stored_half_types_convert_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let h: Vec<u8> = [1.5f32, -2.25]
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let b: Vec<u8> = [0.5f32, 3.0]
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let d: Vec<u8> = [0.125f64, -8.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write_st(
        &path,
        &[
            ("a", St::F16, vec![2], h),
            ("b", St::BF16, vec![2], b),
            ("c", St::F64, vec![2], d),
        ],
    );
    let w = open(&path);
    assert_eq!(w.stored_dtype("a"), Some(DType::F16));
    assert_eq!(
        values(&w.tensor("a", &[2], DType::F32).unwrap()),
        [1.5, -2.25]
    );
    assert_eq!(
        values(&w.tensor("b", &[2], DType::F32).unwrap()),
        [0.5, 3.0]
    );
    assert_eq!(
        values(&w.tensor("c", &[2], DType::F32).unwrap()),
        [0.125, -8.0]
    );
}

#[test]
fn mamba_ssm_names_map_to_canonical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_st(
        &path,
        &[
            arange("backbone.embedding.weight", &[4, 2], 0.0),
            arange("backbone.norm_f.weight", &[2], 1.0),
        ],
    );
    let w = open(&path);
    assert!(w.contains("backbone.embeddings.weight"));
    assert!(!w.contains("backbone.embedding.weight"));
    assert!(!w.contains("lm_head.weight")); // tied: absent
    assert_eq!(
        w.names(),
        ["backbone.embeddings.weight", "backbone.norm_f.weight"]
    );
    assert_eq!(
        values(
            &w.tensor("backbone.embeddings.weight", &[4, 2], DType::F32)
                .unwrap()
        )[7],
        7.0
    );
}

#[test]
fn names_without_backbone_prefix() {
    // A bare Mamba2Model state dict.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_st(
        &path,
        &[
            arange("embeddings.weight", &[2, 2], 0.0),
            arange("layers.0.mixer.D", &[2], 3.0),
            arange("norm_f.weight", &[2], 5.0),
        ],
    );
    let w = open(&path);
    assert_eq!(
        w.names(),
        [
            "backbone.embeddings.weight",
            "backbone.layers.0.mixer.D",
            "backbone.norm_f.weight"
        ]
    );
    assert_eq!(
        values(
            &w.tensor("backbone.layers.0.mixer.D", &[2], DType::F32)
                .unwrap()
        ),
        [3.0, 4.0]
    );
}

#[test]
fn exact_canonical_name_wins_over_alias() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_st(
        &path,
        &[
            arange("backbone.embedding.weight", &[2], 100.0),
            arange("backbone.embeddings.weight", &[2], 0.0),
        ],
    );
    let w = open(&path);
    assert_eq!(
        values(
            &w.tensor("backbone.embeddings.weight", &[2], DType::F32)
                .unwrap()
        ),
        [0.0, 1.0]
    );
}

#[test]
fn padded_vocab_rows_visible_through_shape() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    // vocab 6 padded to a multiple of 8.
    write_st(&path, &[arange("backbone.embedding.weight", &[8, 2], 0.0)]);
    let w = open(&path);
    let rows = w.shape("backbone.embeddings.weight").unwrap()[0];
    assert_eq!(rows, 8);
    assert!(w
        .tensor("backbone.embeddings.weight", &[rows, 2], DType::F32)
        .is_ok());
    match w.tensor("backbone.embeddings.weight", &[6, 2], DType::F32) {
        Err(Error::TensorShape {
            name,
            expected,
            got,
        }) => {
            assert_eq!(name, "backbone.embedding.weight"); // the name as stored
            assert_eq!((expected, got), (vec![6, 2], vec![8, 2]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_shape_dtype_and_missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let i64s: Vec<u8> = [1i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_st(
        &path,
        &[
            arange("backbone.layers.0.mixer.D", &[4], 0.0),
            ("backbone.layers.0.mixer.A_log", St::I64, vec![2], i64s),
            (
                "backbone.layers.0.mixer.dt_bias",
                St::U8,
                vec![2],
                vec![1, 2],
            ),
            (
                "backbone.layers.0.mixer.conv1d.bias",
                St::BOOL,
                vec![2],
                vec![0, 1],
            ),
            (
                "backbone.layers.0.mixer.conv1d.weight",
                St::F8_E5M2,
                vec![2],
                vec![0, 1],
            ),
        ],
    );
    let w = open(&path);
    assert!(matches!(
        w.tensor("backbone.layers.0.mixer.D", &[2, 2], DType::F32),
        Err(Error::TensorShape { name, .. }) if name == "backbone.layers.0.mixer.D"
    ));
    assert!(matches!(
        w.tensor("backbone.layers.0.mixer.D", &[5], DType::F32),
        Err(Error::TensorShape { .. })
    ));
    for (name, got) in [
        ("backbone.layers.0.mixer.A_log", "I64"),
        ("backbone.layers.0.mixer.dt_bias", "U8"),
        ("backbone.layers.0.mixer.conv1d.bias", "BOOL"),
        ("backbone.layers.0.mixer.conv1d.weight", "F8_E5M2"),
    ] {
        match w.tensor(name, &[2], DType::F32) {
            Err(Error::TensorDtype {
                name: n,
                got: g,
                expected,
            }) => {
                assert_eq!(n, name);
                assert_eq!(g, got);
                assert!(expected.contains("float"));
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    match w.tensor("backbone.layers.1.mixer.D", &[4], DType::F32) {
        Err(Error::MissingTensor { name, source_desc }) => {
            assert_eq!(name, "backbone.layers.1.mixer.D");
            assert!(source_desc.contains("model.safetensors"), "{source_desc}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.shape("backbone.layers.1.mixer.D"), None);
}

fn expect_weight_file_error(path: &Path, needle: &str) {
    match open_err(&[path.to_path_buf()]) {
        Error::WeightFile { path: p, message } => {
            assert_eq!(p, path);
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        other => panic!("expected WeightFile, got {other:?}"),
    }
}

#[test]
fn malformed_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    write_st(&good, &[arange("a", &[16], 0.0), arange("b", &[16], 0.0)]);
    let bytes = std::fs::read(&good).unwrap();
    let path = dir.path().join("bad.safetensors");

    // Truncated data section.
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    expect_weight_file_error(&path, "truncated");
    // Truncated inside the header.
    std::fs::write(&path, &bytes[..20]).unwrap();
    expect_weight_file_error(&path, "exceeds the file size");
    // Trailing garbage.
    let mut padded = bytes.clone();
    padded.extend_from_slice(&[0; 4]);
    std::fs::write(&path, &padded).unwrap();
    expect_weight_file_error(&path, "does not match");
    // Header length larger than the file.
    let mut long = bytes.clone();
    long[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
    std::fs::write(&path, &long).unwrap();
    expect_weight_file_error(&path, "exceeds the file size");
    // Absurd header length.
    long[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &long).unwrap();
    expect_weight_file_error(&path, "invalid safetensors");
    // Too short / empty.
    std::fs::write(&path, [1, 2, 3]).unwrap();
    expect_weight_file_error(&path, "shorter than");
    std::fs::write(&path, []).unwrap();
    expect_weight_file_error(&path, "shorter than");
    // Header that is not JSON.
    let mut junk = 4u64.to_le_bytes().to_vec();
    junk.extend_from_slice(b"{{{{");
    std::fs::write(&path, &junk).unwrap();
    expect_weight_file_error(&path, "invalid safetensors");
    // Offsets that overlap.
    let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let mut overlap = (header.len() as u64).to_le_bytes().to_vec();
    overlap.extend_from_slice(header);
    overlap.extend_from_slice(&[0; 12]);
    std::fs::write(&path, &overlap).unwrap();
    expect_weight_file_error(&path, "invalid safetensors");
    // Shape that disagrees with the byte range.
    let header = br#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    let mut wrong = (header.len() as u64).to_le_bytes().to_vec();
    wrong.extend_from_slice(header);
    wrong.extend_from_slice(&[0; 8]);
    std::fs::write(&path, &wrong).unwrap();
    expect_weight_file_error(&path, "invalid safetensors");
    // A missing file.
    let missing = dir.path().join("nope.safetensors");
    assert!(
        matches!(open_err(std::slice::from_ref(&missing)), Error::Io { path, .. } if path == missing)
    );
    // No files at all.
    assert!(matches!(open_err(&[]), Error::InvalidInput(_)));
}

/// Two shards and their index, as written by `save_pretrained`.
fn write_sharded(dir: &Path) {
    write_st(
        &dir.join("model-00001-of-00002.safetensors"),
        &[
            arange("backbone.embeddings.weight", &[4, 2], 0.0),
            arange("backbone.layers.0.mixer.D", &[2], 50.0),
        ],
    );
    write_st(
        &dir.join("model-00002-of-00002.safetensors"),
        &[
            arange("backbone.norm_f.weight", &[2], 7.0),
            arange("lm_head.weight", &[4, 2], 20.0),
        ],
    );
    write_index(
        dir,
        "model.safetensors.index.json",
        &[
            (
                "backbone.embeddings.weight",
                "model-00001-of-00002.safetensors",
            ),
            (
                "backbone.layers.0.mixer.D",
                "model-00001-of-00002.safetensors",
            ),
            ("backbone.norm_f.weight", "model-00002-of-00002.safetensors"),
            ("lm_head.weight", "model-00002-of-00002.safetensors"),
        ],
    );
}

fn write_index(dir: &Path, name: &str, map: &[(&str, &str)]) {
    let map: serde_json::Map<String, serde_json::Value> = map
        .iter()
        .map(|(t, f)| (t.to_string(), serde_json::Value::from(*f)))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join(name), index.to_string()).unwrap();
}

#[test]
fn sharded_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    write_sharded(dir.path());
    assert_eq!(
        find_weight_file(dir.path()).unwrap(),
        "model.safetensors.index.json"
    );
    let w = Weights::from_dir(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(w.files().len(), 2);
    assert_eq!(w.names().len(), 4);
    assert_eq!(
        values(
            &w.tensor("backbone.layers.0.mixer.D", &[2], DType::F32)
                .unwrap()
        ),
        [50.0, 51.0]
    );
    assert_eq!(
        values(&w.tensor("lm_head.weight", &[4, 2], DType::F32).unwrap())[0],
        20.0
    );
    // A missing tensor names both shards.
    match w.tensor("backbone.layers.0.mixer.A_log", &[2], DType::F32) {
        Err(Error::MissingTensor { source_desc, .. }) => {
            assert!(
                source_desc.contains("2 shards") && source_desc.contains("00002"),
                "{source_desc}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The same shards opened file by file.
    let files = [
        dir.path().join("model-00001-of-00002.safetensors"),
        dir.path().join("model-00002-of-00002.safetensors"),
    ];
    assert_eq!(
        Weights::from_files(&files, &Device::Cpu)
            .unwrap()
            .names()
            .len(),
        4
    );
}

#[test]
fn shard_index_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_sharded(dir.path());
    let index = dir.path().join("model.safetensors.index.json");

    // Index pointing at a shard that does not exist.
    write_index(
        dir.path(),
        "model.safetensors.index.json",
        &[
            (
                "backbone.embeddings.weight",
                "model-00001-of-00002.safetensors",
            ),
            ("lm_head.weight", "model-00003-of-00003.safetensors"),
        ],
    );
    match Weights::from_dir(dir.path(), &Device::Cpu) {
        Err(Error::WeightFile { path, message }) => {
            assert_eq!(path, dir.path().join("model-00003-of-00003.safetensors"));
            assert!(
                message.contains("lm_head.weight") && message.contains("index.json"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Index that places a tensor in the wrong shard.
    write_index(
        dir.path(),
        "model.safetensors.index.json",
        &[("lm_head.weight", "model-00001-of-00002.safetensors")],
    );
    match Weights::from_dir(dir.path(), &Device::Cpu) {
        Err(Error::WeightFile { path, message }) => {
            assert_eq!(path, dir.path().join("model-00001-of-00002.safetensors"));
            assert!(message.contains("`lm_head.weight`"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Shard names escaping the folder.
    write_index(
        dir.path(),
        "model.safetensors.index.json",
        &[("a", "../model.safetensors")],
    );
    assert!(
        matches!(Weights::from_dir(dir.path(), &Device::Cpu), Err(Error::WeightFile { path, .. }) if path == index)
    );
    write_index(
        dir.path(),
        "model.safetensors.index.json",
        &[("a", "/etc/passwd")],
    );
    assert!(
        matches!(Weights::from_dir(dir.path(), &Device::Cpu), Err(Error::WeightFile { path, .. }) if path == index)
    );
    // Not JSON / no weight_map.
    std::fs::write(&index, "{").unwrap();
    assert!(
        matches!(Weights::from_dir(dir.path(), &Device::Cpu), Err(Error::WeightFile { message, .. }) if message.contains("JSON"))
    );
    std::fs::write(&index, r#"{"metadata": {}}"#).unwrap();
    assert!(
        matches!(Weights::from_dir(dir.path(), &Device::Cpu), Err(Error::WeightFile { message, .. }) if message.contains("weight_map"))
    );
}

#[test]
fn duplicate_tensor_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    write_st(&a, &[arange("x", &[2], 0.0)]);
    write_st(&b, &[arange("x", &[2], 1.0)]);
    match open_err(&[a.clone(), b.clone()]) {
        Error::WeightFile { path, message } => {
            assert_eq!(path, b);
            assert!(
                message.contains("`x`") && message.contains("a.safetensors"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn from_dir_choice_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        matches!(Weights::from_dir(dir.path(), &Device::Cpu), Err(Error::WeightFile { path, .. }) if path == dir.path())
    );
    assert!(matches!(
        Weights::from_dir(&dir.path().join("absent"), &Device::Cpu),
        Err(Error::Io { .. })
    ));
    // safetensors is preferred over pytorch_model.bin (which here is not even valid).
    std::fs::write(dir.path().join("pytorch_model.bin"), b"junk").unwrap();
    assert_eq!(find_weight_file(dir.path()).unwrap(), "pytorch_model.bin");
    write_st(
        &dir.path().join("model.safetensors"),
        &[arange("x", &[1], 0.0)],
    );
    assert_eq!(find_weight_file(dir.path()).unwrap(), "model.safetensors");
    assert!(Weights::from_dir(dir.path(), &Device::Cpu)
        .unwrap()
        .contains("x"));
}

#[test]
fn finite_check_is_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_st(
        &path,
        &[
            f32s("nan", &[3], [1.0, f32::NAN, 2.0]),
            f32s("inf", &[2], [f32::NEG_INFINITY, 0.0]),
            f32s("ok", &[2], [1e30, -1e30]),
        ],
    );
    let w = open(&path);
    assert!(w.tensor("nan", &[3], DType::F32).is_ok());
    let w = w.with_finite_check(true);
    assert!(
        matches!(w.tensor("nan", &[3], DType::F32), Err(Error::NonFinite { name }) if name == "nan")
    );
    assert!(matches!(
        w.tensor("inf", &[2], DType::F32),
        Err(Error::NonFinite { .. })
    ));
    assert!(w.tensor("ok", &[2], DType::F32).is_ok());
}

#[test]
fn weights_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Weights>();
}
