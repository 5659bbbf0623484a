// Selective state update: one decode step of the Mamba-2 SSM, in place on the f32 state.
//
//   dt    = clamp(softplus(dt + dt_bias), dt_min, dt_max)      (batch, nheads)
//   state = exp(dt A) state + dt x Bᵀ                          (batch, nheads, headdim, d_state)
//   y     = state C + D x, then y * silu(z)                    (batch, nheads, headdim)
//
// Activations T are float, half or bfloat; A, D, dt_bias and the state are f32; all arithmetic
// is f32. Kernels are named `selective_state_update_<f32|f16|bf16>`.
#include <metal_stdlib>
using namespace metal;

#define METAL_FUNC inline __attribute__((__always_inline__))
// d_state elements per lane held in registers: d_state <= 32 * MAX_PER_LANE.
#define MAX_PER_LANE 8

// Mirrors mamba2_ops::metal_params::StateUpdateParams.
struct StateUpdateParams {
    uint batch;
    uint nheads;
    uint headdim;
    uint ngroups;
    uint d_state;
    uint has_d;
    uint has_z;
    uint has_dt_bias;
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

// selective_state_update_<dtype>
// Reference: mamba2_ops::state_update::selective_state_update_slow.
// Arguments:
//   state    [[buffer(0)]]  (batch, nheads, headdim, d_state) f32, updated in place
//   x        [[buffer(1)]]  (batch, nheads, headdim) T
//   dt       [[buffer(2)]]  (batch, nheads) T, raw
//   A        [[buffer(3)]]  (nheads) f32
//   B        [[buffer(4)]]  (batch, ngroups, d_state) T
//   C        [[buffer(5)]]  (batch, ngroups, d_state) T
//   D        [[buffer(6)]]  (nheads) f32         (has_d)
//   z        [[buffer(7)]]  (batch, nheads, headdim) T (has_z)
//   dt_bias  [[buffer(8)]]  (nheads) f32         (has_dt_bias)
//   y        [[buffer(9)]]  (batch, nheads, headdim) T, out
//   p        [[buffer(10)]] StateUpdateParams
// Grid: (ceil(headdim / 4), nheads, batch) threadgroups of 4 simdgroups (128 threads). Each
// simdgroup owns one state row (b, h, p): lane l holds elements n = l + 32 i (i < 8) of the row
// in registers (coalesced loads), the row is read and written once, and y is reduced with
// simd_sum. d_state need not be a multiple of 32 (idle lanes add 0); d_state <= 256.
// Threadgroup memory: none. No threadgroup barriers (rows are independent).
template <typename T>
kernel void selective_state_update(
    device float* state [[buffer(0)]],
    device const T* x [[buffer(1)]],
    device const T* dt [[buffer(2)]],
    device const float* A [[buffer(3)]],
    device const T* B [[buffer(4)]],
    device const T* C [[buffer(5)]],
    device const float* D [[buffer(6)]],
    device const T* z [[buffer(7)]],
    device const float* dt_bias [[buffer(8)]],
    device T* y [[buffer(9)]],
    constant StateUpdateParams& p [[buffer(10)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort nsg [[simdgroups_per_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
    const uint row = tgid.x * nsg + sg;
    const uint h = tgid.y;
    const uint b = tgid.z;
    if (row >= p.headdim) {
        return;  // the whole simdgroup leaves together
    }
    const uint g = h / (p.nheads / p.ngroups);
    const ulong bh = (ulong)b * p.nheads + h;
    float dtv = float(dt[bh]);
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
    const ulong xi = bh * p.headdim + row;
    const float xv = float(x[xi]);
    const float xdt = xv * dtv;
    device float* srow = state + xi * p.d_state;
    device const T* bg = B + ((ulong)b * p.ngroups + g) * p.d_state;
    device const T* cg = C + ((ulong)b * p.ngroups + g) * p.d_state;
    float s[MAX_PER_LANE];
    for (uint i = 0; i < MAX_PER_LANE; ++i) {
        const uint n = lane + 32 * i;
        s[i] = n < p.d_state ? srow[n] : 0.0f;
    }
    float acc = 0.0f;
    for (uint i = 0; i < MAX_PER_LANE; ++i) {
        const uint n = lane + 32 * i;
        if (n < p.d_state) {
            s[i] = decay * s[i] + xdt * float(bg[n]);
            acc += s[i] * float(cg[n]);
            srow[n] = s[i];
        }
    }
    float out = simd_sum(acc);
    if (lane == 0) {
        if (p.has_d != 0) {
            out += D[h] * xv;
        }
        if (p.has_z != 0) {
            out *= silu_f(float(z[xi]));
        }
        y[xi] = T(out);
    }
}

typedef decltype(selective_state_update<float>) selective_state_update_f32_t;
typedef decltype(selective_state_update<half>) selective_state_update_f16_t;
template [[host_name("selective_state_update_f32")]] kernel selective_state_update_f32_t selective_state_update<float>;
template [[host_name("selective_state_update_f16")]] kernel selective_state_update_f16_t selective_state_update<half>;
// bfloat needs MSL 3.1 (macOS 14).
#if !defined(__METAL_VERSION__) || __METAL_VERSION__ >= 310
typedef decltype(selective_state_update<bfloat>) selective_state_update_bf16_t;
template [[host_name("selective_state_update_bf16")]] kernel selective_state_update_bf16_t selective_state_update<bfloat>;
#endif
