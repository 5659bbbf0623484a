//! Building a [`Mamba2Model`] from a GGUF file: llama.cpp's tensor names and layouts mapped to
//! the canonical HF names the builder asks for. Block-quantized matrices stay in their blocks
//! (read straight from the memory-mapped file into Candle's quantized storage); everything else
//! is dequantized to f32 and converted like a safetensors tensor.
//!
//! llama.cpp's `mamba2` layouts that differ from HF's (see `convert_hf_to_gguf.py`):
//! `ssm_a` holds `A = -exp(A_log)` as `(nheads, 1)`; `ssm_d` is `(nheads, 1)`; `ssm_conv1d` is
//! the squeezed `(conv_dim, d_conv)`; `ssm_norm` is `(ngroups, d_inner / ngroups)`; `dt_bias` is
//! `ssm_dt.bias`; a tied head has no `output.weight`.

use super::build::TensorSource;
use super::matrix::Matrix;
use super::Mamba2Model;
use crate::config::Mamba2Config;
use crate::gguf::{GgufFile, GgufTensorInfo};
use crate::{Error, Result};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use mamba2_ops::QuantizedMatrix;
use std::borrow::Cow;

/// How a GGUF tensor's values become the canonical tensor's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transform {
    /// Same values; the shape may differ only by unit axes or a regrouping (conv, norm, D).
    Reshape,
    /// `ssm_a` holds `A = -exp(A_log)`: the builder asks for `A_log = log(-A)`.
    NegLog,
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
        "mixer.in_proj.weight" => ("ssm_in.weight", Reshape),
        "mixer.in_proj.bias" => ("ssm_in.bias", Reshape),
        "mixer.conv1d.weight" => ("ssm_conv1d.weight", Reshape),
        "mixer.conv1d.bias" => ("ssm_conv1d.bias", Reshape),
        "mixer.dt_bias" => ("ssm_dt.bias", Reshape),
        "mixer.A_log" => ("ssm_a", NegLog),
        "mixer.D" => ("ssm_d", Reshape),
        "mixer.norm.weight" => ("ssm_norm.weight", Reshape),
        "mixer.out_proj.weight" => ("ssm_out.weight", Reshape),
        "mixer.out_proj.bias" => ("ssm_out.bias", Reshape),
        _ => return None,
    };
    Some((format!("blk.{layer}.{name}"), t))
}

/// The tensors of one GGUF file on one device.
pub(super) struct GgufSource<'a> {
    file: &'a GgufFile,
    device: Device,
}

impl<'a> GgufSource<'a> {
    fn info(&self, canonical: &str) -> Result<(&'a GgufTensorInfo, Transform)> {
        let missing = || Error::MissingTensor {
            name: canonical.to_string(),
            source_desc: self.describe(),
        };
        let (name, t) = gguf_name(canonical).ok_or_else(missing)?;
        let info = self.file.tensor_info(&name).ok_or_else(missing)?;
        Ok((info, t))
    }

    /// The tensor's blocks as Candle quantized storage on `device`.
    fn qtensor(&self, info: &GgufTensorInfo, ty: GgmlDType, device: &Device) -> Result<QTensor> {
        let bytes = self.file.tensor_bytes(info);
        // Candle reinterprets the bytes as blocks (2- or 4-byte aligned fields): a file whose
        // alignment leaves a tensor off that boundary is copied to an aligned buffer first.
        let mut words: Vec<u64> = Vec::new();
        let data: &[u8] = if (bytes.as_ptr() as usize).is_multiple_of(8) {
            bytes
        } else {
            words.resize(bytes.len().div_ceil(8), 0);
            // SAFETY: `words` holds at least `bytes.len()` bytes and outlives `data`; any byte
            // pattern is a valid u64.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, bytes.len())
            };
            dst.copy_from_slice(bytes);
            dst
        };
        let storage = QStorage::from_data(Cow::Borrowed(data), device, ty)?;
        Ok(QTensor::new(storage, info.shape())?)
    }
}

fn shape_err(name: &str, expected: &[usize], info: &GgufTensorInfo) -> Error {
    Error::TensorShape {
        name: name.to_string(),
        expected: expected.to_vec(),
        got: info.shape(),
    }
}

impl TensorSource for GgufSource<'_> {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (info, t) = self.info(name)?;
        if info.elem_count() != shape.iter().product::<usize>() {
            return Err(shape_err(name, shape, info));
        }
        let ty = self.file.check_supported(info)?;
        let values = self
            .qtensor(info, ty, &Device::Cpu)?
            .dequantize(&Device::Cpu)?; // f32
        let values = match t {
            Transform::Reshape => values,
            Transform::NegLog => values.neg()?.log()?,
        };
        Ok(values
            .reshape(shape)?
            .to_dtype(dtype)?
            .to_device(&self.device)?)
    }

    fn matrix(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Matrix> {
        let (info, _) = self.info(name)?;
        if info.shape() != shape {
            return Err(shape_err(name, shape, info));
        }
        match self.file.check_supported(info)? {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Ok(Matrix::Dense(self.tensor(name, shape, dtype)?))
            }
            ty => {
                let q = self.qtensor(info, ty, &self.device)?;
                Ok(Matrix::Quantized(QuantizedMatrix::new(q)?))
            }
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.info(name).ok().map(|(i, _)| i.shape())
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
    /// are converted to `dtype` (norms, conv, A, D and dt in f32 as always). `quantize`
    /// additionally quantizes the matrices the file stores unquantized (F32/F16/BF16).
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
            device: device.clone(),
        };
        Self::build(&config, &src, config.default_root(), dtype, quantize)
    }
}
