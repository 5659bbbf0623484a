//! Long run: generates many tokens (default 50 000) in ONE session and samples the process's
//! resident memory (VmRSS from /proc/self/status, Linux) every `--every` tokens, to show that
//! memory stays flat after warm-up: the recurrent state (conv + SSM state per layer) has a
//! constant size however long the sequence gets.
//!
//!     cargo run --release --example long_run -- [--tokens 50000] [--every 2500] [--model DIR]
//!
//! Model: `--model DIR` if given, else the bundled model (`models/mamba2-tiny`) if it is there,
//! else `--random`: random weights of real Mamba-2 structure (the 130m block: d_state 128,
//! headdim 64, ngroups 1, expand 2, d_conv 4, chunk 256) narrowed to d_model 256, 4 layers and an
//! 8192-token vocabulary so that 50 000 tokens take minutes on a CPU, not hours.
//! Sampling is seeded (temperature 1, top-p 0.95) and EOS is ignored, so it never stops early.
//! Prints a Markdown table (tokens, RSS MiB, session tokens held, tok/s over the last interval).
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use mamba2::pipeline::bundled_model_dir;
use mamba2::sampling::SamplingParams;
use mamba2::session::{CancelToken, GenerateOptions, Session};
use mamba2::{Mamba2Config, Mamba2Model};

/// Resident set size in KiB, from `/proc/self/status`.
fn rss_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    line.split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()
        .context("VmRSS number")
}

fn random_model() -> Result<(Mamba2Model, String)> {
    let mut c = Mamba2Config::preset("130m")?;
    c.d_model = 256;
    c.n_layer = 4;
    c.d_inner = c.expand * c.d_model;
    c.nheads = c.d_inner / c.headdim;
    c.vocab_size = 8192;
    c.pad_vocab_size_multiple = 16;
    let what = format!(
        "random weights, 130m block structure narrowed: d_model {}, {} layers, d_state {}, \
         headdim {}, {} heads, ngroups {}, vocab {}",
        c.d_model, c.n_layer, c.d_state, c.headdim, c.nheads, c.ngroups, c.vocab_size
    );
    Ok((Mamba2Model::random(&c, DType::F32, &Device::Cpu, 1)?, what))
}

fn main() -> Result<()> {
    let mut tokens = 50_000usize;
    let mut every = 2_500usize;
    let mut model_dir: Option<String> = None;
    let mut force_random = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tokens" => tokens = args.next().context("--tokens N")?.parse()?,
            "--every" => every = args.next().context("--every N")?.parse()?,
            "--model" => model_dir = Some(args.next().context("--model DIR")?),
            "--random" => force_random = true,
            other => bail!("unknown argument {other}"),
        }
    }
    if every == 0 {
        bail!("--every must be at least 1");
    }
    let bundled = bundled_model_dir()?;
    let (model, what) = match model_dir {
        Some(dir) => {
            let files = mamba2::hub::resolve_model(&dir, &Default::default())?;
            let m = mamba2::pipeline::load_model(&files, DType::F32, &Device::Cpu)?;
            (m, format!("checkpoint {dir}"))
        }
        None if !force_random && bundled.join("config.json").is_file() => {
            let files =
                mamba2::hub::resolve_model(&bundled.to_string_lossy(), &Default::default())?;
            let m = mamba2::pipeline::load_model(&files, DType::F32, &Device::Cpu)?;
            (m, "bundled model (models/mamba2-tiny)".to_string())
        }
        None => random_model()?,
    };
    let model = Arc::new(model);
    println!("model: {what}; {} parameters", model.num_parameters());
    println!(
        "rss before the session: {:.1} MiB",
        rss_kib()? as f64 / 1024.0
    );

    let mut session = Session::new(model.clone())?;
    session.feed(&[1, 2, 3, 4])?;
    let opts = GenerateOptions {
        max_new_tokens: tokens,
        sampling: SamplingParams::greedy()
            .with_temperature(1.0)
            .with_top_p(0.95)
            .with_seed(7),
        eos_token_ids: Vec::new(),
    };
    println!();
    println!("| tokens | RSS (MiB) | session tokens held | tok/s (interval) |");
    println!("| ---: | ---: | ---: | ---: |");
    let mut rows: Vec<(usize, u64)> = Vec::new();
    let mut n = 0usize;
    let mut last = Instant::now();
    let mut failure = None;
    let start = Instant::now();
    let summary = session.generate(&opts, &CancelToken::new(), |_tok| {
        n += 1;
        if n.is_multiple_of(every) || n == 1 {
            match rss_kib() {
                Ok(kib) => {
                    let dt = last.elapsed().as_secs_f64();
                    let interval = if n == 1 { 1 } else { every };
                    println!(
                        "| {n} | {:.1} | {} | {:.0} |",
                        kib as f64 / 1024.0,
                        n + 4,
                        interval as f64 / dt
                    );
                    rows.push((n, kib));
                    last = Instant::now();
                }
                Err(e) => {
                    failure = Some(e);
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    let secs = start.elapsed().as_secs_f64();
    println!();
    println!(
        "generated {} tokens in {secs:.0} s ({:.0} tok/s); session holds {} tokens",
        summary.tokens.len(),
        summary.tokens.len() as f64 / secs,
        session.tokens().len()
    );
    // Flat after warm-up: compare the sample after the first interval with the last one.
    if let (Some(&(n0, warm)), Some(&(n1, end))) = (rows.get(1), rows.last()) {
        println!(
            "RSS after warm-up ({n0} tokens): {:.1} MiB; at {n1} tokens: {:.1} MiB; growth {:+.1} MiB",
            warm as f64 / 1024.0,
            end as f64 / 1024.0,
            (end as f64 - warm as f64) / 1024.0
        );
    }
    Ok(())
}
