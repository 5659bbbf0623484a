// Fused Mamba-2 decode step of one layer: conv update + SiLU + selective state update + D skip
// + gate in one dispatch (launch count dominates decode on small models).
//
//   xBC_act = silu(conv1d_update(conv_state, xBC))       split into x (heads), B, C (groups)
//   dt      = clamp(softplus(dt + dt_bias), dt_min, dt_max)
//   state   = exp(dt A) state + dt x Bᵀ;  y = state C + D x;  y *= silu(z)
//
// Activations T are float, half or bfloat; weights, conv and SSM states are f32; arithmetic f32.
// Kernels are named `mamba2_decode_step_<f32|f16|bf16>`.
#include <metal_stdlib>
using namespace metal;

#define METAL_FUNC inline __attribute__((__always_inline__))
#define MAX_PER_LANE 8   // d_state <= 256
#define MAX_D_STATE 256
#define MAX_D_CONV 8

// Mirrors mamba2_ops::metal_params::DecodeStepParams.
struct DecodeStepParams {
    uint batch;
    uint nheads;
    uint headdim;
    uint ngroups;
    uint d_state;
    uint d_conv;
    uint conv_dim;
    uint has_conv_bias;
    uint has_d;
    uint has_z;
    uint has_dt_bias;
    uint dt_softplus;
    uint dt_clamp;
    float dt_min;
    float dt_max;
    // Row strides in elements of xbc, dt and z: views of one in-projection row are read in place.
    uint xbc_stride;
    uint dt_stride;
    uint z_stride;
};

METAL_FUNC float silu_f(float v) {
    return v / (1.0f + exp(-v));
}

// softplus(v) = max(v, 0) + log(1 + exp(-|v|)): never overflows, as in the reference.
METAL_FUNC float softplus_f(float v) {
    return max(v, 0.0f) + log(1.0f + exp(-abs(v)));
}

// The conv output rounded to the activation dtype, as the unfused conv kernel stores it: the
// fused step gives the same numbers as causal_conv1d_update followed by selective_state_update.
template <typename T>
METAL_FUNC float round_t(float v) {
    return float(T(v));
}

// Conv output of channel c of batch row b (before SiLU) from the old state and the new input;
// when `write` is set, also stores the rolled state (old[1..], new) to conv_out.
template <typename T>
METAL_FUNC float conv_step(
    device const T* xbc,
    device const float* conv_in,
    device float* conv_out,
    device const float* w,
    device const float* bias,
    constant DecodeStepParams& p,
    uint b, uint c, bool write) {
    const uint dc = p.d_conv;
    const ulong s0 = ((ulong)b * p.conv_dim + c) * dc;
    const float xv = float(xbc[(ulong)b * p.xbc_stride + c]);
    float acc = p.has_conv_bias != 0 ? bias[c] : 0.0f;
    for (uint k = 0; k + 1 < dc; ++k) {
        const float v = conv_in[s0 + k + 1];
        acc += w[(ulong)c * dc + k] * v;
        if (write) {
            conv_out[s0 + k] = v;
        }
    }
    acc += w[(ulong)c * dc + dc - 1] * xv;
    if (write) {
        conv_out[s0 + dc - 1] = xv;
    }
    return acc;
}

// mamba2_decode_step_<dtype>
// Reference: mamba2_ops::conv1d::causal_conv1d_update_slow (silu = true) on xBC, then
// mamba2_ops::state_update::selective_state_update_slow on its x, B, C split.
// Arguments:
//   xbc        [[buffer(0)]]  (batch, conv_dim) T: pre-conv [x (nheads*headdim) | B | C],
//              rows xbc_stride apart (dt and z likewise: views of the in-projection output)
//   conv_in    [[buffer(1)]]  (batch, conv_dim, d_conv) f32: conv state before the step
//   conv_out   [[buffer(2)]]  (batch, conv_dim, d_conv) f32, out: conv state after the step.
//              Must not alias conv_in: the B and C channels are read by every head of a group
//              while one threadgroup writes them, so the caller ping-pongs two state buffers.
//   conv_w     [[buffer(3)]]  (conv_dim, d_conv) f32
//   conv_b     [[buffer(4)]]  (conv_dim) f32                 (has_conv_bias)
//   dt         [[buffer(5)]]  (batch, nheads) T, raw
//   A          [[buffer(6)]]  (nheads) f32
//   D          [[buffer(7)]]  (nheads) f32                   (has_d)
//   z          [[buffer(8)]]  (batch, nheads*headdim) T      (has_z)
//   dt_bias    [[buffer(9)]]  (nheads) f32                   (has_dt_bias)
//   state      [[buffer(10)]] (batch, nheads, headdim, d_state) f32, updated in place
//   y          [[buffer(11)]] (batch, nheads*headdim) T, out (before the gated RMSNorm)
//   p          [[buffer(12)]] DecodeStepParams
// Grid: (ceil(headdim / 4), nheads, batch) threadgroups of 128 threads (4 simdgroups).
//   1. the threadgroup convolves the d_state B and C channels of its head's group into
//      threadgroup memory (threadgroup (0, h, b) with h the group's first head writes their new
//      conv state);
//   2. simdgroup s owns state row p = 4 x + s: its lanes convolve channel x_p (lane 0 writes
//      its conv state), hold elements n = lane + 32 i of the row in registers, update them and
//      reduce y with simd_sum, as selective_state_update does.
// Preconditions (host): d_state <= 256, d_conv <= 8, conv_dim = nheads*headdim + 2*ngroups*d_state.
// Threadgroup memory: B and C after conv + SiLU, 2 x 256 f32 = 2 KB.
template <typename T>
kernel void mamba2_decode_step(
    device const T* xbc [[buffer(0)]],
    device const float* conv_in [[buffer(1)]],
    device float* conv_out [[buffer(2)]],
    device const float* conv_w [[buffer(3)]],
    device const float* conv_b [[buffer(4)]],
    device const T* dt [[buffer(5)]],
    device const float* A [[buffer(6)]],
    device const float* D [[buffer(7)]],
    device const T* z [[buffer(8)]],
    device const float* dt_bias [[buffer(9)]],
    device float* state [[buffer(10)]],
    device T* y [[buffer(11)]],
    constant DecodeStepParams& p [[buffer(12)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    uint3 tpg [[threads_per_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort nsg [[simdgroups_per_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float bconv[MAX_D_STATE];
    threadgroup float cconv[MAX_D_STATE];
    const uint ntg = tpg.x;
    const uint h = tgid.y;
    const uint b = tgid.z;
    const uint N = p.d_state;
    const uint heads_per_group = p.nheads / p.ngroups;
    const uint g = h / heads_per_group;
    const uint d_inner = p.nheads * p.headdim;

    // 1. B and C of group g, conv + SiLU, shared by the threadgroup
    const bool bc_writer = tgid.x == 0 && h % heads_per_group == 0;
    for (uint n = tid; n < N; n += ntg) {
        const uint cb = d_inner + g * N + n;
        const uint cc = d_inner + p.ngroups * N + g * N + n;
        bconv[n] = round_t<T>(silu_f(conv_step(xbc, conv_in, conv_out, conv_w, conv_b, p, b, cb, bc_writer)));
        cconv[n] = round_t<T>(silu_f(conv_step(xbc, conv_in, conv_out, conv_w, conv_b, p, b, cc, bc_writer)));
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 2. one state row per simdgroup
    const uint row = tgid.x * nsg + sg;
    if (row >= p.headdim) {
        return;  // the whole simdgroup leaves together, after the only barrier
    }
    const uint cx = h * p.headdim + row;
    const float xv =
        round_t<T>(silu_f(conv_step(xbc, conv_in, conv_out, conv_w, conv_b, p, b, cx, lane == 0)));
    const ulong bh = (ulong)b * p.nheads + h;
    float dtv = float(dt[(ulong)b * p.dt_stride + h]);
    if (p.has_dt_bias != 0) {
        dtv += dt_bias[h];
    }
    if (p.dt_softplus != 0) {
        dtv = softplus_f(dtv);
    }
    if (p.dt_clamp != 0) {
        dtv = clamp(dtv, p.dt_min, p.dt_max);
    }
    const float decay = exp(dtv * A[h]);
    const float xdt = xv * dtv;
    device float* srow = state + (bh * p.headdim + row) * N;
    float acc = 0.0f;
    for (uint i = 0; i < MAX_PER_LANE; ++i) {
        const uint n = lane + 32 * i;
        if (n < N) {
            const float s = decay * srow[n] + xdt * bconv[n];
            acc += s * cconv[n];
            srow[n] = s;
        }
    }
    float out = simd_sum(acc);
    if (lane == 0) {
        if (p.has_d != 0) {
            out += D[h] * xv;
        }
        const ulong yi = (ulong)b * d_inner + cx;
        if (p.has_z != 0) {
            out *= silu_f(float(z[(ulong)b * p.z_stride + cx]));
        }
        y[yi] = T(out);
    }
}

typedef decltype(mamba2_decode_step<float>) mamba2_decode_step_f32_t;
typedef decltype(mamba2_decode_step<half>) mamba2_decode_step_f16_t;
template [[host_name("mamba2_decode_step_f32")]] kernel mamba2_decode_step_f32_t mamba2_decode_step<float>;
template [[host_name("mamba2_decode_step_f16")]] kernel mamba2_decode_step_f16_t mamba2_decode_step<half>;
// bfloat needs MSL 3.1 (macOS 14).
#if !defined(__METAL_VERSION__) || __METAL_VERSION__ >= 310
typedef decltype(mamba2_decode_step<bfloat>) mamba2_decode_step_bf16_t;
template [[host_name("mamba2_decode_step_bf16")]] kernel mamba2_decode_step_bf16_t mamba2_decode_step<bfloat>;
#endif
