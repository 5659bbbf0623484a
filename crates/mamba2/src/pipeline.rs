//! Text in, text out: a model with its tokenizer and EOS ids, loaded from a Hub id or a folder,
//! generating into a [`Session`] with streamed, UTF-8-safe text and stop strings.

use crate::chat_template::ChatTemplate;
use crate::config::{read_generation_eos, Mamba2Config};
use crate::gguf::{tokenizer_from_gguf, GgufFile};
use crate::hub::{load_tokenizer, resolve_model, resolve_tokenizer, HubOptions, ModelFiles};
use crate::model::Mamba2Model;
use crate::progress::LoadMonitor;
use crate::sampling::SamplingParams;
use crate::session::{CancelToken, GenerateOptions, GenerationSummary, Session, TokenStream};
use crate::text_stream::TextStream;
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::{DType, Device};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use tokenizers::Tokenizer;

pub use crate::bundled::bundled_model_dir;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Weight and activation dtype.
    pub dtype: DType,
    /// Device for weights and state.
    pub device: Device,
    /// Hub access (revision, cache, offline, progress bar).
    pub hub: HubOptions,
    /// Tokenizer override: a `tokenizer.json` path, a folder or a Hub repo id.
    pub tokenizer: Option<String>,
    /// Quantize the weight matrices (embedding, projections, LM head) to this block format at
    /// load (see [`Mamba2Model::from_weights_quantized`]); `None` keeps them as stored.
    pub quantize: Option<candle_core::quantized::GgmlDType>,
    /// Refuse weights with NaN or ±inf (also f32 values past the range of an f16 load) with
    /// [`crate::Error::NonFinite`] naming the tensor, instead of generating from them. Costs one
    /// pass over the weights at load; on by default.
    pub check_weights: bool,
    /// CPU threads of the model (`None`: the physical cores; see [`crate::threads`]).
    pub threads: Option<usize>,
    /// Large CPU weight tensors in memory advised for transparent huge pages (Linux; see
    /// [`crate::weights::Weights::with_huge_pages`]); on by default.
    pub huge_pages: bool,
    /// Progress reports and cancellation for the download and the load (see
    /// [`crate::progress`]); also used for the download when `hub.monitor` is not set.
    pub monitor: LoadMonitor,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            hub: HubOptions::default(),
            tokenizer: None,
            quantize: None,
            check_weights: true,
            threads: None,
            huge_pages: true,
            monitor: LoadMonitor::default(),
        }
    }
}

/// What a model spec resolves to: a GGUF file (config, weights and tokenizer in one), or a
/// folder / Hub repo of config, weight and tokenizer files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A `.gguf` file.
    Gguf(PathBuf),
    /// A folder or Hub snapshot.
    Files(ModelFiles),
}

impl ModelSource {
    /// A spec that names an existing file ending in `.gguf` is that GGUF file; anything else is
    /// resolved as a folder or Hub repo id ([`resolve_model`]).
    ///
    /// ```
    /// use mamba2::pipeline::{bundled_model_dir, ModelSource};
    /// let src = ModelSource::resolve(&bundled_model_dir()?.to_string_lossy(), &Default::default())?;
    /// assert!(matches!(src, ModelSource::Files(_)));
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn resolve(spec: &str, hub: &HubOptions) -> Result<Self> {
        let p = std::path::Path::new(spec);
        if p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            if p.is_file() {
                return Ok(ModelSource::Gguf(p.to_path_buf()));
            }
            return Err(Error::ModelNotFound {
                model: spec.to_string(),
                message: "no such GGUF file".into(),
            });
        }
        Ok(ModelSource::Files(resolve_model(spec, hub)?))
    }

    /// Loads the model: config and weights from the files, or everything from the GGUF.
    pub fn load_model(&self, opts: &LoadOptions) -> Result<Mamba2Model> {
        let mut model = self.load_model_here(opts)?;
        model.set_threads(opts.threads)?;
        Ok(model)
    }

    fn load_model_here(&self, opts: &LoadOptions) -> Result<Mamba2Model> {
        opts.monitor.check()?;
        match self {
            ModelSource::Files(files) => {
                let config = Mamba2Config::from_file(&files.config)?;
                let weights = Weights::from_files(&files.weights, &opts.device)?
                    .with_finite_check(opts.check_weights)
                    .with_huge_pages(opts.huge_pages)
                    .with_monitor(opts.monitor.clone());
                Mamba2Model::from_weights_quantized(&config, &weights, opts.dtype, opts.quantize)
            }
            ModelSource::Gguf(path) => {
                let file = GgufFile::open(path)?;
                let model = Mamba2Model::from_gguf(&file, opts.dtype, &opts.device, opts.quantize)?;
                opts.monitor.check()?;
                Ok(model)
            }
        }
    }

    /// The tokenizer: `override_spec` if given (a `tokenizer.json`, a folder or a repo id),
    /// else the GGUF's own (`tokenizer.ggml.*`) or the folder's `tokenizer.json` (else
    /// GPT-NeoX-20B's, see [`resolve_tokenizer`]).
    pub fn load_tokenizer(
        &self,
        override_spec: Option<&str>,
        hub: &HubOptions,
    ) -> Result<Tokenizer> {
        match (self, override_spec) {
            (ModelSource::Gguf(path), None) => tokenizer_from_gguf(&GgufFile::open(path)?),
            (ModelSource::Gguf(path), Some(spec)) => {
                let files = ModelFiles {
                    dir: path
                        .parent()
                        .unwrap_or(std::path::Path::new("."))
                        .to_path_buf(),
                    config: path.clone(),
                    weights: vec![path.clone()],
                    tokenizer: None,
                    generation_config: None,
                };
                load_tokenizer(&resolve_tokenizer(&files, Some(spec), hub)?)
            }
            (ModelSource::Files(files), spec) => {
                load_tokenizer(&resolve_tokenizer(files, spec, hub)?)
            }
        }
    }
}

/// Loads config and weights from resolved files, refusing non-finite weights
/// ([`load_model_with_check`] to skip that pass).
pub fn load_model(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Mamba2Model> {
    load_model_with_check(files, dtype, device, true)
}

/// [`load_model`] with the non-finite weight check on or off.
pub fn load_model_with_check(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
    check_weights: bool,
) -> Result<Mamba2Model> {
    let config = Mamba2Config::from_file(&files.config)?;
    let weights = Weights::from_files(&files.weights, device)?.with_finite_check(check_weights);
    Mamba2Model::from_weights(&config, &weights, dtype)
}

/// Text-level options.
#[derive(Debug, Clone, PartialEq)]
pub struct TextOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these; the stop string is not emitted.
    pub stop_strings: Vec<String>,
    /// Keep generating past EOS tokens.
    pub ignore_eos: bool,
}

impl Default for TextOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingParams::greedy(),
            stop_strings: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// A model, its tokenizer and its EOS ids. Cheap to clone; `Send + Sync`.
///
/// ```no_run
/// use mamba2::pipeline::{TextGenerator, LoadOptions, TextOptions};
/// use mamba2::session::CancelToken;
/// let gen = TextGenerator::load(&mamba2::pipeline::bundled_model_dir()?.to_string_lossy(), &LoadOptions::default())?;
/// let mut session = gen.new_session()?;
/// gen.generate(&mut session, "Once upon a time", &TextOptions::default(), &CancelToken::new(), |text| {
///     print!("{text}");
///     std::ops::ControlFlow::Continue(())
/// })?;
/// # Ok::<(), mamba2::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct TextGenerator {
    model: Arc<Mamba2Model>,
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Vec<u32>,
    bos_token_id: Option<u32>,
    chat_template: Option<Arc<ChatTemplate>>,
}

impl TextGenerator {
    /// Resolves `model` (a `.gguf` file, a folder or a Hub repo id, see
    /// [`ModelSource::resolve`]), then loads config, weights, tokenizer and EOS ids
    /// (generation_config.json, the config / GGUF metadata, then the tokenizer's
    /// `<|endoftext|>`/`</s>`).
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        let mut hub = opts.hub.clone();
        if !hub.monitor.is_active() {
            hub.monitor = opts.monitor.clone();
        }
        let opts = &LoadOptions {
            hub,
            ..opts.clone()
        };
        let source = ModelSource::resolve(model, &opts.hub)?;
        let m = source.load_model(opts)?;
        let tokenizer = source.load_tokenizer(opts.tokenizer.as_deref(), &opts.hub)?;
        let mut eos = match &source {
            ModelSource::Files(ModelFiles {
                generation_config: Some(p),
                ..
            }) => read_generation_eos(p)?,
            _ => Vec::new(),
        };
        if eos.is_empty() {
            eos = m.config().eos_token_ids.clone();
        }
        if eos.is_empty() {
            eos = ["<|endoftext|>", "</s>", "<eos>"]
                .iter()
                .filter_map(|t| tokenizer.token_to_id(t))
                .take(1)
                .collect();
        }
        let bos = m.config().bos_token_id;
        let chat_template = match &source {
            ModelSource::Files(files) => ChatTemplate::from_model_dir(&files.dir)?,
            ModelSource::Gguf(path) => ChatTemplate::from_gguf(&GgufFile::open(path)?)?,
        };
        Ok(Self::new(Arc::new(m), Arc::new(tokenizer), eos, bos).with_chat_template(chat_template))
    }

    /// Assembles a generator from parts.
    pub fn new(
        model: Arc<Mamba2Model>,
        tokenizer: Arc<Tokenizer>,
        eos_token_ids: Vec<u32>,
        bos_token_id: Option<u32>,
    ) -> Self {
        Self {
            model,
            tokenizer,
            eos_token_ids,
            bos_token_id,
            chat_template: None,
        }
    }

    /// Sets (or clears) the chat template used by [`TextGenerator::apply_chat_template`] and
    /// [`TextGenerator::chat`]; [`TextGenerator::load`] sets the model's own.
    pub fn with_chat_template(mut self, template: Option<ChatTemplate>) -> Self {
        self.chat_template = template.map(Arc::new);
        self
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_deref()
    }

    pub fn model(&self) -> &Arc<Mamba2Model> {
        &self.model
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The BOS id named by the config, if any (Mamba-2 checkpoints do not prepend it).
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// Tokenizes `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// A new, empty session on the shared model.
    pub fn new_session(&self) -> Result<Session> {
        Session::new(self.model.clone())
    }

    /// Appends `prompt` to the session and generates, calling `on_text` with each new piece of
    /// text (never a split UTF-8 character). An empty prompt is allowed only when the session
    /// already holds tokens (continuing a conversation). Cancellation as in
    /// [`Session::generate`]: during the prompt's prefill it is [`Error::Cancelled`], during
    /// decoding a summary with [`crate::session::StopReason::Cancelled`].
    pub fn generate(
        &self,
        session: &mut Session,
        prompt: &str,
        opts: &TextOptions,
        cancel: &CancelToken,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationSummary> {
        let mut pieces = self.stream(session, prompt, opts, cancel)?;
        while let Some(piece) = pieces.next() {
            if on_text(&piece?).is_break() {
                pieces.stop();
                break;
            }
        }
        Ok(pieces.finish())
    }

    /// The pull-style form of [`TextGenerator::generate`]: an iterator of the same pieces of
    /// text the callback would get, in order (the held-back tail of a possible stop string
    /// last). Dropping it or calling [`TextPieces::stop`] ends the generation.
    ///
    /// ```no_run
    /// use mamba2::pipeline::{bundled_model_dir, LoadOptions, TextGenerator, TextOptions};
    /// use mamba2::session::CancelToken;
    /// let gen = TextGenerator::load(&bundled_model_dir()?.to_string_lossy(), &LoadOptions::default())?;
    /// let mut session = gen.new_session()?;
    /// let mut text = String::new();
    /// for piece in gen.stream(&mut session, "The old man said", &TextOptions::default(), &CancelToken::new())? {
    ///     text.push_str(&piece?);
    /// }
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn stream<'a>(
        &self,
        session: &'a mut Session,
        prompt: &str,
        opts: &TextOptions,
        cancel: &CancelToken,
    ) -> Result<TextPieces<'a>> {
        let ids = self.encode(prompt)?;
        if ids.is_empty() && session.tokens().is_empty() && session.pending().is_empty() {
            return Err(Error::EmptyPrompt);
        }
        session.feed(&ids)?;
        let mut text = TextStream::new(self.tokenizer.clone(), opts.stop_strings.clone());
        // Decoders that strip a leading space need the preceding tokens to place the first word.
        let context: Vec<u32> = session
            .tokens()
            .iter()
            .chain(session.pending())
            .copied()
            .collect();
        text.set_context(&context)?;
        let gen_opts = GenerateOptions {
            max_new_tokens: opts.max_new_tokens,
            sampling: opts.sampling.clone(),
            eos_token_ids: if opts.ignore_eos {
                Vec::new()
            } else {
                self.eos_token_ids.clone()
            },
        };
        Ok(TextPieces {
            tokens: session.stream(&gen_opts, cancel)?,
            text,
            done: false,
        })
    }
}

/// Pieces of generated text, pulled one at a time (see [`TextGenerator::stream`]).
pub struct TextPieces<'a> {
    tokens: TokenStream<'a>,
    text: TextStream,
    done: bool,
}

impl TextPieces<'_> {
    /// Ends the generation now; the text held back for a possible stop string is dropped.
    pub fn stop(&mut self) {
        self.tokens.stop();
        self.done = true;
    }

    /// Ends the generation if it is still running and returns what it did.
    pub fn finish(self) -> GenerationSummary {
        self.tokens.finish()
    }
}

impl Iterator for TextPieces<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        while !self.done {
            match self.tokens.next() {
                None => {
                    self.done = true;
                    // Text held back for a possible stop string is released at the end.
                    if !self.text.stopped() {
                        match self.text.finish() {
                            Ok(rest) if rest.is_empty() => {}
                            other => return Some(other),
                        }
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Some(Ok(tok)) => match self.text.push(tok) {
                    Err(e) => {
                        self.stop();
                        return Some(Err(e));
                    }
                    Ok(chunk) => {
                        if chunk.stopped {
                            self.stop();
                        }
                        if !chunk.text.is_empty() {
                            return Some(Ok(chunk.text));
                        }
                    }
                },
            }
        }
        None
    }
}
