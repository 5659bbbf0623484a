// Forbidden: double, never spelled: the unsuffixed literal makes C++ multiply
// in double (the fix is 0.5f). Warnings such as -Wdouble-promotion stay quiet
// for literals; the strict pass finds the double multiply in the IR.
#include <metal_stdlib>
using namespace metal;

template <typename T>
kernel void double_literal(
    device T* out [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    out[tid] = T(float(out[tid]) * 0.5); // BUG: 0.5 is a double literal
}

template [[host_name("double_literal_f32")]] kernel void double_literal<float>(
    device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]);
