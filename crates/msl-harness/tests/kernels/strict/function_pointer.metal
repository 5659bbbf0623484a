// Forbidden: function pointers (selecting an activation through one).
#include <metal_stdlib>
using namespace metal;

static float relu(float x) { return max(x, 0.0f); }
static float square(float x) { return x * x; }

kernel void function_pointer(
    device float* out [[buffer(0)]],
    constant uint& which [[buffer(1)]],
    uint tid [[thread_position_in_grid]]) {
    float (*act)(float) = which == 0 ? relu : square; // BUG: pointer to function
    out[tid] = act(out[tid]);
}
