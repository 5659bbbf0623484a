// state_update.cu: one decode step of the Mamba-2 SSM, in place on the f32 state.
#include "common.cuh"

#define SSU_WARPS 4
#define SSU_ROWS_PER_WARP 4
#define SSU_MAX_N 256  // d_state above this falls back to the reference

// selective_state_update_<dtype>
// Reference: state_update.rs `selective_state_update_slow`:
//   dt = process_dt(dt + dt_bias); state = exp(dt A) state + dt x Bᵀ; y = state C + D x; y *= silu(z)
// Arguments:
//   state   (batch, nheads, headdim, d_state) f32 contiguous, updated in place
//   x       (batch, nheads, headdim) T, (nheads, headdim) contiguous, batch stride xs_b
//   dt      (batch, nheads) dtype dt_dt, head stride 1, batch stride dts_b
//   a       (nheads) f32;  d, dt_bias (nheads) dtype p_dt / db_dt, or null
//   B, C    (batch, ngroups, d_state) T, (ngroups, d_state) contiguous, batch strides bs_b, cs_b
//   z       (batch, nheads, headdim) T like x (stride zs_b) or null
//   y       (batch, nheads, headdim) T contiguous (output)
// Block layout: grid (ceil(headdim / 16), nheads, batch), 128 threads = 4 warps; each warp owns 4
//   rows p of the head's state, its lanes stride over d_state (coalesced f32 state traffic; the
//   dot with C is a warp reduction). Head h reads group h / (nheads / ngroups).
// Shared memory: B and C of the group as f32, 2 * d_state * 4 bytes (<= 2 KiB).
template <typename T>
__device__ void ssu(float* __restrict__ state, const T* __restrict__ x, i64 xs_b,
                    const void* __restrict__ dt, int dt_dt, i64 dts_b,
                    const float* __restrict__ a, const T* __restrict__ B, i64 bs_b,
                    const T* __restrict__ C, i64 cs_b, const void* __restrict__ d, int d_dt,
                    const T* __restrict__ z, i64 zs_b, const void* __restrict__ dt_bias,
                    int db_dt, T* __restrict__ y, i64 nheads, i64 headdim, i64 d_state,
                    i64 ngroups, DtParams dp) {
    __shared__ float sB[SSU_MAX_N], sC[SSU_MAX_N];
    const i64 h = blockIdx.y, b = blockIdx.z;
    const i64 g = h / (nheads / ngroups);
    for (i64 n = threadIdx.x; n < d_state; n += blockDim.x) {
        sB[n] = to_f32(B[b * bs_b + g * d_state + n]);
        sC[n] = to_f32(C[b * cs_b + g * d_state + n]);
    }
    __syncthreads();
    const float dtv = process_dt(load_any(dt, dt_dt, b * dts_b + h),
                                 dt_bias ? load_any(dt_bias, db_dt, h) : 0.0f, dp);
    const float decay = expf(dtv * a[h]);
    const float dv = d ? load_any(d, d_dt, h) : 0.0f;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 p0 = (i64)blockIdx.x * (SSU_WARPS * SSU_ROWS_PER_WARP) + warp * SSU_ROWS_PER_WARP;
#pragma unroll
    for (int r = 0; r < SSU_ROWS_PER_WARP; ++r) {
        const i64 p = p0 + r;
        if (p >= headdim) break;
        const float xv = to_f32(x[b * xs_b + h * headdim + p]);
        const float xdt = xv * dtv;
        float* s = state + ((b * nheads + h) * headdim + p) * d_state;
        float acc = 0.0f;
        for (i64 n = lane; n < d_state; n += 32) {
            const float v = s[n] * decay + xdt * sB[n];
            s[n] = v;
            acc += v * sC[n];
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            float out = acc + dv * xv;
            if (z) out *= silu_f(to_f32(z[b * zs_b + h * headdim + p]));
            y[(b * nheads + h) * headdim + p] = from_f32<T>(out);
        }
    }
}

#define SSU(NAME, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                    \
        float* state, const T* x, i64 xs_b, const void* dt, int dt_dt, i64 dts_b,              \
        const float* a, const T* B, i64 bs_b, const T* C, i64 cs_b, const void* d, int d_dt,   \
        const T* z, i64 zs_b, const void* dt_bias, int db_dt, T* y, i64 nheads, i64 headdim,   \
        i64 d_state, i64 ngroups, int softplus, int clamp, float lo, float hi) {               \
        DtParams dp = {softplus, clamp, lo, hi};                                               \
        ssu<T>(state, x, xs_b, dt, dt_dt, dts_b, a, B, bs_b, C, cs_b, d, d_dt, z, zs_b, dt_bias, \
               db_dt, y, nheads, headdim, d_state, ngroups, dp);                               \
    }
SSU(selective_state_update_f32, float)
SSU(selective_state_update_f16, __half)
SSU(selective_state_update_bf16, __nv_bfloat16)
