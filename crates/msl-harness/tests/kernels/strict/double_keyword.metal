// Forbidden: the double type, spelled out (even where it would fold away).
#include <metal_stdlib>
using namespace metal;

kernel void double_keyword(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    double acc = out[tid]; // BUG: no double in Metal
    out[tid] = float(acc * 2);
}
