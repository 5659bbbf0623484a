// Causal depthwise conv1d of Mamba-2: prefill (bias, SiLU, initial state, packed sequences),
// single-token update of the rolling state, conv-state extraction for packed varlen batches.
//
// Conventions (all kernels of this file):
// - activations `T` are float, half or bfloat; weights, bias and conv states are f32; all
//   arithmetic is f32. Kernels are instantiated as `<op>_<variant>_<f32|f16|bf16>`.
// - every tensor argument is contiguous, row-major; absent optional arguments are bound to any
//   valid buffer and switched off by a flag in the params struct.
// - the conv state of a sequence holds its last d_conv pre-activation inputs, oldest first.
// - d_conv <= MAX_D_CONV (the host falls back to the reference otherwise).
#include <metal_stdlib>
using namespace metal;

#define METAL_FUNC inline __attribute__((__always_inline__))
#define MAX_D_CONV 8

// Mirrors mamba2_ops::metal_params::Conv1dParams.
struct Conv1dParams {
    uint batch;
    uint seqlen;
    uint channels;
    uint d_conv;
    uint has_bias;
    uint has_init;
    uint has_seq_idx;
    uint silu;
};

// Mirrors mamba2_ops::metal_params::ConvUpdateParams.
struct ConvUpdateParams {
    uint batch;
    uint channels;
    uint d_conv;
    uint has_bias;
    uint silu;
};

// Mirrors mamba2_ops::metal_params::ConvVarlenParams.
struct ConvVarlenParams {
    uint nseq;
    uint channels;
    uint d_conv;
    uint total;
};

METAL_FUNC float silu_f(float v) {
    return v / (1.0f + exp(-v));
}

// Input position p of batch row b, channel c, as seen from token t (p <= t): x[p] when no
// segment boundary (change of seq_idx) lies in (p, t]; for p < 0 the initial state (only if
// token t is in the first segment); 0 otherwise. This is the history the reference builds by
// splitting the batch row into runs of equal seq_idx.
template <typename T>
METAL_FUNC float conv_history(
    device const T* x,
    device const float* init,
    device const uint* seq_idx,
    constant Conv1dParams& p,
    uint b, uint c, int p_pos, int t) {
    int lo = max(p_pos, 0);
    if (p.has_seq_idx != 0) {
        device const uint* ids = seq_idx + (ulong)b * p.seqlen;
        for (int q = t; q > lo; --q) {
            if (ids[q] != ids[q - 1]) {
                return 0.0f;
            }
        }
        // (for p_pos < 0 the loop checked (0, t]: t is in the first run, which the initial
        // state continues)
    }
    if (p_pos >= 0) {
        return float(x[((ulong)b * p.seqlen + (uint)p_pos) * p.channels + c]);
    }
    if (p.has_init == 0) {
        return 0.0f;
    }
    // x[p] for p in [-(d_conv - 1), -1] is initial_state[d_conv + p].
    return init[((ulong)b * p.channels + c) * p.d_conv + (uint)((int)p.d_conv + p_pos)];
}

// causal_conv1d_fwd_<dtype>
// Reference: mamba2_ops::conv1d::causal_conv1d_slow.
// Arguments:
//   x            [[buffer(0)]] (batch, seqlen, channels) T
//   weight       [[buffer(1)]] (channels, d_conv) f32
//   bias         [[buffer(2)]] (channels) f32            (has_bias)
//   init         [[buffer(3)]] (batch, channels, d_conv) f32 (has_init)
//   seq_idx      [[buffer(4)]] (batch, seqlen) u32       (has_seq_idx)
//   y            [[buffer(5)]] (batch, seqlen, channels) T, out
//   final_state  [[buffer(6)]] (batch, channels, d_conv) f32, out
//   p            [[buffer(7)]] Conv1dParams
// Grid: (ceil(channels / 64), ceil(seqlen / 32), batch) threadgroups of 64 threads; thread
// (c, tile) walks 32 tokens of one channel with the last d_conv - 1 inputs in registers, so a
// threadgroup reads 64 consecutive channels of each token (coalesced). The thread of the last
// token tile also writes the final state. Threadgroup memory: none. No barriers.
template <typename T>
kernel void causal_conv1d_fwd(
    device const T* x [[buffer(0)]],
    device const float* weight [[buffer(1)]],
    device const float* bias [[buffer(2)]],
    device const float* init [[buffer(3)]],
    device const uint* seq_idx [[buffer(4)]],
    device T* y [[buffer(5)]],
    device float* final_state [[buffer(6)]],
    constant Conv1dParams& p [[buffer(7)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint3 tid3 [[thread_position_in_threadgroup]],
    uint3 tpg [[threads_per_threadgroup]]) {
    const uint c = tgid.x * tpg.x + tid3.x;
    const uint b = tgid.z;
    const uint tokens = 32;
    const uint t0 = tgid.y * tokens;
    if (c >= p.channels || b >= p.batch || t0 >= p.seqlen) {
        return;
    }
    const uint t1 = min(t0 + tokens, p.seqlen);
    const int dc = (int)p.d_conv;
    float w[MAX_D_CONV];
    for (int k = 0; k < dc; ++k) {
        w[k] = weight[(ulong)c * p.d_conv + k];
    }
    const float bv = p.has_bias != 0 ? bias[c] : 0.0f;
    // win[k] = input at t - (dc - 1) + k for k < dc - 1: the history of the current token.
    float win[MAX_D_CONV];
    for (int k = 0; k < dc - 1; ++k) {
        win[k] = conv_history(x, init, seq_idx, p, b, c, (int)t0 - (dc - 1) + k, (int)t0);
    }
    device const uint* ids = seq_idx + (ulong)b * p.seqlen;
    for (uint t = t0; t < t1; ++t) {
        if (p.has_seq_idx != 0 && t > t0 && ids[t] != ids[t - 1]) {
            // a new sequence starts: nothing before t is visible any more
            for (int k = 0; k < dc - 1; ++k) {
                win[k] = 0.0f;
            }
        }
        const ulong xi = ((ulong)b * p.seqlen + t) * p.channels + c;
        const float xv = float(x[xi]);
        float acc = bv;
        for (int k = 0; k < dc - 1; ++k) {
            acc += w[k] * win[k];
        }
        acc += w[dc - 1] * xv;
        if (p.silu != 0) {
            acc = silu_f(acc);
        }
        y[xi] = T(acc);
        for (int k = 0; k + 1 < dc - 1; ++k) {
            win[k] = win[k + 1];
        }
        if (dc > 1) {
            win[dc - 2] = xv;
        }
    }
    if (t1 == p.seqlen) {
        // the newest d_conv inputs of the last sequence of the row, zero-padded on the left
        for (int j = 0; j < dc; ++j) {
            final_state[((ulong)b * p.channels + c) * p.d_conv + j] = conv_history(
                x, init, seq_idx, p, b, c, (int)p.seqlen - dc + j, (int)p.seqlen - 1);
        }
    }
}

// causal_conv1d_update_<dtype>
// Reference: mamba2_ops::conv1d::causal_conv1d_update_slow.
// Arguments:
//   x           [[buffer(0)]] (batch, channels) T: the new input
//   conv_state  [[buffer(1)]] (batch, channels, d_conv) f32, updated in place (roll left, append x)
//   weight      [[buffer(2)]] (channels, d_conv) f32
//   bias        [[buffer(3)]] (channels) f32 (has_bias)
//   y           [[buffer(4)]] (batch, channels) T, out
//   p           [[buffer(5)]] ConvUpdateParams
// Grid: threads (channels, batch) in threadgroups of (min(channels, 256), 1); one thread per
// (batch, channel) owns its state row. Threadgroup memory: none.
template <typename T>
kernel void causal_conv1d_update(
    device const T* x [[buffer(0)]],
    device float* conv_state [[buffer(1)]],
    device const float* weight [[buffer(2)]],
    device const float* bias [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant ConvUpdateParams& p [[buffer(5)]],
    uint2 gid [[thread_position_in_grid]]) {
    const uint c = gid.x;
    const uint b = gid.y;
    if (c >= p.channels || b >= p.batch) {
        return;
    }
    const int dc = (int)p.d_conv;
    device float* s = conv_state + ((ulong)b * p.channels + c) * p.d_conv;
    const float xv = float(x[(ulong)b * p.channels + c]);
    float acc = p.has_bias != 0 ? bias[c] : 0.0f;
    for (int k = 0; k < dc - 1; ++k) {
        const float v = s[k + 1];
        acc += weight[(ulong)c * p.d_conv + k] * v;
        s[k] = v;
    }
    acc += weight[(ulong)c * p.d_conv + dc - 1] * xv;
    s[dc - 1] = xv;
    if (p.silu != 0) {
        acc = silu_f(acc);
    }
    y[(ulong)b * p.channels + c] = T(acc);
}

// conv_states_varlen_<dtype>
// Reference: mamba2_ops::conv1d::conv_states_varlen_slow.
// Arguments:
//   x           [[buffer(0)]] (total, channels) T: sequences one after another
//   cu_seqlens  [[buffer(1)]] (nseq + 1) u32: cumulative lengths, 0 first, total last
//   states      [[buffer(2)]] (nseq, channels, d_conv) f32, out: last d_conv inputs of each
//               sequence, zero-padded on the left
//   p           [[buffer(3)]] ConvVarlenParams
// Grid: threads (channels, nseq) in threadgroups of (min(channels, 256), 1). Threadgroup
// memory: none.
template <typename T>
kernel void conv_states_varlen(
    device const T* x [[buffer(0)]],
    device const uint* cu_seqlens [[buffer(1)]],
    device float* states [[buffer(2)]],
    constant ConvVarlenParams& p [[buffer(3)]],
    uint2 gid [[thread_position_in_grid]]) {
    const uint c = gid.x;
    const uint s = gid.y;
    if (c >= p.channels || s >= p.nseq) {
        return;
    }
    const uint start = cu_seqlens[s];
    const uint end = cu_seqlens[s + 1];
    const int dc = (int)p.d_conv;
    for (int j = 0; j < dc; ++j) {
        // position end - dc + j, if it lies inside [start, end)
        const int pos = (int)end - dc + j;
        float v = 0.0f;
        if (pos >= (int)start) {
            v = float(x[(ulong)pos * p.channels + c]);
        }
        states[((ulong)s * p.channels + c) * p.d_conv + j] = v;
    }
}

typedef decltype(causal_conv1d_fwd<float>) causal_conv1d_fwd_f32_t;
typedef decltype(causal_conv1d_fwd<half>) causal_conv1d_fwd_f16_t;
template [[host_name("causal_conv1d_fwd_f32")]] kernel causal_conv1d_fwd_f32_t causal_conv1d_fwd<float>;
template [[host_name("causal_conv1d_fwd_f16")]] kernel causal_conv1d_fwd_f16_t causal_conv1d_fwd<half>;
typedef decltype(causal_conv1d_update<float>) causal_conv1d_update_f32_t;
typedef decltype(causal_conv1d_update<half>) causal_conv1d_update_f16_t;
template [[host_name("causal_conv1d_update_f32")]] kernel causal_conv1d_update_f32_t causal_conv1d_update<float>;
template [[host_name("causal_conv1d_update_f16")]] kernel causal_conv1d_update_f16_t causal_conv1d_update<half>;
typedef decltype(conv_states_varlen<float>) conv_states_varlen_f32_t;
typedef decltype(conv_states_varlen<half>) conv_states_varlen_f16_t;
template [[host_name("conv_states_varlen_f32")]] kernel conv_states_varlen_f32_t conv_states_varlen<float>;
template [[host_name("conv_states_varlen_f16")]] kernel conv_states_varlen_f16_t conv_states_varlen<half>;
// bfloat needs MSL 3.1 (macOS 14); older compilers build the library without these.
#if !defined(__METAL_VERSION__) || __METAL_VERSION__ >= 310
typedef decltype(causal_conv1d_fwd<bfloat>) causal_conv1d_fwd_bf16_t;
template [[host_name("causal_conv1d_fwd_bf16")]] kernel causal_conv1d_fwd_bf16_t causal_conv1d_fwd<bfloat>;
typedef decltype(causal_conv1d_update<bfloat>) causal_conv1d_update_bf16_t;
template [[host_name("causal_conv1d_update_bf16")]] kernel causal_conv1d_update_bf16_t causal_conv1d_update<bfloat>;
typedef decltype(conv_states_varlen<bfloat>) conv_states_varlen_bf16_t;
template [[host_name("conv_states_varlen_bf16")]] kernel conv_states_varlen_bf16_t conv_states_varlen<bfloat>;
#endif
