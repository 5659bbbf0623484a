// Address-space mistake: a buffer parameter without device/constant.
#include <metal_stdlib>
using namespace metal;

kernel void buffer_without_space(
    float* out [[buffer(0)]], // BUG: must be device or constant
    uint tid [[thread_position_in_grid]]) {
    out[tid] = 1.0f;
}
