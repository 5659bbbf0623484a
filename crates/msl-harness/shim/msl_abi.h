// C ABI between the MSL shim (compiled into every kernel library), the
// harness runtime (msl_runtime.cpp, linked into the same library) and the Rust
// side (src/ffi.rs mirrors the structs below; keep them in sync).
#pragma once
#include <stdint.h>

#define MSL_MAX_BUFFERS 31
#define MSL_SIMD_WIDTH 32

// Values of every builtin kernel attribute for one emulated thread. Field
// names equal the MSL attribute names so that the rewriter can emit
// `MSL_BUILTIN(<attribute>)`. Scalar builtins use element 0.
typedef struct msl_thread_info {
  uint32_t thread_position_in_grid[3];
  uint32_t threadgroup_position_in_grid[3];
  uint32_t thread_position_in_threadgroup[3];
  uint32_t threads_per_threadgroup[3];
  uint32_t threadgroups_per_grid[3];
  uint32_t threads_per_grid[3];
  uint32_t dispatch_threads_per_threadgroup[3];
  uint32_t grid_origin[3];
  uint32_t grid_size[3];
  uint32_t thread_index_in_threadgroup[3];
  uint32_t thread_index_in_simdgroup[3];
  uint32_t simdgroup_index_in_threadgroup[3];
  uint32_t threads_per_simdgroup[3];
  uint32_t simdgroups_per_threadgroup[3];
  uint32_t dispatch_simdgroups_per_threadgroup[3];
  uint32_t thread_execution_width[3];
  uint32_t thread_index_in_quadgroup[3];
  uint32_t quadgroup_index_in_threadgroup[3];
  uint32_t quadgroups_per_threadgroup[3];
} msl_thread_info;

// A SIMD-group operation: `in[l]` points at lane l's operand (NULL for
// inactive lanes), `mask` has bit l set for active lanes, `out` receives this
// lane's result. Runs on the scheduler once every participating lane arrived.
typedef void (*msl_simd_fn)(const void* const* in, uint32_t mask, uint32_t lane,
                            int64_t param, void* out);

typedef struct msl_buffer_binding {
  void* ptr;
  uint64_t len;
  uint32_t bound;     // 0 = not bound
  uint32_t writable;  // 0 = copy-in only (writes fault in fast mode / are reported in checked mode)
} msl_buffer_binding;

enum msl_fault_code {
  MSL_OK = 0,
  MSL_FAULT_BINDING = 1,
  MSL_FAULT_RACE = 2,
  MSL_FAULT_OUT_OF_BOUNDS = 3,
  MSL_FAULT_UNINIT_READ = 4,
  MSL_FAULT_BARRIER = 5,
  MSL_FAULT_TG_MEMORY = 6,
  MSL_FAULT_SIMD = 7,
  MSL_FAULT_STACK = 8,
  MSL_FAULT_HANG = 9,
  MSL_FAULT_CONFIG = 10,
  MSL_FAULT_READ_ONLY = 11,
};

typedef struct msl_dispatch_args {
  void (*kernel)(void);
  uint32_t groups[3];       // threadgroups per grid
  uint32_t tg[3];           // threads per threadgroup
  uint32_t grid_threads[3]; // threads per grid (<= groups*tg: non-uniform last groups)
  uint32_t shuffled;        // randomise threadgroup and fibre order
  uint32_t checked;         // this library was built with -fsanitize=thread
  uint64_t seed;
  uint64_t tg_budget;       // bytes of threadgroup memory allowed
  uint64_t timeout_ms;      // watchdog: the dispatch fails with MSL_FAULT_HANG after this (0 = none)
  msl_buffer_binding buffers[MSL_MAX_BUFFERS];
  uint64_t tg_lens[MSL_MAX_BUFFERS]; // dynamic [[threadgroup(i)]] lengths
  // results
  int32_t fault;
  uint32_t _pad;
  uint64_t pc[2];           // offsets of the faulting code in this library (0 = unknown)
  char message[1024];
} msl_dispatch_args;

#ifdef __cplusplus
extern "C" {
#endif
typedef struct msl_kernel_entry {
  const char* name;
  void (*fn)(void);
} msl_kernel_entry;

// Never merged, hoisted or sunk across branches by the optimiser: each call
// site is a distinct barrier / SIMD-group operation.
#if defined(__clang__)
#define MSL_SYNC_CALL __attribute__((nomerge, convergent))
#else
#define MSL_SYNC_CALL
#endif
MSL_SYNC_CALL void msl_rt_barrier(uint32_t flags, const void* site);
MSL_SYNC_CALL void msl_rt_simd(const void* in, void* out, int64_t param, msl_simd_fn fn, uint32_t kind,
                 const void* site);
// elem_size: sizeof(T) for a `T*` parameter (0 for references); min_bytes: sizeof(T) for `T&`.
void* msl_rt_buffer(uint32_t index, uint64_t min_bytes, uint64_t align, uint64_t elem_size, const void* site);
void* msl_rt_tg_arg(uint32_t index, uint64_t align, const void* site);
void* msl_rt_tg_static(uint32_t slot, uint64_t size, uint64_t align, const char* name, const void* site);
const msl_thread_info* msl_rt_thread(void);
void msl_rt_atomic_access(const void* addr, uint32_t size, uint32_t is_write, const void* site);
void msl_rt_fail(int32_t code, const char* message, const void* site);
int msl_dispatch(msl_dispatch_args* args);
#ifdef __cplusplus
}
#endif

// kinds for msl_rt_simd
#define MSL_SIMD_OP 0
#define MSL_SIMD_BARRIER 1      // param = mem_flags
#define MSL_SIMD_UNIFORM 2      // whole 32-lane simdgroup must be active (simdgroup_matrix)
