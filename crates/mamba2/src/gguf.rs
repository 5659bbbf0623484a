//! GGUF files (llama.cpp's single-file checkpoints): a bounds-checked reader of the header,
//! metadata and tensor table over a memory map, typed metadata lookups, and the tokenizer the
//! metadata describes.
//!
//! Versions 2 and 3 (little-endian) are read, as written by llama.cpp's `convert_hf_to_gguf.py`
//! and `llama-quantize` and by Candle's `gguf_file::write`. Everything about a tensor that can be
//! checked without using it is checked when the file is opened (shape, block layout, alignment,
//! bounds), so [`GgufFile::tensor_bytes`] is a plain slice. Tensors of a type this engine cannot
//! compute with (IQ*, TQ*, MXFP4, integer types, unknown type ids) do not stop the file from
//! opening; [`GgufFile::check_supported`] reports them, naming the tensor, when they are used.
//!
//! ```
//! use mamba2::gguf::{tokenizer_from_gguf, GgufFile};
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/gguf/mamba2-tiny-vocab.gguf");
//! let file = GgufFile::open(std::path::Path::new(path))?;
//! assert_eq!(file.architecture()?, "mamba2");
//! assert_eq!(file.get_u64("mamba2.block_count")?, Some(6));
//! let tokenizer = tokenizer_from_gguf(&file)?;
//! let ids = tokenizer.encode("Mr. Darcy", false).map_err(|e| mamba2::Error::Tokenizer(e.to_string()))?;
//! assert!(!ids.get_ids().is_empty());
//! # Ok::<(), mamba2::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::error::{Error, Result};

mod error;
mod pretokenizer;
mod reader;
mod tokenizer;
mod types;
mod value;

pub use error::GgufError;
pub use reader::{DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_METADATA_VALUES};
pub use tokenizer::{special_tokens, tokenizer_from_gguf, GgufSpecialTokens, SUPPORTED_PRE};
/// The type [`tokenizer_from_gguf`] returns, re-exported so that callers can name it without
/// depending on the same `tokenizers` release.
pub use tokenizers::Tokenizer;
pub use types::GgufType;
pub use value::GgufValue;

/// One tensor of the file's tensor table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the fastest-varying dimension (the row length).
    pub dims: Vec<usize>,
    pub ty: GgufType,
    /// Absolute byte offset of the tensor's data in the file.
    pub offset: usize,
    /// Bytes of data: element count / block size x bytes per block. For an unknown type id, the
    /// bytes up to the next tensor's data or the end of the file (see the module doc).
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// Torch/Candle order (`dims` reversed): `[rows, row_len]` for a matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    /// Number of elements (checked not to overflow when the file was opened).
    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }
}

/// The file's bytes: a read-only memory map, or a buffer for [`GgufFile::from_bytes`].
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An opened GGUF file: the parsed header and metadata, and the tensor data in place.
pub struct GgufFile {
    path: PathBuf,
    /// Shared so that quantized matrices can read their blocks in place after the header is gone
    /// (see [`GgufFile::shared_tensor_bytes`]).
    bytes: std::sync::Arc<Bytes>,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: usize,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses a GGUF file. Errors name the path.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file truncated by another process while mapped would
        // fault, which is the usual contract of memory-mapped checkpoints (safetensors, llama.cpp).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), Bytes::Mapped(mmap))
    }

    /// Parses a GGUF file held in memory; `name` stands for the path in errors and [`Self::path`].
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<GgufFile> {
        Self::parse(PathBuf::from(name), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<GgufFile> {
        let h = reader::parse(&bytes, &path.display().to_string())?;
        let by_name = h
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path,
            bytes: std::sync::Arc::new(bytes),
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            by_name,
            alignment: h.alignment,
            data_start: h.data_start,
        })
    }

    /// The path the file was opened from (the `name` given to [`Self::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// The value of `key` converted by `convert`; `Ok(None)` when absent, a
    /// [`GgufError::MetadataType`] naming the key when present with another type.
    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl FnOnce(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<T>> {
        let Some(v) = self.metadata.get(key) else {
            return Ok(None);
        };
        match convert(v) {
            Some(t) => Ok(Some(t)),
            None => Err(GgufError::MetadataType {
                path: self.name(),
                key: key.into(),
                expected: expected.into(),
                got: v.describe(),
            }
            .into()),
        }
    }

    /// An unsigned integer: any GGUF integer type whose value fits (llama.cpp writes u32 for most
    /// counts; other writers use i32 or u64). A negative value is a type error.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "an unsigned integer", GgufValue::as_u64)
    }

    /// A signed integer: any GGUF integer type whose value fits in an `i64`.
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>> {
        self.typed(key, "an integer", GgufValue::as_i64)
    }

    /// A float: `f32` or `f64`.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a float (f32 or f64)", GgufValue::as_f64)
    }

    /// A `bool`.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", GgufValue::as_bool)
    }

    /// A string.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", GgufValue::as_str)
    }

    /// An array (of any element type).
    pub fn get_array(&self, key: &str) -> Result<Option<&[GgufValue]>> {
        self.typed(key, "an array", GgufValue::as_array)
    }

    /// `general.architecture` (`mamba2`, `granitehybrid`, ...), which every GGUF model must have.
    /// Whether the engine knows the architecture is for the model loader to say.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")?.ok_or_else(|| {
            GgufError::MissingKey {
                path: self.name(),
                key: "general.architecture".into(),
            }
            .into()
        })
    }

    /// `general.alignment` (default 32), checked to be a power of two when the file was opened.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Absolute byte offset of the tensor data section.
    pub fn data_offset(&self) -> usize {
        self.data_start
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// One tensor's info, by name.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Exactly `info.n_bytes` bytes of the tensor's data (bounds checked when the file was
    /// opened). An `info` that is not one of this file's gives an empty slice.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        match self.tensor_info(&info.name) {
            Some(own) if own.offset == info.offset && own.n_bytes == info.n_bytes => {
                &self.bytes[own.offset..own.offset + own.n_bytes]
            }
            _ => &[],
        }
    }

    /// [`Self::tensor_bytes`] as a byte range of a buffer shared by reference count (the memory
    /// map stays alive while anything holds it), for matrices read in place.
    pub fn shared_tensor_bytes(
        &self,
        info: &GgufTensorInfo,
    ) -> (mamba2_ops::SharedBytes, std::ops::Range<usize>) {
        let range = match self.tensor_info(&info.name) {
            Some(own) if own.offset == info.offset && own.n_bytes == info.n_bytes => {
                own.offset..own.offset + own.n_bytes
            }
            _ => 0..0,
        };
        (self.bytes.clone(), range)
    }

    /// The Candle type of a tensor this engine can compute with, else
    /// [`GgufError::UnsupportedTensorType`] naming the tensor and its type.
    pub fn check_supported(&self, info: &GgufTensorInfo) -> Result<GgmlDType> {
        info.ty.to_candle().ok_or_else(|| {
            GgufError::UnsupportedTensorType {
                path: self.name(),
                tensor: info.name.clone(),
                ty_name: info.ty.name(),
            }
            .into()
        })
    }
}
