//! The Metal executor of the dispatch plans (`crate::metal_plan`): the kernels of
//! `kernels/metal/`, compiled once per device, encoded on Candle's command encoder of the
//! input's `MetalDevice`.
//!
//! The ops' dispatcher calls the plan functions of `metal_plan` with a [`MetalExecutor`] of the
//! input's device; what to bind, at which offsets, with which grid is decided there, on every
//! platform, and tested through the MSL harness. This module only turns plans into encoder
//! calls.
//!
//! Binding: Candle custom ops take at most three tensors, and these kernels take up to twelve,
//! so no `CustomOpN` is used: each plan buffer's Metal buffer is taken from its tensor's storage
//! (`storage_and_layout`), outputs are allocated on the device and wrapped with
//! `Tensor::from_storage`.

mod runtime;

pub(crate) use runtime::MetalExecutor;
