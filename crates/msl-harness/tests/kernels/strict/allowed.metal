// Constructs next to the forbidden ones that MSL allows: the strict pass must accept all of them.
#include <metal_stdlib>
using namespace metal;

// program-scope data in the constant address space
constant float weights[4] = {0.1f, 0.2f, 0.3f, 0.4f};

// compile-time recursion (no call at run time)
template <uint N> struct Pow2 { static constexpr uint value = 2 * Pow2<N - 1>::value; };
template <> struct Pow2<0> { static constexpr uint value = 1; };

// an 8-byte vector by value: the x86-64 ABI passes it as a `double`, which is not MSL's double
static uint2 swap(uint2 v) { return uint2(v.y, v.x); }

// a helper called from two places is no recursion
static float twice(float x) { return 2.0f * x; }

template <typename T>
kernel void allowed(
    device T* out [[buffer(0)]],
    uint2 tid [[thread_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]]) {
    // exactly 32 KiB of threadgroup memory
    threadgroup float a[4096];
    threadgroup float b[4096];
    a[lid] = float(lid);
    b[lid] = weights[lid % 4];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint2 s = swap(tid);
    float v = twice(a[lid]) + twice(b[lid]) * 0.5f + float(Pow2<3>::value);
    out[s.y] = T(v) * T(0.5h);
}

template [[host_name("allowed_f32")]] kernel void allowed<float>(
    device float* out [[buffer(0)]], uint2 tid [[thread_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]]);
template [[host_name("allowed_f16")]] kernel void allowed<half>(
    device half* out [[buffer(0)]], uint2 tid [[thread_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]]);
