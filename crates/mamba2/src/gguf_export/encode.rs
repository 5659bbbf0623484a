//! Laying out the GGUF file: header, metadata, tensor infos and aligned, encoded tensor data.

use super::*;

pub(super) fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_str(w: &mut Vec<u8>, s: &str) {
    put_u64(w, s.len() as u64);
    w.extend_from_slice(s.as_bytes());
}

/// A value's payload (its type id is written by the caller).
pub(super) fn put_value(w: &mut Vec<u8>, key: &str, v: &GgufValue) -> Result<()> {
    match v {
        GgufValue::U8(x) => w.push(*x),
        GgufValue::I8(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => put_u32(w, *x),
        GgufValue::I32(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => put_u64(w, *x),
        GgufValue::I64(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => w.push(u8::from(*x)),
        GgufValue::String(s) => put_str(w, s),
        GgufValue::Array(items) => {
            // GGUF arrays are homogeneous; an empty one is written as an array of strings.
            let elem = items
                .first()
                .map_or(GgufValue::String(String::new()).type_id(), |x| x.type_id());
            if items.iter().any(|x| x.type_id() != elem) {
                return Err(Error::InvalidInput(format!(
                    "GGUF metadata `{key}`: an array of mixed value types"
                )));
            }
            put_u32(w, elem);
            put_u64(w, items.len() as u64);
            for x in items {
                put_value(w, key, x)?;
            }
        }
    }
    Ok(())
}

/// The header, metadata and tensor infos, padded to [`GGUF_ALIGNMENT`]; tensor `i`'s data
/// follows at the returned offsets (relative to the end of the header), each aligned.
pub(super) fn write_header(
    w: &mut Vec<u8>,
    metadata: &Metadata,
    tensors: &[Planned],
) -> Result<Vec<u64>> {
    w.extend_from_slice(b"GGUF");
    put_u32(w, GGUF_VERSION);
    put_u64(w, tensors.len() as u64);
    put_u64(w, metadata.len() as u64);
    for (key, value) in metadata {
        put_str(w, key);
        put_u32(w, value.type_id());
        put_value(w, key, value)?;
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        put_str(w, &t.name);
        put_u32(w, t.shape.len() as u32);
        for &d in t.shape.iter().rev() {
            put_u64(w, d as u64);
        }
        put_u32(w, ggml_type_id(t.ty)?);
        put_u64(w, offset);
        offsets.push(offset);
        offset += t.bytes.next_multiple_of(GGUF_ALIGNMENT) as u64;
    }
    w.resize(w.len().next_multiple_of(GGUF_ALIGNMENT), 0);
    Ok(offsets)
}

/// A tensor's bytes in `ty`: f32 values (CPU, `(rows, row_len)` or 1-D) converted or quantized.
/// Block formats are quantized in row chunks on the Rayon pool (blocks never cross rows, so
/// the bytes are those of one `QTensor::quantize` of the whole matrix).
pub(super) fn encode(values: &Tensor, ty: GgmlDType) -> Result<Vec<u8>> {
    let flat = values.flatten_all()?;
    Ok(match ty {
        GgmlDType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        GgmlDType::F16 => flat
            .to_dtype(DType::F16)?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        GgmlDType::BF16 => flat
            .to_dtype(DType::BF16)?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        _ => {
            let (rows, cols) = values.dims2()?;
            let all = flat.to_vec1::<f32>()?;
            let chunk = (1usize << 16).div_ceil(cols).max(1);
            let parts = all
                .par_chunks(chunk * cols)
                .map(|part| {
                    // Its own storage: `QTensor::quantize` reads a tensor's whole storage.
                    let part = Tensor::from_slice(part, (part.len() / cols, cols), &Device::Cpu)?;
                    Ok(QTensor::quantize(&part, ty)?.data()?.into_owned())
                })
                .collect::<Result<Vec<Vec<u8>>>>()?;
            debug_assert_eq!(parts.len(), rows.div_ceil(chunk));
            parts.concat()
        }
    })
}

/// `OUT.part` beside `OUT`.
fn part_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    out.with_file_name(name)
}

/// Writes the file: header, then each tensor's data from `fetch` (f32 values in the file's
/// layout), to `OUT.part`, renamed to `out` when complete (removed on error).
pub(super) fn write_file(
    out: &Path,
    metadata: &Metadata,
    tensors: &[Planned],
    fetch: &dyn Fn(&Planned) -> Result<Tensor>,
) -> Result<u64> {
    let tmp = part_path(out);
    let run = || -> Result<u64> {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let io = |e| Error::io(&tmp, e);
        let mut header = Vec::new();
        let offsets = write_header(&mut header, metadata, tensors)?;
        w.write_all(&header).map_err(io)?;
        let mut written = 0u64;
        for (t, &offset) in tensors.iter().zip(&offsets) {
            debug_assert_eq!(written, offset);
            let values = fetch(t)?;
            if values.dims() != t.shape.as_slice() {
                return Err(Error::TensorShape {
                    name: t.name.clone(),
                    expected: t.shape.clone(),
                    got: values.dims().to_vec(),
                });
            }
            let bytes = encode(&values, t.ty)?;
            if bytes.len() != t.bytes {
                return Err(Error::InvalidInput(format!(
                    "GGUF export: `{}` encoded to {} bytes, expected {}",
                    t.name,
                    bytes.len(),
                    t.bytes
                )));
            }
            let padded = bytes.len().next_multiple_of(GGUF_ALIGNMENT);
            w.write_all(&bytes).map_err(io)?;
            w.write_all(&vec![0u8; padded - bytes.len()]).map_err(io)?;
            written += padded as u64;
        }
        let file = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(header.len() as u64 + written)
    };
    match run() {
        Ok(n) => {
            std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

pub(super) fn summary(
    out: &Path,
    file_bytes: u64,
    file_type: u32,
    tensors: &[Planned],
    metadata_keys: usize,
    vocab: Option<ExportedVocab>,
    warnings: Vec<String>,
) -> GgufExportSummary {
    GgufExportSummary {
        path: out.to_path_buf(),
        file_bytes,
        file_type,
        tensors: tensors
            .iter()
            .map(|t| ExportedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                ty: t.ty,
                fallback_from: t.fallback_from,
                bytes: t.bytes,
            })
            .collect(),
        metadata_keys,
        vocab,
        warnings,
    }
}
