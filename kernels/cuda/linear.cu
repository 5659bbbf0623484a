// linear.cu: y = x · wᵀ (+ bias) for a few rows of x: the projections of a decode step, where the
// whole weight is streamed once per token and the GEMM tiles of cuBLAS leave bandwidth unused.
#include "common.cuh"

#define LIN_THREADS 256
#define LIN_ROWS 4  // output rows (rows of w) per group: multiplied and reduced together

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

// The operands of the epilogue of output (row n0 + t / BB, sequence t % BB) of a row group for
// thread t < LIN_ROWS x BB, loaded by that thread right after it stored the previous group (the
// first group's: bias and next norm weight before `pdl_wait`, the residual after it), so that
// no load sits between a group's reduction and its stores.
struct EpiVals {
    float bias, nw, res;
};

template <int BB, int EPI>
__device__ __forceinline__ void epi_weights(EpiVals& ev, i64 n0, i64 n_end, const void* bias,
                                            int b_dt, const EpiArgs& ea) {
    const int t = threadIdx.x, r = t / BB;
    const bool in = t < LIN_ROWS * BB && n0 + r < n_end;
    ev.bias = in && bias ? load_any(bias, b_dt, n0 + r) : 0.0f;
    ev.nw = in && EPI == EPI_RESIDUAL ? load_any(ea.nw, ea.nw_dt, n0 + r) : 0.0f;
    ev.res = 0.0f;
}

template <int BB, int EPI>
__device__ __forceinline__ void epi_residual(EpiVals& ev, i64 n0, i64 n_end, int B, i64 N,
                                             const EpiArgs& ea) {
    const int t = threadIdx.x, r = t / BB, b = t % BB;
    if (EPI == EPI_RESIDUAL && t < LIN_ROWS * BB && b < B && n0 + r < n_end)
        ev.res = load_any(ea.res, ea.r_dt, b * N + n0 + r);
}

// Sums each thread's partial dot products of one row group (rows n0 .. n0 + LIN_ROWS, those
// below n_end) over the block and stores them through the epilogue; thread t < LIN_ROWS x BB
// finishes output (row n0 + t / BB, sequence t % BB) and, for EPI_RESIDUAL, adds its h² to
// `hsq`. One barrier per group: `red` is the buffer of this group's parity, and the barrier of
// the next group orders its writers after this group's readers.
template <typename T, int BB, int EPI>
__device__ __forceinline__ void finish_group(float (&acc)[LIN_ROWS][BB],
                                             float (&red)[LIN_THREADS / 32][LIN_ROWS * BB],
                                             i64 n0, i64 n_end, int B, i64 N, const EpiVals& ev,
                                             const float* inv_rms, void* y, int y_dt, i64 ys,
                                             const EpiArgs& ea, float& hsq) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
        for (int b = 0; b < BB; ++b) {
            const float s = warp_sum(acc[r][b]);
            if (lane == 0) red[warp][r * BB + b] = s;
            acc[r][b] = 0.0f;
        }
    __syncthreads();
    const int t = threadIdx.x, r = t / BB, b = t % BB;
    const i64 n = n0 + r;
    if (t >= LIN_ROWS * BB || b >= B || n >= n_end) return;
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < LIN_THREADS / 32; ++k) s += red[k][t];
    if (EPI != EPI_PLAIN && ea.psum) s *= inv_rms[b];
    s += ev.bias;
    if (EPI == EPI_RESIDUAL) {
        const float o = to_f32(from_f32<T>(s));
        const float hv = round_any(ea.ro_dt, o + ev.res);
        store_any(ea.rout, ea.ro_dt, b * N + n, hv);
        reinterpret_cast<T*>(y)[b * ys + n] = from_f32<T>(hv * ev.nw);
        hsq += hv * hv;
    } else {
        store_any(y, y_dt, b * ys + n, s);
    }
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
//   w    (N, K) T contiguous, 16-byte aligned; K a multiple of 16 bytes' worth of T, K / (16
//        bytes' worth) < 2^31
//   bias (N) dtype b_dt, or null
//   y    (B, N) dtype y_dt (T, or f32 for logits), row stride ys (output)
// Block layout: any grid (the host launches as many blocks as the GPU holds at once, or one
//   per LIN_ROWS rows when the weight is smaller), 256 threads. Block i owns the contiguous
//   rows [N i / G, N (i + 1) / G), balanced to a row whatever N, and walks them in groups of
//   LIN_ROWS rows. A group is cut along K into tiles of 256 16-byte vectors per row (thread t
//   takes vector t of the tile: each warp load is 512 contiguous bytes of a row); the next tile's
//   weights and x are loaded into registers before the current one is multiplied, so a block
//   keeps two tiles in flight and a group's reduction overlaps the next group's loads (the
//   epilogue operands: EpiVals). Weights stream (__ldcs: read once), x is reused
//   from L1/registers. The first tile is loaded before `pdl_wait` (no kernel writes weights):
//   under programmatic dependent launch it overlaps the previous kernel's tail. The scaled
//   variants reduce their partial sums of squares once per block, while that tile is in flight.
// Shared memory: 2 x 8 warps x LIN_ROWS x BB floats (red) + 9 x BB (inv_rms, parts) +
//   LIN_ROWS x BB (hsq_all) = 308 floats, 1.2 KiB at BB = 4 (ptxas: 1,232 bytes).
template <typename T, int BB, int EPI>
__device__ void linear_rows(const T* __restrict__ x, i64 xs, int B, const T* __restrict__ w,
                            const void* __restrict__ bias, int b_dt, void* __restrict__ y,
                            int y_dt, i64 ys, i64 N, i64 K, const EpiArgs& ea) {
    constexpr int V = Vec16<T>::N;
    __shared__ float red[2][LIN_THREADS / 32][LIN_ROWS * BB];
    __shared__ float inv_rms[BB], parts[LIN_THREADS / 32][BB], hsq_all[LIN_ROWS * BB];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nvec = (int)(K / V);
    const int nchunk = (nvec + LIN_THREADS - 1) / LIN_THREADS;
    const i64 r_lo = N * blockIdx.x / gridDim.x, r_hi = N * (blockIdx.x + 1) / gridDim.x;
    const int ngrp = (int)((r_hi - r_lo + LIN_ROWS - 1) / LIN_ROWS);
    const int ntile = ngrp * nchunk;

    // Tile (group gi, chunk c): rows r_lo + LIN_ROWS gi + r, vectors c * 256 + tid.
    auto load_w = [&](uint4 (&wr)[LIN_ROWS], int gi, int c) {
        const i64 n0 = r_lo + (i64)gi * LIN_ROWS;
        const int v = c * LIN_THREADS + tid;
#pragma unroll
        for (int r = 0; r < LIN_ROWS; ++r)
            wr[r] = v < nvec && n0 + r < r_hi
                        ? __ldcs(reinterpret_cast<const uint4*>(w + (n0 + r) * K) + v)
                        : make_uint4(0, 0, 0, 0);
    };
    auto load_x = [&](uint4 (&xr)[BB], int c) {
        const int v = c * LIN_THREADS + tid;
#pragma unroll
        for (int b = 0; b < BB; ++b)
            xr[b] = b < B && v < nvec ? __ldg(reinterpret_cast<const uint4*>(x + b * xs) + v)
                                      : make_uint4(0, 0, 0, 0);
    };

    // Two tile buffers used in turn (the loop body is instantiated for both orders, so they
    // stay in registers): tile t + 1's loads go out before tile t's data is first touched.
    uint4 wa[LIN_ROWS], wb[LIN_ROWS], xa[BB], xb[BB];
    EpiVals ev;  // the current group's epilogue operands (threads t < LIN_ROWS x BB)
    load_w(wa, 0, 0);
    epi_weights<BB, EPI>(ev, r_lo, r_hi, bias, b_dt, ea);
    pdl_launch_dependents();
    pdl_wait();
    load_x(xa, 0);
    epi_residual<BB, EPI>(ev, r_lo, r_hi, B, N, ea);
    const bool scaled = EPI != EPI_PLAIN && ea.psum;
    if (scaled) {
        // rms of row b = sqrt(sum(psum[b, :np]) / dim + eps), summed in a fixed order.
        float pp[BB];
#pragma unroll
        for (int b = 0; b < BB; ++b) {
            pp[b] = 0.0f;
            if (b < B)
                for (i64 j = tid; j < ea.np; j += LIN_THREADS) pp[b] += __ldcg(&ea.psum[b * ea.np + j]);
            pp[b] = warp_sum(pp[b]);
            if (lane == 0) parts[warp][b] = pp[b];
        }
        __syncthreads();
        if (tid < BB) {
            float tot = 0.0f;
#pragma unroll
            for (int k = 0; k < LIN_THREADS / 32; ++k) tot += parts[k][tid];
            inv_rms[tid] = 1.0f / sqrtf(tot / ea.dim + ea.eps);
        }
        // inv_rms is read after the first group's barrier.
    }
    if (EPI == EPI_RESIDUAL && ea.conv_state && blockIdx.x == 0) conv_shift_bc<T>(B, ea);

    float acc[LIN_ROWS][BB];
#pragma unroll
    for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
        for (int b = 0; b < BB; ++b) acc[r][b] = 0.0f;
    float hsq = 0.0f;
    int gi = 0, c = 0;  // the current tile
    auto tile = [&](uint4 (&wc)[LIN_ROWS], uint4 (&xc)[BB], uint4 (&wn)[LIN_ROWS],
                    uint4 (&xn)[BB], int t) {
        int gn = gi, cn = c + 1;
        if (cn == nchunk) {
            cn = 0;
            ++gn;
        }
        if (t + 1 < ntile) {
            load_w(wn, gn, cn);
            load_x(xn, cn);  // an L1 hit when K is a single tile
        }
        float wf[LIN_ROWS][V];
#pragma unroll
        for (int r = 0; r < LIN_ROWS; ++r) Vec16<T>::unpack(wc[r], wf[r]);
#pragma unroll
        for (int b = 0; b < BB; ++b) {
            float xf[V];
            Vec16<T>::unpack(xc[b], xf);
#pragma unroll
            for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
                for (int e = 0; e < V; ++e) acc[r][b] = fmaf(wf[r][e], xf[e], acc[r][b]);
        }
        if (c == nchunk - 1) {
            const i64 n0 = r_lo + (i64)gi * LIN_ROWS;
            finish_group<T, BB, EPI>(acc, red[gi & 1], n0, r_hi, B, N, ev, inv_rms, y, y_dt,
                                     ys, ea, hsq);
            // The next group's operands, a whole group ahead of their use.
            epi_weights<BB, EPI>(ev, n0 + LIN_ROWS, r_hi, bias, b_dt, ea);
            epi_residual<BB, EPI>(ev, n0 + LIN_ROWS, r_hi, B, N, ea);
        }
        gi = gn;
        c = cn;
    };
    for (int t = 0; t < ntile; t += 2) {
        tile(wa, xa, wb, xb, t);
        if (t + 1 < ntile) tile(wb, xb, wa, xa, t + 1);
    }
    if (EPI == EPI_RESIDUAL) {
        // This block's sum of h² per sequence: one partial sum per block.
        if (tid < LIN_ROWS * BB) hsq_all[tid] = hsq;
        __syncthreads();
        if (tid < B) {
            float s = 0.0f;
#pragma unroll
            for (int r = 0; r < LIN_ROWS; ++r) s += hsq_all[r * BB + tid];
            ea.psum_out[tid * (i64)gridDim.x + blockIdx.x] = s;
        }
    }
}

// Blocks per SM the registers must allow: with two tiles in flight per block, 3-4 blocks per
// SM keep the weight stream at the copy bandwidth.
#define LIN_MINB(BB) ((BB) == 1 ? 4 : (BB) == 2 ? 3 : 2)
#define LINEAR(NAME, T, BB)                                                                    \
    extern "C" __global__ void __launch_bounds__(LIN_THREADS, LIN_MINB(BB))                                \
        NAME(const T* x, i64 xs, int B, const T* w, const void* bias, int b_dt, void* y,       \
             int y_dt, i64 ys, i64 N, i64 K) {                                                 \
        const EpiArgs ea = {};                                                                 \
        linear_rows<T, BB, EPI_PLAIN>(x, xs, B, w, bias, b_dt, y, y_dt, ys, N, K, ea);         \
    }
#define LINEAR_SCALED(NAME, T, BB)                                                             \
    extern "C" __global__ void __launch_bounds__(LIN_THREADS, LIN_MINB(BB))                                \
        NAME(const T* x, i64 xs, int B, const T* w, const void* bias, int b_dt, void* y,       \
             int y_dt, i64 ys, i64 N, i64 K, const float* psum, i64 np, float dim, float eps) { \
        EpiArgs ea = {};                                                                       \
        ea.psum = psum; ea.np = np; ea.dim = dim; ea.eps = eps;                                \
        linear_rows<T, BB, EPI_SCALED>(x, xs, B, w, bias, b_dt, y, y_dt, ys, N, K, ea);        \
    }
#define LINEAR_RESIDUAL(NAME, T, BB)                                                           \
    extern "C" __global__ void __launch_bounds__(LIN_THREADS, LIN_MINB(BB))                                \
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
