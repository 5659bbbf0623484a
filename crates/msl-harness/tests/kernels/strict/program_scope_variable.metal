// Address-space mistake: a program-scope variable outside the constant address space
// (`constant float weights[4] = ...;` is the MSL way).
#include <metal_stdlib>
using namespace metal;

float weights[4] = {0.1f, 0.2f, 0.3f, 0.4f};

kernel void program_scope_variable(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    out[tid] *= weights[tid % 4]; // BUG: `weights` is not in constant memory
}
