// conv1d.cu: causal depthwise conv1d of Mamba-2 (prefill, decode update, varlen conv states).
#include "common.cuh"

#define CONV_MAX_D 8  // d_conv above this falls back to the reference (released models: 4)

// True when tokens a <= b of one batch row lie in the same run of equal seq_idx (no id change
// between them). Only called with b - a < d_conv, so the loop is short.
__device__ __forceinline__ bool same_run(const unsigned* seq, i64 a, i64 b) {
    for (i64 i = a + 1; i <= b; ++i)
        if (seq[i] != seq[i - 1]) return false;
    return true;
}

// causal_conv1d_fwd_<dtype>
// Reference: conv1d.rs `causal_conv1d_slow` (and `conv_by_segments` when seq_idx is given).
// Arguments:
//   x        (batch, seqlen, channels) T, channel stride 1, batch/token strides xs_b, xs_t
//   weight   (channels, d_conv) contiguous, dtype w_dt;  bias (channels) dtype b_dt or null
//   init     (batch, channels, d_conv) f32 contiguous or null
//   seq_idx  (batch, seqlen) u32 contiguous or null
//   y        (batch, seqlen, channels) T contiguous (output)
//   fstate   (batch, channels, d_conv) f32 contiguous (output: final conv state)
// Block layout: blockDim.x = 128 threads along channels (coalesced), blockIdx.x = channel block,
//   blockIdx.y = token tile of TILE_T tokens, blockIdx.z = batch. Each thread produces TILE_T
//   outputs of one channel: without seq_idx from a sliding window in registers (one load per
//   output), with seq_idx by re-reading the taps (L1/L2 hits) behind a same-run check. The
//   blocks of the last token tile also write fstate.
// Shared memory: none.
#define CONV_TILE_T 32
template <typename T>
__device__ void conv_fwd(const T* __restrict__ x, i64 xs_b, i64 xs_t,
                         const void* __restrict__ weight, int w_dt,
                         const void* __restrict__ bias, int b_dt,
                         const float* __restrict__ init, const unsigned* __restrict__ seq_idx,
                         T* __restrict__ y, float* __restrict__ fstate,
                         i64 seqlen, i64 channels, int d_conv, int silu) {
    const i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 b = blockIdx.z;
    if (c >= channels) return;
    float w[CONV_MAX_D];
#pragma unroll
    for (int k = 0; k < CONV_MAX_D; ++k) w[k] = k < d_conv ? load_any(weight, w_dt, c * d_conv + k) : 0.0f;
    const float bv = bias ? load_any(bias, b_dt, c) : 0.0f;
    const T* xb = x + b * xs_b + c;
    const unsigned* seq = seq_idx ? seq_idx + b * seqlen : nullptr;
    const float* ini = init ? init + (b * channels + c) * d_conv : nullptr;

    // value of the input stream at token position pos (may be < 0: the initial state), as seen
    // from output token t (seq_idx: only the run of t is visible).
    auto value = [&](i64 pos, i64 t) -> float {
        if (pos >= 0) {
            if (seq && !same_run(seq, pos, t)) return 0.0f;
            return to_f32(xb[pos * xs_t]);
        }
        if (seq && !same_run(seq, 0, t)) return 0.0f;  // only the first run continues init
        // init holds the d_conv inputs before token 0, oldest first: pos = -1 is init[d_conv-1].
        return ini ? ini[d_conv + pos] : 0.0f;
    };

    const i64 t0 = (i64)blockIdx.y * CONV_TILE_T;
    const i64 t1 = min(t0 + CONV_TILE_T, seqlen);
    if (!seq) {
        // Sliding window in registers: win[k] holds the input k steps back
        // (win[0] the newest); one load per output instead of d_conv.
        // Reversed taps, so that both arrays are indexed by compile-time constants only (a
        // run-time index into a register array becomes local memory or a select chain).
        float wr[CONV_MAX_D], win[CONV_MAX_D];
#pragma unroll
        for (int k = 0; k < CONV_MAX_D; ++k)
            wr[k] = k < d_conv ? load_any(weight, w_dt, c * d_conv + d_conv - 1 - k) : 0.0f;
#pragma unroll
        for (int k = 0; k < CONV_MAX_D; ++k) win[k] = k < d_conv - 1 ? value(t0 - 1 - k, t0) : 0.0f;
#pragma unroll 4
        for (i64 t = t0; t < t1; ++t) {
#pragma unroll
            for (int k = CONV_MAX_D - 1; k > 0; --k) win[k] = win[k - 1];
            win[0] = to_f32(xb[t * xs_t]);
            float acc = bv;
#pragma unroll
            for (int k = 0; k < CONV_MAX_D; ++k) acc += wr[k] * win[k];
            if (silu) acc = silu_f(acc);
            y[(b * seqlen + t) * channels + c] = from_f32<T>(acc);
        }
    } else
    for (i64 t = t0; t < t1; ++t) {
        float acc = bv;
#pragma unroll
        for (int k = 0; k < CONV_MAX_D; ++k)
            if (k < d_conv) acc += w[k] * value(t - (d_conv - 1) + k, t);
        if (silu) acc = silu_f(acc);
        y[(b * seqlen + t) * channels + c] = from_f32<T>(acc);
    }
    if (blockIdx.y == gridDim.y - 1) {
        // final state: the newest d_conv inputs of [init, x] as seen from the last token.
        float* fs = fstate + (b * channels + c) * d_conv;
        for (int j = 0; j < d_conv; ++j) fs[j] = value(seqlen - d_conv + j, seqlen - 1);
    }
}

#define CONV_FWD(NAME, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                    \
        const T* x, i64 xs_b, i64 xs_t, const void* weight, int w_dt, const void* bias,        \
        int b_dt, const float* init, const unsigned* seq_idx, T* y, float* fstate, i64 seqlen, \
        i64 channels, int d_conv, int silu) {                                                  \
        conv_fwd<T>(x, xs_b, xs_t, weight, w_dt, bias, b_dt, init, seq_idx, y, fstate, seqlen, \
                    channels, d_conv, silu);                                                   \
    }
CONV_FWD(causal_conv1d_fwd_f32, float)
CONV_FWD(causal_conv1d_fwd_f16, __half)
CONV_FWD(causal_conv1d_fwd_bf16, __nv_bfloat16)

// causal_conv1d_update_<dtype>
// Reference: conv1d.rs `causal_conv1d_update_slow`.
// Arguments:
//   x      (batch, channels) T, channel stride 1, batch stride xs_b
//   state  (batch, channels, d_conv) f32 contiguous, updated in place (shift left, append x)
//   weight (channels, d_conv) dtype w_dt;  bias (channels) dtype b_dt or null
//   y      (batch, channels) T contiguous (output)
// Block layout: 1-D grid over batch * channels, 256 threads, one (batch, channel) per thread.
// Shared memory: none.
template <typename T>
__device__ void conv_update(const T* __restrict__ x, i64 xs_b, float* __restrict__ state,
                            const void* __restrict__ weight, int w_dt,
                            const void* __restrict__ bias, int b_dt, T* __restrict__ y,
                            i64 batch, i64 channels, int d_conv, int silu) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= batch * channels) return;
    const i64 b = i / channels, c = i % channels;
    float* s = state + i * d_conv;
    float acc = bias ? load_any(bias, b_dt, c) : 0.0f;
    for (int k = 0; k < d_conv - 1; ++k) {
        const float v = s[k + 1];
        s[k] = v;
        acc += load_any(weight, w_dt, c * d_conv + k) * v;
    }
    const float xv = to_f32(x[b * xs_b + c]);
    s[d_conv - 1] = xv;
    acc += load_any(weight, w_dt, c * d_conv + d_conv - 1) * xv;
    if (silu) acc = silu_f(acc);
    y[i] = from_f32<T>(acc);
}

#define CONV_UPDATE(NAME, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        NAME(const T* x, i64 xs_b, float* state, const void* weight, int w_dt,                \
             const void* bias, int b_dt, T* y, i64 batch, i64 channels, int d_conv, int silu) { \
        conv_update<T>(x, xs_b, state, weight, w_dt, bias, b_dt, y, batch, channels, d_conv,  \
                       silu);                                                                 \
    }
CONV_UPDATE(causal_conv1d_update_f32, float)
CONV_UPDATE(causal_conv1d_update_f16, __half)
CONV_UPDATE(causal_conv1d_update_bf16, __nv_bfloat16)

// conv_states_varlen_<dtype>
// Reference: conv1d.rs `conv_states_varlen_slow`.
// Arguments:
//   x          (total_tokens, channels) T, channel stride 1, token stride xs_t
//   cu_seqlens (nseq + 1) i64 on the device
//   out        (nseq, channels, d_conv) f32 contiguous (output): the last d_conv inputs of each
//              sequence, zero-padded on the left
// Block layout: 1-D grid over nseq * channels * d_conv, 256 threads, one output per thread.
// Shared memory: none.
template <typename T>
__device__ void conv_varlen(const T* __restrict__ x, i64 xs_t, const i64* __restrict__ cu,
                            float* __restrict__ out, i64 nseq, i64 channels, int d_conv) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nseq * channels * d_conv) return;
    const int j = (int)(i % d_conv);
    const i64 c = (i / d_conv) % channels;
    const i64 s = i / (d_conv * channels);
    const i64 start = cu[s], end = cu[s + 1];
    const i64 pos = end - d_conv + j;
    out[i] = pos >= start ? to_f32(x[pos * xs_t + c]) : 0.0f;
}

#define CONV_VARLEN(NAME, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        NAME(const T* x, i64 xs_t, const i64* cu, float* out, i64 nseq, i64 channels,         \
             int d_conv) {                                                                    \
        conv_varlen<T>(x, xs_t, cu, out, nseq, channels, d_conv);                             \
    }
CONV_VARLEN(conv_states_varlen_f32, float)
CONV_VARLEN(conv_states_varlen_f16, __half)
CONV_VARLEN(conv_states_varlen_bf16, __nv_bfloat16)
