// Forbidden: exceptions, as a try block in a template helper.
#include <metal_stdlib>
using namespace metal;

template <typename T>
T guarded(T x) {
    try { // BUG: no exceptions in Metal
        return x * x;
    } catch (...) {
        return x;
    }
}

kernel void exception_try(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    out[tid] = guarded(out[tid]);
}
