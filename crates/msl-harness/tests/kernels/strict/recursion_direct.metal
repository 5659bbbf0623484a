// Forbidden: recursion, a template calling itself.
#include <metal_stdlib>
using namespace metal;

template <typename T>
T power(T x, uint n) { // BUG: calls itself
    return n == 0 ? T(1) : x * power(x, n - 1);
}

template <typename T>
kernel void recursion_direct(
    device T* out [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    out[tid] = power(out[tid], tid % 4);
}

template [[host_name("recursion_direct_f16")]] kernel void recursion_direct<half>(
    device half* out [[buffer(0)]], uint tid [[thread_position_in_grid]]);
