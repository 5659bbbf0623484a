//! Moving sequences in and out of a batched state, for continuous batching: a server keeps the
//! decoding sequences in one [`Mamba2Cache`] of `batch` rows so that one
//! [`Mamba2Model::step`](crate::Mamba2Model::step) advances them all, and between steps rows
//! join ([`concat_rows`]) and leave ([`select_rows`]).
//!
//! A Mamba block's state does not depend on the position, so rows that have seen different
//! numbers of tokens can share a pure Mamba-2 batch. An attention block's KV cache has one length
//! for the whole batch: rows of a hybrid model can share a batch only when their KV caches hold
//! the same number of positions (otherwise [`concat_rows`] returns an error and the caller runs
//! such rows one per step).

use crate::cache::{KvCache, Mamba2Cache};
use crate::{Error, Result};
use candle_core::Tensor;

/// Stacks the rows of `caches` into one cache, in order: row `j` of cache `i` becomes row
/// `sum(batch of caches[..i]) + j`. The tensors are copied, so the inputs stay independent.
///
/// Every cache must come from the same model. With attention blocks, every KV cache must hold
/// the same number of positions ([`Error::InvalidInput`] otherwise); without them the result's
/// [`Mamba2Cache::seqlen_offset`] is the largest of the inputs' (only attention reads it).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use mamba2::{batch, Mamba2Config, Mamba2Model};
/// let mut cfg = Mamba2Config::preset("130m")?;
/// cfg.n_layer = 1; cfg.d_model = 64; cfg.d_inner = 128; cfg.nheads = 2; cfg.d_state = 16;
/// cfg.vocab_size = 50; cfg.pad_vocab_size_multiple = 1;
/// let model = Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 7)?;
/// let (mut a, mut b) = (model.new_cache(1)?, model.new_cache(1)?);
/// model.prefill(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?, &mut a)?;
/// model.prefill(&Tensor::new(&[[4u32, 5]], &Device::Cpu)?, &mut b)?;
/// let mut both = batch::concat_rows(&[&a, &b])?;        // two sequences of different lengths
/// let logits = model.step(&Tensor::new(&[7u32, 8], &Device::Cpu)?, &mut both)?; // (2, vocab)
/// assert_eq!(logits.dims(), &[2, 50]);
/// let second = batch::select_rows(&both, &[1])?;          // b's row, one token further
/// assert_eq!(second.batch(), 1);
/// # Ok::<(), mamba2::Error>(())
/// ```
pub fn concat_rows(caches: &[&Mamba2Cache]) -> Result<Mamba2Cache> {
    let first = caches
        .first()
        .ok_or_else(|| Error::InvalidInput("concat_rows needs at least one cache".into()))?;
    let (n_ssm, n_kv) = (first.n_layer(), first.n_kv());
    if let Some(c) = caches
        .iter()
        .find(|c| c.n_layer() != n_ssm || c.n_kv() != n_kv)
    {
        return Err(Error::InvalidInput(format!(
            "caches of different models: {n_ssm} SSM + {n_kv} KV states vs {} + {}",
            c.n_layer(),
            c.n_kv()
        )));
    }
    let cat = |get: &dyn Fn(&Mamba2Cache) -> Tensor| -> Result<Tensor> {
        let parts: Vec<Tensor> = caches.iter().map(|c| get(c)).collect();
        Ok(Tensor::cat(&parts, 0)?.contiguous()?)
    };
    let conv = (0..n_ssm)
        .map(|i| cat(&|c| c.conv_state(i).clone()))
        .collect::<Result<Vec<_>>>()?;
    let ssm = (0..n_ssm)
        .map(|i| cat(&|c| c.ssm_state(i).clone()))
        .collect::<Result<Vec<_>>>()?;
    let mut kv = Vec::with_capacity(n_kv);
    for i in 0..n_kv {
        let len = first.kv(i).len();
        if let Some(c) = caches.iter().find(|c| c.kv(i).len() != len) {
            return Err(Error::InvalidInput(format!(
                "attention block {i}: KV caches of {len} and {} positions cannot share a batch",
                c.kv(i).len()
            )));
        }
        kv.push(if len == 0 {
            KvCache::default()
        } else {
            let keys = caches
                .iter()
                .map(|c| c.kv(i).keys().map(|k| k.expect("len > 0")))
                .collect::<Result<Vec<_>>>()?;
            let values = caches
                .iter()
                .map(|c| c.kv(i).values().map(|v| v.expect("len > 0")))
                .collect::<Result<Vec<_>>>()?;
            KvCache::from_tensors(Tensor::cat(&keys, 0)?, Tensor::cat(&values, 0)?)?
        });
    }
    let offset = if n_kv > 0 {
        let off = first.seqlen_offset();
        if let Some(c) = caches.iter().find(|c| c.seqlen_offset() != off) {
            return Err(Error::InvalidInput(format!(
                "states at {off} and {} tokens cannot share a batch with attention blocks",
                c.seqlen_offset()
            )));
        }
        off
    } else {
        caches.iter().map(|c| c.seqlen_offset()).max().unwrap_or(0)
    };
    Mamba2Cache::from_states(conv, ssm, kv, offset)
}

/// A new cache holding rows `rows` of `cache`, in that order (copied; a row may repeat).
/// Errors on an empty list or a row past the batch.
pub fn select_rows(cache: &Mamba2Cache, rows: &[usize]) -> Result<Mamba2Cache> {
    if rows.is_empty() {
        return Err(Error::InvalidInput(
            "select_rows needs at least one row".into(),
        ));
    }
    if let Some(&r) = rows.iter().find(|&&r| r >= cache.batch()) {
        return Err(Error::InvalidInput(format!(
            "row {r} of a cache of {} sequences",
            cache.batch()
        )));
    }
    let pick = |t: &Tensor| -> Result<Tensor> {
        // A run of consecutive rows is a narrow; anything else an index_select.
        let contiguous_run = rows.windows(2).all(|w| w[1] == w[0] + 1);
        let out = if contiguous_run {
            t.narrow(0, rows[0], rows.len())?.copy()?
        } else {
            let idx = Tensor::new(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                t.device(),
            )?;
            t.index_select(&idx, 0)?
        };
        Ok(out.contiguous()?)
    };
    let conv = (0..cache.n_layer())
        .map(|i| pick(cache.conv_state(i)))
        .collect::<Result<Vec<_>>>()?;
    let ssm = (0..cache.n_layer())
        .map(|i| pick(cache.ssm_state(i)))
        .collect::<Result<Vec<_>>>()?;
    let kv = (0..cache.n_kv())
        .map(|i| {
            let c = cache.kv(i);
            match (c.keys()?, c.values()?) {
                (Some(k), Some(v)) => KvCache::from_tensors(pick(&k)?, pick(&v)?),
                _ => Ok(KvCache::default()),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Mamba2Cache::from_states(conv, ssm, kv, cache.seqlen_offset())
}

/// Bytes held by the state tensors of `cache` (conv, SSM and the filled KV positions).
pub fn state_bytes(cache: &Mamba2Cache) -> usize {
    let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let ssm: usize = (0..cache.n_layer())
        .map(|i| bytes(cache.conv_state(i)) + bytes(cache.ssm_state(i)))
        .sum();
    let kv: usize = (0..cache.n_kv())
        .map(|i| {
            let c = cache.kv(i);
            let one = c.keys().ok().flatten().map_or(0, |k| bytes(&k));
            2 * one
        })
        .sum();
    ssm + kv
}
