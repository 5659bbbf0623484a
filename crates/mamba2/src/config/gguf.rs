//! A [`Mamba2Config`] from the metadata of a GGUF file as llama.cpp's `convert_hf_to_gguf.py`
//! writes it (`{arch}.embedding_length`, `{arch}.ssm.*`, ...), plus what only the tensor table
//! tells (vocabulary rows, a tied head, conv and projection biases).
//!
//! llama.cpp's `mamba2` keys: `embedding_length` (d_model), `block_count`, `ssm.conv_kernel`,
//! `ssm.inner_size` (d_inner), `ssm.state_size`, `ssm.time_step_rank` (the number of heads),
//! `ssm.group_count`, `attention.layer_norm_rms_epsilon`. A GGUF carries no dt limit or chunk
//! size: llama.cpp runs with the limit (0, inf), HF's default, and the chunk size does not change
//! the result.

use super::{ConfigFlavor, Family, Mamba2Config, Multipliers};
use crate::error::{Error, Result};
use crate::gguf::{GgufError, GgufFile};

/// The GGUF architectures this engine maps to a model graph.
pub const GGUF_ARCHITECTURES: &[&str] = &["mamba2"];

fn required(file: &GgufFile, key: &str) -> Result<usize> {
    let v = file.get_u64(key)?.ok_or_else(|| GgufError::MissingKey {
        path: file.path().display().to_string(),
        key: key.to_string(),
    })?;
    usize::try_from(v).map_err(|_| Error::field(key, format!("{v} does not fit in usize")))
}

impl Mamba2Config {
    /// Reads the config of a GGUF model: its architecture must be one of
    /// [`GGUF_ARCHITECTURES`]; sizes come from the `{arch}.*` keys, the vocabulary from the rows
    /// of `token_embd.weight`, tying from the absence of `output.weight`, the token ids from
    /// `tokenizer.ggml.*`. The result is validated like any config.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.architecture()?;
        if !GGUF_ARCHITECTURES.contains(&arch) {
            return Err(Error::Unsupported(format!(
                "{}: GGUF architecture `{arch}` (supported: {})",
                file.path().display(),
                GGUF_ARCHITECTURES.join(", ")
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let d_model = required(file, &key("embedding_length"))?;
        let n_layer = required(file, &key("block_count"))?;
        let d_inner = required(file, &key("ssm.inner_size"))?;
        let nheads = required(file, &key("ssm.time_step_rank"))?;
        let d_state = required(file, &key("ssm.state_size"))?;
        let d_conv = required(file, &key("ssm.conv_kernel"))?;
        let ngroups = match file.get_u64(&key("ssm.group_count"))? {
            Some(g) => {
                usize::try_from(g).map_err(|_| Error::field("ssm.group_count", "too large"))?
            }
            None => 1,
        };
        let norm_eps = file
            .get_f64(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        if nheads == 0 || d_inner % nheads != 0 {
            return Err(Error::field(
                key("ssm.time_step_rank"),
                format!("{nheads} heads do not divide ssm.inner_size {d_inner}"),
            ));
        }
        let emb = file
            .tensor_info("token_embd.weight")
            .ok_or_else(|| Error::MissingTensor {
                name: "token_embd.weight".into(),
                source_desc: file.path().display().to_string(),
            })?;
        let vocab_rows = match emb.shape().as_slice() {
            [rows, cols] if *cols == d_model => *rows,
            _ => {
                return Err(Error::TensorShape {
                    name: "token_embd.weight".into(),
                    expected: vec![0, d_model],
                    got: emb.shape(),
                })
            }
        };
        let token = |k: &str| -> Result<Option<u32>> {
            Ok(file
                .get_u64(&format!("tokenizer.ggml.{k}"))?
                .and_then(|v| u32::try_from(v).ok()))
        };
        let cfg = Mamba2Config {
            flavor: ConfigFlavor::Gguf,
            family: Family::Mamba2,
            pattern: Vec::new(),
            attention: None,
            mlp: None,
            multipliers: Multipliers::default(),
            gated_norm: true,
            out_proj_bias: file.tensor_info("blk.0.ssm_out.bias").is_some(),
            d_model,
            n_layer,
            vocab_size: vocab_rows,
            pad_vocab_size_multiple: 1,
            d_state,
            d_conv,
            expand: (d_inner / d_model.max(1)).max(1),
            headdim: d_inner / nheads,
            nheads,
            ngroups,
            d_inner,
            chunk_size: 256,
            dt_limit: (0.0, f64::INFINITY),
            bias: file.tensor_info("blk.0.ssm_in.bias").is_some(),
            conv_bias: file.tensor_info("blk.0.ssm_conv1d.bias").is_some(),
            norm_eps,
            residual_in_fp32: true,
            tie_embeddings: file.tensor_info("output.weight").is_none(),
            norm_before_gate: false,
            bos_token_id: token("bos_token_id")?,
            eos_token_ids: token("eos_token_id")?.into_iter().collect(),
            pad_token_id: token("padding_token_id")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
