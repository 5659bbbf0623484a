// Harness self-test kernels: observe execution order, MSL constants and
// literals. Not product code.
#include <metal_stdlib>
using namespace metal;

// Records which thread ran n-th (atomic ticket), before and after a barrier.
kernel void execution_order(
    device atomic_uint* ticket [[buffer(0)]],
    device uint* order [[buffer(1)]],
    uint gid [[thread_position_in_grid]],
    uint threads [[threads_per_grid]]) {
    uint t = atomic_fetch_add_explicit(ticket, 1u, memory_order_relaxed);
    order[t] = gid;
    threadgroup_barrier(mem_flags::mem_device);
    uint t2 = atomic_fetch_add_explicit(ticket, 1u, memory_order_relaxed);
    order[t2] = gid + threads;
}

// max over a row with -INFINITY start, a half literal and select().
kernel void scaled_row_max_f16(
    device const half* x [[buffer(0)]],
    device half* out [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    uint lane [[thread_index_in_simdgroup]]) {
    float m = -INFINITY;
    for (uint i = lane; i < n; i += 32) {
        m = max(m, float(x[i]));
    }
    m = simd_max(m);
    half r = half(m) * 0.5h;
    bool2 keep = bool2(r > 0.0h, true);
    float2 v = select(float2(0.0f), float2(float(r), 1.0f), keep);
    if (lane == 0) {
        out[0] = half(v.x + v.y - 1.0f);
        out[1] = numeric_limits<half>::max();
    }
}

// SIMD-group ops after a divergent branch run with the reconverged lanes.
kernel void reconverge(
    device float* out [[buffer(0)]],
    uint lane [[thread_index_in_simdgroup]]) {
    float a = 0.0f;
    if (lane < 8) {
        a = simd_sum(1.0f); // 8 active lanes
    }
    float b = simd_sum(1.0f); // all 32 again
    float c = 0.0f;
    for (uint i = lane; i < 40; i += 32) {
        c += simd_sum(1.0f); // lanes 0..7 iterate twice
    }
    out[lane] = a * 100.0f + b + c * 1000.0f;
}

// Kernels instantiated through a macro (the harness preprocesses first).
template <typename T>
kernel void scale_by(
    device T* x [[buffer(0)]],
    constant float& s [[buffer(1)]],
    uint i [[thread_position_in_grid]]) {
    x[i] = T(float(x[i]) * s);
}

#define INSTANTIATE_SCALE(name, T)                                        \
    template [[host_name(name)]] kernel void scale_by<T>(                \
        device T* x [[buffer(0)]], constant float& s [[buffer(1)]],      \
        uint i [[thread_position_in_grid]]);

INSTANTIATE_SCALE("scale_by_f32", float)
INSTANTIATE_SCALE("scale_by_f16", half)
#if __METAL_VERSION__ >= 310
INSTANTIATE_SCALE("scale_by_bf16", bfloat)
#endif

// dispatchThreads-style grid: edge threadgroups are partial.
kernel void grid_coverage(
    device uint* out [[buffer(0)]],
    device uint* group_sizes [[buffer(1)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]],
    uint2 tg [[threadgroup_position_in_grid]],
    uint2 ntg [[threadgroups_per_grid]],
    uint2 size [[threads_per_threadgroup]],
    uint tid [[thread_index_in_threadgroup]]) {
    out[gid.y * grid.x + gid.x] = gid.x + 1000 * gid.y;
    if (tid == 0) {
        group_sizes[tg.y * ntg.x + tg.x] = size.x * 10 + size.y;
    }
}
