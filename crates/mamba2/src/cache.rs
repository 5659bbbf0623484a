//! Per-sequence state of a model: for each Mamba block a conv state (the last `d_conv`
//! pre-activation conv inputs) and an SSM state, both f32 whatever the model dtype; for each
//! attention block a KV cache in the model dtype that grows with the sequence.

use crate::config::Mamba2Config;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Keys and values of one attention block: `(batch, capacity, n_kv_heads, head_dim)` buffers of
/// which the first `len` positions are filled. Capacity grows by doubling, so appending a token
/// is amortised O(1) and a prefill in pieces does not copy the whole cache per piece.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

/// Capacity granularity of the KV buffers, in tokens.
const KV_ROUND: usize = 256;

impl KvCache {
    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keys `(batch, len, n_kv_heads, head_dim)` as a view of the buffer (`None` when empty).
    pub fn keys(&self) -> Result<Option<Tensor>> {
        Ok(match &self.k {
            Some(k) if self.len > 0 => Some(k.narrow(1, 0, self.len)?),
            _ => None,
        })
    }

    /// Values, as [`KvCache::keys`].
    pub fn values(&self) -> Result<Option<Tensor>> {
        Ok(match &self.v {
            Some(v) if self.len > 0 => Some(v.narrow(1, 0, self.len)?),
            _ => None,
        })
    }

    /// Appends `k`, `v` `(batch, n, n_kv_heads, head_dim)` and returns views of all keys and
    /// values so far, `(batch, len + n, n_kv_heads, head_dim)`.
    pub(crate) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (batch, n, kvh, hd) = k.dims4()?;
        let need = self.len + n;
        let cap = self.k.as_ref().map_or(0, |t| t.dim(1).unwrap_or(0));
        if need > cap {
            let new_cap = need.max(2 * cap).div_ceil(KV_ROUND) * KV_ROUND;
            let len = self.len;
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let t = Tensor::zeros((batch, new_cap, kvh, hd), k.dtype(), k.device())?;
                if let (Some(old), true) = (old, len > 0) {
                    t.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
                Ok(t)
            };
            self.k = Some(grow(&self.k)?);
            self.v = Some(grow(&self.v)?);
        }
        let (kb, vb) = (
            self.k.as_ref().expect("allocated"),
            self.v.as_ref().expect("allocated"),
        );
        kb.slice_set(&k.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = need;
        Ok((kb.narrow(1, 0, need)?, vb.narrow(1, 0, need)?))
    }

    fn deep_clone(&self) -> Result<Self> {
        let copy = |t: &Option<Tensor>| t.as_ref().map(|t| t.copy()).transpose();
        Ok(Self {
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            len: self.len,
        })
    }

    /// A cache holding `k`, `v` `(batch, len, n_kv_heads, head_dim)` (e.g. restored from a file).
    pub fn from_tensors(k: Tensor, v: Tensor) -> Result<Self> {
        if k.dims() != v.dims() || k.rank() != 4 || k.dtype() != v.dtype() {
            return Err(Error::InvalidInput(format!(
                "KV cache keys {:?} {:?} and values {:?} {:?} must be equal-shaped (batch, len, kv_heads, head_dim)",
                k.dims(),
                k.dtype(),
                v.dims(),
                v.dtype()
            )));
        }
        let mut c = Self::default();
        if k.dim(1)? > 0 {
            c.append(&k, &v)?;
        }
        Ok(c)
    }
}

/// The state of `batch` sequences. The SSM part does not depend on how many tokens were
/// processed; the KV part (hybrid models only) grows with them.
#[derive(Debug)]
pub struct Mamba2Cache {
    conv_states: Vec<Tensor>, // n_ssm x (batch, conv_dim, d_conv) f32
    /// The second conv-state buffers of the fused Metal decode step, which writes the rolled
    /// state to another buffer than it reads (see [`mamba2_ops::DecodeStepArgs`]); after each
    /// step the two swap. Empty on other devices.
    conv_next: Vec<Tensor>, // n_ssm x (batch, conv_dim, d_conv) f32
    ssm_states: Vec<Tensor>,  // n_ssm x (batch, nheads, headdim, d_state) f32
    kv: Vec<KvCache>,         // n_kv x (batch, len, n_kv_heads, head_dim)
    batch: usize,
    seqlen_offset: usize,
    /// The decode step captured for this cache's states (CUDA only).
    #[cfg(feature = "cuda")]
    pub(crate) graph: crate::model::cuda_step::GraphSlot,
}

/// Mutable view of one Mamba block's state, handed to the mixer.
pub(crate) struct LayerCache<'a> {
    pub conv_state: &'a Tensor,
    /// Where a decode step writes the new conv state, when the cache holds second buffers.
    pub conv_next: Option<&'a Tensor>,
    pub ssm_state: &'a Tensor,
}

/// The state of one block: its SSM part and its KV part, each when the block has one.
pub(crate) struct BlockState<'a> {
    pub ssm: Option<LayerCache<'a>>,
    pub kv: Option<&'a mut KvCache>,
}

impl Mamba2Cache {
    /// A zeroed state for `batch` sequences: one SSM state per Mamba block and one empty KV
    /// cache per attention block of `config`.
    pub fn new(config: &Mamba2Config, batch: usize, device: &Device) -> Result<Self> {
        let (n_ssm, n_kv) = (config.n_ssm_blocks(), config.n_kv_blocks());
        let mut conv_states = Vec::with_capacity(n_ssm);
        let mut ssm_states = Vec::with_capacity(n_ssm);
        for _ in 0..n_ssm {
            conv_states.push(Tensor::zeros(
                (batch, config.conv_dim(), config.d_conv),
                DType::F32,
                device,
            )?);
            ssm_states.push(Tensor::zeros(
                (batch, config.nheads, config.headdim, config.d_state),
                DType::F32,
                device,
            )?);
        }
        Ok(Self {
            conv_next: conv_next_buffers(&conv_states)?,
            conv_states,
            ssm_states,
            kv: vec![KvCache::default(); n_kv],
            batch,
            seqlen_offset: 0,
            #[cfg(feature = "cuda")]
            graph: Default::default(),
        })
    }

    /// Builds a cache from existing state tensors (e.g. restored from a file): one conv and one
    /// SSM state per Mamba block, one KV cache per attention block, all for the same batch.
    /// Lists of different lengths, states of another rank, batch or dtype, and KV caches of
    /// another length than `seqlen_offset` are [`Error::InvalidInput`]; a cache whose lists do
    /// not match a model's blocks is refused by that model's forward and step the same way.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use mamba2::Mamba2Cache;
    /// let conv = Tensor::zeros((1, 8, 4), DType::F32, &Device::Cpu)?;
    /// let ssm = Tensor::zeros((1, 2, 4, 16), DType::F32, &Device::Cpu)?;
    /// let cache = Mamba2Cache::from_states(vec![conv.clone()], vec![ssm.clone()], vec![], 0)?;
    /// assert_eq!(cache.n_layer(), 1);
    /// let err = Mamba2Cache::from_states(vec![conv], vec![ssm.clone(), ssm], vec![], 0);
    /// assert!(matches!(err, Err(mamba2::Error::InvalidInput(_))));
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn from_states(
        conv_states: Vec<Tensor>,
        ssm_states: Vec<Tensor>,
        kv: Vec<KvCache>,
        seqlen_offset: usize,
    ) -> Result<Self> {
        if conv_states.len() != ssm_states.len() {
            return Err(Error::InvalidInput(format!(
                "{} conv states but {} SSM states",
                conv_states.len(),
                ssm_states.len()
            )));
        }
        let batch = conv_states
            .first()
            .map(|t| t.dim(0))
            .transpose()?
            .or(kv
                .iter()
                .find_map(|c| c.k.as_ref().map(|k| k.dim(0).unwrap_or(0))))
            .unwrap_or(0);
        for (name, rank, t) in conv_states
            .iter()
            .map(|t| ("conv", 3, t))
            .chain(ssm_states.iter().map(|t| ("ssm", 4, t)))
        {
            if t.rank() != rank || t.dim(0)? != batch || t.dtype() != DType::F32 {
                return Err(Error::InvalidInput(format!(
                    "{name} state {:?} {:?}: expected rank {rank}, batch {batch}, f32",
                    t.dims(),
                    t.dtype()
                )));
            }
        }
        if let Some(k) = kv
            .iter()
            .filter_map(|c| c.k.as_ref())
            .find(|k| k.dim(0).ok() != Some(batch))
        {
            return Err(Error::InvalidInput(format!(
                "a KV cache of shape {:?} does not hold batch {batch}",
                k.dims()
            )));
        }
        if let Some(c) = kv.iter().find(|c| c.len != seqlen_offset && !c.is_empty()) {
            return Err(Error::InvalidInput(format!(
                "a KV cache holds {} positions, the state covers {seqlen_offset} tokens",
                c.len
            )));
        }
        Ok(Self {
            conv_next: conv_next_buffers(&conv_states)?,
            conv_states,
            ssm_states,
            kv,
            batch,
            seqlen_offset,
            #[cfg(feature = "cuda")]
            graph: Default::default(),
        })
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Number of Mamba blocks (SSM states).
    pub fn n_layer(&self) -> usize {
        self.conv_states.len()
    }

    /// Number of attention blocks (KV caches).
    pub fn n_kv(&self) -> usize {
        self.kv.len()
    }

    /// Tokens processed so far.
    pub fn seqlen_offset(&self) -> usize {
        self.seqlen_offset
    }

    /// Conv state of Mamba block `i`, `(batch, conv_dim, d_conv)` f32.
    pub fn conv_state(&self, i: usize) -> &Tensor {
        &self.conv_states[i]
    }

    /// SSM state of Mamba block `i`, `(batch, nheads, headdim, d_state)` f32.
    pub fn ssm_state(&self, i: usize) -> &Tensor {
        &self.ssm_states[i]
    }

    /// KV cache of attention block `i`.
    pub fn kv(&self, i: usize) -> &KvCache {
        &self.kv[i]
    }

    /// A deep copy (the tensors of a clone of a `Tensor` share storage, which in-place updates would alias).
    pub fn deep_clone(&self) -> Result<Self> {
        let copy = |v: &[Tensor]| {
            v.iter()
                .map(|t| t.copy())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        Ok(Self {
            conv_next: conv_next_buffers(&self.conv_states)?,
            conv_states: copy(&self.conv_states)?,
            ssm_states: copy(&self.ssm_states)?,
            kv: self
                .kv
                .iter()
                .map(KvCache::deep_clone)
                .collect::<Result<_>>()?,
            batch: self.batch,
            seqlen_offset: self.seqlen_offset,
            #[cfg(feature = "cuda")]
            graph: Default::default(),
        })
    }

    /// Zeroes every state and empties the KV caches, as for a new sequence.
    pub fn reset(&mut self) -> Result<()> {
        for t in self.conv_states.iter().chain(self.ssm_states.iter()) {
            t.slice_set(&t.zeros_like()?, 0, 0)?;
        }
        for c in &mut self.kv {
            c.len = 0;
        }
        self.seqlen_offset = 0;
        Ok(())
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn layer_mut(&mut self, i: usize) -> LayerCache<'_> {
        LayerCache {
            conv_state: &self.conv_states[i],
            conv_next: self.conv_next.get(i),
            ssm_state: &self.ssm_states[i],
        }
    }

    /// The state of a block with SSM slot `ssm` and KV slot `kv`.
    pub(crate) fn block_mut(&mut self, ssm: Option<usize>, kv: Option<usize>) -> BlockState<'_> {
        BlockState {
            ssm: ssm.map(|i| LayerCache {
                conv_state: &self.conv_states[i],
                conv_next: self.conv_next.get(i),
                ssm_state: &self.ssm_states[i],
            }),
            kv: kv.map(|i| &mut self.kv[i]),
        }
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.seqlen_offset += n;
    }

    /// After a decode step that wrote every conv state to its second buffer: the second buffers
    /// become the states.
    pub(crate) fn swap_conv_buffers(&mut self) {
        if !self.conv_next.is_empty() {
            std::mem::swap(&mut self.conv_states, &mut self.conv_next);
        }
    }
}

/// Second conv-state buffers (contents unspecified) where the decode step needs them: on Metal,
/// and while a test emulates Metal on the CPU.
fn conv_next_buffers(conv_states: &[Tensor]) -> Result<Vec<Tensor>> {
    let Some(first) = conv_states.first() else {
        return Ok(Vec::new());
    };
    if !(first.device().is_metal() || mamba2_ops::metal_plan::emulated().is_some()) {
        return Ok(Vec::new());
    }
    Ok(conv_states
        .iter()
        .map(|t| t.zeros_like())
        .collect::<candle_core::Result<_>>()?)
}
