// common.cuh: helpers shared by the mamba2-rs CUDA kernels.
//
// Conventions (see README.md in this folder):
// - activations are f32 / f16 / bf16 (template parameter T, one instantiation per dtype, named
//   <op>_<variant>_<dtype>); state and accumulation are always f32;
// - small per-channel/per-head parameters (conv weight, bias, D, dt_bias, norm weight) and a few
//   secondary tensors are read through a run-time dtype code (DT_F32/DT_F16/DT_BF16) so that a
//   checkpoint may keep them in another dtype than the activations without a conversion launch;
// - every index and size is 64-bit (long long): element counts may exceed 2^32;
// - strided tensors are described by an element offset already applied to the pointer and the
//   strides of their outer dimensions; the innermost dimension is always contiguous.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

typedef long long i64;

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Load element i of a tensor whose dtype is known only at run time (uniform branch).
__device__ __forceinline__ float load_any(const void* p, int dtype, i64 i) {
    if (dtype == DT_F32) return ((const float*)p)[i];
    if (dtype == DT_F16) return __half2float(((const __half*)p)[i]);
    return __bfloat162float(((const __nv_bfloat16*)p)[i]);
}

__device__ __forceinline__ void store_any(void* p, int dtype, i64 i, float v) {
    if (dtype == DT_F32) ((float*)p)[i] = v;
    else if (dtype == DT_F16) ((__half*)p)[i] = __float2half_rn(v);
    else ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float silu_f(float v) { return v / (1.0f + expf(-v)); }

// softplus(v) = max(v, 0) + log1p(exp(-|v|)): the reference's overflow-free identity.
__device__ __forceinline__ float softplus_f(float v) {
    return fmaxf(v, 0.0f) + log1pf(expf(-fabsf(v)));
}

// dt -> clamp(softplus(dt + dt_bias), lo, hi), as ssd.rs `process_dt` (which clamps only when
// the limit is not (0, inf): `clamp` is that flag, decided on the host).
struct DtParams {
    int softplus;
    int clamp;
    float lo;
    float hi;
};

__device__ __forceinline__ float process_dt(float dt, float bias, DtParams p) {
    float v = dt + bias;
    if (p.softplus) v = softplus_f(v);
    if (p.clamp) v = fminf(fmaxf(v, p.lo), p.hi);
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

// Loads p[base + u * step] for u < CNT (0 for u >= valid) of a run-time dtype, with the dtype
// branch outside the unrolled loop: latency-bound kernels need all CNT loads in flight at once,
// and a branch per element (load_any) serialises them.
template <int CNT>
__device__ __forceinline__ void load_many(const void* p, int dtype, i64 base, i64 step, int valid,
                                          float* out) {
    if (dtype == DT_F32) {
        const float* q = (const float*)p;
#pragma unroll
        for (int u = 0; u < CNT; ++u) out[u] = u < valid ? q[base + u * step] : 0.0f;
    } else if (dtype == DT_F16) {
        const __half* q = (const __half*)p;
#pragma unroll
        for (int u = 0; u < CNT; ++u) out[u] = u < valid ? __half2float(q[base + u * step]) : 0.0f;
    } else {
        const __nv_bfloat16* q = (const __nv_bfloat16*)p;
#pragma unroll
        for (int u = 0; u < CNT; ++u)
            out[u] = u < valid ? __bfloat162float(q[base + u * step]) : 0.0f;
    }
}

// Round v to the precision of a run-time dtype (the reference converts before it re-reads).
__device__ __forceinline__ float round_any(int dtype, float v) {
    if (dtype == DT_F16) return __half2float(__float2half_rn(v));
    if (dtype == DT_BF16) return __bfloat162float(__float2bfloat16_rn(v));
    return v;
}

// One conv channel's state `st` (K floats, oldest first) moved on by one token: shifted left, x
// appended. The decode step's B/C channels are shifted this way by whoever runs after every
// reader of the old state (the step's last block, or the output projection: decode_step.cu).
__device__ __forceinline__ void conv_state_push(float* st, float xv, int K) {
    for (int k = 0; k < K - 1; ++k) st[k] = st[k + 1];
    st[K - 1] = xv;
}

// Programmatic dependent launch (sm_90+): a kernel launched with the programmatic-serialisation
// attribute may start while its predecessor in the stream still runs. `pdl_wait` blocks until
// the predecessor has completed and its writes are visible, so everything a kernel reads from
// an earlier kernel, and everything it writes, must come after it; weights and states that no
// recent kernel writes may be loaded before it (that is the point: their DRAM latency overlaps
// the predecessor's tail). Every kernel of a PDL chain calls `pdl_wait` in every block, so a
// kernel's completion implies its predecessors' (the chain stays transitive). Without the
// attribute (eager launches, older GPUs) both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel of the stream launch once every block of this one has called this (or
// exited): called at the top, since all of this kernel's blocks are resident by then and the
// dependent's early blocks only wait.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Sum of p[0..n) by one warp in a fixed order (lane l sums l, l + 32, ... into four
// interleaved partials, four loads in flight, then a butterfly), so every kernel that needs a
// group's total gets the same bits. Reads through L2 (`__ldcg`): the values were written by
// other blocks or by the previous kernel.
__device__ __forceinline__ float warp_total(const float* p, i64 n) {
    const int lane = threadIdx.x & 31;
    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (i64 j0 = lane; j0 < n; j0 += 128) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const i64 j = j0 + 32 * u;
            part[u] += j < n ? __ldcg(&p[j]) : 0.0f;
        }
    }
    return warp_sum((part[0] + part[1]) + (part[2] + part[3]));
}
