//! Building a [`Mamba2Model`]: from checkpoint weights (names and shapes checked tensor by
//! tensor) or with random weights of a config's shapes.

use super::{Mamba2Block, Mamba2Mixer, Mamba2Model};
use crate::config::Mamba2Config;
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;
use mamba2_ops::SsdParams;

/// The activation dtypes the ops implement; anything else would fail later, inside an op.
fn check_model_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::Dtype(format!(
            "model dtype {other:?} is not supported; use f32, f16 or bf16"
        ))),
    }
}

fn layer_name(i: usize, rest: &str) -> String {
    format!("backbone.layers.{i}.{rest}")
}

impl Mamba2Model {
    /// Builds the model from checkpoint weights, converting matrices to `dtype` on the weights'
    /// device. `A_log`, `D` and `dt_bias` are kept in f32 whatever `dtype` is.
    pub fn from_weights(config: &Mamba2Config, weights: &Weights, dtype: DType) -> Result<Self> {
        config.validate()?;
        check_model_dtype(dtype)?;
        let c = config;
        let emb_name = "backbone.embeddings.weight";
        let rows = match weights.shape(emb_name) {
            Some(s) if s.len() == 2 => s[0],
            Some(s) => {
                return Err(Error::TensorShape {
                    name: emb_name.into(),
                    expected: vec![c.padded_vocab_size(), c.d_model],
                    got: s,
                })
            }
            None => {
                return Err(Error::MissingTensor {
                    name: emb_name.into(),
                    source_desc: source_desc(weights),
                })
            }
        };
        if rows < c.vocab_size {
            return Err(Error::TensorShape {
                name: emb_name.into(),
                expected: vec![c.padded_vocab_size(), c.d_model],
                got: vec![rows, c.d_model],
            });
        }
        let embeddings = weights.tensor(emb_name, &[rows, c.d_model], dtype)?;
        // Tied checkpoints may still carry an lm_head.weight equal to the embedding: read it only
        // when untied, so tied models keep one copy.
        let lm_head = if c.tie_embeddings {
            None
        } else if weights.contains("lm_head.weight") {
            Some(weights.tensor("lm_head.weight", &[rows, c.d_model], dtype)?)
        } else {
            return Err(Error::MissingTensor {
                name: "lm_head.weight".into(),
                source_desc: source_desc(weights),
            });
        };
        // Not `with_capacity(n_layer)`: the config's layer count is only checked against the
        // checkpoint tensor by tensor, and a hostile config must not reserve memory for it.
        let mut blocks = Vec::new();
        for i in 0..c.n_layer {
            let t = |rest: &str, shape: &[usize], dt: DType| {
                weights.tensor(&layer_name(i, rest), shape, dt)
            };
            let opt =
                |rest: &str, shape: &[usize], dt: DType, present: bool| -> Result<Option<Tensor>> {
                    if present {
                        t(rest, shape, dt).map(Some)
                    } else {
                        Ok(None)
                    }
                };
            let (d_in_proj, conv_dim) = (c.d_in_proj(), c.conv_dim());
            let in_proj = Linear::new(
                t("mixer.in_proj.weight", &[d_in_proj, c.d_model], dtype)?,
                opt("mixer.in_proj.bias", &[d_in_proj], dtype, c.bias)?,
            );
            let out_proj = Linear::new(
                t("mixer.out_proj.weight", &[c.d_model, c.d_inner], dtype)?,
                opt("mixer.out_proj.bias", &[c.d_model], dtype, c.bias)?,
            );
            let a_log = t("mixer.A_log", &[c.nheads], DType::F32)?;
            let mixer = Mamba2Mixer {
                in_proj,
                conv_weight: t("mixer.conv1d.weight", &[conv_dim, 1, c.d_conv], dtype)?
                    .reshape((conv_dim, c.d_conv))?,
                conv_bias: opt("mixer.conv1d.bias", &[conv_dim], dtype, c.conv_bias)?,
                dt_bias: t("mixer.dt_bias", &[c.nheads], DType::F32)?,
                a: a_log.exp()?.neg()?,
                d: t("mixer.D", &[c.nheads], DType::F32)?,
                norm_weight: t("mixer.norm.weight", &[c.d_inner], dtype)?,
                out_proj,
            };
            blocks.push(Mamba2Block {
                norm_weight: t("norm.weight", &[c.d_model], dtype)?,
                mixer,
            });
        }
        let norm_f = weights.tensor("backbone.norm_f.weight", &[c.d_model], dtype)?;
        Ok(Self::assemble(
            c.clone(),
            embeddings,
            blocks,
            norm_f,
            lm_head,
            dtype,
            weights.device().clone(),
        ))
    }

    fn assemble(
        config: Mamba2Config,
        embeddings: Tensor,
        blocks: Vec<Mamba2Block>,
        norm_f: Tensor,
        lm_head: Option<Tensor>,
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
        // CPU round 11). 512 tokens, rounded up to whole SSD chunks.
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
        }
    }

    /// A model with random weights of the shapes `config` implies (for benchmarks and tests).
    /// Deterministic for a given `seed`.
    pub fn random(config: &Mamba2Config, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        config.validate()?;
        check_model_dtype(dtype)?;
        let c = config;
        let mut rng = crate::random::SplitMix64::new(seed);
        let mut randn = |shape: &[usize], std: f32, mean: f32| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| mean + std * rng.normal()).collect();
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
        };
        let rows = c.padded_vocab_size();
        let embeddings = randn(&[rows, c.d_model], 0.02, 0.0)?.to_dtype(dtype)?;
        let mut blocks = Vec::with_capacity(c.n_layer);
        for _ in 0..c.n_layer {
            let (d_in_proj, conv_dim) = (c.d_in_proj(), c.conv_dim());
            let in_std = (1.0 / c.d_model as f32).sqrt();
            let out_std = (1.0 / c.d_inner as f32).sqrt() / (2.0 * c.n_layer as f32).sqrt();
            let a_log = randn(&[c.nheads], 0.5, 1.5)?;
            let mixer = Mamba2Mixer {
                in_proj: Linear::new(
                    randn(&[d_in_proj, c.d_model], in_std, 0.0)?.to_dtype(dtype)?,
                    None,
                ),
                conv_weight: randn(&[conv_dim, c.d_conv], 0.3, 0.0)?.to_dtype(dtype)?,
                conv_bias: c
                    .conv_bias
                    .then(|| randn(&[conv_dim], 0.1, 0.0))
                    .transpose()?
                    .map(|t| t.to_dtype(dtype))
                    .transpose()?,
                dt_bias: randn(&[c.nheads], 0.5, -3.0)?,
                a: a_log.exp()?.neg()?,
                d: randn(&[c.nheads], 0.1, 1.0)?,
                norm_weight: randn(&[c.d_inner], 0.05, 1.0)?.to_dtype(dtype)?,
                out_proj: Linear::new(
                    randn(&[c.d_model, c.d_inner], out_std, 0.0)?.to_dtype(dtype)?,
                    None,
                ),
            };
            blocks.push(Mamba2Block {
                norm_weight: randn(&[c.d_model], 0.05, 1.0)?.to_dtype(dtype)?,
                mixer,
            });
        }
        let norm_f = randn(&[c.d_model], 0.05, 1.0)?.to_dtype(dtype)?;
        Ok(Self::assemble(
            c.clone(),
            embeddings,
            blocks,
            norm_f,
            None,
            dtype,
            device.clone(),
        ))
    }
}

fn source_desc(weights: &Weights) -> String {
    let files: Vec<String> = weights
        .files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    files.join(", ")
}
