//! The MSL-harness executor of the Metal dispatch plans (`mamba2_ops::metal_plan`): each plan
//! runs on the CPU from the `.metal` source it names, with the plan's buffers, offsets,
//! parameter bytes and grid. Shared by the harness tests of `mamba2-ops` and the whole-model
//! emulation of the root package (`tests/metal_emulated.rs`).
//!
//! Tensors are CPU tensors. A plan buffer binds its tensor's storage from the plan's byte
//! offset to the end of the storage (as Metal sees a buffer at an offset); written bytes come
//! back into the storage after the dispatch, only those the kernel changed (two plan buffers
//! may share one storage). Outputs are poisoned with NaN so unwritten elements fail.
#![allow(dead_code)]

use candle_core::{CpuStorage, DType, Device, Layout, Shape, Storage, Tensor};
use mamba2_ops::metal_plan::{Access, DispatchPlan, PlanExecutor};
use msl_harness::{FaultKind, Library, Mode};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// One launch as the executor ran it, for tests that count or inspect dispatches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    pub function: String,
    pub groups: [usize; 3],
    pub threads: [usize; 3],
    /// `(byte offset, access)` per buffer index.
    pub buffers: Vec<(usize, Access)>,
    pub params_len: usize,
}

/// Runs plans through `msl_harness` in one [`Mode`].
pub struct HarnessExecutor {
    mode: Mode,
    /// What `pipeline` reports as the most threads per threadgroup (Metal's limit depends on
    /// the pipeline's register use; tests lower it to reach the plans' smaller threadgroups).
    max_threads: usize,
    /// Every launch run so far.
    ran: Mutex<Vec<Ran>>,
    /// The fault kind of the last failed dispatch.
    last_fault: Mutex<Option<FaultKind>>,
}

impl HarnessExecutor {
    pub fn new(mode: Mode) -> HarnessExecutor {
        HarnessExecutor {
            mode,
            max_threads: 1024,
            ran: Mutex::new(Vec::new()),
            last_fault: Mutex::new(None),
        }
    }

    /// Reports at most `n` threads per threadgroup for every pipeline.
    pub fn max_threads(mut self, n: usize) -> HarnessExecutor {
        self.max_threads = n;
        self
    }

    /// The launches run since the last call.
    pub fn take_ran(&self) -> Vec<Ran> {
        std::mem::take(&mut *self.ran.lock().unwrap())
    }

    pub fn last_fault(&self) -> Option<FaultKind> {
        *self.last_fault.lock().unwrap()
    }
}

/// The compiled `.metal` file of `mamba2_kernels::metal` (compiled once per test process).
pub fn metal_library(file: &str) -> &'static Library {
    static LIBS: OnceLock<Mutex<HashMap<String, &'static Library>>> = OnceLock::new();
    let mut libs = LIBS.get_or_init(Default::default).lock().unwrap();
    libs.entry(file.to_string()).or_insert_with(|| {
        // The embedded source the shipped Metal executor compiles, not a file of the tree.
        let source = mamba2_kernels::metal::source(file)
            .unwrap_or_else(|| panic!("{file} is not a mamba2-kernels Metal source"));
        Box::leak(Box::new(
            Library::from_source(file, source).unwrap_or_else(|e| panic!("{file}: {e}")),
        ))
    })
}

fn bytes_of<T>(v: &[T]) -> &[u8] {
    // SAFETY: plain numeric element types; any byte view of them is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn bytes_of_mut<T>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; every byte pattern is a valid element of these types.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn storage_bytes(s: &CpuStorage) -> &[u8] {
    match s {
        CpuStorage::U8(v) => v,
        CpuStorage::U32(v) => bytes_of(v),
        CpuStorage::I64(v) => bytes_of(v),
        CpuStorage::BF16(v) => bytes_of(v),
        CpuStorage::F16(v) => bytes_of(v),
        CpuStorage::F32(v) => bytes_of(v),
        _ => panic!("harness executor: unsupported storage dtype"),
    }
}

fn storage_bytes_mut(s: &mut CpuStorage) -> &mut [u8] {
    match s {
        CpuStorage::U8(v) => v,
        CpuStorage::U32(v) => bytes_of_mut(v),
        CpuStorage::I64(v) => bytes_of_mut(v),
        CpuStorage::BF16(v) => bytes_of_mut(v),
        CpuStorage::F16(v) => bytes_of_mut(v),
        CpuStorage::F32(v) => bytes_of_mut(v),
        _ => panic!("harness executor: unsupported storage dtype"),
    }
}

/// The bytes of a tensor's storage from `offset` on.
fn read_storage(t: &Tensor, offset: usize) -> Vec<u8> {
    let (s, _) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => storage_bytes(c)[offset..].to_vec(),
        _ => panic!("harness executor: a plan buffer is not on the CPU"),
    }
}

/// Copies the bytes a kernel changed back into the storage.
struct WriteBack<'a> {
    offset: usize,
    before: &'a [u8],
    after: &'a [u8],
}

impl candle_core::InplaceOp1 for WriteBack<'_> {
    fn name(&self) -> &'static str {
        "harness-write-back"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        let dst = &mut storage_bytes_mut(s)[self.offset..];
        for (i, (&b, &a)) in self.before.iter().zip(self.after).enumerate() {
            if a != b {
                dst[i] = a;
            }
        }
        Ok(())
    }
}

fn op_err(e: impl std::fmt::Display) -> mamba2_ops::OpError {
    candle_core::Error::msg(e.to_string()).into()
}

impl PlanExecutor for HarnessExecutor {
    fn pipeline(&self, library: &'static str, function: &str) -> mamba2_ops::Result<Option<usize>> {
        let lib = metal_library(library);
        Ok(lib
            .kernel_names()
            .contains(&function)
            .then_some(self.max_threads))
    }

    fn output(&self, shape: &Shape, dtype: DType, _label: &str) -> mamba2_ops::Result<Tensor> {
        let t = Tensor::full(f32::NAN, shape.clone(), &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?)
    }

    fn run(&self, plan: DispatchPlan) -> mamba2_ops::Result<()> {
        let lib = metal_library(plan.library);
        let before: Vec<Vec<u8>> = plan
            .buffers
            .iter()
            .map(|b| read_storage(&b.tensor, b.offset))
            .collect();
        let mut after = before.clone();
        let u32s = |v: [usize; 3]| v.map(|x| u32::try_from(x).expect("grid within u32"));
        let result = {
            let mut k = lib.kernel(&plan.function).map_err(op_err)?;
            for (i, (b, bytes)) in plan.buffers.iter().zip(after.iter_mut()).enumerate() {
                match b.access {
                    Access::Read => k.raw_bytes(i, bytes),
                    Access::Write => k.buffer(i, bytes.as_mut_slice()),
                };
            }
            k.raw_bytes(plan.params_index(), &plan.params);
            for (i, &len) in plan.threadgroup_memory.iter().enumerate() {
                k.threadgroup_memory(i, len);
            }
            k.grid(u32s(plan.groups))
                .threadgroup(u32s(plan.threads))
                .mode(self.mode)
                .dispatch()
        };
        *self.last_fault.lock().unwrap() = result.as_ref().err().and_then(|e| e.fault_kind());
        result.map_err(op_err)?;
        for ((b, before), after) in plan.buffers.iter().zip(&before).zip(&after) {
            if b.access == Access::Write && before != after {
                b.tensor.inplace_op1(&WriteBack {
                    offset: b.offset,
                    before,
                    after,
                })?;
            }
        }
        self.ran.lock().unwrap().push(Ran {
            function: plan.function.clone(),
            groups: plan.groups,
            threads: plan.threads,
            buffers: plan.buffers.iter().map(|b| (b.offset, b.access)).collect(),
            params_len: plan.params.len(),
        });
        Ok(())
    }
}

/// Runs the plans of a [`HarnessExecutor`] with each parameter block cut short by 4 bytes (one
/// field): the harness must report a binding fault, which proves the kernel reads exactly the
/// bytes of the Rust struct.
pub struct ShortParams(pub HarnessExecutor);

impl PlanExecutor for ShortParams {
    fn pipeline(&self, library: &'static str, function: &str) -> mamba2_ops::Result<Option<usize>> {
        self.0.pipeline(library, function)
    }

    fn output(&self, shape: &Shape, dtype: DType, label: &str) -> mamba2_ops::Result<Tensor> {
        self.0.output(shape, dtype, label)
    }

    fn run(&self, mut plan: DispatchPlan) -> mamba2_ops::Result<()> {
        plan.params.truncate(plan.params.len() - 4);
        self.0.run(plan)
    }
}
