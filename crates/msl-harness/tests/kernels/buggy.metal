// Deliberately wrong kernels: each one must be caught by the harness.
// Not product code; see tests/faults.rs for the expected faults.
#include <metal_stdlib>
using namespace metal;

// Reads a neighbour's threadgroup slot without a barrier after writing.
kernel void missing_barrier(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
    threadgroup float tile[64];
    tile[tid] = 0.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    tile[tid] = float(tid);
    out[tid] = tile[(tid + 1) % n]; // BUG: no threadgroup_barrier before this read
}

// Same kernel, fixed.
kernel void with_barrier(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
    threadgroup float tile[64];
    tile[tid] = float(tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = tile[(tid + 1) % n];
}

// Every threadgroup accumulates into the same element: threadgroups of one
// dispatch are unordered.
kernel void inter_group_race(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint group [[threadgroup_position_in_grid]]) {
    if (tid == 0) {
        out[0] += float(group); // BUG: read-modify-write from every threadgroup
    }
}

// Orders device memory with a threadgroup-only barrier.
kernel void wrong_barrier_flags(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
    out[tid] = float(tid);
    threadgroup_barrier(mem_flags::mem_threadgroup); // BUG: needs mem_device
    float v = out[(tid + 1) % n];
    threadgroup_barrier(mem_flags::mem_device);
    out[tid] = v;
}

// Threadgroup memory ordered by a barrier without mem_threadgroup.
kernel void barrier_without_mem_flags(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
    threadgroup float tile[64];
    tile[tid] = 0.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    tile[tid] = float(tid);
    threadgroup_barrier(mem_flags::mem_none); // BUG: orders execution, not memory
    out[tid] = tile[(tid + 1) % n];
}

// Writes one element past the end.
kernel void off_by_one(
    device float* out [[buffer(0)]],
    constant uint& n [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
    if (gid <= n) { // BUG: should be gid < n
        out[gid] = 1.0f;
    }
}

// Threadgroup array index off by one.
kernel void threadgroup_off_by_one(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float tile[32];
    tile[tid + 1] = 1.0f; // BUG: tid 31 writes tile[32]
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = tile[tid];
}

// 6144 static floats (24 KiB) fit, and so would 12 KiB of dynamic memory
// alone; together they exceed 32 KiB, which only the runtime can see (a static
// array over the limit is a strict-pass error: tests/kernels/strict/).
kernel void over_budget(
    device float* out [[buffer(0)]],
    threadgroup float* extra [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float big[6144];
    big[tid] = 1.0f;
    extra[tid] = 2.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = big[tid] + extra[tid];
}

// Dynamic threadgroup memory (length set by the host).
kernel void dynamic_tg(
    device float* out [[buffer(0)]],
    threadgroup float* scratch [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
    scratch[tid] = float(tid) * 2.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = scratch[n - 1 - tid];
}

// Half of the threads wait at one barrier, the other half at another.
kernel void divergent_barrier(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
    if (tid < 16) {
        threadgroup_barrier(mem_flags::mem_threadgroup); // BUG: divergent
        out[tid] = 1.0f;
    } else {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[tid] = 2.0f;
    }
}

// Some threads return before a barrier the others wait at.
kernel void early_return_barrier(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
    if (tid == 0) {
        return; // BUG
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = 1.0f;
}

// Reads threadgroup memory that nobody wrote.
kernel void uninit_read(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float tile[64];
    if (tid < 32) {
        tile[tid] = 1.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = tile[tid]; // BUG: tile[32..64) never written
}

// Writes a buffer the host bound read-only.
kernel void writes_input(
    device float* in [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    in[tid] = 0.0f;
}

struct Params {
    uint n;
    float scale;
    uint stride;
    uint pad;
};

kernel void needs_params(
    device float* out [[buffer(0)]],
    constant Params& p [[buffer(1)]],
    uint tid [[thread_position_in_grid]]) {
    if (tid < p.n) {
        out[tid * p.stride] = p.scale;
    }
}

// simdgroup_matrix ops inside divergent control flow.
kernel void divergent_matrix(
    device const float* a [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint lane [[thread_index_in_simdgroup]]) {
    if (lane < 16) { // BUG: matrix ops need the whole simdgroup
        simdgroup_float8x8 m;
        simdgroup_load(m, a);
        simdgroup_store(m, out);
    }
}

// Shuffle reading a lane that is not active returns poison.
kernel void shuffle_inactive(
    device float* out [[buffer(0)]],
    uint lane [[thread_index_in_simdgroup]]) {
    float x = float(lane);
    if (lane < 16) {
        out[lane] = simd_shuffle(x, ushort(lane + 16)); // lanes 16..31 inactive here
    } else {
        out[lane] = simd_shuffle(x, ushort(lane ^ 1)); // within the active half
    }
}

// Spin-waits on a flag another threadgroup would set.
kernel void spin_wait(
    device atomic_uint* flag [[buffer(0)]],
    uint group [[threadgroup_position_in_grid]]) {
    if (group == 0) {
        while (atomic_load_explicit(flag, memory_order_relaxed) == 0) {
        } // BUG: no forward-progress guarantee between threadgroups
    } else {
        atomic_store_explicit(flag, 1u, memory_order_relaxed);
    }
}

// Atomics from every threadgroup are fine.
kernel void atomic_count(
    device atomic_uint* counter [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    atomic_fetch_add_explicit(counter, tid, memory_order_relaxed);
}

// Waits on a plain (non-atomic) flag nobody sets: never yields.
kernel void endless_loop(
    device volatile uint* flag [[buffer(0)]]) {
    while (flag[0] == 0) { // BUG: endless
    }
}

// Lanes exchange threadgroup values within their simdgroup. `order` selects
// the synchronisation: 0 = simdgroup_barrier(mem_threadgroup) (correct),
// 1 = none (race), 2 = simdgroup_barrier(mem_none) (race). `cross` reads
// from the other simdgroup, which a simdgroup_barrier does not order.
struct ExchangeParams {
    uint order;
    uint cross;
};

kernel void simdgroup_exchange(
    device float* out [[buffer(0)]],
    constant ExchangeParams& p [[buffer(1)]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
    threadgroup float slots[64];
    slots[tid] = float(tid);
    if (p.order == 0) {
        simdgroup_barrier(mem_flags::mem_threadgroup);
    } else if (p.order == 2) {
        simdgroup_barrier(mem_flags::mem_none);
    }
    uint src = p.cross ? (tid + 32) % 64 : (tid & ~31u) + (lane + 1) % 32;
    out[tid] = slots[src]; // exchange read
}

// A thread-private array far larger than any GPU thread could have.
kernel void huge_private_array(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    float big[100000]; // BUG: 400 KB of thread memory
    for (uint i = 0; i < 100000; ++i) {
        big[i] = float(i + tid);
    }
    out[tid] = big[tid * 7 % 100000];
}

// Indexes with a garbage offset far outside the buffer.
kernel void wild_pointer(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
    out[tid + 0x40000000u] = 1.0f; // BUG: 4 GiB past the buffer
}
