// rms_norm.cu: the RMSNorms of Mamba-2 (grouped gated norm in the mixer, residual-add + norm in
// front of each block).
#include "common.cuh"

// gated_rms_norm_<dtype>
// Reference: rms_norm.rs `gated_rms_norm_slow`.
//   norm_before_gate = 0: y = rmsnorm_group(x * silu(z)) * w;  = 1: y = rmsnorm_group(x) * w * silu(z)
// Arguments:
//   x  (rows, dim) T, rows = r0 * r1 (the flattened leading dims), row (i0, i1) at i0*xs0 + i1*xs1,
//      dim contiguous;  z: like x with strides zs0, zs1, or null
//   w  (dim) dtype w_dt;  y (rows, dim) T contiguous (output)
// Block layout: grid (rows, dim / group_size), 256 threads per (row, group): two passes over the
//   group's elements (sum of squares, then scale; the second pass hits L1/L2).
// Shared memory: 32 floats for the block reduction.
template <typename T>
__device__ void gated_norm(const T* __restrict__ x, i64 xs0, i64 xs1, const T* __restrict__ z,
                           i64 zs0, i64 zs1, const void* __restrict__ w, int w_dt,
                           T* __restrict__ y, i64 r1, i64 dim, i64 group_size, float eps,
                           int norm_before_gate) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x, grp = blockIdx.y;
    const i64 i0 = row / r1, i1 = row % r1;
    const T* xr = x + i0 * xs0 + i1 * xs1 + grp * group_size;
    const T* zr = z ? z + i0 * zs0 + i1 * zs1 + grp * group_size : nullptr;
    T* yr = y + row * dim + grp * group_size;
    float ss = 0.0f;
    for (i64 i = threadIdx.x; i < group_size; i += blockDim.x) {
        float v = to_f32(xr[i]);
        if (zr && !norm_before_gate) v *= silu_f(to_f32(zr[i]));
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)group_size + eps);
    for (i64 i = threadIdx.x; i < group_size; i += blockDim.x) {
        float v = to_f32(xr[i]);
        float g = zr ? silu_f(to_f32(zr[i])) : 1.0f;
        if (!norm_before_gate) v *= g;
        float out = v * inv * load_any(w, w_dt, grp * group_size + i);
        if (norm_before_gate) out *= g;
        yr[i] = from_f32<T>(out);
    }
}

#define GATED_NORM(NAME, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                        \
        NAME(const T* x, i64 xs0, i64 xs1, const T* z, i64 zs0, i64 zs1, const void* w,      \
             int w_dt, T* y, i64 r1, i64 dim, i64 group_size, float eps, int norm_before_gate) { \
        gated_norm<T>(x, xs0, xs1, z, zs0, zs1, w, w_dt, y, r1, dim, group_size, eps,        \
                      norm_before_gate);                                                     \
    }
GATED_NORM(gated_rms_norm_f32, float)
GATED_NORM(gated_rms_norm_f16, __half)
GATED_NORM(gated_rms_norm_bf16, __nv_bfloat16)

// rms_norm_residual_<dtype>
// Reference: rms_norm.rs `rms_norm_residual_slow`.
//   h = round(x + residual, ro_dt); normed = h / rms(h) * w (stored in w_dt); residual_out = h
// Arguments:
//   x    (rows, dim) T, strides xs0, xs1 over the two flattened leading dims (see gated_norm)
//   res  (rows, dim) dtype r_dt, strides rs0, rs1, or null
//   w    (dim) dtype w_dt;  normed (rows, dim) dtype w_dt contiguous (output)
//   rout (rows, dim) dtype ro_dt contiguous (output) or null (the caller returns x itself)
// Block layout: grid (rows), 256 threads per row. Rows of up to RN_REGS * 256 elements are held
//   in registers: every load of the row is issued before the first store, since at decode time
//   (one row per sequence, a handful of blocks) the kernel is a chain of memory latencies and a
//   load-store loop pays one latency per element. Longer rows take two passes (the second from
//   L1/L2).
// Shared memory: 32 floats for the block reduction.
#define RN_REGS 16
template <typename T>
__device__ void res_norm(const T* __restrict__ x, i64 xs0, i64 xs1, const void* __restrict__ res,
                         int r_dt, i64 rs0, i64 rs1, const void* __restrict__ w, int w_dt,
                         void* __restrict__ normed, void* __restrict__ rout, int ro_dt, i64 r1,
                         i64 dim, float eps) {
    __shared__ float scratch[32];
    pdl_launch_dependents();
    pdl_wait();
    const i64 row = blockIdx.x;
    const i64 i0 = row / r1, i1 = row % r1;
    const T* xr = x + i0 * xs0 + i1 * xs1;
    const i64 roff = i0 * rs0 + i1 * rs1;
    float ss = 0.0f;
    if (dim <= (i64)RN_REGS * blockDim.x) {
        // Elements of this thread: threadIdx.x + j * blockDim.x for j < valid.
        const int valid = (int)((dim - threadIdx.x + blockDim.x - 1) / blockDim.x);
        float h[RN_REGS], r[RN_REGS], wv[RN_REGS];
#pragma unroll
        for (int j = 0; j < RN_REGS; ++j) {
            const i64 i = threadIdx.x + (i64)j * blockDim.x;
            h[j] = j < valid ? to_f32(xr[i]) : 0.0f;
        }
        if (res) {
            load_many<RN_REGS>(res, r_dt, roff + threadIdx.x, blockDim.x, valid, r);
#pragma unroll
            for (int j = 0; j < RN_REGS; ++j) h[j] += r[j];
        }
        load_many<RN_REGS>(w, w_dt, threadIdx.x, blockDim.x, valid, wv);
#pragma unroll
        for (int j = 0; j < RN_REGS; ++j) {
            h[j] = round_any(ro_dt, h[j]);
            ss += h[j] * h[j];
        }
        if (rout) {
#pragma unroll
            for (int j = 0; j < RN_REGS; ++j)
                if (j < valid) store_any(rout, ro_dt, row * dim + threadIdx.x + (i64)j * blockDim.x, h[j]);
        }
        ss = block_sum(ss, scratch);
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma unroll
        for (int j = 0; j < RN_REGS; ++j)
            if (j < valid) store_any(normed, w_dt, row * dim + threadIdx.x + (i64)j * blockDim.x, h[j] * inv * wv[j]);
        return;
    }
    for (i64 i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = to_f32(xr[i]);
        if (res) v += load_any(res, r_dt, roff + i);
        v = round_any(ro_dt, v);
        if (rout) store_any(rout, ro_dt, row * dim + i, v);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (i64 i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = to_f32(xr[i]);
        if (res) v += load_any(res, r_dt, roff + i);
        v = round_any(ro_dt, v);
        store_any(normed, w_dt, row * dim + i, v * inv * load_any(w, w_dt, i));
    }
}

#define RES_NORM(NAME, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        NAME(const T* x, i64 xs0, i64 xs1, const void* res, int r_dt, i64 rs0, i64 rs1,       \
             const void* w, int w_dt, void* normed, void* rout, int ro_dt, i64 r1, i64 dim,   \
             float eps) {                                                                     \
        res_norm<T>(x, xs0, xs1, res, r_dt, rs0, rs1, w, w_dt, normed, rout, ro_dt, r1, dim,  \
                    eps);                                                                     \
    }
RES_NORM(rms_norm_residual_f32, float)
RES_NORM(rms_norm_residual_f16, __half)
RES_NORM(rms_norm_residual_bf16, __nv_bfloat16)
