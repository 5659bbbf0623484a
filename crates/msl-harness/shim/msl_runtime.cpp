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

// ------------------------------------------------------------ context switch
#if defined(__x86_64__)
extern "C" void msl_ctx_switch(void** save_sp, void* new_sp);
extern "C" void msl_fiber_entry();
asm(R"(
.text
.p2align 4
.type msl_ctx_switch,@function
msl_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size msl_ctx_switch,.-msl_ctx_switch
.p2align 4
.type msl_fiber_entry,@function
msl_fiber_entry:
  movq %rbx, %rdi
  call msl_fiber_main
  ud2
.size msl_fiber_entry,.-msl_fiber_entry
)");
#endif

enum FiberState : uint8_t { kReady, kAtBarrier, kAtSimd, kDone };

struct Fiber {
  void* sp;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  char* stack_lo;  // lowest usable byte (guard page below)
  char* stack_hi;
  uint32_t lid;
  uint32_t sg;
  FiberState state;
  const void* site;
  uint32_t flags;
  // pending SIMD-group op
  const void* in;
  void* out;
  int64_t param;
  msl_simd_fn fn;
  uint32_t kind;
  uint64_t atomics_since_yield;
  msl_thread_info info;
};

// ------------------------------------------------------------ shadow memory
struct Rec {
  uint32_t group;  // linear threadgroup id + 1 (0 = none)
  uint32_t lid;
  uint32_t tg_epoch;
  uint32_t sg_epoch;
  const void* pc;
};
enum : uint8_t { kValid = 1, kWritten = 2, kHasW = 4, kHasR = 8, kWAtomic = 16, kRAtomic = 32, kShared = 64 };
struct Cell {
  Rec w, r;
  uint32_t shared_group;
  uint32_t shared_epoch;
  uint8_t flags;
};

struct Region {
  char* lo;       // data
  char* hi;
  char* alo;      // tracked range including red zones
  char* ahi;
  Cell* shadow;   // one cell per byte of [alo, ahi) (only for checked mode)
  size_t shadow_bytes;
  int space;      // 0 device, 1 threadgroup
  int index;      // buffer index, -1 for the threadgroup arena
  bool writable;
};

struct TgAlloc {
  bool used;
  const char* name;
  size_t offset;
  size_t size;
};

struct Staged {
  char* map;
  size_t map_len;
  char* data;
  size_t len;
};

struct Dispatch {
  bool active = false;
  msl_dispatch_args* args = nullptr;
  uint32_t nthreads = 0;
  uint32_t nsg = 0;
  uint32_t group_linear = 0;
  uint32_t group_pos[3] = {0, 0, 0};
  uint32_t group_size[3] = {1, 1, 1};  // threads in the current (possibly partial) group
  Fiber* fibers = nullptr;  // kMaxThreads, persistent
  char* stacks = nullptr;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_uc;
#endif
  bool aborted = false;
  // memory
  Staged staged[MSL_MAX_BUFFERS];
  char* arena = nullptr;  // kArenaSize + guard
  size_t arena_used = 0;
  uint64_t tg_total = 0;
  TgAlloc tg_static[kMaxTgSlots];
  size_t tg_arg_off[MSL_MAX_BUFFERS];
  Region regions[MSL_MAX_BUFFERS + 1];
  int nregions = 0;
  char* track_lo = nullptr;
  char* track_hi = nullptr;
  // checker epochs: [space]
  uint32_t tg_epoch[2] = {1, 1};
  uint32_t sg_epoch[kMaxThreads / MSL_SIMD_WIDTH][2];
  uint64_t rng = 0;
  sigjmp_buf jmp;
  struct sigaction old_segv, old_bus;
};

Dispatch D;
Fiber* g_cur = nullptr;

uint64_t next_rand() {
  // splitmix64
  uint64_t z = (D.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t pc_offset(const void* pc) {
  if (!pc) return 0;
  Dl_info info;
  if (dladdr(pc, &info) && info.dli_fbase) return (uint64_t)((const char*)pc - (const char*)info.dli_fbase);
  return 0;
}

void describe_thread(char* buf, size_t n, uint32_t group1, uint32_t lid) {
  if (group1 == 0) {
    snprintf(buf, n, "?");
    return;
  }
  uint32_t g = group1 - 1;
  const msl_dispatch_args* a = D.args;
  uint32_t gx = g % a->groups[0], gy = g / a->groups[0] % a->groups[1], gz = g / (a->groups[0] * a->groups[1]);
  uint32_t tx = lid % a->tg[0], ty = lid / a->tg[0] % a->tg[1], tz = lid / (a->tg[0] * a->tg[1]);
  snprintf(buf, n, "threadgroup (%u,%u,%u) thread (%u,%u,%u)", gx, gy, gz, tx, ty, tz);
}

// Records the first fault of the dispatch; later ones are ignored.
void record_fault(int32_t code, const void* pc0, const void* pc1, const char* fmt, ...) {
  if (D.args->fault != MSL_OK) return;
  D.args->fault = code;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(D.args->message, sizeof(D.args->message), fmt, ap);
  va_end(ap);
  D.args->pc[0] = pc_offset(pc0);
  D.args->pc[1] = pc_offset(pc1);
}

void switch_to_sched(Fiber* f) {
#if defined(__x86_64__)
  msl_ctx_switch(&f->sp, D.sched_sp);
#else
  swapcontext(&f->uc, &D.sched_uc);
#endif
}

// Aborts the dispatch from inside a fibre: the fibre never resumes.
[[noreturn]] void abort_from_fiber() {
  D.aborted = true;
  Fiber* f = g_cur;
  for (;;) switch_to_sched(f);
}

void fail_here(int32_t code, const void* pc, const char* fmt, ...) {
  if (D.args->fault == MSL_OK) {
    char msg[900];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    char who[128];
    describe_thread(who, sizeof(who), D.group_linear + 1, g_cur ? g_cur->lid : 0);
    record_fault(code, pc, nullptr, "%s (%s)", msg, who);
  }
  abort_from_fiber();
}

}  // namespace

// ------------------------------------------------------------ fibres
extern "C" __attribute__((used, visibility("hidden"))) void msl_fiber_main(Fiber* f) {
  g_cur = f;
  D.args->kernel();
  f->state = kDone;
  for (;;) switch_to_sched(f);
}

namespace {
#if !defined(__x86_64__)
void fiber_trampoline(unsigned lo, unsigned hi) {
  msl_fiber_main((Fiber*)(((uintptr_t)hi << 32) | lo));
}
#endif

void fiber_prepare(Fiber* f) {
#if defined(__x86_64__)
  uintptr_t top = (uintptr_t)f->stack_hi & ~(uintptr_t)15;
  uint64_t* sp = (uint64_t*)(top - 24);  // return address slot; rsp after ret is 16-aligned
  *sp = (uint64_t)(uintptr_t)&msl_fiber_entry;
  sp -= 7;                        // rbp rbx r12 r13 r14 r15 + mxcsr/fpu control word
  uint32_t* csr = (uint32_t*)sp;
  csr[0] = 0x1f80;                // default MXCSR
  csr[1] = 0x037f;                // default x87 control word
  sp[1] = 0;                      // r15
  sp[2] = 0;                      // r14
  sp[3] = 0;                      // r13
  sp[4] = 0;                      // r12
  sp[5] = (uint64_t)(uintptr_t)f; // rbx -> first argument of msl_fiber_main
  sp[6] = 0;                      // rbp
  f->sp = sp;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack_lo;
  f->uc.uc_stack.ss_size = f->stack_hi - f->stack_lo;
  f->uc.uc_link = nullptr;
  uintptr_t p = (uintptr_t)f;
  makecontext(&f->uc, (void (*)())fiber_trampoline, 2, (unsigned)p, (unsigned)(p >> 32));
#endif
}

void run_fiber(Fiber* f) {
  g_cur = f;
  f->atomics_since_yield = 0;
#if defined(__x86_64__)
  msl_ctx_switch(&D.sched_sp, f->sp);
#else
  swapcontext(&D.sched_uc, &f->uc);
#endif
  g_cur = nullptr;
}

bool ensure_fibers() {
  if (D.fibers) return true;
  size_t ps = page_size();
  size_t per = kStackSize + ps;
  void* m = mmap(nullptr, per * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return false;
  D.stacks = (char*)m;
  D.fibers = (Fiber*)calloc(kMaxThreads, sizeof(Fiber));
  for (uint32_t i = 0; i < kMaxThreads; ++i) {
    char* base = D.stacks + i * per;
    mprotect(base, ps, PROT_NONE);  // guard page catches fibre stack overflow
    D.fibers[i].stack_lo = base + ps;
    D.fibers[i].stack_hi = base + per;
  }
  void* a = mmap(nullptr, kArenaSize + ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (a == MAP_FAILED) return false;
  D.arena = (char*)a;
  mprotect(D.arena + kArenaSize, ps, PROT_NONE);
  return true;
}

// ------------------------------------------------------------ checker
bool checking() { return D.active && D.args->checked && g_cur && !D.aborted; }

Region* find_region(const char* a) {
  for (int i = 0; i < D.nregions; ++i) {
    Region& r = D.regions[i];
    if (a >= r.alo && a < r.ahi) return &r;
  }
  return nullptr;
}

void describe_addr(char* buf, size_t n, const Region* r, const char* a) {
  if (r->index >= 0) {
    snprintf(buf, n, "buffer(%d) byte offset %lld (buffer is %zu bytes)", r->index, (long long)(a - r->lo),
             (size_t)(r->hi - r->lo));
    return;
  }
  size_t off = (size_t)(a - D.arena);
  for (int i = 0; i < MSL_MAX_BUFFERS; ++i)
    if (D.args->tg_lens[i] && off >= D.tg_arg_off[i] && off < D.tg_arg_off[i] + D.args->tg_lens[i] + kRedzone) {
      snprintf(buf, n, "threadgroup(%d) byte offset %lld", i, (long long)(off - D.tg_arg_off[i]));
      return;
    }
  for (uint32_t s = 0; s < kMaxTgSlots; ++s)
    if (D.tg_static[s].used && off >= D.tg_static[s].offset && off < D.tg_static[s].offset + D.tg_static[s].size + kRedzone) {
      snprintf(buf, n, "threadgroup array `%s` byte offset %lld (array is %zu bytes)", D.tg_static[s].name,
               (long long)(off - D.tg_static[s].offset), D.tg_static[s].size);
      return;
    }
  snprintf(buf, n, "threadgroup memory offset %zu", off);
}

bool ordered(const Rec& prev, uint32_t group1, uint32_t lid, uint32_t sg, int space) {
  if (prev.group == 0) return true;
  if (prev.group != group1) return false;  // no ordering between threadgroups of one dispatch
  if (prev.lid == lid) return true;
  if (prev.tg_epoch < D.tg_epoch[space]) return true;
  if (prev.lid / MSL_SIMD_WIDTH == sg && prev.sg_epoch < D.sg_epoch[sg][space]) return true;
  return false;
}

[[noreturn]] void report_race(const char* what, const Region* r, const char* a, const Rec& prev, const void* pc) {
  char where[200], me[128], other[128];
  describe_addr(where, sizeof(where), r, a);
  describe_thread(me, sizeof(me), D.group_linear + 1, g_cur->lid);
  describe_thread(other, sizeof(other), prev.group, prev.lid);
  const char* why = prev.group != D.group_linear + 1
                        ? "different threadgroups of one dispatch are never ordered"
                        : (r->space == 1 ? "no threadgroup_barrier(mem_flags::mem_threadgroup) between them"
                                         : "no threadgroup_barrier(mem_flags::mem_device) between them");
  record_fault(MSL_FAULT_RACE, pc, prev.pc, "data race on %s: %s by %s conflicts with an earlier access by %s (%s)",
               where, what, me, other, why);
  abort_from_fiber();
}

void check_access(const void* addr, size_t n, bool write, bool atomic, const void* pc) {
  const char* a = (const char*)addr;
  if (a + n <= D.track_lo || a >= D.track_hi) return;
  Region* r = find_region(a);
  if (!r) return;
  uint32_t group1 = D.group_linear + 1, lid = g_cur->lid, sg = g_cur->sg;
  int sp = r->space;
  for (size_t i = 0; i < n; ++i) {
    const char* b = a + i;
    if (b >= r->ahi) {
      r = find_region(b);
      if (!r) return;
      sp = r->space;
    }
    Cell& c = r->shadow[b - r->alo];
    bool valid = r->index >= 0 ? (b >= r->lo && b < r->hi) : (c.flags & kValid);
    if (!valid) {
      char where[200];
      describe_addr(where, sizeof(where), r, b);
      char who[128];
      describe_thread(who, sizeof(who), group1, lid);
      record_fault(MSL_FAULT_OUT_OF_BOUNDS, pc, nullptr, "out-of-bounds %s of %zu bytes at %s (%s)",
                   write ? "write" : "read", n, where, who);
      abort_from_fiber();
    }
    if (write && !r->writable) {
      char where[200];
      describe_addr(where, sizeof(where), r, b);
      record_fault(MSL_FAULT_READ_ONLY, pc, nullptr, "write to %s, which was bound read-only", where);
      abort_from_fiber();
    }
    if (!write && sp == 1 && !(c.flags & kWritten)) {
      char where[200], who[128];
      describe_addr(where, sizeof(where), r, b);
      describe_thread(who, sizeof(who), group1, lid);
      record_fault(MSL_FAULT_UNINIT_READ, pc, nullptr,
                   "read of threadgroup memory never written in this threadgroup: %s (%s)", where, who);
      abort_from_fiber();
    }
    // conflicts with the last write
    if ((c.flags & kHasW) && !ordered(c.w, group1, lid, sg, sp) && !(atomic && (c.flags & kWAtomic)))
      report_race(write ? "write" : "read", r, b, c.w, pc);
    Rec me{group1, lid, D.tg_epoch[sp], D.sg_epoch[sg][sp], pc};
    if (write) {
      if ((c.flags & kHasR) && !ordered(c.r, group1, lid, sg, sp) && !(atomic && (c.flags & kRAtomic)))
        report_race("write", r, b, c.r, pc);
      if ((c.flags & kShared) && (c.shared_group != group1 || c.shared_epoch == D.tg_epoch[sp]))
        report_race("write", r, b, c.r, pc);
      c.w = me;
      c.flags = (uint8_t)((c.flags & kValid) | kWritten | kHasW | (atomic ? kWAtomic : 0));
    } else {
      if ((c.flags & kHasR) && c.r.lid != lid && !ordered(c.r, group1, lid, sg, sp)) {
        c.flags |= kShared;
        c.shared_group = c.r.group;
        c.shared_epoch = D.tg_epoch[sp];
      }
      c.r = me;
      c.flags = (uint8_t)((c.flags & ~kRAtomic) | kHasR | (atomic ? kRAtomic : 0));
    }
  }
}

void* shadow_alloc(size_t cells, size_t* bytes) {
  *bytes = round_up(cells * sizeof(Cell), page_size());
  void* m = mmap(nullptr, *bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return m == MAP_FAILED ? nullptr : m;
}

void update_track_bounds() {
  D.track_lo = (char*)UINTPTR_MAX;
  D.track_hi = nullptr;
  for (int i = 0; i < D.nregions; ++i) {
    if (D.regions[i].alo < D.track_lo) D.track_lo = D.regions[i].alo;
    if (D.regions[i].ahi > D.track_hi) D.track_hi = D.regions[i].ahi;
  }
}

Region* arena_region() {
  for (int i = 0; i < D.nregions; ++i)
    if (D.regions[i].index < 0) return &D.regions[i];
  return nullptr;
}

void mark_valid(size_t off, size_t size) {
  Region* r = arena_region();
  if (!r) return;
  for (size_t i = off; i < off + size; ++i) r->shadow[i].flags |= kValid;
}

// ------------------------------------------------------------ guard pages
void segv_handler(int sig, siginfo_t* si, void* uctx) {
  char* a = (char*)si->si_addr;
  size_t ps = page_size();
  const void* pc = nullptr;
#if defined(__x86_64__)
  // +1: symbolisation treats pcs as return addresses and looks at pc - 1
  pc = (const void*)(((ucontext_t*)uctx)->uc_mcontext.gregs[REG_RIP] + 1);
#endif
  if (D.active && D.args->fault == MSL_OK) {
    for (int i = 0; i < MSL_MAX_BUFFERS; ++i) {
      Staged& s = D.staged[i];
      if (!s.map) continue;
      char* guard = s.map + s.map_len - ps;
      if (a >= guard && a < guard + ps) {
        record_fault(MSL_FAULT_OUT_OF_BOUNDS, pc, nullptr,
                     "out-of-bounds access at buffer(%d) byte offset %lld (buffer is %zu bytes; caught by the guard "
                     "page, run Mode::Checked for the exact access)",
                     i, (long long)(a - s.data), s.len);
        siglongjmp(D.jmp, 1);
      }
      if (a >= s.data && a < s.data + s.len) {
        record_fault(MSL_FAULT_READ_ONLY, pc, nullptr, "write to buffer(%d) byte offset %lld, which was bound read-only",
                     i, (long long)(a - s.data));
        siglongjmp(D.jmp, 1);
      }
    }
    if (a >= D.arena + kArenaSize && a < D.arena + kArenaSize + ps) {
      record_fault(MSL_FAULT_OUT_OF_BOUNDS, pc, nullptr, "out-of-bounds access past the threadgroup memory arena");
      siglongjmp(D.jmp, 1);
    }
    for (uint32_t i = 0; i < kMaxThreads && D.fibers; ++i) {
      char* g = D.fibers[i].stack_lo - ps;
      if (a >= g && a < g + ps) {
        record_fault(MSL_FAULT_STACK, pc, nullptr, "stack overflow in emulated thread %u (fibre stacks are %zu KiB)", i,
                     kStackSize / 1024);
        siglongjmp(D.jmp, 1);
      }
    }
  }
  // Not ours: hand over to whoever was installed before.
  struct sigaction* old = sig == SIGBUS ? &D.old_bus : &D.old_segv;
  sigaction(sig, old, nullptr);
  (void)uctx;
}

void free_staging() {
  for (int i = 0; i < MSL_MAX_BUFFERS; ++i) {
    if (D.staged[i].map) munmap(D.staged[i].map, D.staged[i].map_len);
    D.staged[i] = Staged{};
  }
  for (int i = 0; i < D.nregions; ++i)
    if (D.regions[i].shadow) munmap(D.regions[i].shadow, D.regions[i].shadow_bytes);
  D.nregions = 0;
}

// Copies each bound buffer to fresh pages whose end touches a PROT_NONE page.
bool stage_buffers(msl_dispatch_args* a) {
  size_t ps = page_size();
  for (int i = 0; i < MSL_MAX_BUFFERS; ++i) {
    msl_buffer_binding& b = a->buffers[i];
    if (!b.bound) continue;
    size_t len = b.len;
    // Fast mode: the data ends at the guard page. Checked mode: a red zone
    // between them so that small overruns get a precise report.
    size_t data_pages = round_up(round_up(len, 16) + (a->checked ? kRedzone : 0), ps);
    if (data_pages == 0) data_pages = ps;
    size_t map_len = data_pages + ps;
    char* m = (char*)mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return false;
    mprotect(m + data_pages, ps, PROT_NONE);
    char* data = m + data_pages - round_up(len, 16);
    if (len) memcpy(data, b.ptr, len);
    memset(data + len, 0xff, round_up(len, 16) - len);
    if (!b.writable && !a->checked) mprotect(m, data_pages, PROT_READ);
    D.staged[i] = Staged{m, map_len, data, len};
    if (a->checked) {
      Region& r = D.regions[D.nregions++];
      r = Region{};
      r.lo = data;
      r.hi = data + len;
      r.alo = m;
      r.ahi = m + data_pages;
      r.space = 0;
      r.index = i;
      r.writable = b.writable != 0;
      r.shadow = (Cell*)shadow_alloc(data_pages, &r.shadow_bytes);
      if (!r.shadow) return false;
    }
  }
  if (a->checked) {
    Region& r = D.regions[D.nregions++];
    r = Region{};
    r.lo = D.arena;
    r.hi = D.arena + kArenaSize;
    r.alo = D.arena;
    r.ahi = D.arena + kArenaSize;
    r.space = 1;
    r.index = -1;
    r.writable = true;
    r.shadow = (Cell*)shadow_alloc(kArenaSize, &r.shadow_bytes);
    if (!r.shadow) return false;
  }
  update_track_bounds();
  return true;
}

void unstage_buffers(msl_dispatch_args* a) {
  for (int i = 0; i < MSL_MAX_BUFFERS; ++i) {
    msl_buffer_binding& b = a->buffers[i];
    if (b.bound && b.writable && D.staged[i].map && b.len) memcpy(b.ptr, D.staged[i].data, b.len);
  }
  free_staging();
}

// ------------------------------------------------------------ threadgroup memory
size_t arena_alloc(size_t size, size_t align) {
  size_t off = round_up(D.arena_used, align < 16 ? 16 : align);
  D.arena_used = off + size + kRedzone;
  return off;
}

void poison_group_memory() {
  memset(D.arena, 0xff, D.arena_used < kArenaSize ? D.arena_used : kArenaSize);
  Region* r = arena_region();
  if (!r) return;
  // Fresh group: nothing written yet, records from the previous group are void.
  for (size_t i = 0; i < D.arena_used && i < kArenaSize; ++i) {
    uint8_t v = r->shadow[i].flags & kValid;
    r->shadow[i] = Cell{};
    r->shadow[i].flags = v;
  }
}

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
  sigaction(SIGSEGV, &D.old_segv, nullptr);
  sigaction(SIGBUS, &D.old_bus, nullptr);
  free(gorder);
  unstage_buffers(a);
  return a->fault;
}
