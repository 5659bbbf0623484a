//! `generate --chat`: a conversation through the model's chat template, from a JSON file of
//! messages or turn by turn from stdin.

use anyhow::{bail, Context, Result};
use mamba2::chat_template::{ChatOptions, ChatTemplate};
use mamba2::pipeline::{TextGenerator, TextOptions};
use mamba2::session::CancelToken;
use serde_json::Value;
use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::Path;

/// What `--chat FILE` reads: an array of messages, or `{"messages": [...], "tools": [...]}`.
fn read_conversation(path: &Path) -> Result<(Vec<Value>, Option<Vec<Value>>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let (messages, tools) = match v {
        Value::Array(m) => (m, None),
        Value::Object(mut o) => {
            let m = match o.remove("messages") {
                Some(Value::Array(m)) => m,
                _ => bail!("{}: no `messages` array", path.display()),
            };
            let tools = match o.remove("tools") {
                None | Some(Value::Null) => None,
                Some(Value::Array(t)) => Some(t),
                Some(_) => bail!("{}: `tools` must be an array", path.display()),
            };
            (m, tools)
        }
        _ => bail!(
            "{}: expected an array of messages or {{\"messages\": [...]}}",
            path.display()
        ),
    };
    for (i, m) in messages.iter().enumerate() {
        if !m.get("role").is_some_and(Value::is_string) {
            bail!("{}: message {i} has no string `role`", path.display());
        }
    }
    Ok((messages, tools))
}

/// Runs `--chat`: `source` is a messages file, or `-` for turns from stdin.
pub fn run(
    gen: TextGenerator,
    source: &Path,
    system: Option<&str>,
    template: Option<&Path>,
    opts: &TextOptions,
) -> Result<()> {
    let gen = match template {
        Some(p) => {
            let src =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let old = gen.chat_template();
            let (bos, eos) = (
                old.and_then(|t| t.bos_token().map(str::to_string)),
                old.and_then(|t| t.eos_token().map(str::to_string)),
            );
            gen.clone()
                .with_chat_template(Some(ChatTemplate::new(&src, bos, eos)?))
        }
        None => gen,
    };
    if gen.chat_template().is_none() {
        bail!("this model has no chat template; give one with --chat-template FILE.jinja");
    }
    let mut messages: Vec<Value> = system
        .map(|s| serde_json::json!({"role": "system", "content": s}))
        .into_iter()
        .collect();
    let mut session = gen.new_session()?;
    let cancel = CancelToken::new();
    let stdout = std::io::stdout();
    let mut reply_turn = |messages: &mut Vec<Value>, tools: Option<Vec<Value>>| -> Result<()> {
        let mut out = stdout.lock();
        let mut reply = String::new();
        let on_text = |text: &str| {
            reply.push_str(text);
            // A closed pipe (e.g. `| head`) ends generation quietly.
            if write!(out, "{text}").and_then(|_| out.flush()).is_err() {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        };
        let summary = match tools {
            // Tools change the rendering; render here and generate from the text.
            Some(tools) => {
                let chat_opts = ChatOptions {
                    add_generation_prompt: true,
                    tools: Some(tools),
                    ..Default::default()
                };
                let prompt = gen.apply_chat_template(messages, &chat_opts)?;
                session.sync_tokens(&gen.encode(&prompt)?)?;
                gen.generate(&mut session, "", opts, &cancel, on_text)?
            }
            None => gen.chat(&mut session, messages, opts, &cancel, on_text)?,
        };
        writeln!(out)?;
        eprintln!(
            "[{} prompt tokens, {:.1} tok/s | {} generated, {:.1} tok/s | stop: {:?}]",
            summary.prompt_tokens,
            summary.prompt_tok_s,
            summary.tokens.len(),
            summary.decode_tok_s,
            summary.stop_reason
        );
        messages.push(serde_json::json!({"role": "assistant", "content": reply.trim()}));
        Ok(())
    };
    if source != Path::new("-") {
        let (file_messages, tools) = read_conversation(source)?;
        messages.extend(file_messages);
        return reply_turn(&mut messages, tools);
    }
    // Interactive: one user turn per line; an empty line is skipped, EOF ends.
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading a turn from stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        messages.push(serde_json::json!({"role": "user", "content": line}));
        reply_turn(&mut messages, None)?;
    }
    Ok(())
}
