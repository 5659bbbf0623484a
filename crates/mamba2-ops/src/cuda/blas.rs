//! cuBLAS GEMMs on a caller's stream, for the projections of a captured decode step with more
//! rows than the matrix-vector kernel takes (`linear::MAX_ROWS`). Candle's matmul runs on
//! Candle's stream, so it cannot be captured on the step's private stream; this handle is bound
//! to that stream, with a workspace of its own so that cuBLAS allocates nothing while the stream
//! captures (cuBLAS's documented requirement for graph capture).

use super::launch::{ptr, Result};
use candle_core::cuda_backend::cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Workspace handed to cuBLAS: what it asks for on Hopper (32 MiB), so it never allocates.
const WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLAS handle bound to one stream, and the workspace its captured GEMMs point into (both
/// must live as long as any graph recorded with them).
pub(crate) struct StreamBlas {
    blas: CudaBlas,
    _workspace: Tensor,
}

// SAFETY: the handle is only used through `&self` methods that enqueue on its stream; cuBLAS
// handles may be used from any thread as long as calls are not concurrent, and the captured
// step issues them from the capturing thread only.
unsafe impl Send for StreamBlas {}
unsafe impl Sync for StreamBlas {}

fn data_type(dt: DType) -> Option<blas_sys::cudaDataType> {
    match dt {
        DType::F32 => Some(blas_sys::cudaDataType::CUDA_R_32F),
        DType::F16 => Some(blas_sys::cudaDataType::CUDA_R_16F),
        DType::BF16 => Some(blas_sys::cudaDataType::CUDA_R_16BF),
        _ => None,
    }
}

impl StreamBlas {
    pub(crate) fn new(dev: &CudaDevice, stream: &Arc<CudaStream>) -> Result<Self> {
        let blas = CudaBlas::new(stream.clone()).w()?;
        let workspace = Tensor::zeros(WORKSPACE_BYTES / 4, DType::F32, &Device::Cuda(dev.clone()))?;
        // SAFETY: the workspace is a live device buffer of WORKSPACE_BYTES, kept with the handle.
        unsafe {
            blas_sys::cublasSetWorkspace_v2(
                *blas.handle(),
                ptr(&workspace, dev)? as *mut std::ffi::c_void,
                WORKSPACE_BYTES,
            )
            .result()
            .w()?;
        }
        Ok(Self {
            blas,
            _workspace: workspace,
        })
    }

    /// Enqueues `y = x · wᵀ` with f32 accumulation (`CUBLAS_COMPUTE_32F`: no TF32, as Candle's
    /// default): `x` `(rows, k)` with unit inner stride, `w` `(n, k)` contiguous of x's dtype,
    /// `y` `(rows, n)` with unit inner stride, of x's dtype or f32 (logits). `false` (nothing
    /// enqueued) when a precondition fails.
    pub(crate) fn gemm(
        &self,
        dev: &CudaDevice,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
    ) -> Result<bool> {
        let (rows, k) = x.dims2()?;
        let (n, kw) = w.dims2()?;
        let (Some(ab_type), Some(c_type)) = (data_type(x.dtype()), data_type(y.dtype())) else {
            return Ok(false);
        };
        let xs = x.layout().stride();
        let ys = y.layout().stride();
        let fits = |v: usize| i32::try_from(v).is_ok();
        if kw != k
            || w.dtype() != x.dtype()
            || !(y.dtype() == x.dtype() || y.dtype() == DType::F32)
            || !w.is_contiguous()
            || y.dims() != [rows, n]
            || xs[1] != 1
            || ys[1] != 1
            || ![rows, n, k, xs[0], ys[0]].into_iter().all(fits)
        {
            return Ok(false);
        }
        // Column-major view: yᵀ (n, rows) = W (n, k) · xᵀ (k, rows), W stored as its transpose.
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the addresses are of live tensors of the checked shapes and dtypes; alpha and
        // beta are host f32 (the handle's default pointer mode) matching the compute type.
        unsafe {
            blas_result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                ptr(w, dev)? as *const _,
                ab_type,
                k as i32,
                ptr(x, dev)? as *const _,
                ab_type,
                xs[0] as i32,
                &beta as *const f32 as *const _,
                ptr(y, dev)? as *mut _,
                c_type,
                ys[0] as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .w()?;
        }
        Ok(true)
    }
}
