// Matrix-vector products of the decode projections (in_proj, out_proj) and the LM head: a few
// activation rows times a weight matrix read once.
//   y[r, o] = sum_k x[r, k] w[o, k] (+ bias[o]),   r < rows <= 8, o < n_out
// Reference: mamba2_ops::linear::linear_slow (f32 accumulation, one rounding to T).
// Activations, weights and the bias T are float, half or bfloat; accumulation is f32.
// Kernels are named `linear_matvec_<f32|f16|bf16>` and, with the mixer's grouped gated
// RMSNorm folded in front (the decode out_proj), `linear_matvec_gated_norm_<f32|f16|bf16>`.
//
// Layout (llama.cpp's mul_mv design): each simdgroup owns MV_OUTS_PER_SIMD consecutive output
// rows; its lanes stride over k (lane, lane + 32, ...: each weight row is read in 128-byte runs
// per simdgroup), keep one f32 accumulator per (output, activation row) in registers and
// reduce them with simd_sum at the end. Every weight element is loaded once for all activation
// rows. Threadgroups of MV_SIMDS simdgroups own MV_SIMDS * MV_OUTS_PER_SIMD outputs.
// Memory: weights n_out * k * sizeof(T) read once; x (rows * k) read once per simdgroup (from
// cache); registers MV_OUTS_PER_SIMD * MV_MAX_ROWS f32 accumulators per lane. No threadgroup
// memory.
#include <metal_stdlib>
using namespace metal;

#define METAL_FUNC inline __attribute__((__always_inline__))

#define MV_OUTS_PER_SIMD 4   // mirrors metal_params::layout::MV_OUTS_PER_SIMD
#define MV_SIMDS 4           // mirrors metal_params::layout::MV_SIMDS
#define MV_MAX_ROWS 8        // mirrors metal_params::layout::MV_MAX_ROWS
#define MV_MAX_GROUPS 8      // mirrors metal_params::layout::MV_MAX_GROUPS

// Mirrors mamba2_ops::metal_params::MatvecParams.
struct MatvecParams {
    uint rows;      // activation rows, 1..=MV_MAX_ROWS
    uint k;         // in_features
    uint n_out;     // out_features
    uint has_bias;
};

// linear_matvec_<dtype>
// Arguments:
//   x    [[buffer(0)]] (rows, k) T, contiguous
//   w    [[buffer(1)]] (n_out, k) T, contiguous
//   bias [[buffer(2)]] (n_out) T (read when has_bias)
//   y    [[buffer(3)]] (rows, n_out) T
//   p    [[buffer(4)]] MatvecParams
// Grid: ceil(n_out / (MV_SIMDS * MV_OUTS_PER_SIMD)) threadgroups of 32 * MV_SIMDS threads;
// outputs past n_out are skipped.
template <typename T>
kernel void linear_matvec(
    device const T* x [[buffer(0)]],
    device const T* w [[buffer(1)]],
    device const T* bias [[buffer(2)]],
    device T* y [[buffer(3)]],
    constant MatvecParams& p [[buffer(4)]],
    uint tg [[threadgroup_position_in_grid]],
    uint simd [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
    const uint o0 = (tg * MV_SIMDS + simd) * MV_OUTS_PER_SIMD;
    if (o0 >= p.n_out) {
        return;  // the whole simdgroup leaves together (no barriers below)
    }
    const uint k = p.k;
    const uint rows = min(p.rows, (uint)MV_MAX_ROWS);
    const uint nout = min((uint)MV_OUTS_PER_SIMD, p.n_out - o0);
    float acc[MV_OUTS_PER_SIMD][MV_MAX_ROWS];
    for (uint i = 0; i < MV_OUTS_PER_SIMD; ++i) {
        for (uint r = 0; r < MV_MAX_ROWS; ++r) {
            acc[i][r] = 0.0f;
        }
    }
    for (uint j = lane; j < k; j += 32) {
        float xv[MV_MAX_ROWS];
        for (uint r = 0; r < MV_MAX_ROWS; ++r) {
            xv[r] = r < rows ? float(x[(ulong)r * k + j]) : 0.0f;
        }
        for (uint i = 0; i < MV_OUTS_PER_SIMD; ++i) {
            if (i < nout) {
                const float wv = float(w[(ulong)(o0 + i) * k + j]);
                // `r < rows` is uniform: the loop unrolls, the accumulators stay in registers
                for (uint r = 0; r < MV_MAX_ROWS; ++r) {
                    if (r < rows) {
                        acc[i][r] = fma(wv, xv[r], acc[i][r]);
                    }
                }
            }
        }
    }
    for (uint i = 0; i < MV_OUTS_PER_SIMD; ++i) {
        for (uint r = 0; r < MV_MAX_ROWS; ++r) {
            if (r < rows) {
                acc[i][r] = simd_sum(acc[i][r]);
            }
        }
    }
    if (lane < nout) {
        const uint o = o0 + lane;
        const float b = p.has_bias != 0 ? float(bias[o]) : 0.0f;
        for (uint i = 0; i < MV_OUTS_PER_SIMD; ++i) {
            if (i == lane) {
                for (uint r = 0; r < rows; ++r) {
                    y[(ulong)r * p.n_out + o] = T(acc[i][r] + b);
                }
            }
        }
    }
}

// Mirrors mamba2_ops::metal_params::MatvecGatedNormParams.
struct MatvecGatedNormParams {
    uint rows;      // activation rows, 1..=MV_MAX_ROWS
    uint k;         // in_features = d_inner
    uint n_out;     // out_features
    uint has_bias;
    uint group_size;  // k / group_size <= MV_MAX_GROUPS norm groups
    uint norm_before_gate;
    float eps;
    uint z_stride;  // row stride of z in elements
};

METAL_FUNC float silu_mv(float v) {
    return v / (1.0f + exp(-v));
}

// linear_matvec_gated_norm_<dtype>: linear_matvec of the gated RMSNorm's output, the norm
// computed in front instead of by its own dispatch.
// Reference: linear_slow(gated_rms_norm_slow(y, z, norm_w), w, bias); the normed activations
// are rounded to T as gated_rms_norm_<dtype> stores them.
//   norm_before_gate = 0: a = rmsnorm_group(y * silu(z)) * norm_w;
//                      1: a = rmsnorm_group(y) * norm_w * silu(z)
// Arguments:
//   y      [[buffer(0)]] (rows, k) T, contiguous: the SSM output
//   z      [[buffer(1)]] (rows, k) T, rows z_stride apart: the gate (a view of the in-projection)
//   norm_w [[buffer(2)]] (k) f32
//   w      [[buffer(3)]] (n_out, k) T, contiguous
//   bias   [[buffer(4)]] (n_out) T (read when has_bias)
//   out    [[buffer(5)]] (rows, n_out) T
//   p      [[buffer(6)]] MatvecGatedNormParams
// Grid as linear_matvec. Every threadgroup first computes the rows * groups inverse RMS (one
// simdgroup per (row, group), reading y and z once more: rows * k elements against the
// n_out * k / (MV_SIMDS * MV_OUTS_PER_SIMD) weight elements of the threadgroup).
// Threadgroup memory: MV_MAX_ROWS * MV_MAX_GROUPS floats (256 B).
template <typename T>
kernel void linear_matvec_gated_norm(
    device const T* y [[buffer(0)]],
    device const T* z [[buffer(1)]],
    device const float* norm_w [[buffer(2)]],
    device const T* w [[buffer(3)]],
    device const T* bias [[buffer(4)]],
    device T* out [[buffer(5)]],
    constant MatvecGatedNormParams& p [[buffer(6)]],
    uint tg [[threadgroup_position_in_grid]],
    uint simd [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
    threadgroup float inv_rms[MV_MAX_ROWS * MV_MAX_GROUPS];
    const uint k = p.k;
    const uint gs = p.group_size;
    const uint ngroups = k / gs;
    const uint rows = min(p.rows, (uint)MV_MAX_ROWS);
    const bool gate_first = p.norm_before_gate == 0;
    for (uint q = simd; q < rows * ngroups; q += MV_SIMDS) {
        const ulong col = (ulong)(q % ngroups) * gs;
        const ulong base = (ulong)(q / ngroups) * k + col;
        const ulong zbase = (ulong)(q / ngroups) * p.z_stride + col;
        float ss = 0.0f;
        for (uint i = lane; i < gs; i += 32) {
            float v = float(y[base + i]);
            if (gate_first) {
                v *= silu_mv(float(z[zbase + i]));
            }
            ss += v * v;
        }
        ss = simd_sum(ss);
        if (lane == 0) {
            inv_rms[q] = 1.0f / sqrt(ss / float(gs) + p.eps);
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint o0 = (tg * MV_SIMDS + simd) * MV_OUTS_PER_SIMD;
    if (o0 >= p.n_out) {
        return;  // the whole simdgroup leaves together (no barriers below)
    }
    const uint nout = min((uint)MV_OUTS_PER_SIMD, p.n_out - o0);
    float acc[MV_OUTS_PER_SIMD][MV_MAX_ROWS];
    for (uint i = 0; i < MV_OUTS_PER_SIMD; ++i) {
        for (uint r = 0; r < MV_MAX_ROWS; ++r) {
            acc[i][r] = 0.0f;
        }
    }
    for (uint j = lane; j < k; j += 32) {
        const uint g = j / gs;
        const float nw = norm_w[j];
        float xv[MV_MAX_ROWS];
        for (uint r = 0; r < MV_MAX_ROWS; ++r) {
            xv[r] = 0.0f;
            if (r < rows) {
                const float s = silu_mv(float(z[(ulong)r * p.z_stride + j]));
                float v = float(y[(ulong)r * k + j]);
                if (gate_first) {
                    v *= s;
                }
                v = v * inv_rms[r * ngroups + g] * nw;
                if (!gate_first) {
                    v *= s;
                }
                xv[r] = float(T(v));
            }
        }
        for (uint i = 0; i < MV_OUTS_PER_SIMD; ++i) {
            if (i < nout) {
                const float wv = float(w[(ulong)(o0 + i) * k + j]);
                for (uint r = 0; r < MV_MAX_ROWS; ++r) {
                    if (r < rows) {
                        acc[i][r] = fma(wv, xv[r], acc[i][r]);
                    }
                }
            }
        }
    }
    for (uint i = 0; i < MV_OUTS_PER_SIMD; ++i) {
        for (uint r = 0; r < MV_MAX_ROWS; ++r) {
            if (r < rows) {
                acc[i][r] = simd_sum(acc[i][r]);
            }
        }
    }
    if (lane < nout) {
        const uint o = o0 + lane;
        const float b = p.has_bias != 0 ? float(bias[o]) : 0.0f;
        for (uint i = 0; i < MV_OUTS_PER_SIMD; ++i) {
            if (i == lane) {
                for (uint r = 0; r < rows; ++r) {
                    out[(ulong)r * p.n_out + o] = T(acc[i][r] + b);
                }
            }
        }
    }
}

typedef decltype(linear_matvec<float>) linear_matvec_f32_t;
typedef decltype(linear_matvec<half>) linear_matvec_f16_t;
typedef decltype(linear_matvec_gated_norm<float>) linear_matvec_gated_norm_f32_t;
typedef decltype(linear_matvec_gated_norm<half>) linear_matvec_gated_norm_f16_t;
template [[host_name("linear_matvec_f32")]] kernel linear_matvec_f32_t linear_matvec<float>;
template [[host_name("linear_matvec_f16")]] kernel linear_matvec_f16_t linear_matvec<half>;
template [[host_name("linear_matvec_gated_norm_f32")]] kernel linear_matvec_gated_norm_f32_t linear_matvec_gated_norm<float>;
template [[host_name("linear_matvec_gated_norm_f16")]] kernel linear_matvec_gated_norm_f16_t linear_matvec_gated_norm<half>;
// bfloat needs MSL 3.1 (macOS 14).
#if !defined(__METAL_VERSION__) || __METAL_VERSION__ >= 310
typedef decltype(linear_matvec<bfloat>) linear_matvec_bf16_t;
typedef decltype(linear_matvec_gated_norm<bfloat>) linear_matvec_gated_norm_bf16_t;
template [[host_name("linear_matvec_bf16")]] kernel linear_matvec_bf16_t linear_matvec<bfloat>;
template [[host_name("linear_matvec_gated_norm_bf16")]] kernel linear_matvec_gated_norm_bf16_t linear_matvec_gated_norm<bfloat>;
#endif
