//! Progress reports and cancellation while a model is downloaded and loaded: a
//! [`LoadMonitor`] carries an optional callback and an optional [`CancelToken`] through
//! [`crate::hub::HubOptions`] and [`crate::pipeline::LoadOptions`].
//!
//! Downloads report each file once it is in the cache and check the token before each file
//! and after it (hf-hub's blocking client cannot stop inside a file, so a cancel during a file
//! takes effect when that file is complete; its byte-level progress goes only to its own bar,
//! [`crate::hub::HubOptions::progress`]). Loading reports each weight tensor read and checks the
//! token before each, for safetensors and `pytorch_model.bin`; a GGUF file is checked before
//! and after it is read.

use crate::session::CancelToken;
use crate::{Error, Result};
use std::sync::Arc;

/// One progress report.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// A file of a Hub repo, reported once it is in the cache (`done == total`, its size);
    /// `cached` when it was there before, not downloaded.
    Download {
        repo: String,
        file: String,
        done: u64,
        total: u64,
        cached: bool,
    },
    /// Weight tensors read: `tensors` of `total_tensors` and `bytes` of `total_bytes` (as
    /// stored in the files; a model that reads only some tensors ends below the totals).
    Load {
        tensor: String,
        tensors: usize,
        total_tensors: usize,
        bytes: u64,
        total_bytes: u64,
    },
}

/// The callback type of [`LoadMonitor`]. Called on the loading thread.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A progress callback and a cancellation token for downloads and loads. `Default` is
/// neither.
///
/// ```
/// use mamba2::pipeline::{bundled_model_dir, LoadOptions, TextGenerator};
/// use mamba2::progress::{LoadMonitor, Progress};
/// use mamba2::session::CancelToken;
/// use std::sync::{Arc, Mutex};
/// let seen = Arc::new(Mutex::new(0usize));
/// let counter = seen.clone();
/// let monitor = LoadMonitor::new()
///     .with_progress(move |p| if let Progress::Load { .. } = p { *counter.lock().unwrap() += 1 });
/// let opts = LoadOptions { monitor, ..Default::default() };
/// TextGenerator::load(&bundled_model_dir()?.to_string_lossy(), &opts)?;
/// assert!(*seen.lock().unwrap() > 0);
///
/// let cancel = CancelToken::new();
/// cancel.cancel();
/// let opts = LoadOptions { monitor: LoadMonitor::new().with_cancel(cancel), ..Default::default() };
/// let err = TextGenerator::load(&bundled_model_dir()?.to_string_lossy(), &opts).unwrap_err();
/// assert!(matches!(err, mamba2::Error::Cancelled));
/// # Ok::<(), mamba2::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct LoadMonitor {
    callback: Option<ProgressFn>,
    cancel: Option<CancelToken>,
}

impl std::fmt::Debug for LoadMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadMonitor")
            .field("callback", &self.callback.is_some())
            .field("cancel", &self.cancel)
            .finish()
    }
}

impl LoadMonitor {
    /// No callback, no token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reports progress to `f`.
    pub fn with_progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        self.callback = Some(Arc::new(f));
        self
    }

    /// Stops the download or load with [`Error::Cancelled`] once `cancel` is cancelled.
    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// Whether a callback or a token is set.
    pub fn is_active(&self) -> bool {
        self.callback.is_some() || self.cancel.is_some()
    }

    /// Whether a progress callback is set.
    pub fn has_progress(&self) -> bool {
        self.callback.is_some()
    }

    /// [`Error::Cancelled`] if the token was cancelled.
    pub fn check(&self) -> Result<()> {
        match &self.cancel {
            Some(c) if c.is_cancelled() => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }

    /// Sends a report to the callback.
    pub fn report(&self, p: Progress) {
        if let Some(f) = &self.callback {
            f(&p);
        }
    }
}
