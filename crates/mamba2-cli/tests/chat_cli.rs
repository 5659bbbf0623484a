//! `mamba2 generate --chat`: a messages file and stdin turns through a chat template, equal to
//! the library's `TextGenerator::chat`.

use mamba2::chat_template::ChatTemplate;
use mamba2::pipeline::{TextGenerator, TextOptions};
use mamba2::sampling::SamplingParams;
use mamba2::session::CancelToken;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn template() -> PathBuf {
    root().join("tests/fixtures/chat_templates/granite-4.0.jinja")
}

fn model() -> String {
    root()
        .join("models/mamba2-tiny")
        .to_string_lossy()
        .into_owned()
}

fn run(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mamba2"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The library's replies to successive user turns, greedy, 8 tokens each.
fn library_replies(system: &str, turns: &[&str]) -> Vec<String> {
    let src = std::fs::read_to_string(template()).unwrap();
    let gen = TextGenerator::load(&model(), &Default::default())
        .unwrap()
        .with_chat_template(Some(ChatTemplate::new(&src, None, None).unwrap()));
    let opts = TextOptions {
        max_new_tokens: 8,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
    let mut session = gen.new_session().unwrap();
    let mut replies = Vec::new();
    for turn in turns {
        messages.push(serde_json::json!({"role": "user", "content": turn}));
        let mut reply = String::new();
        gen.chat(&mut session, &messages, &opts, &CancelToken::new(), |t| {
            reply.push_str(t);
            ControlFlow::Continue(())
        })
        .unwrap();
        messages.push(serde_json::json!({"role": "assistant", "content": reply.trim()}));
        replies.push(reply);
    }
    replies
}

#[test]
fn chat_from_a_messages_file_and_from_stdin_turns() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chat.json");
    let msgs = serde_json::json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who is Emma?"}
    ]});
    std::fs::write(&file, msgs.to_string()).unwrap();
    let (m, t, f) = (model(), template(), file.to_string_lossy().into_owned());
    let common = [
        "generate",
        "--model",
        &m,
        "--temperature",
        "0",
        "-n",
        "8",
        "--chat-template",
        t.to_str().unwrap(),
    ];
    let out = run(&[&common[..], &["--chat", &f]].concat(), "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = library_replies("Be brief.", &["Who is Emma?"]);
    assert!(!want[0].is_empty());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", want[0])
    );

    // Interactive: two turns from stdin (an empty line skipped), the second continuing the
    // state of the first.
    let out = run(
        &[&common[..], &["--chat", "--system", "Be brief."]].concat(),
        "Who is Emma?\n\nAnd Mr. Knightley?\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = library_replies("Be brief.", &["Who is Emma?", "And Mr. Knightley?"]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n{}\n", want[0], want[1])
    );
}

#[test]
fn chat_errors_are_clean() {
    let m = model();
    // The bundled model ships no chat template.
    let out = run(&["generate", "--model", &m, "--chat", "-"], "hi\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no chat template"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.json");
    std::fs::write(&file, r#"{"messages": [{"content": "no role"}]}"#).unwrap();
    let t = template();
    let out = run(
        &[
            "generate",
            "--model",
            &m,
            "--chat-template",
            t.to_str().unwrap(),
            "--chat",
            file.to_str().unwrap(),
        ],
        "",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no string `role`"), "{err}");
}
