//! Generate text with the library API: load once, open a session, stream tokens.
//!
//!     cargo run --release --example generate -- --prompt "Once upon a time"
//!     cargo run --release --example generate -- --model state-spaces/mamba2-130m --prompt "..."
use anyhow::Result;
use clap::Parser;
use mamba2::pipeline::{bundled_model_dir, LoadOptions, TextGenerator, TextOptions};
use mamba2::sampling::SamplingParams;
use mamba2::session::CancelToken;
use std::io::Write;
use std::ops::ControlFlow;

#[derive(Parser)]
struct Args {
    /// Folder or Hub repo id; default: the model bundled with mamba2-rs.
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value = "Once upon a time")]
    prompt: String,
    #[arg(long, default_value_t = 100)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model = match args.model {
        Some(m) => m,
        None => bundled_model_dir()?.to_string_lossy().into_owned(),
    };
    // `auto` picks CUDA or Metal when compiled in and present, else the CPU.
    let device = "auto".parse::<mamba2::device::DeviceChoice>()?.open()?;
    let generator = TextGenerator::load(
        &model,
        &LoadOptions {
            device,
            ..Default::default()
        },
    )?;
    let mut session = generator.new_session()?;
    let sampling = SamplingParams::greedy()
        .with_temperature(args.temperature)
        .with_top_p(0.95)
        .with_seed(args.seed);
    let opts = TextOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        ..Default::default()
    };
    print!("{}", args.prompt);
    let summary = generator.generate(
        &mut session,
        &args.prompt,
        &opts,
        &CancelToken::new(),
        |text| {
            print!("{text}");
            std::io::stdout().flush().ok();
            ControlFlow::Continue(())
        },
    )?;
    println!(
        "\n[{} tokens, {:.1} tok/s]",
        summary.tokens.len(),
        summary.decode_tok_s
    );
    Ok(())
}
