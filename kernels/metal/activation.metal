// MLP activations of the hybrid models, on the output of one fused projection:
//   swiglu:       x (rows, 2n) = [gate | up] -> out (rows, n) = silu(gate) * up
//   relu_squared: x (count) -> out (count) = max(x, 0)^2
// Activations T are float, half or bfloat; arithmetic is f32, rounded once to T.
// Kernels are named `swiglu_<dtype>` and `relu_squared_<dtype>`.
#include <metal_stdlib>
using namespace metal;

// Mirrors mamba2_ops::metal_params::SwigluParams.
struct SwigluParams {
    uint rows;
    uint n;
};

// Mirrors mamba2_ops::metal_params::ReluSquaredParams.
struct ReluSquaredParams {
    uint count;
};

// swiglu_<dtype>
// Reference: mamba2_ops::activation::swiglu_slow.
// Arguments:
//   x    [[buffer(0)]] (rows, 2n) T, contiguous: gate in columns 0..n, up in n..2n
//   out  [[buffer(1)]] (rows, n) T
//   p    [[buffer(2)]] SwigluParams
// Grid: 2D, x over the n output columns, y over the rows; threads past either end return.
// Any threadgroup shape (the host uses (min(256, n rounded up to 32)), 1)).
// Threadgroup memory: none.
template <typename T>
kernel void swiglu(
    device const T* x [[buffer(0)]],
    device T* out [[buffer(1)]],
    constant SwigluParams& p [[buffer(2)]],
    uint2 gid [[thread_position_in_grid]]) {
    const uint c = gid.x;
    const uint r = gid.y;
    if (c >= p.n || r >= p.rows) {
        return;
    }
    const ulong in_row = (ulong)r * 2 * p.n;
    const float g = float(x[in_row + c]);
    const float u = float(x[in_row + p.n + c]);
    out[(ulong)r * p.n + c] = T(g / (1.0f + exp(-g)) * u);
}

// relu_squared_<dtype>
// Reference: mamba2_ops::activation::relu_squared_slow.
// Arguments:
//   x    [[buffer(0)]] (count) T, contiguous
//   out  [[buffer(1)]] (count) T
//   p    [[buffer(2)]] ReluSquaredParams
// Grid: 1D over the elements (the host uses threadgroups of 256); threads past the end return.
// Threadgroup memory: none.
template <typename T>
kernel void relu_squared(
    device const T* x [[buffer(0)]],
    device T* out [[buffer(1)]],
    constant ReluSquaredParams& p [[buffer(2)]],
    uint gid [[thread_position_in_grid]]) {
    if (gid >= p.count) {
        return;
    }
    const float v = max(float(x[gid]), 0.0f);
    out[gid] = T(v * v);
}

typedef decltype(swiglu<float>) swiglu_f32_t;
typedef decltype(swiglu<half>) swiglu_f16_t;
typedef decltype(relu_squared<float>) relu_squared_f32_t;
typedef decltype(relu_squared<half>) relu_squared_f16_t;
template [[host_name("swiglu_f32")]] kernel swiglu_f32_t swiglu<float>;
template [[host_name("swiglu_f16")]] kernel swiglu_f16_t swiglu<half>;
template [[host_name("relu_squared_f32")]] kernel relu_squared_f32_t relu_squared<float>;
template [[host_name("relu_squared_f16")]] kernel relu_squared_f16_t relu_squared<half>;
// bfloat needs MSL 3.1 (macOS 14).
#if !defined(__METAL_VERSION__) || __METAL_VERSION__ >= 310
typedef decltype(swiglu<bfloat>) swiglu_bf16_t;
typedef decltype(relu_squared<bfloat>) relu_squared_bf16_t;
template [[host_name("swiglu_bf16")]] kernel swiglu_bf16_t swiglu<bfloat>;
template [[host_name("relu_squared_bf16")]] kernel relu_squared_bf16_t relu_squared<bfloat>;
#endif
