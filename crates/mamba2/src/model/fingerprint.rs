//! A fingerprint of a model's weight content, for telling apart two checkpoints of the same
//! shapes (a fine-tune, another seed) when a saved state is restored.
//!
//! What is hashed: every weight tensor as the model holds it (after dtype conversion, and for
//! block-quantized matrices their block bytes), in the fixed order of the layer list, each with
//! its role, dtype and shape, through one xxh3-128 stream. Every byte counts, so a fine-tune that
//! changed a single weight has another fingerprint; a hash of the file headers plus a sample of
//! the data would be cheaper but blind to changes outside the sample, and would not cover models
//! that were built in memory or quantized at load. The cost is one read of the weights (xxh3
//! runs at several GB/s; GPU weights are copied to the host a tensor at a time), paid on first
//! use and cached in the model. Because the loaded values are hashed, the same checkpoint loaded
//! in another dtype or quantization has another fingerprint, as its states differ too.

use super::matrix::{Matrix, Proj};
use super::mixers::Mixer;
use super::Mamba2Model;
use crate::Result;
use candle_core::Tensor;
use xxhash_rust::xxh3::Xxh3;

fn hash_tensor(h: &mut Xxh3, role: &str, t: &Tensor) {
    h.update(role.as_bytes());
    h.update(format!("{:?}{:?}", t.dtype(), t.dims()).as_bytes());
    h.update(&safetensors::View::data(t));
}

fn hash_matrix(h: &mut Xxh3, role: &str, m: &Matrix) -> Result<()> {
    match m {
        Matrix::Dense(t) => hash_tensor(h, role, t),
        Matrix::Quantized(q) => {
            h.update(role.as_bytes());
            h.update(format!("{:?}{:?}", q.ggml_dtype(), m.dims()).as_bytes());
            h.update(&q.data()?);
        }
    }
    Ok(())
}

fn hash_proj(h: &mut Xxh3, role: &str, p: &Proj) -> Result<()> {
    hash_matrix(h, role, &p.weight)?;
    if let Some(b) = &p.bias {
        hash_tensor(h, role, b);
    }
    Ok(())
}

fn hash_mixer(h: &mut Xxh3, mixer: &Mixer) -> Result<()> {
    let mamba = |h: &mut Xxh3, m: &super::MambaMixer| -> Result<()> {
        hash_proj(h, "in_proj", &m.in_proj)?;
        hash_tensor(h, "conv_weight", &m.conv_weight);
        for (role, t) in [
            ("conv_bias", m.conv_bias.as_ref()),
            ("dt_bias", Some(&m.dt_bias)),
            ("a", Some(&m.a)),
            ("d", Some(&m.d)),
            ("norm", m.norm_weight.as_ref()),
        ] {
            if let Some(t) = t {
                hash_tensor(h, role, t);
            }
        }
        hash_proj(h, "out_proj", &m.out_proj)
    };
    let attn = |h: &mut Xxh3, a: &super::mixers::Attention| -> Result<()> {
        hash_proj(h, "qkv", &a.qkv)?;
        hash_proj(h, "o_proj", &a.o_proj)
    };
    match mixer {
        Mixer::Mamba(m) => mamba(h, m),
        Mixer::Attention(a) => attn(h, a),
        Mixer::MambaAttention(m, a) => {
            mamba(h, m)?;
            attn(h, a)
        }
        Mixer::Mlp(m) => {
            hash_proj(h, "mlp_up", &m.up)?;
            hash_proj(h, "mlp_down", &m.down)
        }
        Mixer::Moe(m) => {
            // Router, correction bias and the stacked dense experts.
            for t in m.tensors() {
                hash_tensor(h, "moe", t);
            }
            if let super::moe::RoutedExperts::Quantized {
                experts,
                gate_scale,
            } = &m.experts
            {
                h.update(&gate_scale.to_le_bytes());
                for e in experts {
                    for q in e.up.iter().chain([&e.down]) {
                        hash_matrix(h, "moe", &Matrix::Quantized(q.clone()))?;
                    }
                }
            }
            hash_proj(h, "shared_up", &m.shared.up)?;
            hash_proj(h, "shared_down", &m.shared.down)
        }
    }
}

impl Mamba2Model {
    /// A fingerprint of the weights' content, `xxh3-128:<32 hex digits>` (see the module docs
    /// of `model::fingerprint` for what is hashed and why). Computed on the first call, which
    /// reads every weight once, then cached; clones of the model share it. Session files
    /// record it and refuse to restore onto weights with another one.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use mamba2::{Mamba2Config, Mamba2Model};
    /// let mut cfg = Mamba2Config::preset("130m")?;
    /// cfg.n_layer = 1; cfg.d_model = 64; cfg.d_inner = 128; cfg.nheads = 2; cfg.d_state = 16;
    /// cfg.vocab_size = 50; cfg.pad_vocab_size_multiple = 1;
    /// let a = Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 1)?;
    /// let b = Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 2)?; // same shapes
    /// assert_ne!(a.weights_fingerprint()?, b.weights_fingerprint()?);
    /// assert_eq!(a.weights_fingerprint()?, a.clone().weights_fingerprint()?);
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn weights_fingerprint(&self) -> Result<String> {
        if let Some(f) = self.fingerprint.get() {
            return Ok(f.clone());
        }
        let mut h = Xxh3::new();
        hash_matrix(&mut h, "embeddings", &self.embeddings)?;
        if !self.tied {
            hash_matrix(&mut h, "lm_head", &self.lm_head)?;
        }
        hash_tensor(&mut h, "norm_f", &self.norm_f);
        for (i, block) in self.blocks.iter().enumerate() {
            h.update(format!("block{i}").as_bytes());
            hash_tensor(&mut h, "norm", &block.norm_weight);
            hash_mixer(&mut h, &block.mixer)?;
        }
        let f = format!("xxh3-128:{:032x}", h.digest128());
        Ok(self.fingerprint.get_or_init(|| f).clone())
    }
}
