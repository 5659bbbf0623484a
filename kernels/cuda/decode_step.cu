// decode_step.cu: one fused decode step of a Mamba-2 mixer (conv update + SiLU, selective state
// update + D skip, grouped gated RMSNorm) in a single launch.
#include "common.cuh"

#define DS_THREADS 512
#define DS_MAX_N 256
#define DS_MAX_P 256
#define DS_MAX_K 8
#define DS_ROWS 4  // rows of headdim per warp whose state tiles are loaded together

// One conv tap sum for channel ch: the state shifted by one with x appended, dotted with the
// filter (the conv_state itself is not written here).
__device__ __forceinline__ float conv_step(const float* st, float xv, const void* w, int w_dt,
                                           const void* bias, int b_dt, i64 ch, int K) {
    float wk[DS_MAX_K], sk[DS_MAX_K];
    load_many<DS_MAX_K>(w, w_dt, ch * K, 1, K, wk);
    // The window: the state shifted by one, then x; taps past K are zero (adding 0 is exact).
#pragma unroll
    for (int k = 0; k < DS_MAX_K; ++k) sk[k] = k < K - 1 ? st[k + 1] : (k == K - 1 ? xv : 0.0f);
    float acc = bias ? load_any(bias, b_dt, ch) : 0.0f;
#pragma unroll
    for (int k = 0; k < DS_MAX_K; ++k) acc += wk[k] * sk[k];
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
//   out    (batch, d_inner) T contiguous (output; not written when write_norm = 0)
//   ybuf   (batch, d_inner) f32 scratch (y, gated unless norm_before_gate);
//   hsum   (batch, nheads * split) f32 scratch (each block's sum of squares of its y)
//   count  (batch, ngroups) u32, zero on entry, zero again on exit (arrival counter of the
//          blocks of each group)
//   split  blocks per head (each takes ceil(P / split) rows of headdim)
//   write_norm  1: the group's last block normalises into `out`; 0: it only shifts the B/C
//          conv states, and the norm is left to the consumer (linear.cu `linear_gnorm`, which
//          reads ybuf and hsum: the captured step)
// Block layout: grid (nheads * split, batch), 512 threads = 16 warps (4 rows of headdim per warp
//   at a time). `split` spreads a small batch over the SMs (a 1.3b layer has 64 heads for 132
//   SMs). Each block convolves the x channels of its rows and the B/C channels of its group (B/C
//   conv results are computed by every block of the group, from the unmodified state), updates
//   its rows of the state (a warp per row, lanes over d_state), writes the gated y and its sum of
//   squares to scratch, then counts in. The last block of a group to arrive (threadfence +
//   atomic counter) shifts the group's B/C conv states (only then: every block of the group has
//   read them) and, with write_norm, reduces the group's sums (`warp_total`: a fixed order) and
//   normalises the group into `out`. The first state tiles are loaded before `pdl_wait`: no
//   kernel of the step but this one writes the state.
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
                            int norm_before_gate, int split, int write_norm, DtParams dp) {
    __shared__ float sB[DS_MAX_N], sC[DS_MAX_N], sx[DS_MAX_P], scratch[32];
    __shared__ int is_last;
    __shared__ float group_inv;
    const i64 h = blockIdx.x / split, b = blockIdx.y;
    const int part = blockIdx.x % split;
    const int rows = (P + split - 1) / split;
    const int p_lo = min(P, part * rows), p_hi = min(P, p_lo + rows);
    const i64 hpg = nheads / ngroups, g = h / hpg;
    const i64 nparts = nheads * split;
    const i64 d_inner = nheads * P, conv_dim = d_inner + 2 * ngroups * N;
    const T* xr = xbc + b * xs_b;
    float* cs = conv_state + b * conv_dim * K;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    constexpr int WARPS = DS_THREADS / 32;

    // The first tile of state rows (one pass of the loop below covers 64 rows: all of a 1.3b
    // head), loaded before waiting for the projection that produces xbc.
    float sv[DS_ROWS][DS_MAX_N / 32];
    auto load_tile = [&](int p0) {
#pragma unroll
        for (int r = 0; r < DS_ROWS; ++r) {
            const int p = p0 + r * WARPS;
            const float* s = ssm_state + ((b * nheads + h) * P + p) * (i64)N;
#pragma unroll
            for (int j = 0; j < DS_MAX_N / 32; ++j) {
                const int n = lane + 32 * j;
                sv[r][j] = (p < p_hi && n < N) ? s[n] : 0.0f;
            }
        }
    };
    load_tile(p_lo + warp);
    pdl_launch_dependents();
    pdl_wait();

    // 1. conv + SiLU: x channels of this block's rows (state shifted here: this block owns
    //    them), B and C channels of the group (state left for the group's last block). One pass
    //    over both kinds, so their memory latencies overlap.
    const int nx = p_hi - p_lo;
    for (int i = threadIdx.x; i < nx + 2 * N; i += blockDim.x) {
        if (i < nx) {
            const i64 ch = h * P + p_lo + i;
            const float xv = to_f32(xr[ch]);
            float* st = cs + ch * K;
            // Rounded to T like the unfused ops' outputs, so both paths see the same values.
            sx[p_lo + i] =
                to_f32(from_f32<T>(conv_step(st, xv, conv_w, w_dt, conv_b, cb_dt, ch, K)));
            conv_shift(st, xv, K);
        } else {
            const int j = i - nx;
            const i64 ch = d_inner + (j < N ? g * N + j : ngroups * N + g * N + (j - N));
            const float v = to_f32(from_f32<T>(
                conv_step(cs + ch * K, to_f32(xr[ch]), conv_w, w_dt, conv_b, cb_dt, ch, K)));
            if (j < N) sB[j] = v; else sC[j - N] = v;
        }
    }
    __syncthreads();

    // 2. state update of this block's rows; y (+ D x, gated unless norm_before_gate) to scratch.
    const float dtv = process_dt(load_any(dt, dt_dt, b * dts_b + h),
                                 dt_bias ? load_any(dt_bias, db_dt, h) : 0.0f, dp);
    const float decay = expf(dtv * A[h]);
    const float dv = D ? load_any(D, d_dt, h) : 0.0f;
    float ss = 0.0f;
    // Four rows of headdim per warp at a time, the whole (row, d_state) tile loaded into
    // registers before any arithmetic: the update is a chain of DRAM latencies otherwise.
    for (int p0 = p_lo + warp; p0 < p_hi; p0 += DS_ROWS * WARPS) {
        if (p0 != p_lo + warp) load_tile(p0);
#pragma unroll
        for (int r = 0; r < DS_ROWS; ++r) {
            const int p = p0 + r * WARPS;
            if (p >= p_hi) break;
            float* s = ssm_state + ((b * nheads + h) * P + p) * (i64)N;
            const float xv = sx[p], xdt = xv * dtv;
            float acc = 0.0f;
#pragma unroll
            for (int j = 0; j < DS_MAX_N / 32; ++j) {
                const int n = lane + 32 * j;
                if (n < N) {
                    const float v = sv[r][j] * decay + xdt * sB[n];
                    s[n] = v;
                    acc += v * sC[n];
                }
            }
            acc = warp_sum(acc);
            if (lane == 0) {
                float y = to_f32(from_f32<T>(acc + dv * xv));
                if (!norm_before_gate) y *= silu_f(to_f32(z[b * zs_b + h * P + p]));
                ybuf[b * d_inner + h * P + p] = y;
                ss += y * y;
            }
        }
    }
    __threadfence();  // each writer's y is visible device-wide before this block counts in
    ss = block_sum(ss, scratch);
    if (threadIdx.x == 0) {
        hsum[b * nparts + blockIdx.x] = ss;
        __threadfence();
        is_last = atomicAdd(&count[b * ngroups + g], 1u) == (unsigned)(hpg * split - 1);
    }
    __syncthreads();
    if (!is_last) return;

    // 3. last block of the group: B/C conv state shift, norm over the group. Every block of the
    //    group has counted in, so the counter is re-armed for the next launch here: a captured
    //    decode step (CUDA graph) replays without a memset node.
    if (threadIdx.x == 0) count[b * ngroups + g] = 0u;
    __threadfence();
    for (int i = threadIdx.x; i < 2 * N; i += blockDim.x) {
        const i64 ch = d_inner + (i < N ? g * N + i : ngroups * N + g * N + (i - N));
        conv_shift(cs + ch * K, to_f32(xr[ch]), K);
    }
    if (!write_norm) return;
    const i64 ppg = hpg * split;
    if (warp == 0) {
        const float total = warp_total(hsum + b * nparts + g * ppg, ppg);
        if (lane == 0) group_inv = 1.0f / sqrtf(total / (float)(hpg * P) + eps);
    }
    __syncthreads();
    const float inv = group_inv;
    const i64 gs = hpg * P;
    // Eight elements per thread in flight: one block does the whole group, so its latency
    // chain is the step's tail.
    for (i64 i0 = threadIdx.x; i0 < gs; i0 += 8 * (i64)DS_THREADS) {
        float v[8], wv[8], gz[8];
        const int valid = (int)min((i64)8, (gs - i0 + DS_THREADS - 1) / DS_THREADS);
        load_many<8>(norm_w, nw_dt, g * gs + i0, DS_THREADS, valid, wv);
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const i64 c = g * gs + i0 + u * (i64)DS_THREADS;
            const bool in = u < valid;
            v[u] = in ? __ldcg(&ybuf[b * d_inner + c]) : 0.0f;
            gz[u] = in && norm_before_gate ? silu_f(to_f32(z[b * zs_b + c])) : 1.0f;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const i64 c = g * gs + i0 + u * (i64)DS_THREADS;
            if (i0 + u * (i64)DS_THREADS < gs)
                out[b * d_inner + c] = from_f32<T>(v[u] * inv * wv[u] * gz[u]);
        }
    }
}

#define DECODE_STEP(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(DS_THREADS) NAME(                             \
        const T* xbc, i64 xs_b, const void* dt, int dt_dt, i64 dts_b, const T* z, i64 zs_b,    \
        float* conv_state, const void* conv_w, int w_dt, const void* conv_b, int cb_dt,        \
        float* ssm_state, const float* A, const void* D, int d_dt, const void* dt_bias,        \
        int db_dt, const void* norm_w, int nw_dt, T* out, float* ybuf, float* hsum,            \
        unsigned* count, i64 nheads, int P, int N, i64 ngroups, int K, float eps,              \
        int norm_before_gate, int split, int write_norm, int softplus, int clamp, float lo,    \
        float hi) {                                                                            \
        DtParams dp = {softplus, clamp, lo, hi};                                               \
        decode_step<T>(xbc, xs_b, dt, dt_dt, dts_b, z, zs_b, conv_state, conv_w, w_dt, conv_b, \
                       cb_dt, ssm_state, A, D, d_dt, dt_bias, db_dt, norm_w, nw_dt, out, ybuf, \
                       hsum, count, nheads, P, N, ngroups, K, eps, norm_before_gate, split,    \
                       write_norm, dp);                                                        \
    }
DECODE_STEP(mixer_decode_step_f32, float)
DECODE_STEP(mixer_decode_step_f16, __half)
DECODE_STEP(mixer_decode_step_bf16, __nv_bfloat16)
