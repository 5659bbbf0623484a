// Includes a local header (helpers only: headers are not rewritten).
#include <metal_stdlib>
#include "helpers.h"
using namespace metal;

kernel void uses_header(
    device float* out [[buffer(0)]],
    uint i [[thread_position_in_grid]]) {
    out[i] = twice(float(i));
}
