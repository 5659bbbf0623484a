// Forbidden: more than 32 KiB of static threadgroup memory in one kernel.
// Each array fits; together they do not for T = float: 16 KiB + 16 KiB + 32 B.
#include <metal_stdlib>
using namespace metal;

template <typename T>
kernel void threadgroup_static(
    device T* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float a[4096];
    threadgroup T b[4096];
    threadgroup uint c[8]; // BUG: 32 800 bytes in all > 32 KiB
    a[tid] = 1.0f;
    b[tid] = T(2);
    c[tid % 8] = tid;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = T(a[tid]) + b[tid] + T(c[0]);
}

template [[host_name("threadgroup_static_f32")]] kernel void threadgroup_static<float>(
    device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]);
