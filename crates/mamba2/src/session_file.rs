//! Saving a [`Session`] to a file and restoring it: a safetensors file holding the f32 states,
//! the KV caches of attention blocks, the tokens and the last logits, with metadata that ties it
//! to the model it came from.
//!
//! Format `mamba2-rs-session-v3` (the only one read and written): tensors `conv_state.{i}` /
//! `ssm_state.{i}` per Mamba block, `key.{j}` / `value.{j}` per attention block, `tokens`,
//! `last_logits`; metadata `format`, `model` (family, layer pattern and every dimension that
//! shapes the state), `weights` ([`Mamba2Model::weights_fingerprint`], a hash of every weight
//! byte), `seqlen_offset` and the sampler's `rng`. Files of v1 and v2 carry no weights
//! fingerprint, so nothing could stop a same-shape fine-tune from continuing their state; they
//! are refused with [`Error::SessionVersion`] rather than read unchecked.
//!
//! Writes are atomic: the file is written and synced under a temporary name in the target's
//! folder, then renamed over the target, so a crash or a full disk leaves the previous file
//! whole.

use crate::cache::{KvCache, Mamba2Cache};
use crate::model::Mamba2Model;
use crate::session::Session;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// The session file format this version writes and reads.
pub const SESSION_FORMAT: &str = "mamba2-rs-session-v3";

/// Everything that decides the shape and meaning of the state.
fn model_fingerprint(model: &Mamba2Model) -> String {
    let c = model.config();
    let attn = c
        .attention
        .map(|a| format!(" attn={}x{}/{}", a.num_heads, a.head_dim, a.num_kv_heads))
        .unwrap_or_default();
    format!(
        "family={} pattern={}{attn} d_model={} n_layer={} d_state={} d_conv={} headdim={} nheads={} ngroups={} vocab_rows={} params={}",
        c.family.model_type(),
        c.pattern_string(),
        c.d_model, c.n_layer, c.d_state, c.d_conv, c.headdim, c.nheads, c.ngroups, model.vocab_rows(), model.num_parameters()
    )
}

/// Writes `data` to `path` through a synced temporary file in the same folder and a rename.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".mamba2-session-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(data).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

impl Session {
    /// Writes the session (state, tokens, last logits) to `path`, atomically (a temporary file
    /// in the same folder renamed over it). Pending, not yet processed tokens are processed
    /// first. The first save of a model computes its weights fingerprint (one read of the
    /// weights).
    pub fn save(&mut self, path: &Path) -> Result<()> {
        self.flush()?;
        let cpu = Device::Cpu;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for j in 0..self.cache().n_kv() {
            let kv = self.cache().kv(j);
            if let (Some(k), Some(v)) = (kv.keys()?, kv.values()?) {
                tensors.insert(format!("key.{j}"), k.to_device(&cpu)?);
                tensors.insert(format!("value.{j}"), v.to_device(&cpu)?);
            }
        }
        for i in 0..self.cache().n_layer() {
            tensors.insert(
                format!("conv_state.{i}"),
                self.cache().conv_state(i).to_device(&cpu)?,
            );
            tensors.insert(
                format!("ssm_state.{i}"),
                self.cache().ssm_state(i).to_device(&cpu)?,
            );
        }
        let toks: Vec<i64> = self.tokens().iter().map(|&t| t as i64).collect();
        tensors.insert("tokens".into(), Tensor::new(toks.as_slice(), &cpu)?);
        if let Some(l) = self.last_logits() {
            tensors.insert("last_logits".into(), Tensor::new(l, &cpu)?);
        }
        let meta: HashMap<String, String> = [
            ("format".to_string(), SESSION_FORMAT.to_string()),
            ("model".to_string(), model_fingerprint(self.model())),
            ("weights".to_string(), self.model().weights_fingerprint()?),
            (
                "seqlen_offset".to_string(),
                self.cache().seqlen_offset().to_string(),
            ),
        ]
        .into();
        let mut meta = meta;
        if let Some((seed, st)) = self.rng() {
            meta.insert(
                "rng".into(),
                format!("{seed} {} {} {} {}", st[0], st[1], st[2], st[3]),
            );
        }
        let data = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
            .map_err(|e| Error::SessionFile {
                path: path.into(),
                message: e.to_string(),
            })?;
        write_atomic(path, &data)
    }

    /// Restores a session saved by [`Session::save`] onto `model`. A file from another model
    /// (other shapes, or the same shapes with other weights) is [`Error::SessionModelMismatch`],
    /// one of another format version [`Error::SessionVersion`], a truncated or corrupt one
    /// [`Error::SessionFile`].
    pub fn load(model: Arc<Mamba2Model>, path: &Path) -> Result<Self> {
        let bad = |m: String| Error::SessionFile {
            path: path.into(),
            message: m,
        };
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&data)
            .map_err(|e| bad(format!("not a session file: {e}")))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        match meta.get("format").map(String::as_str) {
            Some(SESSION_FORMAT) => {}
            Some(other) => {
                return Err(Error::SessionVersion {
                    path: path.into(),
                    found: other.to_string(),
                    supported: SESSION_FORMAT.to_string(),
                })
            }
            None => return Err(bad(format!("not a {SESSION_FORMAT} file (no `format`)"))),
        }
        let mismatch = |what: &'static str, saved: Option<&String>, current: String| {
            Error::SessionModelMismatch {
                path: path.into(),
                what,
                saved: saved.map_or("(missing)".to_string(), String::clone),
                current,
            }
        };
        let want = model_fingerprint(&model);
        if meta.get("model") != Some(&want) {
            return Err(mismatch("model", meta.get("model"), want));
        }
        let weights = model.weights_fingerprint()?;
        if meta.get("weights") != Some(&weights) {
            return Err(mismatch("weights", meta.get("weights"), weights));
        }
        let st = safetensors::SafeTensors::deserialize(&data)
            .map_err(|e| bad(format!("corrupt: {e}")))?;
        let get = |name: &str, shape: &[usize], dtype: DType| -> Result<Tensor> {
            let view = st
                .tensor(name)
                .map_err(|_| bad(format!("missing tensor `{name}`")))?;
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            if t.dims() != shape || t.dtype() != dtype {
                return Err(bad(format!(
                    "tensor `{name}` is {:?} {:?}, expected {shape:?} {dtype:?}",
                    t.dtype(),
                    t.dims()
                )));
            }
            Ok(t.to_device(model.device())?)
        };
        let c = model.config();
        let (n_ssm, n_kv) = (c.n_ssm_blocks(), c.n_kv_blocks());
        let (mut conv, mut ssm) = (Vec::new(), Vec::new());
        for i in 0..n_ssm {
            conv.push(get(
                &format!("conv_state.{i}"),
                &[1, c.conv_dim(), c.d_conv],
                DType::F32,
            )?);
            ssm.push(get(
                &format!("ssm_state.{i}"),
                &[1, c.nheads, c.headdim, c.d_state],
                DType::F32,
            )?);
        }
        let n_tok = st
            .tensor("tokens")
            .map_err(|_| bad("missing tensor `tokens`".into()))?
            .shape()
            .first()
            .copied()
            .unwrap_or(0);
        let tokens: Vec<u32> = get("tokens", &[n_tok], DType::I64)?
            .to_device(&Device::Cpu)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|t| {
                u32::try_from(t)
                    .ok()
                    .filter(|&t| (t as usize) < model.vocab_rows())
                    .ok_or_else(|| bad(format!("token {t} out of range")))
            })
            .collect::<Result<_>>()?;
        let offset: usize = meta
            .get("seqlen_offset")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad seqlen_offset".into()))?;
        if offset != tokens.len() {
            return Err(bad(format!(
                "state covers {offset} tokens but {} tokens are listed",
                tokens.len()
            )));
        }
        let last_logits = if tokens.is_empty() {
            None
        } else {
            Some(
                get("last_logits", &[model.vocab_rows()], DType::F32)?
                    .to_device(&Device::Cpu)?
                    .to_vec1::<f32>()?,
            )
        };
        let rng = match meta.get("rng") {
            None => None,
            Some(s) => {
                let v: Vec<u64> = s
                    .split(' ')
                    .map(|x| x.parse::<u64>())
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| bad("bad rng state".into()))?;
                match v[..] {
                    [seed, a, b, c, d] => Some((seed, [a, b, c, d])),
                    _ => return Err(bad("bad rng state".into())),
                }
            }
        };
        let mut kv = Vec::new();
        for j in 0..n_kv {
            let Some(a) = c.attention else { break };
            let shape = [1, offset, a.num_kv_heads, a.head_dim];
            if offset == 0 {
                kv.push(KvCache::default());
                continue;
            }
            let k = get(&format!("key.{j}"), &shape, model.dtype())?;
            let v = get(&format!("value.{j}"), &shape, model.dtype())?;
            kv.push(KvCache::from_tensors(k, v)?);
        }
        let cache = Mamba2Cache::from_states(conv, ssm, kv, offset)?;
        Ok(Session::from_parts(model, cache, tokens, last_logits, rng))
    }
}
