//! The published Granite-4.0, Nemotron-Nano-v2 (Nemotron-H) and Nemotron-3-Nano chat templates
//! rendered by [`ChatTemplate`] equal HF transformers' rendering of the same conversations
//! (`scripts/render_chat_templates.py` writes `tests/fixtures/chat_templates/expected.json`).

use mamba2::chat_template::{ChatMessage, ChatOptions, ChatTemplate};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat_templates")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn list(v: &serde_json::Value) -> Option<Vec<serde_json::Value>> {
    v.as_array().cloned()
}

#[test]
fn published_templates_render_as_hf_transformers_does() {
    let expected = expected();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let mut templates = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for case in cases {
        let file = case["template"].as_str().unwrap();
        templates.insert(file.to_string());
        let source = std::fs::read_to_string(fixtures().join(file)).unwrap();
        let tmpl = ChatTemplate::new(
            &source,
            case["bos_token"].as_str().map(str::to_string),
            case["eos_token"].as_str().map(str::to_string),
        )
        .unwrap();
        let opts = ChatOptions {
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            tools: list(&case["tools"]),
            documents: list(&case["documents"]),
            extra: case["extra"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let messages = case["messages"].as_array().unwrap();
        let got = tmpl.render(messages, &opts);
        let want = case["expected"].as_str().unwrap();
        match got {
            Ok(got) if got == want => {}
            Ok(got) => failures.push(format!(
                "{file} / {}:\n  got  {got:?}\n  want {want:?}",
                case["case"]
            )),
            Err(e) => failures.push(format!("{file} / {}: {e}", case["case"])),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(templates.len(), 3, "{templates:?}");
}

/// Typed messages render like the same messages given as JSON.
#[test]
fn typed_messages_render_like_json_ones() {
    let source = std::fs::read_to_string(fixtures().join("granite-4.0.jinja")).unwrap();
    let tmpl = ChatTemplate::new(&source, None, None).unwrap();
    let typed = [
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "What is a state space model?"),
    ];
    let json: Vec<serde_json::Value> = typed
        .iter()
        .map(|m| serde_json::to_value(m).unwrap())
        .collect();
    let opts = ChatOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let case = expected()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["template"] == "granite-4.0.jinja" && c["case"] == "system_user")
        .cloned()
        .unwrap();
    assert_eq!(tmpl.render(&typed, &opts).unwrap(), case["expected"]);
    assert_eq!(tmpl.render(&json, &opts).unwrap(), case["expected"]);
}

/// A folder's `tokenizer_config.json` template (string or named list) and special tokens, and a
/// `chat_template.jinja` beside it taking precedence.
#[test]
fn templates_are_read_from_model_folders() {
    let dir = tempfile::tempdir().unwrap();
    assert!(ChatTemplate::from_model_dir(dir.path()).unwrap().is_none());
    let src = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}";
    let cfg = serde_json::json!({
        "bos_token": {"content": "<s>", "lstrip": false},
        "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": src}],
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let t = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    let msgs = [ChatMessage::new("user", "hi")];
    assert_eq!(
        t.render(&msgs, &ChatOptions::default()).unwrap(),
        "<s>hi</s>"
    );
    std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}\n").unwrap();
    let t = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    // The template's final newline is dropped, as jinja2 does.
    assert_eq!(t.render(&msgs, &ChatOptions::default()).unwrap(), "J</s>");
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        "{\"chat_template\": 3}",
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err();
    assert!(matches!(err, mamba2::Error::ConfigParse { .. }), "{err}");
}
