//! Hub options read from the environment (HF_HUB_OFFLINE, HF_HUB_CACHE, HF_HOME, HF_ENDPOINT),
//! and the online path falling back to the cache when the Hub cannot be reached. One test in its
//! own binary, because environment variables are process-wide.

use std::path::Path;

use mamba2::hub::{resolve_model, resolve_tokenizer, HubOptions};
use mamba2::Error;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const CONFIG: &str = r#"{"d_model": 8, "n_layer": 1, "vocab_size": 6,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 4, "headdim": 4}}"#;

/// One cached commit of `repo_id` with a config and a (tiny, valid) model.safetensors.
fn cache_repo(cache: &Path, repo_id: &str) -> std::path::PathBuf {
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), COMMIT).unwrap();
    std::fs::write(snapshot.join("config.json"), CONFIG).unwrap();
    let data = [0u8; 4];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap();
    std::fs::write(
        snapshot.join("model.safetensors"),
        safetensors::serialize([("x", view)], None).unwrap(),
    )
    .unwrap();
    snapshot
}

fn set(key: &str, value: Option<&str>) {
    // Single-threaded: this binary has one test.
    match value {
        Some(v) => std::env::set_var(key, v),
        None => std::env::remove_var(key),
    }
}

#[test]
fn environment_and_unreachable_hub() {
    for key in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        set(key, None);
    }
    for key in [
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "HF_ENDPOINT",
        "HF_TOKEN",
    ] {
        set(key, None);
    }
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    let snapshot = cache_repo(&cache, "org/model");

    // Cache folder: HF_HOME/hub, overridden by HF_HUB_CACHE, overridden by the option.
    set("HF_HOME", Some(home.path().to_str().unwrap()));
    assert_eq!(HubOptions::default().cache_dir(), cache);
    set("HF_HUB_CACHE", Some("/elsewhere"));
    assert_eq!(HubOptions::default().cache_dir(), Path::new("/elsewhere"));
    let explicit = HubOptions {
        cache_dir: Some("/mine".into()),
        ..Default::default()
    };
    assert_eq!(explicit.cache_dir(), Path::new("/mine"));
    set("HF_HUB_CACHE", Some(cache.to_str().unwrap()));

    // HF_HUB_OFFLINE spellings; the option wins over the variable.
    for (value, offline) in [
        ("1", true),
        ("TRUE", true),
        ("yes", true),
        ("on", true),
        ("0", false),
        ("false", false),
        ("", false),
    ] {
        set("HF_HUB_OFFLINE", Some(value));
        assert_eq!(
            HubOptions::default().is_offline(),
            offline,
            "HF_HUB_OFFLINE={value:?}"
        );
    }
    set("HF_HUB_OFFLINE", Some("1"));
    assert!(!HubOptions {
        offline: Some(false),
        ..Default::default()
    }
    .is_offline());

    // Offline through the environment alone.
    let opts = HubOptions {
        progress: false,
        ..Default::default()
    };
    assert_eq!(resolve_model("org/model", &opts).unwrap().dir, snapshot);
    match resolve_model("org/absent", &opts) {
        Err(Error::ModelNotFound { model, message }) => {
            assert_eq!(model, "org/absent");
            assert!(
                message.contains("HF_HUB_OFFLINE") && message.contains(cache.to_str().unwrap()),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }

    // Online, but the Hub is unreachable (connection refused): the cached copy is used.
    set("HF_HUB_OFFLINE", None);
    set("HF_ENDPOINT", Some("http://127.0.0.1:1"));
    assert!(!opts.is_offline());
    let files = resolve_model("org/model", &opts).unwrap();
    assert_eq!(files.dir, snapshot);
    match resolve_model("org/absent", &opts) {
        Err(Error::ModelNotFound { message, .. }) => {
            assert!(message.contains("unreachable"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // The tokenizer fallback repo is not cached and cannot be downloaded.
    match resolve_tokenizer(&files, None, &opts) {
        Err(Error::ModelNotFound { model, message }) => {
            assert_eq!(model, "EleutherAI/gpt-neox-20b");
            assert!(message.contains("unreachable"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}
