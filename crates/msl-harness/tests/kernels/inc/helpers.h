// Helper header included by tests/kernels/inc/uses_header.metal.
#pragma once
static inline float twice(float x) {
    return 2.0f * x;
}
