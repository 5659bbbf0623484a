//! Projections and embedding lookups whose weight matrix is stored in one of ggml's block
//! formats (Q8_0, Q4_K, ...), as GGUF files carry them.
//!
//! Fast paths: on the CPU, decode rows (up to 8) dot the weight blocks with the activations
//! rounded to 8-bit blocks, as llama.cpp does, so decode reads only the quantized bytes; prefill
//! rows multiply by the exactly dequantized matrix through the dense GEMM (see `cpu/quantized.rs`
//! for why). On CUDA and Metal, Candle's quantized kernels (`QMatMul`, f32 activations rounded to
//! Q8_1 blocks on CUDA). The reference dequantizes the weight to f32 and calls
//! [`crate::linear_slow`]; the fast paths differ from it by the activation rounding of the decode
//! rows, bounded by the tolerance table of `tests/cpu_quantized.rs`.
//!
//! Shapes: a weight is `(out_features, in_features)` with `in_features` a multiple of its
//! format's block size (32 or 256); activations are `(..., in_features)` in f32, f16 or bf16 and
//! the output keeps their dtype. Accumulation is f32 throughout.

use crate::check;
use crate::{Backend, OpError, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

const OP: &str = "quantized_linear";
const OP_EMB: &str = "quantized_embedding";

/// A weight matrix `(out_features, in_features)` in a ggml block format, shared cheaply
/// (`Clone` is an `Arc` clone; Candle caches its repacked CPU layout inside).
///
/// ```
/// use candle_core::{quantized::GgmlDType, Device, Tensor};
/// use mamba2_ops::QuantizedMatrix;
/// let w = Tensor::randn(0f32, 1.0, (64, 256), &Device::Cpu)?; // (out_features, in_features)
/// let q = QuantizedMatrix::quantize(&w, GgmlDType::Q8_0)?;
/// assert_eq!((q.out_features(), q.in_features()), (64, 256));
/// assert_eq!(q.storage_bytes(), 64 * 256 / 32 * 34); // 34 bytes per block of 32
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
#[derive(Clone)]
pub struct QuantizedMatrix {
    blocks: Blocks,
    out_features: usize,
    in_features: usize,
}

/// Bytes owned elsewhere and shared by reference count, such as a memory-mapped GGUF file.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where a matrix's blocks live.
#[derive(Clone)]
enum Blocks {
    /// Candle's quantized storage (on any device).
    Candle(Arc<QTensor>),
    /// A byte range of a shared buffer on the host, read in place: a matrix-vector product on
    /// the CPU touches only these bytes, so the pages of a memory-mapped file that no
    /// computation reads are never loaded. Anything that needs Candle's storage (other
    /// devices, Candle's kernels) gets a copy made on first use.
    Shared {
        owner: SharedBytes,
        range: std::ops::Range<usize>,
        ty: GgmlDType,
        copy: Arc<std::sync::OnceLock<Arc<QTensor>>>,
    },
}

impl std::fmt::Debug for QuantizedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantizedMatrix({:?}, {} x {}{})",
            self.ggml_dtype(),
            self.out_features,
            self.in_features,
            match self.blocks {
                Blocks::Candle(_) => "",
                Blocks::Shared { .. } => ", shared bytes",
            }
        )
    }
}

impl QuantizedMatrix {
    /// Wraps a rank-2 `QTensor` (Candle's shape order: `(out_features, in_features)`).
    pub fn new(q: QTensor) -> Result<Self> {
        Self::from_arc(Arc::new(q))
    }

    /// [`QuantizedMatrix::new`] on a shared `QTensor`.
    pub fn from_arc(q: Arc<QTensor>) -> Result<Self> {
        let (out_features, in_features) = q.shape().dims2().map_err(|_| OpError::Shape {
            op: OP,
            arg: "weight",
            got: q.shape().dims().to_vec(),
            expected: "(out_features, in_features)".into(),
        })?;
        check_whole_blocks(q.dtype(), out_features, in_features)?;
        Ok(Self {
            blocks: Blocks::Candle(q),
            out_features,
            in_features,
        })
    }

    /// A matrix `(out_features, in_features)` of `ty` blocks stored in `owner[range]` on the host
    /// (row-major, whole blocks per row, as GGUF stores them), read in place without a copy.
    /// Errors when the range is outside the buffer, its length is not what the shape needs, or
    /// `in_features` is not a multiple of the block size.
    ///
    /// ```
    /// use candle_core::{quantized::GgmlDType, Device, Tensor};
    /// use mamba2_ops::{quantized_linear, QuantizedMatrix, SharedBytes};
    /// use std::sync::Arc;
    /// let w = Tensor::randn(0f32, 1.0, (4, 64), &Device::Cpu)?;
    /// let owned = QuantizedMatrix::quantize(&w, GgmlDType::Q8_0)?;
    /// let bytes: SharedBytes = Arc::new(owned.data()?.into_owned());
    /// let len = bytes.as_ref().as_ref().len();
    /// let shared = QuantizedMatrix::from_shared_bytes(bytes, 0..len, GgmlDType::Q8_0, 4, 64)?;
    /// let x = Tensor::randn(0f32, 1.0, (1, 64), &Device::Cpu)?;
    /// let d = (quantized_linear(&x, &shared, None)? - quantized_linear(&x, &owned, None)?)?;
    /// assert_eq!(d.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    /// # Ok::<(), mamba2_ops::OpError>(())
    /// ```
    pub fn from_shared_bytes(
        owner: SharedBytes,
        range: std::ops::Range<usize>,
        ty: GgmlDType,
        out_features: usize,
        in_features: usize,
    ) -> Result<Self> {
        check_whole_blocks(ty, out_features, in_features)?;
        let need = out_features
            .checked_mul(in_features / ty.block_size())
            .and_then(|b| b.checked_mul(ty.type_size()));
        let have = (*owner).as_ref().len();
        if range.start > range.end || range.end > have || need != Some(range.len()) {
            return Err(OpError::Shape {
                op: OP,
                arg: "weight",
                got: vec![out_features, in_features],
                expected: format!(
                    "{} bytes of {} blocks inside the buffer (range {range:?} of {have} bytes)",
                    need.map_or("more".to_string(), |n| n.to_string()),
                    type_name(ty)
                ),
            });
        }
        Ok(Self {
            blocks: Blocks::Shared {
                owner,
                range,
                ty,
                copy: Default::default(),
            },
            out_features,
            in_features,
        })
    }

    /// The blocks' bytes, row-major (borrowed for shared bytes and CPU storage).
    pub fn data(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        match &self.blocks {
            Blocks::Candle(q) => Ok(q.data()?),
            Blocks::Shared { owner, range, .. } => Ok(std::borrow::Cow::Borrowed(
                &(**owner).as_ref()[range.clone()],
            )),
        }
    }

    /// Whether the blocks are read in place from shared bytes ([`Self::from_shared_bytes`]).
    pub fn is_shared_bytes(&self) -> bool {
        matches!(self.blocks, Blocks::Shared { .. })
    }

    /// Quantizes a float matrix `(out_features, in_features)` to `ty` on the matrix's device.
    /// `in_features` must be a multiple of the format's block size. The blocks are computed on
    /// the CPU (Candle's quantizers are CPU code) and then copied to the device.
    pub fn quantize(w: &Tensor, ty: GgmlDType) -> Result<Self> {
        let (out_f, in_f) = check::dims::<2>(OP, "weight", w).map(|[o, i]| (o, i))?;
        check_whole_blocks(ty, out_f, in_f)?;
        let w32 = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let q = QTensor::quantize_onto(&w32, ty, w.device())?;
        Self::new(q)
    }

    /// The same blocks on `device` (a copy of the bytes; no requantization).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        if self.device().same_device(device) {
            return Ok(self.clone());
        }
        let bytes = self.data()?;
        let storage =
            candle_core::quantized::QStorage::from_data(bytes, device, self.ggml_dtype())?;
        Self::new(QTensor::new(
            storage,
            (self.out_features, self.in_features),
        )?)
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The block format.
    pub fn ggml_dtype(&self) -> GgmlDType {
        match &self.blocks {
            Blocks::Candle(q) => q.dtype(),
            Blocks::Shared { ty, .. } => *ty,
        }
    }

    /// Bytes of the quantized blocks: what a matrix-vector product reads.
    pub fn storage_bytes(&self) -> usize {
        match &self.blocks {
            Blocks::Candle(q) => q.storage_size_in_bytes(),
            Blocks::Shared { range, .. } => range.len(),
        }
    }

    /// Device of the blocks.
    pub fn device(&self) -> Device {
        match &self.blocks {
            Blocks::Candle(q) => q.device(),
            Blocks::Shared { .. } => Device::Cpu,
        }
    }

    /// The exact f32 values the blocks encode, `(out_features, in_features)` on `device`.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        Ok(self.qtensor()?.dequantize(device)?)
    }

    /// The blocks as Candle's `QTensor` (for shared bytes, a copy made once and kept).
    pub fn qtensor(&self) -> Result<Arc<QTensor>> {
        match &self.blocks {
            Blocks::Candle(q) => Ok(q.clone()),
            Blocks::Shared { ty, copy, .. } => {
                if let Some(q) = copy.get() {
                    return Ok(q.clone());
                }
                let storage =
                    candle_core::quantized::QStorage::from_data(self.data()?, &Device::Cpu, *ty)?;
                let q = Arc::new(QTensor::new(
                    storage,
                    (self.out_features, self.in_features),
                )?);
                Ok(copy.get_or_init(|| q).clone())
            }
        }
    }
}

/// A row of `in_features` values must be whole blocks of `ty`.
fn check_whole_blocks(ty: GgmlDType, out_features: usize, in_features: usize) -> Result<()> {
    if in_features.is_multiple_of(ty.block_size()) {
        return Ok(());
    }
    Err(OpError::Shape {
        op: OP,
        arg: "weight",
        got: vec![out_features, in_features],
        expected: format!(
            "in_features a multiple of {}'s block size {}",
            type_name(ty),
            ty.block_size()
        ),
    })
}

/// llama.cpp's spelling of a block format ("Q4_K"), for messages.
pub fn type_name(ty: GgmlDType) -> &'static str {
    match ty {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
        #[allow(unreachable_patterns)]
        _ => "unknown",
    }
}

/// Returns the number of rows after checking `x`, the weight and the bias.
fn validate(x: &Tensor, w: &QuantizedMatrix, bias: Option<&Tensor>) -> Result<usize> {
    check::float(OP, "x", x)?;
    if x.dims().last() != Some(&w.in_features) {
        return Err(OpError::Shape {
            op: OP,
            arg: "x",
            got: x.dims().to_vec(),
            expected: format!("(..., {})", w.in_features),
        });
    }
    if !x.device().same_device(&w.device()) {
        return Err(OpError::Device {
            op: OP,
            arg: "weight",
        });
    }
    check::opt(OP, "bias", x, bias, &[w.out_features])?;
    Ok(x.elem_count() / w.in_features.max(1))
}

/// `y = x · wᵀ (+ bias)` with a block-quantized `w`: `x` `(..., in_features)` in f32, f16 or
/// bf16, `w` `(out_features, in_features)`, `bias` `(out_features)` of x's dtype; `y`
/// `(..., out_features)` in x's dtype.
///
/// ```
/// use candle_core::{quantized::GgmlDType, Device, Tensor};
/// use mamba2_ops::{quantized_linear, QuantizedMatrix};
/// let dev = Device::Cpu;
/// let w = QuantizedMatrix::quantize(&Tensor::randn(0f32, 1.0, (8, 256), &dev)?, GgmlDType::Q4K)?;
/// let x = Tensor::randn(0f32, 1.0, (2, 3, 256), &dev)?; // (batch, seqlen, in_features)
/// let y = quantized_linear(&x, &w, None)?;
/// assert_eq!(y.dims(), &[2, 3, 8]);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn quantized_linear(x: &Tensor, w: &QuantizedMatrix, bias: Option<&Tensor>) -> Result<Tensor> {
    quantized_linear_with(x, w, bias, Backend::Auto)
}

/// [`quantized_linear`] with an explicit backend choice.
pub fn quantized_linear_with(
    x: &Tensor,
    w: &QuantizedMatrix,
    bias: Option<&Tensor>,
    backend: Backend,
) -> Result<Tensor> {
    let rows = validate(x, w, bias)?;
    if backend == Backend::Reference
        || !is_block_format(w.ggml_dtype())
        || odd_block_pairs(w.ggml_dtype(), w.in_features)
    {
        return quantized_linear_slow(x, w, bias);
    }
    let dtype = x.dtype();
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1: checked") = w.out_features;
    // Decode rows on the CPU: this crate's pool (see cpu/quantized.rs for why).
    if x.device().is_cpu() {
        if let Some(y) = crate::cpu::quantized::quantized_linear(x, w)? {
            crate::cpu::record_fast_path(OP);
            let y = match bias {
                Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
                None => y,
            };
            return Ok(y.reshape(out_dims)?.to_dtype(dtype)?);
        }
    }
    // Candle's quantized kernels take contiguous f32 rows on every backend.
    let x2 = x
        .to_dtype(DType::F32)?
        .reshape((rows, w.in_features))?
        .contiguous()?; // (rows, in_features)
    let mut y = QMatMul::QTensor(w.qtensor()?).forward(&x2)?; // (rows, out_features) f32
    if x.device().is_cpu() {
        crate::cpu::record_fast_path(OP);
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
    }
    Ok(y.reshape(out_dims)?.to_dtype(dtype)?)
}

/// Plain-tensor reference of [`quantized_linear`]: the exactly dequantized weight through
/// [`crate::linear_slow`] in f32.
pub fn quantized_linear_slow(
    x: &Tensor,
    w: &QuantizedMatrix,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    validate(x, w, bias)?;
    let dtype = x.dtype();
    let w32 = w.dequantize(x.device())?; // (out_features, in_features) f32
    let x32 = x.to_dtype(DType::F32)?;
    let b32 = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
    Ok(crate::linear_slow(&x32, &w32, b32.as_ref())?.to_dtype(dtype)?)
}

/// Candle's Q4_1 / Q5_0 / Q5_1 dot products take the blocks two at a time and assert (in
/// builds with debug assertions) that a row holds an even number of them: rows of an odd
/// number of 32-value blocks take the reference instead.
fn odd_block_pairs(ty: GgmlDType, in_features: usize) -> bool {
    matches!(ty, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
        && (in_features / ty.block_size()) % 2 == 1
}

/// Whether `ty` is a block format (Q8_0, Q4_K, ...) rather than one of the float types GGUF and
/// Candle's quantized tensors also carry (F32/F16/BF16: `QMatMul` dequantizes those anyway, so
/// their reference is the same work).
pub fn is_block_format(ty: GgmlDType) -> bool {
    !matches!(ty, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

fn validate_ids(ids: &Tensor, table: &QuantizedMatrix) -> Result<()> {
    if ids.dtype() != DType::U32 {
        return Err(OpError::Dtype {
            op: OP_EMB,
            arg: "ids",
            got: ids.dtype(),
            expected: "u32",
        });
    }
    if !ids.device().same_device(&table.device()) {
        return Err(OpError::Device {
            op: OP_EMB,
            arg: "table",
        });
    }
    let rows = table.out_features as u32;
    let v = ids.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&id) = v.iter().find(|&&id| id >= rows) {
        return Err(OpError::Param {
            op: OP_EMB,
            param: "ids",
            message: format!("id {id} is not a row of the {rows}-row table"),
        });
    }
    Ok(())
}

/// Rows `ids` of a block-quantized table `(rows, dim)`, dequantized to `dtype`:
/// `ids` `(...)` u32 → `(..., dim)`. Only the rows asked for are decoded.
///
/// ```
/// use candle_core::{quantized::GgmlDType, DType, Device, Tensor};
/// use mamba2_ops::{quantized_embedding, QuantizedMatrix};
/// let dev = Device::Cpu;
/// let table = QuantizedMatrix::quantize(&Tensor::randn(0f32, 1.0, (10, 64), &dev)?, GgmlDType::Q8_0)?;
/// let ids = Tensor::new(&[[1u32, 7, 7]], &dev)?; // (batch, seqlen)
/// let rows = quantized_embedding(&ids, &table, DType::BF16)?;
/// assert_eq!(rows.dims(), &[1, 3, 64]);
/// # Ok::<(), mamba2_ops::OpError>(())
/// ```
pub fn quantized_embedding(ids: &Tensor, table: &QuantizedMatrix, dtype: DType) -> Result<Tensor> {
    validate_ids(ids, table)?;
    if !is_block_format(table.ggml_dtype()) {
        return quantized_embedding_slow(ids, table, dtype);
    }
    let rows = table.qtensor()?.embedding(ids)?.to_dtype(dtype)?; // (..., dim)
    if ids.device().is_cpu() {
        crate::cpu::record_fast_path(OP_EMB);
    }
    Ok(rows)
}

/// Plain-tensor reference of [`quantized_embedding`]: dequantize the whole table, then select.
pub fn quantized_embedding_slow(
    ids: &Tensor,
    table: &QuantizedMatrix,
    dtype: DType,
) -> Result<Tensor> {
    validate_ids(ids, table)?;
    let full = table.dequantize(ids.device())?; // (rows, dim) f32
    let mut dims = ids.dims().to_vec();
    dims.push(table.in_features);
    Ok(full
        .index_select(&ids.flatten_all()?, 0)?
        .reshape(dims)?
        .to_dtype(dtype)?)
}
