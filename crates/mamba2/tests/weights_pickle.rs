//! Weights from `pytorch_model.bin` through Candle's pickle reader, using the committed
//! `tests/data/tiny_ssm.bin` (written by `tests/data/make_tiny_pth.py` with torch).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mamba2::weights::{WeightFormat, Weights};
use mamba2::Error;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny_ssm.bin")
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

#[test]
fn reads_torch_state_dict() {
    let w = open(&fixture());
    assert_eq!(w.format(), WeightFormat::Pickle);
    assert_eq!(
        w.names(),
        [
            "backbone.embeddings.weight",
            "backbone.layers.0.mixer.A_log",
            "backbone.layers.0.mixer.D",
            "backbone.layers.0.mixer.conv1d.weight",
            "backbone.layers.0.mixer.dt_bias",
            "backbone.layers.0.mixer.in_proj.weight",
            "backbone.norm_f.weight",
            "lm_head.weight",
        ]
    );
    let arange24: Vec<f32> = (0..24).map(|i| i as f32).collect();
    // mamba_ssm's `backbone.embedding.weight` under its canonical name.
    let emb = w
        .tensor("backbone.embeddings.weight", &[6, 4], DType::F32)
        .unwrap();
    assert_eq!(values(&emb), arange24);
    // Tied: the same storage saved under two names.
    assert_eq!(
        values(&w.tensor("lm_head.weight", &[6, 4], DType::BF16).unwrap()),
        arange24
    );
    assert_eq!(
        w.stored_dtype("backbone.layers.0.mixer.D"),
        Some(DType::BF16)
    );
    assert_eq!(
        values(
            &w.tensor("backbone.layers.0.mixer.D", &[2], DType::F32)
                .unwrap()
        ),
        [1.5, -2.0]
    );
    assert_eq!(
        w.stored_dtype("backbone.layers.0.mixer.A_log"),
        Some(DType::F16)
    );
    assert_eq!(
        values(
            &w.tensor("backbone.layers.0.mixer.A_log", &[2], DType::F32)
                .unwrap()
        ),
        [0.25, 0.5]
    );
    // A transposed (column-major) view: element [i][j] = j * 4 + i.
    let t = w
        .tensor(
            "backbone.layers.0.mixer.in_proj.weight",
            &[4, 3],
            DType::F32,
        )
        .unwrap();
    let expect: Vec<f32> = (0..4)
        .flat_map(|i| (0..3).map(move |j| (j * 4 + i) as f32))
        .collect();
    assert_eq!(values(&t), expect);
    // A view starting 3 elements into its storage.
    assert_eq!(
        values(
            &w.tensor("backbone.layers.0.mixer.dt_bias", &[2], DType::F32)
                .unwrap()
        ),
        [3.0, 4.0]
    );
}

#[test]
fn pickle_tensor_errors() {
    let w = open(&fixture());
    match w.tensor("backbone.norm_f.weight", &[4], DType::F32) {
        Err(Error::TensorDtype { name, got, .. }) => {
            assert_eq!(name, "backbone.norm_f.weight");
            assert_eq!(got, "I64");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        w.tensor("backbone.embeddings.weight", &[4, 6], DType::F32),
        Err(Error::TensorShape { name, .. }) if name == "backbone.embedding.weight"
    ));
    assert!(matches!(
        w.tensor("backbone.layers.1.mixer.D", &[2], DType::F32),
        Err(Error::MissingTensor { source_desc, .. }) if source_desc.contains("tiny_ssm.bin")
    ));
    // Neither C- nor Fortran-contiguous: Candle cannot read it; the error names file and tensor.
    match w.tensor(
        "backbone.layers.0.mixer.conv1d.weight",
        &[3, 2, 4],
        DType::F32,
    ) {
        Err(Error::WeightFile { path, message }) => {
            assert_eq!(path, fixture());
            assert!(message.contains("conv1d.weight"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn from_dir_and_bin_index() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(), dir.path().join("pytorch_model.bin")).unwrap();
    let w = Weights::from_dir(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(w.format(), WeightFormat::Pickle);
    assert!(w.contains("lm_head.weight"));

    // A one-shard pytorch_model.bin.index.json.
    let dir = tempfile::tempdir().unwrap();
    let shard = "pytorch_model-00001-of-00001.bin";
    std::fs::copy(fixture(), dir.path().join(shard)).unwrap();
    let index = serde_json::json!({"weight_map": {
        "backbone.embedding.weight": shard, "lm_head.weight": shard}});
    std::fs::write(
        dir.path().join("pytorch_model.bin.index.json"),
        index.to_string(),
    )
    .unwrap();
    let w = Weights::from_dir(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(w.files(), vec![dir.path().join(shard).as_path()]);
    assert_eq!(w.shape("backbone.embeddings.weight"), Some(vec![6, 4]));
    // An index naming a tensor the shard lacks.
    let index = serde_json::json!({"weight_map": {"backbone.layers.9.mixer.D": shard}});
    std::fs::write(
        dir.path().join("pytorch_model.bin.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert!(matches!(
        Weights::from_dir(dir.path(), &Device::Cpu),
        Err(Error::WeightFile { message, .. }) if message.contains("backbone.layers.9.mixer.D")
    ));
}

#[test]
fn corrupt_pickle_files_are_typed_errors() {
    let bytes = std::fs::read(fixture()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pytorch_model.bin");
    let expect_file_error = |content: &[u8]| {
        std::fs::write(&path, content).unwrap();
        match Weights::from_files(std::slice::from_ref(&path), &Device::Cpu) {
            Err(Error::WeightFile { path: p, .. }) => assert_eq!(p, path),
            Ok(w) => {
                // The zip directory survived: every tensor read must then fail cleanly or succeed.
                for name in w.names() {
                    let shape = w.shape(&name).unwrap();
                    if let Err(e) = w.tensor(&name, &shape, DType::F32) {
                        assert!(
                            matches!(e, Error::WeightFile { .. } | Error::TensorDtype { .. }),
                            "{e:?}"
                        );
                    }
                }
            }
            Err(other) => panic!("expected WeightFile, got {other:?}"),
        }
    };
    // Truncated at many points: never a panic.
    for cut in [
        0,
        3,
        4,
        100,
        bytes.len() / 2,
        bytes.len() - 100,
        bytes.len() - 1,
    ] {
        expect_file_error(&bytes[..cut]);
    }
    // Not a zip at all (e.g. the legacy torch.save format).
    std::fs::write(&path, b"\x80\x02legacy pickle").unwrap();
    assert!(matches!(
        Weights::from_files(std::slice::from_ref(&path), &Device::Cpu),
        Err(Error::WeightFile { message, .. }) if message.contains("legacy")
    ));
    // Corrupted bytes in the middle.
    let mut flipped = bytes.clone();
    for b in flipped.iter_mut().skip(200).step_by(7).take(200) {
        *b ^= 0x5a;
    }
    expect_file_error(&flipped);
}
