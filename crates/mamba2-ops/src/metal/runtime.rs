//! Metal plumbing shared by the fast paths: the kernel libraries (compiled once per device from
//! the embedded `kernels/metal/*.metal` sources), a pipeline cache keyed by kernel name, tensor
//! buffers and byte offsets, output allocation, and one-dispatch encoding on Candle's command
//! encoder of the tensor's `MetalDevice` (so our kernels are ordered with Candle's own, with
//! the encoder's hazard tracking seeing which buffers we read and write).

use crate::metal_params::KernelParams;
use crate::Result;
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, MetalDevice, MetalStorage, Shape, Storage, Tensor};
use candle_metal_kernels::metal::{ComputePipeline, Library};
use objc2_metal::MTLSize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// One `.metal` file: its name and its source, embedded at build time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct KernelSource {
    pub name: &'static str,
    pub text: &'static str,
}

pub(crate) const CONV1D: KernelSource = KernelSource {
    name: "conv1d.metal",
    text: include_str!("../../../../kernels/metal/conv1d.metal"),
};
pub(crate) const SSD: KernelSource = KernelSource {
    name: "ssd.metal",
    text: include_str!("../../../../kernels/metal/ssd.metal"),
};
pub(crate) const STATE_UPDATE: KernelSource = KernelSource {
    name: "state_update.metal",
    text: include_str!("../../../../kernels/metal/state_update.metal"),
};
pub(crate) const RMS_NORM: KernelSource = KernelSource {
    name: "rms_norm.metal",
    text: include_str!("../../../../kernels/metal/rms_norm.metal"),
};
pub(crate) const DECODE_STEP: KernelSource = KernelSource {
    name: "decode_step.metal",
    text: include_str!("../../../../kernels/metal/decode_step.metal"),
};
pub(crate) const ATTENTION: KernelSource = KernelSource {
    name: "attention.metal",
    text: include_str!("../../../../kernels/metal/attention.metal"),
};
pub(crate) const ROTARY: KernelSource = KernelSource {
    name: "rotary.metal",
    text: include_str!("../../../../kernels/metal/rotary.metal"),
};
pub(crate) const ACTIVATION: KernelSource = KernelSource {
    name: "activation.metal",
    text: include_str!("../../../../kernels/metal/activation.metal"),
};

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

/// The pipeline of kernel `name` of `source`, or `None` when the library has no such function.
pub(crate) fn pipeline(
    device: &MetalDevice,
    source: KernelSource,
    name: &str,
) -> Result<Option<ComputePipeline>> {
    let kernels = device_kernels(device);
    let mut k = kernels.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = k.pipelines.get(name) {
        return Ok(p.clone());
    }
    if !k.libraries.contains_key(source.name) {
        let lib = device
            .metal_device()
            .new_library_with_source(source.text, None)
            .map_err(|e| candle_core::Error::msg(format!("compiling {}: {e}", source.name)))?;
        k.libraries.insert(source.name, lib);
    }
    let pipe = match k.libraries[source.name].get_function(name, None) {
        Ok(f) => Some(
            device
                .metal_device()
                .new_compute_pipeline_state_with_function(&f)
                .map_err(|e| candle_core::Error::msg(format!("pipeline {name}: {e}")))?,
        ),
        Err(_) => None,
    };
    k.pipelines.insert(name.to_string(), pipe.clone());
    Ok(pipe)
}

/// `<op>_<variant>_<dtype>` suffix of an activation dtype, `None` for dtypes without kernels.
pub(crate) fn dtype_suffix(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("f32"),
        DType::F16 => Some("f16"),
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}

/// The Metal device of a tensor, if it is on one.
pub(crate) fn metal_device(t: &Tensor) -> Option<MetalDevice> {
    match t.device() {
        Device::Metal(d) => Some(d.clone()),
        _ => None,
    }
}

/// A kernel argument: the storage (holding its buffer alive) and the byte offset of the
/// tensor's first element. Taken from a contiguous tensor; the storage lock is released at once
/// (two arguments may share one storage, e.g. slices of the in-projection output).
pub(crate) struct Arg {
    storage: MetalStorage,
    offset: usize,
}

impl Arg {
    /// `t` must be contiguous (callers make it so, or check it for in-place tensors).
    pub(crate) fn of(t: &Tensor) -> Result<Arg> {
        let (storage, layout) = t.storage_and_layout();
        if !layout.is_contiguous() {
            return Err(candle_core::Error::msg("metal kernel argument must be contiguous").into());
        }
        let offset = layout.start_offset() * t.dtype().size_in_bytes();
        match &*storage {
            Storage::Metal(s) => Ok(Arg {
                storage: s.clone(),
                offset,
            }),
            _ => Err(
                candle_core::Error::msg("metal kernel argument is not on a Metal device").into(),
            ),
        }
    }

    /// A tensor read in place through its strides (e.g. a view narrowed out of a KV cache): the
    /// argument and the strides in elements, or `None` when the last dimension is not
    /// unit-stride (the kernels read channels contiguously).
    pub(crate) fn strided(t: &Tensor) -> Result<Option<(Arg, Vec<usize>)>> {
        let (storage, layout) = t.storage_and_layout();
        let stride = layout.stride().to_vec();
        if stride.last().is_some_and(|&s| s != 1) {
            return Ok(None);
        }
        let offset = layout.start_offset() * t.dtype().size_in_bytes();
        match &*storage {
            Storage::Metal(s) => Ok(Some((
                Arg {
                    storage: s.clone(),
                    offset,
                },
                stride,
            ))),
            _ => Err(
                candle_core::Error::msg("metal kernel argument is not on a Metal device").into(),
            ),
        }
    }

    /// An optional argument; absent ones are bound to `fallback` (never read: a flag says so).
    pub(crate) fn opt(t: Option<&Tensor>, fallback: &Tensor) -> Result<Arg> {
        Arg::of(t.unwrap_or(fallback))
    }
}

/// A fresh contiguous tensor of `shape` on `device` (uninitialised: the kernel writes it all)
/// and its argument.
pub(crate) fn output(
    device: &MetalDevice,
    shape: impl Into<Shape>,
    dtype: DType,
    label: &str,
) -> Result<(Tensor, Arg)> {
    let shape = shape.into();
    let count = shape.elem_count();
    let buffer = device.new_buffer(count, dtype, label)?;
    let storage = MetalStorage::new(buffer, device.clone(), count, dtype);
    let t = Tensor::from_storage(Storage::Metal(storage), shape, BackpropOp::none(), false);
    let arg = Arg::of(&t)?;
    Ok((t, arg))
}

/// How a buffer is bound: read only, or written (outputs and in-place states), which tells the
/// encoder's hazard tracking to order later readers after this dispatch.
pub(crate) enum Bind<'a> {
    In(&'a Arg),
    Out(&'a Arg),
}

/// Encodes one dispatch of `pipeline` with buffers bound at indices `0..buffers.len()`, the
/// parameter block at the next index, `groups` threadgroups of `threads` threads.
pub(crate) fn dispatch<P: KernelParams>(
    device: &MetalDevice,
    pipeline: &ComputePipeline,
    label: &str,
    buffers: &[Bind],
    params: &P,
    groups: [usize; 3],
    threads: [usize; 3],
) -> Result<()> {
    let encoder = device.command_encoder()?;
    encoder.set_label(label);
    let enc: &candle_metal_kernels::metal::ComputeCommandEncoder = encoder.as_ref();
    enc.set_compute_pipeline_state(pipeline);
    for (i, b) in buffers.iter().enumerate() {
        match b {
            Bind::In(a) => enc.set_input_buffer(i, Some(a.storage.buffer()), a.offset),
            Bind::Out(a) => enc.set_output_buffer(i, Some(a.storage.buffer()), a.offset),
        }
    }
    let bytes = params.as_bytes();
    enc.set_bytes_directly(buffers.len(), bytes.len(), bytes.as_ptr().cast());
    let size = |v: [usize; 3]| MTLSize {
        width: v[0],
        height: v[1],
        depth: v[2],
    };
    enc.dispatch_thread_groups(size(groups), size(threads));
    Ok(())
}

/// A small per-channel parameter as the kernels read it: f32, contiguous (a no-op when it
/// already is; models should keep these in f32 to save the cast).
pub(crate) fn f32_param(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?)
}

/// Checked `usize -> u32` for kernel parameters; `None` (fall back) on overflow.
pub(crate) fn u32_of(v: usize) -> Option<u32> {
    u32::try_from(v).ok()
}

/// Threads per threadgroup the pipeline allows (it depends on register use and can be below
/// 1024), rounded down to whole simdgroups.
pub(crate) fn max_threads(pipe: &ComputePipeline) -> usize {
    (pipe.max_total_threads_per_threadgroup() / 32 * 32).max(32)
}
