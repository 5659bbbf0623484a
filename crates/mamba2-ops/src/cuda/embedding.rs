//! Embedding rows for token ids already on the device (`kernels/cuda/embedding.cu`): the first
//! node of the captured decode step, whose ids buffer the host refills before each replay.

use super::launch::{cfg, launch, ptr, Kernel, Result};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Tensor};

/// Enqueues `out[b] = table[ids[b]]` on `f`'s stream (`embedding_rows_<dtype>`): `table`
/// `(rows, dim)` contiguous, `ids` `(batch)` u32 (in range: checked by the caller), `out`
/// `(batch, dim)` contiguous of the table's dtype. `false` when a precondition fails.
pub(crate) fn enqueue(
    f: &Kernel,
    dev: &CudaDevice,
    table: &Tensor,
    ids: &Tensor,
    out: &Tensor,
) -> Result<bool> {
    let (rows, dim) = table.dims2()?;
    let batch = ids.dims1()?;
    if !table.is_contiguous()
        || !ids.is_contiguous()
        || !out.is_contiguous()
        || ids.dtype() != DType::U32
        || out.dtype() != table.dtype()
        || out.dims() != [batch, dim]
    {
        return Ok(false);
    }
    let Some(c) = cfg((batch as u64, 1, 1), 256, 0) else {
        return Ok(false);
    };
    launch!(
        f,
        c,
        ptr(table, dev)?,
        ptr(ids, dev)?,
        ptr(out, dev)?,
        rows as i64,
        dim as i64
    )?;
    Ok(true)
}
