// decode_step.cu: one fused decode step of a Mamba-2 mixer (conv update + SiLU, selective state
// update + D skip, grouped gated RMSNorm) in a single launch.
#include "common.cuh"

#define DS_THREADS 512
#define DS_MAX_N 256
#define DS_MAX_P 256
#define DS_MAX_K 8
#define DS_ROWS 4  // rows of headdim per warp whose state tiles are loaded together

// What the step does after the state update (`mode` argument):
#define STEP_NORM 1   // the group's last block shifts the B/C conv states and normalises into out
#define STEP_DEFER 2  // out = y * gate * norm_w, unnormalised; the consumer applies the group's
                      // 1 / rms (from hsum) and shifts the B/C conv states (linear.cu,
                      // `linear_res_b*`): no cross-block step here at all

// The conv inputs of one channel that no kernel of the step writes (its conv state, filter and
// bias): loaded before `pdl_wait`.
template <int KM>
struct ConvIn {
    float st[KM], wk[KM], bias;
};

template <int KM>
__device__ __forceinline__ void conv_load(ConvIn<KM>& c, const float* st, const void* w, int w_dt,
                                          const void* bias, int b_dt, i64 ch, int K) {
#pragma unroll
    for (int k = 0; k < KM; ++k) c.st[k] = k < K ? st[k] : 0.0f;
    load_many<KM>(w, w_dt, ch * K, 1, K, c.wk);
    c.bias = bias ? load_any(bias, b_dt, ch) : 0.0f;
}

// One conv tap sum: the state shifted by one with x appended, dotted with the filter, SiLU.
template <int KM>
__device__ __forceinline__ float conv_out(const ConvIn<KM>& c, float xv, int K) {
    float acc = c.bias;
    // The window: the state shifted by one, then x; taps past K are zero (adding 0 is exact).
#pragma unroll
    for (int k = 0; k < KM; ++k)
        acc += c.wk[k] * (k < K - 1 ? c.st[k + 1] : (k == K - 1 ? xv : 0.0f));
    return silu_f(acc);
}

// The shifted state of a channel, written back.
template <int KM>
__device__ __forceinline__ void conv_store(const ConvIn<KM>& c, float* st, float xv, int K) {
#pragma unroll
    for (int k = 0; k < KM - 1; ++k)
        if (k < K - 1) st[k] = c.st[k + 1];
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
//   out    (batch, d_inner) T contiguous (output: normalised (STEP_NORM) or y * gate * norm_w
//          (STEP_DEFER))
//   ybuf   (batch, d_inner) f32 scratch (y, gated unless norm_before_gate; STEP_NORM only)
//   hsum   (batch, nheads * split) f32 scratch (each block's sum of squares of its y, gated
//          unless norm_before_gate)
//   count  (batch, ngroups) u32, zero on entry, zero again on exit (arrival counter of the
//          blocks of each group; STEP_NORM only)
//   split  blocks per head (each takes ceil(P / split) rows of headdim)
//   mode   STEP_NORM or STEP_DEFER (above)
// Block layout: grid (nheads * split, batch), 512 threads = 16 warps (4 rows of headdim per warp
//   at a time). `split` spreads a small batch over the SMs (a 1.3b layer has 64 heads for 132
//   SMs). Each block convolves the x channels of its rows and the B/C channels of its group (B/C
//   conv results are computed by every block of the group, from the unmodified state), updates
//   its rows of the state (a warp per row, lanes over d_state), and writes its sum of squares.
//   Before `pdl_wait` (nothing earlier in the step writes them) it loads the first state tiles,
//   the conv states and filters of its first channels and the per-head parameters, so after the
//   wait the step is one round of loads (xbc, dt, z) deep. STEP_NORM: each block writes y to
//   scratch and counts in; the last block of a group to arrive (threadfence + atomic counter)
//   shifts the group's B/C conv states (only then: every block of the group has read them),
//   reduces the group's sums (`warp_total`: a fixed order) and normalises the group into `out`.
// Shared memory: static, B, C (f32, d_state <= 256), x (f32, headdim <= 256), 32 floats, 2 ints:
//   3.2 KiB.
template <typename T, int NS, int KM>
__device__ void decode_step(const T* __restrict__ xbc, i64 xs_b, const void* __restrict__ dt,
                            int dt_dt, i64 dts_b, const T* __restrict__ z, i64 zs_b,
                            float* __restrict__ conv_state, const void* __restrict__ conv_w,
                            int w_dt, const void* __restrict__ conv_b, int cb_dt,
                            float* __restrict__ ssm_state, const float* __restrict__ A,
                            const void* __restrict__ D, int d_dt, const void* __restrict__ dt_bias,
                            int db_dt, const void* __restrict__ norm_w, int nw_dt,
                            T* __restrict__ out, float* ybuf, float* hsum, unsigned* count,
                            i64 nheads, int P, int N, i64 ngroups, int K, float eps,
                            int norm_before_gate, int split, int mode, DtParams dp) {
    __shared__ float sB[DS_MAX_N], sC[DS_MAX_N], sx[DS_MAX_P], scratch[32];
    __shared__ int is_last;
    __shared__ float group_inv;
    // Head and group indices in 32 bits (a 64-bit division is a ~70-instruction call).
    const i64 h = (int)blockIdx.x / split, b = blockIdx.y;
    const int part = blockIdx.x % split;
    const int rows = (P + split - 1) / split;
    const int p_lo = min(P, part * rows), p_hi = min(P, p_lo + rows);
    const i64 hpg = (int)nheads / (int)ngroups, g = (int)h / (int)hpg;
    const i64 nparts = nheads * split;
    const i64 d_inner = nheads * P, conv_dim = d_inner + 2 * ngroups * N;
    const T* xr = xbc + b * xs_b;
    float* cs = conv_state + b * conv_dim * K;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    constexpr int WARPS = DS_THREADS / 32;
    const int nx = p_hi - p_lo;
    // Conv channel of work item i: x channels of this block's rows, then the group's B and C.
    auto channel = [&](int i) -> i64 {
        if (i < nx) return h * P + p_lo + i;
        const int j = i - nx;
        return d_inner + (j < N ? g * N + j : ngroups * N + g * N + (j - N));
    };

    // Before the wait: the first tile of state rows (one pass of the update loop covers 64
    // rows: all of a 1.3b head), the first conv channel's inputs, the head's parameters and the
    // norm weights of this warp's first rows.
    float sv[DS_ROWS][NS];
    auto load_tile = [&](int p0) {
#pragma unroll
        for (int r = 0; r < DS_ROWS; ++r) {
            const int p = p0 + r * WARPS;
            const float* s = ssm_state + ((b * nheads + h) * P + p) * (i64)N;
#pragma unroll
            for (int j = 0; j < NS; ++j) {
                const int n = lane + 32 * j;
                sv[r][j] = (p < p_hi && n < N) ? s[n] : 0.0f;
            }
        }
    };
    load_tile(p_lo + warp);
    ConvIn<KM> c0;
    const int i0 = threadIdx.x;
    if (i0 < nx + 2 * N) {
        const i64 ch = channel(i0);
        conv_load(c0, cs + ch * K, conv_w, w_dt, conv_b, cb_dt, ch, K);
    }
    const float a_h = A[h];
    const float dv = D ? load_any(D, d_dt, h) : 0.0f;
    const float dtb = dt_bias ? load_any(dt_bias, db_dt, h) : 0.0f;
    // Lane r < DS_ROWS finishes row p_lo + warp + r * WARPS of each tile (below): the norm
    // weight of its first-tile row.
    const int p_mine = p_lo + warp + lane * WARPS;
    const bool row_lane = lane < DS_ROWS && p_mine < p_hi;
    const float nw0 =
        row_lane && mode == STEP_DEFER ? load_any(norm_w, nw_dt, h * P + p_mine) : 0.0f;
    pdl_launch_dependents();
    pdl_wait();

    // After the wait, every input of the predecessor at once: this thread's xbc values, dt and
    // (lanes r < DS_ROWS) the gate of the first-tile row the lane finishes.
    const float dt_raw = load_any(dt, dt_dt, b * dts_b + h);
    const float z0 = row_lane ? to_f32(z[b * zs_b + h * P + p_mine]) : 0.0f;

    // 1. conv + SiLU: x channels of this block's rows (state shifted here: this block owns
    //    them), B and C channels of the group (state left for the group's last block or the
    //    consumer). Rounded to T like the unfused ops' outputs, so both paths see the same values.
    for (int i = i0; i < nx + 2 * N; i += blockDim.x) {
        const i64 ch = channel(i);
        ConvIn<KM> c;
        if (i == i0) c = c0;
        else conv_load(c, cs + ch * K, conv_w, w_dt, conv_b, cb_dt, ch, K);
        const float xv = to_f32(xr[ch]);
        const float v = to_f32(from_f32<T>(conv_out(c, xv, K)));
        if (i < nx) {
            sx[p_lo + i] = v;
            conv_store(c, cs + ch * K, xv, K);
        } else if (i - nx < N) {
            sB[i - nx] = v;
        } else {
            sC[i - nx - N] = v;
        }
    }
    __syncthreads();

    // 2. state update of this block's rows; y (+ D x) per row, then gated and/or scaled.
    const float dtv = process_dt(dt_raw, dtb, dp);
    const float decay = expf(dtv * a_h);
    float ss = 0.0f;
    // Four rows of headdim per warp at a time, the whole (row, d_state) tile loaded into
    // registers before any arithmetic: the update is a chain of DRAM latencies otherwise.
    for (int p0 = p_lo + warp; p0 < p_hi; p0 += DS_ROWS * WARPS) {
        const bool first = p0 == p_lo + warp;
        if (!first) load_tile(p0);
        float acc[DS_ROWS];
#pragma unroll
        for (int r = 0; r < DS_ROWS; ++r) {
            const int p = p0 + r * WARPS;
            acc[r] = 0.0f;
            if (p < p_hi) {  // uniform over the warp
                float* s = ssm_state + ((b * nheads + h) * P + p) * (i64)N;
                const float xdt = sx[p] * dtv;
#pragma unroll
                for (int j = 0; j < NS; ++j) {
                    const int n = lane + 32 * j;
                    if (n < N) {
                        const float v = sv[r][j] * decay + xdt * sB[n];
                        s[n] = v;
                        acc[r] += v * sC[n];
                    }
                }
            }
        }
        // Every lane gets every row's sum; lane r then finishes row r, so the rows' gates,
        // roundings and stores run side by side instead of one after another on lane 0.
#pragma unroll
        for (int r = 0; r < DS_ROWS; ++r) acc[r] = warp_sum(acc[r]);
        const int p = p0 + lane * WARPS;
        if (lane < DS_ROWS && p < p_hi) {
            float a = acc[0];
#pragma unroll
            for (int r = 1; r < DS_ROWS; ++r)
                if (lane == r) a = acc[r];
            const i64 c = h * P + p;
            const float y = to_f32(from_f32<T>(a + dv * sx[p]));
            const float gate = silu_f(first ? z0 : to_f32(z[b * zs_b + c]));
            const float yg = y * gate;
            ss += norm_before_gate ? y * y : yg * yg;
            if (mode == STEP_DEFER)
                out[b * d_inner + c] = from_f32<T>(yg * (first ? nw0 : load_any(norm_w, nw_dt, c)));
            else
                ybuf[b * d_inner + c] = norm_before_gate ? y : yg;
        }
    }
    if (mode == STEP_DEFER) {
        ss = block_sum(ss, scratch);
        if (threadIdx.x == 0) hsum[b * nparts + blockIdx.x] = ss;
        return;
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
        conv_state_push(cs + ch * K, to_f32(xr[ch]), K);
    }
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
    for (i64 e0 = threadIdx.x; e0 < gs; e0 += 8 * (i64)DS_THREADS) {
        float v[8], wv[8], gz[8];
        const int valid = (int)min((i64)8, (gs - e0 + DS_THREADS - 1) / DS_THREADS);
        load_many<8>(norm_w, nw_dt, g * gs + e0, DS_THREADS, valid, wv);
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const i64 c = g * gs + e0 + u * (i64)DS_THREADS;
            const bool in = u < valid;
            v[u] = in ? __ldcg(&ybuf[b * d_inner + c]) : 0.0f;
            gz[u] = in && norm_before_gate ? silu_f(to_f32(z[b * zs_b + c])) : 1.0f;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const i64 c = g * gs + e0 + u * (i64)DS_THREADS;
            if (e0 + u * (i64)DS_THREADS < gs)
                out[b * d_inner + c] = from_f32<T>(v[u] * inv * wv[u] * gz[u]);
        }
    }
}

// NS = d_state slots per lane (N <= 32 NS), KM = most conv taps (K <= KM); MINB = blocks per
// SM the registers must allow.
#define DECODE_STEP(NAME, T, NS, KM, MINB)                                                     \
    extern "C" __global__ void __launch_bounds__(DS_THREADS, MINB) NAME(                       \
        const T* xbc, i64 xs_b, const void* dt, int dt_dt, i64 dts_b, const T* z, i64 zs_b,    \
        float* conv_state, const void* conv_w, int w_dt, const void* conv_b, int cb_dt,        \
        float* ssm_state, const float* A, const void* D, int d_dt, const void* dt_bias,        \
        int db_dt, const void* norm_w, int nw_dt, T* out, float* ybuf, float* hsum,            \
        unsigned* count, i64 nheads, int P, int N, i64 ngroups, int K, float eps,              \
        int norm_before_gate, int split, int mode, int softplus, int clamp, float lo,          \
        float hi) {                                                                            \
        DtParams dp = {softplus, clamp, lo, hi};                                               \
        decode_step<T, NS, KM>(xbc, xs_b, dt, dt_dt, dts_b, z, zs_b, conv_state, conv_w, w_dt, conv_b, \
                       cb_dt, ssm_state, A, D, d_dt, dt_bias, db_dt, norm_w, nw_dt, out, ybuf, \
                       hsum, count, nheads, P, N, ngroups, K, eps, norm_before_gate, split,    \
                       mode, dp);                                                              \
    }
DECODE_STEP(mixer_decode_step_f32, float, 8, DS_MAX_K, 1)
DECODE_STEP(mixer_decode_step_f16, __half, 8, DS_MAX_K, 1)
DECODE_STEP(mixer_decode_step_bf16, __nv_bfloat16, 8, DS_MAX_K, 1)
// d_state <= 128 and d_conv <= 4 (every released Mamba-2 model): half the state registers and
// the conv taps of the real models, two blocks per SM, so that at batch 16 (1,024 blocks at
// 1.3b) one block's loads overlap another's arithmetic.
DECODE_STEP(mixer_decode_step_n128_f32, float, 4, 4, 2)
DECODE_STEP(mixer_decode_step_n128_f16, __half, 4, 4, 2)
DECODE_STEP(mixer_decode_step_n128_bf16, __nv_bfloat16, 4, 4, 2)
