//! Lenient JSON reading for config files: Python's bare non-finite literals, transformers'
//! `{"__float__": ...}` objects, and typed field access whose errors name the field.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Parses JSON that may contain Python's non-standard `Infinity`, `-Infinity` and `NaN`
/// literals. Outside string literals they are rewritten to the `{"__float__": "..."}` objects that
/// newer transformers write, so one float reader (see the config fields) handles both spellings.
/// Text inside strings is never touched.
pub fn parse_json_lenient(s: &str, origin: &str) -> Result<Value> {
    let text = rewrite_nonfinite_literals(s);
    serde_json::from_str(&text).map_err(|e| parse_err(origin, format!("invalid JSON: {e}")))
}

/// Rewrites bare non-finite literals outside strings; returns the text unchanged otherwise.
fn rewrite_nonfinite_literals(s: &str) -> std::borrow::Cow<'_, str> {
    const LITERALS: [(&str, &str); 3] = [
        ("-Infinity", r#"{"__float__":"-Infinity"}"#),
        ("Infinity", r#"{"__float__":"Infinity"}"#),
        ("NaN", r#"{"__float__":"NaN"}"#),
    ];
    let bytes = s.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out: Option<String> = None;
    let (mut i, mut copied, mut in_string) = (0, 0, false);
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1, // skip the escaped byte, which may be a quote
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        let word_start = i == 0 || !is_word(bytes[i - 1]);
        let hit = LITERALS.iter().find(|(lit, _)| {
            let end = i + lit.len();
            word_start
                && bytes[i..].starts_with(lit.as_bytes())
                && (end == bytes.len() || !is_word(bytes[end]))
        });
        if let Some((lit, replacement)) = hit {
            let out = out.get_or_insert_with(|| String::with_capacity(s.len() + 64));
            out.push_str(&s[copied..i]);
            out.push_str(replacement);
            i += lit.len();
            copied = i;
        } else {
            i += 1;
        }
    }
    match out {
        None => std::borrow::Cow::Borrowed(s),
        Some(mut out) => {
            out.push_str(&s[copied..]);
            std::borrow::Cow::Owned(out)
        }
    }
}

pub(super) fn parse_err(origin: &str, message: impl Into<String>) -> Error {
    Error::ConfigParse {
        path: origin.to_string(),
        message: message.into(),
    }
}

/// Typed access to one JSON object; field paths in errors carry `prefix` (e.g. `ssm_cfg.`).
pub(super) struct Fields<'a> {
    pub(super) obj: &'a Map<String, Value>,
    prefix: &'a str,
    pub(super) origin: &'a str,
}

impl<'a> Fields<'a> {
    pub(super) fn new(obj: &'a Map<String, Value>, prefix: &'a str, origin: &'a str) -> Self {
        Fields {
            obj,
            prefix,
            origin,
        }
    }

    pub(super) fn path(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub(super) fn type_err(&self, key: &str, expected: &str, got: &Value) -> Error {
        let mut shown = got.to_string();
        if shown.len() > 60 {
            // Cut on a character boundary: the value may hold multi-byte characters.
            let cut = (0..=57).rev().find(|&i| shown.is_char_boundary(i));
            shown.truncate(cut.unwrap_or(0));
            shown.push_str("...");
        }
        parse_err(
            self.origin,
            format!(
                "field `{}`: expected {expected}, got {shown}",
                self.path(key)
            ),
        )
    }

    /// The value of `key`, with `null` treated as absent.
    pub(super) fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn required<T>(&self, key: &str, v: Option<T>) -> Result<T> {
        v.ok_or_else(|| {
            Error::field(
                self.path(key),
                format!("missing from {} (required)", self.origin),
            )
        })
    }

    pub(super) fn usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::Number(n) => n.as_u64().or_else(|| {
                // Accept 2.0 for 2: some writers emit integral floats.
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 2f64.powi(53))
                    .map(|f| f as u64)
            }),
            _ => None,
        };
        match n.and_then(|n| usize::try_from(n).ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(self.type_err(key, "a non-negative integer", v)),
        }
    }

    pub(super) fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.type_err(key, "true or false", v)),
        }
    }

    pub(super) fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.type_err(key, "a string", v)),
        }
    }

    pub(super) fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(v) => Err(self.type_err(key, "an object", v)),
        }
    }

    pub(super) fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => float_value(v)
                .map(Some)
                .ok_or_else(|| self.type_err(key, "a number", v)),
        }
    }

    /// A `[min, max]` pair of floats (each may be non-finite).
    pub(super) fn f64_pair(&self, key: &str) -> Result<Option<(f64, f64)>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let pair = match v {
            Value::Array(a) if a.len() == 2 => float_value(&a[0]).zip(float_value(&a[1])),
            _ => None,
        };
        pair.map(Some)
            .ok_or_else(|| self.type_err(key, "a list of two numbers [min, max]", v))
    }

    /// A list of strings (`layer_types`).
    pub(super) fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let list = match v {
            Value::Array(a) => a.iter().map(|x| x.as_str()).collect::<Option<Vec<_>>>(),
            _ => None,
        };
        list.map(Some)
            .ok_or_else(|| self.type_err(key, "a list of strings", v))
    }

    /// A list of non-negative integers (`attn_layer_indices`).
    pub(super) fn usizes(&self, key: &str) -> Result<Option<Vec<usize>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let list = match v {
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect::<Option<Vec<_>>>(),
            _ => None,
        };
        list.map(Some)
            .ok_or_else(|| self.type_err(key, "a list of non-negative integers", v))
    }

    /// A list of numbers (`ssm_multipliers`).
    pub(super) fn f64s(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let list = match v {
            Value::Array(a) => a.iter().map(float_value).collect::<Option<Vec<_>>>(),
            _ => None,
        };
        list.map(Some)
            .ok_or_else(|| self.type_err(key, "a list of numbers", v))
    }

    /// A token id: `Ok(None)` when absent; `Some(None)` when explicitly `null`.
    pub(super) fn token_id(&self, key: &str) -> Result<Option<Option<u32>>> {
        match self.obj.get(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(id) => Ok(Some(Some(id))),
                None => Err(self.type_err(key, "a token id (integer in 0..2^32)", v)),
            },
        }
    }

    /// Token ids written as one integer or a list (`eos_token_id`); `null` gives an empty list.
    pub(super) fn token_ids(&self, key: &str) -> Result<Option<Vec<u32>>> {
        let Some(v) = self.obj.get(key) else {
            return Ok(None);
        };
        let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        let ids = match v {
            Value::Null => Some(Vec::new()),
            Value::Array(a) => a.iter().map(as_id).collect(),
            v => as_id(v).map(|id| vec![id]),
        };
        ids.map(Some)
            .ok_or_else(|| self.type_err(key, "a token id or a list of token ids", v))
    }
}

/// A JSON number, or a `{"__float__": "Infinity" | "-Infinity" | "NaN"}` object.
fn float_value(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Object(o) if o.len() == 1 => match o.get("__float__")?.as_str()? {
            "Infinity" | "inf" => Some(f64::INFINITY),
            "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
            "NaN" | "nan" => Some(f64::NAN),
            _ => None,
        },
        _ => None,
    }
}
