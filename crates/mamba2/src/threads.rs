//! The CPU thread pools the models compute on, and the kernel options they run with.
//!
//! Every model asks [`shared_pool`] for a pool of its thread count (by default the machine's
//! physical cores, [`default_threads`]). Pools are shared process-wide per size: two sessions,
//! or two models, generating at once on the same count run their parallel sections in the same
//! workers, so the cores are never oversubscribed. A pool lives as long as a model holds it.
//!
//! ```
//! use mamba2::threads::{default_threads, shared_pool};
//! let a = shared_pool(None)?;
//! let b = shared_pool(Some(default_threads()))?;
//! assert!(std::sync::Arc::ptr_eq(&a, &b)); // one pool for the same size
//! assert_eq!(a.current_num_threads(), default_threads());
//! # Ok::<(), mamba2::Error>(())
//! ```

use crate::{Error, Result};
use mamba2_ops::options::KernelOptions;
use rayon::ThreadPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// The machine's physical cores (SMT siblings counted once), at most the CPUs this process may
/// run on (affinity mask, cgroup quota); at least 1. Why physical: two hyper-threads of one core
/// share its vector units and caches, and the decode and prefill loops already saturate them.
pub fn default_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| num_cpus::get_physical().min(num_cpus::get()).max(1))
}

/// The process-wide pool of `threads` workers (`None`: [`default_threads`]), created on first
/// use and shared by every caller asking for the same size while one of them holds it.
/// `Some(0)` is refused.
pub fn shared_pool(threads: Option<usize>) -> Result<Arc<ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Weak<ThreadPool>>>> = OnceLock::new();
    let n = match threads {
        Some(0) => {
            return Err(Error::InvalidInput(
                "the thread count must be at least 1".into(),
            ))
        }
        Some(n) => n,
        None => default_threads(),
    };
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(pool) = pools.get(&n).and_then(Weak::upgrade) {
        return Ok(pool);
    }
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(move |i| format!("mamba2-{n}x-{i}"))
            .build()
            .map_err(|e| Error::InvalidInput(format!("cannot start {n} threads: {e}")))?,
    );
    pools.retain(|_, w| w.strong_count() > 0);
    pools.insert(n, Arc::downgrade(&pool));
    Ok(pool)
}

/// How a model computes on the CPU: its thread pool (shared, see [`shared_pool`]) and the
/// kernel options of its ops (`None`: the process options of `mamba2_ops`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Runtime {
    threads: Option<usize>,
    pool: Arc<OnceLock<Arc<ThreadPool>>>,
    options: Option<KernelOptions>,
}

impl Runtime {
    pub(crate) fn set_threads(&mut self, threads: Option<usize>) -> Result<()> {
        let pool = shared_pool(threads)?;
        self.threads = threads;
        self.pool = Arc::new(OnceLock::from(pool));
        Ok(())
    }

    pub(crate) fn set_options(&mut self, options: KernelOptions) -> Result<()> {
        options
            .validate()
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        self.options = Some(options);
        Ok(())
    }

    pub(crate) fn options(&self) -> Option<&KernelOptions> {
        self.options.as_ref()
    }

    /// The pool (created on first use).
    pub(crate) fn pool(&self) -> Result<Arc<ThreadPool>> {
        if let Some(p) = self.pool.get() {
            return Ok(p.clone());
        }
        let p = shared_pool(self.threads)?;
        Ok(self.pool.get_or_init(|| p).clone())
    }

    /// Runs `f` on a worker of the pool (directly when already on one) with the kernel options
    /// in force. Why on a worker: a decode step is ~70 short parallel sections (one per op);
    /// started from a thread outside the pool, each hands its work to sleeping workers and
    /// waits, about an eighth of a 130m step. On a worker the sections fork and join inside the
    /// pool. The calling thread only waits, so the cores in use stay the pool's.
    /// Off the CPU (`cpu` false) only the options apply.
    pub(crate) fn run<R: Send>(&self, cpu: bool, f: impl FnOnce() -> R + Send) -> Result<R> {
        if !cpu {
            return Ok(match &self.options {
                Some(o) => mamba2_ops::options::with_options(o, f),
                None => f(),
            });
        }
        let pool = self.pool()?;
        let scoped = || match &self.options {
            Some(o) => mamba2_ops::options::with_options(o, f),
            None => f(),
        };
        Ok(if pool.current_thread_index().is_some() {
            scoped()
        } else {
            pool.install(scoped)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_shared_per_size_and_dropped_unused() {
        let a = shared_pool(Some(3)).unwrap();
        let b = shared_pool(Some(3)).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.current_num_threads(), 3);
        let c = shared_pool(Some(2)).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(matches!(shared_pool(Some(0)), Err(Error::InvalidInput(_))));
        let weak = Arc::downgrade(&a);
        drop((a, b));
        assert!(weak.upgrade().is_none(), "a pool nobody holds is dropped");
    }

    #[test]
    fn physical_cores_bounded_by_logical() {
        let n = default_threads();
        assert!(n >= 1 && n <= num_cpus::get());
        // Where the kernel lists SMT siblings, the count is the distinct (package, core) pairs
        // of the CPUs this process may use (or fewer, under a quota).
        let mut cores = std::collections::HashSet::new();
        for cpu in 0..num_cpus::get() {
            let t = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
            let (Ok(p), Ok(c)) = (
                std::fs::read_to_string(format!("{t}/physical_package_id")),
                std::fs::read_to_string(format!("{t}/core_id")),
            ) else {
                return;
            };
            cores.insert((p.trim().to_string(), c.trim().to_string()));
        }
        assert!(
            n <= cores.len().max(1),
            "{n} threads, {} cores",
            cores.len()
        );
    }

    #[test]
    fn run_uses_the_pool_and_the_options() {
        use mamba2_ops::options::{current_options, CpuTier};
        let mut rt = Runtime::default();
        rt.set_threads(Some(2)).unwrap();
        let mut o = KernelOptions::default();
        o.cpu.tier = Some(CpuTier::Generic);
        rt.set_options(o).unwrap();
        let (threads, opts, on_worker) = rt
            .run(true, || {
                (
                    rayon::current_num_threads(),
                    current_options(),
                    rayon::current_thread_index().is_some(),
                )
            })
            .unwrap();
        assert_eq!((threads, opts, on_worker), (2, o, true));
        assert_ne!(current_options(), o, "the scope ends with the call");
    }
}
