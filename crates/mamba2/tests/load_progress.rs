//! Progress reports and cancellation while a model is resolved from the Hub cache (the layout
//! of `hub_cache.rs`, offline) and while its weights are loaded.

use mamba2::hub::{resolve_model, HubOptions};
use mamba2::pipeline::{LoadOptions, TextGenerator};
use mamba2::progress::{LoadMonitor, Progress};
use mamba2::session::CancelToken;
use mamba2::Error;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const REPO: &str = "acme/mamba2-tiny";

fn bundled() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/mamba2-tiny")
}

/// The bundled model laid out as a Hub cache snapshot at `main`.
fn hub_cache(cache: &Path) {
    let repo = cache.join(format!("models--{}", REPO.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(bundled().join(f), snapshot.join(f)).unwrap();
    }
}

fn recorder() -> (Arc<Mutex<Vec<Progress>>>, LoadMonitor) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let m = LoadMonitor::new().with_progress(move |p| s.lock().unwrap().push(p.clone()));
    (seen, m)
}

fn offline(cache: &Path, monitor: LoadMonitor) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.to_path_buf()),
        offline: Some(true),
        progress: false,
        monitor,
        ..Default::default()
    }
}

#[test]
fn download_and_load_report_progress() {
    let dir = tempfile::tempdir().unwrap();
    hub_cache(dir.path());
    let (seen, monitor) = recorder();
    let opts = LoadOptions {
        hub: offline(dir.path(), LoadMonitor::new()),
        monitor,
        ..Default::default()
    };
    TextGenerator::load(REPO, &opts).unwrap();
    let seen = seen.lock().unwrap();
    let files: Vec<&str> = seen
        .iter()
        .filter_map(|p| match p {
            Progress::Download {
                file,
                cached: true,
                done,
                total,
                ..
            } => {
                assert_eq!(done, total);
                Some(file.as_str())
            }
            _ => None,
        })
        .collect();
    assert!(
        files.contains(&"config.json") && files.contains(&"model.safetensors"),
        "{files:?}"
    );
    let loads: Vec<(usize, usize, u64, u64)> = seen
        .iter()
        .filter_map(|p| match p {
            Progress::Load {
                tensors,
                total_tensors,
                bytes,
                total_bytes,
                ..
            } => Some((*tensors, *total_tensors, *bytes, *total_bytes)),
            _ => None,
        })
        .collect();
    assert!(loads.len() > 5, "{loads:?}");
    for (i, w) in loads.windows(2).enumerate() {
        assert_eq!(w[1].0, w[0].0 + 1, "report {i}");
        assert!(w[1].2 > w[0].2);
    }
    let (n, total_n, bytes, total_bytes) = *loads.last().unwrap();
    assert!(n <= total_n && bytes <= total_bytes);
    // Every tensor of the bundled checkpoint is used: the last report is the whole file's data.
    let file_len = std::fs::metadata(bundled().join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(n, total_n);
    assert!(total_bytes <= file_len && total_bytes > file_len * 9 / 10);
}

#[test]
fn cancel_during_download_and_during_load() {
    let dir = tempfile::tempdir().unwrap();
    hub_cache(dir.path());

    // During the download: cancelled at the first file, the weights are never reached.
    let cancel = CancelToken::new();
    let c = cancel.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let monitor = LoadMonitor::new()
        .with_cancel(cancel.clone())
        .with_progress(move |p| {
            s.lock().unwrap().push(p.clone());
            c.cancel();
        });
    let r = resolve_model(REPO, &offline(dir.path(), monitor));
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert_eq!(seen.lock().unwrap().len(), 1);

    // During the load: cancelled after the third tensor, no fourth is read.
    let cancel = CancelToken::new();
    let c = cancel.clone();
    let loads = Arc::new(Mutex::new(0usize));
    let l = loads.clone();
    let monitor = LoadMonitor::new()
        .with_cancel(cancel.clone())
        .with_progress(move |p| {
            if let Progress::Load { tensors, .. } = p {
                *l.lock().unwrap() = *tensors;
                if *tensors == 3 {
                    c.cancel();
                }
            }
        });
    let opts = LoadOptions {
        hub: offline(dir.path(), LoadMonitor::new()),
        monitor,
        ..Default::default()
    };
    let r = TextGenerator::load(REPO, &opts);
    assert!(matches!(r, Err(Error::Cancelled)), "{:?}", r.err());
    assert_eq!(*loads.lock().unwrap(), 3);

    // A token cancelled before anything starts stops a local folder's load too.
    let cancel = CancelToken::new();
    cancel.cancel();
    let opts = LoadOptions {
        monitor: LoadMonitor::new().with_cancel(cancel),
        ..Default::default()
    };
    let r = TextGenerator::load(&bundled().to_string_lossy(), &opts);
    assert!(matches!(r, Err(Error::Cancelled)), "{:?}", r.err());
}
