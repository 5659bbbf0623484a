// Exercises the shim's library surface so that template errors show up here
// rather than in a product kernel. One simdgroup of 32 threads; each lane
// writes 32 results to out[lane * 32 + k].
#include <metal_stdlib>
using namespace metal;

kernel void shim_surface(
    device float* out [[buffer(0)]],
    device atomic_uint* counters [[buffer(1)]],
    device atomic_int* icounters [[buffer(2)]],
    uint lane [[thread_index_in_simdgroup]]) {
    device float* o = out + lane * 32;
    float x = float(lane) * 0.25f - 2.0f; // -2 .. 5.75
    half hx = half(x);
    float4 v = float4(x, 1.0f, 2.0f, 3.0f);
    o[0] = exp(x);
    o[1] = float(exp(hx));
    o[2] = clamp(x, -1.0f, 1.0f);
    o[3] = mix(0.0f, 10.0f, 0.25f);
    o[4] = fma(x, 2.0f, 1.0f);
    o[5] = select(1.0f, 2.0f, x > 0.0f);
    o[6] = as_type<float>(as_type<uint>(x));
    o[7] = dot(v, float4(1.0f));
    o[8] = length(float2(3.0f, 4.0f));
    o[9] = float(max3(1, int(lane), 7));
    o[10] = float(clz(uint(lane + 1)));
    o[11] = float(popcount(lane));
    o[12] = simd_product(lane < 4 ? 2.0f : 1.0f);
    o[13] = simd_min(x);
    o[14] = float(simd_and(lane | 0x100u));
    o[15] = float(simd_or(lane));
    o[16] = float(simd_xor(1u << (lane % 8)));
    o[17] = simd_broadcast(x, ushort(5));
    o[18] = simd_broadcast_first(x);
    o[19] = float(uint64_t(simd_ballot(lane % 3 == 0)) & 0xffff);
    o[20] = simd_all(lane < 32) ? 1.0f : 0.0f;
    o[21] = simd_any(lane == 31) ? 1.0f : 0.0f;
    o[22] = simd_shuffle_xor(x, ushort(1));
    o[23] = simd_shuffle_rotate_down(x, ushort(3));
    o[24] = simd_prefix_inclusive_sum(1.0f);
    o[25] = simd_is_first() ? 1.0f : 0.0f;
    o[26] = float(simd_sum(half2(hx, 1.0h)).y);
    o[27] = tanh(x) + precise::sqrt(4.0f) + fast::exp2(1.0f);
    o[28] = float(numeric_limits<half>::max()) + (isnan(NAN) ? 1.0f : 0.0f);
    o[29] = all(int2(1, 2) < int2(3, 4)) && !any(float3(0.0f) != float3(0.0f)) ? 1.0f : 0.0f;
    atomic_fetch_max_explicit(counters, lane, memory_order_relaxed);
    atomic_fetch_sub_explicit(icounters, 1, memory_order_relaxed);
    uint expected = 0;
    atomic_compare_exchange_weak_explicit(counters + 1, &expected, lane + 1, memory_order_relaxed,
                                          memory_order_relaxed);
    o[30] = float(atomic_exchange_explicit(counters + 2, lane, memory_order_relaxed));

    simdgroup_float8x8 id(2.0f);
    simdgroup_float8x8 ones = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
    simdgroup_float8x8 prod;
    simdgroup_multiply(prod, id, ones);                 // 2 everywhere
    simdgroup_multiply_accumulate(prod, ones, id, prod); // J (2I) + 2J = 4J
    threadgroup alignas(16) float m[64];
    simdgroup_store(prod, m);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    o[31] = m[lane * 2] + m[63 - lane];
}
