//! Bad inputs to the model give typed errors, never panics.

use candle_core::{DType, Device, Tensor};
use mamba2::{Error, Mamba2Config, Mamba2Model};

fn model() -> Mamba2Model {
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
    ) = (32, 1, 16, 4, 64, 16, 50, 1);
    Mamba2Model::random(&c, DType::F32, &Device::Cpu, 0).unwrap()
}

#[test]
fn token_id_out_of_range_is_a_typed_error() {
    let m = model();
    let ids = Tensor::new(&[[1u32, 2, 50]], &Device::Cpu).unwrap();
    match m.forward(&ids, None) {
        Err(Error::TokenOutOfRange {
            id: 50,
            position: 2,
            vocab: 50,
        }) => {}
        other => panic!("expected TokenOutOfRange, got {other:?}"),
    }
    let neg = Tensor::new(&[[1i64, -3]], &Device::Cpu).unwrap();
    assert!(matches!(
        m.forward(&neg, None),
        Err(Error::TokenOutOfRange { id: -3, .. })
    ));
    let mut cache = m.new_cache(1).unwrap();
    assert!(matches!(
        m.step(&Tensor::new(&[99u32], &Device::Cpu).unwrap(), &mut cache),
        Err(Error::TokenOutOfRange { .. })
    ));
}

#[test]
fn empty_and_misshaped_inputs_are_typed_errors() {
    let m = model();
    let empty = Tensor::zeros((1, 0), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(m.forward(&empty, None), Err(Error::EmptyPrompt)));
    let mut cache = m.new_cache(1).unwrap();
    assert!(matches!(
        m.prefill(&empty, &mut cache),
        Err(Error::EmptyPrompt)
    ));
    let flat = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    assert!(matches!(
        m.forward(&flat, None),
        Err(Error::InvalidInput(_))
    ));
    let floats = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
    assert!(matches!(
        m.forward(&floats, None),
        Err(Error::InvalidInput(_))
    ));
    // a cache for 2 sequences with a batch of 1
    let mut wrong = m.new_cache(2).unwrap();
    let ids = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    assert!(matches!(
        m.forward(&ids, Some(&mut wrong)),
        Err(Error::InvalidInput(_))
    ));
    let mut session = mamba2::session::Session::new(std::sync::Arc::new(m)).unwrap();
    let r = session.generate(&Default::default(), &Default::default(), |_| {
        std::ops::ControlFlow::Continue(())
    });
    assert!(matches!(r, Err(Error::EmptyPrompt)));
}

#[test]
fn unknown_device_and_dtype_are_typed_errors() {
    assert!(matches!(
        "tpu".parse::<mamba2::device::DeviceChoice>(),
        Err(Error::Device(_))
    ));
    assert!(matches!(
        mamba2::device::parse_dtype("f8"),
        Err(Error::Device(_)) | Err(Error::Dtype(_))
    ));
    #[cfg(not(feature = "cuda"))]
    assert!(matches!(
        mamba2::device::DeviceChoice::Cuda(0).open(),
        Err(Error::Device(_))
    ));
    #[cfg(not(feature = "metal"))]
    assert!(matches!(
        mamba2::device::DeviceChoice::Metal(0).open(),
        Err(Error::Device(_))
    ));
}

/// Copies a fixture's HF checkpoint, lets `edit` change its tensors or config, and loads it.
fn load_edited(
    edit_tensors: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
    edit_config: impl FnOnce(&mut serde_json::Value),
) -> Result<Mamba2Model, Error> {
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/g2_ds16_seq3_b2/hf");
    let dir = tempfile::tempdir().unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit_tensors(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit_config(&mut cfg);
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let files = mamba2::hub::resolve_model(dir.path().to_str().unwrap(), &Default::default())?;
    mamba2::pipeline::load_model(&files, DType::F32, &Device::Cpu)
}

#[test]
fn checkpoint_problems_name_the_tensor_or_field() {
    assert!(load_edited(|_| {}, |_| {}).is_ok());
    let name = "backbone.layers.1.mixer.dt_bias";
    match load_edited(|t| drop(t.remove(name)), |_| {}) {
        Err(e @ Error::MissingTensor { .. }) => assert!(e.to_string().contains(name), "{e}"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    let name = "backbone.layers.0.mixer.out_proj.weight";
    match load_edited(
        |t| {
            let w = t[name].narrow(1, 0, 8).unwrap();
            t.insert(name.into(), w);
        },
        |_| {},
    ) {
        Err(e @ Error::TensorShape { .. }) => assert!(e.to_string().contains(name), "{e}"),
        other => panic!("expected TensorShape, got {other:?}"),
    }
    let name = "backbone.layers.0.mixer.A_log";
    match load_edited(
        |t| {
            let w = t[name].to_dtype(DType::I64).unwrap();
            t.insert(name.into(), w);
        },
        |_| {},
    ) {
        Err(e @ Error::TensorDtype { .. }) => assert!(e.to_string().contains(name), "{e}"),
        other => panic!("expected TensorDtype, got {other:?}"),
    }
    // the config says 8 groups, but 4 heads cannot be split into 8 groups
    match load_edited(|_| {}, |c| c["n_groups"] = 8.into()) {
        Err(e @ Error::ConfigField { .. }) => assert!(e.to_string().contains("n_groups"), "{e}"),
        other => panic!("expected ConfigField, got {other:?}"),
    }
    match load_edited(|_| {}, |c| c["hidden_size"] = "wide".into()) {
        Err(e @ Error::ConfigParse { .. }) => assert!(e.to_string().contains("hidden_size"), "{e}"),
        other => panic!("expected ConfigParse, got {other:?}"),
    }
}
