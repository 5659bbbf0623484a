//! The small Mamba-2 model of [mamba2-rs](https://github.com/mamba2-rs/mamba2-rs), as bytes
//! compiled into the program: `mamba2-tiny`, 3.8M parameters (6 layers, d_model 256, ngroups 2,
//! d_state 64, headdim 64) in bf16, trained for the project on Jane Austen's novels (public
//! domain). Its model card (`mamba2-tiny/README.md`) has the training recipe, metrics and
//! licence.
//!
//! The files are those of a Hugging Face `Mamba2ForCausalLM` folder. The `mamba2` crate (feature
//! `bundled-model`) writes them once to a cache folder and loads them like any checkpoint, so a
//! binary that depends on this crate generates with no download and no source tree.
//!
//! ```
//! use mamba2_tiny_model::{FILES, MODEL_SAFETENSORS, NAME};
//!
//! assert_eq!(NAME, "mamba2-tiny");
//! assert!(FILES.iter().any(|(name, _)| *name == "config.json"));
//! // A safetensors file starts with the little-endian length of its JSON header.
//! let header_len = u64::from_le_bytes(MODEL_SAFETENSORS[..8].try_into().unwrap());
//! assert_eq!(MODEL_SAFETENSORS[8], b'{');
//! assert!(8 + (header_len as usize) < MODEL_SAFETENSORS.len());
//! ```

/// The model's name, also the name of its folder in the repository.
pub const NAME: &str = "mamba2-tiny";

/// `config.json` (HF `Mamba2Config`).
pub const CONFIG_JSON: &str = include_str!("../mamba2-tiny/config.json");
/// `generation_config.json` (BOS / EOS / pad ids).
pub const GENERATION_CONFIG_JSON: &str = include_str!("../mamba2-tiny/generation_config.json");
/// `tokenizer.json` (a byte-level BPE of the `tokenizers` library).
pub const TOKENIZER_JSON: &str = include_str!("../mamba2-tiny/tokenizer.json");
/// `model.safetensors` (bf16 weights, HF transformers names).
pub const MODEL_SAFETENSORS: &[u8] = include_bytes!("../mamba2-tiny/model.safetensors");

/// Every file of the folder by its name, as a loader expects to find them on disk.
pub const FILES: [(&str, &[u8]); 4] = [
    ("config.json", CONFIG_JSON.as_bytes()),
    ("generation_config.json", GENERATION_CONFIG_JSON.as_bytes()),
    ("tokenizer.json", TOKENIZER_JSON.as_bytes()),
    ("model.safetensors", MODEL_SAFETENSORS),
];
