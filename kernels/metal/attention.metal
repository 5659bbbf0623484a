// Causal self-attention with grouped KV heads (GQA): the attention layers of the hybrid Mamba-2
// models (Granite-4.0-H, Nemotron-H, Falcon-H1, Bamba).
//
//   out[b, i, h] = sum_j softmax_j(scale q[b, i, h] · k[b, j, g]) v[b, j, g],  g = h / rep,
//   j <= kv_len - q_len + i  (query i sits at absolute position kv_len - q_len + i),
//   rep = n_heads / n_kv_heads (HF `repeat_kv` order).
//
// Activations T are float, half or bfloat; scores, softmax and the weighted sum of V are f32,
// with an online softmax (running max m, running sum l, accumulator rescaled by
// exp(m_old - m_new)); the output is rounded once to T. K and V are read in place through their
// batch, position and head strides (views narrowed out of a pre-allocated KV cache; unit channel
// stride), q and out are contiguous. Query rows are packed per kv head ("pack GQA" of
// FlashAttention-3): row r of kv head g is query position r / rep of head g * rep + r % rep, so
// each K/V element a threadgroup reads serves every query head of its group.
//
// Kernels (all 128 threads = 4 simdgroups per threadgroup):
// - causal_attention_decode_<dtype> (head_dim <= 128), causal_attention_decode_hd256_<dtype>
//   (head_dim <= 256): a few query rows per threadgroup, after MLX's sdpa_vector and
//   flash-decoding (keys split across threadgroups, partial results merged by
// - causal_attention_merge_<dtype>);
// - causal_attention_prefill_<dtype> (head_dim <= 128, % 8 == 0),
//   causal_attention_prefill_hd256_<dtype> (head_dim <= 256, % 8 == 0): FlashAttention-2
//   tiling on simdgroup_float8x8 (32 query rows per threadgroup, keys streamed in tiles).
#include <metal_stdlib>
using namespace metal;

#define METAL_FUNC inline __attribute__((__always_inline__))
#define NSG 4             // simdgroups per threadgroup
#define NTHREADS 128      // NSG * 32
#define DEC_ROWS 4        // query rows per decode threadgroup
#define PRE_ROWS 32       // query rows per prefill threadgroup (8 per simdgroup)
// Start of the running max: finite, since fast math may assume there are no infinities.
#define NEG_BIG (-1.0e30f)
// Threadgroup array lengths, as single tokens (the harness rewriter reads them that way).
#define LEN_DEC_ACC 4096  // NSG * DEC_ROWS * 256
#define LEN_DEC_ML 32     // NSG * DEC_ROWS * 2
#define LEN_KV 4224       // max(32 * (128 + 4), 16 * (256 + 4)): one K or V tile, padded rows
#define LEN_S 1024        // NSG * 8 * 32: one 8-row score stripe per simdgroup
#define LEN_STAGE 256     // NSG * 64: one 8 x 8 tile per simdgroup (diagonal rescaling)
#define STAGE_STRIDE 132  // row stride of Q and O staged in the K/V tile: 32 x 132 = LEN_KV
static_assert(LEN_DEC_ACC == NSG * DEC_ROWS * 256 && LEN_DEC_ML == NSG * DEC_ROWS * 2,
              "decode threadgroup array lengths");
static_assert(LEN_S == NSG * 8 * 32 && LEN_STAGE == NSG * 64 && PRE_ROWS == NSG * 8 &&
                  PRE_ROWS * STAGE_STRIDE <= LEN_KV,
              "prefill threadgroup array lengths");

// Mirrors mamba2_ops::metal_params::AttentionParams.
struct AttentionParams {
    uint batch;
    uint q_len;
    uint n_heads;
    uint n_kv_heads;
    uint head_dim;
    uint kv_len;
    uint k_sb;  // strides of k in elements: batch, position, head
    uint k_st;
    uint k_sh;
    uint v_sb;  // strides of v
    uint v_st;
    uint v_sh;
    uint n_splits;   // decode: key ranges per (batch, kv head, row block) = grid.x
    uint split_len;  // decode: keys per range
    float scale;
};

// Element offset of packed query row r of kv head g in q / out (contiguous).
METAL_FUNC ulong row_offset(constant AttentionParams& p, uint b, uint g, uint rep, uint r) {
    return (((ulong)b * p.q_len + r / rep) * p.n_heads + g * rep + r % rep) * p.head_dim;
}

// causal_attention_decode_<dtype> (DPL = 4), causal_attention_decode_hd256_<dtype> (DPL = 8)
// Reference: mamba2_ops::attention::causal_attention_slow.
// Arguments:
//   q        [[buffer(0)]] (batch, q_len, n_heads, head_dim) T, contiguous
//   k, v     [[buffer(1)]], [[buffer(2)]] (batch, kv_len, n_kv_heads, head_dim) T, strided
//   out      [[buffer(3)]] (batch, q_len, n_heads, head_dim) T, written when n_splits == 1
//   part_o   [[buffer(4)]] (n_splits, batch, q_len, n_heads, head_dim) f32, n_splits > 1:
//            unnormalised sum of the split's weights times V
//   part_ml  [[buffer(5)]] (n_splits, batch, q_len, n_heads, 2) f32, n_splits > 1: the split's
//            (max, sum of exp(score - max)); a split that sees no key writes (NEG_BIG, 0)
//   p        [[buffer(6)]] AttentionParams
// Preconditions (host): head_dim <= 32 * DPL; split 0 starts at key 0.
// Grid: (n_splits, n_kv_heads * ceil(rep * q_len / 4), batch) threadgroups of 128 threads. A
// threadgroup takes 4 query rows of one kv head and keys [split * split_len, ...) up to the
// causal limit of its last row. Simdgroup s walks keys s, s + 4, ...; lane l holds elements
// l + 32 e of q (pre-scaled), of the K and V rows and of the accumulators, one simd_sum per
// score; the 4 simdgroups' (m, l, acc) are combined through threadgroup memory.
// Threadgroup memory: 4 x 4 x 256 + 32 floats = 16.1 KiB.
template <typename T, uint DPL>
kernel void causal_attention_decode(
    device const T* q [[buffer(0)]],
    device const T* k [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device T* out [[buffer(3)]],
    device float* part_o [[buffer(4)]],
    device float* part_ml [[buffer(5)]],
    constant AttentionParams& p [[buffer(6)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float acc_tg[LEN_DEC_ACC];
    threadgroup float ml_tg[LEN_DEC_ML];
    const uint hd = p.head_dim;
    const uint rep = p.n_heads / p.n_kv_heads;
    const uint rows = rep * p.q_len;
    const uint row_blocks = (rows + DEC_ROWS - 1) / DEC_ROWS;
    const uint split = tgid.x;
    const uint g = tgid.y / row_blocks;
    const uint r0 = (tgid.y % row_blocks) * DEC_ROWS;
    const uint nr = min((uint)DEC_ROWS, rows - r0);
    const uint b = tgid.z;
    const uint off = p.kv_len - p.q_len;
    const uint kv_end = off + (r0 + nr - 1) / rep + 1;
    const uint j0 = split * p.split_len;
    const uint j1 = min(j0 + p.split_len, kv_end);

    float qr[DEC_ROWS][DPL];
    float acc[DEC_ROWS][DPL];
    float m[DEC_ROWS];
    float l[DEC_ROWS];
    uint lim[DEC_ROWS];
    for (uint r = 0; r < DEC_ROWS; ++r) {
        const bool valid = r < nr;
        const uint i = valid ? (r0 + r) / rep : 0;
        device const T* qp = q + row_offset(p, b, g, rep, valid ? r0 + r : 0);
        for (uint e = 0; e < DPL; ++e) {
            const uint d = lane + 32 * e;
            qr[r][e] = (valid && d < hd) ? float(qp[d]) * p.scale : 0.0f;
            acc[r][e] = 0.0f;
        }
        m[r] = NEG_BIG;
        l[r] = 0.0f;
        lim[r] = off + i;
    }

    device const T* kb = k + (ulong)b * p.k_sb + (ulong)g * p.k_sh;
    device const T* vb = v + (ulong)b * p.v_sb + (ulong)g * p.v_sh;
    for (uint j = j0 + sg; j < j1; j += NSG) {
        device const T* kr = kb + (ulong)j * p.k_st;
        device const T* vr = vb + (ulong)j * p.v_st;
        float kj[DPL];
        float vj[DPL];
        for (uint e = 0; e < DPL; ++e) {
            const uint d = lane + 32 * e;
            kj[e] = d < hd ? float(kr[d]) : 0.0f;
            vj[e] = d < hd ? float(vr[d]) : 0.0f;
        }
        for (uint r = 0; r < DEC_ROWS; ++r) {
            if (r < nr) {  // uniform: the whole threadgroup has the same rows
                float dot = 0.0f;
                for (uint e = 0; e < DPL; ++e) {
                    dot += qr[r][e] * kj[e];
                }
                const float s = simd_sum(dot);
                if (j <= lim[r]) {  // uniform in the simdgroup (one key)
                    const float m_new = max(m[r], s);
                    const float corr = exp(m[r] - m_new);
                    const float pj = exp(s - m_new);
                    l[r] = l[r] * corr + pj;
                    for (uint e = 0; e < DPL; ++e) {
                        acc[r][e] = acc[r][e] * corr + pj * vj[e];
                    }
                    m[r] = m_new;
                }
            }
        }
    }

    // Combine the simdgroups: out = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp(m_s - max m).
    for (uint r = 0; r < DEC_ROWS; ++r) {
        if (r < nr) {
            for (uint e = 0; e < DPL; ++e) {
                const uint d = lane + 32 * e;
                if (d < hd) {
                    acc_tg[(sg * DEC_ROWS + r) * hd + d] = acc[r][e];
                }
            }
            if (lane == 0) {
                ml_tg[(sg * DEC_ROWS + r) * 2] = m[r];
                ml_tg[(sg * DEC_ROWS + r) * 2 + 1] = l[r];
            }
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const ulong nrows = (ulong)p.batch * p.q_len * p.n_heads;
    for (uint e = tid; e < nr * hd; e += NTHREADS) {
        const uint r = e / hd;
        const uint d = e % hd;
        float mx = NEG_BIG;
        for (uint s = 0; s < NSG; ++s) {
            mx = max(mx, ml_tg[(s * DEC_ROWS + r) * 2]);
        }
        float lsum = 0.0f;
        float o = 0.0f;
        for (uint s = 0; s < NSG; ++s) {
            const float w = exp(ml_tg[(s * DEC_ROWS + r) * 2] - mx);
            lsum += w * ml_tg[(s * DEC_ROWS + r) * 2 + 1];
            o += w * acc_tg[(s * DEC_ROWS + r) * hd + d];
        }
        const ulong orow = row_offset(p, b, g, rep, r0 + r) / hd;
        if (p.n_splits == 1) {
            out[orow * hd + d] = T(o / lsum);  // lsum > 0: split 0 holds key 0, seen by all
        } else {
            const ulong prow = (ulong)split * nrows + orow;
            part_o[prow * hd + d] = o;
            if (d == 0) {
                part_ml[prow * 2] = mx;
                part_ml[prow * 2 + 1] = lsum;
            }
        }
    }
}

// causal_attention_merge_<dtype>
// Reference: the split-merge of flash-decoding; with causal_attention_decode_* it computes
// mamba2_ops::attention::causal_attention_slow.
// Arguments:
//   part_o   [[buffer(0)]] (n_splits, batch, q_len, n_heads, head_dim) f32
//   part_ml  [[buffer(1)]] (n_splits, batch, q_len, n_heads, 2) f32
//   out      [[buffer(2)]] (batch, q_len, n_heads, head_dim) T
//   p        [[buffer(3)]] AttentionParams
// out = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s, M = max_s m_s (finite: split 0).
// Grid: (ceil(head_dim / tx), batch * q_len * n_heads) threadgroups of tx threads (the host
// uses min(256, head_dim rounded up to 32)); one thread per output element.
// Threadgroup memory: none.
template <typename T>
kernel void causal_attention_merge(
    device const float* part_o [[buffer(0)]],
    device const float* part_ml [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant AttentionParams& p [[buffer(3)]],
    uint2 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    uint2 tpg [[threads_per_threadgroup]]) {
    const uint d = tgid.x * tpg.x + tid;
    const ulong row = tgid.y;
    if (d >= p.head_dim) {
        return;
    }
    const ulong nrows = (ulong)p.batch * p.q_len * p.n_heads;
    float mx = NEG_BIG;
    for (uint s = 0; s < p.n_splits; ++s) {
        mx = max(mx, part_ml[(s * nrows + row) * 2]);
    }
    float lsum = 0.0f;
    float o = 0.0f;
    for (uint s = 0; s < p.n_splits; ++s) {
        const ulong pr = s * nrows + row;
        const float w = exp(part_ml[pr * 2] - mx);
        lsum += w * part_ml[pr * 2 + 1];
        o += w * part_o[pr * p.head_dim + d];
    }
    out[row * p.head_dim + d] = T(o / lsum);
}

// causal_attention_prefill_<dtype> (NT = 16, BK = 32), causal_attention_prefill_hd256_<dtype>
// (NT = 32, BK = 16)
// Reference: mamba2_ops::attention::causal_attention_slow.
// Arguments: q, k, v, out as for the decode kernel ([[buffer(0..3)]]), p [[buffer(4)]].
// Preconditions (host): head_dim % 8 == 0, head_dim <= 8 * NT.
// Grid: (ceil(rep * q_len / 32), n_kv_heads, batch) threadgroups of 128 threads; x runs over
// query blocks from the last (longest key range) to the first. FlashAttention-2 structure (Dao,
// 2023) as in MLX's steel attention, on simdgroup_float8x8 tiles with f32 accumulation:
// - simdgroup s owns query rows 8 s .. 8 s + 7 of the block: its pre-scaled Q stripe (staged
//   once through the K/V tile) and its output accumulator O (8 x head_dim) stay in registers
//   (head_dim / 8 tiles each);
// - keys stream in tiles of BK, up to the causal limit of the block's last row: the K tile
//   goes to threadgroup memory (as f32, rows padded by 4 floats), S = Q Kᵀ (8 x BK per
//   simdgroup) goes to the simdgroup's stripe; 4 lanes per row take the masked row max and sum
//   (simd_shuffle_xor), write P = exp(S - m_new) back and rescale O by diag(exp(m_old - m_new))
//   (one 8 x 8 product per tile of O, skipped when no row max moved); then the V tile replaces
//   the K tile and O += P V;
// - out = O / l, staged through the K/V tile, rounded to T.
// Threadgroup memory: K/V tile 4224 + stripes 1024 + diagonals 256 floats = 21.5 KiB.
// (Per-simdgroup staging is guarded by threadgroup barriers, not simdgroup ones: the harness's
// race checker orders a write after several lanes' reads only across a threadgroup barrier.)
template <typename T, uint NT, uint BK>
kernel void causal_attention_prefill(
    device const T* q [[buffer(0)]],
    device const T* k [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device T* out [[buffer(3)]],
    constant AttentionParams& p [[buffer(4)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float kv_tile[LEN_KV];
    threadgroup float s_tile[LEN_S];
    threadgroup float diag[LEN_STAGE];
    static_assert(BK % 8 == 0 && BK * (NT * 8 + 4) <= LEN_KV && NSG * 8 * BK <= LEN_S,
                  "prefill tile sizes");
    const uint hd = p.head_dim;
    const uint nt = hd / 8;
    const uint ks = hd + 4;  // row stride of the K/V tile
    const uint rep = p.n_heads / p.n_kv_heads;
    const uint rows = rep * p.q_len;
    const uint nqb = (rows + PRE_ROWS - 1) / PRE_ROWS;
    const uint r0 = (nqb - 1 - tgid.x) * PRE_ROWS;
    const uint g = tgid.y;
    const uint b = tgid.z;
    const uint off = p.kv_len - p.q_len;
    const uint kv_end = off + (min(r0 + PRE_ROWS, rows) - 1) / rep + 1;
    threadgroup float* st = s_tile + sg * 8 * BK;  // this simdgroup's scores, 8 x BK
    threadgroup float* dg = diag + sg * 64;        // this simdgroup's 8 x 8 rescaling tile

    // Lanes 4 r .. 4 r + 3 own row r of the stripe for the softmax; lane l also writes elements
    // 2 l and 2 l + 1 of the diagonal rescaling tile, which lie in the same row.
    const uint my_row = lane / 4;
    const uint sub = lane % 4;
    const uint row = r0 + sg * 8 + my_row;
    const bool valid = row < rows;
    const uint lim = off + (valid ? row / rep : 0);  // last key this row sees

    // The pre-scaled Q stripe, staged through the K/V tile 128 columns at a time.
    simdgroup_float8x8 qm[NT];
    simdgroup_float8x8 om[NT];
    for (uint t = 0; t < NT; ++t) {
        om[t] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        if (t < nt) {
            if (t % 16 == 0) {
                threadgroup_barrier(mem_flags::mem_threadgroup);
                const uint c0 = t * 8;
                const uint cw = min(128u, hd - c0);
                for (uint rr = 0; rr < 8; ++rr) {
                    const uint r = r0 + sg * 8 + rr;
                    for (uint c = lane; c < cw; c += 32) {
                        kv_tile[(sg * 8 + rr) * STAGE_STRIDE + c] =
                            r < rows ? float(q[row_offset(p, b, g, rep, r) + c0 + c]) * p.scale : 0.0f;
                    }
                }
                threadgroup_barrier(mem_flags::mem_threadgroup);
            }
            simdgroup_load(qm[t], kv_tile + sg * 8 * STAGE_STRIDE + (t % 16) * 8, STAGE_STRIDE);
        }
    }

    device const T* kb = k + (ulong)b * p.k_sb + (ulong)g * p.k_sh;
    device const T* vb = v + (ulong)b * p.v_sb + (ulong)g * p.v_sh;
    float m_run = NEG_BIG;
    float l_run = 0.0f;
    for (uint k0 = 0; k0 < kv_end; k0 += BK) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the last tile's readers are done
        for (uint key = sg; key < BK; key += NSG) {
            const uint j = k0 + key;
            for (uint d = lane; d < hd; d += 32) {
                kv_tile[key * ks + d] = j < kv_end ? float(kb[(ulong)j * p.k_st + d]) : 0.0f;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint c = 0; c < BK / 8; ++c) {
            simdgroup_float8x8 sm = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            for (uint t = 0; t < NT; ++t) {
                if (t < nt) {
                    simdgroup_float8x8 km;
                    simdgroup_load(km, kv_tile + c * 8 * ks + t * 8, ks, ulong2(0, 0), true);
                    simdgroup_multiply_accumulate(sm, qm[t], km, sm);
                }
            }
            simdgroup_store(sm, st + c * 8, BK);
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);

        // online softmax of this simdgroup's 8 rows; keys past a row's limit get P = 0
        threadgroup float* srow = st + my_row * BK;
        float mx = NEG_BIG;
        for (uint c = sub; c < BK; c += 4) {
            if (valid && k0 + c <= lim) {
                mx = max(mx, srow[c]);
            }
        }
        mx = max(mx, simd_shuffle_xor(mx, 1));
        mx = max(mx, simd_shuffle_xor(mx, 2));
        const float m_new = max(m_run, mx);
        const float corr = exp(m_run - m_new);
        float sum = 0.0f;
        for (uint c = sub; c < BK; c += 4) {
            const float pv = (valid && k0 + c <= lim) ? exp(srow[c] - m_new) : 0.0f;
            srow[c] = pv;
            sum += pv;
        }
        sum += simd_shuffle_xor(sum, 1);
        sum += simd_shuffle_xor(sum, 2);
        l_run = l_run * corr + sum;
        m_run = m_new;
        for (uint e = 0; e < 2; ++e) {
            const uint idx = 2 * lane + e;
            dg[idx] = idx % 8 == my_row ? corr : 0.0f;  // diag(corr)
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);
        if (!simd_all(corr == 1.0f)) {
            simdgroup_float8x8 dm;
            simdgroup_load(dm, dg, 8);
            for (uint t = 0; t < NT; ++t) {
                if (t < nt) {
                    simdgroup_float8x8 scaled;
                    simdgroup_multiply(scaled, dm, om[t]);
                    om[t] = scaled;
                }
            }
        }

        threadgroup_barrier(mem_flags::mem_threadgroup);  // every simdgroup is done with K
        for (uint key = sg; key < BK; key += NSG) {
            const uint j = k0 + key;
            for (uint d = lane; d < hd; d += 32) {
                kv_tile[key * ks + d] = j < kv_end ? float(vb[(ulong)j * p.v_st + d]) : 0.0f;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint c = 0; c < BK / 8; ++c) {
            simdgroup_float8x8 pm;
            simdgroup_load(pm, st + c * 8, BK);
            for (uint t = 0; t < NT; ++t) {
                if (t < nt) {
                    simdgroup_float8x8 vm;
                    simdgroup_load(vm, kv_tile + c * 8 * ks + t * 8, ks);
                    simdgroup_multiply_accumulate(om[t], pm, vm, om[t]);
                }
            }
        }
    }

    // out = O / l (l > 0 for valid rows: every row sees key 0), staged through the K/V tile
    // 128 columns at a time
    float inv_l[8];
    for (uint rr = 0; rr < 8; ++rr) {
        inv_l[rr] = 1.0f / simd_shuffle(l_run, (ushort)(4 * rr));
    }
    for (uint t = 0; t < NT; ++t) {
        if (t < nt) {
            if (t % 16 == 0) {
                threadgroup_barrier(mem_flags::mem_threadgroup);  // earlier readers are done
            }
            simdgroup_store(om[t], kv_tile + sg * 8 * STAGE_STRIDE + (t % 16) * 8, STAGE_STRIDE);
            if (t % 16 == 15 || t + 1 == nt) {
                threadgroup_barrier(mem_flags::mem_threadgroup);
                const uint c0 = t / 16 * 128;
                const uint cw = min(128u, hd - c0);
                for (uint rr = 0; rr < 8; ++rr) {
                    const uint r = r0 + sg * 8 + rr;
                    if (r < rows) {
                        for (uint c = lane; c < cw; c += 32) {
                            out[row_offset(p, b, g, rep, r) + c0 + c] =
                                T(kv_tile[(sg * 8 + rr) * STAGE_STRIDE + c] * inv_l[rr]);
                        }
                    }
                }
            }
        }
    }
}

typedef decltype(causal_attention_decode<float, 4>) causal_attention_decode_f32_t;
typedef decltype(causal_attention_decode<half, 4>) causal_attention_decode_f16_t;
typedef decltype(causal_attention_decode<float, 8>) causal_attention_decode_hd256_f32_t;
typedef decltype(causal_attention_decode<half, 8>) causal_attention_decode_hd256_f16_t;
typedef decltype(causal_attention_merge<float>) causal_attention_merge_f32_t;
typedef decltype(causal_attention_merge<half>) causal_attention_merge_f16_t;
typedef decltype(causal_attention_prefill<float, 16, 32>) causal_attention_prefill_f32_t;
typedef decltype(causal_attention_prefill<half, 16, 32>) causal_attention_prefill_f16_t;
typedef decltype(causal_attention_prefill<float, 32, 16>) causal_attention_prefill_hd256_f32_t;
typedef decltype(causal_attention_prefill<half, 32, 16>) causal_attention_prefill_hd256_f16_t;
template [[host_name("causal_attention_decode_f32")]] kernel causal_attention_decode_f32_t causal_attention_decode<float, 4>;
template [[host_name("causal_attention_decode_f16")]] kernel causal_attention_decode_f16_t causal_attention_decode<half, 4>;
template [[host_name("causal_attention_decode_hd256_f32")]] kernel causal_attention_decode_hd256_f32_t causal_attention_decode<float, 8>;
template [[host_name("causal_attention_decode_hd256_f16")]] kernel causal_attention_decode_hd256_f16_t causal_attention_decode<half, 8>;
template [[host_name("causal_attention_merge_f32")]] kernel causal_attention_merge_f32_t causal_attention_merge<float>;
template [[host_name("causal_attention_merge_f16")]] kernel causal_attention_merge_f16_t causal_attention_merge<half>;
template [[host_name("causal_attention_prefill_f32")]] kernel causal_attention_prefill_f32_t causal_attention_prefill<float, 16, 32>;
template [[host_name("causal_attention_prefill_f16")]] kernel causal_attention_prefill_f16_t causal_attention_prefill<half, 16, 32>;
template [[host_name("causal_attention_prefill_hd256_f32")]] kernel causal_attention_prefill_hd256_f32_t causal_attention_prefill<float, 32, 16>;
template [[host_name("causal_attention_prefill_hd256_f16")]] kernel causal_attention_prefill_hd256_f16_t causal_attention_prefill<half, 32, 16>;
// bfloat needs MSL 3.1 (macOS 14).
#if !defined(__METAL_VERSION__) || __METAL_VERSION__ >= 310
typedef decltype(causal_attention_decode<bfloat, 4>) causal_attention_decode_bf16_t;
typedef decltype(causal_attention_decode<bfloat, 8>) causal_attention_decode_hd256_bf16_t;
typedef decltype(causal_attention_merge<bfloat>) causal_attention_merge_bf16_t;
typedef decltype(causal_attention_prefill<bfloat, 16, 32>) causal_attention_prefill_bf16_t;
typedef decltype(causal_attention_prefill<bfloat, 32, 16>) causal_attention_prefill_hd256_bf16_t;
template [[host_name("causal_attention_decode_bf16")]] kernel causal_attention_decode_bf16_t causal_attention_decode<bfloat, 4>;
template [[host_name("causal_attention_decode_hd256_bf16")]] kernel causal_attention_decode_hd256_bf16_t causal_attention_decode<bfloat, 8>;
template [[host_name("causal_attention_merge_bf16")]] kernel causal_attention_merge_bf16_t causal_attention_merge<bfloat>;
template [[host_name("causal_attention_prefill_bf16")]] kernel causal_attention_prefill_bf16_t causal_attention_prefill<bfloat, 16, 32>;
template [[host_name("causal_attention_prefill_hd256_bf16")]] kernel causal_attention_prefill_hd256_bf16_t causal_attention_prefill<bfloat, 32, 16>;
#endif
