// linear.cu: y = x · wᵀ (+ bias) for a few rows of x: the projections of a decode step, where the
// whole weight is streamed once per token and the GEMM tiles of cuBLAS leave bandwidth unused.
#include "common.cuh"

#define LIN_THREADS 256
#define LIN_ROWS 4  // output rows (rows of w) per block
#define LIN_UNROLL 2  // 16-byte vectors per row and thread in flight
#define PP_REGS 4     // partial sums of squares per row and thread held in registers

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

// What a projection does around its dot products (`linear_rows` template argument). The two
// epilogues let a captured decode step drop its norm kernels: an RMSNorm is a per-row scale of
// its input, so the producer writes the input times the norm weight, unscaled, with partial
// sums of squares, and the projection that consumes it multiplies its dot products by the row's
// 1 / rms at the end (by then the partial sums have long arrived).
#define EPI_PLAIN 0     // y = x · wᵀ (+ bias)
#define EPI_SCALED 1    // y = (x · wᵀ) / rms (+ bias), rms from `psum` (see EpiArgs)
#define EPI_RESIDUAL 2  // as EPI_SCALED (unscaled when psum is null), then the residual stream
                        // of the next block: o = T(y), h = round(o + res, ro_dt) to rout,
                        // y = T(h * nw), this block's sum of h² to psum_out; block 0 also shifts
                        // the B/C conv states that the mixer step before it left unshifted

struct EpiArgs {
    // EPI_SCALED / EPI_RESIDUAL: rms of row b = sqrt(sum(psum[b, :np]) / dim + eps); psum
    // (B, np) f32, or null for no scale (EPI_RESIDUAL only)
    const float* psum; i64 np; float dim; float eps;
    // EPI_RESIDUAL: res, rout (B, N) contiguous of r_dt / ro_dt (distinct buffers); nw (N) of
    // nw_dt (the next norm's weight); psum_out (B, gridDim.x) f32
    const void* res; int r_dt; void* rout; int ro_dt; const void* nw; int nw_dt;
    float* psum_out;
    // EPI_RESIDUAL: conv_state (B, conv_dim, kc) f32 or null (no shift); its channels ch0 ..
    // ch0 + nch take their next value from xbc (B, conv_dim) T, row stride xbc_s
    float* conv_state; const void* xbc; i64 xbc_s; i64 conv_dim; i64 ch0; int nch; int kc;
};

// The operands of the epilogue of output (row n0 + t / BB, sequence t % BB) for thread
// t < LIN_ROWS x BB, loaded before the products so that no load sits between the reduction and
// the stores: bias and next norm weight before `pdl_wait` (weights), the residual after it.
struct EpiVals {
    float bias, nw, res;
};

// Sums each thread's LIN_ROWS x BB partial dot products (and, when scaled, its BB partial sums
// of `psum`) over the block and stores rows n0 .. n0 + LIN_ROWS of y through the epilogue.
// `ev` holds this thread's epilogue operands, loaded before the products (see EpiVals).
template <typename T, int BB, int EPI>
__device__ __forceinline__ void reduce_store(float (&acc)[LIN_ROWS][BB], const float (&pp)[BB],
                                             float (&red)[LIN_THREADS / 32][(LIN_ROWS + 1) * BB],
                                             i64 n0, int B, i64 N, const EpiVals& ev, void* y,
                                             int y_dt, i64 ys, const EpiArgs& ea) {
    __shared__ float hsq[LIN_ROWS * BB];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool scaled = EPI != EPI_PLAIN && ea.psum;
#pragma unroll
    for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
        for (int b = 0; b < BB; ++b) {
            const float s = warp_sum(acc[r][b]);
            if (lane == 0) red[warp][r * BB + b] = s;
        }
    if (scaled) {
#pragma unroll
        for (int b = 0; b < BB; ++b) {
            const float s = warp_sum(pp[b]);
            if (lane == 0) red[warp][LIN_ROWS * BB + b] = s;
        }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < LIN_ROWS * BB; t += LIN_THREADS) {
        const int r = t / BB, b = t % BB;
        const i64 n = n0 + r;
        if (EPI == EPI_RESIDUAL) hsq[t] = 0.0f;
        if (b >= B || n >= N) continue;
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < LIN_THREADS / 32; ++k) s += red[k][t];
        if (scaled) {
            float tot = 0.0f;
#pragma unroll
            for (int k = 0; k < LIN_THREADS / 32; ++k) tot += red[k][LIN_ROWS * BB + b];
            s *= 1.0f / sqrtf(tot / ea.dim + ea.eps);
        }
        s += ev.bias;
        if (EPI == EPI_RESIDUAL) {
            const float o = to_f32(from_f32<T>(s));
            const float hv = round_any(ea.ro_dt, o + ev.res);
            store_any(ea.rout, ea.ro_dt, b * N + n, hv);
            reinterpret_cast<T*>(y)[b * ys + n] = from_f32<T>(hv * ev.nw);
            hsq[t] = hv * hv;
        } else {
            store_any(y, y_dt, b * ys + n, s);
        }
    }
    if (EPI == EPI_RESIDUAL) {
        __syncthreads();
        if (threadIdx.x < B) {
            float s = 0.0f;
#pragma unroll
            for (int r = 0; r < LIN_ROWS; ++r) s += hsq[r * BB + threadIdx.x];
            ea.psum_out[threadIdx.x * (i64)gridDim.x + blockIdx.x] = s;
        }
    }
}

template <int BB, int EPI>
__device__ __forceinline__ void epi_weights(EpiVals& ev, i64 n0, i64 N, const void* bias,
                                            int b_dt, const EpiArgs& ea) {
    const int t = threadIdx.x, r = t / BB;
    const bool in = t < LIN_ROWS * BB && n0 + r < N;
    ev.bias = in && bias ? load_any(bias, b_dt, n0 + r) : 0.0f;
    ev.nw = in && EPI == EPI_RESIDUAL ? load_any(ea.nw, ea.nw_dt, n0 + r) : 0.0f;
    ev.res = 0.0f;
}

template <int BB, int EPI>
__device__ __forceinline__ void epi_residual(EpiVals& ev, i64 n0, int B, i64 N,
                                             const EpiArgs& ea) {
    const int t = threadIdx.x, r = t / BB, b = t % BB;
    if (EPI == EPI_RESIDUAL && t < LIN_ROWS * BB && b < B && n0 + r < N)
        ev.res = load_any(ea.res, ea.r_dt, b * N + n0 + r);
}

// Block 0 of an EPI_RESIDUAL projection: the shift of the B/C conv states (see STEP_DEFER in
// decode_step.cu), after `pdl_wait`: every block of the step has read them by then.
template <typename T>
__device__ __forceinline__ void conv_shift_bc(int B, const EpiArgs& ea) {
    const T* xbc = reinterpret_cast<const T*>(ea.xbc);
    for (i64 i = threadIdx.x; i < (i64)B * ea.nch; i += LIN_THREADS) {
        const i64 b = i / ea.nch, ch = ea.ch0 + i % ea.nch;
        conv_state_push(ea.conv_state + (b * ea.conv_dim + ch) * ea.kc,
                        to_f32(xbc[b * ea.xbc_s + ch]), ea.kc);
    }
}

// linear_b<BB>_<dtype>, linear_scaled_b<BB>_<dtype>, linear_res_b<BB>_<dtype>
// Reference: linear.rs `linear_slow` (f32 accumulation, output rounded once). The scaled and
//   residual variants are the projections of a captured decode step (graph.rs, "epilogue
//   norms"): scaled = `rms_norm_residual_slow`'s normalisation then `linear_slow`, with x the
//   unscaled h * norm_w; residual = `linear_slow` (after `gated_rms_norm_slow`'s scale, x the
//   step's y * gate * norm_w) then the next block's residual add, its norm input h * norm_w and
//   partial sums of h² (EpiArgs).
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
//   The scaled variants read their partial sums of squares right after `pdl_wait` and apply
//   the scale after the reduction, so the norm costs no latency in front of the products.
// Shared memory: 8 warps x (LIN_ROWS + 1) x BB floats + LIN_ROWS x BB floats = 704 B at BB = 4.
template <typename T, int BB, int EPI>
__device__ void linear_rows(const T* __restrict__ x, i64 xs, int B, const T* __restrict__ w,
                            const void* __restrict__ bias, int b_dt, void* __restrict__ y,
                            int y_dt, i64 ys, i64 N, i64 K, const EpiArgs& ea) {
    constexpr int V = Vec16<T>::N;
    __shared__ float red[LIN_THREADS / 32][(LIN_ROWS + 1) * BB];
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
    EpiVals ev;
    epi_weights<BB, EPI>(ev, n0, N, bias, b_dt, ea);
    pdl_launch_dependents();
    pdl_wait();
    // The partial sums of squares of the scale and the residual: loaded now into registers,
    // used only after the products (a sum here would stall before the first product).
    const bool scaled = EPI != EPI_PLAIN && ea.psum;
    float pv[BB][PP_REGS];
#pragma unroll
    for (int b = 0; b < BB; ++b)
#pragma unroll
        for (int u = 0; u < PP_REGS; ++u) {
            const i64 j = threadIdx.x + (i64)u * LIN_THREADS;
            pv[b][u] = scaled && b < B && j < ea.np ? __ldcg(&ea.psum[b * ea.np + j]) : 0.0f;
        }
    epi_residual<BB, EPI>(ev, n0, B, N, ea);
    if (EPI == EPI_RESIDUAL && ea.conv_state && blockIdx.x == 0) conv_shift_bc<T>(B, ea);
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
    float pp[BB];
#pragma unroll
    for (int b = 0; b < BB; ++b) {
        pp[b] = 0.0f;
#pragma unroll
        for (int u = 0; u < PP_REGS; ++u) pp[b] += pv[b][u];
        if (scaled && b < B)  // parts beyond the registers' share (np > 1024)
            for (i64 j = threadIdx.x + (i64)PP_REGS * LIN_THREADS; j < ea.np; j += LIN_THREADS)
                pp[b] += __ldcg(&ea.psum[b * ea.np + j]);
    }
    reduce_store<T, BB, EPI>(acc, pp, red, n0, B, N, ev, y, y_dt, ys, ea);
}

#define LINEAR(NAME, T, BB)                                                                    \
    extern "C" __global__ void __launch_bounds__(LIN_THREADS)                                  \
        NAME(const T* x, i64 xs, int B, const T* w, const void* bias, int b_dt, void* y,       \
             int y_dt, i64 ys, i64 N, i64 K) {                                                 \
        const EpiArgs ea = {};                                                                 \
        linear_rows<T, BB, EPI_PLAIN>(x, xs, B, w, bias, b_dt, y, y_dt, ys, N, K, ea);         \
    }
#define LINEAR_SCALED(NAME, T, BB)                                                             \
    extern "C" __global__ void __launch_bounds__(LIN_THREADS)                                  \
        NAME(const T* x, i64 xs, int B, const T* w, const void* bias, int b_dt, void* y,       \
             int y_dt, i64 ys, i64 N, i64 K, const float* psum, i64 np, float dim, float eps) { \
        EpiArgs ea = {};                                                                       \
        ea.psum = psum; ea.np = np; ea.dim = dim; ea.eps = eps;                                \
        linear_rows<T, BB, EPI_SCALED>(x, xs, B, w, bias, b_dt, y, y_dt, ys, N, K, ea);        \
    }
#define LINEAR_RESIDUAL(NAME, T, BB)                                                           \
    extern "C" __global__ void __launch_bounds__(LIN_THREADS)                                  \
        NAME(const T* x, i64 xs, int B, const T* w, const void* bias, int b_dt, void* y,       \
             i64 ys, i64 N, i64 K, const float* psum, i64 np, float dim, float eps,            \
             const void* res, int r_dt, void* rout, int ro_dt, const void* nw, int nw_dt,      \
             float* psum_out, float* conv_state, const T* xbc, i64 xbc_s, i64 conv_dim,        \
             i64 ch0, int nch, int kc) {                                                       \
        EpiArgs ea = {};                                                                       \
        ea.psum = psum; ea.np = np; ea.dim = dim; ea.eps = eps;                                \
        ea.res = res; ea.r_dt = r_dt; ea.rout = rout; ea.ro_dt = ro_dt;                        \
        ea.nw = nw; ea.nw_dt = nw_dt; ea.psum_out = psum_out;                                  \
        ea.conv_state = conv_state; ea.xbc = xbc; ea.xbc_s = xbc_s; ea.conv_dim = conv_dim;    \
        ea.ch0 = ch0; ea.nch = nch; ea.kc = kc;                                                \
        linear_rows<T, BB, EPI_RESIDUAL>(x, xs, B, w, bias, b_dt, y, 0, ys, N, K, ea);         \
    }
#define LINEAR_ALL(BB)                                                   \
    LINEAR(linear_b##BB##_f32, float, BB)                                \
    LINEAR(linear_b##BB##_f16, __half, BB)                               \
    LINEAR(linear_b##BB##_bf16, __nv_bfloat16, BB)                       \
    LINEAR_SCALED(linear_scaled_b##BB##_f32, float, BB)                  \
    LINEAR_SCALED(linear_scaled_b##BB##_f16, __half, BB)                 \
    LINEAR_SCALED(linear_scaled_b##BB##_bf16, __nv_bfloat16, BB)         \
    LINEAR_RESIDUAL(linear_res_b##BB##_f32, float, BB)                   \
    LINEAR_RESIDUAL(linear_res_b##BB##_f16, __half, BB)                  \
    LINEAR_RESIDUAL(linear_res_b##BB##_bf16, __nv_bfloat16, BB)
LINEAR_ALL(1)
LINEAR_ALL(2)
LINEAR_ALL(4)
