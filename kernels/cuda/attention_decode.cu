// attention_decode.cu: causal GQA attention for a few queries per sequence (decode, q_len <= 8;
// any q_len works), the attention layers of the hybrid models (Granite-4.0-H, Nemotron-H,
// Falcon-H1, Bamba). The prefill kernels are in attention_prefill.cu.
//
//   out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, g]) v[b, j, g],  g = h / rep,
//   j <= kv_len - q_len + i (query i sits at absolute position kv_len - q_len + i),
//   rep = n_heads / n_kv_heads (HF repeat_kv order).
//
// Scores, softmax and the weighted sum of V are f32 with an online softmax (running max m,
// running sum l, accumulator rescaled by exp(m_old - m_new)); the output is rounded once to T.
// K and V are read in place through their batch, position and head strides (views narrowed out
// of a pre-allocated KV cache, channels contiguous). Query rows are packed per kv head: row r of
// kv head g is query position r / rep of head g * rep + r % rep, so every K/V row a block reads
// serves all query heads of its group (and all of the block's query positions).
#include "common.cuh"

#define DEC_WARPS 4
#define DEC_THREADS (DEC_WARPS * 32)

// N consecutive elements of T at p as f32: one aligned vector load when `vec` (the host checked
// the alignment of every row start) and all N are valid, else element by element; elements at
// or past n_valid read as 0 (and are not loaded).
template <typename T, int N>
__device__ __forceinline__ void load_chunk(const T* p, bool vec, int n_valid, float* out) {
    constexpr int A = N * (int)sizeof(T) < 16 ? N * (int)sizeof(T) : 16;
    struct alignas(A) Chunk { T v[N]; };
    if (vec && n_valid == N) {
        const Chunk c = *reinterpret_cast<const Chunk*>(p);
#pragma unroll
        for (int e = 0; e < N; ++e) out[e] = to_f32(c.v[e]);
    } else {
#pragma unroll
        for (int e = 0; e < N; ++e) out[e] = e < n_valid ? to_f32(p[e]) : 0.0f;
    }
}

// causal_attention_decode_hd64_<dtype> (DPL 2, ROWS 8), causal_attention_decode_hd128_<dtype>
// (DPL 4, ROWS 8), causal_attention_decode_hd256_<dtype> (DPL 8, ROWS 4)
// Reference: attention.rs `causal_attention_slow`.
// Arguments:
//   q        (batch, q_len, n_heads, head_dim) T, strides q_sb, q_st, q_sh, channels contiguous
//   k, v     (batch, kv_len, n_kv_heads, head_dim) T, strides k_s*, v_s*, channels contiguous
//   out      (batch, q_len, n_heads, head_dim) T contiguous: written when n_splits == 1
//   part_o   (n_splits, batch * q_len * n_heads, head_dim) f32, n_splits > 1: the split's
//            unnormalised sum of exp(score - M) v (M: the split's max score of the row)
//   part_ml  (n_splits, batch * q_len * n_heads, 2) f32, n_splits > 1: (M, sum exp(score - M));
//            a split that sees no key of a row writes (-inf, 0) and a zero part_o row
//   vec = 1: head_dim % DPL == 0 and every K/V row start aligned to min(16, DPL * sizeof(T))
//            bytes (checked on the host): one vector load per lane and row
// Preconditions (host): head_dim <= 32 * DPL; split_len * n_splits >= kv_len.
// Grid: (n_splits, n_kv_heads * ceil(rep * q_len / ROWS), batch) blocks of 128 threads. A block
//   takes ROWS packed rows of one kv head (all of them at decode: rep <= ROWS) and the keys
//   [split * split_len, +split_len) up to the causal limit of its last row. Warp w walks key
//   groups of KB keys (w * KB, +4 KB, ...); lane l holds channels [l * DPL, +DPL) of q, of the K
//   and V rows and of the accumulators; a score is one warp_sum (shuffles). The KB keys of a
//   group are loaded together (2 KB loads in flight per lane) and share one rescaling of the
//   accumulators. The 4 warps' (m, l, acc) are merged through shared memory, then written
//   normalised (one split) or as partial results for causal_attention_merge_<dtype>.
// Shared memory: 4 * ROWS * 32 * DPL + 4 * ROWS * 2 floats (16.1 KiB for hd128 / hd256).
template <typename T, int DPL, int ROWS>
__device__ void attention_decode(const T* __restrict__ q, i64 q_sb, i64 q_st, i64 q_sh,
                                 const T* __restrict__ k, i64 k_sb, i64 k_st, i64 k_sh,
                                 const T* __restrict__ v, i64 v_sb, i64 v_st, i64 v_sh,
                                 T* __restrict__ out, float* __restrict__ part_o,
                                 float* __restrict__ part_ml, i64 q_len, i64 n_heads,
                                 i64 n_kv_heads, i64 head_dim, i64 kv_len, i64 split_len,
                                 int n_splits, float scale, int vec_flag) {
    constexpr int KB = DPL >= 8 ? 2 : 4;  // keys per warp step
    __shared__ float acc_sm[DEC_WARPS][ROWS][32 * DPL];
    __shared__ float ml_sm[DEC_WARPS][ROWS][2];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool vec = vec_flag != 0;
    const i64 rep = n_heads / n_kv_heads;
    const i64 rows = rep * q_len;
    const i64 row_blocks = (rows + ROWS - 1) / ROWS;
    const i64 split = blockIdx.x;
    const i64 g = blockIdx.y / row_blocks;
    const i64 r0 = (blockIdx.y % row_blocks) * ROWS;
    const i64 b = blockIdx.z;
    const int nr = (int)min((i64)ROWS, rows - r0);
    const i64 off = kv_len - q_len;
    const i64 kv_end = off + (r0 + nr - 1) / rep + 1;
    const i64 j0 = split * split_len;
    const i64 j1 = min(j0 + split_len, kv_end);
    const i64 d0 = (i64)lane * DPL;
    const int nv = (int)max((i64)0, min((i64)DPL, head_dim - d0));

    float qr[ROWS][DPL], acc[ROWS][DPL], m[ROWS], l[ROWS];
    i64 lim[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const i64 rr = r0 + r;
        const i64 i = rr / rep, h = g * rep + rr % rep;
        if (r < nr) {
            load_chunk<T, DPL>(q + b * q_sb + i * q_st + h * q_sh + d0, false, nv, qr[r]);
        } else {
#pragma unroll
            for (int e = 0; e < DPL; ++e) qr[r][e] = 0.0f;
        }
#pragma unroll
        for (int e = 0; e < DPL; ++e) acc[r][e] = 0.0f;
        m[r] = -INFINITY;
        l[r] = 0.0f;
        lim[r] = off + i;
    }

    const T* kb = k + b * k_sb + g * k_sh + d0;
    const T* vb = v + b * v_sb + g * v_sh + d0;
    for (i64 jb = j0 + (i64)warp * KB; jb < j1; jb += (i64)DEC_WARPS * KB) {
        float kf[KB][DPL], vf[KB][DPL];
#pragma unroll
        for (int u = 0; u < KB; ++u) {
            const i64 j = jb + u;
            const int n = j < j1 ? nv : 0;
            load_chunk<T, DPL>(kb + j * k_st, vec, n, kf[u]);
            load_chunk<T, DPL>(vb + j * v_st, vec, n, vf[u]);
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (r >= nr) continue;  // uniform over the block
            float s[KB];
            float mx = -INFINITY;
#pragma unroll
            for (int u = 0; u < KB; ++u) {
                float dot = 0.0f;
#pragma unroll
                for (int e = 0; e < DPL; ++e) dot += qr[r][e] * kf[u][e];
                const i64 j = jb + u;
                s[u] = warp_sum(dot) * scale;
                if (j >= j1 || j > lim[r]) s[u] = -INFINITY;
                mx = fmaxf(mx, s[u]);
            }
            const float m_new = fmaxf(m[r], mx);
            if (m_new == -INFINITY) continue;  // no visible key yet (uniform over the warp)
            const float corr = expf(m[r] - m_new);
            float psum = 0.0f;
#pragma unroll
            for (int e = 0; e < DPL; ++e) acc[r][e] *= corr;
#pragma unroll
            for (int u = 0; u < KB; ++u) {
                const float p = expf(s[u] - m_new);
                psum += p;
#pragma unroll
                for (int e = 0; e < DPL; ++e) acc[r][e] += p * vf[u][e];
            }
            l[r] = l[r] * corr + psum;
            m[r] = m_new;
        }
    }

    // Merge the warps: O = sum_w exp(m_w - M) acc_w, L = sum_w exp(m_w - M) l_w.
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        if (r >= nr) continue;
#pragma unroll
        for (int e = 0; e < DPL; ++e)
            if (e < nv) acc_sm[warp][r][d0 + e] = acc[r][e];
        if (lane == 0) {
            ml_sm[warp][r][0] = m[r];
            ml_sm[warp][r][1] = l[r];
        }
    }
    __syncthreads();
    const i64 nrows = (i64)gridDim.z * q_len * n_heads;
    for (i64 idx = threadIdx.x; idx < (i64)nr * head_dim; idx += DEC_THREADS) {
        const int r = (int)(idx / head_dim);
        const i64 d = idx % head_dim;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) M = fmaxf(M, ml_sm[w][r][0]);
        const float Mu = M == -INFINITY ? 0.0f : M;
        float L = 0.0f, O = 0.0f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) {
            const float wt = expf(ml_sm[w][r][0] - Mu);
            L += wt * ml_sm[w][r][1];
            O += wt * acc_sm[w][r][d];
        }
        const i64 rr = r0 + r;
        const i64 row = (b * q_len + rr / rep) * n_heads + g * rep + rr % rep;
        if (n_splits == 1) {
            out[row * head_dim + d] = from_f32<T>(O / L);
        } else {
            part_o[(split * nrows + row) * head_dim + d] = O;
            if (d == 0) {
                part_ml[(split * nrows + row) * 2] = M;
                part_ml[(split * nrows + row) * 2 + 1] = L;
            }
        }
    }
}

// causal_attention_merge_<dtype>
// Reference: attention.rs `causal_attention_slow` (flash-decoding's combination of key splits).
//   out[row, d] = sum_s exp(M_s - M) part_o[s, row, d] / sum_s exp(M_s - M) L_s, M = max_s M_s
//   (finite: split 0 holds key 0, which every query sees).
// Arguments: part_o (n_splits, nrows, head_dim) f32, part_ml (n_splits, nrows, 2) f32 (see
//   above); out (nrows, head_dim) T contiguous (output).
// Grid: (nrows) blocks of head_dim rounded up to 32 (at most 256) threads, one per channel.
// Shared memory: none.
template <typename T>
__device__ void attention_merge(const float* __restrict__ part_o,
                                const float* __restrict__ part_ml, T* __restrict__ out,
                                i64 nrows, i64 head_dim, int n_splits) {
    const i64 row = blockIdx.x;
    float M = -INFINITY;
    for (int s = 0; s < n_splits; ++s) M = fmaxf(M, part_ml[((i64)s * nrows + row) * 2]);
    for (i64 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float L = 0.0f, O = 0.0f;
        for (int s = 0; s < n_splits; ++s) {
            const i64 base = (i64)s * nrows + row;
            const float wt = expf(part_ml[base * 2] - M);
            L += wt * part_ml[base * 2 + 1];
            O += wt * part_o[base * head_dim + d];
        }
        out[row * head_dim + d] = from_f32<T>(O / L);
    }
}

#define DECODE(NAME, T, DPL, ROWS)                                                            \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) NAME(                           \
        const T* q, i64 q_sb, i64 q_st, i64 q_sh, const T* k, i64 k_sb, i64 k_st, i64 k_sh,   \
        const T* v, i64 v_sb, i64 v_st, i64 v_sh, T* out, float* part_o, float* part_ml,      \
        i64 q_len, i64 n_heads, i64 n_kv_heads, i64 head_dim, i64 kv_len, i64 split_len,      \
        int n_splits, float scale, int vec) {                                                 \
        attention_decode<T, DPL, ROWS>(q, q_sb, q_st, q_sh, k, k_sb, k_st, k_sh, v, v_sb,     \
                                       v_st, v_sh, out, part_o, part_ml, q_len, n_heads,      \
                                       n_kv_heads, head_dim, kv_len, split_len, n_splits,     \
                                       scale, vec);                                           \
    }
#define MERGE(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        NAME(const float* part_o, const float* part_ml, T* out, i64 nrows, i64 head_dim,      \
             int n_splits) {                                                                  \
        attention_merge<T>(part_o, part_ml, out, nrows, head_dim, n_splits);                  \
    }
#define DECODE_ALL(SFX, T)                                                                    \
    DECODE(causal_attention_decode_hd64_##SFX, T, 2, 8)                                       \
    DECODE(causal_attention_decode_hd128_##SFX, T, 4, 8)                                      \
    DECODE(causal_attention_decode_hd256_##SFX, T, 8, 4)                                      \
    MERGE(causal_attention_merge_##SFX, T)
DECODE_ALL(f32, float)
DECODE_ALL(f16, __half)
DECODE_ALL(bf16, __nv_bfloat16)
