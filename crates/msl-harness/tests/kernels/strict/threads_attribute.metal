// Forbidden: a kernel declaring more threads per threadgroup than Apple GPUs run.
#include <metal_stdlib>
using namespace metal;

[[max_total_threads_per_threadgroup(2048)]] // BUG: at most 1024
kernel void threads_attribute(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    out[tid] = 1.0f;
}
