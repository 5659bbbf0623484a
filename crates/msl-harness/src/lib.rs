//! MSL-on-CPU harness: runs the exact `.metal` kernel sources on
//! the CPU with GPU semantics, for tests only.
//!
//! Each `.metal` file is rewritten (see [`rewrite`]) and compiled by clang as
//! C++17 against a shim header; threads of a threadgroup run as fibres that
//! switch at barriers and SIMD-group operations. Three execution modes:
//! in-order, shuffled (seeded fibre and threadgroup order) and checked (a
//! `-fsanitize=thread` build whose hooks are a GPU-aware race, bounds and
//! uninitialised-read checker). See the crate README for the conventions
//! kernels follow and what passing does not prove.
//!
//! ```
//! use msl_harness::{Library, Mode};
//! # fn main() -> Result<(), msl_harness::Error> {
//! let lib = Library::compile(&[concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kernels/reduce.metal")])?;
//! let input: Vec<f32> = (0..256).map(|i| i as f32).collect();
//! let mut out = vec![f32::NAN; 1];
//! let n = 256u32;
//! lib.kernel("reduce_sum_f32")?
//!     .input(0, &input)
//!     .buffer(1, &mut out)
//!     .bytes(2, &n)
//!     .grid([1, 1, 1])
//!     .threadgroup([256, 1, 1])
//!     .mode(Mode::Shuffled { seed: 7 })
//!     .dispatch()?;
//! assert_eq!(out[0], (0..256).sum::<i32>() as f32);
//! # Ok(()) }
//! ```

mod compile;
mod error;
mod ffi;
pub mod rewrite;
mod strict;

use std::collections::HashMap;
use std::ffi::CStr;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

pub use error::{Construct, Error, Fault, FaultKind, Violation};
pub use rewrite::{KernelInfo, RewriteError};

/// Default threadgroup memory limit (Apple GPUs: 32 KiB).
pub const THREADGROUP_MEMORY_LIMIT: u64 = 32 * 1024;
/// Most threads per threadgroup the harness accepts.
pub const MAX_THREADS_PER_THREADGROUP: u32 = 1024;

/// How a dispatch is executed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Threadgroups in order, fibres in thread order (fast build).
    #[default]
    InOrder,
    /// Threadgroup order and fibre order randomised from `seed` (fast build).
    Shuffled {
        /// Seed of the order.
        seed: u64,
    },
    /// In-order execution of the `-fsanitize=thread` build: every memory
    /// access is checked for races, out-of-bounds and uninitialised
    /// threadgroup reads. Slow; use small shapes.
    Checked,
    /// Like [`Mode::Checked`] with shuffled order.
    CheckedShuffled {
        /// Seed of the order.
        seed: u64,
    },
}

/// Plain-old-data types that can be bound as buffer contents.
///
/// # Safety
/// Implementors must have no padding and accept any bit pattern; a
/// `#[repr(C)]` params struct mirroring a `constant Params&` qualifies when
/// all its fields do and it has no padding.
pub unsafe trait Pod: Copy + 'static {}
macro_rules! pod {
    ($($t:ty),*) => { $(unsafe impl Pod for $t {})* };
}
pod!(
    u8,
    i8,
    u16,
    i16,
    u32,
    i32,
    u64,
    i64,
    f32,
    f64,
    half::f16,
    half::bf16
);
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}

struct Unit {
    source: compile::Source,
    kernels: Vec<KernelInfo>,
    fast: &'static compile::Loaded,
    checked: OnceLock<&'static compile::Loaded>,
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn resolve(p: &Path) -> std::path::PathBuf {
    if p.is_relative() && !p.exists() {
        let w = workspace_root().join(p);
        if w.exists() {
            return w;
        }
    }
    p.to_path_buf()
}

/// A set of compiled `.metal` files.
pub struct Library {
    units: Vec<Arc<Unit>>,
}

impl Library {
    /// Rewrites, strict-checks and compiles each file (cached on disk by
    /// content hash under `<target>/msl-harness-cache` or
    /// `$MSL_HARNESS_CACHE_DIR`; loaded once per process). The checked build
    /// is made on first use of a checked mode.
    ///
    /// A relative path that does not exist from the current directory (cargo
    /// runs tests from the package directory) is looked up from the
    /// workspace root, so `"kernels/metal/ssd.metal"` works from any crate's
    /// tests; reports keep the path as written.
    pub fn compile<P: AsRef<Path>>(files: &[P]) -> Result<Library, Error> {
        let mut units = Vec::new();
        for f in files {
            let given = f.as_ref();
            let path = resolve(given);
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(given, e))?;
            let dir = path.parent().map(|d| {
                if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                }
            });
            units.push(Self::unit(&given.display().to_string(), &text, dir)?);
        }
        Ok(Library { units })
    }

    /// Like [`Library::compile`] for a source held in memory; `label` names
    /// it in diagnostics. It cannot `#include "…"` local headers.
    pub fn from_source(label: &str, source: &str) -> Result<Library, Error> {
        Ok(Library {
            units: vec![Self::unit(label, source, None)?],
        })
    }

    /// Units are memoised per process by (label, text, include dir), so
    /// tests that each call [`Library::compile`] preprocess a file once.
    fn unit(label: &str, text: &str, include_dir: Option<&Path>) -> Result<Arc<Unit>, Error> {
        type Key = (String, u64, Option<std::path::PathBuf>);
        static UNITS: OnceLock<Mutex<HashMap<Key, Arc<Unit>>>> = OnceLock::new();
        let key = (
            label.to_string(),
            compile::fnv(&[text.as_bytes()]),
            include_dir.map(Path::to_path_buf),
        );
        let units = UNITS.get_or_init(Default::default);
        if let Some(u) = units.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(u.clone());
        }
        let u = Arc::new(Self::build_unit(label, text, include_dir)?);
        units
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, u.clone());
        Ok(u)
    }

    /// Runs only the strict pass (rewriter, Apple-compiler rules, address
    /// spaces) over each file, without building it: the check that a kernel
    /// source is free of what Metal forbids (see [`Construct`]).
    pub fn check<P: AsRef<Path>>(files: &[P]) -> Result<(), Error> {
        for f in files {
            let given = f.as_ref();
            let path = resolve(given);
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(given, e))?;
            let label = given.display().to_string();
            let dir = path.parent().map(|d| {
                if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                }
            });
            let pre = compile::preprocess(&label, &text, dir)?;
            let rw = rewrite::rewrite(&pre, &label)?;
            compile::strict_pass(&compile::Source::new(&label, rw.source)?, &pre)?;
        }
        Ok(())
    }

    fn build_unit(label: &str, text: &str, include_dir: Option<&Path>) -> Result<Unit, Error> {
        let pre = compile::preprocess(label, text, include_dir)?;
        let rw = rewrite::rewrite(&pre, label)?;
        let source = compile::Source::new(label, rw.source)?;
        compile::strict_pass(&source, &pre)?;
        let fast = compile::build(&source, compile::Flavor::Fast)?;
        Ok(Unit {
            source,
            kernels: rw.kernels,
            fast,
            checked: OnceLock::new(),
        })
    }

    /// Names of all registered kernels.
    pub fn kernel_names(&self) -> Vec<&str> {
        self.units
            .iter()
            .flat_map(|u| u.kernels.iter().map(|k| k.name.as_str()))
            .collect()
    }

    /// A dispatch builder for the kernel registered as `name`.
    pub fn kernel(&self, name: &str) -> Result<Dispatch<'_, '_>, Error> {
        let unit = self
            .units
            .iter()
            .position(|u| u.kernels.iter().any(|k| k.name == name))
            .ok_or_else(|| Error::KernelNotFound {
                name: name.to_string(),
                available: self.kernel_names().join(", "),
            })?;
        Ok(Dispatch {
            lib: self,
            unit,
            name: name.to_string(),
            buffers: [ffi::BufferBinding::default(); ffi::MAX_BUFFERS],
            tg_lens: [0; ffi::MAX_BUFFERS],
            groups: None,
            threads: None,
            tg: [1, 1, 1],
            mode: Mode::InOrder,
            budget: THREADGROUP_MEMORY_LIMIT,
            timeout: default_timeout(),
            setup_error: None,
            _borrow: PhantomData,
        })
    }
}

/// One kernel launch being set up; bind with the chaining methods, then
/// [`Dispatch::dispatch`]. Bound slices are copied into guarded staging
/// memory for the launch and written back (for [`Dispatch::buffer`]) after.
pub struct Dispatch<'l, 'b> {
    lib: &'l Library,
    unit: usize,
    name: String,
    buffers: [ffi::BufferBinding; ffi::MAX_BUFFERS],
    tg_lens: [u64; ffi::MAX_BUFFERS],
    groups: Option<[u32; 3]>,
    threads: Option<[u32; 3]>,
    tg: [u32; 3],
    mode: Mode,
    budget: u64,
    timeout: std::time::Duration,
    setup_error: Option<String>,
    _borrow: PhantomData<&'b mut [u8]>,
}

fn default_timeout() -> std::time::Duration {
    let secs = std::env::var("MSL_HARNESS_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(120);
    std::time::Duration::from_secs(secs)
}

fn serialize_dispatches() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

impl<'b> Dispatch<'_, 'b> {
    fn bind(&mut self, index: usize, ptr: *mut u8, len: usize, writable: bool) -> &mut Self {
        if index >= ffi::MAX_BUFFERS {
            self.setup_error
                .get_or_insert(format!("buffer index {index} >= {}", ffi::MAX_BUFFERS));
            return self;
        }
        self.buffers[index] = ffi::BufferBinding {
            ptr: ptr.cast(),
            len: len as u64,
            bound: 1,
            writable: writable as u32,
        };
        self
    }

    /// Binds a device buffer the kernel may write; results are copied back.
    pub fn buffer<T: Pod>(&mut self, index: usize, data: &'b mut [T]) -> &mut Self {
        self.bind(
            index,
            data.as_mut_ptr().cast(),
            std::mem::size_of_val(data),
            true,
        )
    }

    /// Binds a read-only buffer (`const device T*` or `constant T*`); a write
    /// to it is reported as [`FaultKind::ReadOnlyWrite`].
    pub fn input<T: Pod>(&mut self, index: usize, data: &'b [T]) -> &mut Self {
        self.bind(
            index,
            data.as_ptr() as *mut u8,
            std::mem::size_of_val(data),
            false,
        )
    }

    /// Binds a value, like `setBytes` (for `constant Params& p [[buffer(i)]]`).
    pub fn bytes<T: Pod>(&mut self, index: usize, value: &'b T) -> &mut Self {
        self.bind(
            index,
            value as *const T as *mut u8,
            std::mem::size_of::<T>(),
            false,
        )
    }

    /// Binds raw bytes read-only.
    pub fn raw_bytes(&mut self, index: usize, data: &'b [u8]) -> &mut Self {
        self.bind(index, data.as_ptr() as *mut u8, data.len(), false)
    }

    /// Sets the length of dynamic threadgroup memory `[[threadgroup(index)]]`.
    pub fn threadgroup_memory(&mut self, index: usize, len: usize) -> &mut Self {
        if index >= ffi::MAX_BUFFERS {
            self.setup_error
                .get_or_insert(format!("threadgroup index {index} >= {}", ffi::MAX_BUFFERS));
        } else {
            self.tg_lens[index] = len as u64;
        }
        self
    }

    /// Number of threadgroups per grid (like `dispatchThreadgroups`).
    pub fn grid(&mut self, threadgroups: [u32; 3]) -> &mut Self {
        self.groups = Some(threadgroups);
        self.threads = None;
        self
    }

    /// Total threads per grid (like `dispatchThreads`: the last threadgroups
    /// may be partial).
    pub fn threads(&mut self, threads: [u32; 3]) -> &mut Self {
        self.threads = Some(threads);
        self.groups = None;
        self
    }

    /// Threads per threadgroup.
    pub fn threadgroup(&mut self, size: [u32; 3]) -> &mut Self {
        self.tg = size;
        self
    }

    /// Execution mode.
    pub fn mode(&mut self, mode: Mode) -> &mut Self {
        self.mode = mode;
        self
    }

    /// Threadgroup memory limit in bytes (default and at most 32 KiB, the
    /// limit of Apple GPUs; a larger value makes the dispatch fail).
    pub fn threadgroup_memory_budget(&mut self, bytes: u64) -> &mut Self {
        if bytes > THREADGROUP_MEMORY_LIMIT {
            self.setup_error.get_or_insert(format!(
                "threadgroup memory budget {bytes} > {THREADGROUP_MEMORY_LIMIT} bytes (Apple GPUs have 32 KiB)"
            ));
        }
        self.budget = bytes;
        self
    }

    /// A [`Error::Forbidden`] naming this kernel and its line.
    fn forbidden(&self, construct: Construct, detail: String) -> Error {
        let unit = &self.lib.units[self.unit];
        let line = unit
            .kernels
            .iter()
            .find(|k| k.name == self.name)
            .map(|k| k.line);
        Error::Forbidden(Box::new(Violation {
            construct,
            file: unit.source.file.clone(),
            line,
            function: Some(self.name.clone()),
            detail,
        }))
    }

    /// Watchdog: a dispatch running longer than this fails with
    /// [`FaultKind::Hang`] (default 120 s, or `$MSL_HARNESS_TIMEOUT_SECS`).
    pub fn timeout(&mut self, limit: std::time::Duration) -> &mut Self {
        self.timeout = limit;
        self
    }

    /// Runs the kernel over the grid. Faults come back as [`Error::Fault`].
    pub fn dispatch(&mut self) -> Result<(), Error> {
        if let Some(e) = &self.setup_error {
            return Err(Error::InvalidDispatch(e.clone()));
        }
        let tg = self.tg;
        let nthreads = tg.iter().map(|&v| v as u64).product::<u64>();
        if nthreads == 0 {
            return Err(Error::InvalidDispatch(format!("empty threadgroup {tg:?}")));
        }
        if nthreads > MAX_THREADS_PER_THREADGROUP as u64 {
            return Err(self.forbidden(
                Construct::ThreadsPerThreadgroup,
                format!("dispatch asks for {tg:?} = {nthreads} threads per threadgroup; Apple GPUs run at most {MAX_THREADS_PER_THREADGROUP}"),
            ));
        }
        // static arrays add to this at run time (the runtime checks the sum)
        let dynamic: u64 = self.tg_lens.iter().sum();
        if dynamic > THREADGROUP_MEMORY_LIMIT {
            return Err(self.forbidden(
                Construct::ThreadgroupMemory,
                format!("dispatch asks for {dynamic} bytes of [[threadgroup(i)]] memory; Apple GPUs have {THREADGROUP_MEMORY_LIMIT}"),
            ));
        }
        if let Some((i, _)) = self.tg_lens.iter().enumerate().find(|(_, &l)| l % 16 != 0) {
            return Err(Error::InvalidDispatch(format!(
                "threadgroup memory length of index {i} must be a multiple of 16 bytes (Metal requires it)"
            )));
        }
        let (groups, grid_threads) = match (self.groups, self.threads) {
            (Some(g), _) => (g, [g[0] * tg[0], g[1] * tg[1], g[2] * tg[2]]),
            (None, Some(t)) => (
                [
                    t[0].div_ceil(tg[0]),
                    t[1].div_ceil(tg[1]),
                    t[2].div_ceil(tg[2]),
                ],
                t,
            ),
            (None, None) => {
                return Err(Error::InvalidDispatch(
                    "no grid set (call .grid or .threads)".into(),
                ))
            }
        };
        if groups.contains(&0) {
            return Err(Error::InvalidDispatch(format!("empty grid {groups:?}")));
        }
        let unit = &self.lib.units[self.unit];
        let (checked, shuffled, seed) = match self.mode {
            Mode::InOrder => (false, false, 0),
            Mode::Shuffled { seed } => (false, true, seed),
            Mode::Checked => (true, false, 0),
            Mode::CheckedShuffled { seed } => (true, true, seed),
        };
        let loaded = if checked {
            match unit.checked.get() {
                Some(l) => *l,
                None => {
                    let l = compile::build(&unit.source, compile::Flavor::Checked)?;
                    *unit.checked.get_or_init(|| l)
                }
            }
        } else {
            unit.fast
        };
        let kernel = *loaded
            .kernels
            .get(&self.name)
            .ok_or_else(|| Error::KernelNotFound {
                name: self.name.clone(),
                available: self.lib.kernel_names().join(", "),
            })?;
        let mut args = Box::new(ffi::DispatchArgs {
            kernel: Some(kernel),
            groups,
            tg,
            grid_threads,
            shuffled: shuffled as u32,
            checked: checked as u32,
            seed,
            tg_budget: self.budget,
            timeout_ms: self.timeout.as_millis().min(u64::MAX as u128) as u64,
            buffers: self.buffers,
            tg_lens: self.tg_lens,
            fault: 0,
            _pad: 0,
            pc: [0; 2],
            message: [0; 1024],
        });
        {
            let _guard = serialize_dispatches();
            // SAFETY: the bound pointers come from live borrows held for 'b;
            // the runtime copies them in and (for writable ones) back out.
            unsafe { (loaded.dispatch)(&mut *args) };
        }
        if args.fault == 0 {
            return Ok(());
        }
        let kind = match args.fault {
            1 => FaultKind::Binding,
            2 => FaultKind::Race,
            3 => FaultKind::OutOfBounds,
            4 => FaultKind::UninitializedRead,
            5 => FaultKind::Barrier,
            6 => FaultKind::ThreadgroupMemory,
            7 => FaultKind::SimdDivergence,
            8 => FaultKind::StackOverflow,
            9 => FaultKind::Hang,
            11 => FaultKind::ReadOnlyWrite,
            _ => FaultKind::Config,
        };
        // SAFETY: the runtime always NUL-terminates the message (vsnprintf).
        let message = unsafe { CStr::from_ptr(args.message.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let fault = Fault {
            kind,
            message,
            location: compile::symbolize(&loaded.path, args.pc[0]),
            other_location: compile::symbolize(&loaded.path, args.pc[1]),
        };
        Err(Error::Fault {
            kernel: self.name.clone(),
            fault,
        })
    }
}
