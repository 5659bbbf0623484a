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
    // is one DRAM latency plus its reduction.
    for (i64 v0 = threadIdx.x; v0 < nvec; v0 += LIN_UNROLL * LIN_THREADS) {
        uint4 raw[LIN_UNROLL][LIN_ROWS];
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

#define LINEAR(NAME, T, BB)                                                                    \
    extern "C" __global__ void __launch_bounds__(LIN_THREADS)                                  \
        NAME(const T* x, i64 xs, int B, const T* w, const void* bias, int b_dt, void* y,       \
             int y_dt, i64 ys, i64 N, i64 K) {                                                 \
        linear_rows<T, BB>(x, xs, B, w, bias, b_dt, y, y_dt, ys, N, K);                        \
    }
#define LINEAR_ALL(BB)                                \
    LINEAR(linear_b##BB##_f32, float, BB)             \
    LINEAR(linear_b##BB##_f16, __half, BB)            \
    LINEAR(linear_b##BB##_bf16, __nv_bfloat16, BB)
LINEAR_ALL(1)
LINEAR_ALL(2)
LINEAR_ALL(4)
