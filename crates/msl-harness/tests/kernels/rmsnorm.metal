// Harness self-test in the style of a product kernel (not product code):
// y = x * rsqrt(mean(x^2) + eps) * w over rows of length n (n % 4 == 0),
// one threadgroup per row. Reference: plain loop in f32.
// Threadgroup memory: 32 floats (static) + dynamic [[threadgroup(0)]] of
// simdgroups_per_threadgroup floats.
#include <metal_stdlib>
using namespace metal;

#define METAL_FUNC inline __attribute__((__always_inline__))

struct NormParams {
    uint n;
    float eps;
};

template <typename T>
METAL_FUNC float4 load4(device const T* p, uint i) {
    return float4(*((device const vec<T, 4>*)(p + i)));
}

template <typename T>
kernel void rms_norm(
    device const T* x [[buffer(0)]],
    device const T* w [[buffer(1)]],
    device T* y [[buffer(2)]],
    constant NormParams& p [[buffer(3)]],
    threadgroup float* partial [[threadgroup(0)]],
    uint row [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort ntg [[threads_per_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float total[1];
    device const T* xr = x + row * p.n;
    float4 acc = float4(0.0f);
    for (uint i = tid * 4; i < p.n; i += ntg * 4) {
        float4 v = load4(xr, i);
        acc += v * v;
    }
    acc = simd_sum(acc);
    if (lane == 0) {
        partial[sg] = acc.x + acc.y + acc.z + acc.w;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        float s = lane < nsg ? partial[lane] : 0.0f;
        s = simd_sum(s);
        if (lane == 0) {
            total[0] = s;
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float scale = precise::rsqrt(total[0] / float(p.n) + p.eps);
    for (uint i = tid * 4; i < p.n; i += ntg * 4) {
        float4 v = load4(xr, i) * scale * load4(w, i);
        *((device vec<T, 4>*)(y + row * p.n + i)) = vec<T, 4>(v);
    }
}

typedef decltype(rms_norm<float>) rms_norm_f32_t;
template [[host_name("rms_norm_f32")]] kernel rms_norm_f32_t rms_norm<float>;
template [[host_name("rms_norm_f16")]] kernel void rms_norm<half>(
    device const half* x [[buffer(0)]], device const half* w [[buffer(1)]], device half* y [[buffer(2)]],
    constant NormParams& p [[buffer(3)]], threadgroup float* partial [[threadgroup(0)]],
    uint row [[threadgroup_position_in_grid]], ushort tid [[thread_index_in_threadgroup]],
    ushort ntg [[threads_per_threadgroup]], ushort lane [[thread_index_in_simdgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]], ushort nsg [[simdgroups_per_threadgroup]]);
