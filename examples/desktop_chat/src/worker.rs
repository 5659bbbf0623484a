//! The model side of the app, off the UI thread: loading with progress, one generation per
//! user turn streamed as text, cancellation, and the conversation saved as a session file
//! (the model state after every token so far, a few MB whatever the length) plus a transcript.

use mamba2::config::read_generation_eos;
use mamba2::hub::{HubOptions, ModelFiles};
use mamba2::pipeline::{LoadOptions, ModelSource, TextGenerator, TextOptions};
use mamba2::sampling::SamplingParams;
use mamba2::session::{CancelToken, Session};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;

/// What the worker threads tell the window.
pub enum FromWorker {
    /// Loading progress in [0, 1] and what is being done.
    Progress(f32, String),
    /// The model is ready; the restored transcript (empty for a new conversation).
    Loaded {
        generator: TextGenerator,
        session: Session,
        transcript: Vec<(String, String)>,
        note: Option<String>,
    },
    /// Text generated for the current turn.
    Text(String),
    /// The turn ended (tokens, why); the session comes back.
    Done(Session, String),
    /// Loading or generation failed.
    Failed(String),
}

/// Files of the saved conversation.
pub struct StateFiles {
    pub session: PathBuf,
    pub transcript: PathBuf,
}

impl StateFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            session: dir.join("conversation.session"),
            transcript: dir.join("transcript.json"),
        }
    }
}

fn load(spec: &str, files: &StateFiles, tx: &Sender<FromWorker>) -> anyhow::Result<FromWorker> {
    let hub = HubOptions::default();
    let progress = |p: f32, what: &str| {
        let _ = tx.send(FromWorker::Progress(p, what.to_string()));
    };
    progress(0.05, "Finding the model");
    let source = ModelSource::resolve(spec, &hub)?;
    progress(0.2, "Loading the weights");
    let model = source.load_model(&LoadOptions::default())?;
    progress(0.7, "Loading the tokenizer");
    let tokenizer = source.load_tokenizer(None, &hub)?;
    let mut eos = match &source {
        ModelSource::Files(ModelFiles {
            generation_config: Some(p),
            ..
        }) => read_generation_eos(p)?,
        _ => Vec::new(),
    };
    if eos.is_empty() {
        eos = model.config().eos_token_ids.clone();
    }
    let bos = model.config().bos_token_id;
    let generator = TextGenerator::new(Arc::new(model), Arc::new(tokenizer), eos, bos);
    progress(0.9, "Restoring the conversation");
    let (session, transcript, note) = match restore(&generator, files) {
        Ok(Some((s, t))) => (s, t, None),
        Ok(None) => (generator.new_session()?, Vec::new(), None),
        Err(e) => (
            generator.new_session()?,
            Vec::new(),
            Some(format!("saved conversation not restored: {e}")),
        ),
    };
    progress(1.0, "Ready");
    Ok(FromWorker::Loaded {
        generator,
        session,
        transcript,
        note,
    })
}

fn restore(
    generator: &TextGenerator,
    files: &StateFiles,
) -> anyhow::Result<Option<(Session, Vec<(String, String)>)>> {
    if !files.session.is_file() || !files.transcript.is_file() {
        return Ok(None);
    }
    let session = Session::load(generator.model().clone(), &files.session)?;
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files.transcript)?)?;
    let transcript = json
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("transcript is not a list"))?
        .iter()
        .filter_map(|m| {
            Some((
                m["role"].as_str()?.to_string(),
                m["text"].as_str()?.to_string(),
            ))
        })
        .collect();
    Ok(Some((session, transcript)))
}

/// Writes the session and transcript (the session file first: a transcript without its
/// state is never left behind).
pub fn save(
    session: &mut Session,
    transcript: &[(String, String)],
    files: &StateFiles,
) -> anyhow::Result<()> {
    if let Some(dir) = files.session.parent() {
        std::fs::create_dir_all(dir)?;
    }
    session.save(&files.session)?;
    let list: Vec<serde_json::Value> = transcript
        .iter()
        .map(|(role, text)| serde_json::json!({"role": role, "text": text}))
        .collect();
    std::fs::write(&files.transcript, serde_json::to_string_pretty(&list)?)?;
    Ok(())
}

/// Loads the model on a new thread.
pub fn spawn_load(
    spec: String,
    files: StateFiles,
    tx: Sender<FromWorker>,
    wake: impl Fn() + Send + 'static,
) {
    std::thread::spawn(move || {
        let msg = load(&spec, &files, &tx).unwrap_or_else(|e| FromWorker::Failed(format!("{e:#}")));
        let _ = tx.send(msg);
        wake();
    });
}

/// The text fed for a user turn: the whole conversation lives in the session's state, so
/// only this turn's text is new to the model.
pub fn turn_text(first: bool, user: &str) -> String {
    let sep = if first { "" } else { "\n\n" };
    format!("{sep}User: {user}\n\nAssistant:")
}

/// Generates the reply to `user` on a new thread, streaming text; `cancel` stops it between
/// two tokens.
pub fn spawn_generate(
    generator: TextGenerator,
    mut session: Session,
    user: String,
    cancel: CancelToken,
    tx: Sender<FromWorker>,
    wake: impl Fn() + Send + Sync + 'static,
) {
    std::thread::spawn(move || {
        let opts = TextOptions {
            max_new_tokens: 160,
            sampling: SamplingParams::greedy()
                .with_temperature(0.7)
                .with_top_p(0.9)
                .with_seed(1),
            stop_strings: vec!["\nUser:".into()],
            ignore_eos: false,
        };
        let text = turn_text(session.tokens().is_empty(), &user);
        let result = generator.generate(&mut session, &text, &opts, &cancel, |piece| {
            let _ = tx.send(FromWorker::Text(piece.to_string()));
            wake();
            ControlFlow::Continue(())
        });
        let msg = match result {
            Ok(s) => FromWorker::Done(
                session,
                format!(
                    "{} tokens, {:.0} tok/s, {:?}",
                    s.tokens.len(),
                    s.decode_tok_s,
                    s.stop_reason
                ),
            ),
            Err(e) => FromWorker::Done(session, format!("error: {e}")),
        };
        let _ = tx.send(msg);
        wake();
    });
}
