//! `generate`, `logits` and `info`.

use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use mamba2::device::{parse_dtype, parse_quant_type, DeviceChoice};
use mamba2::hub::HubOptions;
use mamba2::pipeline::{bundled_model_dir, LoadOptions, ModelSource, TextGenerator, TextOptions};
use mamba2::sampling::SamplingParams;
use mamba2::session::CancelToken;
use mamba2::Mamba2Model;
use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;

impl ModelArgs {
    /// `--model`, else the bundled model's folder.
    pub fn model_spec(&self) -> Result<String> {
        match &self.model {
            Some(m) => Ok(m.clone()),
            None => Ok(bundled_model_dir()
                .context("the bundled model")?
                .to_string_lossy()
                .into_owned()),
        }
    }

    pub fn hub(&self) -> HubOptions {
        HubOptions {
            revision: self.revision.clone(),
            offline: self.offline.then_some(true),
            ..Default::default()
        }
    }

    pub fn device(&self) -> Result<Device> {
        Ok(self.device.parse::<DeviceChoice>()?.open()?)
    }

    pub fn dtype(&self) -> Result<DType> {
        Ok(parse_dtype(&self.dtype)?)
    }

    /// `--dtype` as `device` can run it: bf16 on a Metal device without bf16 kernels (before
    /// macOS 14) runs in f32 (`mamba2_ops::metal_support`), with a note on stderr.
    pub fn dtype_on(&self, device: &Device) -> Result<DType> {
        let asked = self.dtype()?;
        let dtype = mamba2_ops::metal_support::dtype_for_device(device, asked);
        if dtype != asked {
            eprintln!(
                "note: {asked:?} needs Metal 3.1 (macOS 14) on this device; running in {dtype:?}"
            );
        }
        Ok(dtype)
    }

    pub fn source(&self) -> Result<ModelSource> {
        Ok(ModelSource::resolve(&self.model_spec()?, &self.hub())?)
    }

    pub fn load_options(&self) -> Result<LoadOptions> {
        let device = self.device()?;
        Ok(LoadOptions {
            dtype: self.dtype_on(&device)?,
            device,
            hub: self.hub(),
            tokenizer: self.tokenizer.clone(),
            quantize: self.quantize.as_deref().map(parse_quant_type).transpose()?,
            check_weights: true,
            threads: self.threads.map(|n| n as usize),
            huge_pages: !self.no_huge_pages,
            monitor: Default::default(),
        })
    }

    /// The model only (no tokenizer).
    pub fn load_model(&self) -> Result<(Mamba2Model, ModelSource)> {
        let source = self.source()?;
        let model = source.load_model(&self.load_options()?)?;
        Ok((model, source))
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt; read from stdin when absent or `-`.
    #[arg(long, short)]
    prompt: Option<String>,
    #[arg(long, short = 'n', default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 means greedy (small models loop under greedy decoding; sampling reads better).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Tokens considered by the repetition penalty (0: all).
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 299_792_458)]
    seed: u64,
    /// Stop when this string is generated (repeatable). The escapes \n, \t, \r and \\ stand
    /// for a newline, tab, carriage return and backslash, so `--stop "\n\n"` stops at a blank
    /// line.
    #[arg(long, value_parser = parse_stop)]
    stop: Vec<String>,
    /// Keep going past EOS.
    #[arg(long)]
    ignore_eos: bool,
    /// Chat through the model's chat template: answer the conversation in FILE (a JSON array of
    /// {"role", "content"} messages, or {"messages": [...], "tools": [...]}); without FILE (or
    /// with `-`), read user turns from stdin, one per line, and answer each in turn.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    chat: Option<PathBuf>,
    /// With --chat: a system message put before the conversation.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// With --chat: a Jinja chat template file to use instead of the model's.
    #[arg(long, requires = "chat", value_name = "FILE")]
    chat_template: Option<PathBuf>,
}

/// `--stop` as typed on a command line, where a newline is hard to type: `\n`, `\t`, `\r` and
/// `\\` become a newline, tab, carriage return and backslash; any other backslash escape is
/// refused rather than guessed at.
fn parse_stop(s: &str) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('n') => '\n',
            Some('t') => '\t',
            Some('r') => '\r',
            Some('\\') => '\\',
            Some(other) => {
                return Err(format!(
                    "unknown escape `\\{other}` (known: \\n \\t \\r \\\\)"
                ))
            }
            None => return Err("a trailing `\\` escapes nothing (write `\\\\`)".into()),
        });
    }
    if out.is_empty() {
        return Err("an empty stop string would stop at once".into());
    }
    Ok(out)
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    if a.chat.is_some() && a.prompt.is_some() {
        bail!("--chat takes its messages from a file or stdin, not --prompt");
    }
    let prompt = match a.prompt.as_deref() {
        _ if a.chat.is_some() => String::new(),
        Some(p) if p != "-" => p.to_string(),
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from stdin")?;
            s
        }
    };
    let opts = a.model.load_options()?;
    let spec = a.model.model_spec()?;
    let gen =
        TextGenerator::load(&spec, &opts).with_context(|| format!("loading model `{spec}`"))?;
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: Some(a.top_p).filter(|&p| p < 1.0),
        min_p: a.min_p,
        repetition_penalty: a.repeat_penalty,
        repetition_window: a.repeat_last_n,
        seed: a.seed,
    };
    let text_opts = TextOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_strings: a.stop.clone(),
        ignore_eos: a.ignore_eos,
    };
    if let Some(source) = &a.chat {
        return crate::chat::run(
            gen,
            source,
            a.system.as_deref(),
            a.chat_template.as_deref(),
            &text_opts,
        );
    }
    let mut session = gen.new_session()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    write!(out, "{prompt}")?;
    out.flush()?;
    let summary = gen.generate(
        &mut session,
        &prompt,
        &text_opts,
        &CancelToken::new(),
        |text| {
            // A closed pipe (e.g. `| head`) ends generation quietly.
            if write!(out, "{text}").and_then(|_| out.flush()).is_err() {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        },
    )?;
    writeln!(out)?;
    eprintln!(
        "[{} prompt tokens, {:.1} tok/s | {} generated, {:.1} tok/s | stop: {:?}]",
        summary.prompt_tokens,
        summary.prompt_tok_s,
        summary.tokens.len(),
        summary.decode_tok_s,
        summary.stop_reason
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// safetensors file with `input_ids` (i64, [batch, seq]).
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors: `logits_prefill` and `logits_decode` (f32, [batch, seq, vocab]).
    #[arg(long)]
    out: PathBuf,
    /// Tokens through the chunked prefill before stepping (default seq/2, at least 1).
    #[arg(long)]
    prefill_len: Option<usize>,
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    let device = a.model.device()?;
    let (model, _) = a.model.load_model()?;
    let inputs = candle_core::safetensors::load(&a.input, &Device::Cpu)
        .with_context(|| format!("reading {}", a.input.display()))?;
    let ids = inputs
        .get("input_ids")
        .with_context(|| format!("{}: no tensor `input_ids`", a.input.display()))?;
    if !matches!(
        ids.dtype(),
        DType::I64 | DType::U32 | DType::I32 | DType::U8
    ) {
        bail!(
            "{}: `input_ids` must be an integer tensor (i64), got {:?}",
            a.input.display(),
            ids.dtype()
        );
    }
    let (_, seq) = ids.dims2().with_context(|| {
        format!(
            "{}: `input_ids` must be [batch, seq], got {:?}",
            a.input.display(),
            ids.dims()
        )
    })?;
    if seq == 0 {
        return Err(mamba2::Error::EmptyPrompt.into());
    }
    let p = a.prefill_len.unwrap_or((seq / 2).max(1));
    if p == 0 || p > seq {
        bail!("--prefill-len must be between 1 and the sequence length {seq}, got {p}");
    }
    let ids = ids.to_device(&device)?;
    let prefill = model.forward(&ids, None)?; // (batch, seq, vocab)
    let mut cache = model.new_cache(ids.dim(0)?)?;
    let mut parts = vec![model.forward(&ids.narrow(1, 0, p)?, Some(&mut cache))?];
    for t in p..seq {
        parts.push(
            model
                .step(&ids.narrow(1, t, 1)?.squeeze(1)?, &mut cache)?
                .unsqueeze(1)?,
        );
    }
    let decode = Tensor::cat(&parts, 1)?;
    let tensors = [
        ("logits_prefill", prefill.to_device(&Device::Cpu)?),
        ("logits_decode", decode.to_device(&Device::Cpu)?),
    ];
    candle_core::safetensors::save(&tensors.into_iter().collect(), &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn info(a: InfoArgs) -> Result<()> {
    let dtype = a.model.dtype()?;
    let (model, source) = a.model.load_model()?;
    let (dir, weights, tokenizer) = match &source {
        ModelSource::Files(f) => (f.dir.clone(), f.weights.clone(), f.tokenizer.clone()),
        ModelSource::Gguf(p) => (p.clone(), vec![p.clone()], Some(p.clone())),
    };
    let c = model.config();
    let info = serde_json::json!({
        "model": dir,
        "weights": weights,
        "tokenizer": tokenizer,
        "config": c,
        "parameters": model.num_parameters(),
        "active_parameters": model.num_active_parameters(),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "quantization": model.quantization().map(mamba2_ops::quantized::type_name),
        "weight_bytes": model.weight_bytes(),
        "weight_bytes_per_token": model.weight_bytes_per_token(),
        "decode_bytes_per_token": model.decode_bytes_per_token(),
        "family": c.family.model_type(),
        "layer_pattern": c.pattern_string(),
        "state_bytes_per_sequence": c.ssm_state_bytes(),
        "kv_bytes_per_token": c.kv_bytes_per_token(dtype.size_in_bytes()),
        "vocab_rows": model.vocab_rows(),
    });
    crate::print_stdout(&serde_json::to_string_pretty(&info)?)
}

#[cfg(test)]
mod tests {
    use super::parse_stop;

    #[test]
    fn stop_escapes_become_the_characters() {
        assert_eq!(parse_stop(r"\n\n").unwrap(), "\n\n");
        assert_eq!(parse_stop(r"a\tb\rc").unwrap(), "a\tb\rc");
        assert_eq!(parse_stop(r"C:\\dir").unwrap(), "C:\\dir");
        assert_eq!(
            parse_stop(r"\\n").unwrap(),
            "\\n",
            "an escaped backslash then n"
        );
        assert_eq!(parse_stop("The End").unwrap(), "The End");
        assert_eq!(
            parse_stop("é\n").unwrap(),
            "é\n",
            "a real newline stays one"
        );
    }

    #[test]
    fn bad_stop_escapes_are_refused() {
        assert!(parse_stop(r"\q").unwrap_err().contains(r"\q"));
        assert!(parse_stop("end\\").unwrap_err().contains("trailing"));
        assert!(parse_stop("").is_err());
    }
}
