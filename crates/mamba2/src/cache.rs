//! Per-sequence recurrent state of a Mamba-2 model: for each layer a conv state (the last
//! `d_conv` pre-activation conv inputs) and an SSM state, both f32 whatever the model dtype.

use crate::config::Mamba2Config;
use crate::Result;
use candle_core::{DType, Device, Tensor};

/// The recurrent state of `batch` sequences. Its size does not depend on how many tokens were
/// processed.
#[derive(Debug)]
pub struct Mamba2Cache {
    conv_states: Vec<Tensor>, // n_layer x (batch, conv_dim, d_conv) f32
    ssm_states: Vec<Tensor>,  // n_layer x (batch, nheads, headdim, d_state) f32
    batch: usize,
    seqlen_offset: usize,
    /// The decode step captured for this cache's states (CUDA only).
    #[cfg(feature = "cuda")]
    pub(crate) graph: crate::model::cuda_step::GraphSlot,
}

/// Mutable view of one layer's state, handed to the mixer.
pub(crate) struct LayerCache<'a> {
    pub conv_state: &'a Tensor,
    pub ssm_state: &'a Tensor,
}

impl Mamba2Cache {
    /// A zeroed state for `batch` sequences.
    pub fn new(config: &Mamba2Config, batch: usize, device: &Device) -> Result<Self> {
        let mut conv_states = Vec::with_capacity(config.n_layer);
        let mut ssm_states = Vec::with_capacity(config.n_layer);
        for _ in 0..config.n_layer {
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
            conv_states,
            ssm_states,
            batch,
            seqlen_offset: 0,
            #[cfg(feature = "cuda")]
            graph: Default::default(),
        })
    }

    /// Builds a cache from existing state tensors (e.g. restored from a file).
    pub fn from_states(
        conv_states: Vec<Tensor>,
        ssm_states: Vec<Tensor>,
        seqlen_offset: usize,
    ) -> Result<Self> {
        let batch = conv_states
            .first()
            .map(|t| t.dim(0))
            .transpose()?
            .unwrap_or(0);
        Ok(Self {
            conv_states,
            ssm_states,
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

    /// Number of layers.
    pub fn n_layer(&self) -> usize {
        self.conv_states.len()
    }

    /// Tokens processed so far.
    pub fn seqlen_offset(&self) -> usize {
        self.seqlen_offset
    }

    /// Conv state of layer `i`, `(batch, conv_dim, d_conv)` f32.
    pub fn conv_state(&self, i: usize) -> &Tensor {
        &self.conv_states[i]
    }

    /// SSM state of layer `i`, `(batch, nheads, headdim, d_state)` f32.
    pub fn ssm_state(&self, i: usize) -> &Tensor {
        &self.ssm_states[i]
    }

    /// A deep copy (the tensors of a clone of a `Tensor` share storage, which in-place updates would alias).
    pub fn deep_clone(&self) -> Result<Self> {
        Ok(Self {
            conv_states: self
                .conv_states
                .iter()
                .map(|t| t.copy())
                .collect::<candle_core::Result<_>>()?,
            ssm_states: self
                .ssm_states
                .iter()
                .map(|t| t.copy())
                .collect::<candle_core::Result<_>>()?,
            batch: self.batch,
            seqlen_offset: self.seqlen_offset,
            #[cfg(feature = "cuda")]
            graph: Default::default(),
        })
    }

    /// Zeroes every state, as for a new sequence.
    pub fn reset(&mut self) -> Result<()> {
        for t in self.conv_states.iter().chain(self.ssm_states.iter()) {
            t.slice_set(&t.zeros_like()?, 0, 0)?;
        }
        self.seqlen_offset = 0;
        Ok(())
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> LayerCache<'_> {
        LayerCache {
            conv_state: &self.conv_states[i],
            ssm_state: &self.ssm_states[i],
        }
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.seqlen_offset += n;
    }
}
