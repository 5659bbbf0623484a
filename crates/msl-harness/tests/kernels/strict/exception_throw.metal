// Forbidden: exceptions. MSL has none; clang rejects `throw` under -fno-exceptions.
#include <metal_stdlib>
using namespace metal;

kernel void exception_throw(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    if (out[tid] < 0.0f) {
        throw 1; // BUG: no exceptions in Metal
    }
    out[tid] = 1.0f;
}
