// linear.cu: y = x · wᵀ (+ bias) for a few rows of x: the projections of a decode step, where the
// whole weight is streamed once per token and the GEMM tiles of cuBLAS leave bandwidth unused.
#include "common.cuh"

#define LIN_THREADS 256
#define LIN_ROWS 4  // output rows (rows of w) per block
#define LIN_UNROLL 2  // 16-byte vectors per row and thread in flight

// 16 bytes of T unpacked to f32: VEC<T> elements.
template <typename T> struct Vec16;
template <> struct Vec16<float> {
    static constexpr int N = 4;
    __device__ __forceinline__ static void unpack(const uint4& v, float* o) {
        o[0] = __uint_as_float(v.x); o[1] = __uint_as_float(v.y);
        o[2] = __uint_as_float(v.z); o[3] = __uint_as_float(v.w);
    }
};
template <> struct Vec16<__nv_bfloat16> {
    static constexpr int N = 8;
    __device__ __forceinline__ static void pair(unsigned u, float* o) {
        o[0] = __uint_as_float(u << 16);  // bf16 is the top half of an f32
        o[1] = __uint_as_float(u & 0xffff0000u);
    }
    __device__ __forceinline__ static void unpack(const uint4& v, float* o) {
        pair(v.x, o); pair(v.y, o + 2); pair(v.z, o + 4); pair(v.w, o + 6);
    }
};
template <> struct Vec16<__half> {
    static constexpr int N = 8;
    __device__ __forceinline__ static void pair(unsigned u, float* o) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u));
        o[0] = f.x; o[1] = f.y;
    }
    __device__ __forceinline__ static void unpack(const uint4& v, float* o) {
        pair(v.x, o); pair(v.y, o + 2); pair(v.z, o + 4); pair(v.w, o + 6);
    }
};

#define LIN_MAX_GROUPS 16  // groups of the norm in the gnorm prologue

// LIN_UNROLL vectors (from v0, 256 apart) of each of the block's LIN_ROWS weight rows.
template <typename T>
__device__ __forceinline__ void load_w(uint4 (&raw)[LIN_UNROLL][LIN_ROWS], const T* __restrict__ w,
                                       i64 n0, i64 N, i64 K, i64 v0, i64 nvec) {
#pragma unroll
    for (int u = 0; u < LIN_UNROLL; ++u) {
        const i64 v = v0 + (i64)u * LIN_THREADS;
#pragma unroll
        for (int r = 0; r < LIN_ROWS; ++r) {
            raw[u][r] = make_uint4(0, 0, 0, 0);
            if (v < nvec && n0 + r < N)
                raw[u][r] = __ldcs(reinterpret_cast<const uint4*>(w + (n0 + r) * K) + v);
        }
    }
}

// Sums each thread's LIN_ROWS x BB partial dot products over the block and stores rows
// n0 .. n0 + LIN_ROWS of y (+ bias).
template <int BB>
__device__ __forceinline__ void reduce_store(float (&acc)[LIN_ROWS][BB],
                                             float (&red)[LIN_THREADS / 32][LIN_ROWS * BB],
                                             i64 n0, int B, i64 N, const void* bias, int b_dt,
                                             void* y, int y_dt, i64 ys) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
        for (int b = 0; b < BB; ++b) {
            const float s = warp_sum(acc[r][b]);
            if (lane == 0) red[warp][r * BB + b] = s;
        }
    __syncthreads();
    for (int t = threadIdx.x; t < LIN_ROWS * BB; t += LIN_THREADS) {
        const int r = t / BB, b = t % BB;
        const i64 n = n0 + r;
        if (b >= B || n >= N) continue;
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < LIN_THREADS / 32; ++k) s += red[k][t];
        if (bias) s += load_any(bias, b_dt, n);
        store_any(y, y_dt, b * ys + n, s);
    }
}

// Elements of a prologue row per thread and pass: all their loads are issued before any use
// (a loop of dependent-looking loads pays an L2 latency per element).
#define PRO_REGS 16

// Prologue of `linear_resnorm`: rows b < B of x = rmsnorm(h) * norm_w, h = round(hidden +
// residual, ro_dt), into shared memory as T; block 0 also writes h to `rout`. The arithmetic and
// its order are those of rms_norm.cu `res_norm` (thread t takes elements t, t + 256, ... in
// turn; the same block reduction), so the fused and the unfused step give the same bits.
template <typename T, int BB>
__device__ void resnorm_prologue(const T* __restrict__ hidden, const void* __restrict__ res,
                                 int r_dt, const void* __restrict__ nw, int nw_dt,
                                 void* __restrict__ rout, int ro_dt, float eps, int B, i64 K,
                                 T* xs) {
    __shared__ float scratch[32];
    const bool write_res = blockIdx.x == 0 && rout;
    float ss[BB], inv[BB];
#pragma unroll
    for (int b = 0; b < BB; ++b) ss[b] = 0.0f;
    // h of row b for this thread's elements i0 + j * 256, j < valid.
    auto load_h = [&](int b, i64 i0, int valid, float (&h)[PRO_REGS]) {
#pragma unroll
        for (int j = 0; j < PRO_REGS; ++j)
            h[j] = j < valid ? to_f32(hidden[b * K + i0 + (i64)j * LIN_THREADS]) : 0.0f;
        if (res) {
            float r[PRO_REGS];
            load_many<PRO_REGS>(res, r_dt, b * K + i0, LIN_THREADS, valid, r);
#pragma unroll
            for (int j = 0; j < PRO_REGS; ++j) h[j] += r[j];
        }
#pragma unroll
        for (int j = 0; j < PRO_REGS; ++j) h[j] = round_any(ro_dt, h[j]);
    };
    auto valid_at = [&](i64 i0) {
        return (int)min((i64)PRO_REGS, (K - i0 + LIN_THREADS - 1) / LIN_THREADS);
    };
    for (i64 i0 = threadIdx.x; i0 < K; i0 += (i64)PRO_REGS * LIN_THREADS) {
        const int valid = valid_at(i0);
#pragma unroll
        for (int b = 0; b < BB; ++b) {
            if (b >= B) break;
            float h[PRO_REGS];
            load_h(b, i0, valid, h);
#pragma unroll
            for (int j = 0; j < PRO_REGS; ++j) {
                ss[b] += h[j] * h[j];
                if (write_res && j < valid)
                    store_any(rout, ro_dt, b * K + i0 + (i64)j * LIN_THREADS, h[j]);
            }
        }
    }
#pragma unroll
    for (int b = 0; b < BB; ++b) {
        const float t = block_sum(ss[b], scratch);
        inv[b] = 1.0f / sqrtf(t / (float)K + eps);
    }
    for (i64 i0 = threadIdx.x; i0 < K; i0 += (i64)PRO_REGS * LIN_THREADS) {
        const int valid = valid_at(i0);
        float wv[PRO_REGS];
        load_many<PRO_REGS>(nw, nw_dt, i0, LIN_THREADS, valid, wv);
#pragma unroll
        for (int b = 0; b < BB; ++b) {
            if (b >= B) break;
            float h[PRO_REGS];
            load_h(b, i0, valid, h);  // from L1/L2: read just above
#pragma unroll
            for (int j = 0; j < PRO_REGS; ++j)
                if (j < valid) xs[b * K + i0 + (i64)j * LIN_THREADS] = from_f32<T>(h[j] * inv[b] * wv[j]);
        }
    }
}

// Prologue of `linear_gnorm`: rows b < B of x = the grouped gated RMSNorm of the mixer's y, from
// the fused step's f32 y (`ybuf`, already gated unless norm_before_gate) and its partial sums of
// squares (`hsum`, `nparts` per row, the parts of group g contiguous), into shared memory as T.
// The expression and the group total (`warp_total`) are those of the fused step's own norm.
template <typename T, int BB>
__device__ void gnorm_prologue(const float* __restrict__ ybuf, const float* __restrict__ hsum,
                               i64 nparts, i64 ngroups, const T* __restrict__ z, i64 zs,
                               const void* __restrict__ nw, int nw_dt, float eps, int nbg, int B,
                               i64 K, T* xs) {
    __shared__ float ginv[BB * LIN_MAX_GROUPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 ppg = nparts / ngroups, gs = K / ngroups;
    for (i64 q = warp; q < (i64)B * ngroups; q += LIN_THREADS / 32) {
        const i64 b = q / ngroups, g = q % ngroups;
        const float total = warp_total(hsum + b * nparts + g * ppg, ppg);
        if (lane == 0) ginv[q] = 1.0f / sqrtf(total / (float)gs + eps);
    }
    __syncthreads();
    for (i64 i0 = threadIdx.x; i0 < K; i0 += (i64)PRO_REGS * LIN_THREADS) {
        const int valid = (int)min((i64)PRO_REGS, (K - i0 + LIN_THREADS - 1) / LIN_THREADS);
        float wv[PRO_REGS];
        load_many<PRO_REGS>(nw, nw_dt, i0, LIN_THREADS, valid, wv);
#pragma unroll
        for (int b = 0; b < BB; ++b) {
            if (b >= B) break;
            float v[PRO_REGS], gz[PRO_REGS];
#pragma unroll
            for (int j = 0; j < PRO_REGS; ++j) {
                const i64 i = i0 + (i64)j * LIN_THREADS;
                v[j] = j < valid ? __ldcg(&ybuf[b * K + i]) : 0.0f;
                gz[j] = j < valid && nbg ? to_f32(z[b * zs + i]) : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < PRO_REGS; ++j) {
                const i64 i = i0 + (i64)j * LIN_THREADS;
                if (j < valid) {
                    const float g = nbg ? silu_f(gz[j]) : 1.0f;
                    xs[b * K + i] = from_f32<T>(v[j] * ginv[b * ngroups + i / gs] * wv[j] * g);
                }
            }
        }
    }
}

#define PRO_RESNORM 1
#define PRO_GNORM 2

struct ProArgs {
    // PRO_RESNORM: x is the hidden state; residual, norm weight, residual output
    const void* res; int r_dt; void* rout; int ro_dt;
    // PRO_GNORM: the fused step's scratch and the gate
    const float* ybuf; const float* hsum; i64 nparts; i64 ngroups; const void* z; i64 zs;
    int nbg;
    // both
    const void* nw; int nw_dt; float eps;
};

// linear_b<BB>_<dtype>
// Reference: linear.rs `linear_slow` (f32 accumulation, output rounded once).
// Arguments:
//   x    (B, K) T, row stride xs (elements); B <= BB (1, 2 or 4: beyond, cuBLAS's GEMM tiles
//        win, see BENCHMARKS.md); rows 16-byte aligned
//   w    (N, K) T contiguous, 16-byte aligned; K a multiple of 16 bytes' worth of T
//   bias (N) dtype b_dt, or null
//   y    (B, N) dtype y_dt (T, or f32 for logits), row stride ys (output)
// Block layout: grid (ceil(N / LIN_ROWS)), 256 threads. The block's threads walk K together in
//   16-byte vectors (thread t takes vectors t, t + 256, ...: each warp load is 512 contiguous
//   bytes of a weight row), so the weight is read exactly once, streaming (__ldcs: it is not
//   reused, x is); each thread keeps LIN_ROWS x BB f32 partial sums, x vectors are reused across
//   the LIN_ROWS rows from registers. Warp shuffles, then shared memory, reduce across threads.
// Shared memory: 8 warps x LIN_ROWS x BB floats = 512 B at BB = 4.
template <typename T, int BB>
__device__ void linear_rows(const T* __restrict__ x, i64 xs, int B, const T* __restrict__ w,
                            const void* __restrict__ bias, int b_dt, void* __restrict__ y,
                            int y_dt, i64 ys, i64 N, i64 K) {
    constexpr int V = Vec16<T>::N;
    __shared__ float red[LIN_THREADS / 32][LIN_ROWS * BB];
    const i64 n0 = (i64)blockIdx.x * LIN_ROWS;
    const i64 nvec = K / V;
    float acc[LIN_ROWS][BB];
#pragma unroll
    for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
        for (int b = 0; b < BB; ++b) acc[r][b] = 0.0f;

    // LIN_UNROLL vectors per row per iteration, all loads issued before the arithmetic: a
    // row of 2048 bf16 is a single vector per thread, so without this the block's whole life
    // is one DRAM latency plus its reduction. The first ones are loaded before `pdl_wait` (no
    // kernel writes weights): under programmatic dependent launch they overlap the previous
    // kernel's tail.
    uint4 raw[LIN_UNROLL][LIN_ROWS];
    load_w<T>(raw, w, n0, N, K, threadIdx.x, nvec);
    pdl_launch_dependents();
    pdl_wait();
    for (i64 v0 = threadIdx.x; v0 < nvec; v0 += LIN_UNROLL * LIN_THREADS) {
        if (v0 != threadIdx.x) load_w<T>(raw, w, n0, N, K, v0, nvec);
#pragma unroll
        for (int u = 0; u < LIN_UNROLL; ++u) {
            const i64 v = v0 + (i64)u * LIN_THREADS;
            if (v >= nvec) break;
            float wf[LIN_ROWS][V];
#pragma unroll
            for (int r = 0; r < LIN_ROWS; ++r) Vec16<T>::unpack(raw[u][r], wf[r]);
#pragma unroll
            for (int b = 0; b < BB; ++b) {
                if (b < B) {
                    float xf[V];
                    Vec16<T>::unpack(__ldg(reinterpret_cast<const uint4*>(x + b * xs) + v), xf);
#pragma unroll
                    for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
                        for (int e = 0; e < V; ++e) acc[r][b] = fmaf(wf[r][e], xf[e], acc[r][b]);
                }
            }
        }
    }
    reduce_store<BB>(acc, red, n0, B, N, bias, b_dt, y, y_dt, ys);
}

// linear_resnorm_b<BB>_<dtype>, linear_gnorm_b<BB>_<dtype>: the projections of a captured
// decode step with the norm in front of them computed in a prologue.
// Reference: rms_norm.rs `rms_norm_residual_slow` then linear.rs `linear_slow` (resnorm: x =
//   the normed hidden state, block 0 writing the residual), or `gated_rms_norm_slow` then
//   `linear_slow` (gnorm: x = the mixer's normed, gated y).
// Arguments: w, bias, y, N, K as `linear_b`, y contiguous rows (ys) and:
//   resnorm: hidden (B, K) T contiguous, res (B, K) dtype r_dt or null, rout (B, K) dtype ro_dt
//            (written by block 0), nw (K) T
//   gnorm:   ybuf (B, K) f32, hsum (B, nparts) f32, z (B, K) T with row stride zs, nw (K) T
// Block layout: a persistent grid (a few blocks per SM, sized by the host from the occupancy),
//   256 threads. Each block computes the normalised x once into shared memory (a few thousand
//   elements per row from L2: once per block, not once per LIN_ROWS outputs), then walks its
//   share of the output rows LIN_ROWS at a time, one 16-byte weight vector per row and thread
//   per chunk, the next chunk's weights loaded while the current one is multiplied (the block
//   lives through several row groups, so without this each chunk pays a DRAM latency). The
//   first chunk is loaded before `pdl_wait`: no kernel writes weights.
// Shared memory: B x K T (dynamic: 4 KiB for one row of 2048 bf16), 8 x LIN_ROWS x BB floats,
//   BB x 16 floats.
template <typename T, int BB, int MODE>
__device__ void linear_rows_pro(const T* __restrict__ x, int B, const T* __restrict__ w,
                                const void* __restrict__ bias, int b_dt, void* __restrict__ y,
                                int y_dt, i64 ys, i64 N, i64 K, const ProArgs& pa) {
    constexpr int V = Vec16<T>::N;
    __shared__ float red[LIN_THREADS / 32][LIN_ROWS * BB];
    extern __shared__ uint4 lin_xs[];
    const i64 nvec = K / V;
    const i64 n_rg = (N + LIN_ROWS - 1) / LIN_ROWS;
    const i64 per_rg = (nvec + LIN_THREADS - 1) / LIN_THREADS;  // chunks per row group
    const i64 my_rg = blockIdx.x < n_rg ? (n_rg - 1 - blockIdx.x) / gridDim.x + 1 : 0;
    const i64 total = my_rg * per_rg;
    // Chunk t of this block: row group blockIdx.x + (t / per_rg) * gridDim.x, vectors
    // (t % per_rg) * 256 + threadIdx.x of its LIN_ROWS rows.
    auto load = [&](i64 t, uint4 (&dst)[LIN_ROWS]) {
        const i64 n0 = (blockIdx.x + (t / per_rg) * (i64)gridDim.x) * LIN_ROWS;
        const i64 v = (t % per_rg) * LIN_THREADS + threadIdx.x;
#pragma unroll
        for (int r = 0; r < LIN_ROWS; ++r) {
            dst[r] = make_uint4(0, 0, 0, 0);
            if (t < total && v < nvec && n0 + r < N)
                dst[r] = __ldcs(reinterpret_cast<const uint4*>(w + (n0 + r) * K) + v);
        }
    };
    uint4 cur[LIN_ROWS], nxt[LIN_ROWS];
    load(0, cur);
    pdl_launch_dependents();
    pdl_wait();
    T* xs = reinterpret_cast<T*>(lin_xs);
    if (MODE == PRO_RESNORM)
        resnorm_prologue<T, BB>(x, pa.res, pa.r_dt, pa.nw, pa.nw_dt, pa.rout, pa.ro_dt, pa.eps,
                                B, K, xs);
    else
        gnorm_prologue<T, BB>(pa.ybuf, pa.hsum, pa.nparts, pa.ngroups,
                              reinterpret_cast<const T*>(pa.z), pa.zs, pa.nw, pa.nw_dt, pa.eps,
                              pa.nbg, B, K, xs);
    __syncthreads();

    float acc[LIN_ROWS][BB];
#pragma unroll
    for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
        for (int b = 0; b < BB; ++b) acc[r][b] = 0.0f;
    for (i64 t = 0; t < total; ++t) {
        load(t + 1, nxt);
        const i64 c = t % per_rg;
        const i64 v = c * LIN_THREADS + threadIdx.x;
        if (v < nvec) {
            float wf[LIN_ROWS][V];
#pragma unroll
            for (int r = 0; r < LIN_ROWS; ++r) Vec16<T>::unpack(cur[r], wf[r]);
#pragma unroll
            for (int b = 0; b < BB; ++b) {
                if (b < B) {
                    float xf[V];
                    Vec16<T>::unpack(reinterpret_cast<const uint4*>(xs + b * K)[v], xf);
#pragma unroll
                    for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
                        for (int e = 0; e < V; ++e) acc[r][b] = fmaf(wf[r][e], xf[e], acc[r][b]);
                }
            }
        }
        if (c == per_rg - 1) {
            const i64 n0 = (blockIdx.x + (t / per_rg) * (i64)gridDim.x) * LIN_ROWS;
            reduce_store<BB>(acc, red, n0, B, N, bias, b_dt, y, y_dt, ys);
            __syncthreads();  // `red` is reused by the next row group
#pragma unroll
            for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
                for (int b = 0; b < BB; ++b) acc[r][b] = 0.0f;
        }
#pragma unroll
        for (int r = 0; r < LIN_ROWS; ++r) cur[r] = nxt[r];
    }
}

#define LINEAR(NAME, T, BB)                                                                    \
    extern "C" __global__ void __launch_bounds__(LIN_THREADS)                                  \
        NAME(const T* x, i64 xs, int B, const T* w, const void* bias, int b_dt, void* y,       \
             int y_dt, i64 ys, i64 N, i64 K) {                                                 \
        linear_rows<T, BB>(x, xs, B, w, bias, b_dt, y, y_dt, ys, N, K);                        \
    }
#define LINEAR_RESNORM(NAME, T, BB)                                                            \
    extern "C" __global__ void __launch_bounds__(LIN_THREADS)                                  \
        NAME(const T* hidden, const void* res, int r_dt, void* rout, int ro_dt, const void* nw, \
             int nw_dt, float eps, int B, const T* w, const void* bias, int b_dt, void* y,     \
             int y_dt, i64 ys, i64 N, i64 K) {                                                 \
        ProArgs pa = {};                                                                       \
        pa.res = res; pa.r_dt = r_dt; pa.rout = rout; pa.ro_dt = ro_dt;                        \
        pa.nw = nw; pa.nw_dt = nw_dt; pa.eps = eps;                                            \
        linear_rows_pro<T, BB, PRO_RESNORM>(hidden, B, w, bias, b_dt, y, y_dt, ys, N, K, pa);  \
    }
#define LINEAR_GNORM(NAME, T, BB)                                                              \
    extern "C" __global__ void __launch_bounds__(LIN_THREADS)                                  \
        NAME(const float* ybuf, const float* hsum, i64 nparts, i64 ngroups, const T* z,        \
             i64 zs, int nbg, const void* nw, int nw_dt, float eps, int B, const T* w,         \
             const void* bias, int b_dt, void* y, int y_dt, i64 ys, i64 N, i64 K) {            \
        ProArgs pa = {};                                                                       \
        pa.ybuf = ybuf; pa.hsum = hsum; pa.nparts = nparts; pa.ngroups = ngroups;              \
        pa.z = z; pa.zs = zs; pa.nbg = nbg; pa.nw = nw; pa.nw_dt = nw_dt; pa.eps = eps;        \
        linear_rows_pro<T, BB, PRO_GNORM>(nullptr, B, w, bias, b_dt, y, y_dt, ys, N, K, pa);   \
    }
#define LINEAR_ALL(BB)                                                   \
    LINEAR(linear_b##BB##_f32, float, BB)                                \
    LINEAR(linear_b##BB##_f16, __half, BB)                               \
    LINEAR(linear_b##BB##_bf16, __nv_bfloat16, BB)                       \
    LINEAR_RESNORM(linear_resnorm_b##BB##_f32, float, BB)                \
    LINEAR_RESNORM(linear_resnorm_b##BB##_f16, __half, BB)               \
    LINEAR_RESNORM(linear_resnorm_b##BB##_bf16, __nv_bfloat16, BB)       \
    LINEAR_GNORM(linear_gnorm_b##BB##_f32, float, BB)                    \
    LINEAR_GNORM(linear_gnorm_b##BB##_f16, __half, BB)                   \
    LINEAR_GNORM(linear_gnorm_b##BB##_bf16, __nv_bfloat16, BB)
LINEAR_ALL(1)
LINEAR_ALL(2)
LINEAR_ALL(4)
