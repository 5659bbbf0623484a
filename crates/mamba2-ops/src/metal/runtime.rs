//! [`MetalExecutor`]: the kernel libraries (compiled once per device from the embedded
//! sources of `mamba2_kernels::metal`), a pipeline cache keyed by function name, output
//! allocation, and one [`DispatchPlan`] encoded as one dispatch on Candle's command encoder of
//! the device (so our kernels are ordered with Candle's own, with the encoder's hazard tracking
//! seeing which buffers we read and write).

use crate::metal_plan::{Access, DispatchPlan, PlanExecutor};
use crate::Result;
use candle_core::op::BackpropOp;
use candle_core::{DType, MetalDevice, MetalStorage, Shape, Storage, Tensor};
use candle_metal_kernels::metal::{ComputePipeline, Library};
use objc2_metal::MTLSize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Libraries and pipelines of one device. A library is compiled on the first use of one of its
/// kernels; a missing function (the bf16 variants on a compiler older than MSL 3.1) is
/// remembered as `None`, and the op then falls back to the reference.
#[derive(Default)]
struct DeviceKernels {
    libraries: HashMap<&'static str, Library>,
    pipelines: HashMap<String, Option<ComputePipeline>>,
}

fn device_kernels(device: &MetalDevice) -> Arc<Mutex<DeviceKernels>> {
    static ALL: OnceLock<
        Mutex<HashMap<candle_core::metal_backend::DeviceId, Arc<Mutex<DeviceKernels>>>>,
    > = OnceLock::new();
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    all.entry(device.id()).or_default().clone()
}

/// Runs plans on one Metal device.
pub(crate) struct MetalExecutor {
    device: MetalDevice,
    kernels: Arc<Mutex<DeviceKernels>>,
}

impl MetalExecutor {
    pub(crate) fn new(device: &MetalDevice) -> MetalExecutor {
        MetalExecutor {
            device: device.clone(),
            kernels: device_kernels(device),
        }
    }

    /// The pipeline of `name` in `library`, compiling the library on first use; `None` when it
    /// has no such function.
    fn compiled(&self, library: &'static str, name: &str) -> Result<Option<ComputePipeline>> {
        if !crate::metal_support::of_device(&self.device).has_kernel(name) {
            return Ok(None);
        }
        let mut k = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = k.pipelines.get(name) {
            return Ok(p.clone());
        }
        if !k.libraries.contains_key(library) {
            let text = mamba2_kernels::metal::source(library)
                .ok_or_else(|| candle_core::Error::msg(format!("no kernel library {library}")))?;
            let lib = crate::metal_support::new_library(&self.device, text)
                .map_err(|e| candle_core::Error::msg(format!("compiling {library}: {e}")))?;
            k.libraries.insert(library, lib);
        }
        let pipe = match k.libraries[library].get_function(name, None) {
            Ok(f) => Some(
                self.device
                    .metal_device()
                    .new_compute_pipeline_state_with_function(&f)
                    .map_err(|e| candle_core::Error::msg(format!("pipeline {name}: {e}")))?,
            ),
            Err(_) => None,
        };
        k.pipelines.insert(name.to_string(), pipe.clone());
        Ok(pipe)
    }
}

impl PlanExecutor for MetalExecutor {
    /// Threads per threadgroup the pipeline allows (it depends on register use and can be
    /// below 1024), rounded down to whole simdgroups.
    fn pipeline(&self, library: &'static str, function: &str) -> Result<Option<usize>> {
        Ok(self
            .compiled(library, function)?
            .map(|p| (p.max_total_threads_per_threadgroup() / 32 * 32).max(32)))
    }

    /// Uninitialised: the kernels write all of it.
    fn output(&self, shape: &Shape, dtype: DType, label: &str) -> Result<Tensor> {
        let count = shape.elem_count();
        let buffer = self.device.new_buffer(count, dtype, label)?;
        let storage = MetalStorage::new(buffer, self.device.clone(), count, dtype);
        Ok(Tensor::from_storage(
            Storage::Metal(storage),
            shape.clone(),
            BackpropOp::none(),
            false,
        ))
    }

    fn run(&self, plan: DispatchPlan) -> Result<()> {
        let pipe = self
            .compiled(plan.library, &plan.function)?
            .ok_or_else(|| candle_core::Error::msg(format!("no pipeline {}", plan.function)))?;
        // Each buffer's storage is locked only while its MTLBuffer is taken: two plan buffers
        // may share one storage (e.g. slices of the in-projection output).
        let mut buffers = Vec::with_capacity(plan.buffers.len());
        for b in &plan.buffers {
            let (storage, _) = b.tensor.storage_and_layout();
            match &*storage {
                Storage::Metal(s) => buffers.push((s.clone(), b.offset, b.access)),
                _ => {
                    return Err(candle_core::Error::msg(format!(
                        "{}: a buffer is not on a Metal device",
                        plan.function
                    ))
                    .into())
                }
            }
        }
        let encoder = self.device.command_encoder()?;
        encoder.set_label(&plan.function);
        let enc: &candle_metal_kernels::metal::ComputeCommandEncoder = encoder.as_ref();
        enc.set_compute_pipeline_state(&pipe);
        for (i, (s, offset, access)) in buffers.iter().enumerate() {
            match access {
                Access::Read => enc.set_input_buffer(i, Some(s.buffer()), *offset),
                Access::Write => enc.set_output_buffer(i, Some(s.buffer()), *offset),
            }
        }
        enc.set_bytes_directly(
            plan.params_index(),
            plan.params.len(),
            plan.params.as_ptr().cast(),
        );
        for (i, &len) in plan.threadgroup_memory.iter().enumerate() {
            enc.set_threadgroup_memory_length(i, len);
        }
        let size = |v: [usize; 3]| MTLSize {
            width: v[0],
            height: v[1],
            depth: v[2],
        };
        enc.dispatch_thread_groups(size(plan.groups), size(plan.threads));
        Ok(())
    }
}
