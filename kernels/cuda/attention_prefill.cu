// attention_prefill.cu: causal GQA attention for many queries per sequence (prefill, continued
// prefill), FlashAttention-2 style: a block owns a tile of packed query rows, streams the keys
// and values through shared memory in tiles, and keeps an online softmax per row. Semantics,
// row packing and numerics as in attention_decode.cu (f32 softmax and accumulation, output
// rounded once to T; K/V views read in place through their strides).
#include "common.cuh"

// Packed row r of kv head g: query position r / rep of head g * rep + r % rep. Element offset
// of its first channel in out (contiguous).
__device__ __forceinline__ i64 out_row(i64 b, i64 r, i64 g, i64 rep, i64 q_len, i64 n_heads,
                                       i64 head_dim) {
    return ((b * q_len + r / rep) * n_heads + g * rep + r % rep) * head_dim;
}

// ---------------------------------------------------------------------------------------------
// causal_attention_prefill_simt_<dtype>: CUDA-core FMA version, any head_dim <= 256, any
// alignment; the f32 path and the fallback of the tensor-core kernel.
// Reference: attention.rs `causal_attention_slow`.
// Arguments:
//   q     (batch, q_len, n_heads, head_dim) T, strides q_sb, q_st, q_sh, channels contiguous
//   k, v  (batch, kv_len, n_kv_heads, head_dim) T, strides k_s*, v_s*, channels contiguous
//   out   (batch, q_len, n_heads, head_dim) T contiguous (output)
// Preconditions (host): head_dim <= 256; dynamic shared memory as below allowed.
// Grid: (ceil(rep * q_len / 32), n_kv_heads, batch) blocks of 128 threads, the row blocks
//   reversed (the longest causal ranges start first). Per key tile of 32: K and V (as f32) to
//   shared memory; scores S (32 x 32): thread (tid / 8, tid % 8) computes rows {rg, rg + 16} x
//   keys {kg + 8u}; softmax: 4 threads per row (shuffles), P written over S; O += P V: thread
//   (tid / 16, tid % 16) holds rows 4 og .. 4 og + 3 x channels cg + 16 e in registers.
// Shared memory (dynamic, floats): Q 32 x (hd + 1), K 32 x (hd + 1), V 32 x hd, S 32 x 33,
//   32 per-row factors: 4 (97 hd + 1088) bytes (54.0 KiB at hd 128, 100.5 KiB at hd 256).
#define SP_BQ 32
#define SP_BK 32
#define SP_THREADS 128
#define SP_MAX_E 16  // channels per thread in the P V product: 256 / 16
template <typename T>
__device__ void prefill_simt(const T* __restrict__ q, i64 q_sb, i64 q_st, i64 q_sh,
                             const T* __restrict__ k, i64 k_sb, i64 k_st, i64 k_sh,
                             const T* __restrict__ v, i64 v_sb, i64 v_st, i64 v_sh,
                             T* __restrict__ out, i64 q_len, i64 n_heads, i64 n_kv_heads,
                             i64 head_dim, i64 kv_len, float scale) {
    extern __shared__ float smem[];
    const int hd = (int)head_dim, hs = hd + 1;
    float* Qs = smem;               // [SP_BQ][hs]
    float* Ks = Qs + SP_BQ * hs;    // [SP_BK][hs]
    float* Vs = Ks + SP_BK * hs;    // [SP_BK][hd]
    float* Ss = Vs + SP_BK * hd;    // [SP_BQ][SP_BK + 1]
    float* rowf = Ss + SP_BQ * (SP_BK + 1);  // [SP_BQ]: rescaling factor, then 1 / l
    const int tid = threadIdx.x;
    const i64 rep = n_heads / n_kv_heads, rows = rep * q_len;
    const i64 r0 = ((i64)gridDim.x - 1 - blockIdx.x) * SP_BQ;
    const i64 g = blockIdx.y, b = blockIdx.z;
    const int nr = (int)min((i64)SP_BQ, rows - r0);
    const i64 off = kv_len - q_len;
    const i64 kv_end = off + (r0 + nr - 1) / rep + 1;

    for (int idx = tid; idx < SP_BQ * hd; idx += SP_THREADS) {
        const int r = idx / hd, d = idx % hd;
        const i64 rr = r0 + r;
        Qs[r * hs + d] = r < nr ? to_f32(q[b * q_sb + (rr / rep) * q_st + (g * rep + rr % rep) * q_sh + d])
                                : 0.0f;
    }
    // score stage: rows rg, rg + 16, keys kg + 8u; softmax stage: row sr, keys 8 sq .. 8 sq + 7
    const int rg = tid >> 3, kg = tid & 7;
    const int sr = tid >> 2, sq = tid & 3;
    const i64 lim0 = rg < nr ? off + (r0 + rg) / rep : kv_end - 1;
    const i64 lim1 = rg + 16 < nr ? off + (r0 + rg + 16) / rep : kv_end - 1;
    const int og = tid >> 4, cg = tid & 15;  // P V stage: rows 4 og + u, channels cg + 16 e
    float m = -INFINITY, l = 0.0f;  // of row sr (replicated over its 4 threads)
    float acc[4][SP_MAX_E];
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int e = 0; e < SP_MAX_E; ++e) acc[u][e] = 0.0f;

    const T* kb = k + b * k_sb + g * k_sh;
    const T* vb = v + b * v_sb + g * v_sh;
    for (i64 j0 = 0; j0 < kv_end; j0 += SP_BK) {
        __syncthreads();  // the previous tile's K, V, S are no longer read
        for (int idx = tid; idx < SP_BK * hd; idx += SP_THREADS) {
            const int jj = idx / hd, d = idx % hd;
            const i64 j = j0 + jj;
            const bool in = j < kv_end;
            Ks[jj * hs + d] = in ? to_f32(kb[j * k_st + d]) : 0.0f;
            Vs[jj * hd + d] = in ? to_f32(vb[j * v_st + d]) : 0.0f;
        }
        __syncthreads();
        float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        for (int d = 0; d < hd; ++d) {
            const float q0 = Qs[rg * hs + d], q1 = Qs[(rg + 16) * hs + d];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const float kv = Ks[(kg + 8 * u) * hs + d];
                s[0][u] += q0 * kv;
                s[1][u] += q1 * kv;
            }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const i64 j = j0 + kg + 8 * u;
            Ss[rg * (SP_BK + 1) + kg + 8 * u] = j <= lim0 ? s[0][u] * scale : -INFINITY;
            Ss[(rg + 16) * (SP_BK + 1) + kg + 8 * u] = j <= lim1 ? s[1][u] * scale : -INFINITY;
        }
        __syncthreads();
        {
            float* srow = Ss + sr * (SP_BK + 1) + 8 * sq;
            float mx = -INFINITY;
#pragma unroll
            for (int u = 0; u < 8; ++u) mx = fmaxf(mx, srow[u]);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m, mx);
            const float mu = m_new == -INFINITY ? 0.0f : m_new;
            const float corr = expf(m - mu);
            float ps = 0.0f;
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const float p = expf(srow[u] - mu);
                srow[u] = p;
                ps += p;
            }
            ps += __shfl_xor_sync(0xffffffffu, ps, 1);
            ps += __shfl_xor_sync(0xffffffffu, ps, 2);
            l = l * corr + ps;
            m = m_new;
            if (sq == 0) rowf[sr] = corr;
        }
        __syncthreads();
        const int nk = (int)min((i64)SP_BK, kv_end - j0);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const float c = rowf[4 * og + u];
#pragma unroll
            for (int e = 0; e < SP_MAX_E; ++e) acc[u][e] *= c;
        }
        for (int jj = 0; jj < nk; ++jj) {
            float p[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) p[u] = Ss[(4 * og + u) * (SP_BK + 1) + jj];
#pragma unroll
            for (int e = 0; e < SP_MAX_E; ++e) {
                const int d = cg + 16 * e;
                if (d < hd) {
                    const float vv = Vs[jj * hd + d];
#pragma unroll
                    for (int u = 0; u < 4; ++u) acc[u][e] += p[u] * vv;
                }
            }
        }
    }
    __syncthreads();
    if (sq == 0) rowf[sr] = 1.0f / l;
    __syncthreads();
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int r = 4 * og + u;
        if (r >= nr) continue;
        T* orow = out + out_row(b, r0 + r, g, rep, q_len, n_heads, head_dim);
        const float inv = rowf[r];
#pragma unroll
        for (int e = 0; e < SP_MAX_E; ++e) {
            const int d = cg + 16 * e;
            if (d < hd) orow[d] = from_f32<T>(acc[u][e] * inv);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core version (f16 / bf16), after FlashAttention-2: mma.sync m16n8k16 with f32
// accumulators, operands from shared memory through ldmatrix. Fragment layouts (PTX ISA, "mma
// m16n8k16"): lane = 4 gid + tig; A (16 x 16, row): a0 (gid, 2tig..+1), a1 (gid + 8, 2tig..),
// a2 (gid, 8 + 2tig..), a3 (gid + 8, 8 + 2tig..); B (16 x 8, col): b0 (k 2tig..+1, n gid),
// b1 (k 8 + 2tig.., n gid); C: c0 c1 (gid, 2tig..+1), c2 c3 (gid + 8, 2tig..+1).
template <typename T> struct Mma;
template <> struct Mma<__half> {
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&h);
    }
    static __device__ __forceinline__ void run(float* c, const unsigned* a, unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&h);
    }
    static __device__ __forceinline__ void run(float* c, const unsigned* a, unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
// Four 8 x 8 b16 matrices; lanes 8i .. 8i + 7 give the row addresses of matrix i; register i
// receives matrix i's fragment (lane: row gid, columns 2tig, 2tig + 1; transposed with .trans:
// rows 2tig, 2tig + 1 of column gid).
__device__ __forceinline__ void ldsm_x4(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
// 16 bytes global -> shared, asynchronously; zero-filled (nothing read) when !in.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool in) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(in ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most one committed group is still in flight.
__device__ __forceinline__ void cp_async_wait1() {
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
}

#define MP_BQ 64  // packed query rows per block: 16 per warp
#define MP_BK 64  // keys per tile
#define MP_THREADS 128

// One K or V tile (MP_BK rows of head_dim channels, row j0 + jj at base + (j0 + jj) * st) to
// shared memory rows of `sd` elements, 16-byte chunks; rows at or past kv_end zero-filled.
template <typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* base, i64 st, i64 j0, i64 kv_end,
                                          int hd, int sd) {
    const int cpr = hd / 8;  // chunks per row
    for (int c = threadIdx.x; c < MP_BK * cpr; c += MP_THREADS) {
        const int jj = c / cpr, d = (c % cpr) * 8;
        const i64 j = j0 + jj;
        const bool in = j < kv_end;
        cp_async16(dst + jj * sd + d, in ? base + j * st + d : base, in);
    }
}

// causal_attention_prefill_hd64_<dtype> (DK 64), causal_attention_prefill_hd128_<dtype>
// (DK 128), f16 / bf16 only
// Reference: attention.rs `causal_attention_slow`.
// Arguments: as prefill_simt; q_vec = 1 when q's row starts are 16-byte aligned.
// Preconditions (host): head_dim % 16 == 0, head_dim <= DK; k, v 16-byte aligned with strides
//   that are multiples of 8 elements (cp.async of 16-byte chunks); dynamic shared memory as
//   below allowed.
// Grid: (ceil(rep * q_len / 64), n_kv_heads, batch) blocks of 128 threads (4 warps), the row
//   blocks reversed (the longest causal ranges start first). Warp w owns packed rows
//   16w .. 16w + 15 of the block: S = Q K^T for a 64-key tile (8 n-blocks of 8 keys) in
//   registers, scaled and masked, online softmax on the C fragments (a row's 64 scores live
//   in the 4 lanes of a gid), P rounded to T and reused as the A operand of O += P V (the C
//   layout of two n-blocks is the A layout of one k-step), V B-fragments by ldmatrix.trans.
//   K(t + 1) is fetched (cp.async) while P V(t) runs, V(t + 1) while S(t + 1) runs.
// Shared memory (dynamic, T): Q 64, K 64, V 64 rows of head_dim + 8 (rows 16-byte aligned,
//   ldmatrix conflict-free): 384 (hd + 8) bytes (51.0 KiB at hd 128, 27.0 KiB at hd 64).
template <typename T, int DK>
__device__ void prefill_mma(const T* __restrict__ q, i64 q_sb, i64 q_st, i64 q_sh,
                            const T* __restrict__ k, i64 k_sb, i64 k_st, i64 k_sh,
                            const T* __restrict__ v, i64 v_sb, i64 v_st, i64 v_sh,
                            T* __restrict__ out, i64 q_len, i64 n_heads, i64 n_kv_heads,
                            i64 head_dim, i64 kv_len, float scale, int q_vec) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int hd = (int)head_dim, sd = hd + 8;
    T* Qs = reinterpret_cast<T*>(smem_raw);  // [MP_BQ][sd]
    T* Ks = Qs + MP_BQ * sd;                 // [MP_BK][sd]
    T* Vs = Ks + MP_BK * sd;                 // [MP_BK][sd]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const i64 rep = n_heads / n_kv_heads, rows = rep * q_len;
    const i64 r0 = ((i64)gridDim.x - 1 - blockIdx.x) * MP_BQ;
    const i64 g = blockIdx.y, b = blockIdx.z;
    const int nr = (int)min((i64)MP_BQ, rows - r0);
    const i64 off = kv_len - q_len;
    const i64 kv_end = off + (r0 + nr - 1) / rep + 1;
    const i64 lim_min = off + r0 / rep;  // the smallest causal limit of the block's rows
    const T* kb = k + b * k_sb + g * k_sh;
    const T* vb = v + b * v_sb + g * v_sh;

    load_tile<T>(Ks, kb, k_st, 0, kv_end, hd, sd);
    cp_async_commit();
    load_tile<T>(Vs, vb, v_st, 0, kv_end, hd, sd);
    cp_async_commit();
    {
        const int cpr = hd / 8;
        for (int c = tid; c < MP_BQ * cpr; c += MP_THREADS) {
            const int r = c / cpr, d = (c % cpr) * 8;
            const i64 rr = r0 + r;
            const T* src = q + b * q_sb + (rr / rep) * q_st + (g * rep + rr % rep) * q_sh + d;
            T* dst = Qs + r * sd + d;
            if (r >= nr) {
                *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
            } else if (q_vec) {
                *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) dst[e] = src[e];
            }
        }
    }
    // this lane's two rows (block-local): ra = 16 warp + gid, ra + 8
    const int ra = 16 * warp + gid;
    const i64 lim_a = ra < nr ? off + (r0 + ra) / rep : kv_end - 1;
    const i64 lim_b = ra + 8 < nr ? off + (r0 + ra + 8) / rep : kv_end - 1;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;  // l: this lane's part
    float o[DK / 8][4];
#pragma unroll
    for (int n = 0; n < DK / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    // ldmatrix row addresses: A-style (Q, V^T): row (lane & 15), column 8 (lane >> 4);
    // K (B of Q K^T): key (lane & 7) + 8 (lane >> 4), channel 8 ((lane >> 3) & 1)
    const int a_row = lane & 15, a_col = 8 * (lane >> 4);
    const int k_row = (lane & 7) + 8 * (lane >> 4), k_col = 8 * ((lane >> 3) & 1);

    for (i64 j0 = 0; j0 < kv_end; j0 += MP_BK) {
        cp_async_wait1();  // K(j0) has landed (V(j0) may be in flight)
        __syncthreads();
        float s[MP_BK / 8][4];
#pragma unroll
        for (int n = 0; n < MP_BK / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < DK / 16; ++ks) {
            if (ks * 16 >= hd) break;
            unsigned a[4];
            ldsm_x4(a, Qs + (16 * warp + a_row) * sd + 16 * ks + a_col);
#pragma unroll
            for (int np = 0; np < MP_BK / 16; ++np) {
                unsigned bk[4];
                ldsm_x4(bk, Ks + (16 * np + k_row) * sd + 16 * ks + k_col);
                Mma<T>::run(s[2 * np], a, bk[0], bk[1]);
                Mma<T>::run(s[2 * np + 1], a, bk[2], bk[3]);
            }
        }
        __syncthreads();  // every warp is done with K(j0)
        if (j0 + MP_BK < kv_end) load_tile<T>(Ks, kb, k_st, j0 + MP_BK, kv_end, hd, sd);
        cp_async_commit();

        // online softmax on the fragments: s[n][0..1] row a, s[n][2..3] row b
        const bool mask = j0 + MP_BK - 1 > lim_min;
        float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
        for (int n = 0; n < MP_BK / 8; ++n) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const i64 j = j0 + 8 * n + 2 * tig + (c & 1);
                float x = s[n][c] * scale;
                if (mask && j > (c < 2 ? lim_a : lim_b)) x = -INFINITY;
                s[n][c] = x;
            }
            mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
            mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
        }
#pragma unroll
        for (int o_ = 1; o_ <= 2; o_ <<= 1) {
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, o_));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, o_));
        }
        const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
        const float mu_a = mn_a == -INFINITY ? 0.0f : mn_a;
        const float mu_b = mn_b == -INFINITY ? 0.0f : mn_b;
        const float c_a = expf(m_a - mu_a), c_b = expf(m_b - mu_b);
        m_a = mn_a;
        m_b = mn_b;
        float ps_a = 0.0f, ps_b = 0.0f;
        unsigned pa[MP_BK / 16][4];
#pragma unroll
        for (int n = 0; n < MP_BK / 8; ++n) {
            const float p0 = expf(s[n][0] - mu_a), p1 = expf(s[n][1] - mu_a);
            const float p2 = expf(s[n][2] - mu_b), p3 = expf(s[n][3] - mu_b);
            ps_a += p0 + p1;
            ps_b += p2 + p3;
            pa[n / 2][(n & 1) * 2] = Mma<T>::pack(p0, p1);
            pa[n / 2][(n & 1) * 2 + 1] = Mma<T>::pack(p2, p3);
        }
        l_a = l_a * c_a + ps_a;
        l_b = l_b * c_b + ps_b;
#pragma unroll
        for (int n = 0; n < DK / 8; ++n) {
            o[n][0] *= c_a;
            o[n][1] *= c_a;
            o[n][2] *= c_b;
            o[n][3] *= c_b;
        }

        cp_async_wait1();  // V(j0) has landed (K(j0 + 64) may be in flight)
        __syncthreads();
#pragma unroll
        for (int t = 0; t < MP_BK / 16; ++t) {
            if (j0 + 16 * t >= kv_end) break;  // zero rows of the last tile
#pragma unroll
            for (int np = 0; np < DK / 16; ++np) {
                if (np * 16 >= hd) break;
                unsigned bv[4];
                ldsm_x4_t(bv, Vs + (16 * t + a_row) * sd + 16 * np + a_col);
                Mma<T>::run(o[2 * np], pa[t], bv[0], bv[1]);
                Mma<T>::run(o[2 * np + 1], pa[t], bv[2], bv[3]);
            }
        }
        __syncthreads();  // every warp is done with V(j0)
        if (j0 + MP_BK < kv_end) load_tile<T>(Vs, vb, v_st, j0 + MP_BK, kv_end, hd, sd);
        cp_async_commit();
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");

#pragma unroll
    for (int o_ = 1; o_ <= 2; o_ <<= 1) {
        l_a += __shfl_xor_sync(0xffffffffu, l_a, o_);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, o_);
    }
    const float inv_a = 1.0f / l_a, inv_b = 1.0f / l_b;
    T* out_a = ra < nr ? out + out_row(b, r0 + ra, g, rep, q_len, n_heads, head_dim) : nullptr;
    T* out_b = ra + 8 < nr ? out + out_row(b, r0 + ra + 8, g, rep, q_len, n_heads, head_dim) : nullptr;
#pragma unroll
    for (int n = 0; n < DK / 8; ++n) {
        if (8 * n >= hd) break;
        const int d = 8 * n + 2 * tig;
        if (out_a) {
            out_a[d] = from_f32<T>(o[n][0] * inv_a);
            out_a[d + 1] = from_f32<T>(o[n][1] * inv_a);
        }
        if (out_b) {
            out_b[d] = from_f32<T>(o[n][2] * inv_b);
            out_b[d + 1] = from_f32<T>(o[n][3] * inv_b);
        }
    }
}

#define PREFILL_ARGS(T)                                                                       \
    const T *q, i64 q_sb, i64 q_st, i64 q_sh, const T *k, i64 k_sb, i64 k_st, i64 k_sh,       \
        const T *v, i64 v_sb, i64 v_st, i64 v_sh, T *out, i64 q_len, i64 n_heads,             \
        i64 n_kv_heads, i64 head_dim, i64 kv_len, float scale
#define PREFILL_PASS                                                                          \
    q, q_sb, q_st, q_sh, k, k_sb, k_st, k_sh, v, v_sb, v_st, v_sh, out, q_len, n_heads,       \
        n_kv_heads, head_dim, kv_len, scale
#define SIMT(SFX, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(SP_THREADS)                                  \
        causal_attention_prefill_simt_##SFX(PREFILL_ARGS(T)) {                                \
        prefill_simt<T>(PREFILL_PASS);                                                        \
    }
#define MMA(SFX, T, DK)                                                                       \
    extern "C" __global__ void __launch_bounds__(MP_THREADS)                                  \
        causal_attention_prefill_hd##DK##_##SFX(PREFILL_ARGS(T), int q_vec) {                 \
        prefill_mma<T, DK>(PREFILL_PASS, q_vec);                                              \
    }
SIMT(f32, float)
SIMT(f16, __half)
SIMT(bf16, __nv_bfloat16)
MMA(f16, __half, 64)
MMA(f16, __half, 128)
MMA(bf16, __nv_bfloat16, 64)
MMA(bf16, __nv_bfloat16, 128)
