//! `quantize`: write a GGUF file that llama.cpp reads, from a checkpoint folder / Hub repo of a
//! pure Mamba-2 model (or re-quantize a `mamba2` GGUF), with the tokenizer embedded.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use mamba2::config::{read_generation_eos, Mamba2Config};
use mamba2::gguf::GgufFile;
use mamba2::gguf_export::{
    check_exportable, ggml_type_name, parse_export_type, requantize_gguf, write_gguf,
    GgufExportOptions, GgufExportSummary,
};
use mamba2::hub::HubOptions;
use mamba2::pipeline::ModelSource;
use mamba2::weights::Weights;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The model: a local folder or a Hugging Face repo id (safetensors or pytorch_model.bin,
    /// HF or mamba_ssm layout), or a `mamba2` `.gguf` file to re-quantize.
    pub input: String,
    /// The GGUF file to write (replaced if it exists).
    pub output: PathBuf,
    /// Type of the weight matrices (embedding, in/out projections, LM head): f32, f16, bf16,
    /// q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k or q6_k. Norms, conv, A, D and dt
    /// stay f32; rows that are not whole blocks fall back as llama-quantize does.
    #[arg(long = "type", short = 't')]
    pub ty: String,
    /// `general.name` (default: the folder or repo name, or the input GGUF's).
    #[arg(long)]
    pub name: Option<String>,
    /// Tokenizer to embed: a tokenizer.json, a folder or a Hub repo id (default: the model's,
    /// else EleutherAI/gpt-neox-20b). Ignored for a GGUF input (its vocabulary is kept).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// Never touch the network (same as HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
}

/// A readable name for `spec`: the folder's name, or the repo id's last part.
fn default_name(spec: &str) -> String {
    let p = Path::new(spec);
    let from_path = p
        .canonicalize()
        .ok()
        .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()));
    from_path.unwrap_or_else(|| {
        spec.trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(spec)
            .to_string()
    })
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let ty = parse_export_type(&a.ty)?;
    let hub = HubOptions {
        revision: a.revision.clone(),
        offline: a.offline.then_some(true),
        ..Default::default()
    };
    let source = ModelSource::resolve(&a.input, &hub)
        .with_context(|| format!("resolving model `{}`", a.input))?;
    if a.output
        .extension()
        .is_none_or(|e| !e.eq_ignore_ascii_case("gguf"))
    {
        bail!(
            "the output file must end in .gguf, got {}",
            a.output.display()
        );
    }
    let summary = match &source {
        ModelSource::Gguf(path) => {
            if std::fs::canonicalize(path).ok() == std::fs::canonicalize(&a.output).ok() {
                bail!(
                    "the output must be another file than the input {}",
                    path.display()
                );
            }
            let file = GgufFile::open(path)?;
            let name = match (&a.name, file.get_str("general.name")?) {
                (Some(n), _) => n.clone(),
                (None, Some(n)) => n.to_string(),
                (None, None) => default_name(&path.with_extension("").to_string_lossy()),
            };
            if a.tokenizer.is_some() {
                eprintln!("note: --tokenizer is ignored for a GGUF input (its vocabulary is kept)");
            }
            requantize_gguf(&file, &a.output, &GgufExportOptions::new(ty, name))?
        }
        ModelSource::Files(files) => {
            let config = Mamba2Config::from_file(&files.config)?;
            check_exportable(&config)?;
            let weights =
                Weights::from_files(&files.weights, &Device::Cpu)?.with_finite_check(true);
            let tokenizer = source
                .load_tokenizer(a.tokenizer.as_deref(), &hub)
                .context("loading the tokenizer to embed (--tokenizer to choose another)")?;
            let mut opts = GgufExportOptions::new(
                ty,
                a.name.clone().unwrap_or_else(|| default_name(&a.input)),
            );
            if let Some(p) = &files.generation_config {
                opts.eos_token_id = read_generation_eos(p)?.first().copied();
            }
            write_gguf(&config, &weights, Some(&tokenizer), &a.output, &opts)?
        }
    };
    print_summary(&summary);
    Ok(())
}

fn mib(bytes: usize) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The tensor kind in a llama.cpp name: `ssm_in.weight`, `token_embd.weight`, ...
fn kind(name: &str) -> &str {
    match name.strip_prefix("blk.") {
        Some(rest) => rest.split_once('.').map_or(rest, |(_, k)| k),
        None => name,
    }
}

fn print_summary(s: &GgufExportSummary) {
    eprintln!(
        "wrote {}: {} bytes ({}), GGUF v3, {} tensors, {} metadata keys, general.file_type {}",
        s.path.display(),
        s.file_bytes,
        mib(s.file_bytes as usize),
        s.tensors.len(),
        s.metadata_keys,
        s.file_type
    );
    // Per type: tensor count, bytes, and which kinds of tensor.
    let mut by_type: BTreeMap<String, (usize, usize, BTreeMap<String, usize>)> = BTreeMap::new();
    for t in &s.tensors {
        let e = by_type.entry(ggml_type_name(t.ty)).or_default();
        e.0 += 1;
        e.1 += t.bytes;
        *e.2.entry(kind(&t.name).to_string()).or_default() += 1;
    }
    for (ty, (n, bytes, kinds)) in &by_type {
        let kinds: Vec<String> = kinds
            .iter()
            .map(|(k, c)| {
                if *c > 1 {
                    format!("{k} x{c}")
                } else {
                    k.clone()
                }
            })
            .collect();
        eprintln!(
            "  {ty:<5} {n:>4} tensors {:>12}  {}",
            mib(*bytes),
            kinds.join(", ")
        );
    }
    for t in s.tensors.iter().filter(|t| t.fallback_from.is_some()) {
        let from = t.fallback_from.map(ggml_type_name).unwrap_or_default();
        eprintln!(
            "  fallback: {} {:?}: rows of {} are not whole {from} blocks -> {}",
            t.name,
            t.shape,
            t.shape.last().copied().unwrap_or(0),
            ggml_type_name(t.ty)
        );
    }
    match &s.vocab {
        Some(v) => eprintln!(
            "  vocabulary: {} tokens ({} padding), {} merges, model {}, pre {}",
            v.tokens, v.padding, v.merges, v.model, v.pre
        ),
        None => eprintln!("  vocabulary: none"),
    }
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_kinds() {
        assert_eq!(default_name("state-spaces/mamba2-130m"), "mamba2-130m");
        assert_eq!(kind("blk.12.ssm_in.weight"), "ssm_in.weight");
        assert_eq!(kind("token_embd.weight"), "token_embd.weight");
    }
}
