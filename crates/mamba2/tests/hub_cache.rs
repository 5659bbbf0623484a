//! Model resolution from local folders and from a Hub cache laid out exactly as `hf-hub` and
//! Python's `huggingface_hub` write it (`models--org--name/{refs,snapshots,blobs}`), offline.
//! Every test passes `offline` and `cache_dir` explicitly; environment variables are tested in
//! `hub_env.rs`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use mamba2::config::Mamba2Config;
use mamba2::hub::{
    load_tokenizer, resolve_model, resolve_tokenizer, HubOptions, ModelFiles,
    DEFAULT_TOKENIZER_REPO,
};
use mamba2::weights::Weights;
use mamba2::Error;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

const CONFIG: &str = r#"{"d_model": 8, "n_layer": 1, "vocab_size": 6, "pad_vocab_size_multiple": 8,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 4, "headdim": 4}, "tie_embeddings": true}"#;

/// A minimal word-level tokenizer.json.
const TOKENIZER: &str = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
  "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2}, "unk_token": "[UNK]"}}"#;

fn safetensors_bytes(tensors: &[(&str, Vec<usize>)]) -> Vec<u8> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, shape)| {
            (0..shape.iter().product::<usize>())
                .flat_map(|i| (i as f32).to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .map(|((n, shape), d)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn model_safetensors() -> Vec<u8> {
    safetensors_bytes(&[
        ("backbone.embedding.weight", vec![8, 8]),
        ("backbone.norm_f.weight", vec![8]),
    ])
}

/// Writes `files` into the cache as one commit of `repo_id`, pointed to by `refs/{ref_name}`
/// (no ref when `None`): blobs under content-derived names, snapshot entries as relative symlinks.
fn cache_repo(
    cache: &Path,
    repo_id: &str,
    ref_name: Option<&str>,
    commit: &str,
    files: &[(&str, Vec<u8>)],
) -> PathBuf {
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for (name, content) in files {
        let blob = format!("{:016x}{:08x}", fxhash(content), content.len());
        std::fs::write(repo_dir.join("blobs").join(&blob), content).unwrap();
        let link = snapshot.join(name);
        #[cfg(unix)]
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), &link).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(repo_dir.join("blobs").join(&blob), &link).unwrap();
    }
    if let Some(r) = ref_name {
        let ref_path = repo_dir.join("refs").join(r);
        std::fs::create_dir_all(ref_path.parent().unwrap()).unwrap();
        std::fs::write(ref_path, commit).unwrap();
    }
    snapshot
}

fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

fn offline(cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.to_path_buf()),
        offline: Some(true),
        progress: false,
        ..Default::default()
    }
}

fn not_found(r: Result<impl std::fmt::Debug, Error>) -> (String, String) {
    match r {
        Err(Error::ModelNotFound { model, message }) => (model, message),
        other => panic!("expected ModelNotFound, got {other:?}"),
    }
}

#[test]
fn single_file_model_from_cache_with_tokenizer_fallback() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = cache_repo(
        cache.path(),
        "state-spaces/mamba2-tiny",
        Some("main"),
        COMMIT,
        &[
            ("config.json", CONFIG.into()),
            ("model.safetensors", model_safetensors()),
        ],
    );
    cache_repo(
        cache.path(),
        DEFAULT_TOKENIZER_REPO,
        Some("main"),
        COMMIT,
        &[("tokenizer.json", TOKENIZER.into())],
    );
    let opts = offline(cache.path());
    let files = resolve_model("state-spaces/mamba2-tiny", &opts).unwrap();
    assert_eq!(
        files,
        ModelFiles {
            dir: snapshot.clone(),
            config: snapshot.join("config.json"),
            weights: vec![snapshot.join("model.safetensors")],
            tokenizer: None,
            generation_config: None,
        }
    );
    // The files are usable through the symlinks.
    let cfg = Mamba2Config::from_file(&files.config).unwrap();
    let w = Weights::from_files(&files.weights, &Device::Cpu).unwrap();
    let rows = w.shape("backbone.embeddings.weight").unwrap()[0];
    assert_eq!(rows, cfg.padded_vocab_size());
    assert!(w
        .tensor(
            "backbone.embeddings.weight",
            &[rows, cfg.d_model],
            DType::F32
        )
        .is_ok());
    assert!(!w.contains("lm_head.weight"));
    // No tokenizer in the model repo: GPT-NeoX-20B's, from the cache.
    let tok_path = resolve_tokenizer(&files, None, &opts).unwrap();
    assert!(
        tok_path.starts_with(cache.path().join("models--EleutherAI--gpt-neox-20b")),
        "{tok_path:?}"
    );
    let tok = load_tokenizer(&tok_path).unwrap();
    assert_eq!(tok.encode("hello world", false).unwrap().get_ids(), [0, 1]);
}

#[test]
fn sharded_model_from_cache() {
    let cache = tempfile::tempdir().unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": {
        "backbone.embeddings.weight": "model-00001-of-00002.safetensors",
        "backbone.norm_f.weight": "model-00002-of-00002.safetensors"}});
    let shard1 = safetensors_bytes(&[("backbone.embeddings.weight", vec![8, 8])]);
    let shard2 = safetensors_bytes(&[("backbone.norm_f.weight", vec![8])]);
    let files = [
        ("config.json", CONFIG.as_bytes().to_vec()),
        (
            "model.safetensors.index.json",
            index.to_string().into_bytes(),
        ),
        ("model-00001-of-00002.safetensors", shard1),
        ("model-00002-of-00002.safetensors", shard2),
        ("tokenizer.json", TOKENIZER.as_bytes().to_vec()),
        (
            "generation_config.json",
            br#"{"eos_token_id": [0, 1]}"#.to_vec(),
        ),
    ];
    let snapshot = cache_repo(cache.path(), "org/sharded", Some("main"), COMMIT, &files);
    let opts = offline(cache.path());
    let model = resolve_model("org/sharded", &opts).unwrap();
    assert_eq!(
        model.weights,
        [
            snapshot.join("model-00001-of-00002.safetensors"),
            snapshot.join("model-00002-of-00002.safetensors")
        ]
    );
    assert_eq!(model.tokenizer, Some(snapshot.join("tokenizer.json")));
    assert_eq!(
        model.generation_config,
        Some(snapshot.join("generation_config.json"))
    );
    assert_eq!(
        mamba2::config::read_generation_eos(model.generation_config.as_ref().unwrap()).unwrap(),
        [0, 1]
    );
    let w = Weights::from_files(&model.weights, &Device::Cpu).unwrap();
    assert_eq!(
        w.names(),
        ["backbone.embeddings.weight", "backbone.norm_f.weight"]
    );
    // The whole snapshot folder works too, with the index cross-check.
    assert_eq!(
        Weights::from_dir(&model.dir, &Device::Cpu)
            .unwrap()
            .names()
            .len(),
        2
    );
    // The model's own tokenizer wins over the fallback (which is not even cached here).
    assert_eq!(
        resolve_tokenizer(&model, None, &opts).unwrap(),
        snapshot.join("tokenizer.json")
    );

    // A shard missing from the cache: not found, naming the shard.
    std::fs::remove_file(snapshot.join("model-00002-of-00002.safetensors")).unwrap();
    let (model_name, message) = not_found(resolve_model("org/sharded", &opts));
    assert_eq!(model_name, "org/sharded");
    assert!(
        message.contains("model-00002-of-00002.safetensors"),
        "{message}"
    );
}

#[test]
fn pytorch_model_bin_fallback() {
    let cache = tempfile::tempdir().unwrap();
    let bin = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny_ssm.bin"))
        .unwrap();
    let snapshot = cache_repo(
        cache.path(),
        "org/pth",
        Some("main"),
        COMMIT,
        &[("config.json", CONFIG.into()), ("pytorch_model.bin", bin)],
    );
    let files = resolve_model("org/pth", &offline(cache.path())).unwrap();
    assert_eq!(files.weights, [snapshot.join("pytorch_model.bin")]);
    let w = Weights::from_files(&files.weights, &Device::Cpu).unwrap();
    assert_eq!(w.shape("backbone.embeddings.weight"), Some(vec![6, 4]));
}

#[test]
fn revisions_tags_and_commit_hashes() {
    let cache = tempfile::tempdir().unwrap();
    let other = "fedcba9876543210fedcba9876543210fedcba98";
    let files = [
        ("config.json", CONFIG.as_bytes().to_vec()),
        ("model.safetensors", model_safetensors()),
    ];
    let main = cache_repo(cache.path(), "org/rev", Some("main"), COMMIT, &files);
    let tagged = cache_repo(cache.path(), "org/rev", Some("v1.0"), other, &files);
    let with_rev = |rev: &str| HubOptions {
        revision: Some(rev.into()),
        ..offline(cache.path())
    };
    assert_eq!(
        resolve_model("org/rev", &offline(cache.path()))
            .unwrap()
            .dir,
        main
    );
    assert_eq!(
        resolve_model("org/rev", &with_rev("v1.0")).unwrap().dir,
        tagged
    );
    // A commit hash needs no ref.
    assert_eq!(
        resolve_model("org/rev", &with_rev(other)).unwrap().dir,
        tagged
    );
    let (_, message) = not_found(resolve_model("org/rev", &with_rev("v2.0")));
    assert!(message.contains("`v2.0`"), "{message}");
}

#[test]
fn offline_miss_names_repo_and_cache() {
    let cache = tempfile::tempdir().unwrap();
    let opts = offline(cache.path());
    let (model, message) = not_found(resolve_model("state-spaces/mamba2-130m", &opts));
    assert_eq!(model, "state-spaces/mamba2-130m");
    assert!(
        message.contains(&cache.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("offline"), "{message}");
    // A cached repo without weights / without config.
    cache_repo(
        cache.path(),
        "org/noweights",
        Some("main"),
        COMMIT,
        &[("config.json", CONFIG.into())],
    );
    let (_, message) = not_found(resolve_model("org/noweights", &opts));
    assert!(message.contains("weight"), "{message}");
    cache_repo(
        cache.path(),
        "org/noconfig",
        Some("main"),
        COMMIT,
        &[("model.safetensors", model_safetensors())],
    );
    let (_, message) = not_found(resolve_model("org/noconfig", &opts));
    assert!(message.contains("config.json"), "{message}");
    // The tokenizer fallback repo absent from the cache.
    let files = ModelFiles {
        dir: cache.path().into(),
        config: cache.path().join("config.json"),
        weights: vec![],
        tokenizer: None,
        generation_config: None,
    };
    let (model, _) = not_found(resolve_tokenizer(&files, None, &opts));
    assert_eq!(model, DEFAULT_TOKENIZER_REPO);
}

#[test]
fn local_folders() {
    let dir = tempfile::tempdir().unwrap();
    let opts = offline(dir.path()); // never consulted for local folders
    let spec = dir.path().to_str().unwrap();
    let (model, message) = not_found(resolve_model(spec, &opts));
    assert_eq!(model, spec);
    assert!(message.contains("config.json"), "{message}");
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    let (_, message) = not_found(resolve_model(spec, &opts));
    assert!(message.contains("no weights"), "{message}");
    std::fs::write(dir.path().join("model.safetensors"), model_safetensors()).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), TOKENIZER).unwrap();
    let files = resolve_model(spec, &opts).unwrap();
    assert_eq!(files.dir, dir.path());
    assert_eq!(files.weights, [dir.path().join("model.safetensors")]);
    assert_eq!(files.tokenizer, Some(dir.path().join("tokenizer.json")));
    assert_eq!(files.generation_config, None);
    // The config file's path means its folder.
    let via_config =
        resolve_model(dir.path().join("config.json").to_str().unwrap(), &opts).unwrap();
    assert_eq!(via_config, files);
    // An index whose shard is missing: the error names the shard.
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"x": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    assert!(matches!(
        resolve_model(spec, &opts),
        Err(Error::WeightFile { path, .. }) if path.ends_with("model-00001-of-00002.safetensors")
    ));
}

#[test]
fn tokenizer_overrides() {
    let cache = tempfile::tempdir().unwrap();
    let opts = offline(cache.path());
    let tok_dir = tempfile::tempdir().unwrap();
    let tok_file = tok_dir.path().join("tokenizer.json");
    std::fs::write(&tok_file, TOKENIZER).unwrap();
    let own = cache.path().join("own-tokenizer.json");
    let files = ModelFiles {
        dir: cache.path().into(),
        config: cache.path().join("config.json"),
        weights: vec![],
        tokenizer: Some(own.clone()),
        generation_config: None,
    };
    assert_eq!(resolve_tokenizer(&files, None, &opts).unwrap(), own);
    // An override wins over the model's own tokenizer: file, folder or cached repo.
    assert_eq!(
        resolve_tokenizer(&files, Some(tok_file.to_str().unwrap()), &opts).unwrap(),
        tok_file
    );
    assert_eq!(
        resolve_tokenizer(&files, Some(tok_dir.path().to_str().unwrap()), &opts).unwrap(),
        tok_file
    );
    let snap = cache_repo(
        cache.path(),
        "org/tok",
        Some("main"),
        COMMIT,
        &[("tokenizer.json", TOKENIZER.into())],
    );
    // The tokenizer repo is read at `main`, whatever the model's revision.
    let opts_rev = HubOptions {
        revision: Some("v9".into()),
        ..opts.clone()
    };
    assert_eq!(
        resolve_tokenizer(&files, Some("org/tok"), &opts_rev).unwrap(),
        snap.join("tokenizer.json")
    );
    // Bad overrides.
    not_found(resolve_tokenizer(
        &files,
        Some("/definitely/not/here.json"),
        &opts,
    ));
    not_found(resolve_tokenizer(
        &files,
        Some("missing-tokenizer.json"),
        &opts,
    ));
    let empty = tempfile::tempdir().unwrap();
    not_found(resolve_tokenizer(
        &files,
        Some(empty.path().to_str().unwrap()),
        &opts,
    ));
    not_found(resolve_tokenizer(&files, Some("org/not-cached"), &opts));
    // Unparseable tokenizer file.
    let bad = tok_dir.path().join("bad.json");
    std::fs::write(&bad, "{").unwrap();
    assert!(matches!(load_tokenizer(&bad), Err(Error::Tokenizer(m)) if m.contains("bad.json")));
    assert!(matches!(
        load_tokenizer(&tok_dir.path().join("none.json")),
        Err(Error::Tokenizer(_))
    ));
}

#[test]
fn invalid_specs() {
    let cache = tempfile::tempdir().unwrap();
    let opts = offline(cache.path());
    for spec in [
        "./no/such/dir",
        "/no/such/dir",
        "a/b/c",
        "org/na me",
        "",
        "org/",
        "../x",
    ] {
        let (model, _) = not_found(resolve_model(spec, &opts));
        assert_eq!(model, spec);
    }
}
