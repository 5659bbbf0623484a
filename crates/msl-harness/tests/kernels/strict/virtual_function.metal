// Forbidden: virtual functions.
#include <metal_stdlib>
using namespace metal;

struct Activation {
    virtual float apply(float x) const { return x; } // BUG: virtual
};

kernel void virtual_function(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    Activation a;
    out[tid] = a.apply(out[tid]);
}
