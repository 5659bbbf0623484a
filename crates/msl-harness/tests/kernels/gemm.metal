// C = A * B with simdgroup_matrix 8x8 tiles; one simdgroup per 8x8 tile of C.
// Reference: naive triple loop in f32. A: (m, k), B: (k, n), C: (m, n),
// row-major; m, n, k multiples of 8. Threadgroup: 32 threads, no shared memory.
#include <metal_stdlib>
using namespace metal;

struct GemmParams {
    uint m;
    uint n;
    uint k;
};

template <typename T>
kernel void gemm_simdgroup(
    device const T* a [[buffer(0)]],
    device const T* b [[buffer(1)]],
    device float* c [[buffer(2)]],
    constant GemmParams& p [[buffer(3)]],
    uint2 tile [[threadgroup_position_in_grid]]) {
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (uint kk = 0; kk < p.k; kk += 8) {
        simdgroup_matrix<T, 8, 8> ta;
        simdgroup_matrix<T, 8, 8> tb;
        simdgroup_load(ta, a, p.k, ulong2(kk, tile.y * 8));
        simdgroup_load(tb, b, p.n, ulong2(tile.x * 8, kk));
        simdgroup_multiply_accumulate(acc, ta, tb, acc);
    }
    simdgroup_store(acc, c, p.n, ulong2(tile.x * 8, tile.y * 8));
}

template [[host_name("gemm_simdgroup_f32")]] kernel void gemm_simdgroup<float>(
    device const float* a [[buffer(0)]], device const float* b [[buffer(1)]], device float* c [[buffer(2)]],
    constant GemmParams& p [[buffer(3)]], uint2 tile [[threadgroup_position_in_grid]]);
template [[host_name("gemm_simdgroup_f16")]] kernel void gemm_simdgroup<half>(
    device const half* a [[buffer(0)]], device const half* b [[buffer(1)]], device float* c [[buffer(2)]],
    constant GemmParams& p [[buffer(3)]], uint2 tile [[threadgroup_position_in_grid]]);

// Transposed load: C = A^T * B with A stored (k, m).
kernel void gemm_at_b_f32(
    device const float* a [[buffer(0)]],
    device const float* b [[buffer(1)]],
    device float* c [[buffer(2)]],
    constant GemmParams& p [[buffer(3)]],
    uint2 tile [[threadgroup_position_in_grid]]) {
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (uint kk = 0; kk < p.k; kk += 8) {
        simdgroup_float8x8 ta;
        simdgroup_float8x8 tb;
        simdgroup_load(ta, a, p.m, ulong2(tile.y * 8, kk), true);
        simdgroup_load(tb, b, p.n, ulong2(tile.x * 8, kk));
        simdgroup_multiply_accumulate(acc, ta, tb, acc);
    }
    simdgroup_store(acc, c, p.n, ulong2(tile.x * 8, tile.y * 8));
}
