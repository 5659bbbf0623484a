//! Writing GGUF files that llama.cpp reads: a pure Mamba-2 checkpoint (safetensors or
//! `pytorch_model.bin`, HF or mamba_ssm layout) with its tokenizer, in f32, f16, bf16 or one of
//! the ggml block formats, laid out as llama.cpp's `convert_hf_to_gguf.py` + `llama-quantize`
//! would lay it out.
//!
//! **Tensors** carry llama.cpp's names ([`crate::model::gguf_name`], the mapping the GGUF
//! loader reads with) and layouts: `ssm_a` = `-exp(A_log)` as `(nheads, 1)`, `ssm_d` as
//! `(nheads, 1)`, `ssm_conv1d.weight` squeezed to `(conv_dim, d_conv)`, `ssm_norm.weight` as
//! `(ngroups, d_inner / ngroups)`, `dt_bias` as `ssm_dt.bias`; a tied model has no
//! `output.weight`. Only the weight matrices (`token_embd`, `ssm_in`, `ssm_out`, `output`) take
//! the requested type; norms, conv, A, D, dt and biases stay F32, as both of llama.cpp's tools
//! keep them.
//!
//! **Rows that are not whole blocks** fall back exactly as `llama-quantize` does
//! (`tensor_type_fallback` in `src/llama-quant.cpp`): Q2_K and Q3_K to Q4_0, Q4_K to Q5_0, Q5_K to
//! Q5_1, Q6_K to Q8_0, a 32-block type stays; then, if the row is still not a whole number of
//! blocks, F16 (see [`matrix_type`]). Every matrix gets the requested type otherwise, which is
//! what `llama-quantize --pure` writes (without `--pure` it would also move the output / tied
//! embedding to Q6_K for the K types).
//!
//! **Blocks** come from Candle's `QTensor::quantize`, the reference (no importance matrix)
//! algorithms of ggml, so a tensor's bytes equal `llama-quantize`'s for the same f32 input.
//!
//! **Metadata** is the key set the converter writes for `mamba2` (architecture, type, name, size
//! label, the `mamba2.*` sizes, `general.file_type` in llama.cpp's `LLAMA_FTYPE` numbering,
//! `general.quantization_version` 2) and, from a byte-level BPE `tokenizer.json`, the
//! `tokenizer.ggml.*` vocabulary: tokens by id padded with `[PAD{i}]` (type UNUSED) up to the
//! embedding rows, token types (normal; control for special added tokens and ones that look
//! special; user-defined for other added tokens), merges, `pre` (the pre-tokenizer llama.cpp
//! must apply, from the tokenizer's normalizer and pre-tokenizer: see [`PRE_TOKENIZERS`]), the
//! BOS / EOS / padding ids and `add_bos_token` / `add_eos_token` false. Before a vocabulary is
//! written it is read back with [`crate::gguf::tokenizer_from_gguf`] and must give the source
//! tokenizer's ids on a set of check strings.
//!
//! The file is GGUF v3, little-endian, 32-byte aligned (llama.cpp's default, so no
//! `general.alignment` key), written to `OUT.part` and renamed when complete.
//!
//! ```no_run
//! use candle_core::{quantized::GgmlDType, Device};
//! use mamba2::gguf_export::{write_gguf, GgufExportOptions};
//! use mamba2::{hub::load_tokenizer, weights::Weights, Mamba2Config};
//! let dir = std::path::Path::new("models/mamba2-tiny");
//! let config = Mamba2Config::from_file(&dir.join("config.json"))?;
//! let weights = Weights::from_dir(dir, &Device::Cpu)?;
//! let tokenizer = load_tokenizer(&dir.join("tokenizer.json"))?;
//! let opts = GgufExportOptions::new(GgmlDType::Q8_0, "mamba2-tiny");
//! let summary = write_gguf(&config, &weights, Some(&tokenizer), "tiny-q8_0.gguf".as_ref(), &opts)?;
//! println!("{} tensors, {} bytes", summary.tensors.len(), summary.file_bytes);
//! # Ok::<(), mamba2::Error>(())
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::config::{Family, Mamba2Config};
use crate::gguf::{tokenizer_from_gguf, GgufFile, GgufType, GgufValue};
use crate::model::{gguf_name, GgufTransform};
use crate::weights::Weights;
use crate::{Error, Result};

/// The GGUF version written.
pub const GGUF_VERSION: u32 = 3;
/// Alignment of the tensor data (llama.cpp's default; no `general.alignment` key is written).
pub const GGUF_ALIGNMENT: usize = 32;
/// `mamba2.context_length`: the converter's arbitrary 2^20 (a recurrent model has no limit).
const CONTEXT_LENGTH: u32 = 1 << 20;
/// `general.quantization_version` (ggml's `GGML_QNT_VERSION`).
const QUANTIZATION_VERSION: u32 = 2;

/// The `--type` names [`parse_export_type`] accepts, in llama.cpp's spelling (lower case).
pub const EXPORT_TYPES: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k",
    "q6_k",
];

/// The `tokenizer.ggml.pre` names written, each for the HF normalizer + pre-tokenizer (+ BPE
/// `ignore_merges`) that llama.cpp's pre-tokenizer of that name reproduces:
///
/// | name | `tokenizer.json` |
/// | --- | --- |
/// | `gpt-2` | no normalizer; `ByteLevel` with the GPT-2 regex, no prefix space |
/// | `mpt` | NFC; `ByteLevel` with the GPT-2 regex (GPT-NeoX-20B, the Mamba checkpoints' tokenizer) |
/// | `llama-bpe` | no normalizer; `Split` on Llama-3's regex, `ByteLevel` without regex; `ignore_merges` |
/// | `qwen2` | NFC; `Split` on Qwen2's regex, `ByteLevel` without regex |
/// | `starcoder` | no normalizer; single `Digits`, `ByteLevel` with the GPT-2 regex |
///
/// Any other tokenizer is refused with an error naming what did not match.
pub const PRE_TOKENIZERS: &[&str] = &["gpt-2", "mpt", "llama-bpe", "qwen2", "starcoder"];

/// Llama-3's split regex, as its `tokenizer.json` writes it.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama-3's with one digit per piece.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Strings the written vocabulary must tokenize as the source tokenizer does (whitespace runs,
/// digit runs, contractions, punctuation, accents composed and decomposed, several scripts,
/// emoji); the added tokens are checked too.
const CHECK_TEXTS: &[&str] = &[
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "\n \n\n \t\t \t\n  \n   \n    x     y",
    "3 33 333 3333 33333 3.14159 1,000,000 0x1F",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D we'Ve a'lL",
    "------======= \"\"\"\"......!!!!!!?????? ```code``` (a) [b] {c} <d>",
    "caf\u{e9} cafe\u{301} na\u{ef}ve \u{c5}ngstr\u{f6}m \u{2126}",
    "\u{43d}\u{435}\u{449}\u{43e} \u{43d}\u{430} \u{431}\u{44a}\u{43b}\u{433}\u{430}\u{440}\u{441}\u{43a}\u{438} \u{6211}\u{60f3}\u{5728}apple\u{5de5}\u{4f5c}1314151\u{5929}\u{ff5e}",
    "\u{1f680} (normal) \u{1f636}\u{200d}\u{1f32b}\u{fe0f} \u{2705} \u{1f999}\u{1f999}",
];

/// llama.cpp's `llama_token_type` values written in `tokenizer.ggml.token_type`.
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
}

/// Parses an export type: `f32`, `f16`, `bf16` or a block format in llama.cpp's spelling
/// (`q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q2_k`, `q3_k`, `q4_k`, `q5_k`, `q6_k`),
/// case-insensitive. Anything else is [`Error::Dtype`] listing the accepted names.
///
/// ```
/// use candle_core::quantized::GgmlDType;
/// use mamba2::gguf_export::parse_export_type;
/// assert_eq!(parse_export_type("Q4_K")?, GgmlDType::Q4K);
/// assert_eq!(parse_export_type("bf16")?, GgmlDType::BF16);
/// assert!(parse_export_type("q4_k_m").is_err());
/// # Ok::<(), mamba2::Error>(())
/// ```
pub fn parse_export_type(s: &str) -> Result<GgmlDType> {
    let unknown = || {
        Error::Dtype(format!(
            "unknown GGUF type `{s}`: use one of {}",
            EXPORT_TYPES.join(", ")
        ))
    };
    match s.to_ascii_lowercase().as_str() {
        "f32" => Ok(GgmlDType::F32),
        "f16" => Ok(GgmlDType::F16),
        "bf16" => Ok(GgmlDType::BF16),
        other => crate::device::parse_quant_type(other).map_err(|_| unknown()),
    }
}

/// `general.file_type` for a file whose matrices are `ty`: llama.cpp's `LLAMA_FTYPE` numbers
/// (`ALL_F32` 0, `MOSTLY_F16` 1, `MOSTLY_BF16` 32, `MOSTLY_Q8_0` 7, ...). The K types take the
/// `_S` mixes (Q3_K_S 11, Q4_K_S 14, Q5_K_S 16), whose default type they are: with `--pure`,
/// `llama-quantize` writes every matrix in that type as this writer does.
pub fn llama_file_type(ty: GgmlDType) -> Result<u32> {
    Ok(match ty {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 14,
        GgmlDType::Q5K => 16,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        other => {
            return Err(Error::Dtype(format!(
                "{other:?} is not a GGUF export type: use one of {}",
                EXPORT_TYPES.join(", ")
            )))
        }
    })
}

/// The type a weight matrix with rows of `row_len` values gets when `ty` is asked for:
/// `ty` when the row is a whole number of its blocks, else `llama-quantize`'s fallback (Q2_K and
/// Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, 32-block types unchanged), and F16 when
/// the row is not a whole number of the fallback's blocks either.
///
/// ```
/// use candle_core::quantized::GgmlDType as T;
/// use mamba2::gguf_export::matrix_type;
/// assert_eq!(matrix_type(T::Q4K, 512), T::Q4K);
/// assert_eq!(matrix_type(T::Q4K, 96), T::Q5_0); // 96 = 3 x 32
/// assert_eq!(matrix_type(T::Q8_0, 48), T::F16);
/// assert_eq!(matrix_type(T::F32, 7), T::F32);
/// ```
pub fn matrix_type(ty: GgmlDType, row_len: usize) -> GgmlDType {
    if row_len.is_multiple_of(ty.block_size()) {
        return ty;
    }
    let fallback = match ty {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if row_len.is_multiple_of(fallback.block_size()) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// The GGML type id of a Candle type (the reader's table, so both agree).
fn ggml_type_id(ty: GgmlDType) -> Result<u32> {
    (0..64)
        .find(|&id| GgufType::from_id(id).to_candle() == Some(ty))
        .ok_or_else(|| Error::Dtype(format!("{ty:?} has no GGUF type id")))
}

/// llama.cpp's name of a Candle type (`Q4_K`, `F32`, ...).
pub fn ggml_type_name(ty: GgmlDType) -> String {
    ggml_type_id(ty)
        .map(|id| GgufType::from_id(id).name())
        .unwrap_or_else(|_| format!("{ty:?}"))
}

/// What to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufExportOptions {
    /// Type of the weight matrices (`token_embd`, `ssm_in`, `ssm_out`, `output`): F32, F16,
    /// BF16 or a block format (see [`parse_export_type`]); everything else is F32.
    pub ty: GgmlDType,
    /// `general.name`.
    pub name: String,
    /// `tokenizer.ggml.bos_token_id`; `None`: the config's.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`; `None`: the config's first EOS id (callers with a
    /// `generation_config.json` pass its first `eos_token_id` here).
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`; `None`: the config's.
    pub pad_token_id: Option<u32>,
}

impl GgufExportOptions {
    /// Matrices in `ty`, `general.name` = `name`, special ids from the config.
    pub fn new(ty: GgmlDType, name: impl Into<String>) -> Self {
        Self {
            ty,
            name: name.into(),
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
        }
    }
}

/// One tensor as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedTensor {
    /// llama.cpp's name (`blk.0.ssm_in.weight`).
    pub name: String,
    /// Torch/Candle order (`[rows, row_len]`); the file holds the reverse (GGML `ne`).
    pub shape: Vec<usize>,
    /// The type written.
    pub ty: GgmlDType,
    /// The type asked for, when the row length made [`matrix_type`] fall back from it.
    pub fallback_from: Option<GgmlDType>,
    /// Bytes of data (before the alignment padding).
    pub bytes: usize,
}

/// The vocabulary written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedVocab {
    /// `tokenizer.ggml.model`.
    pub model: String,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    /// Entries of `tokenizer.ggml.tokens` (= the embedding rows).
    pub tokens: usize,
    /// Of those, `[PAD{i}]` rows with no token of the tokenizer.
    pub padding: usize,
    /// Entries of `tokenizer.ggml.merges`.
    pub merges: usize,
}

/// What [`write_gguf`] / [`requantize_gguf`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufExportSummary {
    /// The file written.
    pub path: PathBuf,
    /// Its size.
    pub file_bytes: u64,
    /// `general.file_type`.
    pub file_type: u32,
    /// Every tensor, in file order.
    pub tensors: Vec<ExportedTensor>,
    /// Number of metadata keys.
    pub metadata_keys: usize,
    /// The embedded vocabulary, if any.
    pub vocab: Option<ExportedVocab>,
    /// Things about the model that llama.cpp will not reproduce (or refuse), and skipped keys.
    pub warnings: Vec<String>,
}

/// One tensor to write: where it comes from and how it is stored.
#[derive(Debug, Clone)]
struct Planned {
    /// Canonical HF name.
    canonical: String,
    /// Shape under the canonical name.
    source_shape: Vec<usize>,
    /// llama.cpp's name, and how its values differ from the canonical ones.
    name: String,
    transform: GgufTransform,
    /// Shape in the file (torch order).
    shape: Vec<usize>,
    ty: GgmlDType,
    fallback_from: Option<GgmlDType>,
    bytes: usize,
}

/// Whether this writer exports a model of `config`'s family: pure Mamba-2 only for now, the
/// hybrids are [`Error::Unsupported`] (callers check before loading anything else).
pub fn check_exportable(config: &Mamba2Config) -> Result<()> {
    if config.family != Family::Mamba2 {
        return Err(Error::Unsupported(format!(
            "GGUF export of {} models: only pure Mamba-2 (model_type mamba2) checkpoints can be \
             exported for now",
            config.family.model_type()
        )));
    }
    Ok(())
}

/// The file's shape of a canonical tensor (see the module doc).
fn gguf_shape(c: &Mamba2Config, canonical: &str, source: &[usize]) -> Vec<usize> {
    let leaf = canonical.rsplit_once(".mixer.").map(|(_, l)| l);
    match leaf {
        Some("A_log" | "D") => vec![c.nheads, 1],
        Some("conv1d.weight") => vec![c.conv_dim(), c.d_conv],
        Some("norm.weight") => vec![c.ngroups, c.d_inner / c.ngroups.max(1)],
        _ => source.to_vec(),
    }
}

/// Whether a canonical tensor is one of the weight matrices that take the export type.
fn is_matrix(c: &Mamba2Config, canonical: &str) -> bool {
    canonical == c.embedding_name(c.default_root())
        || canonical == "lm_head.weight"
        || canonical.ends_with(".mixer.in_proj.weight")
        || canonical.ends_with(".mixer.out_proj.weight")
}

/// Bytes of `elems` values in `ty` (whole blocks, checked by the caller).
fn data_bytes(ty: GgmlDType, elems: usize) -> usize {
    elems / ty.block_size() * ty.type_size()
}

/// Every tensor of the file, in the converter's order: the embedding, each layer's tensors
/// (alphabetical by HF name, as the converter meets them in a safetensors file), the final
/// norm, the LM head.
fn plan(c: &Mamba2Config, rows: usize, ty: GgmlDType) -> Result<Vec<Planned>> {
    let root = c.default_root();
    let emb = c.embedding_name(root);
    let layer_of = |name: &str| -> Option<usize> {
        name.strip_prefix(&format!("{root}.layers."))?
            .split('.')
            .next()?
            .parse()
            .ok()
    };
    let mut shapes = c.tensor_shapes(rows);
    shapes.sort_by_key(|(name, _)| {
        let group = if *name == emb {
            (0, 0)
        } else if let Some(l) = layer_of(name) {
            (1, l)
        } else if name == "lm_head.weight" {
            (3, 0)
        } else {
            (2, 0)
        };
        (group, name.clone())
    });
    shapes
        .into_iter()
        .map(|(canonical, source_shape)| {
            let (name, transform) = gguf_name(&canonical).ok_or_else(|| {
                Error::Unsupported(format!("GGUF export: no llama.cpp name for `{canonical}`"))
            })?;
            let shape = gguf_shape(c, &canonical, &source_shape);
            let (ty, fallback_from) = if is_matrix(c, &canonical) {
                let row_len = *shape.last().unwrap_or(&1);
                let t = matrix_type(ty, row_len);
                (t, (t != ty).then_some(ty))
            } else {
                (GgmlDType::F32, None)
            };
            let bytes = data_bytes(ty, shape.iter().product());
            Ok(Planned {
                canonical,
                source_shape,
                name,
                transform,
                shape,
                ty,
                fallback_from,
                bytes,
            })
        })
        .collect()
}

/// llama.cpp's `size_label` (gguf-py `model_weight_count_rounded_notation`, 2 digits at least).
fn size_label(params: usize) -> String {
    let n = params as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    let rounded = scaled.round_ties_even() as u64;
    let digits = if rounded == 0 {
        0
    } else {
        rounded.to_string().len()
    };
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

fn u32_of(key: &str, v: usize) -> Result<GgufValue> {
    u32::try_from(v)
        .map(GgufValue::U32)
        .map_err(|_| Error::field(key, format!("{v} does not fit in a GGUF u32")))
}

type Metadata = Vec<(String, GgufValue)>;

/// The model keys, in the converter's order.
fn model_metadata(c: &Mamba2Config, name: &str, file_type: u32, params: usize) -> Result<Metadata> {
    let s = |v: &str| GgufValue::String(v.to_string());
    let mut m: Metadata = vec![
        ("general.architecture".into(), s("mamba2")),
        ("general.type".into(), s("model")),
        ("general.name".into(), s(name)),
        ("general.size_label".into(), s(&size_label(params))),
        (
            "mamba2.context_length".into(),
            GgufValue::U32(CONTEXT_LENGTH),
        ),
    ];
    for (key, v) in [
        ("embedding_length", c.d_model),
        ("feed_forward_length", 0),
        ("attention.head_count", 0),
        ("block_count", c.n_layer),
        ("ssm.conv_kernel", c.d_conv),
        ("ssm.inner_size", c.d_inner),
        ("ssm.state_size", c.d_state),
        ("ssm.time_step_rank", c.nheads),
        ("ssm.group_count", c.ngroups),
    ] {
        let key = format!("mamba2.{key}");
        let value = u32_of(&key, v)?;
        m.push((key, value));
    }
    m.push((
        "mamba2.attention.layer_norm_rms_epsilon".into(),
        GgufValue::F32(c.norm_eps as f32),
    ));
    m.push(("general.file_type".into(), GgufValue::U32(file_type)));
    m.push((
        "general.quantization_version".into(),
        GgufValue::U32(QUANTIZATION_VERSION),
    ));
    Ok(m)
}

/// What llama.cpp's `mamba2` graph will not reproduce about this model.
fn llama_cpp_warnings(c: &Mamba2Config) -> Vec<String> {
    let mut w = Vec::new();
    if c.bias || c.out_proj_bias {
        w.push(
            "the model has in_proj/out_proj biases (ssm_in.bias / ssm_out.bias): llama.cpp's \
             mamba2 graph has none and will refuse the file (this engine reads it)"
                .to_string(),
        );
    }
    if !c.conv_bias {
        w.push(
            "the model has no conv1d bias: llama.cpp requires blk.N.ssm_conv1d.bias and will \
             refuse the file (this engine reads it)"
                .to_string(),
        );
    }
    if c.dt_limit != (0.0, f64::INFINITY) {
        w.push(format!(
            "time_step_limit {:?} is not stored in GGUF (as llama.cpp's converter drops it): \
             llama.cpp and this engine run the file with (0, inf)",
            c.dt_limit
        ));
    }
    if c.norm_before_gate {
        w.push(
            "norm_before_gate is true: llama.cpp computes norm(y * silu(z)) (gate first)".into(),
        );
    }
    w
}

mod encode;
mod vocab;
use encode::{summary, write_file, write_header};
use vocab::{vocab_metadata, SpecialIds};

/// Writes `config` + `weights` (+ `tokenizer`) as a GGUF file at `out` (see the module doc).
///
/// `tokenizer` must be a byte-level BPE with a pre-tokenizer of [`PRE_TOKENIZERS`] and at most as
/// many ids as the embedding has rows; `None` writes no vocabulary (such a file loads here with
/// a separate tokenizer, but llama.cpp needs one). Hybrid families are
/// [`Error::Unsupported`]. Every tensor is checked against the config before anything is
/// written.
pub fn write_gguf(
    config: &Mamba2Config,
    weights: &Weights,
    tokenizer: Option<&Tokenizer>,
    out: &Path,
    opts: &GgufExportOptions,
) -> Result<GgufExportSummary> {
    check_exportable(config)?;
    config.validate()?;
    let file_type = llama_file_type(opts.ty)?;
    let emb = config.embedding_name(config.default_root());
    let rows = match weights.shape(&emb) {
        Some(s) if s.len() == 2 && s[1] == config.d_model && s[0] >= config.vocab_size => s[0],
        Some(s) => {
            return Err(Error::TensorShape {
                name: emb,
                expected: vec![config.padded_vocab_size(), config.d_model],
                got: s,
            })
        }
        None => {
            return Err(Error::MissingTensor {
                name: emb,
                source_desc: describe(weights),
            })
        }
    };
    let tensors = plan(config, rows, opts.ty)?;
    for t in &tensors {
        match weights.shape(&t.canonical) {
            Some(s) if s == t.source_shape => {}
            Some(s) => {
                return Err(Error::TensorShape {
                    name: t.canonical.clone(),
                    expected: t.source_shape.clone(),
                    got: s,
                })
            }
            None => {
                return Err(Error::MissingTensor {
                    name: t.canonical.clone(),
                    source_desc: describe(weights),
                })
            }
        }
    }
    let mut warnings = llama_cpp_warnings(config);
    let params = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let mut metadata = model_metadata(config, &opts.name, file_type, params)?;
    let vocab = match tokenizer {
        Some(tok) => {
            let special = SpecialIds::resolve(config, opts);
            let (kv, v) = vocab_metadata(tok, rows, &special, &mut warnings)?;
            metadata.extend(kv);
            Some(v)
        }
        None => {
            warnings.push("no tokenizer embedded: llama.cpp cannot load the file".into());
            None
        }
    };
    let fetch = |t: &Planned| -> Result<Tensor> {
        let x = weights
            .tensor(&t.canonical, &t.source_shape, DType::F32)?
            .to_device(&Device::Cpu)?;
        let x = match t.transform {
            GgufTransform::Reshape => x,
            GgufTransform::NegLog => x.exp()?.neg()?,
        };
        Ok(x.reshape(t.shape.as_slice())?)
    };
    let file_bytes = write_file(out, &metadata, &tensors, &fetch)?;
    Ok(summary(
        out,
        file_bytes,
        file_type,
        &tensors,
        metadata.len(),
        vocab,
        warnings,
    ))
}

fn describe(weights: &Weights) -> String {
    let files: Vec<String> = weights
        .files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    files.join(", ")
}

/// A GGUF tensor's values as f32 on the CPU, in the file's shape.
fn dequantized(file: &GgufFile, name: &str) -> Result<Tensor> {
    let info = file.tensor_info(name).ok_or_else(|| Error::MissingTensor {
        name: name.to_string(),
        source_desc: file.path().display().to_string(),
    })?;
    let ty = file.check_supported(info)?;
    let bytes = file.tensor_bytes(info);
    // Candle reads the bytes as blocks of 2- and 4-byte fields: copy them to an 8-byte
    // aligned buffer first.
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `words` holds at least `bytes.len()` bytes; any byte pattern is a valid u64.
    let data =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, bytes.len()) };
    data.copy_from_slice(bytes);
    let storage = QStorage::from_data(Cow::Borrowed(data), &Device::Cpu, ty)?;
    Ok(QTensor::new(storage, info.shape())?.dequantize(&Device::Cpu)?)
}

/// Re-writes a `mamba2` GGUF file with its matrices in `opts.ty` (from its f32 / f16 / bf16
/// values, or from its blocks dequantized, which compounds the rounding: a warning says so).
/// The tensors keep their values and layout otherwise; the metadata is written afresh as
/// [`write_gguf`] writes it, with the `tokenizer.*` keys copied (special ids replaced where
/// `opts` gives them) and `general.name` = `opts.name`.
pub fn requantize_gguf(
    input: &GgufFile,
    out: &Path,
    opts: &GgufExportOptions,
) -> Result<GgufExportSummary> {
    let config = Mamba2Config::from_gguf(input)?;
    check_exportable(&config)?;
    let file_type = llama_file_type(opts.ty)?;
    let tensors = plan(&config, config.vocab_size, opts.ty)?;
    let mut warnings = llama_cpp_warnings(&config);
    warnings.retain(|w| !w.starts_with("time_step_limit"));
    let mut requantized: std::collections::BTreeMap<String, usize> = Default::default();
    for t in &tensors {
        let info = input
            .tensor_info(&t.name)
            .ok_or_else(|| Error::MissingTensor {
                name: t.name.clone(),
                source_desc: input.path().display().to_string(),
            })?;
        if info.elem_count() != t.shape.iter().product::<usize>() {
            return Err(Error::TensorShape {
                name: t.name.clone(),
                expected: t.shape.clone(),
                got: info.shape(),
            });
        }
        let source_ty = input.check_supported(info)?;
        if !matches!(source_ty, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            *requantized.entry(ggml_type_name(source_ty)).or_default() += 1;
        }
    }
    if !requantized.is_empty() {
        let from: Vec<String> = requantized
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        warnings.push(format!(
            "re-quantizing matrices stored in blocks ({}): their rounding adds to the new one",
            from.join(", ")
        ));
    }
    let params = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let mut metadata = model_metadata(&config, &opts.name, file_type, params)?;
    let overrides: HashMap<&str, Option<u32>> = [
        ("tokenizer.ggml.bos_token_id", opts.bos_token_id),
        ("tokenizer.ggml.eos_token_id", opts.eos_token_id),
        ("tokenizer.ggml.padding_token_id", opts.pad_token_id),
    ]
    .into_iter()
    .collect();
    for (key, value) in input.metadata() {
        if !key.starts_with("tokenizer.") {
            continue;
        }
        match overrides.get(key.as_str()) {
            Some(Some(id)) => metadata.push((key.clone(), GgufValue::U32(*id))),
            _ => metadata.push((key.clone(), value.clone())),
        }
    }
    for (key, id) in &overrides {
        if let (Some(id), false) = (id, input.metadata().contains_key(*key)) {
            metadata.push((key.to_string(), GgufValue::U32(*id)));
        }
    }
    let vocab = match (
        input.get_str("tokenizer.ggml.model")?,
        input.get_array("tokenizer.ggml.tokens")?,
    ) {
        (Some(model), Some(tokens)) => Some(ExportedVocab {
            model: model.to_string(),
            pre: input
                .get_str("tokenizer.ggml.pre")?
                .unwrap_or("default")
                .to_string(),
            tokens: tokens.len(),
            padding: tokens
                .iter()
                .filter(|t| t.as_str().is_some_and(|s| s.starts_with("[PAD")))
                .count(),
            merges: input
                .get_array("tokenizer.ggml.merges")?
                .map_or(0, |m| m.len()),
        }),
        _ => {
            warnings.push("the input has no vocabulary: llama.cpp cannot load the file".into());
            None
        }
    };
    let fetch = |t: &Planned| -> Result<Tensor> {
        Ok(dequantized(input, &t.name)?.reshape(t.shape.as_slice())?)
    };
    let file_bytes = write_file(out, &metadata, &tensors, &fetch)?;
    Ok(summary(
        out,
        file_bytes,
        file_type,
        &tensors,
        metadata.len(),
        vocab,
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_labels_match_gguf_py() {
        // Values from llama.cpp's converter on this repository's fixtures and bundled model.
        assert_eq!(size_label(26_040), "26K");
        assert_eq!(size_label(3_841_424), "3.8M");
        assert_eq!(size_label(128_989_632), "129M");
        assert_eq!(size_label(2_700_000_000), "2.7B");
        assert_eq!(size_label(500), "0.50K");
    }

    #[test]
    fn every_export_type_has_an_id_a_file_type_and_a_name() {
        for name in EXPORT_TYPES {
            let ty = parse_export_type(name).unwrap();
            assert!(ggml_type_id(ty).is_ok(), "{name}");
            assert!(llama_file_type(ty).is_ok(), "{name}");
            assert_eq!(ggml_type_name(ty).to_ascii_lowercase(), *name);
        }
        assert!(llama_file_type(GgmlDType::Q8K).is_err());
        assert_eq!(ggml_type_id(GgmlDType::BF16).unwrap(), 30);
        assert_eq!(ggml_type_id(GgmlDType::Q4K).unwrap(), 12);
    }

    #[test]
    fn fallbacks_follow_llama_quantize() {
        use GgmlDType as T;
        for (ty, row, want) in [
            (T::Q2K, 96, T::Q4_0),
            (T::Q3K, 96, T::Q4_0),
            (T::Q4K, 96, T::Q5_0),
            (T::Q5K, 96, T::Q5_1),
            (T::Q6K, 96, T::Q8_0),
            (T::Q6K, 48, T::F16),
            (T::Q4_0, 48, T::F16),
            (T::Q8_0, 64, T::Q8_0),
            (T::Q4K, 768, T::Q4K),
            (T::BF16, 3, T::BF16),
        ] {
            assert_eq!(matrix_type(ty, row), want, "{ty:?} {row}");
        }
    }
}
