// RMSNorms of Mamba-2: the grouped gated norm inside the mixer, and residual add + RMSNorm in
// front of each block. Activations T are float, half or bfloat; sums of squares are f32.
#include <metal_stdlib>
using namespace metal;

#define METAL_FUNC inline __attribute__((__always_inline__))

// Mirrors mamba2_ops::metal_params::GatedRmsNormParams.
struct GatedRmsNormParams {
    uint rows;
    uint dim;
    uint group_size;
    uint has_z;
    uint norm_before_gate;
    float eps;
};

// Mirrors mamba2_ops::metal_params::RmsNormResidualParams.
struct RmsNormResidualParams {
    uint rows;
    uint dim;
    uint has_residual;
    float eps;
};

METAL_FUNC float silu_f(float v) {
    return v / (1.0f + exp(-v));
}

// Sum of `v` over the threadgroup: simd_sum per simdgroup, partial sums through `partial`
// (one float per simdgroup, at most 32), a second simd_sum in every simdgroup. Works for any
// threadgroup size, including a partial last simdgroup. Every thread must call it.
METAL_FUNC float threadgroup_sum(float v, threadgroup float* partial, ushort sg, ushort nsg,
                                 ushort lane) {
    v = simd_sum(v);
    if (lane == 0) {
        partial[sg] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float s = lane < nsg ? partial[lane] : 0.0f;
    s = simd_sum(s);
    // every thread has read `partial` before any thread of a later call overwrites it
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return s;
}

// gated_rms_norm_<dtype>
// Reference: mamba2_ops::rms_norm::gated_rms_norm_slow.
// Arguments:
//   x       [[buffer(0)]] (rows, dim) T
//   z       [[buffer(1)]] (rows, dim) T (has_z): gate, silu(z)
//   weight  [[buffer(2)]] (dim) f32
//   out     [[buffer(3)]] (rows, dim) T
//   p       [[buffer(4)]] GatedRmsNormParams
// norm_before_gate = 0: out = rmsnorm_group(x * silu(z)) * w; 1: rmsnorm_group(x) * w * silu(z).
// Grid: (dim / group_size, rows) threadgroups, one per (row, group); any threadgroup size up to
// 1024 (the host uses min(256, group_size rounded up to 32)). Each thread strides over the
// group twice (sum of squares, then scale), reading x and z from device memory both times.
// Threadgroup memory: 32 floats (128 B).
template <typename T>
kernel void gated_rms_norm(
    device const T* x [[buffer(0)]],
    device const T* z [[buffer(1)]],
    device const float* weight [[buffer(2)]],
    device T* out [[buffer(3)]],
    constant GatedRmsNormParams& p [[buffer(4)]],
    uint2 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    uint2 tpg [[threads_per_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort nsg [[simdgroups_per_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float partial[32];
    const uint ntg = tpg.x;
    const uint col0 = tgid.x * p.group_size;
    const ulong base = (ulong)tgid.y * p.dim + col0;
    const bool gate_first = p.has_z != 0 && p.norm_before_gate == 0;
    float ss = 0.0f;
    for (uint i = tid; i < p.group_size; i += ntg) {
        float v = float(x[base + i]);
        if (gate_first) {
            v *= silu_f(float(z[base + i]));
        }
        ss += v * v;
    }
    const float total = threadgroup_sum(ss, partial, sg, nsg, lane);
    const float inv_rms = 1.0f / sqrt(total / float(p.group_size) + p.eps);
    for (uint i = tid; i < p.group_size; i += ntg) {
        float v = float(x[base + i]);
        if (gate_first) {
            v *= silu_f(float(z[base + i]));
        }
        v = v * inv_rms * weight[col0 + i];
        if (p.has_z != 0 && p.norm_before_gate != 0) {
            v *= silu_f(float(z[base + i]));
        }
        out[base + i] = T(v);
    }
}

// rms_norm_residual_<dtype> (R = T) and rms_norm_residual_f32res_<dtype> (R = float)
// Reference: mamba2_ops::rms_norm::rms_norm_residual_slow.
// Arguments:
//   x             [[buffer(0)]] (rows, dim) T: block output
//   residual      [[buffer(1)]] (rows, dim) R (has_residual)
//   weight        [[buffer(2)]] (dim) T (the dtype of x: read as it is stored, no cast launch)
//   normed        [[buffer(3)]] (rows, dim) T, out: rmsnorm(residual_out) * weight
//   residual_out  [[buffer(4)]] (rows, dim) R, out: x + residual, rounded to R
// The norm reads the rounded residual_out, as the reference does. The host uses this kernel
// when the weight has the dtype of x (normed is returned in the weight's dtype).
// Grid: rows threadgroups; any threadgroup size (the host uses min(1024, dim rounded up to 32)).
// Threadgroup memory: 32 floats (128 B).
template <typename T, typename R>
kernel void rms_norm_residual(
    device const T* x [[buffer(0)]],
    device const R* residual [[buffer(1)]],
    device const T* weight [[buffer(2)]],
    device T* normed [[buffer(3)]],
    device R* residual_out [[buffer(4)]],
    constant RmsNormResidualParams& p [[buffer(5)]],
    uint row [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    uint ntg [[threads_per_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort nsg [[simdgroups_per_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float partial[32];
    const ulong base = (ulong)row * p.dim;
    float ss = 0.0f;
    for (uint i = tid; i < p.dim; i += ntg) {
        float v = float(x[base + i]);
        if (p.has_residual != 0) {
            v += float(residual[base + i]);
        }
        const R r = R(v);
        residual_out[base + i] = r;
        const float h = float(r);
        ss += h * h;
    }
    const float total = threadgroup_sum(ss, partial, sg, nsg, lane);
    const float inv_rms = 1.0f / sqrt(total / float(p.dim) + p.eps);
    for (uint i = tid; i < p.dim; i += ntg) {
        // the thread reads back its own write of the first loop
        const float h = float(residual_out[base + i]);
        normed[base + i] = T(h * inv_rms * float(weight[i]));
    }
}

typedef decltype(gated_rms_norm<float>) gated_rms_norm_f32_t;
typedef decltype(gated_rms_norm<half>) gated_rms_norm_f16_t;
template [[host_name("gated_rms_norm_f32")]] kernel gated_rms_norm_f32_t gated_rms_norm<float>;
template [[host_name("gated_rms_norm_f16")]] kernel gated_rms_norm_f16_t gated_rms_norm<half>;
typedef decltype(rms_norm_residual<float, float>) rms_norm_residual_f32_t;
typedef decltype(rms_norm_residual<half, half>) rms_norm_residual_f16_t;
typedef decltype(rms_norm_residual<half, float>) rms_norm_residual_f32res_f16_t;
template [[host_name("rms_norm_residual_f32")]] kernel rms_norm_residual_f32_t rms_norm_residual<float, float>;
template [[host_name("rms_norm_residual_f16")]] kernel rms_norm_residual_f16_t rms_norm_residual<half, half>;
template [[host_name("rms_norm_residual_f32res_f16")]] kernel rms_norm_residual_f32res_f16_t rms_norm_residual<half, float>;
// bfloat needs MSL 3.1 (macOS 14).
#if !defined(__METAL_VERSION__) || __METAL_VERSION__ >= 310
typedef decltype(gated_rms_norm<bfloat>) gated_rms_norm_bf16_t;
template [[host_name("gated_rms_norm_bf16")]] kernel gated_rms_norm_bf16_t gated_rms_norm<bfloat>;
typedef decltype(rms_norm_residual<bfloat, bfloat>) rms_norm_residual_bf16_t;
typedef decltype(rms_norm_residual<bfloat, float>) rms_norm_residual_f32res_bf16_t;
template [[host_name("rms_norm_residual_bf16")]] kernel rms_norm_residual_bf16_t rms_norm_residual<bfloat, bfloat>;
template [[host_name("rms_norm_residual_f32res_bf16")]] kernel rms_norm_residual_f32res_bf16_t rms_norm_residual<bfloat, float>;
#endif
