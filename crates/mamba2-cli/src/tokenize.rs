//! `tokenize`: the token ids of a text as the model would see them, from a model folder, a Hub
//! repo or a `.gguf` file (whose metadata carries the tokenizer).

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;
use mamba2::gguf::{tokenizer_from_gguf, GgufFile, Tokenizer};
use mamba2::hub::{load_tokenizer, resolve_model, resolve_tokenizer, ModelFiles};

use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text; read from stdin when absent or `-`.
    #[arg(long, short)]
    prompt: Option<String>,
    /// Add the special tokens the tokenizer's post-processor defines (BOS/EOS for models whose
    /// tokenizer asks for them); off by default, as generation encodes prompts.
    #[arg(long)]
    add_special_tokens: bool,
}

/// Prints the ids as one JSON array (`[1,2,3]`) on stdout.
pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let text = match a.prompt.as_deref() {
        Some(p) if p != "-" => p.to_string(),
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the text from stdin")?;
            s
        }
    };
    let tokenizer = load(&a.model)?;
    let encoding = tokenizer
        .encode(text, a.add_special_tokens)
        .map_err(|e| mamba2::Error::Tokenizer(e.to_string()))?;
    crate::print_stdout(&serde_json::to_string(encoding.get_ids())?)
}

fn is_gguf_file(spec: &str) -> bool {
    let p = Path::new(spec);
    p.is_file()
        && p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn from_gguf(path: &str) -> Result<Tokenizer> {
    let file = GgufFile::open(Path::new(path))?;
    tokenizer_from_gguf(&file).with_context(|| format!("building the tokenizer of {path}"))
}

/// The `--tokenizer` override when given (a `.gguf` file, a tokenizer.json, a folder or a repo),
/// else the model's: a `.gguf` model's metadata, or the folder's / repo's tokenizer.json.
fn load(m: &ModelArgs) -> Result<Tokenizer> {
    let spec = m.model_spec()?;
    let hub = m.hub();
    if let Some(t) = m.tokenizer.as_deref().filter(|t| is_gguf_file(t)) {
        return from_gguf(t);
    }
    if is_gguf_file(&spec) {
        let Some(t) = m.tokenizer.as_deref() else {
            return from_gguf(&spec);
        };
        // Only the override is looked up: the GGUF file stands in for the model's files.
        let gguf = Path::new(&spec).to_path_buf();
        let files = ModelFiles {
            dir: gguf.parent().unwrap_or(Path::new(".")).to_path_buf(),
            config: gguf.clone(),
            weights: vec![gguf],
            tokenizer: None,
            generation_config: None,
        };
        return Ok(load_tokenizer(&resolve_tokenizer(&files, Some(t), &hub)?)?);
    }
    let files = resolve_model(&spec, &hub).with_context(|| format!("finding model `{spec}`"))?;
    let path = resolve_tokenizer(&files, m.tokenizer.as_deref(), &hub)?;
    Ok(load_tokenizer(&path)?)
}
