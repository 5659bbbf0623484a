// decode_step.cu: one fused decode step of a Mamba-2 mixer (conv update + SiLU, selective state
// update + D skip, grouped gated RMSNorm) in a single launch.
#include "common.cuh"

#define DS_THREADS 512
#define DS_MAX_N 256
#define DS_MAX_P 256
#define DS_MAX_K 8

// One conv tap sum for channel ch: the state shifted by one with x appended, dotted with the
// filter (the conv_state itself is not written here).
__device__ __forceinline__ float conv_step(const float* st, float xv, const void* w, int w_dt,
                                           const void* bias, int b_dt, i64 ch, int K) {
    float acc = bias ? load_any(bias, b_dt, ch) : 0.0f;
    for (int k = 0; k < K - 1; ++k) acc += load_any(w, w_dt, ch * K + k) * st[k + 1];
    acc += load_any(w, w_dt, ch * K + K - 1) * xv;
    return silu_f(acc);
}

__device__ __forceinline__ void conv_shift(float* st, float xv, int K) {
    for (int k = 0; k < K - 1; ++k) st[k] = st[k + 1];
    st[K - 1] = xv;
}

// mixer_decode_step_<dtype>
// Reference: decode_step.rs `mixer_decode_step_slow` (= causal_conv1d_update_slow with SiLU,
//   selective_state_update_slow without z, gated_rms_norm_slow).
// Arguments:
//   xbc    (batch, conv_dim) T, channel stride 1, batch stride xs_b; channels x | B | C
//   dt     (batch, nheads) dtype dt_dt, batch stride dts_b;  z (batch, d_inner) T, stride zs_b
//   conv_state (batch, conv_dim, K) f32 contiguous, in place;  conv_w (conv_dim, K) dtype w_dt;
//   conv_b (conv_dim) dtype cb_dt or null
//   ssm_state (batch, nheads, P, N) f32 contiguous, in place;  a (nheads) f32;
//   d, dt_bias (nheads) dtype d_dt / db_dt or null;  norm_w (d_inner) dtype nw_dt
//   out    (batch, d_inner) T contiguous (output)
//   ybuf   (batch, d_inner) f32 scratch;  hsum (batch, nheads) f32 scratch
//   count  (batch, ngroups) u32, zero on entry, zero again on exit (arrival counter of the
//          heads of each group)
// Block layout: grid (nheads, batch), 512 threads = 16 warps (4 rows of headdim per warp: at
//   batch 1 the 64 blocks of a 1.3b layer need the warps to hide the state loads; with 128
//   threads the fused step was slower than the unfused ops). Each block convolves the x channels
//   of its head and the B/C channels of its group (B/C conv results are computed by every head of
//   the group, from the unmodified state), updates its head's state (a warp per row of headdim,
//   lanes over d_state), writes the gated y and its sum of squares to scratch, then counts in.
//   The last head of a group to arrive (threadfence + atomic counter) reduces the group's sums in
//   a fixed order (deterministic), normalises the group into `out`, and shifts the group's B/C
//   conv states (only then: every head of the group has read them).
// Shared memory: static, B, C (f32, d_state <= 256), x (f32, headdim <= 256), 32 floats, 2 ints:
//   3.2 KiB.
template <typename T>
__device__ void decode_step(const T* __restrict__ xbc, i64 xs_b, const void* __restrict__ dt,
                            int dt_dt, i64 dts_b, const T* __restrict__ z, i64 zs_b,
                            float* __restrict__ conv_state, const void* __restrict__ conv_w,
                            int w_dt, const void* __restrict__ conv_b, int cb_dt,
                            float* __restrict__ ssm_state, const float* __restrict__ A,
                            const void* __restrict__ D, int d_dt, const void* __restrict__ dt_bias,
                            int db_dt, const void* __restrict__ norm_w, int nw_dt,
                            T* __restrict__ out, float* ybuf, float* hsum, unsigned* count,
                            i64 nheads, int P, int N, i64 ngroups, int K, float eps,
                            int norm_before_gate, DtParams dp) {
    __shared__ float sB[DS_MAX_N], sC[DS_MAX_N], sx[DS_MAX_P], scratch[32];
    __shared__ int is_last;
    const i64 h = blockIdx.x, b = blockIdx.y;
    const i64 hpg = nheads / ngroups, g = h / hpg;
    const i64 d_inner = nheads * P, conv_dim = d_inner + 2 * ngroups * N;
    const T* xr = xbc + b * xs_b;
    float* cs = conv_state + b * conv_dim * K;

    // 1. conv + SiLU: x channels of this head (state shifted here: this head owns them), B and C
    //    channels of the group (state left for the group's last block).
    for (int i = threadIdx.x; i < P; i += blockDim.x) {
        const i64 ch = h * P + i;
        const float xv = to_f32(xr[ch]);
        float* st = cs + ch * K;
        // Rounded to T like the unfused ops' outputs, so both paths see the same values.
        sx[i] = to_f32(from_f32<T>(conv_step(st, xv, conv_w, w_dt, conv_b, cb_dt, ch, K)));
        conv_shift(st, xv, K);
    }
    for (int i = threadIdx.x; i < 2 * N; i += blockDim.x) {
        const i64 ch = d_inner + (i < N ? g * N + i : ngroups * N + g * N + (i - N));
        const float v = to_f32(from_f32<T>(
            conv_step(cs + ch * K, to_f32(xr[ch]), conv_w, w_dt, conv_b, cb_dt, ch, K)));
        if (i < N) sB[i] = v; else sC[i - N] = v;
    }
    __syncthreads();

    // 2. state update of this head; y (+ D x, gated unless norm_before_gate) to scratch.
    const float dtv = process_dt(load_any(dt, dt_dt, b * dts_b + h),
                                 dt_bias ? load_any(dt_bias, db_dt, h) : 0.0f, dp);
    const float decay = expf(dtv * A[h]);
    const float dv = D ? load_any(D, d_dt, h) : 0.0f;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float ss = 0.0f;
    for (int p = warp; p < P; p += DS_THREADS / 32) {
        const float xv = sx[p], xdt = xv * dtv;
        float* s = ssm_state + ((b * nheads + h) * P + p) * (i64)N;
        float acc = 0.0f;
        for (int n = lane; n < N; n += 32) {
            const float v = s[n] * decay + xdt * sB[n];
            s[n] = v;
            acc += v * sC[n];
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            float y = to_f32(from_f32<T>(acc + dv * xv));
            if (!norm_before_gate) y *= silu_f(to_f32(z[b * zs_b + h * P + p]));
            ybuf[b * d_inner + h * P + p] = y;
            ss += y * y;
        }
    }
    __threadfence();  // each writer's y is visible device-wide before this head counts in
    ss = block_sum(ss, scratch);
    if (threadIdx.x == 0) {
        hsum[b * nheads + h] = ss;
        __threadfence();
        is_last = atomicAdd(&count[b * ngroups + g], 1u) == (unsigned)(hpg - 1);
    }
    __syncthreads();
    if (!is_last) return;

    // 3. last head of the group: norm over the group, B/C conv state shift. Every head of the
    //    group has counted in, so the counter is re-armed for the next launch here: a captured
    //    decode step (CUDA graph) replays without a memset node.
    if (threadIdx.x == 0) count[b * ngroups + g] = 0u;
    __threadfence();
    float total = 0.0f;
    for (i64 j = 0; j < hpg; ++j) total += __ldcg(&hsum[b * nheads + g * hpg + j]);
    const i64 gs = hpg * P;
    const float inv = 1.0f / sqrtf(total / (float)gs + eps);
    for (i64 i = threadIdx.x; i < gs; i += blockDim.x) {
        const i64 c = g * gs + i;
        float v = __ldcg(&ybuf[b * d_inner + c]) * inv * load_any(norm_w, nw_dt, c);
        if (norm_before_gate) v *= silu_f(to_f32(z[b * zs_b + c]));
        out[b * d_inner + c] = from_f32<T>(v);
    }
    for (int i = threadIdx.x; i < 2 * N; i += blockDim.x) {
        const i64 ch = d_inner + (i < N ? g * N + i : ngroups * N + g * N + (i - N));
        conv_shift(cs + ch * K, to_f32(xr[ch]), K);
    }
}

#define DECODE_STEP(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(DS_THREADS) NAME(                             \
        const T* xbc, i64 xs_b, const void* dt, int dt_dt, i64 dts_b, const T* z, i64 zs_b,    \
        float* conv_state, const void* conv_w, int w_dt, const void* conv_b, int cb_dt,        \
        float* ssm_state, const float* A, const void* D, int d_dt, const void* dt_bias,        \
        int db_dt, const void* norm_w, int nw_dt, T* out, float* ybuf, float* hsum,            \
        unsigned* count, i64 nheads, int P, int N, i64 ngroups, int K, float eps,              \
        int norm_before_gate, int softplus, int clamp, float lo, float hi) {                   \
        DtParams dp = {softplus, clamp, lo, hi};                                               \
        decode_step<T>(xbc, xs_b, dt, dt_dt, dts_b, z, zs_b, conv_state, conv_w, w_dt, conv_b, \
                       cb_dt, ssm_state, A, D, d_dt, dt_bias, db_dt, norm_w, nw_dt, out, ybuf, \
                       hsum, count, nheads, P, N, ngroups, K, eps, norm_before_gate, dp);      \
    }
DECODE_STEP(mixer_decode_step_f32, float)
DECODE_STEP(mixer_decode_step_f16, __half)
DECODE_STEP(mixer_decode_step_bf16, __nv_bfloat16)
