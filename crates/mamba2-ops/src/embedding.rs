//! The token-embedding lookup as an op: on Metal one gather launch (Candle's `index_select`
//! elsewhere, which is what the reference is).

use crate::check;
use crate::{OpError, Result};
use candle_core::{DType, Tensor};

const OP: &str = "embedding";

fn validate(ids: &Tensor, table: &Tensor) -> Result<(usize, usize)> {
    check::float(OP, "table", table)?;
    let (_, d) = table.dims2().map_err(|_| OpError::Shape {
        op: OP,
        arg: "table",
        got: table.dims().to_vec(),
        expected: "(vocab, d)".into(),
    })?;
    if ids.rank() != 1 || ids.dtype() != DType::U32 {
        return Err(OpError::Param {
            op: OP,
            param: "ids",
            message: format!("must be (n) u32, got {:?} {:?}", ids.dims(), ids.dtype()),
        });
    }
    check::same_device(OP, "ids", table, ids)?;
    Ok((ids.dim(0)?, d))
}

/// Rows `ids` `(n)` u32 of `table` `(vocab, d)`: `(n, d)` in the table's dtype. Ids must be
/// below `vocab` (the reference fails otherwise; the Metal kernel writes zeros for them).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let table = Tensor::arange(0f32, 12.0, &dev)?.reshape((4, 3))?; // (vocab, d)
/// let rows = mamba2_ops::embedding(&Tensor::new(&[2u32, 0], &dev)?, &table)?;
/// assert_eq!(rows.to_vec2::<f32>()?, [[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    validate(ids, table)?;
    crate::dispatch!(
        crate::Backend::Auto,
        table.device(),
        embedding(ids, table),
        embedding_slow(ids, table),
        metal_only
    )
}

/// Reference of [`embedding`]: `index_select` over the rows.
pub fn embedding_slow(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    validate(ids, table)?;
    Ok(table.index_select(ids, 0)?) // (n, d)
}
