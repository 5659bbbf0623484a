//! Threads (issue 19): two library sessions generating at once share one pool of the configured
//! size (never more compute threads than that), with the same tokens as when they run one after
//! the other; the thread count and the kernel options are per model.

use candle_core::{DType, Device};
use mamba2::session::{CancelToken, GenerateOptions, Session};
use mamba2::{config::Mamba2Config, Mamba2Model};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

fn model(threads: usize, seed: u64) -> Arc<Mamba2Model> {
    let mut cfg = Mamba2Config::preset("130m").unwrap();
    cfg.n_layer = 2;
    cfg.d_model = 128;
    cfg.d_inner = 256;
    cfg.nheads = 4;
    cfg.d_state = 32;
    cfg.vocab_size = 300;
    cfg.pad_vocab_size_multiple = 1;
    let mut m = Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, seed).unwrap();
    m.set_threads(Some(threads)).unwrap();
    Arc::new(m)
}

fn generate(model: &Arc<Mamba2Model>, prompt: &[u32]) -> Vec<u32> {
    let mut s = Session::new(model.clone()).unwrap();
    s.feed(prompt).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 24,
        ..Default::default()
    };
    s.generate(&opts, &CancelToken::new(), |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap()
    .tokens
}

/// Threads of this process whose name starts with `prefix` (the pool names its workers
/// `mamba2-<size>x-<i>`).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with(prefix))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn concurrent_sessions_share_one_pool() {
    // A size no other test of this binary uses, so the thread names are this test's.
    const N: usize = 3;
    let (a, b) = (model(N, 1), model(N, 2));
    assert_eq!((a.threads().unwrap(), b.threads().unwrap()), (N, N));
    let prompts = [vec![5u32, 17, 42, 7], vec![9u32, 1, 250, 33, 2]];
    let sequential = [generate(&a, &prompts[0]), generate(&b, &prompts[1])];

    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let monitor = {
        let (done, most) = (done.clone(), most.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                most.fetch_max(threads_named(&format!("mamba2-{N}x-")), Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    let start = Arc::new(Barrier::new(2));
    let runs: Vec<_> = [
        (a.clone(), prompts[0].clone()),
        (b.clone(), prompts[1].clone()),
    ]
    .into_iter()
    .map(|(m, p)| {
        let start = start.clone();
        std::thread::spawn(move || {
            start.wait();
            generate(&m, &p)
        })
    })
    .collect();
    let concurrent: Vec<Vec<u32>> = runs.into_iter().map(|h| h.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    monitor.join().unwrap();

    assert_eq!(concurrent, sequential, "sharing the pool changes no token");
    if std::path::Path::new("/proc/self/task").exists() {
        let seen = most.load(Ordering::Relaxed);
        assert_eq!(seen, N, "worker threads alive while two sessions generated");
        assert_eq!(threads_named(&format!("mamba2-{N}x-")), N);
    }
}

#[test]
fn thread_count_and_options_are_per_model() {
    use mamba2_ops::options::{CpuTier, KernelOptions};
    let m = model(1, 3);
    assert_eq!(m.threads().unwrap(), 1);
    let ids = candle_core::Tensor::new(&[[3u32, 4, 5, 6, 7]], &Device::Cpu).unwrap();
    let want = m.forward(&ids, None).unwrap();
    // The generic tier on a copy: the same logits within f32 rounding, and the first model's
    // options are untouched.
    let mut g = (*m).clone();
    let mut o = KernelOptions::default();
    o.cpu.tier = Some(CpuTier::Generic);
    g.set_kernel_options(o).unwrap();
    assert_eq!(g.kernel_options(), Some(&o));
    assert_eq!(m.kernel_options(), None);
    let got = g.forward(&ids, None).unwrap();
    let diff = (got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "generic tier vs default: {diff}");
    // Refused: no threads; a tier this CPU lacks.
    let mut bad = (*model(1, 3)).clone();
    assert!(bad.set_threads(Some(0)).is_err());
    let foreign = if cfg!(target_arch = "aarch64") {
        CpuTier::Avx2
    } else {
        CpuTier::Neon
    };
    o.cpu.tier = Some(foreign);
    assert!(bad.set_kernel_options(o).is_err());
}
