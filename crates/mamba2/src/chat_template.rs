//! Chat templates: the Jinja `chat_template` a model publishes (in `tokenizer_config.json`, a
//! `chat_template.jinja` file or the GGUF key `tokenizer.chat_template`), rendered with
//! [`minijinja`] in the environment HF transformers renders it in, so that the prompt text equals
//! `tokenizer.apply_chat_template(messages, tokenize=False)`.
//!
//! What the environment matches: `trim_blocks` and `lstrip_blocks` on, the trailing newline of
//! the template dropped, Python's string and dict methods (`.strip()`, `.split()`,
//! `.startswith()`, `.items()`, ... from `minijinja-contrib`'s pycompat), `raise_exception(msg)`,
//! and a `tojson` filter that writes what Python's `json.dumps(x, ensure_ascii=False)` writes
//! (`", "` and `": "` separators, keys in the caller's order, no HTML escaping; `indent`,
//! `separators` and `sort_keys` arguments), where Jinja's own would escape `<` and `>`; the
//! `iterable` test is Python's (`none` is not iterable). The
//! variables are `messages`, `add_generation_prompt`, `tools` and `documents` (`none` when not
//! given), `bos_token` / `eos_token`, and any extra ones from [`ChatOptions::extra`] (such as
//! `enable_thinking`). `strftime_now` is not provided.

use crate::{Error, Result};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use std::path::Path;

/// One message of a conversation. Templates read `role` and `content`; assistant messages may
/// carry OpenAI-style `tool_calls`, tool results a `tool_call_id` / `name`. Any serializable
/// type with those fields works with [`ChatTemplate::render`] as well.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text of the message.
    pub content: String,
    /// Tool calls made by an assistant message (`[{"type": "function", "function": {"name":
    /// ..., "arguments": {...}}}]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// The name of the tool a `tool` message answers for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The id of the call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with a role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            name: None,
            tool_call_id: None,
        }
    }
}

/// How to render a conversation.
#[derive(Debug, Clone, Default)]
pub struct ChatOptions {
    /// End with the header of an assistant turn, so the model writes the reply.
    pub add_generation_prompt: bool,
    /// Tool (function) JSON schemas, passed as `tools`.
    pub tools: Option<Vec<serde_json::Value>>,
    /// Documents for retrieval-augmented templates, passed as `documents`.
    pub documents: Option<Vec<serde_json::Value>>,
    /// More template variables (e.g. `enable_thinking`), in order.
    pub extra: Vec<(String, serde_json::Value)>,
}

/// A compiled chat template with the special tokens it may print.
///
/// ```
/// use mamba2::chat_template::{ChatMessage, ChatOptions, ChatTemplate};
/// let t = ChatTemplate::new(
///     "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}\n{% endfor %}\
///      {% if add_generation_prompt %}<|assistant|>{% endif %}",
///     None,
///     None,
/// )?;
/// let msgs = [ChatMessage::new("user", " Hi! ")];
/// let opts = ChatOptions { add_generation_prompt: true, ..Default::default() };
/// assert_eq!(t.render(&msgs, &opts)?, "<|user|>Hi!\n<|assistant|>");
/// # Ok::<(), mamba2::Error>(())
/// ```
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        Self::new(&self.source, self.bos_token.clone(), self.eos_token.clone())
            .expect("compiled once already")
    }
}

const TEMPLATE_NAME: &str = "chat_template";

fn template_error(e: minijinja::Error) -> Error {
    // The chain holds the template line and the cause (e.g. the message of raise_exception).
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    Error::ChatTemplate(msg)
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` / `eos_token` are the texts of the model's special tokens
    /// (templates print them). A template that does not parse is [`Error::ChatTemplate`].
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson_filter);
        // Python's `iterable`: `none` and numbers are not (minijinja iterates over `none` as an
        // empty list, so templates that guard `tools | length` with it would fail on no tools).
        env.add_test("iterable", |v: &Value| {
            matches!(
                v.kind(),
                ValueKind::Undefined
                    | ValueKind::String
                    | ValueKind::Bytes
                    | ValueKind::Seq
                    | ValueKind::Map
                    | ValueKind::Iterable
            )
        });
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(template_error)?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token,
            eos_token,
        })
    }

    /// The text of the BOS token the template may print.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The text of the EOS token the template may print.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The chat template of a model folder: `chat_template.jinja` if present (as transformers 5
    /// saves it), else `chat_template` in `tokenizer_config.json` (a string, or a list of
    /// `{name, template}` of which `default` is taken, else the first). Special tokens come
    /// from `tokenizer_config.json` (`bos_token` / `eos_token`, plain or as an added-token
    /// object). `Ok(None)` when the folder has no template.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = if config_path.is_file() {
            let text =
                std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            Some(serde_json::from_str(&text).map_err(|e| Error::ConfigParse {
                path: config_path.display().to_string(),
                message: e.to_string(),
            })?)
        } else {
            None
        };
        let token = |key: &str| -> Option<String> {
            let v = config.as_ref()?.get(key)?;
            v.as_str()
                .or_else(|| v.get("content")?.as_str())
                .map(str::to_string)
        };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => {
                    let named = |name: &str| {
                        list.iter()
                            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
                    };
                    let pick = named("default").or(list.first());
                    Some(
                        pick.and_then(|t| t.get("template")?.as_str())
                            .ok_or_else(|| Error::ConfigParse {
                                path: config_path.display().to_string(),
                                message: "`chat_template` list has no {name, template} entry"
                                    .into(),
                            })?
                            .to_string(),
                    )
                }
                Some(_) => {
                    return Err(Error::ConfigParse {
                        path: config_path.display().to_string(),
                        message: "`chat_template` is neither a string nor a list".into(),
                    })
                }
            }
        };
        source
            .map(|s| Self::new(&s, token("bos_token"), token("eos_token")))
            .transpose()
    }

    /// The template of a GGUF file (`tokenizer.chat_template`), with the BOS / EOS texts from
    /// `tokenizer.ggml.tokens`. `Ok(None)` when the file has none.
    pub fn from_gguf(file: &crate::gguf::GgufFile) -> Result<Option<Self>> {
        let Some(source) = file.get_str("tokenizer.chat_template")? else {
            return Ok(None);
        };
        let tokens = file.get_array("tokenizer.ggml.tokens")?;
        let token = |key: &str| -> Result<Option<String>> {
            let Some(id) = file.get_u64(key)? else {
                return Ok(None);
            };
            Ok(tokens
                .and_then(|t| t.get(usize::try_from(id).ok()?))
                .and_then(|v| v.as_str())
                .map(str::to_string))
        };
        Self::new(
            source,
            token("tokenizer.ggml.bos_token_id")?,
            token("tokenizer.ggml.eos_token_id")?,
        )
        .map(Some)
    }

    /// Renders a conversation to the prompt text. `messages` is any serializable list of
    /// message objects ([`ChatMessage`], `serde_json::Value`, ...). A template that calls
    /// `raise_exception` or fails at run time is [`Error::ChatTemplate`] with its message.
    pub fn render<M: serde::Serialize>(
        &self,
        messages: &[M],
        opts: &ChatOptions,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        let none = Value::from(());
        let list = |v: &Option<Vec<serde_json::Value>>| {
            v.as_ref().map_or(none.clone(), Value::from_serialize)
        };
        let mut ctx: Vec<(String, Value)> = vec![
            ("messages".into(), Value::from_serialize(messages)),
            (
                "add_generation_prompt".into(),
                Value::from(opts.add_generation_prompt),
            ),
            ("tools".into(), list(&opts.tools)),
            ("documents".into(), list(&opts.documents)),
        ];
        if let Some(b) = &self.bos_token {
            ctx.push(("bos_token".into(), Value::from(b.as_str())));
        }
        if let Some(e) = &self.eos_token {
            ctx.push(("eos_token".into(), Value::from(e.as_str())));
        }
        for (k, v) in &opts.extra {
            ctx.push((k.clone(), Value::from_serialize(v)));
        }
        let ctx: Value = ctx.into_iter().collect();
        tmpl.render(ctx).map_err(template_error)
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`.
fn tojson_filter(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(usize::try_from(v.clone()).map_err(|_| {
                minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: bad indent")
            })?)),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: bad separators")
                })?;
            match &parts[..] {
                [a, b] => (a.clone(), b.clone()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair",
                    ))
                }
            }
        }
        // Python's defaults: ", " without indent, "," with it.
        _ if indent.is_some() => (",".into(), ": ".into()),
        _ => (", ".into(), ": ".into()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    fn write(
        &self,
        v: &Value,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    out.push_str(&python_float(f));
                }
            }
            ValueKind::String => self.write_str(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    // Python turns non-string keys into their JSON text (1 -> "1", True -> "true").
                    match k.as_str() {
                        Some(s) => self.write_str(s, out),
                        None => {
                            let mut key = String::new();
                            self.write(k, level + 1, &mut key)?;
                            self.write_str(&key, out);
                        }
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            _ => self.write_str(&v.to_string(), out),
        }
        Ok(())
    }
}

/// A float as Python's `repr` writes it: the shortest text that reads back, always with a `.`
/// or an exponent (`1.0`, `0.1`, `1e+20`), `NaN` / `Infinity` as `json.dumps` allows them.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Rust: 1e20 / 1.5e-7; Python: 1e+20 / 1.5e-07.
        let s = format!("{f:e}");
        let (mant, exp) = s.split_once('e').expect("exponent form");
        let exp: i32 = exp.parse().expect("exponent");
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f:?}");
    if s.contains('.') || s.contains('e') {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_json(src: &str, v: serde_json::Value) -> String {
        let t = ChatTemplate::new(src, None, None).unwrap();
        let opts = ChatOptions {
            extra: vec![("x".into(), v)],
            ..Default::default()
        };
        t.render::<ChatMessage>(&[], &opts).unwrap()
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let v = serde_json::json!({"a": "<é\n\"x\">", "b": [1, 2.5, null, true], "e": {}, "l": []});
        // Python separators, no HTML escaping.
        let got = render_json("{{ x | tojson }}", v);
        let want = r#"{"a": "<é\n\"x\">", "b": [1, 2.5, null, true], "e": {}, "l": []}"#;
        assert_eq!(got, want);
        // Keys in the caller's order (a struct's field order), not sorted.
        let t = ChatTemplate::new("{{ messages[0] | tojson }}", None, None).unwrap();
        let m = [ChatMessage::new("user", "hi")];
        assert_eq!(
            t.render(&m, &ChatOptions::default()).unwrap(),
            r#"{"role": "user", "content": "hi"}"#
        );
        assert_eq!(
            render_json("{{ x | tojson(indent=2) }}", serde_json::json!({"a": [1]})),
            "{\n  \"a\": [\n    1\n  ]\n}"
        );
        assert_eq!(
            render_json(
                "{{ x | tojson(separators=(',', ':')) }}",
                serde_json::json!({"a": [1, 2]})
            ),
            r#"{"a":[1,2]}"#
        );
        assert_eq!(
            render_json(
                "{{ x | tojson(ensure_ascii=true) }}",
                serde_json::json!("é😀")
            ),
            r#""\u00e9\ud83d\ude00""#
        );
    }

    #[test]
    fn python_float_matches_repr() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e20, "1e+20"),
            (1.5e-7, "1.5e-07"),
            (123456.0, "123456.0"),
            (0.0, "0.0"),
        ] {
            assert_eq!(python_float(f), want, "{f}");
        }
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_typed() {
        let t = ChatTemplate::new("{{ raise_exception('only user turns') }}", None, None).unwrap();
        let err = t
            .render::<ChatMessage>(&[], &ChatOptions::default())
            .unwrap_err();
        assert!(
            matches!(&err, Error::ChatTemplate(m) if m.contains("only user turns")),
            "{err}"
        );
        let err = ChatTemplate::new("{% for %}", None, None).unwrap_err();
        assert!(matches!(err, Error::ChatTemplate(_)), "{err}");
    }
}
