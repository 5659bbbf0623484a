//! The online path end to end against a local mock of the Hub's HTTP API (repo info, `resolve`
//! with range requests, etag and commit headers): files land in the cache exactly where hf-hub
//! puts them, the offline path then finds the same files, cached files are not fetched again,
//! tokens are sent, and 404/401 are typed errors. One test in its own binary (it sets
//! HF_ENDPOINT, which is process-wide).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use candle_core::Device;
use mamba2::hub::{load_tokenizer, resolve_model, resolve_tokenizer, HubOptions};
use mamba2::weights::Weights;
use mamba2::Error;

const COMMIT: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
const CONFIG: &str = r#"{"d_model": 8, "n_layer": 1, "vocab_size": 6,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 4, "headdim": 4}}"#;
const TOKENIZER: &str = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
  "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2}, "unk_token": "[UNK]"}}"#;

type Repos = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// Requests seen: (method + path, authorization header).
type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

fn st(name: &str, n: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n], &data).unwrap();
    safetensors::serialize([(name.to_string(), view)], None).unwrap()
}

fn respond(stream: &mut impl Write, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
}

/// Serves `repos` like huggingface.co does for hf-hub; `private` repos answer 401.
fn serve(repos: Repos, private: &'static str, log: Log) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let (mut range, mut auth) = (None, None);
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let (k, v) = line.split_once(": ").unwrap_or((line, ""));
                match k.to_ascii_lowercase().as_str() {
                    "range" => range = Some(v.trim_start_matches("bytes=").to_string()),
                    "authorization" => auth = Some(v.to_string()),
                    _ => {}
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            log.lock().unwrap().push((path.clone(), auth));
            if path.contains(private) {
                respond(&mut stream, "401 Unauthorized", &[], b"");
                continue;
            }
            // /api/models/{org}/{name}/revision/{rev}
            if let Some(rest) = path.strip_prefix("/api/models/") {
                let repo = rest.split("/revision/").next().unwrap();
                match repos.get(repo) {
                    Some(files) => {
                        let siblings: Vec<_> = files
                            .keys()
                            .map(|f| serde_json::json!({"rfilename": f}))
                            .collect();
                        let body =
                            serde_json::json!({"siblings": siblings, "sha": COMMIT}).to_string();
                        respond(&mut stream, "200 OK", &[], body.as_bytes());
                    }
                    None => respond(&mut stream, "404 Not Found", &[], b"{}"),
                }
                continue;
            }
            // /{org}/{name}/resolve/{rev}/{file}
            let found = path.split_once("/resolve/").and_then(|(repo, rest)| {
                let file = rest.split_once('/')?.1;
                repos.get(repo.trim_start_matches('/'))?.get(file)
            });
            let Some(content) = found else {
                respond(&mut stream, "404 Not Found", &[], b"");
                continue;
            };
            let start: usize = range
                .as_deref()
                .and_then(|r| r.split('-').next()?.parse().ok())
                .unwrap_or(0);
            let end = match range
                .as_deref()
                .and_then(|r| r.split('-').nth(1))
                .filter(|e| !e.is_empty())
            {
                Some(e) => e.parse::<usize>().unwrap() + 1,
                None => content.len(),
            };
            let etag = format!(
                "\"{:x}{:x}\"",
                content.len(),
                content.iter().map(|b| *b as u64).sum::<u64>()
            );
            let headers = [
                ("ETag".to_string(), etag),
                ("X-Repo-Commit".to_string(), COMMIT.to_string()),
                (
                    "Content-Range".to_string(),
                    format!("bytes {start}-{}/{}", end - 1, content.len()),
                ),
            ];
            respond(
                &mut stream,
                "206 Partial Content",
                &headers,
                &content[start..end],
            );
        }
    });
    format!("http://{addr}")
}

#[test]
fn download_then_offline_from_the_same_cache() {
    let index = serde_json::json!({"weight_map": {
        "backbone.embeddings.weight": "model-00001-of-00002.safetensors",
        "backbone.norm_f.weight": "model-00002-of-00002.safetensors"}});
    let mut repos = Repos::new();
    repos.insert(
        "org/model".into(),
        BTreeMap::from([
            ("README.md".to_string(), b"# not needed".to_vec()),
            ("config.json".to_string(), CONFIG.as_bytes().to_vec()),
            (
                "model.safetensors.index.json".to_string(),
                index.to_string().into_bytes(),
            ),
            (
                "model-00001-of-00002.safetensors".to_string(),
                st("backbone.embeddings.weight", 64),
            ),
            (
                "model-00002-of-00002.safetensors".to_string(),
                st("backbone.norm_f.weight", 8),
            ),
            // Lower priority than the safetensors index: never downloaded.
            ("pytorch_model.bin".to_string(), b"unused".to_vec()),
        ]),
    );
    repos.insert(
        "EleutherAI/gpt-neox-20b".into(),
        BTreeMap::from([("tokenizer.json".to_string(), TOKENIZER.as_bytes().to_vec())]),
    );
    let log: Log = Arc::default();
    let endpoint = serve(repos, "org/private", log.clone());
    for key in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HF_HUB_OFFLINE",
    ] {
        std::env::remove_var(key);
    }
    std::env::set_var("HF_ENDPOINT", &endpoint);

    let cache = tempfile::tempdir().unwrap();
    let online = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        offline: Some(false),
        progress: false,
        token: Some("hf_test".into()),
        ..Default::default()
    };
    let files = resolve_model("org/model", &online).unwrap();
    let repo_dir = cache.path().join("models--org--model");
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    assert_eq!(files.dir, snapshot);
    assert_eq!(files.config, snapshot.join("config.json"));
    assert_eq!(
        files.weights,
        [
            snapshot.join("model-00001-of-00002.safetensors"),
            snapshot.join("model-00002-of-00002.safetensors")
        ]
    );
    assert_eq!(
        (files.tokenizer.clone(), files.generation_config.clone()),
        (None, None)
    );
    // hf-hub's layout: refs/main holds the commit, snapshot entries resolve into blobs/.
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    let target = std::fs::canonicalize(snapshot.join("config.json")).unwrap();
    assert!(
        target.starts_with(std::fs::canonicalize(repo_dir.join("blobs")).unwrap()),
        "{target:?}"
    );
    assert_eq!(std::fs::read_to_string(&files.config).unwrap(), CONFIG);
    assert_eq!(
        Weights::from_dir(&files.dir, &Device::Cpu)
            .unwrap()
            .names()
            .len(),
        2
    );

    {
        let log = log.lock().unwrap();
        assert!(
            log.iter()
                .all(|(_, auth)| auth.as_deref() == Some("Bearer hf_test")),
            "{log:?}"
        );
        assert!(
            !log.iter()
                .any(|(p, _)| p.ends_with("README.md") || p.ends_with("pytorch_model.bin")),
            "{log:?}"
        );
    }

    // The tokenizer fallback repo, downloaded the same way.
    let tok = resolve_tokenizer(&files, None, &online).unwrap();
    assert!(
        tok.starts_with(
            cache
                .path()
                .join("models--EleutherAI--gpt-neox-20b/snapshots")
        ),
        "{tok:?}"
    );
    assert_eq!(
        load_tokenizer(&tok)
            .unwrap()
            .encode("world hello", false)
            .unwrap()
            .get_ids(),
        [1, 0]
    );

    // Offline now finds exactly what was downloaded.
    let offline = HubOptions {
        offline: Some(true),
        ..online.clone()
    };
    assert_eq!(resolve_model("org/model", &offline).unwrap(), files);
    assert_eq!(resolve_tokenizer(&files, None, &offline).unwrap(), tok);

    // Online again: only the repo listing is requested; cached files are reused.
    let before = log.lock().unwrap().len();
    assert_eq!(resolve_model("org/model", &online).unwrap(), files);
    let after: Vec<String> = log.lock().unwrap()[before..]
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    assert_eq!(after, ["/api/models/org/model/revision/main"]);

    // Unknown and private repos.
    match resolve_model("org/absent", &online) {
        Err(Error::ModelNotFound { model, message }) => {
            assert_eq!(model, "org/absent");
            assert!(message.contains("not found on the Hub"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match resolve_model("org/private", &online) {
        Err(Error::ModelNotFound { message, .. }) => {
            assert!(message.contains("HF_TOKEN"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}
