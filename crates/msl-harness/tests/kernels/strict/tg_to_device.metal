// Address-space mistake: a threadgroup array used through a device pointer.
#include <metal_stdlib>
using namespace metal;

kernel void tg_to_device(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float tile[32];
    device float* p = tile; // BUG: threadgroup -> device
    p[tid] = 1.0f;
    out[tid] = tile[tid];
}
