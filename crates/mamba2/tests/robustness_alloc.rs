//! No allocation driven by an unchecked size field: this test binary counts the largest single
//! allocation request (a wrapping global allocator) while hostile files are loaded, and checks it
//! stays far below what the size fields ask for. The tests share the counter, so they hold a lock.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device};
use mamba2::{Error, Mamba2Config};

struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only records the sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `f` alone and returns its result with the largest allocation request it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    LARGEST.store(0, Ordering::SeqCst);
    let out = f();
    (out, LARGEST.load(Ordering::SeqCst))
}

const MIB: usize = 1 << 20;

fn fixture_hf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/g2_ds16_seq3_b2/hf")
}

/// A checkpoint folder: the fixture's weights with its config edited by `edit`.
fn checkpoint(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_hf().join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_hf().join("config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    dir
}

fn load(dir: &Path) -> Result<mamba2::Mamba2Model, Error> {
    let files = mamba2::hub::resolve_model(dir.to_str().unwrap(), &Default::default())?;
    mamba2::pipeline::load_model(&files, DType::F32, &Device::Cpu)
}

#[test]
fn huge_layer_count_in_config_fails_on_the_first_missing_layer_without_preallocating() {
    // 2^24 layers passes the config's size bound; the checkpoint has 2. Loading must fail on
    // layer 2's first tensor, not reserve room for 16 million blocks first.
    let dir = checkpoint(|c| c["num_hidden_layers"] = (1u64 << 24).into());
    let cfg = Mamba2Config::from_file(&dir.path().join("config.json")).unwrap();
    assert_eq!(cfg.n_layer, 1 << 24);
    let (result, largest) = largest_allocation(|| load(dir.path()));
    match result {
        Err(e @ Error::MissingTensor { .. }) => {
            assert!(e.to_string().contains("backbone.layers.2."), "{e}")
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    assert!(largest < 16 * MIB, "largest allocation {largest} bytes");
}

#[test]
fn the_tracker_sees_large_allocations() {
    // The check above can fail: a 64 MiB buffer is seen.
    let (v, largest) = largest_allocation(|| vec![0u8; 64 * MIB]);
    assert_eq!(v.len(), 64 * MIB);
    assert!(largest >= 64 * MIB);
}

#[test]
fn pickle_records_with_lying_sizes_are_refused_before_allocating() {
    // tests/data/hostile_sizes.bin (make_malicious_pickles.py): `huge` claims 128 GiB of f32 over
    // a 16-byte storage, `overflow` more bytes than a usize holds; `ok` is genuine.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pytorch_model.bin");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hostile_sizes.bin"),
        &path,
    )
    .unwrap();
    let w =
        mamba2::weights::Weights::from_files(std::slice::from_ref(&path), &Device::Cpu).unwrap();
    assert_eq!(w.names(), vec!["huge", "ok", "overflow"]);
    for name in ["huge", "overflow"] {
        let shape = w.shape(name).unwrap();
        let (result, largest) = largest_allocation(|| w.tensor(name, &shape, DType::F32));
        match result {
            Err(e @ Error::WeightFile { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("pytorch_model.bin"), "{msg}");
                assert!(msg.contains(&format!("`{name}`")), "{msg}");
                assert!(msg.contains("needs more bytes"), "{msg}");
            }
            other => panic!("{name}: expected WeightFile, got {other:?}"),
        }
        assert!(
            largest < 16 * MIB,
            "{name}: largest allocation {largest} bytes"
        );
    }
    let ok = w.tensor("ok", &[2, 2], DType::F32).unwrap();
    assert_eq!(
        ok.to_vec2::<f32>().unwrap(),
        vec![vec![1.0, 2.0], vec![3.0, 4.0]]
    );
}
