//! The Mamba-2 language model: embeddings, a stack of Mamba-2 blocks, final norm and LM head,
//! with a chunked-SSD prefill and a single-token step through a [`Mamba2Cache`].
//!
//! The model is written only against the op API of [`mamba2_ops`]; the backend (reference, fast
//! CPU, CUDA, Metal) is chosen there from the device of the tensors.

use crate::cache::Mamba2Cache;
use crate::config::Mamba2Config;
use crate::{Error, Result};

/// Building a model from checkpoint weights or at random.
mod build;
/// The decode step captured as a CUDA graph (reads the model's weights directly).
#[cfg(feature = "cuda")]
pub(crate) mod cuda_step;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::Linear;
use mamba2_ops::{
    causal_conv1d, gated_rms_norm, mixer_decode_step, rms_norm_residual, ssd_chunk_scan,
    Conv1dArgs, DecodeStepArgs, GatedRmsNormArgs, SsdArgs, SsdParams,
};

/// The mixer of one block: in_proj -> causal conv1d -> SSD -> gated RMSNorm -> out_proj.
#[derive(Debug, Clone)]
struct Mamba2Mixer {
    in_proj: Linear,
    conv_weight: Tensor,       // (conv_dim, d_conv)
    conv_bias: Option<Tensor>, // (conv_dim)
    dt_bias: Tensor,           // (nheads) f32
    a: Tensor,                 // (nheads) f32, -exp(A_log)
    d: Tensor,                 // (nheads) f32
    norm_weight: Tensor,       // (d_inner)
    out_proj: Linear,
}

#[derive(Debug, Clone)]
struct Mamba2Block {
    norm_weight: Tensor, // (d_model)
    mixer: Mamba2Mixer,
}

/// A loaded Mamba-2 causal language model. Immutable after loading: share it across threads
/// with an `Arc` and give each sequence its own [`Mamba2Cache`].
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use mamba2::{config::Mamba2Config, model::Mamba2Model};
/// let mut cfg = Mamba2Config::preset("130m")?;
/// cfg.n_layer = 1; cfg.d_model = 64; cfg.d_inner = 128; cfg.nheads = 2; cfg.d_state = 16;
/// cfg.vocab_size = 100; cfg.pad_vocab_size_multiple = 1;
/// let model = Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 0)?;
/// let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
/// let mut cache = model.new_cache(1)?;
/// let logits = model.forward(&ids, Some(&mut cache))?; // (batch, seqlen, vocab)
/// let next = model.step(&Tensor::new(&[4u32], &Device::Cpu)?, &mut cache)?; // (batch, vocab)
/// assert_eq!(logits.dims(), &[1, 3, 100]);
/// assert_eq!(next.dims(), &[1, 100]);
/// # Ok::<(), mamba2::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Mamba2Model {
    config: Mamba2Config,
    embeddings: Tensor, // (vocab_rows, d_model)
    blocks: Vec<Mamba2Block>,
    norm_f: Tensor,  // (d_model)
    lm_head: Tensor, // (vocab_rows, d_model)
    tied: bool,
    dtype: DType,
    device: Device,
    ssd_params: SsdParams,
    max_prefill_tokens: usize,
    cuda_graphs: bool,
}

impl Mamba2Model {
    /// The validated config.
    pub fn config(&self) -> &Mamba2Config {
        &self.config
    }

    /// Activation and weight dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Rows of the output layer: the width of the logits (the padded vocabulary).
    pub fn vocab_rows(&self) -> usize {
        self.lm_head.dim(0).unwrap_or(0)
    }

    /// Number of parameters (tied matrices counted once).
    pub fn num_parameters(&self) -> usize {
        let tied = self.tied;
        let mut n = self.embeddings.elem_count() + self.norm_f.elem_count();
        if !tied {
            n += self.lm_head.elem_count();
        }
        for b in &self.blocks {
            let m = &b.mixer;
            n += b.norm_weight.elem_count()
                + m.in_proj.weight().elem_count()
                + m.in_proj.bias().map_or(0, |t| t.elem_count())
                + m.conv_weight.elem_count()
                + m.conv_bias.as_ref().map_or(0, |t| t.elem_count())
                + m.dt_bias.elem_count()
                + m.a.elem_count()
                + m.d.elem_count()
                + m.norm_weight.elem_count()
                + m.out_proj.weight().elem_count()
                + m.out_proj.bias().map_or(0, |t| t.elem_count());
        }
        n
    }

    /// Bytes of weights read per decoded token (every matrix once; the embedding row is negligible).
    pub fn weight_bytes_per_token(&self) -> usize {
        (self.num_parameters() - self.embeddings.elem_count() + self.lm_head.elem_count())
            * self.dtype.size_in_bytes()
    }

    /// Sets how many prompt tokens [`Mamba2Model::prefill`] processes per forward (>= 1).
    pub fn set_max_prefill_tokens(&mut self, n: usize) {
        self.max_prefill_tokens = n.max(1);
    }

    /// Whether [`Mamba2Model::step`] on CUDA replays a captured graph of the whole step (the
    /// default; one launch per token instead of ~4 per layer) or launches eagerly. Both compute
    /// the same thing; the switch is for comparison and debugging.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.cuda_graphs = on;
    }

    /// A zeroed cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> Result<Mamba2Cache> {
        Mamba2Cache::new(&self.config, batch, &self.device)
    }

    /// Checks `(batch, seqlen)` ids: integer dtype, non-empty, every id a row of the embedding.
    fn check_ids(&self, ids: &Tensor) -> Result<Tensor> {
        if !matches!(
            ids.dtype(),
            DType::U32 | DType::I64 | DType::U8 | DType::I32 | DType::I16
        ) {
            return Err(Error::InvalidInput(format!(
                "token ids must be an integer tensor, got {:?}",
                ids.dtype()
            )));
        }
        if ids.elem_count() == 0 {
            return Err(Error::EmptyPrompt);
        }
        // One pass over the ids as i64 covers negative values and ids past the embedding alike.
        let v = ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        let rows = self.vocab_rows() as i64;
        if let Some((pos, &id)) = v.iter().enumerate().find(|(_, &id)| id < 0 || id >= rows) {
            return Err(Error::TokenOutOfRange {
                id,
                position: pos,
                vocab: self.vocab_rows(),
            });
        }
        Ok(ids.to_dtype(DType::U32)?.to_device(&self.device)?)
    }

    fn check_cache(&self, cache: &Mamba2Cache, batch: usize) -> Result<()> {
        if cache.batch() != batch || cache.n_layer() != self.blocks.len() {
            return Err(Error::InvalidInput(format!(
                "cache holds {} sequences x {} layers, input has batch {batch} for a {}-layer model",
                cache.batch(),
                cache.n_layer(),
                self.blocks.len()
            )));
        }
        Ok(())
    }

    /// One forward over `input_ids` `(batch, seqlen)`, returning f32 logits at every position,
    /// `(batch, seqlen, vocab_rows)`. With a cache, the sequence continues from the cache's
    /// state and the cache is left at the end of it (prefill, chunked prefill, multi-turn).
    pub fn forward(&self, input_ids: &Tensor, cache: Option<&mut Mamba2Cache>) -> Result<Tensor> {
        let hidden = self.backbone(input_ids, cache)?; // (batch, seqlen, d_model)
        self.logits(&hidden)
    }

    /// Prefill that returns only the logits of the last position, `(batch, vocab_rows)` f32,
    /// feeding the prompt in pieces of bounded size so memory does not grow with its length.
    pub fn prefill(&self, input_ids: &Tensor, cache: &mut Mamba2Cache) -> Result<Tensor> {
        let (_, seqlen) = input_ids.dims2().map_err(|_| {
            Error::InvalidInput(format!(
                "input_ids must be (batch, seqlen), got {:?}",
                input_ids.dims()
            ))
        })?;
        if seqlen == 0 {
            return Err(Error::EmptyPrompt);
        }
        let mut start = 0;
        let mut last_hidden = None;
        while start < seqlen {
            let len = self.max_prefill_tokens.min(seqlen - start);
            let piece = input_ids.narrow(1, start, len)?;
            let hidden = self.backbone(&piece, Some(cache))?; // (batch, len, d_model)
            last_hidden = Some(hidden.narrow(1, len - 1, 1)?);
            start += len;
        }
        let last = last_hidden.expect("seqlen >= 1");
        Ok(self.logits(&last)?.squeeze(1)?)
    }

    /// Embeddings, blocks and final norm over a sequence; `(batch, seqlen, d_model)` in the model dtype.
    fn backbone(&self, input_ids: &Tensor, mut cache: Option<&mut Mamba2Cache>) -> Result<Tensor> {
        let (batch, seqlen) = input_ids.dims2().map_err(|_| {
            Error::InvalidInput(format!(
                "input_ids must be (batch, seqlen), got {:?}",
                input_ids.dims()
            ))
        })?;
        let ids = self.check_ids(input_ids)?;
        if let Some(c) = cache.as_deref() {
            self.check_cache(c, batch)?;
        }
        let mut hidden = self
            .embeddings
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((batch, seqlen, self.config.d_model))?;
        let mut residual: Option<Tensor> = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let (normed, res) = rms_norm_residual(
                &hidden,
                residual.as_ref(),
                &block.norm_weight,
                self.config.norm_eps,
                self.config.residual_in_fp32,
            )?;
            residual = Some(res);
            let layer_cache = cache.as_deref_mut().map(|c| c.layer_mut(i));
            hidden = self.mixer_prefill(&block.mixer, &normed, layer_cache)?;
        }
        let (normed, _) = rms_norm_residual(
            &hidden,
            residual.as_ref(),
            &self.norm_f,
            self.config.norm_eps,
            self.config.residual_in_fp32,
        )?;
        if let Some(c) = cache {
            c.advance(seqlen);
        }
        Ok(normed)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        // (.., d_model) x (vocab_rows, d_model)^T
        let logits = project(hidden, &self.lm_head, None)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Splits in_proj's output `(.., d_in_proj)` into `(z, xBC, dt)`.
    fn split_projection(&self, zxbcdt: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (z, xbc, dt) = self.projection_views(zxbcdt)?;
        Ok((z, xbc.contiguous()?, dt.contiguous()?))
    }

    /// `z`, `xBC` and `dt` of a projection `(..., d_in_proj)` as views of it (the fused decode
    /// step reads them in place).
    fn projection_views(&self, zxbcdt: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let last = zxbcdt.rank() - 1;
        let z = zxbcdt.narrow(last, 0, c.d_inner)?;
        let xbc = zxbcdt.narrow(last, c.d_inner, c.conv_dim())?;
        let dt = zxbcdt.narrow(last, c.d_inner + c.conv_dim(), c.nheads)?;
        Ok((z, xbc, dt))
    }

    /// Arguments of the fused decode step of mixer `m`: the projection parts `xbc` / `dt` / `z`
    /// (views of one `(batch, d_in_proj)` row each) and the layer's states.
    fn decode_step_args<'a>(
        &'a self,
        m: &'a Mamba2Mixer,
        (z, xbc, dt): &'a (Tensor, Tensor, Tensor),
        state: crate::cache::LayerCache<'a>,
    ) -> DecodeStepArgs<'a> {
        let c = &self.config;
        DecodeStepArgs {
            xbc,
            dt,
            z,
            conv_state: state.conv_state,
            conv_weight: &m.conv_weight,
            conv_bias: m.conv_bias.as_ref(),
            ssm_state: state.ssm_state,
            a: &m.a,
            d: Some(&m.d),
            dt_bias: Some(&m.dt_bias),
            norm_weight: &m.norm_weight,
            eps: c.norm_eps,
            ngroups: c.ngroups,
            norm_before_gate: c.norm_before_gate,
        }
    }

    fn mixer_prefill(
        &self,
        m: &Mamba2Mixer,
        u: &Tensor,
        cache: Option<crate::cache::LayerCache<'_>>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seqlen, _) = u.dims3()?;
        let zxbcdt = project(u, m.in_proj.weight(), m.in_proj.bias())?; // (batch, seqlen, d_in_proj)
        let (z, xbc, dt) = self.split_projection(&zxbcdt)?;
        let (conv_state, ssm_state) = match &cache {
            Some(lc) => (Some(lc.conv_state), Some(lc.ssm_state)),
            None => (None, None),
        };
        let (xbc, new_conv) = causal_conv1d(&Conv1dArgs {
            x: &xbc,
            weight: &m.conv_weight,
            bias: m.conv_bias.as_ref(),
            initial_state: conv_state,
            seq_idx: None,
            silu: true,
        })?; // (batch, seqlen, conv_dim)
        let gn = c.ngroups * c.d_state;
        let x = xbc
            .narrow(2, 0, c.d_inner)?
            .reshape((batch, seqlen, c.nheads, c.headdim))?;
        let b = xbc
            .narrow(2, c.d_inner, gn)?
            .reshape((batch, seqlen, c.ngroups, c.d_state))?;
        let cm = xbc
            .narrow(2, c.d_inner + gn, gn)?
            .reshape((batch, seqlen, c.ngroups, c.d_state))?;
        let (y, new_ssm) = ssd_chunk_scan(
            &SsdArgs {
                x: &x,
                dt: &dt,
                a: &m.a,
                b: &b,
                c: &cm,
                d: Some(&m.d),
                z: None,
                dt_bias: Some(&m.dt_bias),
                initial_state: ssm_state,
                seq_idx: None,
            },
            &self.ssd_params,
        )?; // (batch, seqlen, nheads, headdim)
        if let Some(lc) = cache {
            lc.conv_state.slice_set(&new_conv, 0, 0)?;
            lc.ssm_state.slice_set(&new_ssm, 0, 0)?;
        }
        let y = y.reshape((batch, seqlen, c.d_inner))?;
        let y = gated_rms_norm(&GatedRmsNormArgs {
            x: &y,
            z: Some(&z.contiguous()?),
            weight: &m.norm_weight,
            eps: c.norm_eps,
            group_size: c.d_inner / c.ngroups,
            norm_before_gate: c.norm_before_gate,
        })?; // (batch, seqlen, d_inner)
        project(&y, m.out_proj.weight(), m.out_proj.bias())
    }

    /// One decode step: `input_ids` `(batch)` → f32 logits `(batch, vocab_rows)`; the cache
    /// advances by one token.
    pub fn step(&self, input_ids: &Tensor, cache: &mut Mamba2Cache) -> Result<Tensor> {
        // On the CPU a step is ~70 short parallel sections (one per op); started from a thread
        // outside the Rayon pool, each one hands its work to sleeping workers and waits for
        // them, about an eighth of a 130m step. Running the whole step on a pool worker lets the
        // sections fork and join inside the pool.
        if self.device.is_cpu() && rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.step_here(input_ids, cache));
        }
        self.step_here(input_ids, cache)
    }

    fn step_here(&self, input_ids: &Tensor, cache: &mut Mamba2Cache) -> Result<Tensor> {
        let batch = input_ids.dims1().map_err(|_| {
            Error::InvalidInput(format!(
                "step input_ids must be (batch), got {:?}",
                input_ids.dims()
            ))
        })?;
        let ids = self.check_ids(&input_ids.unsqueeze(1)?)?.squeeze(1)?;
        self.check_cache(cache, batch)?;
        #[cfg(feature = "cuda")]
        if self.cuda_graphs {
            if let Some(logits) = cuda_step::step(self, &ids, cache)? {
                cache.advance(1);
                return Ok(logits);
            }
        }
        let mut hidden = self.embeddings.index_select(&ids, 0)?; // (batch, d_model)
        let mut residual: Option<Tensor> = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let (normed, res) = rms_norm_residual(
                &hidden,
                residual.as_ref(),
                &block.norm_weight,
                self.config.norm_eps,
                self.config.residual_in_fp32,
            )?;
            residual = Some(res);
            hidden = self.mixer_step(&block.mixer, &normed, cache.layer_mut(i))?;
        }
        let (normed, _) = rms_norm_residual(
            &hidden,
            residual.as_ref(),
            &self.norm_f,
            self.config.norm_eps,
            self.config.residual_in_fp32,
        )?;
        cache.advance(1);
        self.logits(&normed)
    }

    /// The mixer for one token through the fused decode-step op (one launch on CUDA; the
    /// composition of the unfused ops elsewhere).
    fn mixer_step(
        &self,
        m: &Mamba2Mixer,
        u: &Tensor,
        cache: crate::cache::LayerCache<'_>,
    ) -> Result<Tensor> {
        let zxbcdt = project(u, m.in_proj.weight(), m.in_proj.bias())?; // (batch, d_in_proj)
                                                                        // z, xBC, dt: (batch, d_inner), (batch, conv_dim), (batch, nheads) views of zxbcdt
        let parts = self.projection_views(&zxbcdt)?;
        let args = self.decode_step_args(m, &parts, cache);
        let y = mixer_decode_step(&args, &self.ssd_params)?; // (batch, d_inner)
        project(&y, m.out_proj.weight(), m.out_proj.bias())
    }

    /// Greedy argmax of f32 logits over the real vocabulary (padded rows excluded).
    pub fn argmax(&self, logits: &Tensor) -> Result<Tensor> {
        let v = self.config.vocab_size.min(logits.dim(D::Minus1)?);
        Ok(logits.narrow(D::Minus1, 0, v)?.argmax(D::Minus1)?)
    }
}

/// A projection `x · wᵀ (+ bias)`, `x` `(..., in)`, through the `linear` op: on CPU its
/// streaming / tiled / GEMM kernels (f32 accumulation, also for 16-bit weights), on CUDA a
/// matrix-vector kernel for decode rows and cuBLAS beyond, on Metal Candle's matmul.
fn project(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(mamba2_ops::linear(x, w, bias)?)
}
