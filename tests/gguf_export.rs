//! GGUF export (`mamba2::gguf_export`, the `quantize` command): files written from the HF
//! fixtures and the bundled model are read back with this engine's GGUF reader and compared
//! with the checkpoint they came from: logits (f32 export = the safetensors model; block
//! formats = the same blocks as load-time quantization), every tensor's name / shape / type /
//! values, the metadata against the key listing of llama.cpp's converter for the bundled model
//! (tests/fixtures/gguf/manifest.json) and the vocabulary against the converter's own file
//! (mamba2_tiny_vocab.gguf), the tokenizer read back, padding rows, fallbacks and errors.
//! llama.cpp itself reading these files is scripts/gguf_roundtrip_llama.sh (not CI).

mod common;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use mamba2::config::Mamba2Config;
use mamba2::gguf::{tokenizer_from_gguf, GgufFile, GgufValue, Tokenizer};
use mamba2::gguf_export::{
    ggml_type_name, matrix_type, parse_export_type, requantize_gguf, write_gguf, GgufExportOptions,
    GgufExportSummary, GGUF_ALIGNMENT,
};
use mamba2::hub::load_tokenizer;
use mamba2::weights::Weights;
use mamba2::{Error, Mamba2Model};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bundled() -> PathBuf {
    root().join("models/mamba2-tiny")
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name).join("hf")
}

fn open(dir: &Path) -> (Mamba2Config, Weights) {
    let config = Mamba2Config::from_file(&dir.join("config.json")).unwrap();
    let weights = match dir.join("model.safetensors.index.json") {
        p if p.is_file() => Weights::from_files(&[p], &Device::Cpu).unwrap(),
        _ => Weights::from_dir(dir, &Device::Cpu).unwrap(),
    };
    (config, weights)
}

fn tokenizer_of(dir: &Path) -> Option<Tokenizer> {
    let p = dir.join("tokenizer.json");
    p.is_file().then(|| load_tokenizer(&p).unwrap())
}

/// Exports `dir` (with its own tokenizer, if any) to a temporary file.
fn export(dir: &Path, ty: &str, tmp: &tempfile::TempDir) -> (PathBuf, GgufExportSummary, GgufFile) {
    export_with(dir, ty, tokenizer_of(dir).as_ref(), tmp)
}

fn export_with(
    dir: &Path,
    ty: &str,
    tokenizer: Option<&Tokenizer>,
    tmp: &tempfile::TempDir,
) -> (PathBuf, GgufExportSummary, GgufFile) {
    let (config, weights) = open(dir);
    let out = tmp.path().join(format!("{ty}.gguf"));
    let opts = GgufExportOptions::new(parse_export_type(ty).unwrap(), "test-model");
    let summary = write_gguf(&config, &weights, tokenizer, &out, &opts).unwrap();
    let file = GgufFile::open(&out).unwrap();
    (out, summary, file)
}

/// Some ids below `vocab`.
fn ids(vocab: u32) -> Tensor {
    let v: Vec<u32> = [1u32, 5, 17, 42, 3, 88, 60, 2, 9, 33, 71, 4, 250, 999, 3000]
        .iter()
        .map(|&i| i % vocab)
        .collect();
    Tensor::new(v.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn logits(model: &Mamba2Model) -> Tensor {
    let ids = ids(model.config().vocab_size as u32);
    model.forward(&ids, None).unwrap()
}

/// The file's f32 values of a tensor (dequantized), in its shape.
fn values(file: &GgufFile, name: &str) -> Tensor {
    let info = file.tensor_info(name).unwrap_or_else(|| panic!("{name}"));
    let ty = file.check_supported(info).unwrap();
    let mut words = vec![0u64; file.tensor_bytes(info).len().div_ceil(8)];
    let bytes: &mut [u8] = bytemuck_bytes(&mut words, file.tensor_bytes(info).len());
    bytes.copy_from_slice(file.tensor_bytes(info));
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Borrowed(bytes),
        &Device::Cpu,
        ty,
    )
    .unwrap();
    QTensor::new(storage, info.shape())
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
}

fn bytemuck_bytes(words: &mut [u64], len: usize) -> &mut [u8] {
    // SAFETY: `words` holds at least `len` bytes; u8 has no alignment or validity requirement.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, len) }
}

#[test]
fn f32_export_gives_the_safetensors_logits() {
    for dir in [
        bundled(),
        fixture("g2_ds16_seq3_b2"),
        fixture("g1_ds32_hd32_short_b3"),  // untied
        fixture("g8_ds16_hd16_b3_untied"), // sharded, 8 groups
        fixture("g1_ds128_hd64_padvocab"), // d_state 128, expand 4
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (_, _, file) = export(&dir, "f32", &tmp);
        let (config, weights) = open(&dir);
        let reference = Mamba2Model::from_weights(&config, &weights, DType::F32).unwrap();
        let model = Mamba2Model::from_gguf(&file, DType::F32, &Device::Cpu, None).unwrap();
        assert_eq!(model.config().tie_embeddings, config.tie_embeddings);
        let d = max_abs_diff(&logits(&model), &logits(&reference));
        assert!(d <= 1e-5, "{}: {d}", dir.display());
    }
}

#[test]
fn quantized_export_gives_the_load_time_quantized_logits() {
    // (folder, --type, the block format every matrix gets: the fixture's rows of 32 and 64
    // values are not whole Q6_K blocks and fall back to Q8_0, as llama-quantize does). Not
    // here: Q4_1 / Q5_0 / Q5_1 with rows of an odd number of blocks (32, 96 values), which
    // Candle's CPU dot products refuse (they assert an even block count).
    for (dir, ty, blocks) in [
        (bundled(), "q8_0", GgmlDType::Q8_0),
        (bundled(), "q4_k", GgmlDType::Q4K),
        (bundled(), "q6_k", GgmlDType::Q6K),
        (bundled(), "q4_1", GgmlDType::Q4_1),
        (bundled(), "q5_0", GgmlDType::Q5_0),
        (fixture("g2_ds16_seq3_b2"), "q8_0", GgmlDType::Q8_0),
        (fixture("g2_ds16_seq3_b2"), "q6_k", GgmlDType::Q8_0),
        (fixture("g8_ds16_hd16_b3_untied"), "q4_0", GgmlDType::Q4_0),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (_, summary, file) = export(&dir, ty, &tmp);
        for t in summary.tensors.iter().filter(|t| t.ty != GgmlDType::F32) {
            assert_eq!(t.ty, blocks, "{}", t.name);
        }
        let (config, weights) = open(&dir);
        let reference =
            Mamba2Model::from_weights_quantized(&config, &weights, DType::F32, Some(blocks))
                .unwrap();
        let model = Mamba2Model::from_gguf(&file, DType::F32, &Device::Cpu, None).unwrap();
        assert_eq!(model.quantization(), Some(blocks));
        assert_eq!(
            model.weight_bytes_per_token(),
            reference.weight_bytes_per_token()
        );
        let d = max_abs_diff(&logits(&model), &logits(&reference));
        assert!(d <= 1e-5, "{} {ty}: {d}", dir.display());
    }
}

/// `(name, GGML ne, type)` of every tensor a Mamba-2 GGUF holds, from the config alone.
fn expected_tensors(
    c: &Mamba2Config,
    rows: usize,
    ty: GgmlDType,
) -> Vec<(String, Vec<usize>, String)> {
    let m = |row: usize| ggml_type_name(matrix_type(ty, row));
    let f = || "F32".to_string();
    let mut v = vec![(
        "token_embd.weight".to_string(),
        vec![c.d_model, rows],
        m(c.d_model),
    )];
    for i in 0..c.n_layer {
        let b = |s: &str| format!("blk.{i}.{s}");
        v.push((b("ssm_a"), vec![1, c.nheads], f()));
        v.push((b("ssm_d"), vec![1, c.nheads], f()));
        v.push((b("ssm_conv1d.bias"), vec![c.conv_dim()], f()));
        v.push((b("ssm_conv1d.weight"), vec![c.d_conv, c.conv_dim()], f()));
        v.push((b("ssm_dt.bias"), vec![c.nheads], f()));
        v.push((
            b("ssm_in.weight"),
            vec![c.d_model, c.d_in_proj()],
            m(c.d_model),
        ));
        v.push((
            b("ssm_norm.weight"),
            vec![c.d_inner / c.ngroups, c.ngroups],
            f(),
        ));
        v.push((
            b("ssm_out.weight"),
            vec![c.d_inner, c.d_model],
            m(c.d_inner),
        ));
        v.push((b("attn_norm.weight"), vec![c.d_model], f()));
    }
    v.push(("output_norm.weight".into(), vec![c.d_model], f()));
    if !c.tie_embeddings {
        v.push(("output.weight".into(), vec![c.d_model, rows], m(c.d_model)));
    }
    v
}

#[test]
fn tensors_have_llama_cpp_names_layouts_types_and_blocks() {
    for (dir, ty) in [
        (bundled(), "q4_k"),
        (bundled(), "f16"),
        (fixture("g1_ds32_hd32_short_b3"), "q8_0"),
        (fixture("g2_ds16_seq3_b2"), "q2_k"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (_, summary, file) = export(&dir, ty, &tmp);
        let (c, weights) = open(&dir);
        let rows = weights.shape("backbone.embeddings.weight").unwrap()[0];
        let qty = parse_export_type(ty).unwrap();
        let got: Vec<(String, Vec<usize>, String)> = file
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone(), t.ty.name()))
            .collect();
        assert_eq!(
            got,
            expected_tensors(&c, rows, qty),
            "{} {ty}",
            dir.display()
        );
        assert_eq!(summary.tensors.len(), got.len());
        // GGUF v3, 32-byte aligned data.
        assert_eq!(file.version(), 3);
        assert_eq!(file.alignment(), GGUF_ALIGNMENT);
        assert!(file.data_offset().is_multiple_of(GGUF_ALIGNMENT));
        assert!(file
            .tensors()
            .iter()
            .all(|t| t.offset.is_multiple_of(GGUF_ALIGNMENT)));
        assert_eq!(
            std::fs::metadata(file.path()).unwrap().len(),
            summary.file_bytes
        );
        // Values: the matrices are the blocks (or floats) of the checkpoint's tensors, the rest
        // llama.cpp's layouts of them.
        let w = |name: &str| {
            let s = weights.shape(name).unwrap();
            weights.tensor(name, &s, DType::F32).unwrap()
        };
        let mut matrices = vec![(
            "token_embd.weight",
            "backbone.embeddings.weight".to_string(),
        )];
        if !c.tie_embeddings {
            matrices.push(("output.weight", "lm_head.weight".to_string()));
        }
        let layer_matrices: Vec<(String, String)> = (0..c.n_layer)
            .flat_map(|i| {
                [
                    (
                        format!("blk.{i}.ssm_in.weight"),
                        format!("backbone.layers.{i}.mixer.in_proj.weight"),
                    ),
                    (
                        format!("blk.{i}.ssm_out.weight"),
                        format!("backbone.layers.{i}.mixer.out_proj.weight"),
                    ),
                ]
            })
            .collect();
        for (gguf, hf) in matrices
            .iter()
            .map(|(g, h)| (g.to_string(), h.clone()))
            .chain(layer_matrices)
        {
            let info = file.tensor_info(&gguf).unwrap();
            let t = file.check_supported(info).unwrap();
            if t == GgmlDType::F16 {
                let rounded = w(&hf).to_dtype(DType::F16).unwrap();
                assert_eq!(max_abs_diff(&values(&file, &gguf), &rounded), 0.0, "{gguf}");
            } else {
                let want = QTensor::quantize(&w(&hf), t)
                    .unwrap()
                    .data()
                    .unwrap()
                    .into_owned();
                assert!(file.tensor_bytes(info) == want.as_slice(), "{gguf}");
            }
        }
        for i in 0..c.n_layer {
            let hf = |s: &str| w(&format!("backbone.layers.{i}.{s}"));
            let gg = |s: &str| values(&file, &format!("blk.{i}.{s}"));
            let a = hf("mixer.A_log").exp().unwrap().neg().unwrap();
            assert_eq!(max_abs_diff(&gg("ssm_a"), &a.unsqueeze(1).unwrap()), 0.0);
            assert_eq!(
                max_abs_diff(&gg("ssm_d"), &hf("mixer.D").unsqueeze(1).unwrap()),
                0.0
            );
            assert_eq!(max_abs_diff(&gg("ssm_dt.bias"), &hf("mixer.dt_bias")), 0.0);
            assert_eq!(
                max_abs_diff(
                    &gg("ssm_conv1d.weight"),
                    &hf("mixer.conv1d.weight").squeeze(1).unwrap()
                ),
                0.0
            );
            assert_eq!(
                max_abs_diff(&gg("ssm_conv1d.bias"), &hf("mixer.conv1d.bias")),
                0.0
            );
            let norm = hf("mixer.norm.weight")
                .reshape((c.ngroups, c.d_inner / c.ngroups))
                .unwrap();
            assert_eq!(max_abs_diff(&gg("ssm_norm.weight"), &norm), 0.0);
            assert_eq!(
                max_abs_diff(&gg("attn_norm.weight"), &hf("norm.weight")),
                0.0
            );
        }
        assert_eq!(
            max_abs_diff(
                &values(&file, "output_norm.weight"),
                &w("backbone.norm_f.weight")
            ),
            0.0
        );
    }
}

/// A metadata value as the manifest spells it: `(type, value or array length)`.
fn describe(v: &GgufValue) -> (String, serde_json::Value) {
    let t = |v: &GgufValue| match v {
        GgufValue::U32(_) => "UINT32",
        GgufValue::I32(_) => "INT32",
        GgufValue::F32(_) => "FLOAT32",
        GgufValue::String(_) => "STRING",
        GgufValue::Bool(_) => "BOOL",
        other => panic!("unexpected value {other:?}"),
    };
    match v {
        GgufValue::Array(a) => (format!("ARRAY[{}]", t(&a[0])), serde_json::json!(a.len())),
        GgufValue::U32(x) => (t(v).into(), serde_json::json!(x)),
        GgufValue::F32(x) => (t(v).into(), serde_json::json!(*x as f64)),
        GgufValue::String(x) => (t(v).into(), serde_json::json!(x)),
        GgufValue::Bool(x) => (t(v).into(), serde_json::json!(x)),
        other => (t(other).into(), serde_json::Value::Null),
    }
}

#[test]
fn metadata_and_vocabulary_are_the_converters() {
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/gguf/manifest.json")).unwrap(),
    )
    .unwrap();
    // llama.cpp's converter on the bundled model (vocab-only, hence general.file_type 1 and no
    // size label): every key, its type and value.
    let listing = manifest["tokenizer"]["metadata"].as_object().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (config, weights) = open(&bundled());
    let out = tmp.path().join("q8_0.gguf");
    let opts = GgufExportOptions::new(GgmlDType::Q8_0, "mamba2-tiny");
    let tokenizer = tokenizer_of(&bundled()).unwrap();
    let summary = write_gguf(&config, &weights, Some(&tokenizer), &out, &opts).unwrap();
    assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
    let file = GgufFile::open(&out).unwrap();
    let keys: Vec<&String> = file.metadata().keys().collect();
    let mut want: Vec<&String> = listing.keys().collect();
    let size_label = "general.size_label".to_string();
    want.push(&size_label);
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(summary.metadata_keys, want.len());
    for (key, spec) in listing {
        let (ty, value) = describe(file.get(key).unwrap());
        assert_eq!(ty, spec["type"].as_str().unwrap(), "{key}");
        match key.as_str() {
            "general.file_type" => assert_eq!(value, 7),
            _ if ty.starts_with("ARRAY") => assert_eq!(value, spec["len"], "{key}"),
            _ => assert_eq!(value, spec["value"], "{key}"),
        }
    }
    assert_eq!(file.get_str("general.size_label").unwrap(), Some("3.8M"));
    // The vocabulary arrays equal the converter's file value for value.
    let theirs =
        GgufFile::open(&root().join("tests/fixtures/gguf/mamba2_tiny_vocab.gguf")).unwrap();
    for key in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
    ] {
        assert!(file.get(key) == theirs.get(key), "{key}");
    }
    let v = summary.vocab.unwrap();
    assert_eq!((v.tokens, v.padding, v.merges), (4096, 0, 3839));
    assert_eq!((v.model.as_str(), v.pre.as_str()), ("gpt2", "gpt-2"));
    // A file type per export type (llama.cpp's LLAMA_FTYPE).
    for (ty, ftype) in [
        ("f32", 0),
        ("f16", 1),
        ("bf16", 32),
        ("q4_0", 2),
        ("q4_1", 3),
        ("q5_0", 8),
        ("q5_1", 9),
        ("q2_k", 10),
        ("q3_k", 11),
        ("q4_k", 14),
        ("q5_k", 16),
        ("q6_k", 18),
    ] {
        let out = tmp.path().join(format!("{ty}.gguf"));
        let opts = GgufExportOptions::new(parse_export_type(ty).unwrap(), "mamba2-tiny");
        let s = write_gguf(&config, &weights, None, &out, &opts).unwrap();
        assert_eq!(s.file_type, ftype, "{ty}");
        assert_eq!(
            GgufFile::open(&out)
                .unwrap()
                .get_u64("general.file_type")
                .unwrap(),
            Some(ftype as u64)
        );
    }
}

#[test]
fn the_embedded_tokenizer_gives_the_tokenizer_json_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, _, file) = export(&bundled(), "q4_0", &tmp);
    let from_gguf = tokenizer_from_gguf(&file).unwrap();
    let original = tokenizer_of(&bundled()).unwrap();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/gguf/tokenizer_ids.json")).unwrap(),
    )
    .unwrap();
    let mut texts: Vec<String> = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    texts.push("<|endoftext|>Mr. Darcy<|endoftext|> 1234\n\n  x".into());
    assert!(texts.len() > 10);
    for text in &texts {
        let a = from_gguf.encode(text.as_str(), false).unwrap();
        let b = original.encode(text.as_str(), false).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
    }
    let special = mamba2::gguf::special_tokens(&file).unwrap();
    assert_eq!(
        (special.bos, special.eos, special.padding),
        (Some(0), Some(0), Some(0))
    );
    assert!(!special.add_bos && !special.add_eos);
}

/// The bundled tokenizer cut to its first `n` ids (special token and byte alphabet), no merges.
fn truncated_tokenizer(n: u64) -> Tokenizer {
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundled().join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = t["model"]["vocab"].as_object().unwrap().clone();
    t["model"]["vocab"] = vocab
        .into_iter()
        .filter(|(_, id)| id.as_u64().unwrap() < n)
        .collect::<serde_json::Map<_, _>>()
        .into();
    t["model"]["merges"] = serde_json::json!([]);
    t.to_string().parse().unwrap()
}

#[test]
fn short_tokenizers_are_padded_to_the_embedding_rows() {
    // 96 embedding rows, 80 tokens: ids 80..95 become [PAD80].. of type UNUSED (5).
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = truncated_tokenizer(80);
    let (_, summary, file) =
        export_with(&fixture("g2_ds16_seq3_b2"), "f32", Some(&tokenizer), &tmp);
    let v = summary.vocab.unwrap();
    assert_eq!((v.tokens, v.padding, v.merges), (96, 16, 0));
    let tokens = file.get_array("tokenizer.ggml.tokens").unwrap().unwrap();
    let types = file
        .get_array("tokenizer.ggml.token_type")
        .unwrap()
        .unwrap();
    assert_eq!(tokens.len(), 96);
    assert_eq!(tokens[0].as_str(), Some("<|endoftext|>"));
    assert_eq!(types[0].as_i64(), Some(3));
    assert_eq!(tokens[79].as_str(), Some("o"));
    assert_eq!(types[79].as_i64(), Some(1));
    for i in 80..96 {
        assert_eq!(tokens[i].as_str(), Some(format!("[PAD{i}]").as_str()));
        assert_eq!(types[i].as_i64(), Some(5));
    }
    // The fixture's config: bos 0, generation config's eos 2, pad 1.
    let special = mamba2::gguf::special_tokens(&file).unwrap();
    assert_eq!(
        (special.bos, special.eos, special.padding),
        (Some(0), Some(2), Some(1))
    );
    let from_gguf = tokenizer_from_gguf(&file).unwrap();
    for text in ["Hello!", "ABC<|endoftext|>def", "(1+2)*3=9"] {
        let a = from_gguf.encode(text, false).unwrap();
        let b = tokenizer.encode(text, false).unwrap();
        assert!(!a.get_ids().is_empty());
        assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
    }
    // The padded file still runs.
    let model = Mamba2Model::from_gguf(&file, DType::F32, &Device::Cpu, None).unwrap();
    assert_eq!(model.vocab_rows(), 96);
}

#[test]
fn rows_that_are_not_whole_blocks_fall_back_like_llama_quantize() {
    // hidden 48: the embedding and in_proj rows are 48 values (not whole 32-blocks) -> F16;
    // out_proj rows are d_inner 96 = 3 x 32 -> Q8_0. This fixture also has in/out biases and a
    // time_step_limit, which llama.cpp's graph lacks: the summary says so.
    let tmp = tempfile::tempdir().unwrap();
    let (_, summary, file) = export(&fixture("g2_nh6_ds64_limit_bias"), "q8_0", &tmp);
    let ty = |n: &str| file.tensor_info(n).unwrap().ty.name();
    assert_eq!(ty("token_embd.weight"), "F16");
    assert_eq!(ty("blk.0.ssm_in.weight"), "F16");
    assert_eq!(ty("blk.0.ssm_out.weight"), "Q8_0");
    assert_eq!(ty("blk.0.ssm_in.bias"), "F32");
    assert_eq!(ty("blk.0.ssm_out.bias"), "F32");
    let fell_back: Vec<(&str, GgmlDType)> = summary
        .tensors
        .iter()
        .filter_map(|t| t.fallback_from.map(|f| (t.name.as_str(), f)))
        .collect();
    assert!(fell_back.contains(&("blk.1.ssm_in.weight", GgmlDType::Q8_0)));
    assert!(!fell_back.iter().any(|(n, _)| n.contains("ssm_out")));
    assert!(summary.warnings.iter().any(|w| w.contains("biases")));
    assert!(summary
        .warnings
        .iter()
        .any(|w| w.contains("time_step_limit")));
    let model = Mamba2Model::from_gguf(&file, DType::F32, &Device::Cpu, None).unwrap();
    assert!(model.config().bias);
    // Q4_K on the bundled model's 256 / 512 rows needs no fallback.
    let (_, summary, _) = export(&bundled(), "q4_k", &tmp);
    assert!(summary.tensors.iter().all(|t| t.fallback_from.is_none()));
}

#[test]
fn a_gguf_requantizes_to_the_direct_export() {
    let tmp = tempfile::tempdir().unwrap();
    let (f32_path, _, _) = export(&bundled(), "f32", &tmp);
    let source = GgufFile::open(&f32_path).unwrap();
    let again = tmp.path().join("again-q8_0.gguf");
    let opts = GgufExportOptions::new(GgmlDType::Q8_0, "test-model");
    let summary = requantize_gguf(&source, &again, &opts).unwrap();
    assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
    let again = GgufFile::open(&again).unwrap();
    let (_, _, direct) = export(&bundled(), "q8_0", &tmp);
    let meta = |f: &GgufFile| f.metadata().clone().into_iter().collect::<BTreeMap<_, _>>();
    assert!(meta(&again) == meta(&direct));
    assert_eq!(again.tensors().len(), direct.tensors().len());
    for t in direct.tensors() {
        let u = again.tensor_info(&t.name).unwrap();
        assert_eq!((&u.dims, u.ty), (&t.dims, t.ty), "{}", t.name);
        assert!(
            again.tensor_bytes(u) == direct.tensor_bytes(t),
            "{}",
            t.name
        );
    }
}

#[test]
fn exports_are_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _, _) = export(&bundled(), "q4_k", &tmp);
    let first = std::fs::read(&a).unwrap();
    let (b, _, _) = export(&bundled(), "q4_k", &tmp);
    assert!(first == std::fs::read(&b).unwrap());
}

#[test]
fn errors_name_the_problem_and_leave_no_file() {
    // Unknown --type.
    for bad in ["q7_0", "q4_k_m", "iq2_xs", "q8_1", "int8", ""] {
        match parse_export_type(bad) {
            Err(Error::Dtype(m)) => assert!(m.contains("q8_0") && m.contains("bf16"), "{m}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.gguf");
    let opts = GgufExportOptions::new(GgmlDType::Q8_0, "x");
    // A hybrid model.
    let hybrid = root().join("tests/fixtures/hybrid/granite_nope_tied_b2/hf");
    let (config, weights) = open(&hybrid);
    match write_gguf(&config, &weights, None, &out, &opts) {
        Err(Error::Unsupported(m)) => {
            assert!(m.contains("granite") && m.contains("Mamba-2"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // Q8_K is a block format but not an export type.
    let (config, weights) = open(&fixture("g2_ds16_seq3_b2"));
    let q8k = GgufExportOptions::new(GgmlDType::Q8K, "x");
    assert!(matches!(
        write_gguf(&config, &weights, None, &out, &q8k),
        Err(Error::Dtype(_))
    ));
    // A tokenizer with more ids than the embedding has rows (4096 > 96): refused while writing.
    let big = tokenizer_of(&bundled()).unwrap();
    match write_gguf(&config, &weights, Some(&big), &out, &opts) {
        Err(Error::InvalidInput(m)) => assert!(m.contains("96 embedding rows"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A tokenizer this writer cannot describe to llama.cpp (a prefix space).
    let mut json: serde_json::Value =
        serde_json::from_str(&truncated_tokenizer(80).to_string(false).unwrap()).unwrap();
    json["pre_tokenizer"]["add_prefix_space"] = true.into();
    let prefixed: Tokenizer = json.to_string().parse().unwrap();
    match write_gguf(&config, &weights, Some(&prefixed), &out, &opts) {
        Err(Error::Unsupported(m)) => assert!(m.contains("pre-tokenizer"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A missing tensor: refused before anything is written.
    let mut config_more = config.clone();
    config_more.n_layer += 1;
    assert!(matches!(
        write_gguf(&config_more, &weights, None, &out, &opts),
        Err(Error::MissingTensor { .. })
    ));
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A random pure Mamba-2 checkpoint (hidden 32, one layer) with `rows` embedding rows, written
/// to `dir` as config.json + model.safetensors.
fn random_checkpoint(dir: &Path, rows: usize) {
    let config = format!(
        r#"{{"model_type": "mamba2", "hidden_size": 32, "num_hidden_layers": 1, "vocab_size": {rows},
            "num_heads": 4, "head_dim": 16, "n_groups": 1, "state_size": 16, "expand": 2,
            "tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}}"#
    );
    std::fs::write(dir.join("config.json"), &config).unwrap();
    let c = Mamba2Config::from_json_str(&config, "inline").unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = c
        .tensor_shapes(rows)
        .into_iter()
        .map(|(name, shape)| {
            let t = Tensor::randn(0f32, 0.1, shape.as_slice(), &Device::Cpu).unwrap();
            (name, t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

/// llama.cpp's reference vocabularies (`$LLAMA_SRC/models/ggml-vocab-*.gguf`, made by its
/// converter from the HF tokenizers) read as tokenizers, exported again: the same tokens, types,
/// merges and pre-tokenizer name. Needs LLAMA_SRC (../shared/tools/llama-cpp.sh).
#[test]
#[ignore]
fn llama_cpp_reference_vocabularies_export_as_the_converter_wrote_them() {
    let src = PathBuf::from(std::env::var("LLAMA_SRC").expect("LLAMA_SRC"));
    for name in [
        "gpt-2",
        "mpt",
        "gpt-neox",
        "llama-bpe",
        "qwen2",
        "starcoder",
    ] {
        let vocab = GgufFile::open(&src.join(format!("models/ggml-vocab-{name}.gguf"))).unwrap();
        let tokenizer = tokenizer_from_gguf(&vocab).unwrap();
        let rows = vocab
            .get_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()
            .len();
        let tmp = tempfile::tempdir().unwrap();
        random_checkpoint(tmp.path(), rows);
        let (config, weights) = open(tmp.path());
        let out = tmp.path().join("out.gguf");
        let opts = GgufExportOptions::new(GgmlDType::F32, name);
        let summary = write_gguf(&config, &weights, Some(&tokenizer), &out, &opts)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let file = GgufFile::open(&out).unwrap();
        let pre = vocab
            .get_str("tokenizer.ggml.pre")
            .unwrap()
            .unwrap_or("default");
        // A file without the key is read as `default`, the GPT-2 pre-tokenizer.
        let want = if pre == "default" { "gpt-2" } else { pre };
        assert_eq!(summary.vocab.as_ref().unwrap().pre, want, "{name}");
        for key in [
            "tokenizer.ggml.model",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
        ] {
            let (a, b) = (file.get(key), vocab.get(key));
            if a != b {
                let (a, b) = (a.unwrap().as_array(), b.unwrap().as_array());
                if let (Some(a), Some(b)) = (a, b) {
                    let first = a.iter().zip(b).position(|(x, y)| x != y);
                    panic!(
                        "{name} {key}: lengths {} {}, first difference at {first:?}: {:?} vs {:?}",
                        a.len(),
                        b.len(),
                        first.map(|i| &a[i]),
                        first.map(|i| &b[i])
                    );
                }
                panic!("{name} {key}");
            }
        }
    }
}
