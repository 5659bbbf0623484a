// Sum of n floats by one threadgroup: simd_sum per simdgroup, partial sums
// through threadgroup memory, then simd_sum again by simdgroup 0.
// Reference: in.iter().sum(). Threadgroup memory: 32 floats (128 B).
#include <metal_stdlib>
using namespace metal;

kernel void reduce_sum_f32(
    device const float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    uint tid [[thread_index_in_threadgroup]],
    uint tcount [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float partial[32];
    float acc = 0.0f;
    for (uint i = tid; i < n; i += tcount) {
        acc += in[i];
    }
    acc = simd_sum(acc);
    if (lane == 0) {
        partial[sg] = acc;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        float v = lane < nsg ? partial[lane] : 0.0f;
        v = simd_sum(v);
        if (lane == 0) {
            out[0] = v;
        }
    }
}
