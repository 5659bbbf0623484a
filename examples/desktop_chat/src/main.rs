//! A desktop chat window on a Mamba-2 model, using the mamba2 library in-process: the model
//! loads in the background behind a progress bar, replies stream into the window token by
//! token, Stop cancels a reply, and the conversation (the model's state and the transcript)
//! is saved on quit and restored on the next start.
//!
//! `desktop_chat [MODEL]`: a folder, `.gguf` file or Hub repo id; default the bundled model.
//! Environment: `DESKTOP_CHAT_STATE_DIR` (where the conversation is saved), and for scripted
//! runs (`scripts/screenshot_desktop_chat.sh`) `DESKTOP_CHAT_PROMPT` (typed and sent once the
//! model is loaded), `DESKTOP_CHAT_DONE_FILE` (written with the status line when that reply
//! has finished, or when loading has finished if no prompt is given) and
//! `DESKTOP_CHAT_QUIT_FILE` (the window closes, saving, once this file exists).

mod worker;

use eframe::egui;
use mamba2::pipeline::TextGenerator;
use mamba2::session::{CancelToken, Session};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use worker::{FromWorker, StateFiles};

fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DESKTOP_CHAT_STATE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("mamba2-desktop-chat")
}

enum Phase {
    Loading(f32, String),
    Ready,
    Failed(String),
}

struct ChatApp {
    phase: Phase,
    rx: Receiver<FromWorker>,
    tx: Sender<FromWorker>,
    generator: Option<TextGenerator>,
    /// The conversation's state; `None` while a reply is being generated (the worker has it).
    session: Option<Session>,
    transcript: Vec<(String, String)>,
    input: String,
    cancel: CancelToken,
    status: String,
    files: StateFiles,
    auto_prompt: Option<String>,
    done_file: Option<PathBuf>,
    quit_file: Option<PathBuf>,
}

impl ChatApp {
    fn new(cc: &eframe::CreationContext<'_>, spec: String) -> Self {
        let (tx, rx) = channel();
        let files = StateFiles::in_dir(&state_dir());
        let ctx = cc.egui_ctx.clone();
        worker::spawn_load(
            spec,
            StateFiles::in_dir(&state_dir()),
            tx.clone(),
            move || ctx.request_repaint(),
        );
        Self {
            phase: Phase::Loading(0.0, "Starting".into()),
            rx,
            tx,
            generator: None,
            session: None,
            transcript: Vec::new(),
            input: String::new(),
            cancel: CancelToken::new(),
            status: String::new(),
            files,
            auto_prompt: std::env::var("DESKTOP_CHAT_PROMPT").ok(),
            done_file: std::env::var_os("DESKTOP_CHAT_DONE_FILE").map(PathBuf::from),
            quit_file: std::env::var_os("DESKTOP_CHAT_QUIT_FILE").map(PathBuf::from),
        }
    }

    fn generating(&self) -> bool {
        matches!(self.phase, Phase::Ready) && self.session.is_none()
    }

    fn send(&mut self, ctx: &egui::Context) {
        let text = self.input.trim().to_string();
        let (Some(generator), Some(session)) = (self.generator.clone(), self.session.take()) else {
            return;
        };
        if text.is_empty() {
            self.session = Some(session);
            return;
        }
        self.input.clear();
        self.transcript.push(("You".into(), text.clone()));
        self.transcript.push(("Model".into(), String::new()));
        self.cancel = CancelToken::new();
        self.status = "Generating…".into();
        let ctx = ctx.clone();
        worker::spawn_generate(
            generator,
            session,
            text,
            self.cancel.clone(),
            self.tx.clone(),
            move || ctx.request_repaint(),
        );
    }

    fn drain(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                FromWorker::Progress(p, what) => self.phase = Phase::Loading(p, what),
                FromWorker::Loaded {
                    generator,
                    session,
                    transcript,
                    note,
                } => {
                    self.status = note.unwrap_or_else(|| {
                        if transcript.is_empty() {
                            "New conversation".into()
                        } else {
                            format!("Restored {} messages", transcript.len())
                        }
                    });
                    self.generator = Some(generator);
                    self.session = Some(session);
                    self.transcript = transcript;
                    self.phase = Phase::Ready;
                    if let Some(p) = self.auto_prompt.clone() {
                        self.input = p;
                    } else if let Some(f) = self.done_file.take() {
                        let _ = std::fs::write(f, &self.status);
                    }
                }
                FromWorker::Text(t) => {
                    if let Some(last) = self.transcript.last_mut() {
                        last.1.push_str(&t);
                    }
                }
                FromWorker::Done(session, summary) => {
                    self.session = Some(session);
                    self.status = summary;
                    if let Some(f) = self.done_file.take() {
                        let _ = std::fs::write(f, &self.status);
                    }
                }
                FromWorker::Failed(e) => self.phase = Phase::Failed(e),
            }
        }
    }
}

impl eframe::App for ChatApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.drain();
        let ctx = ui.ctx().clone();
        if let Some(f) = &self.quit_file {
            if f.exists() {
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            }
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }
        if self.auto_prompt.is_some() && !self.input.is_empty() && self.session.is_some() {
            self.auto_prompt = None;
            self.send(&ctx);
        }
        egui::Panel::bottom("input").show(ui, |ui| {
            ui.add_space(6.0);
            match &self.phase {
                Phase::Loading(p, what) => {
                    ui.add(
                        egui::ProgressBar::new(*p)
                            .text(what.as_str())
                            .show_percentage(),
                    );
                }
                Phase::Failed(e) => {
                    ui.colored_label(egui::Color32::RED, e);
                }
                Phase::Ready => {
                    ui.horizontal(|ui| {
                        let busy = self.generating();
                        let edit = ui.add_enabled(
                            !busy,
                            egui::TextEdit::singleline(&mut self.input)
                                .hint_text("Say something…")
                                .desired_width(ui.available_width() - 130.0),
                        );
                        let enter =
                            edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                        if ui.add_enabled(!busy, egui::Button::new("Send")).clicked()
                            || (enter && !busy)
                        {
                            self.send(&ctx);
                        }
                        if ui.add_enabled(busy, egui::Button::new("Stop")).clicked() {
                            self.cancel.cancel();
                        }
                    });
                    ui.label(egui::RichText::new(&self.status).small().weak());
                }
            }
            ui.add_space(6.0);
        });
        egui::CentralPanel::default().show(ui, |ui| {
            ui.heading("mamba2 desktop chat");
            ui.separator();
            egui::ScrollArea::vertical()
                .stick_to_bottom(true)
                .auto_shrink([false, false])
                .show(ui, |ui| {
                    for (who, text) in &self.transcript {
                        ui.label(egui::RichText::new(who).strong());
                        ui.label(text.trim_start());
                        ui.add_space(8.0);
                    }
                });
        });
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        // A reply in progress is stopped and its session awaited, so the saved state matches
        // the saved transcript.
        self.cancel.cancel();
        while self.generating() {
            match self.rx.recv() {
                Ok(msg) => {
                    let done = matches!(msg, FromWorker::Done(..));
                    self.rx_handle(msg);
                    if done {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        if let Some(session) = self.session.as_mut() {
            if let Err(e) = worker::save(session, &self.transcript, &self.files) {
                eprintln!("could not save the conversation: {e:#}");
            }
        }
    }
}

impl ChatApp {
    fn rx_handle(&mut self, msg: FromWorker) {
        match msg {
            FromWorker::Text(t) => {
                if let Some(last) = self.transcript.last_mut() {
                    last.1.push_str(&t);
                }
            }
            FromWorker::Done(session, _) => self.session = Some(session),
            _ => {}
        }
    }
}

fn main() -> eframe::Result {
    let spec = std::env::args().nth(1).unwrap_or_else(|| {
        mamba2::pipeline::bundled_model_dir()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|e| {
                eprintln!("{e}");
                std::process::exit(1)
            })
    });
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([720.0, 520.0])
            .with_title("mamba2 desktop chat"),
        ..Default::default()
    };
    eframe::run_native(
        "mamba2 desktop chat",
        options,
        Box::new(|cc| Ok(Box::new(ChatApp::new(cc, spec)))),
    )
}
