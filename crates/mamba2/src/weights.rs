//! Checkpoint tensors: memory-mapped safetensors (one file or shards listed by
//! `model.safetensors.index.json`) or `pytorch_model.bin` (Candle's pickle reader), looked up by
//! canonical HF-transformers names whatever layout the checkpoint uses.
//!
//! Every tensor is checked for its exact shape and a float dtype before it is converted, so a
//! checkpoint that does not match its config fails with an error naming the tensor, not with a
//! wrong answer later.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::error::{Error, Result};

mod files;
mod finite;
mod pages;
pub use files::{find_weight_file, ShardIndex, WEIGHT_FILE_CANDIDATES};
use finite::all_finite;
pub(crate) use pages::in_huge_pages;
use pages::{cpu_tensor_from_bytes, release_pages};

/// On-disk format of a weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// safetensors, memory-mapped.
    Safetensors,
    /// A PyTorch zip checkpoint (`torch.save`), read with Candle's pickle reader.
    Pickle,
}

/// One opened weight file.
enum Source {
    Safetensors {
        path: PathBuf,
        mmap: Mmap,
        /// Byte offset of the data section (8-byte length + header).
        data_start: usize,
        metadata: safetensors::tensor::Metadata,
    },
    Pickle {
        path: PathBuf,
        pth: candle_core::pickle::PthTensors,
    },
}

impl Source {
    fn path(&self) -> &Path {
        match self {
            Source::Safetensors { path, .. } | Source::Pickle { path, .. } => path,
        }
    }
}

/// Where a tensor lives and what the file says about it.
#[derive(Debug, Clone)]
struct Entry {
    source: usize,
    stored_name: String,
    /// `Ok` for dtypes Candle can hold; `Err(name)` otherwise (reported if the tensor is asked for).
    dtype: std::result::Result<DType, String>,
    shape: Vec<usize>,
}

/// The tensors of a checkpoint, loaded lazily and converted on request.
///
/// Canonical names are the HF-transformers ones: `backbone.embeddings.weight`,
/// `backbone.layers.{i}.norm.weight`, `backbone.layers.{i}.mixer.{in_proj.weight, in_proj.bias,
/// conv1d.weight, conv1d.bias, dt_bias, A_log, D, norm.weight, out_proj.weight, out_proj.bias}`,
/// `backbone.norm_f.weight`, `lm_head.weight`. mamba_ssm's `backbone.embedding.weight` and
/// checkpoints saved without the `backbone.` prefix are mapped transparently.
///
/// ```no_run
/// use candle_core::{DType, Device};
/// use mamba2::weights::Weights;
/// let w = Weights::from_dir(std::path::Path::new("mamba2-130m"), &Device::Cpu)?;
/// // The embedding may have more rows than the config's vocab_size (padding).
/// let shape = w.shape("backbone.embeddings.weight").expect("embedding");
/// let emb = w.tensor("backbone.embeddings.weight", &shape, DType::F32)?;
/// let tied = !w.contains("lm_head.weight");
/// # Ok::<(), mamba2::Error>(())
/// ```
pub struct Weights {
    sources: Vec<Source>,
    /// Canonical name -> entry.
    entries: HashMap<String, Entry>,
    device: Device,
    check_finite: bool,
    huge_pages: bool,
    /// Progress reports and cancellation while tensors are read.
    monitor: crate::progress::LoadMonitor,
    /// Tensors and stored bytes read so far, for the reports.
    loaded: std::sync::Mutex<(usize, u64)>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("files", &self.files())
            .field("tensors", &self.entries.len())
            .field("device", &self.device)
            .finish()
    }
}

impl Weights {
    /// Opens one or more `.safetensors` files (memory-mapped) and/or PyTorch zip checkpoints
    /// (`pytorch_model.bin`). An `*.index.json` shard index is expanded into its shards, which
    /// are checked against it. Tensors are created on `device` when asked for.
    pub fn from_files(paths: &[PathBuf], device: &Device) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::InvalidInput("no weight files given".into()));
        }
        let mut files = Vec::new();
        let mut indexes = Vec::new();
        for p in paths {
            if p.extension().is_some_and(|e| e == "json") {
                let index = ShardIndex::read(p)?;
                files.extend(index.shard_paths()?);
                indexes.push(index);
            } else {
                files.push(p.clone());
            }
        }
        files.dedup();
        let weights = Self::open(&files, device)?;
        for index in &indexes {
            weights.check_index(index)?;
        }
        Ok(weights)
    }

    /// Opens the weights of a checkpoint folder: the first of [`WEIGHT_FILE_CANDIDATES`] present
    /// (`model.safetensors.index.json` shards, `model.safetensors`,
    /// `pytorch_model.bin.index.json` shards, `pytorch_model.bin`).
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let name = find_weight_file(dir)?;
        Self::from_files(&[dir.join(name)], device)
    }

    /// Also check every tensor returned by [`Weights::tensor`] for NaN/infinity
    /// ([`Error::NonFinite`]); off by default (it reads each tensor once more).
    pub fn with_finite_check(mut self, on: bool) -> Self {
        self.check_finite = on;
        self
    }

    /// Whether large CPU tensors go into memory advised for transparent huge pages
    /// (`madvise(MADV_HUGEPAGE)`, Linux; on by default, a no-op elsewhere). Decode streams every
    /// weight once per token, and 4 KiB pages cost it a TLB miss per page and a
    /// hardware-prefetch stop at each page boundary. `false` keeps ordinary pages (for A/B
    /// comparisons, `scripts/bench_hugepages.sh`).
    ///
    /// ```no_run
    /// # use mamba2::weights::Weights;
    /// let w = Weights::from_dir("mamba2-130m".as_ref(), &candle_core::Device::Cpu)?
    ///     .with_huge_pages(false);
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn with_huge_pages(mut self, on: bool) -> Self {
        self.huge_pages = on;
        self
    }

    /// Reports every tensor read to `monitor`'s callback ([`crate::progress::Progress::Load`])
    /// and checks its token before each ([`Error::Cancelled`]).
    pub fn with_monitor(mut self, monitor: crate::progress::LoadMonitor) -> Self {
        self.monitor = monitor;
        self
    }

    /// Stored bytes of every tensor of a Candle dtype (what a full load reads).
    fn stored_bytes(&self) -> u64 {
        self.entries
            .values()
            .filter_map(|e| {
                let dt = e.dtype.as_ref().ok()?;
                Some((e.shape.iter().product::<usize>() * dt.size_in_bytes()) as u64)
            })
            .sum()
    }

    /// The device tensors are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weight files, in load order.
    pub fn files(&self) -> Vec<&Path> {
        self.sources.iter().map(Source::path).collect()
    }

    /// Format of the (first) weight file.
    pub fn format(&self) -> WeightFormat {
        match self.sources.first() {
            Some(Source::Pickle { .. }) => WeightFormat::Pickle,
            _ => WeightFormat::Safetensors,
        }
    }

    /// Stored shape of a tensor, by canonical name.
    pub fn shape(&self, canonical: &str) -> Option<Vec<usize>> {
        self.entries.get(canonical).map(|e| e.shape.clone())
    }

    /// Stored dtype of a tensor, by canonical name (`None` if absent or not a Candle dtype).
    pub fn stored_dtype(&self, canonical: &str) -> Option<DType> {
        self.entries
            .get(canonical)
            .and_then(|e| e.dtype.clone().ok())
    }

    /// Whether the checkpoint holds this tensor (false for an absent, tied `lm_head.weight`).
    pub fn contains(&self, canonical: &str) -> bool {
        self.entries.contains_key(canonical)
    }

    /// Canonical names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.entries.keys().cloned().collect();
        names.sort();
        names
    }

    /// Loads a tensor by canonical name, checking that it has exactly `shape` and a float dtype
    /// (f16, bf16, f32, f64), converted to `dtype` on this `Weights`' device.
    pub fn tensor(&self, canonical: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.monitor.check()?;
        let t = self.read_tensor(canonical, shape, dtype)?;
        if self.monitor.has_progress() {
            let stored = self
                .entries
                .get(canonical)
                .and_then(|e| e.dtype.as_ref().ok())
                .map_or(0, |dt| {
                    (shape.iter().product::<usize>() * dt.size_in_bytes()) as u64
                });
            let (tensors, bytes) = {
                let mut l = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
                l.0 += 1;
                l.1 += stored;
                *l
            };
            self.monitor.report(crate::progress::Progress::Load {
                tensor: canonical.to_string(),
                tensors,
                total_tensors: self.entries.len(),
                bytes,
                total_bytes: self.stored_bytes(),
            });
        }
        Ok(t)
    }

    fn read_tensor(&self, canonical: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let entry = self
            .entries
            .get(canonical)
            .ok_or_else(|| Error::MissingTensor {
                name: canonical.to_string(),
                source_desc: self.describe_files(),
            })?;
        if entry.shape != shape {
            return Err(Error::TensorShape {
                name: entry.stored_name.clone(),
                expected: shape.to_vec(),
                got: entry.shape.clone(),
            });
        }
        let stored = match &entry.dtype {
            Ok(dt @ (DType::F16 | DType::BF16 | DType::F32 | DType::F64)) => *dt,
            Ok(other) => return Err(dtype_error(&entry.stored_name, format!("{other:?}"))),
            Err(name) => return Err(dtype_error(&entry.stored_name, name.clone())),
        };
        let source = &self.sources[entry.source];
        let load_err = |message: String| Error::WeightFile {
            path: source.path().to_path_buf(),
            message: format!("tensor `{}`: {message}", entry.stored_name),
        };
        // Metal has no f64: widen/narrow on the CPU first in that case.
        let on_cpu_first = self.device.is_cpu() || stored == DType::F64;
        let raw = match source {
            Source::Safetensors {
                mmap,
                data_start,
                metadata,
                ..
            } => {
                let info = metadata
                    .info(&entry.stored_name)
                    .expect("entry comes from this metadata");
                let (start, end) = info.data_offsets;
                // Offsets were validated against the file length when it was opened.
                let (lo, hi) = (data_start + start, data_start + end);
                let t = if self.device.is_cpu() {
                    // Already in huge-page-advised memory where that applies.
                    cpu_tensor_from_bytes(&mmap[lo..hi], stored, shape, self.huge_pages)
                } else {
                    let dev = if on_cpu_first {
                        &Device::Cpu
                    } else {
                        &self.device
                    };
                    Tensor::from_raw_buffer(&mmap[lo..hi], stored, shape, dev)
                }
                .map_err(|e| load_err(e.to_string()))?;
                release_pages(mmap, lo, hi);
                t
            }
            Source::Pickle { pth, path } => {
                // The pickle's size, stride and offset fields are not checked by the reader, which
                // allocates the whole tensor before reading: a record claiming 2^40 elements
                // aborts the process on allocation. Its bytes must fit in the file (torch.save
                // stores tensor data uncompressed).
                let file_len = std::fs::metadata(path)
                    .map_err(|e| Error::io(path, e))?
                    .len();
                let info = pth
                    .tensor_infos()
                    .get(&entry.stored_name)
                    .expect("entry comes from these infos");
                let layout = &info.layout;
                let elem = info.dtype.size_in_bytes();
                let extent = layout
                    .dims()
                    .iter()
                    .zip(layout.stride())
                    .try_fold(0usize, |acc, (&d, &s)| {
                        acc.checked_add(d.checked_sub(1)?.checked_mul(s)?)
                    })
                    .and_then(|last| last.checked_add(1)?.checked_mul(elem))
                    .and_then(|bytes| bytes.checked_add(layout.start_offset()));
                let empty = layout.dims().contains(&0);
                if !empty && extent.is_none_or(|bytes| bytes as u64 > file_len) {
                    return Err(load_err(format!(
                        "its record (shape {:?}, strides {:?}, byte offset {}) needs more bytes \
                         than the whole file has ({file_len})",
                        layout.dims(),
                        layout.stride(),
                        layout.start_offset()
                    )));
                }
                let got = catch_panic(|| pth.get(&entry.stored_name)).map_err(load_err)?;
                got.map_err(|e| load_err(e.to_string()))?
                    .ok_or_else(|| load_err("listed but not readable".into()))?
            }
        };
        // A safetensors tensor loaded in its stored dtype on the CPU is already in place.
        let in_place =
            self.device.is_cpu() && dtype == stored && matches!(source, Source::Safetensors { .. });
        let t = raw
            .to_dtype(dtype)
            .and_then(|t| t.to_device(&self.device))
            .and_then(|t| {
                if in_place || !self.huge_pages {
                    Ok(t)
                } else {
                    in_huge_pages(t)
                }
            })
            .map_err(|e| load_err(e.to_string()))?;
        if self.check_finite && t.dtype().is_float() {
            // In the load dtype, after the conversion: an f32 weight past f16's range becomes
            // inf there and is caught too.
            if !all_finite(&t)? {
                return Err(Error::NonFinite {
                    name: entry.stored_name.clone(),
                });
            }
        }
        Ok(t)
    }

    fn describe_files(&self) -> String {
        let files: Vec<String> = self
            .sources
            .iter()
            .map(|s| s.path().display().to_string())
            .collect();
        match files.as_slice() {
            [one] => one.clone(),
            many => format!("{} shards ({})", many.len(), many.join(", ")),
        }
    }

    fn open(files: &[PathBuf], device: &Device) -> Result<Self> {
        let mut sources = Vec::with_capacity(files.len());
        // Stored name -> entry, to detect a tensor present in two files.
        let mut stored: BTreeMap<String, Entry> = BTreeMap::new();
        for (i, path) in files.iter().enumerate() {
            let source = open_source(path)?;
            for (name, dtype, shape) in source_tensors(&source) {
                let entry = Entry {
                    source: i,
                    stored_name: name.clone(),
                    dtype,
                    shape,
                };
                if let Some(prev) = stored.insert(name.clone(), entry) {
                    return Err(Error::WeightFile {
                        path: path.clone(),
                        message: format!(
                            "tensor `{name}` is also in {}",
                            sources
                                .get(prev.source)
                                .map(|s: &Source| s.path().display().to_string())
                                .unwrap_or_default()
                        ),
                    });
                }
            }
            sources.push(source);
        }
        // An exactly canonical stored name wins over an alias mapping to the same canonical name.
        let mut entries = HashMap::with_capacity(stored.len());
        for (name, entry) in stored {
            let canonical = canonical_name(&name);
            let exact = canonical == name;
            match entries.get(&canonical) {
                Some(Entry { stored_name, .. }) if !exact && *stored_name == canonical => {}
                _ => {
                    entries.insert(canonical, entry);
                }
            }
        }
        Ok(Weights {
            sources,
            entries,
            device: device.clone(),
            check_finite: false,
            huge_pages: true,
            monitor: Default::default(),
            loaded: Default::default(),
        })
    }

    /// Every tensor the index assigns to a shard must be in that shard.
    fn check_index(&self, index: &ShardIndex) -> Result<()> {
        let mut held: HashMap<&Path, std::collections::HashSet<String>> = HashMap::new();
        for source in &self.sources {
            held.insert(
                source.path(),
                source_tensors(source)
                    .into_iter()
                    .map(|(n, _, _)| n)
                    .collect(),
            );
        }
        for (tensor, shard) in &index.weight_map {
            let shard_path = index.dir.join(shard);
            if !held
                .get(shard_path.as_path())
                .is_some_and(|names| names.contains(tensor))
            {
                return Err(Error::WeightFile {
                    path: shard_path,
                    message: format!(
                        "{} lists tensor `{tensor}` in this shard, but it is not there",
                        index.path.display()
                    ),
                });
            }
        }
        Ok(())
    }
}

fn dtype_error(name: &str, got: String) -> Error {
    Error::TensorDtype {
        name: name.to_string(),
        expected: "a float type (f16, bf16, f32, f64)".into(),
        got,
    }
}

/// Runs `f`, turning a panic inside a third-party parser into an error message.
fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        format!("malformed file (reader panicked: {msg})")
    })
}

/// The canonical (HF-transformers) name of a stored tensor name.
fn canonical_name(stored: &str) -> String {
    let with_prefix = if ["embeddings.", "embedding.", "layers.", "norm_f."]
        .iter()
        .any(|p| stored.starts_with(p))
    {
        format!("backbone.{stored}")
    } else {
        stored.to_string()
    };
    match with_prefix.strip_prefix("backbone.embedding.") {
        Some(rest) => format!("backbone.embeddings.{rest}"),
        None => with_prefix,
    }
}

fn open_source(path: &Path) -> Result<Source> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |message: String| Error::WeightFile {
        path: path.to_path_buf(),
        message,
    };
    let mut magic = [0u8; 4];
    let n = std::io::Read::read(&mut &file, &mut magic).map_err(|e| Error::io(path, e))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let is_zip = n == 4 && magic == *b"PK\x03\x04";
    if is_zip || matches!(ext, "bin" | "pt" | "pth") {
        if !is_zip {
            return Err(bad(
                "not a PyTorch zip checkpoint (the legacy torch.save format and truncated or \
                 non-checkpoint files are not supported)"
                    .into(),
            ));
        }
        // Candle's reader trusts declared lengths and deep-copies memo references: bound both first.
        crate::pickle_guard::check_checkpoint(path).map_err(&bad)?;
        let mut pth = catch_panic(|| candle_core::pickle::PthTensors::new(path, None))
            .map_err(&bad)?
            .map_err(|e| bad(format!("cannot read PyTorch checkpoint: {e}")))?;
        // Some checkpoints wrap the state dict: {"state_dict": {...}} or {"model": {...}}.
        for key in ["state_dict", "model"] {
            if !pth.tensor_infos().is_empty() {
                break;
            }
            if let Ok(Ok(p)) = catch_panic(|| candle_core::pickle::PthTensors::new(path, Some(key)))
            {
                pth = p;
            }
        }
        // The reader only records torch tensor-rebuild calls and never runs a call, so a pickle
        // made of other calls (os.system, eval, ...) yields nothing: say so rather than load an
        // empty checkpoint.
        if pth.tensor_infos().is_empty() {
            return Err(bad(
                "no tensors found: the pickle holds no torch tensor records (other objects and \
                 calls in it are never executed)"
                    .into(),
            ));
        }
        return Ok(Source::Pickle {
            path: path.to_path_buf(),
            pth,
        });
    }
    // SAFETY: the map is read-only; a file truncated by another process while mapped would fault,
    // which is the usual contract of memory-mapped checkpoints (safetensors, candle, llama.cpp).
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        use safetensors::SafeTensorError as E;
        bad(match e {
            E::HeaderTooSmall => "shorter than the 8-byte safetensors header length (empty or truncated)".into(),
            E::InvalidHeaderLength => "safetensors header length exceeds the file size (truncated?)".into(),
            E::MetadataIncompleteBuffer => {
                "file size does not match the tensors in its safetensors header (truncated or padded?)".into()
            }
            e => format!("invalid safetensors file: {e}"),
        })
    })?;
    Ok(Source::Safetensors {
        path: path.to_path_buf(),
        mmap,
        data_start: 8 + header_len,
        metadata,
    })
}

/// (stored name, dtype, shape) of every tensor of a source.
#[allow(clippy::type_complexity)]
fn source_tensors(
    source: &Source,
) -> Vec<(String, std::result::Result<DType, String>, Vec<usize>)> {
    match source {
        Source::Safetensors { metadata, .. } => metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, st_dtype(info.dtype), info.shape.clone()))
            .collect(),
        Source::Pickle { pth, .. } => pth
            .tensor_infos()
            .iter()
            .map(|(name, info)| (name.clone(), Ok(info.dtype), info.layout.dims().to_vec()))
            .collect(),
    }
}

fn st_dtype(dtype: safetensors::Dtype) -> std::result::Result<DType, String> {
    use safetensors::Dtype as S;
    Ok(match dtype {
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I16 => DType::I16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        other => return Err(format!("{other:?}")),
    })
}
