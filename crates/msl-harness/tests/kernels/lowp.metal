// half / bfloat arithmetic rounds after every operation, like the GPU.
// Reference: the same expression evaluated with `half::f16` / `half::bf16`
// rounding after each operation. One thread per element, no shared memory.
#include <metal_stdlib>
using namespace metal;

kernel void fma_chain_f16(
    device const half* a [[buffer(0)]],
    device const half* b [[buffer(1)]],
    device const half* c [[buffer(2)]],
    device half* out [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
    half t = a[i] * b[i] + c[i];      // rounded after * and after +
    out[i] = t * t - a[i];
}

kernel void fma_chain_bf16(
    device const bfloat* a [[buffer(0)]],
    device const bfloat* b [[buffer(1)]],
    device const bfloat* c [[buffer(2)]],
    device bfloat* out [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
    bfloat t = a[i] * b[i] + c[i];
    out[i] = t * t - a[i];
}

// Vector constructors convert element by element; float accumulation.
kernel void half4_dot(
    device const half4* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint i [[thread_position_in_grid]]) {
    float4 v = float4(x[i]);
    float2 lo = v.xy;
    out[i] = dot(float4(lo, v.z, v.w), float4(1.0f, 2.0f, 3.0f, 4.0f));
}

// simd prefix sums and shuffles over a partial simdgroup.
kernel void scan_and_shuffle(
    device const uint* in [[buffer(0)]],
    device uint* excl [[buffer(1)]],
    device uint* down [[buffer(2)]],
    device float* maxv [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
    uint x = in[i];
    excl[i] = simd_prefix_exclusive_sum(x);
    down[i] = simd_shuffle_down(x, 1);
    maxv[i] = simd_max(float(x));
}
