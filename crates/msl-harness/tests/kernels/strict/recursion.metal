// Forbidden: recursion, here mutual (even -> odd -> even), which no single
// function shows by itself: only the call graph does.
#include <metal_stdlib>
using namespace metal;

static bool is_odd(uint n);

static bool is_even(uint n) { // BUG: is_even -> is_odd -> is_even
    return n == 0 ? true : is_odd(n - 1);
}

static bool is_odd(uint n) {
    return n == 0 ? false : is_even(n - 1);
}

kernel void recursion(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    out[tid] = is_even(tid) ? 1.0f : 0.0f;
}
