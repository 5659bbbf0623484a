//! The GGUF byte-level parser: header, metadata, tensor infos, and the checks that make every
//! tensor's byte range safe to slice afterwards.
//!
//! Layout (little-endian, versions 2 and 3 are identical; 3 only allowed big-endian files, which
//! this reader refuses through their byte-swapped version number):
//!
//! ```text
//! "GGUF" | version u32 | n_tensors u64 | n_kv u64
//! n_kv x      ( key: string | value type u32 | value )
//! n_tensors x ( name: string | n_dims u32 | dims u64 x n_dims | ggml type u32 | offset u64 )
//! padding to `general.alignment` (default 32) | tensor data (offsets relative to here)
//! string = length u64 | UTF-8 bytes;  array = element type u32 | count u64 | elements
//! ```
//!
//! Every read is bounds-checked, and every declared count or length is compared with the bytes
//! left before anything is allocated for it, so a hostile file costs at most a bounded multiple
//! of its own size (see [`MAX_METADATA_VALUES`]).

use std::collections::{BTreeMap, HashMap};

use super::error::GgufError;
use super::types::GgufType;
use super::value::{min_encoded_size, type_id, type_name, GgufValue};
use super::GgufTensorInfo;

/// GGML_MAX_DIMS: the most dimensions a tensor can have.
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays deeper than this are refused (real files nest at most once; a limit keeps
/// the recursive reader's stack use bounded).
pub const MAX_ARRAY_DEPTH: usize = 8;
/// The most metadata values (array elements included) a file may hold. Each value takes 32 bytes
/// in memory but can take 1 byte in the file, so without a limit a file of n bytes could ask for
/// 32n bytes. The largest real vocabularies (~262k tokens, with scores, types and merges) hold
/// about 1.1 M values; 16 M leaves room for many times that and bounds memory at ~512 MiB.
pub const MAX_METADATA_VALUES: usize = 1 << 24;
/// `general.alignment` when the key is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// Fewest bytes of one metadata entry (empty key, type, a one-byte value) and one tensor info
/// (empty name, n_dims, type, offset), for checking the header counts against the file size.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// What the parser found, every tensor checked against the file.
#[derive(Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: usize,
    pub data_start: usize,
}

/// Parses and validates a whole GGUF file held in `bytes`; `path` names it in errors.
pub(crate) fn parse(bytes: &[u8], path: &str) -> Result<Header, GgufError> {
    let mut r = Cursor {
        bytes,
        pos: 0,
        path,
        values: 0,
    };
    let magic = r.take(4, &|| "the magic".into())?;
    if magic != b"GGUF" {
        return Err(GgufError::BadMagic {
            path: path.into(),
            found: magic.to_vec(),
        });
    }
    let version = r.u32(&|| "the version".into())?;
    if version != 2 && version != 3 {
        // A big-endian file's version reads as 0x0N000000 here.
        let hint = if version & 0xFFFF == 0 && version != 0 {
            "; this looks like a big-endian file"
        } else if version == 1 {
            "; version 1 files predate 64-bit counts: convert them again"
        } else {
            ""
        };
        return Err(GgufError::UnsupportedVersion {
            path: path.into(),
            version,
            hint,
        });
    }
    let n_tensors = r.u64(&|| "the tensor count".into())?;
    let n_kv = r.u64(&|| "the metadata count".into())?;
    r.check_count(n_kv, MIN_KV_BYTES, &|| format!("{n_kv} metadata entries"))?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("the key of metadata entry {i}"))?;
        let ty = r.u32(&|| format!("the value type of metadata `{key}`"))?;
        let value = r.value(ty, &key, 0)?;
        if metadata.contains_key(&key) {
            return Err(GgufError::Duplicate {
                path: path.into(),
                what: "metadata key",
                name: key,
            });
        }
        metadata.insert(key, value);
    }
    let alignment = alignment(&metadata, path)?;

    r.check_count(n_tensors, MIN_TENSOR_INFO_BYTES, &|| {
        format!("{n_tensors} tensor infos")
    })?;
    let mut raw = Vec::new();
    let mut seen = HashMap::new();
    for i in 0..n_tensors {
        let name = r.string(&|| format!("the name of tensor {i}"))?;
        let n_dims = r.u32(&|| format!("the dimension count of tensor `{name}`"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                path: path.into(),
                tensor: name,
                n_dims,
                max: MAX_DIMS,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(r.u64(&|| format!("dimension {d} of tensor `{name}`"))?);
        }
        let ty = r.u32(&|| format!("the type of tensor `{name}`"))?;
        let offset = r.u64(&|| format!("the data offset of tensor `{name}`"))?;
        if seen.insert(name.clone(), i).is_some() {
            return Err(GgufError::Duplicate {
                path: path.into(),
                what: "tensor name",
                name,
            });
        }
        raw.push(RawTensor {
            name,
            dims,
            ty: GgufType::from_id(ty),
            offset,
        });
    }

    // The data section starts at the next multiple of the alignment (llama.cpp seeks there only
    // when there are tensors: a vocab-only file may end right after its metadata).
    let data_start = if raw.is_empty() {
        r.pos
    } else {
        let start = r.pos.checked_next_multiple_of(alignment);
        match start {
            Some(s) if s <= bytes.len() => s,
            _ => {
                return Err(GgufError::Truncated {
                    path: path.into(),
                    what: format!("the padding before the tensor data (alignment {alignment})"),
                    offset: r.pos,
                    needed: (alignment - r.pos % alignment) as u64,
                    available: bytes.len() - r.pos,
                })
            }
        }
    };
    let tensors = check_tensors(raw, data_start, alignment, bytes.len(), path)?;
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

/// `general.alignment`: any integer type is accepted (llama.cpp writes u32), it must be a power
/// of two.
fn alignment(metadata: &BTreeMap<String, GgufValue>, path: &str) -> Result<usize, GgufError> {
    let Some(v) = metadata.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let a = v.as_u64().ok_or_else(|| GgufError::MetadataType {
        path: path.into(),
        key: "general.alignment".into(),
        expected: "an unsigned integer".into(),
        got: v.describe(),
    })?;
    match usize::try_from(a) {
        Ok(a) if a.is_power_of_two() => Ok(a),
        _ => Err(GgufError::BadAlignment {
            path: path.into(),
            alignment: a,
        }),
    }
}

struct RawTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgufType,
    offset: u64,
}

/// Element count, byte size, alignment and bounds of every tensor.
///
/// A tensor of an unknown type id has no known byte size: it is given the bytes from its offset
/// up to the next tensor's offset (the smallest offset greater than its own) or the end of the
/// file, which is all the file can hold for it. Such a tensor is never usable (it fails
/// [`super::GgufFile::check_supported`]), so the figure is informational.
fn check_tensors(
    raw: Vec<RawTensor>,
    data_start: usize,
    alignment: usize,
    file_len: usize,
    path: &str,
) -> Result<Vec<GgufTensorInfo>, GgufError> {
    let mut sorted_offsets: Vec<u64> = raw.iter().map(|t| t.offset).collect();
    sorted_offsets.sort_unstable();
    let mut out = Vec::with_capacity(raw.len());
    for t in raw {
        let bad_shape = |reason| GgufError::BadShape {
            path: path.into(),
            tensor: t.name.clone(),
            dims: t.dims.clone(),
            reason,
        };
        let elems = t
            .dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
            .ok_or_else(|| bad_shape("the element count overflows"))?;
        if elems == 0 {
            return Err(bad_shape("the tensor has no elements"));
        }
        if !t.offset.is_multiple_of(alignment as u64) {
            return Err(GgufError::Misaligned {
                path: path.into(),
                tensor: t.name,
                offset: t.offset,
                alignment,
            });
        }
        let start = (data_start as u64).checked_add(t.offset);
        let n_bytes = match (t.ty.block_size(), t.ty.type_size()) {
            (Some(block), Some(size)) => {
                let row_len = t.dims.first().copied().unwrap_or(1);
                if !row_len.is_multiple_of(block as u64) {
                    return Err(GgufError::RowNotBlockMultiple {
                        path: path.into(),
                        tensor: t.name,
                        ty_name: t.ty.name(),
                        row_len,
                        block_size: block,
                    });
                }
                (elems / block)
                    .checked_mul(size)
                    .ok_or_else(|| bad_shape("the byte size overflows"))?
            }
            _ => {
                // Binary search: a file of many unknown-type tensors stays O(n log n).
                let next = sorted_offsets
                    .get(sorted_offsets.partition_point(|&o| o <= t.offset))
                    .and_then(|&o| (data_start as u64).checked_add(o))
                    .map_or(file_len as u64, |o| o.min(file_len as u64));
                start.map_or(0, |s| next.saturating_sub(s)) as usize
            }
        };
        let end = start.and_then(|s| s.checked_add(n_bytes as u64));
        match (start, end) {
            (Some(s), Some(e)) if e <= file_len as u64 => out.push(GgufTensorInfo {
                name: t.name,
                dims: t.dims.iter().map(|&d| d as usize).collect(),
                ty: t.ty,
                offset: s as usize,
                n_bytes,
            }),
            _ => {
                return Err(GgufError::DataOutOfBounds {
                    path: path.into(),
                    tensor: t.name,
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                })
            }
        }
    }
    Ok(out)
}

/// A bounds-checked little-endian reader. `what` closures describe the item for error messages
/// and run only on failure.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a str,
    /// Metadata values read so far, against [`MAX_METADATA_VALUES`].
    values: usize,
}

type What<'w> = &'w dyn Fn() -> String;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn truncated(&self, what: What, needed: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.into(),
            what: what(),
            offset: self.pos,
            needed,
            available: self.remaining(),
        }
    }

    fn take(&mut self, n: u64, what: What) -> Result<&'a [u8], GgufError> {
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => {
                let s = &self.bytes[self.pos..self.pos + n];
                self.pos += n;
                Ok(s)
            }
            _ => Err(self.truncated(what, n)),
        }
    }

    fn array<const N: usize>(&mut self, what: What) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: What) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: What) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Refuses `count` items of at least `min_bytes` each when the bytes left cannot hold them.
    fn check_count(&self, count: u64, min_bytes: u64, what: What) -> Result<(), GgufError> {
        match count.checked_mul(min_bytes) {
            Some(need) if need <= self.remaining() as u64 => Ok(()),
            need => Err(self.truncated(what, need.unwrap_or(u64::MAX))),
        }
    }

    fn string(&mut self, what: What) -> Result<String, GgufError> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        let start = self.pos;
        let s = self.take(len, what)?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(GgufError::InvalidUtf8 {
                path: self.path.into(),
                what: what(),
                offset: start,
            }),
        }
    }

    /// One value of type `ty` for metadata `key`, `depth` arrays deep.
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue, GgufError> {
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            return Err(GgufError::TooManyValues {
                path: self.path.into(),
                key: key.into(),
                max: MAX_METADATA_VALUES,
            });
        }
        let what = || format!("the {} value of metadata `{key}`", type_name(ty));
        Ok(match ty {
            type_id::U8 => GgufValue::U8(self.array::<1>(&what)?[0]),
            type_id::I8 => GgufValue::I8(i8::from_le_bytes(self.array(&what)?)),
            type_id::U16 => GgufValue::U16(u16::from_le_bytes(self.array(&what)?)),
            type_id::I16 => GgufValue::I16(i16::from_le_bytes(self.array(&what)?)),
            type_id::U32 => GgufValue::U32(u32::from_le_bytes(self.array(&what)?)),
            type_id::I32 => GgufValue::I32(i32::from_le_bytes(self.array(&what)?)),
            type_id::U64 => GgufValue::U64(u64::from_le_bytes(self.array(&what)?)),
            type_id::I64 => GgufValue::I64(i64::from_le_bytes(self.array(&what)?)),
            type_id::F32 => GgufValue::F32(f32::from_le_bytes(self.array(&what)?)),
            type_id::F64 => GgufValue::F64(f64::from_le_bytes(self.array(&what)?)),
            // Any non-zero byte is true, as in llama.cpp (which reads a C++ bool).
            type_id::BOOL => GgufValue::Bool(self.array::<1>(&what)?[0] != 0),
            type_id::STRING => GgufValue::String(self.string(&what)?),
            type_id::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestingTooDeep {
                        path: self.path.into(),
                        key: key.into(),
                        max: MAX_ARRAY_DEPTH,
                    });
                }
                let elem_ty = self.u32(&|| format!("the element type of array `{key}`"))?;
                let min = min_encoded_size(elem_ty).ok_or_else(|| GgufError::UnknownValueType {
                    path: self.path.into(),
                    key: key.into(),
                    type_id: elem_ty,
                })?;
                let count = self.u64(&|| format!("the length of array `{key}`"))?;
                self.check_count(count, min, &|| {
                    format!("array `{key}` of {count} {}", type_name(elem_ty))
                })?;
                if count > (MAX_METADATA_VALUES - self.values) as u64 {
                    return Err(GgufError::TooManyValues {
                        path: self.path.into(),
                        key: key.into(),
                        max: MAX_METADATA_VALUES,
                    });
                }
                // `count` elements fit in the bytes left and in the value budget.
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            other => {
                return Err(GgufError::UnknownValueType {
                    path: self.path.into(),
                    key: key.into(),
                    type_id: other,
                })
            }
        })
    }
}
