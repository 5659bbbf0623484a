//! Finding a model's files: a local folder, or a Hugging Face Hub repo downloaded through
//! `hf-hub` into the standard Hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), or read from that cache alone when offline (`HF_HUB_OFFLINE=1`).
//!
//! Cache layout (shared with Python's `huggingface_hub`):
//! `models--{org}--{name}/refs/{revision}` holds a commit hash, `snapshots/{hash}/{file}` links
//! into `blobs/`. A revision that is itself a commit hash is looked up in `snapshots/` directly.
//!
//! state-spaces repos ship no tokenizer; [`resolve_tokenizer`] then falls back to
//! [`DEFAULT_TOKENIZER_REPO`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};

use crate::error::{Error, Result};
use crate::progress::{LoadMonitor, Progress};
use crate::weights::{ShardIndex, WEIGHT_FILE_CANDIDATES};

/// Tokenizer repo used when neither the model nor the caller provides a tokenizer
/// (the Mamba / Mamba-2 checkpoints were trained with the GPT-NeoX-20B tokenizer).
pub const DEFAULT_TOKENIZER_REPO: &str = "EleutherAI/gpt-neox-20b";

const CONFIG_FILE: &str = "config.json";
const TOKENIZER_FILE: &str = "tokenizer.json";
const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// Where a repo keeps its chat template (and the special tokens it prints).
const CHAT_TEMPLATE_FILES: [&str; 2] = ["tokenizer_config.json", "chat_template.jinja"];

/// The local paths of one model's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The folder holding the files (a Hub cache snapshot folder for Hub models).
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// Weight files: one `model.safetensors` / `pytorch_model.bin`, or the shards of an index.
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`, if the model has one.
    pub tokenizer: Option<PathBuf>,
    /// `generation_config.json`, if the model has one.
    pub generation_config: Option<PathBuf>,
}

/// How to reach the Hub. `Default` is: revision `main`, the standard cache, offline from
/// `HF_HUB_OFFLINE`, a progress bar, the token from `HF_TOKEN` or the token file.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Branch, tag or commit hash (`None`: `main`).
    pub revision: Option<String>,
    /// Hub cache folder (`None`: `HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Use only the cache (`None`: read `HF_HUB_OFFLINE`).
    pub offline: Option<bool>,
    /// Show a download progress bar.
    pub progress: bool,
    /// Access token (`None`: `HF_TOKEN`, then the token file under `HF_HOME`).
    pub token: Option<String>,
    /// Progress reports for each file and cancellation between files (see
    /// [`crate::progress`]).
    pub monitor: LoadMonitor,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            revision: None,
            cache_dir: None,
            offline: None,
            progress: true,
            token: None,
            monitor: LoadMonitor::default(),
        }
    }
}

impl HubOptions {
    /// Whether only the cache may be used: `offline`, else `HF_HUB_OFFLINE` is `1`/`true`/`yes`/`on`.
    pub fn is_offline(&self) -> bool {
        self.offline.unwrap_or_else(|| env_flag("HF_HUB_OFFLINE"))
    }

    /// The Hub cache folder these options use.
    pub fn cache_dir(&self) -> PathBuf {
        if let Some(dir) = &self.cache_dir {
            return dir.clone();
        }
        if let Some(dir) = env_path("HF_HUB_CACHE").or_else(|| env_path("HUGGINGFACE_HUB_CACHE")) {
            return dir;
        }
        hf_home().join("hub")
    }

    /// The revision (`main` by default).
    pub fn revision(&self) -> &str {
        self.revision
            .as_deref()
            .filter(|r| !r.is_empty())
            .unwrap_or("main")
    }

    fn token(&self) -> Option<String> {
        if let Some(t) = &self.token {
            return Some(t.clone());
        }
        let from_env = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
            .iter()
            .find_map(|k| env_nonempty(k));
        from_env.or_else(|| {
            let path = env_path("HF_TOKEN_PATH").unwrap_or_else(|| hf_home().join("token"));
            let t = std::fs::read_to_string(path).ok()?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        })
    }
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

fn env_path(key: &str) -> Option<PathBuf> {
    env_nonempty(key).map(PathBuf::from)
}

fn env_flag(key: &str) -> bool {
    env_nonempty(key).is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> PathBuf {
    if let Some(home) = env_path("HF_HOME") {
        return home;
    }
    let cache = env_path("XDG_CACHE_HOME").unwrap_or_else(|| {
        let home = env_path("HOME")
            .or_else(|| env_path("USERPROFILE"))
            .unwrap_or_else(|| PathBuf::from("."));
        home.join(".cache")
    });
    cache.join("huggingface")
}

/// Resolves a model given as a local folder or a Hub repo id (`state-spaces/mamba2-130m`).
///
/// Online, the repo's file list is fetched and missing files are downloaded into the cache; if
/// the Hub cannot be reached, the cache is used (with a warning). Offline, only the cache is used
/// and a model that is not there is [`Error::ModelNotFound`] naming the repo and the cache folder.
///
/// ```no_run
/// use mamba2::hub::{resolve_model, resolve_tokenizer, HubOptions};
/// let opts = HubOptions::default();
/// let files = resolve_model("state-spaces/mamba2-130m", &opts)?;
/// let tokenizer = resolve_tokenizer(&files, None, &opts)?; // falls back to GPT-NeoX-20B
/// # Ok::<(), mamba2::Error>(())
/// ```
pub fn resolve_model(spec: &str, opts: &HubOptions) -> Result<ModelFiles> {
    match classify(spec) {
        Spec::Local(dir) => local_model(spec, &dir),
        Spec::Repo(repo) => hub_model(&repo, opts).map_err(|e| match e {
            // `org/name` may also have been meant as a relative folder.
            Error::ModelNotFound { model, message } => Error::ModelNotFound {
                model,
                message: format!("{message} (there is no local folder `{spec}` either)"),
            },
            e => e,
        }),
        Spec::Invalid(message) => Err(Error::ModelNotFound {
            model: spec.to_string(),
            message,
        }),
    }
}

/// The tokenizer file to use: the `override_spec` (a `tokenizer.json` file, a folder holding
/// one, or a Hub repo id), else the model's own `tokenizer.json`, else the one of
/// [`DEFAULT_TOKENIZER_REPO`]. Repos are resolved at their `main` revision with `opts`' cache,
/// offline mode and token.
pub fn resolve_tokenizer(
    files: &ModelFiles,
    override_spec: Option<&str>,
    opts: &HubOptions,
) -> Result<PathBuf> {
    let opts = HubOptions {
        revision: None,
        ..opts.clone()
    };
    let spec = match (override_spec, &files.tokenizer) {
        (Some(spec), _) => spec,
        (None, Some(own)) => return Ok(own.clone()),
        (None, None) => DEFAULT_TOKENIZER_REPO,
    };
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if spec.ends_with(".json") {
        return Err(Error::ModelNotFound {
            model: spec.to_string(),
            message: "no such tokenizer file".into(),
        });
    }
    match classify(spec) {
        Spec::Local(dir) => {
            let file = dir.join(TOKENIZER_FILE);
            if file.is_file() {
                Ok(file)
            } else {
                Err(Error::ModelNotFound {
                    model: spec.to_string(),
                    message: format!("no {TOKENIZER_FILE} in folder {}", dir.display()),
                })
            }
        }
        Spec::Repo(repo) => repo_file(&repo, TOKENIZER_FILE, &opts),
        Spec::Invalid(message) => Err(Error::ModelNotFound {
            model: spec.to_string(),
            message,
        }),
    }
}

/// Loads a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

enum Spec {
    Local(PathBuf),
    Repo(String),
    Invalid(String),
}

/// An existing path is local; `org/name` or `name` made of `[A-Za-z0-9._-]` is a repo id;
/// anything else that looks like a path is a missing folder.
fn classify(spec: &str) -> Spec {
    let expanded = match spec.strip_prefix("~/") {
        Some(rest) => env_path("HOME")
            .map(|h| h.join(rest))
            .unwrap_or_else(|| PathBuf::from(spec)),
        None => PathBuf::from(spec),
    };
    if expanded.exists() {
        return Spec::Local(expanded);
    }
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && !s.starts_with(['.', '-'])
            && !s.ends_with('.')
            && !s.contains("..")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    };
    let parts: Vec<&str> = spec.split('/').collect();
    if !spec.starts_with("~") && parts.len() <= 2 && parts.iter().all(|p| segment_ok(p)) {
        Spec::Repo(spec.to_string())
    } else {
        Spec::Invalid(format!(
            "no such folder {}, and not a Hub repo id (`org/name`)",
            expanded.display()
        ))
    }
}

fn local_model(spec: &str, path: &Path) -> Result<ModelFiles> {
    // A path to the config file itself means its folder.
    let dir = if path.is_file() && path.file_name().is_some_and(|n| n == CONFIG_FILE) {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        path.to_path_buf()
    };
    let not_found = |message: String| Error::ModelNotFound {
        model: spec.to_string(),
        message,
    };
    if !dir.is_dir() {
        return Err(not_found(format!("{} is not a folder", dir.display())));
    }
    let config = dir.join(CONFIG_FILE);
    if !config.is_file() {
        return Err(not_found(format!("no {CONFIG_FILE} in {}", dir.display())));
    }
    let weights = local_weights(&dir)?.ok_or_else(|| {
        not_found(format!(
            "no weights in {} (looked for {})",
            dir.display(),
            WEIGHT_FILE_CANDIDATES.join(", ")
        ))
    })?;
    Ok(ModelFiles {
        tokenizer: Some(dir.join(TOKENIZER_FILE)).filter(|p| p.is_file()),
        generation_config: Some(dir.join(GENERATION_CONFIG_FILE)).filter(|p| p.is_file()),
        dir,
        config,
        weights,
    })
}

/// The weight files of a complete folder: `Ok(None)` when it has none of the candidates; an
/// index whose shards are missing is an error naming the shard.
fn local_weights(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    let Some(name) = WEIGHT_FILE_CANDIDATES
        .into_iter()
        .find(|n| dir.join(n).is_file())
    else {
        return Ok(None);
    };
    let path = dir.join(name);
    if name.ends_with(".json") {
        Ok(Some(ShardIndex::read(&path)?.shard_paths()?))
    } else {
        Ok(Some(vec![path]))
    }
}

/// The cache folder of one repo at one revision.
struct CachedRepo {
    repo_dir: PathBuf,
    revision: String,
}

impl CachedRepo {
    fn new(cache_dir: &Path, repo_id: &str, revision: &str) -> Self {
        let folder =
            Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string())
                .folder_name();
        CachedRepo {
            repo_dir: cache_dir.join(folder),
            revision: revision.to_string(),
        }
    }

    /// `snapshots/<hash>` for the revision: through `refs/<revision>`, or the revision itself
    /// when it is a commit hash.
    fn snapshot(&self) -> Option<PathBuf> {
        let commit = std::fs::read_to_string(self.repo_dir.join("refs").join(&self.revision))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| self.revision.clone());
        if commit.contains(['/', '\\']) || commit.starts_with('.') {
            return None;
        }
        Some(self.repo_dir.join("snapshots").join(commit)).filter(|p| p.is_dir())
    }
}

fn offline_message(opts: &HubOptions, what: &str) -> String {
    let mode = if opts.is_offline() {
        "offline mode is on (HF_HUB_OFFLINE)"
    } else {
        "the Hub is unreachable"
    };
    format!(
        "{what} not in the Hub cache {} at revision `{}`, and {mode}; download it first \
         (e.g. `huggingface-cli download <repo>`) or pass a local folder",
        opts.cache_dir().display(),
        opts.revision()
    )
}

/// A model from the cache only.
fn cached_model(repo_id: &str, opts: &HubOptions) -> Result<ModelFiles> {
    let not_found = |what: &str| Error::ModelNotFound {
        model: repo_id.to_string(),
        message: offline_message(opts, what),
    };
    let cached = CachedRepo::new(&opts.cache_dir(), repo_id, opts.revision());
    let snapshot = cached.snapshot().ok_or_else(|| not_found("the repo is"))?;
    let config = snapshot.join(CONFIG_FILE);
    if !config.is_file() {
        return Err(not_found(CONFIG_FILE));
    }
    report_cached(opts, repo_id, &config)?;
    let weights = match local_weights(&snapshot) {
        Ok(Some(w)) => w,
        Ok(None) => return Err(not_found("no weight file is")),
        Err(Error::WeightFile { path, .. }) => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(not_found(&format!("weight shard `{name}` is")));
        }
        Err(e) => return Err(e),
    };
    for w in &weights {
        report_cached(opts, repo_id, w)?;
    }
    Ok(ModelFiles {
        tokenizer: Some(snapshot.join(TOKENIZER_FILE)).filter(|p| p.is_file()),
        generation_config: Some(snapshot.join(GENERATION_CONFIG_FILE)).filter(|p| p.is_file()),
        dir: snapshot,
        config,
        weights,
    })
}

/// Checks the monitor's token, then reports a file found in the cache.
fn report_cached(opts: &HubOptions, repo_id: &str, path: &Path) -> Result<()> {
    opts.monitor.check()?;
    if opts.monitor.has_progress() {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        opts.monitor.report(Progress::Download {
            repo: repo_id.to_string(),
            file: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            done: size,
            total: size,
            cached: true,
        });
    }
    Ok(())
}

/// Downloads one file; the token is checked before and after, and the monitor gets one report
/// when the file is in the cache (hf-hub's blocking client reports chunks only to its own bar).
fn download(
    repo: &ApiRepo,
    repo_id: &str,
    file: &str,
    opts: &HubOptions,
) -> Result<std::result::Result<PathBuf, ApiError>> {
    opts.monitor.check()?;
    let got = repo.download(file);
    opts.monitor.check()?;
    if let Ok(path) = &got {
        if opts.monitor.has_progress() {
            let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            opts.monitor.report(Progress::Download {
                repo: repo_id.to_string(),
                file: file.to_string(),
                done: size,
                total: size,
                cached: false,
            });
        }
    }
    Ok(got)
}

/// One file of a repo: from the cache, or downloaded when online.
fn repo_file(repo_id: &str, file: &str, opts: &HubOptions) -> Result<PathBuf> {
    let cached = CachedRepo::new(&opts.cache_dir(), repo_id, opts.revision())
        .snapshot()
        .map(|s| s.join(file))
        .filter(|p| p.is_file());
    if let Some(path) = cached {
        report_cached(opts, repo_id, &path)?;
        return Ok(path);
    }
    let not_cached = || Error::ModelNotFound {
        model: repo_id.to_string(),
        message: offline_message(opts, &format!("`{file}` is")),
    };
    if opts.is_offline() {
        return Err(not_cached());
    }
    let repo = api_repo(repo_id, opts)?;
    download(&repo, repo_id, file, opts)?.map_err(|e| match classify_api_error(&e) {
        ApiFailure::Unreachable => not_cached(),
        _ => hub_error(repo_id, file, e),
    })
}

enum ApiFailure {
    NotFound,
    Unauthorized,
    Unreachable,
    Other,
}

fn classify_api_error(e: &ApiError) -> ApiFailure {
    match e {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::Status(404, _) => ApiFailure::NotFound,
            ureq::Error::Status(401 | 403, _) => ApiFailure::Unauthorized,
            ureq::Error::Status(..) => ApiFailure::Other,
            ureq::Error::Transport(_) => ApiFailure::Unreachable,
        },
        _ => ApiFailure::Other,
    }
}

fn hub_error(repo_id: &str, what: &str, e: ApiError) -> Error {
    match classify_api_error(&e) {
        ApiFailure::NotFound => Error::ModelNotFound {
            model: repo_id.to_string(),
            message: format!("`{what}` not found on the Hub ({e}); check the repo id and revision"),
        },
        ApiFailure::Unauthorized => Error::ModelNotFound {
            model: repo_id.to_string(),
            message: format!("access denied ({e}); for a gated or private repo set HF_TOKEN"),
        },
        _ => Error::Hub(format!("{repo_id}: {what}: {e}")),
    }
}

fn api_repo(repo_id: &str, opts: &HubOptions) -> Result<ApiRepo> {
    let mut builder = ApiBuilder::new()
        .with_cache_dir(opts.cache_dir())
        .with_progress(opts.progress)
        .with_token(opts.token());
    if let Some(endpoint) = env_nonempty("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    let api = builder
        .build()
        .map_err(|e| Error::Hub(format!("cannot set up the Hub client: {e}")))?;
    Ok(api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        opts.revision().to_string(),
    )))
}

fn hub_model(repo_id: &str, opts: &HubOptions) -> Result<ModelFiles> {
    opts.monitor.check()?;
    if opts.is_offline() {
        return cached_model(repo_id, opts);
    }
    let repo = api_repo(repo_id, opts)?;
    let info = match repo.info() {
        Ok(info) => info,
        Err(e) => {
            if let ApiFailure::Unreachable = classify_api_error(&e) {
                // Like huggingface_hub: without a connection, fall back to what is cached.
                return cached_model(repo_id, opts).inspect(|_| {
                    tracing::warn!("cannot reach the Hub ({e}); using the cached copy of {repo_id}")
                });
            }
            return Err(hub_error(repo_id, "repo info", e));
        }
    };
    let listed: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let not_found = |message: String| Error::ModelNotFound {
        model: repo_id.to_string(),
        message,
    };
    if !listed.contains(CONFIG_FILE) {
        return Err(not_found(format!("the repo has no {CONFIG_FILE}")));
    }
    let weight_file = WEIGHT_FILE_CANDIDATES
        .into_iter()
        .find(|n| listed.contains(n))
        .ok_or_else(|| {
            not_found(format!(
                "the repo has none of {}",
                WEIGHT_FILE_CANDIDATES.join(", ")
            ))
        })?;
    // Files of the listed commit: reuse the cached snapshot of that commit, download the rest.
    let snapshot = CachedRepo::new(&opts.cache_dir(), repo_id, &info.sha).snapshot();
    let fetch = |file: &str| -> Result<PathBuf> {
        if let Some(p) = snapshot
            .as_ref()
            .map(|s| s.join(file))
            .filter(|p| p.is_file())
        {
            report_cached(opts, repo_id, &p)?;
            return Ok(p);
        }
        download(&repo, repo_id, file, opts)?.map_err(|e| hub_error(repo_id, file, e))
    };
    let config = fetch(CONFIG_FILE)?;
    let weights = if weight_file.ends_with(".json") {
        let index = ShardIndex::read(&fetch(weight_file)?)?;
        index
            .shard_names()
            .iter()
            .map(|s| fetch(s))
            .collect::<Result<Vec<_>>>()?
    } else {
        vec![fetch(weight_file)?]
    };
    let optional = |file: &str| listed.contains(file).then(|| fetch(file)).transpose();
    let tokenizer = optional(TOKENIZER_FILE)?;
    let generation_config = optional(GENERATION_CONFIG_FILE)?;
    // Read from the snapshot folder by `ChatTemplate::from_model_dir`.
    for file in CHAT_TEMPLATE_FILES {
        optional(file)?;
    }
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(ModelFiles {
        dir,
        config,
        weights,
        tokenizer,
        generation_config,
    })
}
