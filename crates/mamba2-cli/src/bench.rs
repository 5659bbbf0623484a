//! `mamba2 bench`: prefill and decode throughput, warm-up then several timed runs, medians.

use crate::ModelArgs;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use mamba2::{Mamba2Config, Mamba2Model};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Random weights of a real shape instead of a checkpoint: 130m, 370m, 780m, 1.3b, 2.7b,
    /// granite-4.0-h-1b, granite-4.0-h-350m, nemotron-h-8b, nemotron-nano-9b-v2,
    /// falcon-h1-0.5b, falcon-h1-1.5b, bamba-9b, and the mixture-of-experts
    /// granite-4.0-h-tiny, granite-4.0-h-small, nemotron-3-nano-30b-a3b.
    #[arg(long, conflicts_with = "model")]
    shape: Option<String>,
    /// Prompt tokens per prefill.
    #[arg(long, default_value_t = 512)]
    prefill: usize,
    /// Tokens decoded after the prefill.
    #[arg(long, default_value_t = 128)]
    decode: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Decode with one launch per kernel instead of replaying the captured step (CUDA only;
    /// for comparison).
    #[arg(long)]
    eager: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Peak resident set size of this process in MiB (Linux), `None` elsewhere.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn sync(device: &Device) -> Result<()> {
    device.synchronize()?;
    Ok(())
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let device = a.model.device()?;
    let dtype = a.model.dtype_on(&device)?;
    let (mut model, name) = match &a.shape {
        Some(shape) => (
            Mamba2Model::random_in_pages(
                &Mamba2Config::preset(shape)?,
                dtype,
                &device,
                0,
                a.model.load_options()?.quantize,
                !a.model.no_huge_pages,
            )?,
            format!("random:{shape}"),
        ),
        None => (a.model.load_model()?.0, a.model.model_spec()?),
    };
    model.set_cuda_graphs(!a.eager);
    model.set_threads(a.model.threads.map(|n| n as usize))?;
    let vocab = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..a.batch * a.prefill)
        .map(|i| (i as u32 * 7919 + 13) % vocab)
        .collect();
    let prompt = Tensor::from_vec(prompt, (a.batch, a.prefill), &device)?;
    let (mut prefill_s, mut decode_s) = (Vec::new(), Vec::new());
    for run in 0..a.warmup + a.runs {
        let mut cache = model.new_cache(a.batch)?;
        sync(&device)?;
        let t0 = Instant::now();
        let logits = model.prefill(&prompt, &mut cache)?;
        let mut next = model.argmax(&logits)?.to_dtype(DType::U32)?; // (batch)
        sync(&device)?;
        let t1 = Instant::now();
        for _ in 0..a.decode {
            let logits = model.step(&next, &mut cache)?;
            next = model.argmax(&logits)?.to_dtype(DType::U32)?;
        }
        next.to_device(&Device::Cpu)?; // waits for the last step
        sync(&device)?;
        let t2 = Instant::now();
        if run >= a.warmup {
            prefill_s.push((t1 - t0).as_secs_f64());
            decode_s.push((t2 - t1).as_secs_f64());
        }
    }
    let prefill_tok_s = (a.batch * a.prefill) as f64 / median(&mut prefill_s.clone()).max(1e-12);
    let decode_tok_s = (a.batch * a.decode) as f64 / median(&mut decode_s.clone()).max(1e-12);
    let c = model.config();
    let json = serde_json::json!({
        "model": name,
        "shape": {"d_model": c.d_model, "n_layer": c.n_layer, "d_state": c.d_state, "headdim": c.headdim,
                  "nheads": c.nheads, "ngroups": c.ngroups, "vocab_rows": model.vocab_rows(),
                  "family": c.family.model_type(), "layer_pattern": c.pattern_string()},
        "parameters": model.num_parameters(),
        "active_parameters": model.num_active_parameters(),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "quantization": model.quantization().map(mamba2_ops::quantized::type_name),
        "device": format!("{:?}", device.location()).to_lowercase(),
        "threads": model.threads()?,
        "huge_pages": !a.model.no_huge_pages,
        "cpu_tier": mamba2_ops::options::current_options().cpu.effective_tier().name(),
        "batch": a.batch,
        "cuda_graph": device.is_cuda() && !a.eager && model.decode_graph_supported(),
        "prefill_tokens": a.prefill,
        "decode_tokens": a.decode,
        "runs": a.runs,
        "prefill_tok_s": prefill_tok_s,
        "decode_tok_s": decode_tok_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "weight_bytes_per_token": model.weight_bytes_per_token(),
        "peak_rss_mib": peak_rss_mib(),
    });
    crate::print_stdout(&json.to_string())
}
