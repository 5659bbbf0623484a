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
/// The weights' content fingerprint that session files record.
mod fingerprint;
/// Models from GGUF files.
mod gguf_source;
#[allow(unused_imports)] // for the GGUF writer
pub(crate) use gguf_source::{gguf_name, Transform as GgufTransform};
/// Dense or block-quantized weight matrices.
mod matrix;
/// The block kinds: Mamba-2 mixer, attention, MLP.
mod mixers;
/// The mixture-of-experts block and its routing trace (debug API).
mod moe;
use candle_core::{DType, Device, Tensor, D};
use mamba2_ops::{rms_norm_residual, SsdParams};
use matrix::Matrix;
pub(crate) use mixers::MambaMixer;
use mixers::{Block, BlockCtx, Mixer, Pass};
pub use moe::RoutingTrace;

/// One layer of a pure Mamba-2 stack (see [`Mamba2Model::mamba_stack`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct StackLayer<'a> {
    pub norm: &'a Tensor,
    pub mixer: &'a MambaMixer,
    pub gated_norm: &'a Tensor,
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
    embeddings: Matrix, // (vocab_rows, d_model)
    blocks: Vec<Block>,
    norm_f: Tensor,  // (d_model)
    lm_head: Matrix, // (vocab_rows, d_model)
    tied: bool,
    dtype: DType,
    device: Device,
    ssd_params: SsdParams,
    max_prefill_tokens: usize,
    cuda_graphs: bool,
    /// Thread pool and kernel options (see [`crate::threads`]).
    runtime: crate::threads::Runtime,
    /// [`Mamba2Model::weights_fingerprint`], computed on first use.
    fingerprint: std::sync::Arc<std::sync::OnceLock<String>>,
}

impl Mamba2Model {
    /// The validated config.
    pub fn config(&self) -> &Mamba2Config {
        &self.config
    }

    /// Activation dtype, and the dtype of the weights that are not block-quantized.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Rows of the output layer: the width of the logits (the padded vocabulary).
    pub fn vocab_rows(&self) -> usize {
        self.lm_head.dims().0
    }

    /// Number of parameters (tied matrices counted once).
    pub fn num_parameters(&self) -> usize {
        let mut n = self.embeddings.elem_count() + self.norm_f.elem_count();
        if !self.tied {
            n += self.lm_head.elem_count();
        }
        n + self
            .blocks
            .iter()
            .map(|b| b.norm_weight.elem_count() + b.mixer.num_parameters())
            .sum::<usize>()
    }

    /// Parameters one token computes with: [`Mamba2Model::num_parameters`] less, in every
    /// mixture-of-experts block, the `num_experts - num_experts_per_tok` routed experts the token
    /// is not sent to. The embedding table is included (a tied one counted once), as in the
    /// "active parameters" figures published with embeddings; equal to the total for dense
    /// models.
    pub fn num_active_parameters(&self) -> usize {
        let mut n = self.embeddings.elem_count() + self.norm_f.elem_count();
        if !self.tied {
            n += self.lm_head.elem_count();
        }
        n + self
            .blocks
            .iter()
            .map(|b| b.norm_weight.elem_count() + b.mixer.active_parameters())
            .sum::<usize>()
    }

    /// Bytes of every weight as stored (block-quantized matrices at their block size, a tied
    /// embedding once): the model's weight memory.
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let lm_head = if self.tied {
            0
        } else {
            self.lm_head.storage_bytes()
        };
        self.embeddings.storage_bytes()
            + lm_head
            + bytes(&self.norm_f)
            + self
                .blocks
                .iter()
                .map(|b| bytes(&b.norm_weight) + b.mixer.storage_bytes())
                .sum::<usize>()
    }

    /// Bytes of weights one decode step of one sequence reads, as stored (block-quantized
    /// matrices at their block size):
    ///
    /// `norms + LM head + sum over blocks of their weights`, where a mixture-of-experts block
    /// counts its router, its shared MLP and only `num_experts_per_tok / num_experts` of its
    /// stacked routed experts (the `up` and `down` rows of the experts the token is sent to), and
    /// the embedding table counts nothing (one row is read).
    ///
    /// This is the active figure of batch 1. A batch of `B` sequences reads the shared weights
    /// once and up to `min(num_experts, B * num_experts_per_tok)` experts per MoE block.
    /// `crates/mamba2/tests/moe_bytes_touched.rs` measures the pages a decode step touches
    /// against it.
    pub fn weight_bytes_per_token(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        bytes(&self.norm_f)
            + self.lm_head.storage_bytes()
            + self
                .blocks
                .iter()
                .map(|b| bytes(&b.norm_weight) + b.mixer.active_storage_bytes())
                .sum::<usize>()
    }

    /// Bytes one decode step of one sequence reads besides the attention caches:
    /// [`Mamba2Model::weight_bytes_per_token`] plus the recurrent state
    /// ([`Mamba2Config::ssm_state_bytes`], read once; its write-back is not counted). Attention
    /// blocks also read their KV cache, which grows with the context
    /// ([`Mamba2Config::kv_bytes_per_token`] per cached position).
    pub fn decode_bytes_per_token(&self) -> usize {
        self.weight_bytes_per_token() + self.config.ssm_state_bytes()
    }

    /// Test API: every dense weight tensor under a name (`embeddings`, `lm_head` when untied,
    /// `norm_f`, `blocks.{b}.norm`, `blocks.{b}.{role}` with roles such as `in_proj`, `qkv`,
    /// `router`, `experts.up`, `experts.down`, `shared_up`). Block-quantized matrices are left
    /// out. For measuring which weights an op reads.
    #[doc(hidden)]
    pub fn dense_weight_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        out.extend(
            self.embeddings
                .dense()
                .map(|t| ("embeddings".into(), t.clone())),
        );
        if !self.tied {
            out.extend(self.lm_head.dense().map(|t| ("lm_head".into(), t.clone())));
        }
        out.push(("norm_f".into(), self.norm_f.clone()));
        for (b, block) in self.blocks.iter().enumerate() {
            out.push((format!("blocks.{b}.norm"), block.norm_weight.clone()));
            for (role, t) in block.mixer.dense_tensors() {
                out.push((format!("blocks.{b}.{role}"), t));
            }
        }
        out
    }

    /// The block format of the projections, when the model was loaded block-quantized (the
    /// first quantized matrix's; GGUF files may mix formats across tensors).
    pub fn quantization(&self) -> Option<candle_core::quantized::GgmlDType> {
        self.lm_head
            .ggml_dtype()
            .or_else(|| self.embeddings.ggml_dtype())
            .or_else(|| self.blocks.iter().find_map(|b| b.mixer.first_ggml_dtype()))
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

    /// Sets the CPU threads this model computes on (`None`: the physical cores). The pool is
    /// shared with every model of the same thread count in the process, so sessions generating
    /// at once never run more threads than that. `Some(0)` is refused.
    ///
    /// ```
    /// # use mamba2::{config::Mamba2Config, model::Mamba2Model};
    /// # let mut cfg = Mamba2Config::preset("130m")?;
    /// # cfg.n_layer = 1; cfg.d_model = 64; cfg.d_inner = 128; cfg.nheads = 2; cfg.d_state = 16;
    /// # cfg.vocab_size = 100; cfg.pad_vocab_size_multiple = 1;
    /// let mut model =
    ///     Mamba2Model::random(&cfg, candle_core::DType::F32, &candle_core::Device::Cpu, 0)?;
    /// model.set_threads(Some(1))?;
    /// assert_eq!(model.threads()?, 1);
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn set_threads(&mut self, threads: Option<usize>) -> Result<()> {
        self.runtime.set_threads(threads)
    }

    /// The number of CPU threads this model computes on.
    pub fn threads(&self) -> Result<usize> {
        Ok(self.runtime.pool()?.current_num_threads())
    }

    /// Sets the switches of the ops' fast paths for this model's forwards and steps (CPU tier,
    /// prefetch, GEMM variants, CUDA layouts); without it the ops use the process options of
    /// [`mamba2_ops::options`]. A CPU tier this machine lacks is refused.
    pub fn set_kernel_options(
        &mut self,
        options: mamba2_ops::options::KernelOptions,
    ) -> Result<()> {
        self.runtime.set_options(options)
    }

    /// The kernel options set with [`Mamba2Model::set_kernel_options`], if any.
    pub fn kernel_options(&self) -> Option<&mamba2_ops::options::KernelOptions> {
        self.runtime.options()
    }

    /// A zeroed cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> Result<Mamba2Cache> {
        Mamba2Cache::new(&self.config, batch, &self.device)
    }

    /// Rows of prompt this model feeds per forward in [`Mamba2Model::prefill`] and
    /// [`Mamba2Model::prefill_tokens`] (cancellation is checked between pieces).
    pub fn max_prefill_tokens(&self) -> usize {
        self.max_prefill_tokens
    }

    /// Host token ids checked on the host (every id a row of the embedding) and uploaded once,
    /// `(n)` u32 on the model's device: the paths fed from host ids never read ids back.
    fn upload_ids(&self, ids: &[u32]) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let rows = self.vocab_rows();
        if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= rows) {
            return Err(Error::TokenOutOfRange {
                id: id as i64,
                position: pos,
                vocab: rows,
            });
        }
        Ok(Tensor::new(ids, &self.device)?)
    }

    /// Checks `(batch, seqlen)` ids given as a tensor: integer dtype, non-empty, every id a row
    /// of the embedding (which reads the ids to the host once; the `*_tokens` methods take host
    /// ids and skip that).
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
        let (n_ssm, n_kv) = (self.config.n_ssm_blocks(), self.config.n_kv_blocks());
        if cache.batch() != batch || cache.n_layer() != n_ssm || cache.n_kv() != n_kv {
            return Err(Error::InvalidInput(format!(
                "cache holds {} sequences x {} SSM + {} KV states, input has batch {batch} for a \
                 model with {n_ssm} Mamba and {n_kv} attention blocks",
                cache.batch(),
                cache.n_layer(),
                cache.n_kv(),
            )));
        }
        Ok(())
    }

    /// One forward over `input_ids` `(batch, seqlen)`, returning f32 logits at every position,
    /// `(batch, seqlen, vocab_rows)`. With a cache, the sequence continues from the cache's
    /// state and the cache is left at the end of it (prefill, chunked prefill, multi-turn).
    pub fn forward(&self, input_ids: &Tensor, cache: Option<&mut Mamba2Cache>) -> Result<Tensor> {
        self.runtime.run(self.device.is_cpu(), || {
            let hidden = self.backbone(input_ids, cache)?; // (batch, seqlen, d_model)
            self.logits(&hidden)
        })?
    }

    /// Prefill that returns only the logits of the last position, `(batch, vocab_rows)` f32,
    /// feeding the prompt in pieces of bounded size so memory does not grow with its length.
    pub fn prefill(&self, input_ids: &Tensor, cache: &mut Mamba2Cache) -> Result<Tensor> {
        self.runtime
            .run(self.device.is_cpu(), || self.prefill_here(input_ids, cache))?
    }

    fn prefill_here(&self, input_ids: &Tensor, cache: &mut Mamba2Cache) -> Result<Tensor> {
        let (_, seqlen) = input_ids.dims2().map_err(|_| {
            Error::InvalidInput(format!(
                "input_ids must be (batch, seqlen), got {:?}",
                input_ids.dims()
            ))
        })?;
        if seqlen == 0 {
            return Err(Error::EmptyPrompt);
        }
        let ids = self.check_ids(input_ids)?;
        self.prefill_pieces(&ids, cache, None, &mut |_, _| {})
    }

    /// [`Mamba2Model::prefill`] of one sequence given as host token ids: the ids are checked on
    /// the host and uploaded once (no device read-back), and `cancel` is checked before every
    /// piece of [`Mamba2Model::max_prefill_tokens`] tokens. A cancelled prefill returns
    /// [`Error::Cancelled`], with the cache left after the pieces that ran (its
    /// [`Mamba2Cache::seqlen_offset`] says how many tokens that is). Returns the logits of the
    /// last token, `(1, vocab_rows)` f32.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use mamba2::{session::CancelToken, Mamba2Config, Mamba2Model};
    /// let mut cfg = Mamba2Config::preset("130m")?;
    /// cfg.n_layer = 1; cfg.d_model = 64; cfg.d_inner = 128; cfg.nheads = 2; cfg.d_state = 16;
    /// cfg.vocab_size = 50; cfg.pad_vocab_size_multiple = 1;
    /// let model = Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 0)?;
    /// let mut cache = model.new_cache(1)?;
    /// let logits = model.prefill_tokens(&[1, 2, 3], &mut cache, &CancelToken::new())?;
    /// assert_eq!(logits.dims(), &[1, 50]);
    /// let cancelled = CancelToken::new();
    /// cancelled.cancel();
    /// let err = model.prefill_tokens(&[4, 5], &mut cache, &cancelled).unwrap_err();
    /// assert!(matches!(err, mamba2::Error::Cancelled));
    /// assert_eq!(cache.seqlen_offset(), 3);
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn prefill_tokens(
        &self,
        tokens: &[u32],
        cache: &mut Mamba2Cache,
        cancel: &crate::session::CancelToken,
    ) -> Result<Tensor> {
        self.prefill_tokens_with_progress(tokens, cache, cancel, &mut |_, _| {})
    }

    /// [`Mamba2Model::prefill_tokens`] that calls `on_piece(done, total)` after every piece
    /// (tokens prefilled so far, tokens in all): a progress bar for long prompts, and a place
    /// to decide to cancel.
    pub fn prefill_tokens_with_progress(
        &self,
        tokens: &[u32],
        cache: &mut Mamba2Cache,
        cancel: &crate::session::CancelToken,
        on_piece: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<Tensor> {
        let ids = self.upload_ids(tokens)?.unsqueeze(0)?; // (1, n)
        self.runtime.run(self.device.is_cpu(), || {
            self.prefill_pieces(&ids, cache, Some(cancel), on_piece)
        })?
    }

    /// The pieces of a prefill over checked `(batch, seqlen)` u32 ids on the device.
    fn prefill_pieces(
        &self,
        ids: &Tensor,
        cache: &mut Mamba2Cache,
        cancel: Option<&crate::session::CancelToken>,
        on_piece: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<Tensor> {
        let seqlen = ids.dim(1)?;
        let mut start = 0;
        let mut last_hidden = None;
        while start < seqlen {
            if cancel.is_some_and(|c| c.is_cancelled()) {
                return Err(Error::Cancelled);
            }
            let len = self.max_prefill_tokens.min(seqlen - start);
            let piece = ids.narrow(1, start, len)?;
            let hidden = self.backbone_checked(&piece, Some(cache))?; // (batch, len, d_model)
            last_hidden = Some(hidden.narrow(1, len - 1, 1)?);
            start += len;
            on_piece(start, seqlen);
        }
        let last = last_hidden.expect("seqlen >= 1");
        Ok(self.logits(&last)?.squeeze(1)?)
    }

    /// Embeddings, blocks and final norm over a sequence;
    /// `(batch, seqlen, d_model)` in the model dtype.
    fn backbone(&self, input_ids: &Tensor, cache: Option<&mut Mamba2Cache>) -> Result<Tensor> {
        input_ids.dims2().map_err(|_| {
            Error::InvalidInput(format!(
                "input_ids must be (batch, seqlen), got {:?}",
                input_ids.dims()
            ))
        })?;
        let ids = self.check_ids(input_ids)?;
        self.backbone_checked(&ids, cache)
    }

    /// [`Self::backbone`] over ids already checked and on the device, `(batch, seqlen)` u32.
    fn backbone_checked(&self, ids: &Tensor, cache: Option<&mut Mamba2Cache>) -> Result<Tensor> {
        let (batch, seqlen) = ids.dims2()?;
        if let Some(c) = cache.as_deref() {
            self.check_cache(c, batch)?;
        }
        let hidden =
            self.embed(&ids.flatten_all()?)?
                .reshape((batch, seqlen, self.config.d_model))?;
        self.run_blocks(hidden, cache, Pass::Prefill)
    }

    /// Embedding rows of `ids` `(n)` → `(n, d_model)`, times the embedding multiplier.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let rows = self.embeddings.rows(ids, self.dtype)?;
        let m = self.config.multipliers.embedding;
        Ok(if m == 1.0 { rows } else { rows.affine(m, 0.0)? })
    }

    /// The layer loop, shared by prefill and decode: for every block the residual add + RMSNorm,
    /// then the block; then the final norm. `hidden` is `(batch, seqlen, d_model)` (seqlen 1 in
    /// a step); the cache, when given, advances by `seqlen`.
    fn run_blocks(
        &self,
        mut hidden: Tensor,
        mut cache: Option<&mut Mamba2Cache>,
        pass: Pass,
    ) -> Result<Tensor> {
        let seqlen = hidden.dim(1)?;
        let ctx = BlockCtx {
            config: &self.config,
            ssd_params: &self.ssd_params,
            pass,
            position_offset: cache.as_deref().map_or(0, |c| c.seqlen_offset()),
        };
        let (eps, fp32) = (self.config.norm_eps, self.config.residual_in_fp32);
        let mut residual: Option<Tensor> = None;
        for block in &self.blocks {
            let (normed, res) =
                rms_norm_residual(&hidden, residual.as_ref(), &block.norm_weight, eps, fp32)?;
            residual = Some(res);
            let state = cache
                .as_deref_mut()
                .map(|c| c.block_mut(block.ssm_slot, block.kv_slot));
            hidden = block.forward(&ctx, &normed, state)?;
        }
        let (normed, _) = rms_norm_residual(&hidden, residual.as_ref(), &self.norm_f, eps, fp32)?;
        if let Some(c) = cache {
            c.advance(seqlen);
        }
        Ok(normed)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        // (.., d_model) x (vocab_rows, d_model)^T
        let logits = self.lm_head.project(hidden, None)?.to_dtype(DType::F32)?;
        let m = self.config.multipliers.logits;
        Ok(if m == 1.0 {
            logits
        } else {
            logits.affine(m, 0.0)?
        })
    }

    /// One decode step: `input_ids` `(batch)` → f32 logits `(batch, vocab_rows)`; the cache
    /// advances by one token.
    pub fn step(&self, input_ids: &Tensor, cache: &mut Mamba2Cache) -> Result<Tensor> {
        // On the CPU the whole step runs on a worker of the model's pool (see `threads::Runtime`).
        self.runtime
            .run(self.device.is_cpu(), || self.step_here(input_ids, cache))?
    }

    fn step_here(&self, input_ids: &Tensor, cache: &mut Mamba2Cache) -> Result<Tensor> {
        let batch = input_ids.dims1().map_err(|_| {
            Error::InvalidInput(format!(
                "step input_ids must be (batch), got {:?}",
                input_ids.dims()
            ))
        })?;
        let ids = self.check_ids(&input_ids.unsqueeze(1)?)?.squeeze(1)?;
        self.step_checked(&ids, batch, cache)
    }

    /// [`Mamba2Model::step`] with one token per sequence given as host ids: checked on the
    /// host and uploaded, with no device read-back (the decode loop of a session).
    pub fn step_tokens(&self, tokens: &[u32], cache: &mut Mamba2Cache) -> Result<Tensor> {
        let ids = self.upload_ids(tokens)?; // (batch)
        self.runtime.run(self.device.is_cpu(), || {
            self.step_checked(&ids, tokens.len(), cache)
        })?
    }

    /// A step over checked `(batch)` u32 ids on the device.
    fn step_checked(&self, ids: &Tensor, batch: usize, cache: &mut Mamba2Cache) -> Result<Tensor> {
        self.check_cache(cache, batch)?;
        #[cfg(feature = "cuda")]
        if self.cuda_graphs {
            if let Some(logits) = cuda_step::step(self, ids, cache)? {
                cache.advance(1);
                return Ok(logits);
            }
        }
        let hidden = self.embed(ids)?.unsqueeze(1)?; // (batch, 1, d_model)
        let normed = self.run_blocks(hidden, Some(cache), Pass::Step)?;
        cache.swap_conv_buffers();
        self.logits(&normed.squeeze(1)?)
    }

    /// Whether [`Mamba2Model::step`] on CUDA can replay a captured graph of the whole step: pure
    /// Mamba-2 models with dense weights; hybrids and block-quantized models decode with one
    /// launch per op.
    pub fn decode_graph_supported(&self) -> bool {
        self.mamba_stack().is_some()
    }

    /// The blocks as a pure Mamba-2 stack (every block a Mamba mixer with its gated norm, no
    /// embedding or logits multiplier), the layout the captured CUDA step records; `None` for
    /// anything else.
    pub(crate) fn mamba_stack(&self) -> Option<Vec<StackLayer<'_>>> {
        let m = &self.config.multipliers;
        if m.embedding != 1.0 || m.logits != 1.0 {
            return None;
        }
        self.embeddings.dense()?;
        self.lm_head.dense()?;
        self.blocks
            .iter()
            .map(|b| match &b.mixer {
                Mixer::Mamba(mixer) if mixer.dense_projections() => Some(StackLayer {
                    norm: &b.norm_weight,
                    mixer,
                    gated_norm: mixer.norm_weight.as_ref()?,
                }),
                _ => None,
            })
            .collect()
    }

    /// Greedy argmax of f32 logits over the real vocabulary (padded rows excluded).
    pub fn argmax(&self, logits: &Tensor) -> Result<Tensor> {
        let v = self.config.vocab_size.min(logits.dim(D::Minus1)?);
        Ok(logits.narrow(D::Minus1, 0, v)?.argmax(D::Minus1)?)
    }
}
