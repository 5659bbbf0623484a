//! The harness's errors and the faults its runtime reports.

use std::path::Path;

use crate::rewrite::RewriteError;

pub use crate::strict::{Construct, Violation};

/// Category of a fault found while running a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultKind {
    /// Unbound buffer, too-small `constant` struct, misalignment, missing threadgroup length.
    Binding,
    /// Two unordered accesses (at least one write) to the same byte.
    Race,
    /// Access outside a buffer or threadgroup allocation.
    OutOfBounds,
    /// Read of threadgroup memory never written in this threadgroup.
    UninitializedRead,
    /// Divergent barrier or a barrier not reached by every thread.
    Barrier,
    /// Threadgroup memory over budget.
    ThreadgroupMemory,
    /// simdgroup_matrix op executed by part of a simdgroup.
    SimdDivergence,
    /// Emulated thread overflowed its fibre stack.
    StackOverflow,
    /// Spin-wait on an atomic, or the dispatch ran past its timeout.
    Hang,
    /// Invalid dispatch configuration detected by the runtime.
    Config,
    /// Write to a buffer bound read-only with [`Dispatch::input`].
    ReadOnlyWrite,
}

/// A fault found while running a kernel.
#[derive(Clone, Debug)]
pub struct Fault {
    /// Category.
    pub kind: FaultKind,
    /// Human-readable description (threads, buffer and offset involved).
    pub message: String,
    /// `.metal` file:line of the faulting access/call, when known.
    pub location: Option<String>,
    /// file:line of the other access of a race, or of the other barrier.
    pub other_location: Option<String>,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)?;
        if let Some(l) = &self.location {
            write!(f, " at {l}")?;
        }
        if let Some(l) = &self.other_location {
            write!(f, " (other access at {l})")?;
        }
        Ok(())
    }
}

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable clang.
    #[error("msl-harness: {0}")]
    NoCompiler(String),
    /// File system error.
    #[error("msl-harness: {path}: {source}")]
    Io {
        /// Path involved.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The rewriter rejected the source.
    #[error("msl-harness: {0}")]
    Rewrite(#[from] RewriteError),
    /// clang rejected the source.
    #[error("msl-harness: clang failed on {file}:\n{log}")]
    Compile {
        /// `.metal` file.
        file: String,
        /// clang's diagnostics.
        log: String,
    },
    /// A construct Metal does not allow (strict pass, or a dispatch asking
    /// for more threads or threadgroup memory than Apple GPUs have). See
    /// [`Construct`] for what is checked and the crate's `strict` module for
    /// how.
    #[error("msl-harness: {0}")]
    Forbidden(Box<Violation>),
    /// dlopen failed.
    #[error("msl-harness: cannot load {path}: {message}")]
    Load {
        /// Library path.
        path: String,
        /// dlerror text.
        message: String,
    },
    /// No kernel of that name in the library.
    #[error("msl-harness: kernel `{name}` not found (available: {available})")]
    KernelNotFound {
        /// Requested name.
        name: String,
        /// Names registered.
        available: String,
    },
    /// The dispatch was set up wrongly on the Rust side.
    #[error("msl-harness: invalid dispatch: {0}")]
    InvalidDispatch(String),
    /// The kernel misbehaved.
    #[error("msl-harness: kernel `{kernel}`: {fault}")]
    Fault {
        /// Kernel name.
        kernel: String,
        /// What happened.
        fault: Fault,
    },
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// The fault, if this error is one.
    pub fn fault(&self) -> Option<&Fault> {
        match self {
            Error::Fault { fault, .. } => Some(fault),
            _ => None,
        }
    }

    /// The fault kind, if this error is a fault.
    pub fn fault_kind(&self) -> Option<FaultKind> {
        self.fault().map(|f| f.kind)
    }

    /// The forbidden construct, if the strict pass or a dispatch check
    /// rejected one.
    pub fn forbidden(&self) -> Option<&Violation> {
        match self {
            Error::Forbidden(v) => Some(v),
            _ => None,
        }
    }
}
