//! `pytorch_model.bin` never executes code. The hostile archives in `tests/data/malicious_*.bin`
//! (written by `tests/data/make_malicious_pickles.py`, whose `--verify` mode shows that Python's
//! `pickle.loads` does run every payload) call `os.system`, `builtins.eval`, `subprocess.Popen`
//! and protocol-0 INST on a shell command that would create a marker file. Loading them here gives
//! typed errors or only the genuine tensor, and no marker appears.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use mamba2::weights::Weights;
use mamba2::Error;

/// The files the payloads would create (see make_malicious_pickles.py).
const MARKERS: [&str; 4] = [
    "/tmp/mamba2-rs-pickle-executed-os",
    "/tmp/mamba2-rs-pickle-executed-eval",
    "/tmp/mamba2-rs-pickle-executed-popen",
    "/tmp/mamba2-rs-pickle-executed-inst",
];

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Copies a hostile file to a fresh `pytorch_model.bin`, as a user's download would be named.
fn as_checkpoint(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pytorch_model.bin");
    std::fs::copy(data(name), &path).unwrap();
    (dir, path)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Removes stale markers first so that a marker seen afterwards can only come from this run.
/// The tests share the marker paths, so they hold this lock.
fn clear_markers() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for m in MARKERS {
        let _ = std::fs::remove_file(m);
    }
    guard
}

fn assert_nothing_ran() {
    // Popen would run asynchronously: give a spawned `touch` time to land.
    std::thread::sleep(std::time::Duration::from_millis(300));
    for m in MARKERS {
        assert!(!Path::new(m).exists(), "{m} exists: a payload ran");
    }
}

#[test]
fn the_hostile_files_hold_the_payloads() {
    // Guards against the fixtures being replaced by harmless files, which would make the tests
    // below pass vacuously: each GLOBAL opcode and command is in the stored pickle bytes.
    let calls = std::fs::read(data("malicious_calls.bin")).unwrap();
    for needle in [
        &b"cos\nsystem\n"[..],
        b"cbuiltins\neval\n",
        b"csubprocess\nPopen\n",
        b"touch /tmp/mamba2-rs-pickle-executed-os",
    ] {
        assert!(
            contains(&calls, needle),
            "{:?}",
            String::from_utf8_lossy(needle)
        );
    }
    let mixed = std::fs::read(data("malicious_mixed.bin")).unwrap();
    assert!(contains(&mixed, b"cos\nsystem\n"));
    assert!(contains(&mixed, b"ctorch._utils\n_rebuild_tensor_v2\n"));
    let inst = std::fs::read(data("malicious_inst.bin")).unwrap();
    assert!(contains(&inst, b"ios\nsystem\n"));
}

#[test]
fn calls_only_pickle_is_refused_and_runs_nothing() {
    let _guard = clear_markers();
    let (_dir, path) = as_checkpoint("malicious_calls.bin");
    match Weights::from_files(std::slice::from_ref(&path), &Device::Cpu) {
        Err(e @ Error::WeightFile { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("pytorch_model.bin"), "{msg}");
            assert!(msg.contains("no tensors"), "{msg}");
        }
        other => panic!("expected WeightFile, got {other:?}"),
    }
    // Through the whole loader too (config + weights), as `TextGenerator::load` would.
    let dir = path.parent().unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "mamba2", "hidden_size": 2, "num_hidden_layers": 1, "vocab_size": 4,
            "num_heads": 1, "head_dim": 4, "n_groups": 1, "state_size": 2}"#,
    )
    .unwrap();
    let files = mamba2::hub::resolve_model(dir.to_str().unwrap(), &Default::default()).unwrap();
    assert!(matches!(
        mamba2::pipeline::load_model(&files, DType::F32, &Device::Cpu),
        Err(Error::WeightFile { .. })
    ));
    assert_nothing_ran();
}

#[test]
fn mixed_pickle_yields_only_the_genuine_tensor_and_runs_nothing() {
    let _guard = clear_markers();
    let (_dir, path) = as_checkpoint("malicious_mixed.bin");
    let w = Weights::from_files(std::slice::from_ref(&path), &Device::Cpu).unwrap();
    // The three call results are not tensor records: they are not listed, nor evaluated.
    assert_eq!(w.names(), vec!["backbone.norm_f.weight".to_string()]);
    let t = w
        .tensor("backbone.norm_f.weight", &[2, 2], DType::F32)
        .unwrap();
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        vec![vec![1.0, 2.0], vec![3.0, 4.0]]
    );
    assert!(matches!(
        w.tensor("a", &[1], DType::F32),
        Err(Error::MissingTensor { .. })
    ));
    assert_nothing_ran();
}

#[test]
fn inst_opcode_is_refused_and_runs_nothing() {
    let _guard = clear_markers();
    let (_dir, path) = as_checkpoint("malicious_inst.bin");
    match Weights::from_files(std::slice::from_ref(&path), &Device::Cpu) {
        Err(e @ Error::WeightFile { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("pytorch_model.bin"), "{msg}");
        }
        other => panic!("expected WeightFile, got {other:?}"),
    }
    assert_nothing_ran();
}
