//! `perplexity`: the perplexity of a model on a text file, by llama.cpp's `llama-perplexity`
//! method so that the two numbers can be compared on the same GGUF and text.
//!
//! What is matched (llama.cpp `tools/perplexity/perplexity.cpp`, `perplexity()`, no
//! `--ppl-stride`):
//! - The whole file is tokenized in one piece with the model's tokenizer, without special
//!   tokens, and with special-token text in the file read as plain text (llama.cpp's
//!   `common_tokenize(.., add_special, parse_special = false)`).
//! - BOS: when the vocabulary adds BOS (`tokenizer.ggml.add_bos_token`, or llama.cpp's default
//!   for the vocabulary type when the key is absent; for a tokenizer.json, when its
//!   post-processor adds a leading BOS), one BOS is put before the text and the first token of
//!   every chunk is replaced by BOS (replaced, not inserted: llama.cpp's chunking is unchanged).
//!   Mamba-2 vocabularies (GPT-NeoX style, `add_bos_token` false) get no BOS.
//! - The ids are cut into `tokens / ctx` consecutive, non-overlapping chunks of `ctx` tokens
//!   (the shorter tail is dropped), `--chunks` keeps the first N. Every chunk runs from an empty
//!   state in one forward.
//! - Scored: the logits at positions `ctx/2 .. ctx-2` of each chunk, each against the next id
//!   (`ctx/2+1 .. ctx-1`): `ctx - ctx/2 - 1` tokens a chunk (255 of 512). The last position's
//!   logits predict a token outside the chunk and are not used.
//! - Log-softmax over every logit column (the padded vocabulary too, as llama.cpp's `n_vocab`
//!   is the padded token list) in f32 with the sum of exponentials in f64; the NLL and its square
//!   are summed in f64. PPL = exp(mean NLL); its error = ppl * sqrt((mean(NLL²) - mean²) /
//!   (count - 1)), llama.cpp's "Final estimate: PPL = .. +/- ..".
//!
//! Differences: llama-perplexity refuses a text of fewer than `2 * ctx` tokens; here one chunk
//! is enough. `--batch` chunks run as rows of one forward (llama.cpp packs `n_batch / ctx`
//! chunks as parallel sequences); each chunk's result is the same either way.

use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, DeviceLocation, Tensor};
use clap::Args;
use mamba2::gguf::{special_tokens, GgufFile};
use mamba2::pipeline::ModelSource;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score (UTF-8), read and tokenized whole.
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Tokens per chunk. Each chunk runs from an empty state; its second half is scored.
    #[arg(long, short = 'c', default_value_t = 512)]
    ctx: usize,
    /// Score only the first N chunks (default: every whole chunk of the text).
    #[arg(long)]
    chunks: Option<usize>,
    /// Chunks per forward pass (memory vs speed; the result does not depend on it).
    #[arg(long, short = 'b', default_value_t = 1)]
    batch: usize,
}

/// Running sums of the per-token negative log-likelihood, as llama.cpp keeps them.
#[derive(Debug, Default, Clone, Copy)]
struct NllSums {
    nll: f64,
    nll2: f64,
    count: usize,
}

impl NllSums {
    fn add(&mut self, v: f64) {
        self.nll += v;
        self.nll2 += v * v;
        self.count += 1;
    }

    fn mean(&self) -> f64 {
        self.nll / self.count as f64
    }

    fn ppl(&self) -> f64 {
        self.mean().exp()
    }

    /// Standard error of the mean NLL (`None` below two tokens or for a zero variance).
    fn nll_stderr(&self) -> Option<f64> {
        if self.count < 2 {
            return None;
        }
        let n = self.count as f64;
        let mean = self.nll / n;
        let var = self.nll2 / n - mean * mean;
        (var > 0.0).then(|| (var / (n - 1.0)).sqrt())
    }
}

/// `-log softmax(row)[target]`: max in f32, sum of `exp(x - max)` (f32 terms) in f64, as
/// llama.cpp's `log_softmax`.
fn token_nll(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| (x - max).exp() as f64).sum();
    (max as f64) + sum.ln() - row[target] as f64
}

/// llama.cpp's `add_bos` for a GGUF vocabulary: the `tokenizer.ggml.add_bos_token` key, else the
/// default `llama_vocab::load` gives the vocabulary type and pre-tokenizer.
fn gguf_add_bos(file: &GgufFile) -> Result<bool> {
    if let Some(v) = file.get_bool("tokenizer.ggml.add_bos_token")? {
        return Ok(v);
    }
    let model = file.get_str("tokenizer.ggml.model")?.unwrap_or("");
    let pre = file.get_str("tokenizer.ggml.pre")?.unwrap_or("");
    Ok(match model {
        "llama" | "bert" => true,
        "gpt2" => matches!(
            pre,
            "llama3"
                | "llama-v3"
                | "llama-bpe"
                | "falcon3"
                | "falcon-h1"
                | "pixtral"
                | "midm-2.0"
                | "lfm2"
                | "jina-v5-nano"
                | "tekken"
                | "chameleon"
        ),
        _ => false,
    })
}

/// The BOS id to put at the start of every chunk, or `None` (see the module doc).
/// `encode(text, add_special)` gives the tokenizer's ids and special-token mask.
fn bos_for(
    source: &ModelSource,
    tokenizer_override: Option<&str>,
    encode: impl Fn(&str, bool) -> Result<(Vec<u32>, Vec<u32>)>,
) -> Result<Option<u32>> {
    if let (ModelSource::Gguf(path), None) = (source, tokenizer_override) {
        let file = GgufFile::open(path)?;
        if !gguf_add_bos(&file)? {
            return Ok(None);
        }
        return match special_tokens(&file)?.bos {
            Some(id) => Ok(Some(id)),
            None => bail!(
                "{}: the vocabulary adds BOS but names no tokenizer.ggml.bos_token_id",
                path.display()
            ),
        };
    }
    // A tokenizer.json: BOS when its post-processor puts a special token before the text.
    let (plain, _) = encode("a", false)?;
    let (with, mask) = encode("a", true)?;
    Ok((mask.first() == Some(&1) && with.len() > plain.len()).then(|| with[0]))
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let ctx = a.ctx;
    if ctx < 3 {
        bail!(
            "--ctx must be at least 3, got {ctx}: a chunk of N tokens scores the predictions of \
             tokens N/2+1 .. N-1, none for N < 3"
        );
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if a.chunks == Some(0) {
        bail!("--chunks must be at least 1");
    }
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    if bytes.is_empty() {
        bail!("{} is empty: nothing to score", a.file.display());
    }
    let text = String::from_utf8(bytes)
        .with_context(|| format!("{} is not UTF-8 text", a.file.display()))?;

    let source = a.model.source()?;
    let hub = a.model.hub();
    let mut tokenizer = source
        .load_tokenizer(a.model.tokenizer.as_deref(), &hub)
        .context("loading the tokenizer")?;
    let bos = bos_for(&source, a.model.tokenizer.as_deref(), |t, special| {
        let e = tokenizer
            .encode(t, special)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok((e.get_ids().to_vec(), e.get_special_tokens_mask().to_vec()))
    })?;
    // Special-token text in the file is plain text (llama.cpp: parse_special = false).
    tokenizer.set_encode_special_tokens(true);
    let t0 = Instant::now();
    let enc = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", a.file.display()))?;
    let mut ids: Vec<u32> = Vec::with_capacity(enc.len() + 1);
    ids.extend(bos);
    ids.extend_from_slice(enc.get_ids());
    let tokenize_s = t0.elapsed().as_secs_f64();
    let n_chunk_max = ids.len() / ctx;
    if n_chunk_max == 0 {
        bail!(
            "{} tokenizes to {} tokens{}, fewer than one chunk of --ctx {ctx}: give a longer \
             text or a smaller --ctx",
            a.file.display(),
            ids.len(),
            if bos.is_some() { " (with BOS)" } else { "" },
        );
    }
    let n_chunk = a.chunks.map_or(n_chunk_max, |c| c.min(n_chunk_max));

    let dtype = a.model.dtype()?;
    let (model, _) = a.model.load_model()?;
    let device = model.device().clone();
    let first = ctx / 2;
    let scored = ctx - first - 1;
    eprintln!(
        "perplexity: {} tokens ({tokenize_s:.2} s to tokenize), {n_chunk} of {n_chunk_max} \
         chunks of {ctx}, {scored} scored per chunk, BOS {}, batch {}",
        ids.len(),
        bos.map_or("no".to_string(), |b| format!("id {b}")),
        a.batch
    );

    let t_run = Instant::now();
    let mut sums = NllSums::default();
    let mut done = 0;
    let mut stderr = std::io::stderr();
    while done < n_chunk {
        let b = a.batch.min(n_chunk - done);
        let mut batch_ids = ids[done * ctx..(done + b) * ctx].to_vec();
        if let Some(bos) = bos {
            for c in 0..b {
                batch_ids[c * ctx] = bos;
            }
        }
        let input = Tensor::from_vec(batch_ids.clone(), (b, ctx), &device)?;
        // (b, ctx, vocab) f32 → the scored rows only, on the CPU.
        let logits = model
            .forward(&input, None)
            .with_context(|| format!("forward over chunks {}..{}", done + 1, done + b))?
            .narrow(1, first, scored)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        let vocab = logits.dim(2)?;
        let flat = logits.flatten_all()?.to_vec1::<f32>()?;
        for c in 0..b {
            let chunk = &batch_ids[c * ctx..(c + 1) * ctx];
            for i in 0..scored {
                let row = &flat[(c * scored + i) * vocab..(c * scored + i + 1) * vocab];
                let target = chunk[first + i + 1] as usize;
                sums.add(token_nll(row, target));
            }
            // llama.cpp's running estimate after each chunk.
            let _ = write!(stderr, "[{}]{:.4},", done + c + 1, sums.ppl());
            let _ = stderr.flush();
        }
        done += b;
    }
    let run_s = t_run.elapsed().as_secs_f64();
    let _ = writeln!(stderr);
    let ppl = sums.ppl();
    let nll_stderr = sums.nll_stderr();
    match nll_stderr {
        Some(e) => eprintln!("Final estimate: PPL = {ppl:.4} +/- {:.5}", e * ppl),
        None => eprintln!("Final estimate: PPL = {ppl:.4} (too few tokens for an error)"),
    }
    let json = serde_json::json!({
        "ppl": ppl,
        "nll_mean": sums.mean(),
        "ppl_stderr": nll_stderr.map(|e| e * ppl),
        "nll_stderr": nll_stderr,
        "chunks": n_chunk,
        "ctx": ctx,
        "scored_tokens": sums.count,
        "text_tokens": ids.len(),
        "bos": bos,
        "batch": a.batch,
        "model": a.model.model_spec()?,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "quantization": model.quantization().map(mamba2_ops::quantized::type_name),
        "device": match device.location() {
            DeviceLocation::Cpu => "cpu".to_string(),
            DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        },
        "seconds": run_s,
        "tok_s": (n_chunk * ctx) as f64 / run_s,
    });
    crate::print_stdout(&json.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_nll_is_minus_log_softmax() {
        let row = [1.0f32, 2.0, 3.0, -1.0];
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        for t in 0..row.len() {
            assert!((token_nll(&row, t) - (lse - row[t] as f64)).abs() < 1e-6);
        }
    }

    #[test]
    fn stderr_matches_llama_cpp_formula() {
        let mut s = NllSums::default();
        for v in [1.0, 2.0, 3.0, 4.0] {
            s.add(v);
        }
        // population variance 1.25 → sqrt(1.25 / 3)
        assert!((s.nll_stderr().unwrap() - (1.25f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((s.mean() - 2.5).abs() < 1e-12);
    }
}
