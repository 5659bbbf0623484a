//! The GGUF reader: valid v2/v3 files with every metadata type (hand-written and written by
//! gguf-py's GGUFWriter), every malformed-file case as its typed error, unsupported tensor types
//! that still parse, and (ignored test, needs llama.cpp) a checkpoint converted by llama.cpp's
//! converter against what its log says it wrote.

mod support_gguf;

use std::path::{Path, PathBuf};

use mamba2::gguf::{GgufError, GgufFile, GgufType, GgufValue, MAX_ARRAY_DEPTH};
use mamba2::Error;
use support_gguf::{put_str, s, strings, Writer};

const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q8_0: u32 = 8;
const IQ2_XS: u32 = 17;

fn open(bytes: Vec<u8>) -> Result<GgufFile, Error> {
    GgufFile::from_bytes(bytes, "test.gguf")
}

/// The GGUF error of a file that must not open; its message names the file.
fn err(bytes: Vec<u8>) -> GgufError {
    match open(bytes) {
        Err(Error::Gguf(e)) => {
            assert!(e.to_string().starts_with("test.gguf: "), "{e}");
            e
        }
        Err(e) => panic!("not a GGUF error: {e:?}"),
        Ok(f) => panic!("opened: {f:?}"),
    }
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Every scalar type at an extreme value, strings with non-ASCII text, arrays of strings, of
/// arrays (of different element types) and an empty one.
fn all_types() -> Vec<(&'static str, GgufValue)> {
    use GgufValue::*;
    vec![
        ("general.architecture", s("mamba2")),
        ("t.u8", U8(u8::MAX)),
        ("t.i8", I8(i8::MIN)),
        ("t.u16", U16(u16::MAX)),
        ("t.i16", I16(i16::MIN)),
        ("t.u32", U32(u32::MAX)),
        ("t.i32", I32(-7)),
        ("t.i32_pos", I32(7)),
        ("t.u64", U64(u64::MAX)),
        ("t.i64", I64(i64::MIN)),
        ("t.f32", F32(-0.5)),
        ("t.f64", F64(1e300)),
        ("t.bool", Bool(true)),
        ("t.str", s("héllo ✓ 日本")),
        ("t.empty_str", s("")),
        ("t.strings", strings(&["a", "", "ü"])),
        (
            "t.nested",
            Array(vec![
                Array(vec![U32(1), U32(2)]),
                Array(vec![s("x")]),
                Array(vec![]),
            ]),
        ),
        ("t.empty", Array(vec![])),
    ]
}

fn valid_file(version: u32) -> Writer {
    let mut w = Writer::new(version);
    for (k, v) in all_types() {
        w = w.kv(k, v);
    }
    let q8: Vec<u8> = (0..2 * 34).map(|i| i as u8).collect();
    w.tensor(
        "a.f32",
        &[4, 2],
        F32,
        &f32_bytes(&[0., 1., 2., 3., 4., 5., 6., 7.]),
    )
    .tensor("b.q8_0", &[32, 2], Q8_0, &q8)
    .tensor("c.f16", &[3], F16, &[1, 2, 3, 4, 5, 6])
}

#[test]
fn v2_and_v3_files_with_every_metadata_type() {
    for version in [2, 3] {
        let w = valid_file(version);
        let bytes = w.bytes();
        let f = open(bytes.clone()).unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.path(), Path::new("test.gguf"));
        assert_eq!(f.metadata().len(), all_types().len());
        for (k, v) in all_types() {
            assert_eq!(f.get(k), Some(&v), "{k}");
        }
        assert_eq!(f.architecture().unwrap(), "mamba2");
        assert_eq!(f.alignment(), 32);

        let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a.f32", "b.q8_0", "c.f16"], "file order");
        let a = f.tensor_info("a.f32").unwrap();
        assert_eq!(
            (a.dims.clone(), a.shape(), a.elem_count()),
            (vec![4, 2], vec![2, 4], 8)
        );
        assert_eq!((a.ty, a.n_bytes), (GgufType::F32, 32));
        assert_eq!(a.offset % 32, 0);
        assert_eq!(a.offset, f.data_offset());
        assert_eq!(
            f.tensor_bytes(a),
            &f32_bytes(&[0., 1., 2., 3., 4., 5., 6., 7.])[..]
        );
        let b = f.tensor_info("b.q8_0").unwrap();
        assert_eq!(
            (b.ty, b.n_bytes, b.offset),
            (GgufType::Q8_0, 68, a.offset + 32)
        );
        let q8: Vec<u8> = (0..68).map(|i| i as u8).collect();
        assert_eq!(f.tensor_bytes(b), &q8[..]);
        let c = f.tensor_info("c.f16").unwrap();
        assert_eq!(
            (c.n_bytes, f.tensor_bytes(c)),
            (6, &[1u8, 2, 3, 4, 5, 6][..])
        );
        assert_eq!(&bytes[c.offset..c.offset + 6], f.tensor_bytes(c));
        for t in f.tensors() {
            f.check_supported(t).unwrap();
        }
        assert!(f.tensor_info("missing").is_none());
    }
}

#[test]
fn typed_getters_convert_what_fits_and_name_the_key_otherwise() {
    let f = open(valid_file(3).bytes()).unwrap();
    assert_eq!(f.get_u64("t.u8").unwrap(), Some(255));
    assert_eq!(f.get_u64("t.u16").unwrap(), Some(65535));
    assert_eq!(f.get_u64("t.u32").unwrap(), Some(u32::MAX as u64));
    assert_eq!(f.get_u64("t.u64").unwrap(), Some(u64::MAX));
    assert_eq!(f.get_u64("t.i32_pos").unwrap(), Some(7));
    assert_eq!(f.get_i64("t.i64").unwrap(), Some(i64::MIN));
    assert_eq!(f.get_i64("t.u32").unwrap(), Some(u32::MAX as i64));
    assert_eq!(f.get_f64("t.f32").unwrap(), Some(-0.5));
    assert_eq!(f.get_f64("t.f64").unwrap(), Some(1e300));
    assert_eq!(f.get_bool("t.bool").unwrap(), Some(true));
    assert_eq!(f.get_str("t.str").unwrap(), Some("héllo ✓ 日本"));
    assert_eq!(f.get_array("t.strings").unwrap().unwrap().len(), 3);
    assert_eq!(f.get_array("t.empty").unwrap(), Some(&[][..]));
    // Absent keys are Ok(None) for every getter.
    assert_eq!(f.get_u64("nope").unwrap(), None);
    assert_eq!(f.get_f64("nope").unwrap(), None);
    assert_eq!(f.get_bool("nope").unwrap(), None);
    assert_eq!(f.get_str("nope").unwrap(), None);
    assert!(f.get_array("nope").unwrap().is_none());

    let wrong: Vec<(Result<(), Error>, &str, &str)> = vec![
        (f.get_u64("t.i32").map(drop), "t.i32", "i32 -7"),
        (f.get_u64("t.i8").map(drop), "t.i8", "i8 -128"),
        (
            f.get_i64("t.u64").map(drop),
            "t.u64",
            "u64 18446744073709551615",
        ),
        (
            f.get_u64("t.str").map(drop),
            "t.str",
            "string \"héllo ✓ 日本\"",
        ),
        (f.get_u64("t.f32").map(drop), "t.f32", "f32 -0.5"),
        (f.get_f64("t.u32").map(drop), "t.u32", "u32 4294967295"),
        (f.get_bool("t.u8").map(drop), "t.u8", "u8 255"),
        (
            f.get_str("t.strings").map(drop),
            "t.strings",
            "array of 3 string",
        ),
        (f.get_array("t.str").map(drop), "t.str", "string"),
    ];
    for (r, key, got) in wrong {
        match r {
            Err(Error::Gguf(GgufError::MetadataType { key: k, got: g, .. })) => {
                assert_eq!(k, key);
                assert!(g.starts_with(got), "{key}: {g}");
            }
            other => panic!("{key}: {other:?}"),
        }
    }
}

#[test]
fn architecture_is_required_and_must_be_a_string() {
    let mut w = valid_file(3);
    w.kv.retain(|(k, _)| k != "general.architecture");
    match open(w.bytes()).unwrap().architecture() {
        Err(Error::Gguf(GgufError::MissingKey { key, .. })) => {
            assert_eq!(key, "general.architecture")
        }
        other => panic!("{other:?}"),
    }
    let w = w.kv("general.architecture", GgufValue::U32(1));
    assert!(matches!(
        open(w.bytes()).unwrap().architecture(),
        Err(Error::Gguf(GgufError::MetadataType { .. }))
    ));
}

/// gguf-py's GGUFWriter (the converter's writer) wrote these: every metadata type, nested
/// arrays, F32/F16/Q8_0 tensors (see scripts/gguf_vocab_fixture.py).
#[test]
fn files_written_by_gguf_py() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/gguf_file");
    for (name, version) in [("small_v2.gguf", 2), ("small_v3.gguf", 3)] {
        let f = GgufFile::open(&seeds.join(name)).unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.architecture().unwrap(), "mamba2");
        assert_eq!(f.get("t.u8"), Some(&GgufValue::U8(200)));
        assert_eq!(f.get("t.i16"), Some(&GgufValue::I16(-30000)));
        assert_eq!(f.get_u64("t.u64").unwrap(), Some((1 << 63) + 5));
        assert_eq!(f.get_i64("t.i64").unwrap(), Some(-(1 << 62)));
        assert_eq!(f.get_f64("t.f64").unwrap(), Some(-1e300));
        assert_eq!(f.get_str("t.str").unwrap(), Some("héllo ✓"));
        assert_eq!(f.get("t.strings"), Some(&strings(&["a", "", "ü"])));
        let nested = f.get_array("t.nested").unwrap().unwrap();
        assert_eq!(nested.len(), 2);
        assert_eq!(nested[1].as_array().unwrap().len(), 1);
        let a = f.tensor_info("a.f32").unwrap();
        assert_eq!((a.shape(), a.ty), (vec![2, 4], GgufType::F32));
        assert_eq!(
            f.tensor_bytes(a),
            &f32_bytes(&[0., 1., 2., 3., 4., 5., 6., 7.])[..]
        );
        let b = f.tensor_info("b.f16").unwrap();
        assert_eq!((b.dims.clone(), b.n_bytes), (vec![16], 32));
        assert!(
            f.tensor_bytes(b).chunks(2).all(|h| h == [0x00, 0x3C]),
            "f16 ones"
        );
        let c = f.tensor_info("c.q8_0").unwrap();
        assert_eq!(
            (c.dims.clone(), c.ty, c.n_bytes),
            (vec![32, 2], GgufType::Q8_0, 68)
        );
        assert_eq!(f.tensor_bytes(c)[2..34], (0..32).collect::<Vec<u8>>()[..]);
    }
}

#[test]
fn bad_magic_and_unsupported_versions() {
    let mut bytes = valid_file(3).bytes();
    bytes[..4].copy_from_slice(b"GGML");
    assert!(matches!(err(bytes), GgufError::BadMagic { found, .. } if found == b"GGML"));
    for (version, hint) in [
        (1, "version 1"),
        (4, ""),
        (0, ""),
        (0x0300_0000, "big-endian"),
    ] {
        match err(valid_file(version).bytes()) {
            GgufError::UnsupportedVersion { version: v, .. } => assert_eq!(v, version),
            e => panic!("{version}: {e:?}"),
        }
        let msg = err(valid_file(version).bytes()).to_string();
        assert!(msg.contains(hint), "{msg}");
    }
    // Not even a magic.
    assert!(matches!(err(vec![]), GgufError::Truncated { .. }));
    assert!(matches!(err(b"GG".to_vec()), GgufError::Truncated { .. }));
}

#[test]
fn every_truncation_is_a_typed_error() {
    let bytes = valid_file(3).bytes();
    let data_start = open(bytes.clone()).unwrap().data_offset();
    for cut in 0..bytes.len() {
        match err(bytes[..cut].to_vec()) {
            GgufError::Truncated { offset, .. } => assert!(offset <= cut, "cut {cut}"),
            // Cut inside the tensor data: the header is whole, a tensor is not.
            GgufError::DataOutOfBounds { file_len, .. } => {
                assert_eq!(file_len, cut);
                assert!(cut >= data_start, "cut {cut}");
            }
            e => panic!("cut {cut}: {e:?}"),
        }
    }
    // What was being read is named.
    let what = |cut: usize| match err(bytes[..cut].to_vec()) {
        GgufError::Truncated { what, .. } => what,
        e => panic!("{e:?}"),
    };
    assert_eq!(what(6), "the version");
    assert_eq!(what(12), "the tensor count");
    // Too short for the 18 entries the header announces (13 bytes at the least each).
    assert_eq!(what(30), "18 metadata entries");
    let name_at = bytes.windows(5).position(|w| w == b"c.f16").unwrap();
    assert_eq!(what(name_at + 3), "the name of tensor 2");
    assert_eq!(what(name_at + 5), "the dimension count of tensor `c.f16`");
    assert!(
        what(data_start - 1).contains("padding"),
        "{}",
        what(data_start - 1)
    );
}

/// A metadata entry `key` of `ty` followed by `payload` (already encoded).
fn raw_kv(key: &str, ty: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_str(&mut out, key);
    out.extend(ty.to_le_bytes());
    out.extend(payload);
    out
}

fn with_raw_kv(raw: Vec<u8>) -> Vec<u8> {
    let mut w = Writer::new(3).kv("general.architecture", s("mamba2"));
    w.raw_kv.push(raw);
    w.bytes()
}

#[test]
fn lengths_and_counts_past_the_end_are_refused_before_allocating() {
    // String lengths: u64::MAX, 2^40, one more than the bytes left.
    for len in [u64::MAX, 1 << 40, 4] {
        let mut payload = len.to_le_bytes().to_vec();
        payload.extend(b"abc");
        match err(with_raw_kv(raw_kv("k", 8, &payload))) {
            GgufError::Truncated { needed, what, .. } => {
                assert_eq!(needed, len);
                assert!(what.contains("`k`"), "{what}");
            }
            e => panic!("{len}: {e:?}"),
        }
    }
    // Array counts: of u8, of strings (count x 8 overflows u64), of arrays.
    for (elem, count) in [(0u32, u64::MAX), (8, u64::MAX / 4), (9, 1 << 40), (4, 3)] {
        let mut payload = elem.to_le_bytes().to_vec();
        payload.extend(count.to_le_bytes());
        payload.extend([0u8; 8]);
        match err(with_raw_kv(raw_kv("arr", 9, &payload))) {
            GgufError::Truncated { what, .. } => assert!(what.contains("`arr`"), "{what}"),
            e => panic!("{elem} x {count}: {e:?}"),
        }
    }
    // Header counts that lie.
    let mut w = valid_file(3);
    w.n_kv_override = Some(u64::MAX);
    assert!(matches!(err(w.bytes()), GgufError::Truncated { .. }));
    let mut w = valid_file(3);
    w.n_tensors_override = Some(1 << 60);
    assert!(matches!(err(w.bytes()), GgufError::Truncated { .. }));
}

#[test]
fn unknown_value_types_bad_utf8_and_deep_nesting() {
    match err(with_raw_kv(raw_kv("odd", 13, &[0; 8]))) {
        GgufError::UnknownValueType { key, type_id, .. } => {
            assert_eq!((key.as_str(), type_id), ("odd", 13))
        }
        e => panic!("{e:?}"),
    }
    let mut payload = 99u32.to_le_bytes().to_vec();
    payload.extend(1u64.to_le_bytes());
    match err(with_raw_kv(raw_kv("arr", 9, &payload))) {
        GgufError::UnknownValueType { key, type_id, .. } => {
            assert_eq!((key.as_str(), type_id), ("arr", 99))
        }
        e => panic!("{e:?}"),
    }
    // Invalid UTF-8 in a key, a value and a tensor name.
    let mut bad_key = Vec::new();
    bad_key.extend(2u64.to_le_bytes());
    bad_key.extend([0xC3, 0x28]);
    bad_key.extend(4u32.to_le_bytes());
    bad_key.extend(1u32.to_le_bytes());
    assert!(matches!(
        err(with_raw_kv(bad_key)),
        GgufError::InvalidUtf8 { .. }
    ));
    let mut payload = 1u64.to_le_bytes().to_vec();
    payload.push(0xFF);
    match err(with_raw_kv(raw_kv("v", 8, &payload))) {
        GgufError::InvalidUtf8 { what, .. } => assert!(what.contains("`v`"), "{what}"),
        e => panic!("{e:?}"),
    }
    let mut w = valid_file(3);
    w.tensors[1].name = "caf\u{e9}".into();
    let mut bytes = w.bytes();
    let at = bytes
        .windows(5)
        .position(|x| x == "caf\u{e9}".as_bytes())
        .unwrap();
    bytes[at + 3] = 0xFF; // first byte of é
    assert!(matches!(err(bytes), GgufError::InvalidUtf8 { .. }));

    // Arrays nested MAX_ARRAY_DEPTH deep are fine, one more is not.
    let nest = |depth: usize| {
        let mut v = GgufValue::Array(vec![GgufValue::U8(1)]);
        for _ in 1..depth {
            v = GgufValue::Array(vec![v]);
        }
        Writer::new(3).kv("deep", v).bytes()
    };
    open(nest(MAX_ARRAY_DEPTH)).unwrap();
    match err(nest(MAX_ARRAY_DEPTH + 1)) {
        GgufError::NestingTooDeep { key, max, .. } => {
            assert_eq!((key.as_str(), max), ("deep", MAX_ARRAY_DEPTH))
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn duplicate_keys_and_tensor_names() {
    let w = valid_file(3).kv("t.u8", GgufValue::U8(1));
    match err(w.bytes()) {
        GgufError::Duplicate { what, name, .. } => {
            assert_eq!((what, name.as_str()), ("metadata key", "t.u8"))
        }
        e => panic!("{e:?}"),
    }
    let w = valid_file(3).tensor("a.f32", &[2], F32, &[0; 8]);
    match err(w.bytes()) {
        GgufError::Duplicate { what, name, .. } => {
            assert_eq!((what, name.as_str()), ("tensor name", "a.f32"))
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn tensor_layout_errors_name_the_tensor() {
    // Data past the end: an offset beyond the file, and a last tensor cut short.
    let mut w = valid_file(3);
    w.tensors[2].offset = 1 << 20;
    match err(w.bytes()) {
        GgufError::DataOutOfBounds { tensor, .. } => assert_eq!(tensor, "c.f16"),
        e => panic!("{e:?}"),
    }
    let mut w = valid_file(3);
    w.tensors[2].offset = u64::MAX - 31; // aligned, and start + size overflows
    assert!(matches!(err(w.bytes()), GgufError::DataOutOfBounds { .. }));
    let mut w = valid_file(3);
    w.data.truncate(w.data.len() - 1);
    assert!(
        matches!(err(w.bytes()), GgufError::DataOutOfBounds { tensor, .. } if tensor == "c.f16")
    );

    // Misaligned offset.
    let mut w = valid_file(3);
    w.tensors[1].offset += 4;
    match err(w.bytes()) {
        GgufError::Misaligned {
            tensor,
            offset,
            alignment,
            ..
        } => {
            assert_eq!((tensor.as_str(), offset, alignment), ("b.q8_0", 36, 32))
        }
        e => panic!("{e:?}"),
    }
    // A custom alignment is honoured (data section and offsets on 8-byte boundaries)...
    let mut w = Writer::new(3).kv("general.alignment", GgufValue::U32(8));
    w.alignment = 8;
    let w = w
        .tensor("x", &[1], F32, &[0; 4])
        .tensor("y", &[1], F32, &[1, 2, 3, 4]);
    let f = open(w.bytes()).unwrap();
    assert_eq!(f.alignment(), 8);
    assert_eq!(f.data_offset() % 8, 0);
    assert_eq!(f.tensor_bytes(f.tensor_info("y").unwrap()), &[1, 2, 3, 4]);
    // ... and must be a power of two, given as an integer.
    for a in [0u32, 3, 48] {
        let w = valid_file(3).kv("general.alignment", GgufValue::U32(a));
        assert!(
            matches!(err(w.bytes()), GgufError::BadAlignment { alignment, .. } if alignment == a as u64)
        );
    }
    let w = valid_file(3).kv("general.alignment", s("32"));
    assert!(
        matches!(err(w.bytes()), GgufError::MetadataType { key, .. } if key == "general.alignment")
    );

    // Five dimensions.
    let w = Writer::new(3).tensor("t5", &[1, 1, 1, 1, 2], F32, &[0; 8]);
    assert!(
        matches!(err(w.bytes()), GgufError::TooManyDims { tensor, n_dims: 5, .. } if tensor == "t5")
    );
    // Element count overflow and zero elements.
    for dims in [vec![1u64 << 32, 1 << 32], vec![u64::MAX, 2], vec![4, 0]] {
        let w = Writer::new(3).tensor("bad", &dims, F32, &[0; 8]);
        match err(w.bytes()) {
            GgufError::BadShape {
                tensor, dims: d, ..
            } => assert_eq!((tensor.as_str(), d), ("bad", dims)),
            e => panic!("{e:?}"),
        }
    }
    // The byte size overflows although the element count does not.
    let w = Writer::new(3).tensor("big", &[1 << 62, 2], F32, &[0; 8]);
    assert!(matches!(err(w.bytes()), GgufError::BadShape { .. }));
    // Rows that are not whole blocks.
    let w = Writer::new(3).tensor("q", &[16, 2], Q4_0, &[0; 18]);
    match err(w.bytes()) {
        GgufError::RowNotBlockMultiple {
            tensor,
            ty_name,
            row_len,
            block_size,
            ..
        } => {
            assert_eq!(
                (tensor.as_str(), ty_name.as_str(), row_len, block_size),
                ("q", "Q4_0", 16, 32)
            )
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn unsupported_tensor_types_parse_and_fail_only_when_used() {
    // IQ2_XS: 74 bytes per 256 elements; type 99: unknown, its size is what lies before the
    // next tensor; then a normal F32 tensor.
    let w = Writer::new(3)
        .kv("general.architecture", s("mamba2"))
        .tensor("iq", &[256, 2], IQ2_XS, &[7; 148])
        .tensor("mystery", &[10], 99, &[9; 40])
        .tensor("ok", &[2], F32, &f32_bytes(&[1.5, -2.0]));
    let f = open(w.bytes()).unwrap();
    let iq = f.tensor_info("iq").unwrap();
    assert_eq!(
        (iq.ty, iq.ty.name(), iq.n_bytes),
        (GgufType::IQ2_XS, "IQ2_XS".to_string(), 148)
    );
    assert_eq!(f.tensor_bytes(iq), &[7; 148][..]);
    let mystery = f.tensor_info("mystery").unwrap();
    assert_eq!(mystery.ty, GgufType::Unknown(99));
    // 40 bytes of data padded to the next 32-byte boundary, where "ok" starts.
    assert_eq!(mystery.n_bytes, 64);
    let ok = f.tensor_info("ok").unwrap();
    assert_eq!(f.tensor_bytes(ok), &f32_bytes(&[1.5, -2.0])[..]);
    assert_eq!(
        f.check_supported(ok).unwrap(),
        candle_core::quantized::GgmlDType::F32
    );
    for (t, ty_name) in [(iq, "IQ2_XS"), (mystery, "type 99")] {
        match f.check_supported(t) {
            Err(Error::Gguf(e @ GgufError::UnsupportedTensorType { .. })) => {
                let msg = e.to_string();
                assert!(msg.contains(&t.name) && msg.contains(ty_name), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }
    // An unknown type as the last tensor gets the rest of the file.
    let w = Writer::new(3).tensor("last", &[3], 77, &[1, 2, 3, 4, 5]);
    let f = open(w.bytes()).unwrap();
    let last = f.tensor_info("last").unwrap();
    assert_eq!(f.tensor_bytes(last), &[1, 2, 3, 4, 5]);
    // An info from another file is not sliced out of this one.
    let other = open(valid_file(3).bytes()).unwrap();
    assert!(f
        .tensor_bytes(other.tensor_info("a.f32").unwrap())
        .is_empty());
}

#[test]
fn vocab_only_file_from_the_converter() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/mamba2-tiny-vocab.gguf");
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert!(f.tensors().is_empty());
    assert_eq!(f.architecture().unwrap(), "mamba2");
    assert_eq!(f.get_u64("mamba2.embedding_length").unwrap(), Some(256));
    assert_eq!(f.get_u64("mamba2.ssm.group_count").unwrap(), Some(2));
    assert_eq!(
        f.get_f64("mamba2.attention.layer_norm_rms_epsilon")
            .unwrap()
            .map(|e| (e * 1e5).round()),
        Some(1.0)
    );
    assert_eq!(
        f.get_array("tokenizer.ggml.tokens").unwrap().unwrap().len(),
        4096
    );
    // Errors from a real path name it: missing, empty, not GGUF.
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    match GgufFile::open(&empty) {
        Err(Error::Gguf(e @ GgufError::Truncated { .. })) => {
            assert!(e.to_string().contains("empty.gguf"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let json = dir.path().join("config.gguf");
    std::fs::write(&json, b"{\"model_type\": \"mamba2\"}").unwrap();
    assert!(matches!(
        GgufFile::open(&json),
        Err(Error::Gguf(GgufError::BadMagic { .. }))
    ));
    let missing = path.with_file_name("no-such.gguf");
    let e = GgufFile::open(&missing).unwrap_err().to_string();
    assert!(e.contains("no-such.gguf"), "{e}");
}

/// llama.cpp's converter on the g2_ds16_seq3_b2 HF checkpoint (f32 and q8_0): every tensor the
/// converter's log lists, with the log's name, ggml-order shape and type; the f32 embedding equal
/// to the checkpoint's. Run with
/// `eval "$(bash ../shared/tools/llama-cpp.sh)"; cargo test -p mamba2 --test gguf_reader -- --ignored`.
#[test]
#[ignore = "needs llama.cpp's converter: set LLAMA_PY (../shared/tools/llama-cpp.sh)"]
fn converter_output_matches_its_log() {
    let py = std::env::var("LLAMA_PY").expect("LLAMA_PY");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let hf: PathBuf = root.join("tests/fixtures/g2_ds16_seq3_b2/hf");
    let convert = root.join("../shared/tools/llama-cpp/convert_gguf.py");
    let dir = tempfile::tempdir().unwrap();
    for outtype in ["f32", "q8_0"] {
        let out = dir.path().join(format!("{outtype}.gguf"));
        let o = std::process::Command::new(&py)
            .arg(&convert)
            .arg(&hf)
            .args(["--outtype", outtype, "--outfile"])
            .arg(&out)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{log}");
        // "INFO:hf-to-gguf:blk.0.ssm_in.weight,     torch.float32 --> Q8_0, shape = {32, 196}"
        let logged: Vec<(String, String, Vec<usize>)> = log
            .lines()
            .filter(|l| l.contains(" --> ") && l.contains("shape = {"))
            .map(|l| {
                let l = l.trim_start_matches("INFO:hf-to-gguf:");
                let name = l.split(',').next().unwrap().trim().to_string();
                let ty = l
                    .split(" --> ")
                    .nth(1)
                    .unwrap()
                    .split(',')
                    .next()
                    .unwrap()
                    .to_string();
                let dims = l.split('{').nth(1).unwrap().trim_end_matches('}');
                let dims = dims.split(',').map(|d| d.trim().parse().unwrap()).collect();
                (name, ty, dims)
            })
            .collect();
        let f = GgufFile::open(&out).unwrap();
        assert!(logged.len() >= 10, "{log}");
        assert_eq!(f.tensors().len(), logged.len());
        for (name, ty, dims) in &logged {
            let t = f
                .tensor_info(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!((&t.ty.name(), &t.dims), (ty, dims), "{name}");
            f.check_supported(t).unwrap();
            let expected = t.elem_count() / t.ty.block_size().unwrap() * t.ty.type_size().unwrap();
            assert_eq!(f.tensor_bytes(t).len(), expected);
        }
        assert!(logged.iter().any(|l| l.1 == outtype.to_uppercase()));
        // The converter gave the checkpoint (no tokenizer files) llama.cpp's GPT-NeoX vocabulary
        // cut to its 96 tokens, with all 50 009 merges: the merges that cannot fire are dropped.
        let tokenizer = mamba2::gguf::tokenizer_from_gguf(&f).unwrap();
        assert_eq!(tokenizer.get_vocab_size(true), 96);
        let ids = tokenizer.encode("Hi!", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, [41, 74, 2]); // `H`, `i`, `!` (ids 2.. are the printable ASCII characters)
        if outtype == "f32" {
            let st = std::fs::read(hf.join("model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&st).unwrap();
            let emb = st.tensor("backbone.embeddings.weight").unwrap();
            assert_eq!(
                f.tensor_bytes(f.tensor_info("token_embd.weight").unwrap()),
                emb.data()
            );
        }
    }
}
