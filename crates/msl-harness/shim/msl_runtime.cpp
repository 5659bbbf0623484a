// Harness runtime linked into every kernel library: fibre scheduler with GPU
// barrier / SIMD-group semantics, argument binding, threadgroup memory, guard
// pages, and (for libraries built with -fsanitize=thread) a GPU-aware shadow
// memory race / bounds / uninitialised-read checker behind the __tsan_* hooks.
//
// One dispatch runs at a time per process (the Rust side holds a lock), so
// the state below is plain globals. Compiled without sanitizers and with
// hidden visibility (only msl_dispatch and the hooks are reachable).
#include "msl_abi.h"

#include <dlfcn.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define EXPORT extern "C" __attribute__((visibility("default")))
#define NOINLINE __attribute__((noinline))
#define SITE() __builtin_return_address(0)

namespace {

constexpr uint32_t kMaxThreads = 1024;
constexpr size_t kStackSize = 256 * 1024;
constexpr size_t kArenaSize = 1 << 20;  // threadgroup arena (budget enforced separately)
constexpr size_t kRedzone = 64;         // gap between threadgroup allocations
constexpr uint32_t kMaxTgSlots = 256;
constexpr uint64_t kSpinLimit = 1u << 20;  // atomic ops without a yield => spin-wait

size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }
size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

#include "msl_rt_core.inc"

#include "msl_rt_memory.inc"

// ------------------------------------------------------------ scheduling
void fill_info(Fiber* f, uint32_t lid) {
  msl_dispatch_args* a = D.args;
  msl_thread_info& t = f->info;
  memset(&t, 0, sizeof(t));
  uint32_t tx = lid % a->tg[0], ty = lid / a->tg[0] % a->tg[1], tz = lid / (a->tg[0] * a->tg[1]);
  uint32_t pos[3] = {tx, ty, tz};
  uint32_t nthreads_here = D.group_size[0] * D.group_size[1] * D.group_size[2];
  for (int d = 0; d < 3; ++d) {
    t.thread_position_in_threadgroup[d] = pos[d];
    t.threadgroup_position_in_grid[d] = D.group_pos[d];
    t.thread_position_in_grid[d] = D.group_pos[d] * a->tg[d] + pos[d];
    t.threads_per_threadgroup[d] = D.group_size[d];
    t.dispatch_threads_per_threadgroup[d] = a->tg[d];
    t.threadgroups_per_grid[d] = a->groups[d];
    t.threads_per_grid[d] = a->grid_threads[d];
    t.grid_size[d] = a->grid_threads[d];
  }
  // Linear index within the actual (possibly partial) group.
  uint32_t li = tx + D.group_size[0] * (ty + D.group_size[1] * tz);
  t.thread_index_in_threadgroup[0] = li;
  t.thread_index_in_simdgroup[0] = li % MSL_SIMD_WIDTH;
  t.simdgroup_index_in_threadgroup[0] = li / MSL_SIMD_WIDTH;
  t.threads_per_simdgroup[0] = MSL_SIMD_WIDTH;
  t.thread_execution_width[0] = MSL_SIMD_WIDTH;
  t.simdgroups_per_threadgroup[0] = (nthreads_here + MSL_SIMD_WIDTH - 1) / MSL_SIMD_WIDTH;
  t.dispatch_simdgroups_per_threadgroup[0] = (D.nthreads + MSL_SIMD_WIDTH - 1) / MSL_SIMD_WIDTH;
  t.thread_index_in_quadgroup[0] = li % 4;
  t.quadgroup_index_in_threadgroup[0] = li / 4;
  t.quadgroups_per_threadgroup[0] = (nthreads_here + 3) / 4;
}

void shuffle_order(uint32_t* v, uint32_t n) {
  for (uint32_t i = n; i > 1; --i) {
    uint32_t j = (uint32_t)(next_rand() % i);
    uint32_t t = v[i - 1];
    v[i - 1] = v[j];
    v[j] = t;
  }
}

// Runs every fibre of the current group to completion; false on fault.
bool run_group(uint32_t* order) {
  uint32_t n = D.group_size[0] * D.group_size[1] * D.group_size[2];
  // Fibres are indexed by the linear index within the actual group.
  Fiber* fs[kMaxThreads];
  uint32_t k = 0;
  for (uint32_t z = 0; z < D.group_size[2]; ++z)
    for (uint32_t y = 0; y < D.group_size[1]; ++y)
      for (uint32_t x = 0; x < D.group_size[0]; ++x) {
        uint32_t lid = x + D.args->tg[0] * (y + D.args->tg[1] * z);
        Fiber* f = &D.fibers[k];
        f->lid = k;
        fill_info(f, lid);
        f->sg = k / MSL_SIMD_WIDTH;
        f->state = kReady;
        f->site = nullptr;
        fiber_prepare(f);
        fs[k] = f;
        ++k;
      }
  for (uint32_t i = 0; i < n; ++i) order[i] = i;
  uint32_t nsg = (n + MSL_SIMD_WIDTH - 1) / MSL_SIMD_WIDTH;
  for (;;) {
    // 1. run everything runnable until it blocks
    bool progressed = true;
    while (progressed) {
      progressed = false;
      if (D.args->shuffled) shuffle_order(order, n);
      for (uint32_t i = 0; i < n; ++i) {
        Fiber* f = fs[order[i]];
        if (f->state != kReady) continue;
        run_fiber(f);
        progressed = true;
        if (D.aborted) return false;
      }
    }
    // 2. resolve SIMD-group operations, per simdgroup and call site
    bool any_simd = false;
    for (uint32_t sg = 0; sg < nsg; ++sg) {
      uint32_t lo = sg * MSL_SIMD_WIDTH, hi = lo + MSL_SIMD_WIDTH < n ? lo + MSL_SIMD_WIDTH : n;
      uint32_t pending = 0;
      for (uint32_t l = lo; l < hi; ++l)
        if (fs[l]->state == kAtSimd) pending |= 1u << (l - lo);
      // One site per simdgroup and round: the one lowest in the code, which
      // approximates program order. Lanes waiting at a later site (e.g. after
      // the end of a divergent branch) wait for the others to catch up, like
      // SIMT reconvergence, instead of running the later op with fewer lanes.
      if (pending) {
        any_simd = true;
        uint32_t first = __builtin_ctz(pending);
        for (uint32_t l = first + 1; l < MSL_SIMD_WIDTH; ++l)
          if ((pending >> l & 1) && (uintptr_t)fs[lo + l]->site < (uintptr_t)fs[lo + first]->site) first = l;
        const void* site = fs[lo + first]->site;
        uint32_t mask = 0;
        const void* in[MSL_SIMD_WIDTH] = {};
        for (uint32_t l = 0; l < MSL_SIMD_WIDTH; ++l)
          if ((pending >> l & 1) && fs[lo + l]->site == site) {
            mask |= 1u << l;
            in[l] = fs[lo + l]->in;
          }
        Fiber* f0 = fs[lo + first];
        if (f0->kind == MSL_SIMD_UNIFORM && (hi - lo != MSL_SIMD_WIDTH || mask != 0xffffffffu)) {
          record_fault(MSL_FAULT_SIMD, site, nullptr,
                       "simdgroup_matrix operation executed by only part of simdgroup %u (active lanes 0x%08x of %u): "
                       "all 32 lanes must execute it together",
                       sg, mask, hi - lo);
          return false;
        }
        if (f0->kind == MSL_SIMD_BARRIER) {
          uint32_t fl = (uint32_t)f0->param;
          if (fl & 1) D.sg_epoch[sg][0]++;
          if (fl & 2) D.sg_epoch[sg][1]++;
        }
        for (uint32_t l = 0; l < MSL_SIMD_WIDTH; ++l) {
          if (!(mask >> l & 1)) continue;
          Fiber* f = fs[lo + l];
          if (f->fn) f->fn(in, mask, l, f->param, f->out);
          f->state = kReady;
        }
      }
    }
    if (any_simd) continue;
    // 3. everybody is at a barrier or done
    uint32_t at = 0, done = 0;
    const void* site = nullptr;
    const void* other_site = nullptr;
    uint32_t flags = 0;
    bool flags_differ = false;
    for (uint32_t i = 0; i < n; ++i) {
      if (fs[i]->state == kDone) {
        ++done;
        continue;
      }
      if (!site) {
        site = fs[i]->site;
        flags = fs[i]->flags;
      } else if (fs[i]->site != site && !other_site) {
        other_site = fs[i]->site;
      } else if (fs[i]->flags != flags) {
        flags_differ = true;
      }
      ++at;
    }
    if (at == 0) return true;
    if (done) {
      record_fault(MSL_FAULT_BARRIER, site, nullptr,
                   "threadgroup_barrier reached by %u threads while %u threads of the threadgroup had already returned "
                   "(a barrier must be reached by every thread)",
                   at, done);
      return false;
    }
    if (other_site) {
      record_fault(MSL_FAULT_BARRIER, site, other_site,
                   "divergent threadgroup_barrier: threads of one threadgroup wait at different barrier calls");
      return false;
    }
    if (flags_differ) {
      record_fault(MSL_FAULT_BARRIER, site, nullptr, "threads reached one threadgroup_barrier with different mem_flags");
      return false;
    }
    if (flags & 1) {
      D.tg_epoch[0]++;
    }
    if (flags & 2) {
      D.tg_epoch[1]++;
    }
    for (uint32_t i = 0; i < n; ++i) fs[i]->state = kReady;
  }
}

}  // namespace

// ------------------------------------------------------------ runtime entry points used by kernels
EXPORT NOINLINE void msl_rt_barrier(uint32_t flags, const void*) {
  Fiber* f = g_cur;
  f->site = SITE();
  f->flags = flags;
  f->state = kAtBarrier;
  switch_to_sched(f);
  g_cur = f;
}

EXPORT NOINLINE void msl_rt_simd(const void* in, void* out, int64_t param, msl_simd_fn fn, uint32_t kind, const void*) {
  Fiber* f = g_cur;
  f->site = SITE();
  f->in = in;
  f->out = out;
  f->param = param;
  f->fn = fn;
  f->kind = kind;
  f->state = kAtSimd;
  switch_to_sched(f);
  g_cur = f;
}

EXPORT NOINLINE const msl_thread_info* msl_rt_thread(void) { return &g_cur->info; }

EXPORT NOINLINE void* msl_rt_buffer(uint32_t index, uint64_t min_bytes, uint64_t align, uint64_t elem_size,
                                    const void*) {
  const void* pc = SITE();
  if (index >= MSL_MAX_BUFFERS) fail_here(MSL_FAULT_BINDING, pc, "buffer index %u out of range", index);
  msl_buffer_binding& b = D.args->buffers[index];
  if (!b.bound) fail_here(MSL_FAULT_BINDING, pc, "kernel parameter [[buffer(%u)]] is not bound", index);
  Staged& s = D.staged[index];
  if (align && ((uintptr_t)b.ptr % align) != 0)
    fail_here(MSL_FAULT_BINDING, pc, "buffer(%u) is not aligned to %llu bytes as its parameter type requires", index,
              (unsigned long long)align);
  if (elem_size > 1 && s.len % elem_size != 0)
    fail_here(MSL_FAULT_BINDING, pc,
              "buffer(%u) is %zu bytes, not a whole number of %llu-byte elements of its parameter type", index, s.len,
              (unsigned long long)elem_size);
  if (min_bytes > s.len)
    fail_here(MSL_FAULT_BINDING, pc,
              "buffer(%u) is bound with %zu bytes but the kernel parameter type needs %llu (a `constant Params&` "
              "smaller than the struct?)",
              index, s.len, (unsigned long long)min_bytes);
  return s.data;
}

EXPORT NOINLINE void* msl_rt_tg_arg(uint32_t index, uint64_t align, const void*) {
  const void* pc = SITE();
  if (index >= MSL_MAX_BUFFERS || D.args->tg_lens[index] == 0)
    fail_here(MSL_FAULT_BINDING, pc, "kernel parameter [[threadgroup(%u)]] has no threadgroup memory length set", index);
  (void)align;
  return D.arena + D.tg_arg_off[index];
}

EXPORT NOINLINE void* msl_rt_tg_static(uint32_t slot, uint64_t size, uint64_t align, const char* name, const void*) {
  const void* pc = SITE();
  if (slot >= kMaxTgSlots) fail_here(MSL_FAULT_TG_MEMORY, pc, "too many threadgroup declarations");
  TgAlloc& t = D.tg_static[slot];
  if (!t.used) {
    if (D.tg_total + size > D.args->tg_budget)
      fail_here(MSL_FAULT_TG_MEMORY, pc,
                "threadgroup memory over budget: %llu bytes used (static + dynamic) + %llu for this declaration > "
                "%llu bytes",
                (unsigned long long)D.tg_total, (unsigned long long)size, (unsigned long long)D.args->tg_budget);
    if (D.arena_used + size + align + kRedzone > kArenaSize)
      fail_here(MSL_FAULT_TG_MEMORY, pc, "threadgroup arena exhausted");
    t.offset = arena_alloc(size, align);
    t.size = size;
    t.used = true;
    t.name = name;
    D.tg_total += size;
    memset(D.arena + t.offset, 0xff, size);
    if (D.args->checked) mark_valid(t.offset, size);
  }
  return D.arena + t.offset;
}

EXPORT NOINLINE void msl_rt_atomic_access(const void* addr, uint32_t size, uint32_t is_write, const void* site) {
  const void* pc = site ? site : SITE();
  Fiber* f = g_cur;
  if (f && ++f->atomics_since_yield > kSpinLimit)
    fail_here(MSL_FAULT_HANG, pc,
              "more than %llu atomic operations without reaching a barrier: spin-wait on an atomic? (GPU threads "
              "have no forward-progress guarantee)",
              (unsigned long long)kSpinLimit);
  if (checking()) check_access(addr, size, is_write != 0, true, pc);
}

EXPORT NOINLINE void msl_rt_fail(int32_t code, const char* message, const void*) {
  fail_here(code, SITE(), "%s", message);
}

// ------------------------------------------------------------ TSan hooks (checked builds)
#define MSL_TSAN_ACCESS(n)                                                                      \
  EXPORT void __tsan_read##n(void* p) { if (checking()) check_access(p, n, false, false, SITE()); } \
  EXPORT void __tsan_write##n(void* p) { if (checking()) check_access(p, n, true, false, SITE()); } \
  EXPORT void __tsan_unaligned_read##n(void* p) { if (checking()) check_access(p, n, false, false, SITE()); } \
  EXPORT void __tsan_unaligned_write##n(void* p) { if (checking()) check_access(p, n, true, false, SITE()); }
MSL_TSAN_ACCESS(1)
MSL_TSAN_ACCESS(2)
MSL_TSAN_ACCESS(4)
MSL_TSAN_ACCESS(8)
MSL_TSAN_ACCESS(16)
EXPORT void __tsan_read_range(void* p, size_t n) { if (checking()) check_access(p, n, false, false, SITE()); }
EXPORT void __tsan_write_range(void* p, size_t n) { if (checking()) check_access(p, n, true, false, SITE()); }
EXPORT void* __tsan_memcpy(void* d, const void* s, size_t n) {
  if (checking()) {
    check_access(s, n, false, false, SITE());
    check_access(d, n, true, false, SITE());
  }
  return memcpy(d, s, n);
}
EXPORT void* __tsan_memmove(void* d, const void* s, size_t n) {
  if (checking()) {
    check_access(s, n, false, false, SITE());
    check_access(d, n, true, false, SITE());
  }
  return memmove(d, s, n);
}
EXPORT void* __tsan_memset(void* d, int c, size_t n) {
  if (checking()) check_access(d, n, true, false, SITE());
  return memset(d, c, n);
}
EXPORT void __tsan_init() {}
EXPORT void __tsan_func_entry(void*) {}
EXPORT void __tsan_func_exit() {}
EXPORT void __tsan_vptr_update(void**, void*) {}
EXPORT void __tsan_vptr_read(void**) {}

// clang emits calls to this for float -> bfloat; older libgcc lacks it.
extern "C" __attribute__((weak, visibility("hidden"))) __bf16 __truncsfbf2(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  uint16_t r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r = (uint16_t)((u >> 16) | 0x40);  // quiet NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1);  // round to nearest even
    r = (uint16_t)(u >> 16);
  }
  return __builtin_bit_cast(__bf16, r);
}

// ------------------------------------------------------------ dispatch
EXPORT int msl_dispatch(msl_dispatch_args* a) {
  a->fault = MSL_OK;
  a->message[0] = 0;
  a->pc[0] = a->pc[1] = 0;
  D.args = a;
  D.aborted = false;
  if (!ensure_fibers()) {
    record_fault(MSL_FAULT_CONFIG, nullptr, nullptr, "could not allocate fibre stacks");
    return a->fault;
  }
  uint64_t nthreads = (uint64_t)a->tg[0] * a->tg[1] * a->tg[2];
  if (nthreads == 0 || nthreads > kMaxThreads) {
    record_fault(MSL_FAULT_CONFIG, nullptr, nullptr, "threads per threadgroup must be 1..=%u, got %llu", kMaxThreads,
                 (unsigned long long)nthreads);
    return a->fault;
  }
  D.nthreads = (uint32_t)nthreads;
  D.rng = a->seed ^ 0x6d736c2d68726e73ull;
  D.nregions = 0;
  memset(D.tg_static, 0, sizeof(D.tg_static));
  memset(D.sg_epoch, 0, sizeof(D.sg_epoch));
  D.tg_epoch[0] = D.tg_epoch[1] = 1;
  for (uint32_t i = 0; i < kMaxThreads / MSL_SIMD_WIDTH; ++i) D.sg_epoch[i][0] = D.sg_epoch[i][1] = 1;
  if (!stage_buffers(a)) {
    free_staging();
    record_fault(MSL_FAULT_CONFIG, nullptr, nullptr, "could not allocate buffers");
    return a->fault;
  }
  // dynamic threadgroup memory first, then static declarations as they run
  D.arena_used = 0;
  D.tg_total = 0;
  for (int i = 0; i < MSL_MAX_BUFFERS; ++i) {
    if (!a->tg_lens[i]) continue;
    D.tg_arg_off[i] = arena_alloc(a->tg_lens[i], 16);
    D.tg_total += a->tg_lens[i];
    if (a->checked) mark_valid(D.tg_arg_off[i], a->tg_lens[i]);
  }
  if (D.tg_total > a->tg_budget || D.arena_used > kArenaSize) {
    free_staging();
    record_fault(MSL_FAULT_TG_MEMORY, nullptr, nullptr,
                 "threadgroup memory over budget: %llu bytes of dynamic [[threadgroup(i)]] memory > %llu bytes",
                 (unsigned long long)D.tg_total, (unsigned long long)a->tg_budget);
    return a->fault;
  }

  uint64_t ngroups = (uint64_t)a->groups[0] * a->groups[1] * a->groups[2];
  uint32_t* gorder = (uint32_t*)malloc(sizeof(uint32_t) * (ngroups ? ngroups : 1));
  for (uint64_t i = 0; i < ngroups; ++i) gorder[i] = (uint32_t)i;
  if (a->shuffled) shuffle_order(gorder, (uint32_t)ngroups);
  uint32_t order[kMaxThreads];

  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = segv_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &D.old_segv);
  sigaction(SIGBUS, &sa, &D.old_bus);
  // Watchdog: a kernel that never reaches a yield point (an endless loop)
  // cannot be preempted, so a per-thread timer signal aborts the dispatch.
  bool have_timer = false;
  timer_t timer;
  struct sigaction wa, old_watchdog;
  memset(&wa, 0, sizeof(wa));
  wa.sa_sigaction = watchdog_handler;
  wa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&wa.sa_mask);
  if (a->timeout_ms) {
    sigaction(watchdog_signal(), &wa, &old_watchdog);
    struct sigevent sev;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = watchdog_signal();
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer) == 0) {
      struct itimerspec its;
      memset(&its, 0, sizeof(its));
      its.it_value.tv_sec = (time_t)(a->timeout_ms / 1000);
      its.it_value.tv_nsec = (long)(a->timeout_ms % 1000) * 1000000L;
      timer_settime(timer, 0, &its, nullptr);
      have_timer = true;
    }
  }
  D.active = true;
  if (sigsetjmp(D.jmp, 1) == 0) {
    for (uint64_t gi = 0; gi < ngroups; ++gi) {
      uint32_t g = gorder[gi];
      D.group_linear = g;
      D.group_pos[0] = g % a->groups[0];
      D.group_pos[1] = g / a->groups[0] % a->groups[1];
      D.group_pos[2] = g / (a->groups[0] * a->groups[1]);
      for (int d = 0; d < 3; ++d) {
        uint32_t start = D.group_pos[d] * a->tg[d];
        uint32_t left = a->grid_threads[d] > start ? a->grid_threads[d] - start : 0;
        D.group_size[d] = left < a->tg[d] ? left : a->tg[d];
      }
      if (!D.group_size[0] || !D.group_size[1] || !D.group_size[2]) continue;
      poison_group_memory();
      if (!run_group(order)) break;
    }
  }
  D.active = false;
  g_cur = nullptr;
  if (have_timer) timer_delete(timer);
  if (a->timeout_ms) sigaction(watchdog_signal(), &old_watchdog, nullptr);
  sigaction(SIGSEGV, &D.old_segv, nullptr);
  sigaction(SIGBUS, &D.old_bus, nullptr);
  free(gorder);
  unstage_buffers(a);
  return a->fault;
}
