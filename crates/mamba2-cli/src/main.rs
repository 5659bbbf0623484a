//! `mamba2`: generate text, dump logits, benchmark and inspect Mamba-2 checkpoints.

mod bench;
mod chat;
mod commands;
mod perplexity;
mod quantize;
mod serve;
mod tokenize;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "mamba2",
    version,
    about = "Mamba-2 language models on Candle: CPU, CUDA, Metal"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the model comes from and how it is placed.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A `.gguf` file, a local folder or a Hugging Face repo id (e.g. state-spaces/mamba2-130m).
    /// Default: the small model bundled with mamba2-rs.
    #[arg(long)]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// Tokenizer: a tokenizer.json, a folder or a Hub repo id (default: the model's, else
    /// EleutherAI/gpt-neox-20b).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// cpu, cuda[:N], metal[:N] or auto (the best compiled-in backend that is present).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weight and activation dtype: f32, f16 or bf16. State is always f32. Block-quantized
    /// weights (GGUF, --quantize) stay in their blocks; the activations use this dtype.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Quantize the embedding, projections and LM head at load: q8_0, q4_0, q4_1, q5_0, q5_1,
    /// q2_k, q3_k, q4_k, q5_k or q6_k (rows that are not whole blocks stay unquantized).
    #[arg(long)]
    pub quantize: Option<String>,
    /// Never touch the network (same as HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// CPU threads (default: the physical cores). Models of the same thread count share one
    /// pool, so concurrent sessions never run more threads than this.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
    /// Keep CPU weights in ordinary pages instead of memory advised for transparent huge pages
    /// (MADV_HUGEPAGE, the default on Linux), for comparison.
    #[arg(long)]
    pub no_huge_pages: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt (argument or stdin), streamed to stdout.
    Generate(commands::GenerateArgs),
    /// Write prefill and decode-path logits for the token ids in a safetensors file.
    Logits(commands::LogitsArgs),
    /// Measure prefill and decode speed; prints one JSON line.
    Bench(bench::BenchArgs),
    /// Show the config, the total and active (per token, top-k experts) parameter counts, the
    /// weight bytes in memory and read per decode token, and the state sizes of a model.
    Info(commands::InfoArgs),
    /// Print the token ids of a text (argument or stdin) as one JSON array; `--model` may be a
    /// `.gguf` file, whose metadata holds the tokenizer.
    Tokenize(tokenize::TokenizeArgs),
    /// Perplexity of a text file by llama-perplexity's method (chunks of --ctx tokens, each from
    /// an empty state, second half scored); running estimates on stderr, one JSON line on stdout.
    Perplexity(perplexity::PerplexityArgs),
    /// Write a GGUF file that llama.cpp reads (OUT.gguf --type f32|f16|bf16|q8_0|q4_k|...) from a
    /// checkpoint folder or Hub repo of a pure Mamba-2 model, tokenizer embedded; a .gguf input
    /// is re-quantized. Prints a summary (tensors, types, bytes) to stderr.
    Quantize(quantize::QuantizeArgs),
    /// OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models,
    /// /health): continuous batching, streaming, prompt-state reuse across chat turns.
    Serve(serve::ServeArgs),
}

/// Prints a line to stdout; a closed pipe (`| head`) is not an error.
pub fn print_stdout(line: &str) -> Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    // The CLI is the edge where the kernel switches (MAMBA2_CPU_TIER, MAMBA2_CPU_PREFETCH, ...)
    // are read from the environment, once; the library never reads them.
    mamba2_ops::options::set_process_options(mamba2_ops::options::KernelOptions::from_env()?)?;
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => commands::generate(a),
        Command::Logits(a) => commands::logits(a),
        Command::Bench(a) => bench::bench(a),
        Command::Info(a) => commands::info(a),
        Command::Tokenize(a) => tokenize::tokenize(a),
        Command::Perplexity(a) => perplexity::perplexity(a),
        Command::Quantize(a) => quantize::quantize(a),
        Command::Serve(a) => serve::serve(a),
    }
}
