//! A GGUF file that parses but cannot be the model it claims gets a typed error naming what is
//! wrong: an unknown architecture, a missing or wrongly typed size key, a missing tensor, a
//! tensor of the wrong shape, and a tensor in a block format this engine cannot compute with
//! (IQ2_XS) — that last file still parses, and only the model build fails, naming the tensor.
//!
//! Each case rewrites a llama.cpp-made fixture (tests/fixtures/gguf) with one change.

mod support_gguf;
use candle_core::{DType, Device};
use mamba2::gguf::{GgufError, GgufFile, GgufValue};
use mamba2::{Error, Mamba2Model};
use std::path::Path;
use support_gguf::Writer;

fn fixture(rel: &str) -> GgufFile {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gguf")
        .join(rel);
    GgufFile::open(&p).unwrap()
}

/// The fixture rewritten: `kv` edits metadata (None removes the key), `tensor` edits or drops
/// tensors as `(name, dims, type id, bytes)`.
fn rewrite(
    src: &GgufFile,
    kv: impl Fn(&str, &GgufValue) -> Option<GgufValue>,
    tensor: impl Fn(&str, Vec<u64>, u32, Vec<u8>) -> Option<(Vec<u64>, u32, Vec<u8>)>,
) -> GgufFile {
    let mut w = Writer::new(3);
    for (k, v) in src.metadata() {
        if let Some(v) = kv(k, v) {
            w = w.kv(k, v);
        }
    }
    for t in src.tensors() {
        let dims = t.dims.iter().map(|&d| d as u64).collect();
        let bytes = src.tensor_bytes(t).to_vec();
        if let Some((dims, ty, bytes)) = tensor(&t.name, dims, t.ty.id(), bytes) {
            w = w.tensor(&t.name, &dims, ty, &bytes);
        }
    }
    GgufFile::from_bytes(w.bytes(), "rewritten.gguf").unwrap()
}

fn build(f: &GgufFile) -> mamba2::Result<Mamba2Model> {
    Mamba2Model::from_gguf(f, DType::F32, &Device::Cpu, None)
}

fn same(_: &str, v: &GgufValue) -> Option<GgufValue> {
    Some(v.clone())
}

fn keep(_: &str, d: Vec<u64>, ty: u32, b: Vec<u8>) -> Option<(Vec<u64>, u32, Vec<u8>)> {
    Some((d, ty, b))
}

#[test]
fn the_unchanged_rewrite_builds() {
    let src = fixture("m2_h64_g2_untied_tok300/f32.gguf");
    build(&rewrite(&src, same, keep)).unwrap();
}

#[test]
fn unknown_architecture() {
    let src = fixture("m2_h64_g2_untied_tok300/f32.gguf");
    let f = rewrite(
        &src,
        |k, v| match k {
            "general.architecture" => Some(GgufValue::String("llama".into())),
            _ => Some(v.clone()),
        },
        keep,
    );
    match build(&f) {
        Err(Error::Unsupported(m)) => assert!(m.contains("`llama`"), "{m}"),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn missing_and_mistyped_size_keys() {
    let src = fixture("m2_h64_g2_untied_tok300/f32.gguf");
    let f = rewrite(
        &src,
        |k, v| (k != "mamba2.block_count").then(|| v.clone()),
        keep,
    );
    match build(&f) {
        Err(Error::Gguf(GgufError::MissingKey { key, .. })) => {
            assert_eq!(key, "mamba2.block_count")
        }
        other => panic!("{:?}", other.err()),
    }
    let f = rewrite(
        &src,
        |k, v| match k {
            "mamba2.ssm.state_size" => Some(GgufValue::String("32".into())),
            _ => Some(v.clone()),
        },
        keep,
    );
    assert!(matches!(
        build(&f),
        Err(Error::Gguf(GgufError::MetadataType { .. }))
    ));
}

#[test]
fn missing_or_misshapen_tensor() {
    let src = fixture("m2_h64_g2_untied_tok300/f32.gguf");
    let f = rewrite(&src, same, |n, d, t, b| {
        (n != "blk.1.ssm_out.weight").then_some((d, t, b))
    });
    match build(&f) {
        Err(Error::MissingTensor { name, .. }) => {
            assert_eq!(name, "backbone.layers.1.mixer.out_proj.weight")
        }
        other => panic!("{:?}", other.err()),
    }
    // ssm_d of 3 heads where the config has 4.
    let f = rewrite(&src, same, |n, d, t, b| match n {
        "blk.0.ssm_d" => Some((vec![1, 3], t, b[..12].to_vec())),
        _ => Some((d, t, b)),
    });
    assert!(matches!(build(&f), Err(Error::TensorShape { .. })));
}

#[test]
fn unsupported_block_format_is_named_when_used() {
    // IQ2_XS (type 17): 256 values in 74 bytes; the hidden-256 fixture's ssm_in rows are 256.
    let src = fixture("m2_h256_g2_quant/q8_0.gguf");
    let f = rewrite(&src, same, |n, d, t, b| match n {
        "blk.0.ssm_in.weight" => {
            let blocks = (d[0] * d[1] / 256) as usize;
            Some((d, 17, vec![0u8; blocks * 74]))
        }
        _ => Some((d, t, b)),
    });
    // The file parses and the other tensors are readable.
    let info = f.tensor_info("blk.0.ssm_in.weight").unwrap();
    assert_eq!(info.ty.name(), "IQ2_XS");
    assert!(f
        .check_supported(f.tensor_info("blk.0.ssm_out.weight").unwrap())
        .is_ok());
    match build(&f) {
        Err(Error::Gguf(GgufError::UnsupportedTensorType {
            tensor, ty_name, ..
        })) => {
            assert_eq!(
                (tensor.as_str(), ty_name.as_str()),
                ("blk.0.ssm_in.weight", "IQ2_XS")
            );
        }
        other => panic!("{:?}", other.err()),
    }
}
