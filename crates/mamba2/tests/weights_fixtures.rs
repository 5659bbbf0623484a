//! The committed reference checkpoints (`tests/fixtures/*/{hf,ssm}`, written by HF transformers
//! and converted to the mamba_ssm layout by `scripts/make_fixtures.py`): both configs parse to
//! the same model, every tensor the config implies is in both layouts with exactly the shape HF
//! gave it, nothing else is, and the two layouts hold identical values.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use mamba2::config::{read_generation_eos, ConfigFlavor, Mamba2Config};
use mamba2::hub::{resolve_model, HubOptions};
use mamba2::weights::{WeightFormat, Weights};

fn fixture_cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("hf").is_dir() && p.join("ssm").is_dir())
        .collect();
    cases.sort();
    assert!(
        !cases.is_empty(),
        "no fixture cases under {}",
        root.display()
    );
    cases
}

/// The config fields that define the computation (everything but flavor and vocab bookkeeping).
fn model_shape(c: &Mamba2Config) -> impl PartialEq + std::fmt::Debug {
    (
        (
            c.d_model, c.n_layer, c.d_state, c.d_conv, c.expand, c.headdim, c.nheads, c.ngroups,
            c.d_inner,
        ),
        (
            c.chunk_size,
            c.dt_limit,
            c.bias,
            c.conv_bias,
            c.norm_eps,
            c.residual_in_fp32,
        ),
        (c.tie_embeddings, c.norm_before_gate, c.padded_vocab_size()),
    )
}

#[test]
fn both_layouts_agree_with_their_configs_and_each_other() {
    let opts = HubOptions {
        offline: Some(true),
        progress: false,
        ..Default::default()
    };
    for case in fixture_cases() {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let hf_files = resolve_model(case.join("hf").to_str().unwrap(), &opts).unwrap();
        let ssm_files = resolve_model(case.join("ssm").to_str().unwrap(), &opts).unwrap();
        let hf_cfg = Mamba2Config::from_file(&hf_files.config).unwrap();
        let ssm_cfg = Mamba2Config::from_file(&ssm_files.config).unwrap();
        assert_eq!(hf_cfg.flavor, ConfigFlavor::HfTransformers);
        assert_eq!(ssm_cfg.flavor, ConfigFlavor::MambaSsm);
        assert_eq!(model_shape(&hf_cfg), model_shape(&ssm_cfg), "{name}");
        if let Some(g) = &hf_files.generation_config {
            assert_eq!(
                read_generation_eos(g).unwrap(),
                hf_cfg.eos_token_ids,
                "{name}"
            );
        }

        let hf = Weights::from_files(&hf_files.weights, &Device::Cpu).unwrap();
        let ssm = Weights::from_files(&ssm_files.weights, &Device::Cpu).unwrap();
        assert_eq!(hf.format(), WeightFormat::Safetensors);
        assert_eq!(ssm.format(), WeightFormat::Pickle);
        let rows = hf.shape("backbone.embeddings.weight").unwrap()[0];
        assert_eq!(rows, hf_cfg.padded_vocab_size(), "{name}");
        assert_eq!(
            ssm.shape("backbone.embeddings.weight").unwrap()[0],
            rows,
            "{name}"
        );

        let expected = hf_cfg.tensor_shapes(rows);
        let mut expected_names: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
        for (tensor, shape) in &expected {
            let a = hf
                .tensor(tensor, shape, DType::F32)
                .unwrap_or_else(|e| panic!("{name} hf: {e}"));
            let b = ssm
                .tensor(tensor, shape, DType::F32)
                .unwrap_or_else(|e| panic!("{name} ssm: {e}"));
            let diff: f32 = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(diff, 0.0, "{name}: {tensor} differs between layouts");
        }
        // A tied checkpoint may still store lm_head.weight (as the embedding); nothing else extra.
        if hf_cfg.tie_embeddings {
            expected_names.push("lm_head.weight".into());
            for w in [&hf, &ssm] {
                if w.contains("lm_head.weight") {
                    let shape = w.shape("lm_head.weight").unwrap();
                    let lm = w.tensor("lm_head.weight", &shape, DType::F32).unwrap();
                    let emb = w
                        .tensor("backbone.embeddings.weight", &shape, DType::F32)
                        .unwrap();
                    let diff: f32 = (lm - emb)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar()
                        .unwrap();
                    assert_eq!(
                        diff, 0.0,
                        "{name}: stored lm_head of a tied model is not the embedding"
                    );
                }
            }
        }
        for w in [&hf, &ssm] {
            for stored in w.names() {
                assert!(
                    expected_names.contains(&stored),
                    "{name}: unexpected tensor {stored}"
                );
            }
        }
        // Weight dtype chosen at load.
        let (t, s) = &expected[1];
        assert_eq!(ssm.tensor(t, s, DType::BF16).unwrap().dtype(), DType::BF16);
        assert_eq!(hf.tensor(t, s, DType::F16).unwrap().dtype(), DType::F16);
        // A wrong shape names the tensor.
        let mut wrong = s.clone();
        wrong[0] += 1;
        assert!(
            matches!(hf.tensor(t, &wrong, DType::F32), Err(mamba2::Error::TensorShape { name, .. }) if name == *t)
        );
    }
}
