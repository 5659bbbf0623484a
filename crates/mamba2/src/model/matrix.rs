//! The weight matrices of the model graph (projections, the embedding table, the LM head),
//! either dense in the model dtype or in a ggml block format (from a GGUF file or quantized at
//! load), behind one interface so that the blocks do not care which.

use crate::Result;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Tensor};
use mamba2_ops::QuantizedMatrix;

/// A matrix `(rows, cols)`: `(out_features, in_features)` for a projection, `(vocab, d_model)`
/// for the embedding table.
#[derive(Debug, Clone)]
pub(crate) enum Matrix {
    Dense(Tensor),
    Quantized(QuantizedMatrix),
}

impl Matrix {
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Matrix::Dense(t) => t.dims2().unwrap_or((0, 0)),
            Matrix::Quantized(q) => (q.out_features(), q.in_features()),
        }
    }

    pub fn elem_count(&self) -> usize {
        let (r, c) = self.dims();
        r * c
    }

    /// Bytes held (what a full matrix-vector product reads).
    pub fn storage_bytes(&self) -> usize {
        match self {
            Matrix::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Matrix::Quantized(q) => q.storage_bytes(),
        }
    }

    /// The dense tensor, if this matrix is dense.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Matrix::Dense(t) => Some(t),
            Matrix::Quantized(_) => None,
        }
    }

    /// The dense tensor, or an op error for a block-quantized matrix (for code paths that the
    /// caller only takes with dense weights, such as the captured CUDA step).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn dense_or_err(&self) -> mamba2_ops::Result<&Tensor> {
        self.dense().ok_or_else(|| mamba2_ops::OpError::Param {
            op: "cuda_graph",
            param: "weights",
            message: "block-quantized weights are not captured".into(),
        })
    }

    /// The block format, if quantized.
    pub fn ggml_dtype(&self) -> Option<GgmlDType> {
        match self {
            Matrix::Dense(_) => None,
            Matrix::Quantized(q) => Some(q.ggml_dtype()),
        }
    }

    /// `x · selfᵀ (+ bias)`, `x` `(..., cols)` → `(..., rows)` in x's dtype.
    pub fn project(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        Ok(match self {
            Matrix::Dense(w) => mamba2_ops::linear(x, w, bias)?,
            Matrix::Quantized(q) => mamba2_ops::quantized_linear(x, q, bias)?,
        })
    }

    /// Rows `ids` `(n)` u32 → `(n, cols)` in `dtype` (the embedding lookup).
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Matrix::Dense(t) => mamba2_ops::embedding(ids, t)?.to_dtype(dtype)?,
            Matrix::Quantized(q) => mamba2_ops::quantized_embedding(ids, q, dtype)?,
        })
    }

    /// The matrices stacked by rows (fused q/k/v or gate/up projections). Block-quantized parts
    /// of one format are joined block for block (rows are whole blocks, so the bytes simply
    /// follow each other); mixed parts are joined dense, in `dtype`.
    pub fn cat_rows(mut parts: Vec<Matrix>, dtype: DType) -> Result<Matrix> {
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        let formats: Vec<Option<GgmlDType>> = parts.iter().map(|m| m.ggml_dtype()).collect();
        let cols = parts.first().map_or(0, |m| m.dims().1);
        if let Some(Some(ty)) = formats.first() {
            if formats.iter().all(|f| *f == Some(*ty)) && parts.iter().all(|m| m.dims().1 == cols) {
                let mut bytes = Vec::new();
                let mut rows = 0;
                let mut device = candle_core::Device::Cpu;
                for m in &parts {
                    if let Matrix::Quantized(q) = m {
                        bytes.extend_from_slice(&q.data()?);
                        rows += q.out_features();
                        device = q.device();
                    }
                }
                let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &device, *ty)?;
                let q = QTensor::new(storage, (rows, cols))?;
                return Ok(Matrix::Quantized(QuantizedMatrix::new(q)?));
            }
        }
        let dense = parts
            .iter()
            .map(|m| match m {
                Matrix::Dense(t) => Ok(t.to_dtype(dtype)?),
                Matrix::Quantized(q) => Ok(q.dequantize(&q.device())?.to_dtype(dtype)?),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Matrix::Dense(Tensor::cat(&dense, 0)?))
    }

    /// This matrix in `ty` when `ty` is given and the row length is a whole number of its
    /// blocks; unchanged otherwise (as llama.cpp keeps such tensors in a wider type).
    pub fn quantized_to(self, ty: Option<GgmlDType>) -> Result<Matrix> {
        match (self, ty) {
            (Matrix::Dense(t), Some(ty)) if t.dim(1)? % ty.block_size() == 0 => {
                Ok(Matrix::Quantized(QuantizedMatrix::quantize(&t, ty)?))
            }
            (m, _) => Ok(m),
        }
    }
}

/// A projection `x · wᵀ (+ bias)`; the bias stays dense in the model dtype.
#[derive(Debug, Clone)]
pub(crate) struct Proj {
    pub weight: Matrix,
    pub bias: Option<Tensor>,
}

impl Proj {
    pub fn new(weight: Matrix, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.project(x, self.bias.as_ref())
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn num_parameters(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }

    pub fn storage_bytes(&self) -> usize {
        self.weight.storage_bytes()
            + self
                .bias
                .as_ref()
                .map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }
}
