//! A [`Mamba2Config`] from the metadata of a GGUF file as llama.cpp's `convert_hf_to_gguf.py`
//! writes it (`{arch}.embedding_length`, `{arch}.ssm.*`, ...), plus what only the tensor table
//! tells (vocabulary rows, a tied head, conv and projection biases).
//!
//! llama.cpp's `mamba2` keys: `embedding_length` (d_model), `block_count`, `ssm.conv_kernel`,
//! `ssm.inner_size` (d_inner), `ssm.state_size`, `ssm.time_step_rank` (the number of heads),
//! `ssm.group_count`, `attention.layer_norm_rms_epsilon`. A GGUF carries no dt limit or chunk
//! size: llama.cpp runs with the limit (0, inf), HF's default, and the chunk size does not change
//! the result.
//!
//! The hybrid architectures (`granitehybrid`, `nemotron_h`, `nemotron_h_moe`, `falcon-h1`) are
//! read in `gguf_hybrid.rs`, their mixture-of-experts keys in `gguf_moe.rs`.

use super::{Family, Mamba2Config};
use crate::error::{Error, Result};
use crate::gguf::{GgufError, GgufFile, GgufValue};

#[path = "gguf_hybrid.rs"]
mod gguf_hybrid;
#[path = "gguf_moe.rs"]
mod gguf_moe;

/// The GGUF architectures this engine maps to a model graph.
pub const GGUF_ARCHITECTURES: &[&str] = &[
    "mamba2",
    "granitehybrid",
    "nemotron_h",
    "nemotron_h_moe",
    "falcon-h1",
];

/// Typed access to the `{arch}.*` keys of one file; errors name the full key.
pub(super) struct Keys<'a> {
    pub file: &'a GgufFile,
    pub arch: &'a str,
}

impl<'a> Keys<'a> {
    pub fn new(file: &'a GgufFile) -> Result<Self> {
        Ok(Self {
            file,
            arch: file.architecture()?,
        })
    }

    /// `{arch}.{k}`.
    pub fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    pub fn path(&self) -> String {
        self.file.path().display().to_string()
    }

    /// An unsigned integer key that fits in `usize`, if present.
    pub fn optional(&self, k: &str) -> Result<Option<usize>> {
        let key = self.key(k);
        match self.file.get_u64(&key)? {
            None => Ok(None),
            Some(v) => usize::try_from(v)
                .map(Some)
                .map_err(|_| Error::field(key, format!("{v} does not fit in usize"))),
        }
    }

    /// An unsigned integer key that must be present.
    pub fn required(&self, k: &str) -> Result<usize> {
        self.optional(k)?.ok_or_else(|| {
            GgufError::MissingKey {
                path: self.path(),
                key: self.key(k),
            }
            .into()
        })
    }

    /// A float key. The converter writes floats as f32: an f32 is read back as the shortest
    /// decimal that rounds to it, i.e. the value of the HF config it came from (`1e-5`, not
    /// `9.99999975e-6`), so that the config equals the one read from `config.json`.
    pub fn float(&self, k: &str) -> Result<Option<f64>> {
        let key = self.key(k);
        match self.file.get(&key) {
            Some(GgufValue::F32(v)) => Ok(Some(v.to_string().parse().unwrap_or(f64::from(*v)))),
            _ => self.file.get_f64(&key),
        }
    }

    /// A per-layer integer key as llama.cpp's `get_key_or_arr` reads it: one value for every
    /// layer, or an array of exactly `n_layer` non-negative integers. `None` when absent.
    pub fn per_layer(&self, k: &str, n_layer: usize) -> Result<Option<Vec<usize>>> {
        let key = self.key(k);
        let Some(v) = self.file.get(&key) else {
            return Ok(None);
        };
        if let Some(arr) = v.as_array() {
            if arr.len() != n_layer {
                return Err(Error::field(
                    key,
                    format!("lists {} layers but block_count is {n_layer}", arr.len()),
                ));
            }
            return arr
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_u64()
                        .and_then(|x| usize::try_from(x).ok())
                        .ok_or_else(|| {
                            Error::field(
                                format!("{key}[{i}]"),
                                format!("{} is not a non-negative integer", x.describe()),
                            )
                        })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some);
        }
        Ok(self.optional(k)?.map(|v| vec![v; n_layer]))
    }
}

/// The Mamba-2 mixer sizes every architecture here shares (`{arch}.ssm.*`).
pub(super) struct SsmSizes {
    pub d_inner: usize,
    pub nheads: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub ngroups: usize,
}

impl SsmSizes {
    pub fn read(keys: &Keys<'_>) -> Result<Self> {
        let d_inner = keys.required("ssm.inner_size")?;
        let nheads = keys.required("ssm.time_step_rank")?;
        if nheads == 0 || d_inner % nheads != 0 {
            return Err(Error::field(
                keys.key("ssm.time_step_rank"),
                format!("{nheads} heads do not divide ssm.inner_size {d_inner}"),
            ));
        }
        Ok(Self {
            d_inner,
            nheads,
            d_state: keys.required("ssm.state_size")?,
            d_conv: keys.required("ssm.conv_kernel")?,
            ngroups: keys.optional("ssm.group_count")?.unwrap_or(1),
        })
    }
}

/// Rows of `token_embd.weight`, checked to be `(rows, d_model)`.
pub(super) fn vocab_rows(file: &GgufFile, d_model: usize) -> Result<usize> {
    let emb = file
        .tensor_info("token_embd.weight")
        .ok_or_else(|| Error::MissingTensor {
            name: "token_embd.weight".into(),
            source_desc: file.path().display().to_string(),
        })?;
    match emb.shape().as_slice() {
        [rows, cols] if *cols == d_model => Ok(*rows),
        _ => Err(Error::TensorShape {
            name: "token_embd.weight".into(),
            expected: vec![0, d_model],
            got: emb.shape(),
        }),
    }
}

/// `(bos, eos, pad)` from `tokenizer.ggml.*` (ids that do not fit in u32 are ignored).
pub(super) fn token_ids(file: &GgufFile) -> Result<(Option<u32>, Vec<u32>, Option<u32>)> {
    let token = |k: &str| -> Result<Option<u32>> {
        Ok(file
            .get_u64(&format!("tokenizer.ggml.{k}"))?
            .and_then(|v| u32::try_from(v).ok()))
    };
    Ok((
        token("bos_token_id")?,
        token("eos_token_id")?.into_iter().collect(),
        token("padding_token_id")?,
    ))
}

impl Mamba2Config {
    /// Reads the config of a GGUF model: its architecture must be one of
    /// [`GGUF_ARCHITECTURES`]; sizes come from the `{arch}.*` keys, the vocabulary from the rows
    /// of `token_embd.weight`, tying from the absence of `output.weight`, the token ids from
    /// `tokenizer.ggml.*`. The result is validated like any config.
    ///
    /// `granitehybrid` and `nemotron_h` / `nemotron_h_moe` give the [`Family::GraniteHybrid`]
    /// and [`Family::NemotronH`] configs (layer kinds from the per-layer
    /// `attention.head_count_kv` and `feed_forward_length` arrays, Granite's scales from
    /// `embedding_scale`, `residual_scale`, `logit_scale` and `attention.scale`), with a
    /// [`MoeConfig`](super::MoeConfig) when `expert_count` > 0 (see `gguf_moe.rs` for the keys
    /// and what is refused); `falcon-h1` gives a [`Family::FalconH1`] config with every
    /// multiplier 1 (the converter folded them into the tensors) and the gate before the norm,
    /// as llama.cpp runs it; experts there are [`Error::Unsupported`].
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.architecture()?;
        let cfg = match arch {
            "mamba2" => mamba2(file)?,
            "granitehybrid" => gguf_hybrid::granite(file)?,
            "nemotron_h" | "nemotron_h_moe" => gguf_hybrid::nemotron_h(file)?,
            "falcon-h1" => gguf_hybrid::falcon_h1(file)?,
            _ => {
                return Err(Error::Unsupported(format!(
                    "{}: GGUF architecture `{arch}` (supported: {})",
                    file.path().display(),
                    GGUF_ARCHITECTURES.join(", ")
                )));
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// llama.cpp's `mamba2`: every layer one Mamba-2 block.
fn mamba2(file: &GgufFile) -> Result<Mamba2Config> {
    let keys = Keys::new(file)?;
    let norm_eps = file
        .get_f64(&keys.key("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-5);
    gguf_hybrid::base(&keys, Family::Mamba2, Vec::new(), norm_eps)
}
