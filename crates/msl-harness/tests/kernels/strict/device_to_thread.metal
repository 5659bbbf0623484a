// Address-space mistake: a device pointer passed where a thread pointer is expected.
#include <metal_stdlib>
using namespace metal;

static float first(thread const float* p) {
    return p[0];
}

kernel void device_to_thread(
    device const float* in [[buffer(0)]],
    device float* out [[buffer(1)]]) {
    out[0] = first(in); // BUG: Apple's compiler rejects device -> thread
}
