//! What can be wrong with a GGUF file or with the tokenizer described by its metadata. Every
//! variant names the file (its path, or the name given to [`GgufFile::from_bytes`]) and the
//! key, tensor or byte offset at fault.
//!
//! [`GgufFile::from_bytes`]: super::GgufFile::from_bytes

/// Errors from reading a GGUF file ([`super::GgufFile`]) and building its tokenizer
/// ([`super::tokenizer_from_gguf`]). Wrapped in [`crate::Error::Gguf`].
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file does not start with the bytes `GGUF`.
    #[error("{path}: not a GGUF file (starts with {found:02x?}, expected the magic \"GGUF\")")]
    BadMagic { path: String, found: Vec<u8> },
    /// A GGUF version other than 2 or 3 (1 has 32-bit counts; a byte-swapped 3 means a
    /// big-endian file).
    #[error("{path}: GGUF version {version} is not supported (only versions 2 and 3{hint})")]
    UnsupportedVersion {
        path: String,
        version: u32,
        hint: &'static str,
    },
    /// The file ends (or a declared length runs past its end) while reading `what`.
    #[error("{path}: truncated: {what} at byte offset {offset} needs {needed} bytes, only {available} left")]
    Truncated {
        path: String,
        what: String,
        offset: usize,
        needed: u64,
        available: usize,
    },
    /// A string (key, value, tensor name) that is not UTF-8.
    #[error("{path}: {what} at byte offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        path: String,
        what: String,
        offset: usize,
    },
    /// A metadata value type id outside the GGUF specification (0..=12).
    #[error("{path}: metadata `{key}` has unknown value type {type_id}")]
    UnknownValueType {
        path: String,
        key: String,
        type_id: u32,
    },
    /// A metadata value present with another type than the one asked for.
    #[error("{path}: metadata `{key}` is {got}, expected {expected}")]
    MetadataType {
        path: String,
        key: String,
        expected: String,
        got: String,
    },
    /// A metadata key that must be present is not.
    #[error("{path}: required metadata key `{key}` is missing")]
    MissingKey { path: String, key: String },
    /// Arrays of arrays nested deeper than the reader allows.
    #[error("{path}: metadata `{key}` nests arrays deeper than {max} levels")]
    NestingTooDeep {
        path: String,
        key: String,
        max: usize,
    },
    /// More metadata values than the reader holds in memory (see `MAX_METADATA_VALUES`).
    #[error("{path}: metadata `{key}` brings the file past {max} metadata values")]
    TooManyValues {
        path: String,
        key: String,
        max: usize,
    },
    /// The same metadata key or tensor name twice.
    #[error("{path}: duplicate {what} `{name}`")]
    Duplicate {
        path: String,
        what: &'static str,
        name: String,
    },
    /// A tensor with more dimensions than GGML has (4).
    #[error("{path}: tensor `{tensor}` has {n_dims} dimensions, GGUF allows at most {max}")]
    TooManyDims {
        path: String,
        tensor: String,
        n_dims: u32,
        max: usize,
    },
    /// A tensor whose element count is zero or does not fit in memory sizes.
    #[error("{path}: tensor `{tensor}` has dimensions {dims:?} (ggml order): {reason}")]
    BadShape {
        path: String,
        tensor: String,
        dims: Vec<u64>,
        reason: &'static str,
    },
    /// A quantized tensor whose rows do not split into whole blocks.
    #[error("{path}: tensor `{tensor}` of type {ty_name} has rows of {row_len} elements, not a multiple of its block size {block_size}")]
    RowNotBlockMultiple {
        path: String,
        tensor: String,
        ty_name: String,
        row_len: u64,
        block_size: usize,
    },
    /// A tensor whose bytes are not all inside the file.
    #[error("{path}: tensor `{tensor}` data (bytes {start}..{end}) lies outside the file ({file_len} bytes)")]
    DataOutOfBounds {
        path: String,
        tensor: String,
        start: u64,
        end: u64,
        file_len: usize,
    },
    /// A tensor offset that is not a multiple of the file's alignment.
    #[error("{path}: tensor `{tensor}` starts at data offset {offset}, not a multiple of the alignment {alignment}")]
    Misaligned {
        path: String,
        tensor: String,
        offset: u64,
        alignment: usize,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("{path}: general.alignment is {alignment}, which is not a power of two")]
    BadAlignment { path: String, alignment: u64 },
    /// A tensor whose GGML type this engine cannot compute with (IQ*, TQ*, MXFP4, integer types,
    /// an unknown type id). The file still opens; this is reported when the tensor is used.
    #[error("{path}: tensor `{tensor}` has type {ty_name}, which this engine cannot compute with (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, Q8_K)")]
    UnsupportedTensorType {
        path: String,
        tensor: String,
        ty_name: String,
    },
    /// `tokenizer.ggml.model` names a tokenizer kind this engine does not build.
    #[error("{path}: tokenizer.ggml.model `{model}` is not supported (supported: gpt2, llama)")]
    UnsupportedTokenizer { path: String, model: String },
    /// `tokenizer.ggml.pre` names a pre-tokenizer this engine does not know.
    #[error("{path}: tokenizer.ggml.pre `{pre}` is not supported (supported: {supported})")]
    UnsupportedPreTokenizer {
        path: String,
        pre: String,
        supported: String,
    },
    /// Per-token arrays of different lengths (`tokens` vs `token_type` vs `scores`).
    #[error("{path}: metadata `{key}` has {len} entries but tokenizer.ggml.tokens has {expected}")]
    TokenArrayLength {
        path: String,
        key: String,
        len: usize,
        expected: usize,
    },
    /// A special token id (BOS, EOS, ...) that is not a token of the vocabulary.
    #[error("{path}: metadata `{key}` is token id {id}, outside the vocabulary of {vocab} tokens")]
    TokenIdOutOfRange {
        path: String,
        key: String,
        id: u64,
        vocab: usize,
    },
    /// A BPE merge that is not two vocabulary tokens separated by a space.
    #[error("{path}: tokenizer.ggml.merges[{index}] `{merge}`: {reason}")]
    BadMerge {
        path: String,
        index: usize,
        merge: String,
        reason: String,
    },
    /// The `tokenizers` library refused the vocabulary built from the metadata.
    #[error("{path}: cannot build the tokenizer: {message}")]
    TokenizerBuild { path: String, message: String },
}
