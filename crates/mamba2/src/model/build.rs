//! Building a [`Mamba2Model`]: from checkpoint weights (names and shapes checked tensor by
//! tensor) or with random weights of a config's shapes, through one builder.
//!
//! The multipliers inside linear maps are folded into the weights here, in f32 before the cast
//! to the model dtype (exact in real arithmetic): Granite's `residual_multiplier` and
//! Falcon-H1's `ssm_in` / `ssm_out` / `ssm_multipliers` / `attention_in` / `attention_out` /
//! `key` / `mlp_multipliers`. q/k/v rows are fused into one projection, and so are the MLP's
//! gate and up rows.

use super::matrix::{Matrix, Proj};
use super::mixers::{Attention, Block, MambaMixer, Mixer, Mlp};
use super::moe::{MoeBlock, RoutedExperts};
use super::Mamba2Model;
use crate::config::{BlockKind, Family, Mamba2Config, MlpActivation, MoeRouter};
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use mamba2_ops::quantized::is_block_format;
use mamba2_ops::{ExpertActivation, MoeRouting, QuantizedExpert, SsdParams};
use std::collections::HashMap;

/// The activation dtypes the ops implement; anything else would fail later, inside an op.
fn check_model_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::Dtype(format!(
            "model dtype {other:?} is not supported; use f32, f16 or bf16"
        ))),
    }
}

/// Where the builder reads tensors from: a checkpoint or a random generator.
pub(super) trait TensorSource {
    /// The tensor `name`, checked to have exactly `shape`, converted to `dtype`.
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// A weight matrix of exactly `shape`: dense in `dtype`, unless the source stores it
    /// block-quantized (GGUF), in which case it stays in its blocks.
    fn matrix(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Matrix> {
        Ok(Matrix::Dense(self.tensor(name, shape, dtype)?))
    }
    /// The routed experts stored as `name`, a stacked `(n_experts, rows, cols)` tensor of exactly
    /// `shape`, when the source holds them in ggml types (a GGUF; float types included): per
    /// expert, the row blocks of its matrix. `None` for sources that do not (the caller reads
    /// them with [`Self::tensor`]).
    fn quantized_experts(
        &self,
        _name: &str,
        _shape: &[usize],
    ) -> Result<Option<Vec<Vec<mamba2_ops::QuantizedMatrix>>>> {
        Ok(None)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    fn device(&self) -> &Device;
    fn describe(&self) -> String;
}

impl TensorSource for Weights {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Weights::tensor(self, name, shape, dtype)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        Weights::shape(self, name)
    }
    fn device(&self) -> &Device {
        Weights::device(self)
    }
    fn describe(&self) -> String {
        let files: Vec<String> = self
            .files()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        files.join(", ")
    }
}

/// Random weights of the shapes a config implies; each tensor is drawn from a generator seeded
/// by the model seed and the tensor's name, so it does not depend on load order.
struct RandomSource {
    shapes: HashMap<String, Vec<usize>>,
    seed: u64,
    device: Device,
    /// Std of the output projections: 1/sqrt(in) / sqrt(2 * blocks), as GPT-2-style inits.
    out_scale: f32,
    /// Large tensors in memory advised for transparent huge pages, as loaded weights are.
    huge_pages: bool,
}

impl RandomSource {
    /// `(mean, std)` of tensor `name` of `shape`.
    fn distribution(&self, name: &str, shape: &[usize]) -> (f32, f32) {
        let leaf = name.rsplit('.').take(2).collect::<Vec<_>>();
        let (last, module) = (leaf[0], leaf.get(1).copied().unwrap_or(""));
        let fan_in = shape.get(1).copied().unwrap_or(1).max(1) as f32;
        match (module, last) {
            (_, "A_log") => (1.5, 0.5),
            (_, "dt_bias") => (-3.0, 0.5),
            (_, "D") => (1.0, 0.1),
            ("conv1d", "weight") => (0.0, 0.3),
            (_, "bias") => (0.0, 0.02),
            ("embeddings" | "embed_tokens", _) => (0.0, 0.02),
            ("lm_head", _) => (0.0, 0.02),
            _ if shape.len() == 1 => (1.0, 0.05), // norm weights
            ("out_proj" | "o_proj" | "down_proj" | "output_linear", _) => {
                (0.0, fan_in.powf(-0.5) * self.out_scale)
            }
            _ => (0.0, fan_in.powf(-0.5)),
        }
    }
}

impl TensorSource for RandomSource {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        match self.shapes.get(name) {
            Some(s) if s == shape => {}
            _ => {
                return Err(Error::MissingTensor {
                    name: name.into(),
                    source_desc: "random weights".into(),
                })
            }
        }
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
        });
        let mut rng = crate::random::SplitMix64::new(self.seed ^ name_hash);
        let (mean, std) = self.distribution(name, shape);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| mean + std * rng.normal()).collect();
        let t = Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(&self.device)?;
        Ok(if self.huge_pages {
            crate::weights::in_huge_pages(t)?
        } else {
            t
        })
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes.get(name).cloned()
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn describe(&self) -> String {
        "random weights".into()
    }
}

/// Reads one model's tensors from a source, folding multipliers and fusing projections.
struct Loader<'a> {
    src: &'a dyn TensorSource,
    c: &'a Mamba2Config,
    dtype: DType,
    /// Block format for the weight matrices (quantize at load), `None` to keep them as read.
    quantize: Option<GgmlDType>,
}

impl Loader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.src.tensor(name, shape, self.dtype)
    }

    fn f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.src.tensor(name, shape, DType::F32)
    }

    /// `name` times `scale`, in the model dtype (scaled in f32).
    fn scaled(&self, name: &str, shape: &[usize], scale: f64) -> Result<Tensor> {
        if scale == 1.0 {
            return self.get(name, shape);
        }
        Ok(self
            .f32(name, shape)?
            .affine(scale, 0.0)?
            .to_dtype(self.dtype)?)
    }

    /// An optional tensor, read only when the config says it is there.
    fn opt(
        &self,
        name: &str,
        shape: &[usize],
        present: bool,
        scale: f64,
    ) -> Result<Option<Tensor>> {
        present.then(|| self.scaled(name, shape, scale)).transpose()
    }

    /// A weight matrix `name` times `scale`: as the source stores it when unscaled, else
    /// scaled in f32; then in the load-time block format, if one was asked for.
    fn matrix(&self, name: &str, shape: &[usize], scale: f64) -> Result<Matrix> {
        let m = if scale == 1.0 {
            self.src.matrix(name, shape, self.dtype)?
        } else {
            Matrix::Dense(self.scaled(name, shape, scale)?)
        };
        m.quantized_to(self.quantize)
    }

    /// A projection with its optional bias, no multipliers.
    fn proj(&self, p: &str, shape: &[usize], bias: bool, scale: f64) -> Result<Proj> {
        Ok(Proj::new(
            self.matrix(&format!("{p}.weight"), shape, scale)?,
            self.opt(&format!("{p}.bias"), &shape[..1], bias, scale)?,
        ))
    }

    /// Row-stacked projections `[a; b; ...]`, each `(name, rows, weight scale, bias scale)`.
    fn stacked(
        &self,
        p: &str,
        parts: &[(&str, usize, f64, f64)],
        cols: usize,
        bias: bool,
    ) -> Result<Proj> {
        let mut ws = Vec::with_capacity(parts.len());
        let mut bs = Vec::with_capacity(parts.len());
        for &(name, rows, ws_scale, bs_scale) in parts {
            ws.push(self.matrix(&format!("{p}{name}.weight"), &[rows, cols], ws_scale)?);
            if bias {
                bs.push(self.scaled(&format!("{p}{name}.bias"), &[rows], bs_scale)?);
            }
        }
        let w = Matrix::cat_rows(ws, self.dtype)?.quantized_to(self.quantize)?;
        let b = match bs.len() {
            0 => None,
            1 => Some(bs.remove(0)),
            _ => Some(Tensor::cat(&bs, 0)?),
        };
        Ok(Proj::new(w, b))
    }

    fn mamba(&self, p: &str) -> Result<MambaMixer> {
        let c = self.c;
        let m = &c.multipliers;
        let (h, d_in_proj, conv_dim) = (c.d_model, c.d_in_proj(), c.conv_dim());
        let in_proj = if m.ssm_in == 1.0 && m.ssm_zxbcdt == [1.0; 5] {
            self.proj(&format!("{p}in_proj"), &[d_in_proj, h], c.bias, 1.0)?
        } else {
            // Falcon-H1: in_proj(x * ssm_in) * mup, with mup constant over the z / x / B / C / dt
            // slices of the output rows.
            let gn = c.ngroups * c.d_state;
            let widths = [c.d_inner, c.d_inner, gn, gn, c.nheads];
            let rows: Vec<f32> = widths
                .iter()
                .zip(m.ssm_zxbcdt)
                .flat_map(|(&w, s)| std::iter::repeat_n(s as f32, w))
                .collect();
            let mup = Tensor::from_vec(rows, (d_in_proj, 1), self.src.device())?;
            let w = self
                .f32(&format!("{p}in_proj.weight"), &[d_in_proj, h])?
                .broadcast_mul(&mup)?
                .affine(m.ssm_in, 0.0)?
                .to_dtype(self.dtype)?;
            let b = match c.bias {
                true => Some(
                    self.f32(&format!("{p}in_proj.bias"), &[d_in_proj])?
                        .broadcast_mul(&mup.squeeze(1)?)?
                        .to_dtype(self.dtype)?,
                ),
                false => None,
            };
            Proj::new(Matrix::Dense(w).quantized_to(self.quantize)?, b)
        };
        let out_scale = m.ssm_out * m.residual;
        let a_log = self.f32(&format!("{p}A_log"), &[c.nheads])?;
        // The conv filter and bias and the gated-norm weight are kept in f32, as every kernel
        // reads them: a 16-bit copy would be cast on every call (a launch per tensor on a GPU).
        let small_f32 = |name: &str, shape: &[usize], present: bool| {
            present.then(|| self.f32(name, shape)).transpose()
        };
        Ok(MambaMixer {
            in_proj,
            conv_weight: self
                .f32(&format!("{p}conv1d.weight"), &[conv_dim, 1, c.d_conv])?
                .reshape((conv_dim, c.d_conv))?,
            conv_bias: small_f32(&format!("{p}conv1d.bias"), &[conv_dim], c.conv_bias)?,
            dt_bias: self.f32(&format!("{p}dt_bias"), &[c.nheads])?,
            a: a_log.exp()?.neg()?,
            d: self.f32(&format!("{p}D"), &[c.nheads])?,
            norm_weight: small_f32(&format!("{p}norm.weight"), &[c.d_inner], c.gated_norm)?,
            out_proj: self.proj(
                &format!("{p}out_proj"),
                &[h, c.d_inner],
                c.out_proj_bias,
                out_scale,
            )?,
        })
    }

    fn attention(&self, p: &str) -> Result<Attention> {
        let c = self.c;
        let m = &c.multipliers;
        let a = c
            .attention
            .as_ref()
            .ok_or_else(|| Error::field("num_attention_heads", "missing"))?;
        let (q, kv) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
        let (inp, key) = (m.attention_in, m.key);
        let qkv = self.stacked(
            p,
            &[
                ("q_proj", q, inp, 1.0),
                ("k_proj", kv, inp * key, key),
                ("v_proj", kv, inp, 1.0),
            ],
            c.d_model,
            a.bias,
        )?;
        let out = m.attention_out * m.residual;
        let o_proj = self.stacked(p, &[("o_proj", c.d_model, out, out)], q, a.bias)?;
        Ok(Attention { qkv, o_proj })
    }

    fn mlp(&self, p: &str) -> Result<Mlp> {
        let cfg = self
            .c
            .mlp
            .as_ref()
            .ok_or_else(|| Error::field("intermediate_size", "missing"))?;
        self.mlp_sized(p, cfg.intermediate_size)
    }

    /// The family's MLP with `i` hidden units (a MoE block's shared MLP has its own width).
    fn mlp_sized(&self, p: &str, i: usize) -> Result<Mlp> {
        let c = self.c;
        let m = &c.multipliers;
        let cfg = c
            .mlp
            .as_ref()
            .ok_or_else(|| Error::field("intermediate_size", "missing"))?;
        let (h, bias) = (c.d_model, cfg.bias);
        let down_scale = m.mlp_down * m.residual;
        let (up, down) = match (c.family, cfg.activation) {
            (Family::GraniteHybrid, _) => (
                self.stacked(p, &[("input_linear", 2 * i, 1.0, 1.0)], h, false)?,
                self.stacked(p, &[("output_linear", h, down_scale, 1.0)], i, false)?,
            ),
            (_, MlpActivation::ReluSquared) => (
                self.stacked(p, &[("up_proj", i, 1.0, 1.0)], h, bias)?,
                self.stacked(p, &[("down_proj", h, down_scale, down_scale)], i, bias)?,
            ),
            (_, MlpActivation::SwiGlu) => (
                self.stacked(
                    p,
                    &[
                        ("gate_proj", i, m.mlp_gate, m.mlp_gate),
                        ("up_proj", i, 1.0, 1.0),
                    ],
                    h,
                    bias,
                )?,
                self.stacked(p, &[("down_proj", h, down_scale, down_scale)], i, bias)?,
            ),
        };
        Ok(Mlp {
            up,
            down,
            activation: cfg.activation,
        })
    }
}

impl Loader<'_> {
    /// The routed experts as dense stacks in the model dtype, `residual` folded into `down`.
    fn dense_experts(
        &self,
        p: &str,
        (e, up_rows, h, i): (usize, usize, usize, usize),
        residual: f64,
    ) -> Result<RoutedExperts> {
        let (up, down) = match self.c.family {
            Family::GraniteHybrid => (
                self.get(&format!("{p}input_linear.weight"), &[e, up_rows, h])?,
                self.scaled(&format!("{p}output_linear.weight"), &[e, h, i], residual)?,
            ),
            _ if self.src.shape(&format!("{p}experts.up_proj")).is_some() => (
                self.get(&format!("{p}experts.up_proj"), &[e, up_rows, h])?,
                self.scaled(&format!("{p}experts.down_proj"), &[e, h, i], residual)?,
            ),
            _ => {
                let (mut ups, mut downs) = (Vec::new(), Vec::new());
                for x in 0..e {
                    ups.push(self.get(&format!("{p}experts.{x}.up_proj.weight"), &[up_rows, h])?);
                    downs.push(self.scaled(
                        &format!("{p}experts.{x}.down_proj.weight"),
                        &[h, i],
                        residual,
                    )?);
                }
                (Tensor::stack(&ups, 0)?, Tensor::stack(&downs, 0)?)
            }
        };
        Ok(RoutedExperts::Dense { up, down })
    }

    /// A MoE block: router (a missing one is a `MissingTensor`), the routed experts checked
    /// against the config's stacked shapes, and the shared MLP. Granite's experts are stored
    /// stacked; Nemotron-H's per expert (as published and as transformers 5 re-saves them) or
    /// stacked under `experts.{up,down}_proj` (transformers' in-memory names). Experts a GGUF
    /// stores in blocks stay in them ([`RoutedExperts::Quantized`]); others are dense in the
    /// model dtype whatever `quantize` says, with Granite's `residual_multiplier` folded into
    /// their down projections.
    fn moe(&self, n: &crate::config::BlockNames, layer: usize) -> Result<MoeBlock> {
        let c = self.c;
        let m = c
            .moe
            .ok_or_else(|| Error::field("num_experts_per_tok", "missing MoE settings"))?;
        let (e, h, i) = (m.num_experts, c.d_model, m.intermediate_size);
        let up_rows = match m.activation {
            MlpActivation::SwiGlu => 2 * i,
            MlpActivation::ReluSquared => i,
        };
        let p = &n.moe;
        let (router, correction_bias) = match c.family {
            Family::GraniteHybrid => (self.get(&format!("{p}router.layer.weight"), &[e, h])?, None),
            _ => (
                self.f32(&format!("{p}gate.weight"), &[e, h])?,
                Some(self.f32(&format!("{p}gate.e_score_correction_bias"), &[e])?),
            ),
        };
        let residual = c.multipliers.residual;
        let stacked_names = match c.family {
            Family::GraniteHybrid => ("input_linear.weight", "output_linear.weight"),
            _ => ("experts.up_proj", "experts.down_proj"),
        };
        let (up_name, down_name) = (
            format!("{p}{}", stacked_names.0),
            format!("{p}{}", stacked_names.1),
        );
        // Missing stacks take the dense path, whose errors name the tensors it looks for.
        let stacked = self.src.shape(&up_name).is_some() && self.src.shape(&down_name).is_some();
        let quantized = match stacked {
            true => (
                self.src.quantized_experts(&up_name, &[e, up_rows, h])?,
                self.src.quantized_experts(&down_name, &[e, h, i])?,
            ),
            false => (None, None),
        };
        let any_blocks = |v: &Option<Vec<Vec<mamba2_ops::QuantizedMatrix>>>| {
            v.iter()
                .flatten()
                .flatten()
                .any(|m| is_block_format(m.ggml_dtype()))
        };
        // Experts with no matrix in blocks are dense in the model dtype, like safetensors ones.
        let quantized = match any_blocks(&quantized.0) || any_blocks(&quantized.1) {
            true => quantized,
            false => (None, None),
        };
        let experts = if let (Some(ups), Some(downs)) = quantized {
            let experts = ups
                .into_iter()
                .zip(downs)
                .map(|(up, mut down)| match (down.pop(), down.is_empty()) {
                    (Some(down), true) => Ok(QuantizedExpert { up, down }),
                    _ => Err(Error::Unsupported(format!(
                        "{down_name}: an expert's down projection in several parts"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?;
            RoutedExperts::Quantized {
                experts,
                gate_scale: residual,
            }
        } else {
            self.dense_experts(p, (e, up_rows, h, i), residual)?
        };
        let routing = match m.router {
            MoeRouter::Softmax => MoeRouting::Softmax,
            MoeRouter::SigmoidGrouped {
                n_group,
                topk_group,
                norm_topk_prob,
                routed_scaling_factor,
            } => MoeRouting::SigmoidGrouped {
                n_group,
                topk_group,
                norm_topk_prob,
                routed_scaling_factor,
            },
        };
        Ok(MoeBlock {
            router,
            correction_bias,
            experts,
            activation: match m.activation {
                MlpActivation::SwiGlu => ExpertActivation::SwiGlu,
                MlpActivation::ReluSquared => ExpertActivation::ReluSquared,
            },
            routing,
            top_k: m.top_k,
            shared: self.mlp_sized(&n.shared_mlp, m.shared_intermediate_size)?,
            layer,
            trace: Default::default(),
        })
    }
}

impl Mamba2Model {
    /// Builds the model from checkpoint weights, converting matrices to `dtype` on the weights'
    /// device. `A_log`, `D` and `dt_bias` are kept in f32 whatever `dtype` is.
    pub fn from_weights(config: &Mamba2Config, weights: &Weights, dtype: DType) -> Result<Self> {
        Self::from_weights_quantized(config, weights, dtype, None)
    }

    /// [`Mamba2Model::from_weights`] with the weight matrices (embedding, projections, LM head)
    /// quantized at load to the block format `quantize`, where their row length is a whole
    /// number of its blocks (others stay in `dtype`, as llama.cpp keeps such tensors wider).
    /// Norms, conv, A, D and dt stay as they are.
    ///
    /// ```
    /// use candle_core::{quantized::GgmlDType, DType, Device};
    /// use mamba2::{config::Mamba2Config, model::Mamba2Model};
    /// let mut cfg = Mamba2Config::preset("130m")?;
    /// cfg.n_layer = 1; cfg.d_model = 256; cfg.d_inner = 512; cfg.nheads = 8; cfg.d_state = 16;
    /// cfg.vocab_size = 256; cfg.pad_vocab_size_multiple = 1;
    /// let dense = Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 0)?;
    /// let q8 = Mamba2Model::random_quantized(&cfg, DType::F32, &Device::Cpu, 0, Some(GgmlDType::Q8_0))?;
    /// assert_eq!(q8.quantization(), Some(GgmlDType::Q8_0));
    /// assert!(q8.weight_bytes_per_token() * 3 < dense.weight_bytes_per_token());
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn from_weights_quantized(
        config: &Mamba2Config,
        weights: &Weights,
        dtype: DType,
        quantize: Option<GgmlDType>,
    ) -> Result<Self> {
        // Nemotron-H checkpoints re-saved by transformers 5 may name the root `model`.
        let root = match config.family {
            Family::NemotronH
                if !weights.contains(&config.embedding_name("backbone"))
                    && weights.contains(&config.embedding_name("model")) =>
            {
                "model"
            }
            _ => config.default_root(),
        };
        Self::build(config, weights, root, dtype, quantize)
    }

    /// A model with random weights of the shapes `config` implies (for benchmarks and tests).
    /// Deterministic for a given `seed`.
    pub fn random(config: &Mamba2Config, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        Self::random_quantized(config, dtype, device, seed, None)
    }

    /// [`Mamba2Model::random`] with the weight matrices quantized to `quantize` as
    /// [`Mamba2Model::from_weights_quantized`] does.
    pub fn random_quantized(
        config: &Mamba2Config,
        dtype: DType,
        device: &Device,
        seed: u64,
        quantize: Option<GgmlDType>,
    ) -> Result<Self> {
        Self::random_in_pages(config, dtype, device, seed, quantize, true)
    }

    /// [`Mamba2Model::random_quantized`] with the large CPU weights in huge-page-advised memory
    /// (`huge_pages`, as [`crate::weights::Weights::with_huge_pages`]) or in ordinary pages.
    pub fn random_in_pages(
        config: &Mamba2Config,
        dtype: DType,
        device: &Device,
        seed: u64,
        quantize: Option<GgmlDType>,
        huge_pages: bool,
    ) -> Result<Self> {
        config.validate()?;
        let mut c = config.clone();
        // Random untied heads would double the vocabulary matrix for nothing a benchmark needs.
        c.tie_embeddings = true;
        let shapes = c.tensor_shapes(c.padded_vocab_size()).into_iter().collect();
        let src = RandomSource {
            shapes,
            seed,
            device: device.clone(),
            out_scale: (2.0 * c.n_blocks() as f32).powf(-0.5),
            huge_pages,
        };
        let mut model = Self::build(&c, &src, c.default_root(), dtype, quantize)?;
        model.config.tie_embeddings = config.tie_embeddings;
        Ok(model)
    }

    pub(super) fn build(
        config: &Mamba2Config,
        src: &dyn TensorSource,
        root: &str,
        dtype: DType,
        quantize: Option<GgmlDType>,
    ) -> Result<Self> {
        config.validate()?;
        check_model_dtype(dtype)?;
        let c = config;
        let emb_name = c.embedding_name(root);
        let rows = match src.shape(&emb_name) {
            Some(s) if s.len() == 2 && s[0] >= c.vocab_size => s[0],
            Some(s) => {
                return Err(Error::TensorShape {
                    name: emb_name,
                    expected: vec![c.padded_vocab_size(), c.d_model],
                    got: s,
                })
            }
            None => {
                return Err(Error::MissingTensor {
                    name: emb_name,
                    source_desc: src.describe(),
                })
            }
        };
        let loader = Loader {
            src,
            c,
            dtype,
            quantize,
        };
        let embeddings = loader.matrix(&emb_name, &[rows, c.d_model], 1.0)?;
        // Tied checkpoints may still carry an lm_head.weight equal to the embedding: read it only
        // when untied, so tied models keep one copy.
        let lm_head = match c.tie_embeddings {
            true => None,
            false => Some(loader.matrix("lm_head.weight", &[rows, c.d_model], 1.0)?),
        };
        // Not `with_capacity`: the config's layer count is only checked against the checkpoint
        // tensor by tensor, and a hostile config must not reserve memory for it.
        let mut blocks = Vec::new();
        let (mut n_ssm, mut n_kv) = (0, 0);
        for b in 0..c.n_blocks() {
            let spec = c.block_spec(b);
            let n = c.block_names(root, b);
            let mixer = match spec.kind {
                BlockKind::Mamba => Mixer::Mamba(loader.mamba(&n.mamba)?),
                BlockKind::Attention => Mixer::Attention(loader.attention(&n.attention)?),
                BlockKind::MambaAttention => {
                    Mixer::MambaAttention(loader.mamba(&n.mamba)?, loader.attention(&n.attention)?)
                }
                BlockKind::Mlp => Mixer::Mlp(loader.mlp(&n.mlp)?),
                BlockKind::Moe => Mixer::Moe(loader.moe(&n, spec.layer)?),
            };
            let slot = |has: bool, counter: &mut usize| {
                has.then(|| {
                    *counter += 1;
                    *counter - 1
                })
            };
            blocks.push(Block {
                norm_weight: src.tensor(&n.norm, &[c.d_model], dtype)?,
                mixer,
                ssm_slot: slot(spec.kind.has_ssm(), &mut n_ssm),
                kv_slot: slot(spec.kind.has_kv(), &mut n_kv),
            });
        }
        let norm_f = src.tensor(&c.final_norm_name(root), &[c.d_model], dtype)?;
        Ok(Self::assemble(
            c.clone(),
            embeddings,
            blocks,
            norm_f,
            lm_head,
            dtype,
            src.device().clone(),
        ))
    }

    fn assemble(
        config: Mamba2Config,
        embeddings: Matrix,
        blocks: Vec<Block>,
        norm_f: Tensor,
        lm_head: Option<Matrix>,
        dtype: DType,
        device: Device,
    ) -> Self {
        let tied = lm_head.is_none();
        let lm_head = lm_head.unwrap_or_else(|| embeddings.clone());
        let ssd_params = SsdParams {
            chunk_size: config.chunk_size,
            dt_softplus: true,
            dt_limit: config.dt_limit,
        };
        // Prompts are fed in pieces of this many tokens so that activations stay bounded. On the
        // CPU a piece's activations must also stay in the last-level cache: at 130m f32 they are
        // ~50 KB per token and layer, and 2048-token pieces (100 MB per layer, 32 MiB of L3 here)
        // prefilled 2048 tokens 27 % slower per token than 512-token pieces do (BENCHMARKS.md,
        // "CPU"). 512 tokens, rounded up to whole SSD chunks.
        let max_prefill_tokens = if device.is_cpu() {
            512usize.div_ceil(config.chunk_size) * config.chunk_size // chunk_size >= 1 (validated)
        } else {
            (config.chunk_size * 8).max(512)
        };
        Self {
            config,
            embeddings,
            blocks,
            norm_f,
            lm_head,
            tied,
            dtype,
            device,
            ssd_params,
            max_prefill_tokens,
            cuda_graphs: true,
            runtime: Default::default(),
            fingerprint: Default::default(),
        }
    }
}
