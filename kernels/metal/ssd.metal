// SSD chunk scan: the prefill of the Mamba-2 selective state space model.
//
// For each head h, with per-token decay exp(dt_t A_h) and input dt_t x_t ⊗ B_t:
//   state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t B_tᵀ          (headdim, d_state)
//   y_t     = state_t C_t + D_h x_t, then y_t * silu(z_t)
// computed chunk by chunk (64 tokens): inside a chunk in the quadratic form
//   y[l] = sum_{s <= l} (C_l · B_s) exp(cum[l] - cum[s]) dt_s x_s  +  exp(cum[l]) C_l · state_in
// and the state carried from chunk to chunk, in token order, in f32. Two dispatches:
// ssd_chunk_cb (C Bᵀ per chunk and group) then ssd_chunk_scan.
//
// Activations T are float, half or bfloat; A, D, dt_bias and states are f32; products run on
// simdgroup_float8x8 tiles with f32 accumulation. Kernels: `ssd_chunk_cb_<dtype>`, `ssd_chunk_scan_<dtype>`.
#include <metal_stdlib>
using namespace metal;

#define METAL_FUNC inline __attribute__((__always_inline__))
#define CHUNK 64     // tokens per chunk
#define ROWS 16      // headdim rows per threadgroup
#define NT 8         // d_state columns per pass over B and C
#define NTHREADS 128 // 4 simdgroups
// Threadgroup array lengths, as single tokens (the harness rewriter reads them that way).
#define LEN_TOKROWS 1024  // CHUNK * ROWS
#define LEN_TOKTOK 4096   // CHUNK * CHUNK
#define LEN_TOKNT 512     // CHUNK * NT
static_assert(LEN_TOKROWS == CHUNK * ROWS && LEN_TOKTOK == CHUNK * CHUNK && LEN_TOKNT == CHUNK * NT,
              "threadgroup array lengths");

// Mirrors mamba2_ops::metal_params::SsdScanParams.
struct SsdScanParams {
    uint batch;
    uint seqlen;
    uint nheads;
    uint headdim;
    uint ngroups;
    uint d_state;
    uint has_d;
    uint has_z;
    uint has_dt_bias;
    uint has_init;
    uint has_seq_idx;
    uint dt_softplus;
    uint dt_clamp;
    float dt_min;
    float dt_max;
};

METAL_FUNC float silu_f(float v) {
    return v / (1.0f + exp(-v));
}

// softplus(v) = max(v, 0) + log(1 + exp(-|v|)): never overflows, as in the reference.
METAL_FUNC float softplus_f(float v) {
    return max(v, 0.0f) + log(1.0f + exp(-abs(v)));
}

// C and B tile of d_state columns n0 .. n0 + 8 of one chunk into threadgroup memory, token-major
// (64 x 8 each); tokens past the end of the sequence read as 0 (the tail of the last chunk).
template <typename T>
METAL_FUNC void load_bc_tiles(
    device const T* B,
    device const T* C,
    threadgroup float* bt,
    threadgroup float* ct,
    constant SsdScanParams& p,
    uint b, uint g, uint c0, uint len, uint n0, ushort tid) {
    for (uint i = tid; i < CHUNK * NT; i += NTHREADS) {
        const uint l = i / NT;
        const uint j = i % NT;
        float cv = 0.0f;
        float bv = 0.0f;
        if (l < len) {
            const ulong off = (((ulong)b * p.seqlen + c0 + l) * p.ngroups + g) * p.d_state + n0 + j;
            cv = float(C[off]);
            bv = float(B[off]);
        }
        ct[i] = cv;
        bt[i] = bv;
    }
}

// ssd_chunk_cb_<dtype>: stage 1 of the scan.
// Reference: the `cb = C Bᵀ` term of mamba2_ops::ssd::ssd_chunk_scan_slow, per chunk and group
// (heads of a group share it, so it is computed once here instead of in every scan threadgroup).
// Arguments:
//   B   [[buffer(0)]] (batch, seqlen, ngroups, d_state) T
//   C   [[buffer(1)]] (batch, seqlen, ngroups, d_state) T
//   cb  [[buffer(2)]] (batch, ngroups, nchunks, 64, 64) f32, out: cb[l, s] = C_l · B_s (rows
//       and columns of tokens past seqlen are 0)
//   p   [[buffer(3)]] SsdScanParams
// Preconditions (host): d_state % 8 == 0.
// Grid: (nchunks, ngroups, batch) threadgroups of 128 threads (4 simdgroups); simdgroup s
// accumulates rows 16 s .. 16 s + 15 (16 simdgroup_float8x8 tiles) over d_state in 8-wide
// tiles and stores them straight to device memory.
// Threadgroup memory: C and B tiles, 2 x 64 x 8 f32 = 4 KB.
template <typename T>
kernel void ssd_chunk_cb(
    device const T* B [[buffer(0)]],
    device const T* C [[buffer(1)]],
    device float* cb_out [[buffer(2)]],
    constant SsdScanParams& p [[buffer(3)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float ct[LEN_TOKNT];
    threadgroup float bt[LEN_TOKNT];
    const uint chunk = tgid.x;
    const uint g = tgid.y;
    const uint b = tgid.z;
    const uint c0 = chunk * CHUNK;
    const uint len = min((uint)CHUNK, p.seqlen - c0);
    const uint nchunks = (p.seqlen + CHUNK - 1) / CHUNK;
    simdgroup_float8x8 acc[2][8];
    for (uint tr = 0; tr < 2; ++tr) {
        for (uint tc = 0; tc < 8; ++tc) {
            acc[tr][tc] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        }
    }
    for (uint n0 = 0; n0 < p.d_state; n0 += NT) {
        load_bc_tiles(B, C, bt, ct, p, b, g, c0, len, n0, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint tr = 0; tr < 2; ++tr) {
            simdgroup_float8x8 cm;
            simdgroup_load(cm, ct + (16 * sg + 8 * tr) * NT, NT);
            for (uint tc = 0; tc < 8; ++tc) {
                simdgroup_float8x8 bm;  // Bᵀ tile: (n, s)
                simdgroup_load(bm, bt + 8 * tc * NT, NT, ulong2(0, 0), true);
                simdgroup_multiply_accumulate(acc[tr][tc], cm, bm, acc[tr][tc]);
            }
        }
        // the tiles are rewritten by the next pass
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    device float* out = cb_out + (((ulong)b * p.ngroups + g) * nchunks + chunk) * LEN_TOKTOK;
    for (uint tr = 0; tr < 2; ++tr) {
        for (uint tc = 0; tc < 8; ++tc) {
            simdgroup_store(acc[tr][tc], out + (16 * sg + 8 * tr) * CHUNK + 8 * tc, CHUNK);
        }
    }
}

// ssd_chunk_scan_<dtype>: stage 2 of the scan.
// Reference: mamba2_ops::ssd::ssd_chunk_scan_slow (chunk_size does not change the result).
// Arguments:
//   x        [[buffer(0)]]  (batch, seqlen, nheads, headdim) T
//   dt       [[buffer(1)]]  (batch, seqlen, nheads) T, raw (before dt_bias, softplus, clamp)
//   A        [[buffer(2)]]  (nheads) f32
//   B        [[buffer(3)]]  (batch, seqlen, ngroups, d_state) T
//   C        [[buffer(4)]]  (batch, seqlen, ngroups, d_state) T
//   D        [[buffer(5)]]  (nheads) f32                           (has_d)
//   z        [[buffer(6)]]  (batch, seqlen, nheads, headdim) T     (has_z)
//   dt_bias  [[buffer(7)]]  (nheads) f32                           (has_dt_bias)
//   init     [[buffer(8)]]  (batch, nheads, headdim, d_state) f32  (has_init)
//   seq_idx  [[buffer(9)]]  (batch, seqlen) u32                    (has_seq_idx): the state
//                           restarts from zero wherever the id changes
//   y        [[buffer(10)]] (batch, seqlen, nheads, headdim) T, out
//   state    [[buffer(11)]] (batch, nheads, headdim, d_state) f32, out: the final state; also
//                           the carried state between chunks (each threadgroup owns its rows)
//   cb       [[buffer(12)]] (batch, ngroups, nchunks, 64, 64) f32: C Bᵀ from ssd_chunk_cb
//   p        [[buffer(13)]] SsdScanParams
// Preconditions (host): headdim % 16 == 0, d_state % 8 == 0.
// Grid: (headdim / 16, nheads, batch) threadgroups of 128 threads (4 simdgroups); threadgroup
// (pb, h, b) owns state rows 16 pb .. 16 pb + 15 of head h and walks the chunks in order.
// Per chunk:
//   1. simdgroup 0: processed dt, inclusive cumsum of dt A (simd_prefix_inclusive_sum, two
//      tokens per lane) and the run (packed-sequence segment) index of each token;
//   2. xs = dt x and xw = dt x exp(cum[end] - cum[s]) (0 outside the last run) for 16 rows;
//   3. over d_state in tiles of 8: C, B tiles to threadgroup memory; simdgroup s accumulates
//      rows 16 s .. 16 s + 15 of C stateᵀ (64 x 16);
//      state[:, tile] = exp(cum[end]) state + xwᵀ B (two 8 x 8 tiles) is computed in
//      registers and stored by simdgroups 0 and 1 after a barrier, once every simdgroup has
//      read the old tile;
//   4. C Bᵀ (stage 1) masked by s <= l, same run, times exp(cum[l] - cum[s]);
//   5. y_diag = M xs on 8x8 tiles (tiles above the diagonal skipped);
//   6. y = y_diag + exp(cum[l]) C stateᵀ (if l continues the entering state) + D x, gated.
// The last chunk may be partial (tail): loads past seqlen are predicated to 0 and padding
// tokens get dt = 0 (decay 1, no input), so they change neither outputs nor the state.
// Threadgroup memory (f32): xs 64x16 (4 KB) + xw 64x16 (4 KB) + masked C Bᵀ 64x64 (16 KB,
// reused to stage y) + C, B tiles 2 x 64x8 (4 KB) + dt, cum, run 3 x 64 (768 B) = 29440 B < 32 KB.
template <typename T>
kernel void ssd_chunk_scan(
    device const T* x [[buffer(0)]],
    device const T* dt [[buffer(1)]],
    device const float* A [[buffer(2)]],
    device const T* B [[buffer(3)]],
    device const T* C [[buffer(4)]],
    device const float* D [[buffer(5)]],
    device const T* z [[buffer(6)]],
    device const float* dt_bias [[buffer(7)]],
    device const float* init [[buffer(8)]],
    device const uint* seq_idx [[buffer(9)]],
    device T* y [[buffer(10)]],
    device float* state [[buffer(11)]],
    device const float* cb_in [[buffer(12)]],
    constant SsdScanParams& p [[buffer(13)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float xs[LEN_TOKROWS];
    threadgroup float xw[LEN_TOKROWS];
    threadgroup float cb[LEN_TOKTOK];
    threadgroup float ct[LEN_TOKNT];
    threadgroup float bt[LEN_TOKNT];
    threadgroup float dts[CHUNK];
    threadgroup float cum[CHUNK];
    threadgroup uint runs[CHUNK];

    const uint p0 = tgid.x * ROWS;
    const uint h = tgid.y;
    const uint b = tgid.z;
    const uint N = p.d_state;
    const uint g = h / (p.nheads / p.ngroups);
    const ulong state_off = (((ulong)b * p.nheads + h) * p.headdim + p0) * N;
    device float* S = state + state_off;  // ROWS x N, row-major

    // The carried state starts as the initial state (or zeros).
    for (uint i = tid; i < ROWS * N; i += NTHREADS) {
        S[i] = p.has_init != 0 ? init[state_off + i] : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_device);

    const float a_h = A[h];
    const float d_h = p.has_d != 0 ? D[h] : 0.0f;
    const float dt_b = p.has_dt_bias != 0 ? dt_bias[h] : 0.0f;
    device const uint* ids = seq_idx + (ulong)b * p.seqlen;
    uint state_run = 0;  // run index the carried state belongs to (run 0: the initial state)
    const uint nchunks = (p.seqlen + CHUNK - 1) / CHUNK;

    for (uint c0 = 0; c0 < p.seqlen; c0 += CHUNK) {
        const uint len = min((uint)CHUNK, p.seqlen - c0);
        const bool full = len == CHUNK;

        // 1. dt, cumsum of dt A, run indices (simdgroup 0: tokens lane and lane + 32)
        if (sg == 0) {
            float a_dt[2];
            uint flag[2];
            for (uint k = 0; k < 2; ++k) {
                const uint l = lane + 32 * k;
                const uint t = c0 + l;
                float v = 0.0f;
                uint f = 0;
                if (l < len) {
                    v = float(dt[((ulong)b * p.seqlen + t) * p.nheads + h]) + dt_b;
                    if (p.dt_softplus != 0) {
                        v = softplus_f(v);
                    }
                    if (p.dt_clamp != 0) {
                        v = clamp(v, p.dt_min, p.dt_max);
                    }
                    f = (p.has_seq_idx != 0 && t > 0 && ids[t] != ids[t - 1]) ? 1u : 0u;
                }
                dts[l] = v;
                a_dt[k] = v * a_h;
                flag[k] = f;
            }
            const float lo = simd_prefix_inclusive_sum(a_dt[0]);
            const float hi = simd_prefix_inclusive_sum(a_dt[1]) + simd_broadcast(lo, 31);
            const uint rlo = simd_prefix_inclusive_sum(flag[0]);
            const uint rhi = simd_prefix_inclusive_sum(flag[1]) + simd_broadcast(rlo, 31);
            cum[lane] = lo;
            cum[lane + 32] = hi;
            runs[lane] = state_run + rlo;
            runs[lane + 32] = state_run + rhi;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const float cum_end = cum[CHUNK - 1];
        const uint run_end = runs[CHUNK - 1];
        // decay of the entering state over the whole chunk (0 if a new sequence started)
        const float decay_end = run_end == state_run ? exp(cum_end) : 0.0f;

        // 2. xs = dt x; xw = dt x exp(cum[end] - cum[s]) for tokens of the last run
        for (uint i = tid; i < CHUNK * ROWS; i += NTHREADS) {
            const uint l = i / ROWS;
            const uint r = i % ROWS;
            float v = 0.0f;
            if (full || l < len) {
                v = float(x[(((ulong)b * p.seqlen + c0 + l) * p.nheads + h) * p.headdim + p0 + r]) *
                    dts[l];
            }
            xs[i] = v;
            xw[i] = runs[l] == run_end ? v * exp(cum_end - cum[l]) : 0.0f;
        }

        // 3. one pass over d_state: C stateᵀ, state update
        simdgroup_float8x8 acc_off[2][2];
        for (uint tr = 0; tr < 2; ++tr) {
            for (uint pc = 0; pc < 2; ++pc) {
                acc_off[tr][pc] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            }
        }
        for (uint n0 = 0; n0 < N; n0 += NT) {
            load_bc_tiles(B, C, bt, ct, p, b, g, c0, len, n0, tid);
            threadgroup_barrier(mem_flags::mem_threadgroup);
            for (uint tr = 0; tr < 2; ++tr) {
                simdgroup_float8x8 cm;
                simdgroup_load(cm, ct + (16 * sg + 8 * tr) * NT, NT);
                for (uint pc = 0; pc < 2; ++pc) {
                    simdgroup_float8x8 sm;  // stateᵀ tile: (n, p)
                    simdgroup_load(sm, S + 8 * pc * N + n0, N, ulong2(0, 0), true);
                    simdgroup_multiply_accumulate(acc_off[tr][pc], cm, sm, acc_off[tr][pc]);
                }
            }
            // new state tile: exp(cum[end]) state + xwᵀ B, in registers. Simdgroups 2 and 3
            // compute the tiles of 0 and 1 again instead of idling: no branch around the
            // barrier below (a compiler may duplicate a barrier between two equal branches).
            const uint st = sg % (ROWS / 8);
            simdgroup_float8x8 acc_s;
            {
                simdgroup_float8x8 sm;
                simdgroup_load(sm, S + 8 * st * N + n0, N);
                simdgroup_multiply(acc_s, simdgroup_float8x8(decay_end), sm);
                for (uint k = 0; k < CHUNK / 8; ++k) {
                    simdgroup_float8x8 xm;  // xwᵀ tile: (p, s)
                    simdgroup_load(xm, xw + 8 * k * ROWS + 8 * st, ROWS, ulong2(0, 0), true);
                    simdgroup_float8x8 bm;  // B tile: (s, n)
                    simdgroup_load(bm, bt + 8 * k * NT, NT);
                    simdgroup_multiply_accumulate(acc_s, xm, bm, acc_s);
                }
            }
            // every simdgroup has read state[:, n0 .. n0 + 8] before it is overwritten
            threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
            if (sg < ROWS / 8) {
                simdgroup_store(acc_s, S + 8 * sg * N + n0, N);
            }
            // the tiles are free again; the state tile is written before anyone reads it
            threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
        }

        // 4. M[l, s] = (C Bᵀ)[l, s] exp(cum[l] - cum[s]) for s <= l in the same run
        device const float* cbc = cb_in + (((ulong)b * p.ngroups + g) * nchunks + c0 / CHUNK) * LEN_TOKTOK;
        for (uint i = tid; i < CHUNK * CHUNK; i += NTHREADS) {
            const uint l = i / CHUNK;
            const uint s = i % CHUNK;
            float m = 0.0f;
            if (s <= l && runs[s] == runs[l]) {
                m = cbc[i] * exp(cum[l] - cum[s]);
            }
            cb[i] = m;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // 5. y_diag = M xs for rows 16 sg .. 16 sg + 15 (M is zero right of the diagonal tile)
        simdgroup_float8x8 acc_y[2][2];
        for (uint tr = 0; tr < 2; ++tr) {
            const uint row_tile = 2 * sg + tr;
            for (uint pc = 0; pc < 2; ++pc) {
                acc_y[tr][pc] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            }
            for (uint k = 0; k <= row_tile; ++k) {
                simdgroup_float8x8 mm;
                simdgroup_load(mm, cb + 8 * row_tile * CHUNK + 8 * k, CHUNK);
                for (uint pc = 0; pc < 2; ++pc) {
                    simdgroup_float8x8 xm;
                    simdgroup_load(xm, xs + 8 * k * ROWS + 8 * pc, ROWS);
                    simdgroup_multiply_accumulate(acc_y[tr][pc], mm, xm, acc_y[tr][pc]);
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // 6. stage y_diag (cb[0 ..]) and C stateᵀ (cb[64*16 ..]) and write y
        for (uint tr = 0; tr < 2; ++tr) {
            for (uint pc = 0; pc < 2; ++pc) {
                const uint o = (16 * sg + 8 * tr) * ROWS + 8 * pc;
                simdgroup_store(acc_y[tr][pc], cb + o, ROWS);
                simdgroup_store(acc_off[tr][pc], cb + CHUNK * ROWS + o, ROWS);
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint i = tid; i < len * ROWS; i += NTHREADS) {
            const uint l = i / ROWS;
            const uint r = i % ROWS;
            float v = cb[i];
            if (runs[l] == state_run) {
                v += exp(cum[l]) * cb[CHUNK * ROWS + i];
            }
            const ulong xi = (((ulong)b * p.seqlen + c0 + l) * p.nheads + h) * p.headdim + p0 + r;
            v += d_h * float(x[xi]);
            if (p.has_z != 0) {
                v *= silu_f(float(z[xi]));
            }
            y[xi] = T(v);
        }
        state_run = run_end;
        // dt, cum, runs, xs and cb are rewritten by the next chunk
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}

typedef decltype(ssd_chunk_cb<float>) ssd_chunk_cb_f32_t;
typedef decltype(ssd_chunk_cb<half>) ssd_chunk_cb_f16_t;
template [[host_name("ssd_chunk_cb_f32")]] kernel ssd_chunk_cb_f32_t ssd_chunk_cb<float>;
template [[host_name("ssd_chunk_cb_f16")]] kernel ssd_chunk_cb_f16_t ssd_chunk_cb<half>;
typedef decltype(ssd_chunk_scan<float>) ssd_chunk_scan_f32_t;
typedef decltype(ssd_chunk_scan<half>) ssd_chunk_scan_f16_t;
template [[host_name("ssd_chunk_scan_f32")]] kernel ssd_chunk_scan_f32_t ssd_chunk_scan<float>;
template [[host_name("ssd_chunk_scan_f16")]] kernel ssd_chunk_scan_f16_t ssd_chunk_scan<half>;
// bfloat needs MSL 3.1 (macOS 14).
#if !defined(__METAL_VERSION__) || __METAL_VERSION__ >= 310
typedef decltype(ssd_chunk_cb<bfloat>) ssd_chunk_cb_bf16_t;
template [[host_name("ssd_chunk_cb_bf16")]] kernel ssd_chunk_cb_bf16_t ssd_chunk_cb<bfloat>;
typedef decltype(ssd_chunk_scan<bfloat>) ssd_chunk_scan_bf16_t;
template [[host_name("ssd_chunk_scan_bf16")]] kernel ssd_chunk_scan_bf16_t ssd_chunk_scan<bfloat>;
#endif
