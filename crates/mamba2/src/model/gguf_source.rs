//! Building a [`Mamba2Model`] from a GGUF file: llama.cpp's tensor names and layouts mapped to
//! the canonical HF names the builder asks for. Block-quantized matrices stay in their blocks
//! (read straight from the memory-mapped file into Candle's quantized storage); everything else
//! is dequantized to f32 and converted like a safetensors tensor.
//!
//! llama.cpp's `mamba2` layouts that differ from HF's (see `convert_hf_to_gguf.py`):
//! `ssm_a` holds `A = -exp(A_log)` as `(nheads, 1)`; `ssm_d` is `(nheads, 1)`; `ssm_conv1d` is
//! the squeezed `(conv_dim, d_conv)`; `ssm_norm` is `(ngroups, d_inner / ngroups)`; `dt_bias` is
//! `ssm_dt.bias`; a tied head has no `output.weight`. The hybrid families (`granitehybrid`,
//! `nemotron_h`) use the same Mamba-2 layouts plus the attention and MLP names of
//! `gguf_names.rs`, where one canonical tensor may be several GGUF tensors stacked by rows
//! (Granite's `input_linear` = `ffn_gate` | `ffn_up`), joined per expert (its experts'
//! `input_linear` = `ffn_gate_exps` | `ffn_up_exps`) or rows to reorder (q and k).
//!
//! Expert tensors are 3-D `(experts, rows, cols)` and must have exactly the canonical stacked
//! shape (a transposed stack has the right number of elements). Block-quantized expert stacks
//! stay in their blocks, one matrix per expert read in place from the memory map on the CPU
//! ([`TensorSource::quantized_experts`]); float ones are read like any tensor.

use super::build::TensorSource;
use super::matrix::Matrix;
use super::Mamba2Model;
use crate::config::{Family, Mamba2Config};
use crate::gguf::{GgufFile, GgufTensorInfo};
use crate::{Error, Result};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use mamba2_ops::QuantizedMatrix;
use std::borrow::Cow;

#[path = "gguf_names.rs"]
mod gguf_names;
use gguf_names::{locate_hybrid, Located};

/// How a GGUF tensor's values become the canonical tensor's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transform {
    /// Same values; the shape may differ only by unit axes or a regrouping (conv, norm, D).
    Reshape,
    /// `ssm_a` holds `A = -exp(A_log)`: the builder asks for `A_log = log(-A)`.
    NegLog,
}

/// llama.cpp's name for a Mamba-2 mixer tensor (`in_proj.weight`, `A_log`, ...), and how its
/// values differ; shared by every family with a Mamba-2 mixer.
pub(super) fn mamba_leaf(leaf: &str) -> Option<(&'static str, Transform)> {
    use Transform::*;
    Some(match leaf {
        "in_proj.weight" => ("ssm_in.weight", Reshape),
        "in_proj.bias" => ("ssm_in.bias", Reshape),
        "conv1d.weight" => ("ssm_conv1d.weight", Reshape),
        "conv1d.bias" => ("ssm_conv1d.bias", Reshape),
        "dt_bias" => ("ssm_dt.bias", Reshape),
        "A_log" => ("ssm_a", NegLog),
        "D" => ("ssm_d", Reshape),
        "norm.weight" => ("ssm_norm.weight", Reshape),
        "out_proj.weight" => ("ssm_out.weight", Reshape),
        "out_proj.bias" => ("ssm_out.bias", Reshape),
        _ => return None,
    })
}

/// llama.cpp's name for a canonical HF Mamba-2 tensor name, and how its values differ.
pub(crate) fn gguf_name(canonical: &str) -> Option<(String, Transform)> {
    use Transform::*;
    let fixed = match canonical {
        "backbone.embeddings.weight" => Some("token_embd.weight"),
        "lm_head.weight" => Some("output.weight"),
        "backbone.norm_f.weight" => Some("output_norm.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some((n.to_string(), Reshape));
    }
    let rest = canonical.strip_prefix("backbone.layers.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (name, t) = match leaf {
        "norm.weight" => ("attn_norm.weight", Reshape),
        _ => mamba_leaf(leaf.strip_prefix("mixer.")?)?,
    };
    Some((format!("blk.{layer}.{name}"), t))
}

/// The tensors of one GGUF file on one device, found by the canonical names of `config`'s
/// family.
pub(super) struct GgufSource<'a> {
    file: &'a GgufFile,
    config: &'a Mamba2Config,
    device: Device,
}

/// One GGUF tensor the builder reads, and how.
struct Part<'a> {
    info: &'a GgufTensorInfo,
    transform: Transform,
    /// Rows to reorder from llama.cpp's RoPE layout, as `(rows, head_dim)`.
    unpermute: Option<(usize, usize)>,
}

/// An 8-byte aligned copy of `len` bytes: Candle reinterprets tensor bytes as blocks (2- or
/// 4-byte aligned fields), and a file whose alignment leaves a tensor off that boundary, or a
/// reordered copy, must not be misaligned.
fn aligned_buffer(len: usize) -> Vec<u64> {
    vec![0u64; len.div_ceil(8)]
}

fn bytes_of(words: &[u64], len: usize) -> &[u8] {
    // SAFETY: `words` holds at least `len` bytes (see `aligned_buffer`); u8 has no alignment or
    // validity requirement.
    unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, len) }
}

fn bytes_of_mut(words: &mut [u64], len: usize) -> &mut [u8] {
    // SAFETY: as in `bytes_of`, and `words` is borrowed mutably for the slice's lifetime.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, len) }
}

/// Copies `src`, `rows` rows of equal byte length in heads of `head_dim` rows, into `dst` in
/// HF's row order: HF row `half * head_dim/2 + i` of a head is llama.cpp's row `2i + half`.
fn unpermute_rows(src: &[u8], dst: &mut [u8], rows: usize, head_dim: usize) {
    let row = src.len() / rows;
    let half = head_dim / 2;
    for r in 0..rows {
        let (head, within) = (r / head_dim, r % head_dim);
        let g = head * head_dim + 2 * (within % half) + within / half;
        dst[r * row..(r + 1) * row].copy_from_slice(&src[g * row..(g + 1) * row]);
    }
}

impl<'a> GgufSource<'a> {
    fn missing(&self, canonical: &str, gguf: Option<&str>) -> Error {
        let source_desc = match gguf {
            Some(g) => format!("{} (GGUF tensor `{g}`)", self.describe()),
            None => self.describe(),
        };
        Error::MissingTensor {
            name: canonical.to_string(),
            source_desc,
        }
    }

    fn info(&self, canonical: &str, gguf: &str) -> Result<&'a GgufTensorInfo> {
        self.file
            .tensor_info(gguf)
            .ok_or_else(|| self.missing(canonical, Some(gguf)))
    }

    /// The GGUF tensors that hold `canonical`, in order, and the canonical axis they are
    /// joined along (0: rows; 1: rows within each expert).
    fn locate(&self, canonical: &str) -> Result<(Vec<Part<'a>>, usize)> {
        let located = match self.config.family {
            Family::Mamba2 => gguf_name(canonical).map(|(n, t)| Located::One(n, t)),
            _ => locate_hybrid(self.config, canonical, |n| {
                self.file.tensor_info(n).is_some()
            }),
        };
        let part = |name: &str, transform, unpermute| -> Result<Part<'a>> {
            Ok(Part {
                info: self.info(canonical, name)?,
                transform,
                unpermute,
            })
        };
        let all = |names: &[String]| -> Result<Vec<Part<'a>>> {
            names
                .iter()
                .map(|n| part(n, Transform::Reshape, None))
                .collect()
        };
        match located.ok_or_else(|| self.missing(canonical, None))? {
            Located::One(name, t) => Ok((vec![part(&name, t, None)?], 0)),
            Located::Unpermuted { name, head_dim } => {
                let p = part(&name, Transform::Reshape, None)?;
                let rows = p.info.shape().first().copied().unwrap_or(0);
                let p = Part {
                    unpermute: Some((rows, head_dim)),
                    ..p
                };
                Ok((vec![p], 0))
            }
            Located::Rows(names) => Ok((all(&names)?, 0)),
            Located::Experts(names) => Ok((all(&names)?, 1)),
        }
    }

    /// The tensor's blocks (rows in HF's order) as Candle quantized storage on `device`.
    fn qtensor(&self, part: &Part<'_>, ty: GgmlDType, device: &Device) -> Result<QTensor> {
        let info = part.info;
        let bytes = self.file.tensor_bytes(info);
        let mut words: Vec<u64>;
        let data: &[u8] = match part.unpermute {
            Some((rows, head_dim)) => {
                // Whole rows of whole blocks: a 1-D tensor (a bias) only in a 1-element type.
                let blocked_1d = info.dims.len() == 1 && ty.block_size() != 1;
                if rows == 0
                    || head_dim < 2
                    || !rows.is_multiple_of(head_dim)
                    || !bytes.len().is_multiple_of(rows)
                    || blocked_1d
                {
                    return Err(Error::Unsupported(format!(
                        "{}: tensor `{}` ({:?}, {}) cannot be read as heads of {head_dim} rows",
                        self.describe(),
                        info.name,
                        info.shape(),
                        info.ty.name()
                    )));
                }
                words = aligned_buffer(bytes.len());
                unpermute_rows(bytes, bytes_of_mut(&mut words, bytes.len()), rows, head_dim);
                bytes_of(&words, bytes.len())
            }
            None if (bytes.as_ptr() as usize).is_multiple_of(8) => bytes,
            None => {
                words = aligned_buffer(bytes.len());
                bytes_of_mut(&mut words, bytes.len()).copy_from_slice(bytes);
                bytes_of(&words, bytes.len())
            }
        };
        let storage = QStorage::from_data(Cow::Borrowed(data), device, ty)?;
        Ok(QTensor::new(storage, info.shape())?)
    }

    /// One part's values in f32 on the CPU, transformed, in the file's shape.
    fn values(&self, part: &Part<'_>) -> Result<Tensor> {
        let ty = self.file.check_supported(part.info)?;
        let values = self
            .qtensor(part, ty, &Device::Cpu)?
            .dequantize(&Device::Cpu)?; // f32
        Ok(match part.transform {
            Transform::Reshape => values,
            Transform::NegLog => values.neg()?.log()?,
        })
    }

    /// One part as a matrix: dense in `dtype` for F32/F16/BF16, else in its blocks.
    fn part_matrix(&self, part: &Part<'_>, dtype: DType) -> Result<Matrix> {
        match self.file.check_supported(part.info)? {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Ok(Matrix::Dense(
                self.values(part)?
                    .to_dtype(dtype)?
                    .to_device(&self.device)?,
            )),
            ty => {
                let q = self.qtensor(part, ty, &self.device)?;
                Ok(Matrix::Quantized(QuantizedMatrix::new(q)?))
            }
        }
    }
}

fn shape_err(name: &str, expected: &[usize], got: Vec<usize>) -> Error {
    Error::TensorShape {
        name: name.to_string(),
        expected: expected.to_vec(),
        got,
    }
}

/// The canonical shape of parts joined along `axis`: their sizes there summed, when they agree
/// on the rest.
fn stacked_shape(parts: &[Part<'_>], axis: usize) -> Option<Vec<usize>> {
    let mut shape = parts.first()?.info.shape();
    if axis >= shape.len() {
        return None;
    }
    for p in &parts[1..] {
        let s = p.info.shape();
        let others_agree =
            s.len() == shape.len() && (0..s.len()).all(|d| d == axis || s[d] == shape[d]);
        if !others_agree {
            return None;
        }
        shape[axis] += s[axis];
    }
    Some(shape)
}

/// The shape to report for parts that do not give the canonical shape: the stacked shape, or,
/// when the parts do not stack, the first part that disagrees with the first one.
fn reported_shape(parts: &[Part<'_>], axis: usize) -> Vec<usize> {
    stacked_shape(parts, axis).unwrap_or_else(|| {
        let first = parts[0].info.shape();
        let odd = parts[1..].iter().map(|p| p.info.shape()).find(|s| {
            s.len() != first.len() || (0..s.len()).any(|d| d != axis && s[d] != first[d])
        });
        odd.unwrap_or(first)
    })
}

impl TensorSource for GgufSource<'_> {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (parts, axis) = self.locate(name)?;
        let stacked = stacked_shape(&parts, axis);
        let n: usize = parts.iter().map(|p| p.info.elem_count()).sum();
        // Other tensors may differ from the canonical shape by unit axes or a regrouping (conv,
        // norm, D); expert stacks (3-D in the file, or joined per expert) must match exactly.
        let exact = axis > 0 || parts.iter().any(|p| p.info.dims.len() == 3);
        if n != shape.iter().product::<usize>() || (exact && stacked.as_deref() != Some(shape)) {
            return Err(shape_err(name, shape, reported_shape(&parts, axis)));
        }
        let values = match parts.as_slice() {
            [one] => self.values(one)?,
            _ if axis > 0 => {
                let values = parts
                    .iter()
                    .map(|p| self.values(p))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&values, axis)?
            }
            _ => {
                // Stacked rows: each part flattened to (rows, columns of the canonical shape).
                let cols: usize = shape[1..].iter().product();
                let rows = parts
                    .iter()
                    .map(|p| self.values(p)?.reshape(((), cols)).map_err(Error::from))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            }
        };
        Ok(values
            .reshape(shape)?
            .to_dtype(dtype)?
            .to_device(&self.device)?)
    }

    fn matrix(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Matrix> {
        let (parts, axis) = self.locate(name)?;
        if axis > 0 {
            return Ok(Matrix::Dense(self.tensor(name, shape, dtype)?));
        }
        if stacked_shape(&parts, axis).as_deref() != Some(shape) {
            return Err(shape_err(name, shape, reported_shape(&parts, axis)));
        }
        let matrices = parts
            .iter()
            .map(|p| self.part_matrix(p, dtype))
            .collect::<Result<Vec<_>>>()?;
        Matrix::cat_rows(matrices, dtype)
    }

    fn quantized_experts(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<Vec<Vec<QuantizedMatrix>>>> {
        let (parts, axis) = self.locate(name)?;
        let plain = |p: &Part<'_>| {
            p.info.dims.len() == 3 && p.transform == Transform::Reshape && p.unpermute.is_none()
        };
        // Experts come as one stack, or as stacks joined within each expert (axis 1).
        if shape.len() != 3 || !parts.iter().all(plain) || (parts.len() > 1 && axis != 1) {
            return Ok(None);
        }
        if stacked_shape(&parts, axis).as_deref() != Some(shape) {
            return Err(shape_err(name, shape, reported_shape(&parts, axis)));
        }
        // Float stacks too (as F32/F16/BF16 "blocks"): a file may quantize only some experts'
        // matrices (llama-quantize keeps rows that are not whole blocks in float).
        let types = parts
            .iter()
            .map(|p| self.file.check_supported(p.info))
            .collect::<Result<Vec<_>>>()?;
        let n_experts = shape[0];
        let mut experts = vec![Vec::with_capacity(parts.len()); n_experts];
        for (part, ty) in parts.iter().zip(types) {
            let [_, rows, cols] =
                <[usize; 3]>::try_from(part.info.shape()).map_err(|s| shape_err(name, shape, s))?;
            // On the CPU the blocks are read in place from the memory map: a decode step
            // touches only the chosen experts' pages. Other devices get a copy.
            let (owner, range) = self.file.shared_tensor_bytes(part.info);
            let per_expert = range.len() / n_experts;
            for (x, expert) in experts.iter_mut().enumerate() {
                let start = range.start + x * per_expert;
                let m = QuantizedMatrix::from_shared_bytes(
                    owner.clone(),
                    start..start + per_expert,
                    ty,
                    rows,
                    cols,
                )?;
                expert.push(if self.device.is_cpu() {
                    m
                } else {
                    m.to_device(&self.device)?
                });
            }
        }
        Ok(Some(experts))
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let (parts, axis) = self.locate(name).ok()?;
        stacked_shape(&parts, axis)
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn describe(&self) -> String {
        self.file.path().display().to_string()
    }
}

impl Mamba2Model {
    /// Builds the model a GGUF file describes (config from its metadata, see
    /// [`Mamba2Config::from_gguf`]): block-quantized matrices run quantized, the other tensors
    /// are converted to `dtype` (norms, conv, A, D and dt in f32 as always). The routed experts
    /// of a MoE model stay in their blocks too, read in place from the memory map on the CPU.
    /// `quantize` additionally quantizes the matrices the file stores unquantized
    /// (F32/F16/BF16).
    ///
    /// ```no_run
    /// use candle_core::{DType, Device};
    /// use mamba2::{gguf::GgufFile, Mamba2Model};
    /// let file = GgufFile::open(std::path::Path::new("mamba2-130m-Q8_0.gguf"))?;
    /// let model = Mamba2Model::from_gguf(&file, DType::F32, &Device::Cpu, None)?;
    /// println!("{:?}, {} bytes per token", model.quantization(), model.weight_bytes_per_token());
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn from_gguf(
        file: &GgufFile,
        dtype: DType,
        device: &Device,
        quantize: Option<GgmlDType>,
    ) -> Result<Self> {
        let config = Mamba2Config::from_gguf(file)?;
        let src = GgufSource {
            file,
            config: &config,
            device: device.clone(),
        };
        Self::build(&config, &src, config.default_root(), dtype, quantize)
    }
}
