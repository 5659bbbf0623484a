// Part of the MSL shim (included by msl_shim.h): barriers, SIMD-group
// functions, simdgroup_matrix, atomics.
#pragma once
namespace metal {

// ---------------------------------------------------------------- barriers
enum class mem_flags : uint32_t {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
MSL_INLINE constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return (mem_flags)((uint32_t)a | (uint32_t)b);
}
MSL_INLINE void threadgroup_barrier(mem_flags f) { msl_rt_barrier((uint32_t)f, MSL_SITE()); }
MSL_INLINE void simdgroup_barrier(mem_flags f) {
  msl_rt_simd(nullptr, nullptr, (int64_t)(uint32_t)f, nullptr, MSL_SIMD_BARRIER, MSL_SITE());
}

// ---------------------------------------------------------------- SIMD-group functions
namespace simd_ops {
template <class T> MSL_INLINE void poison(T* out) { memset((void*)out, 0xff, sizeof(T)); }
template <class T> MSL_INLINE const T& at(const void* const* in, uint32_t l) { return *(const T*)in[l]; }

template <class T> void sum(const void* const* in, uint32_t mask, uint32_t, int64_t, void* out) {
  T acc = T(0);
  for (uint32_t l = 0; l < MSL_SIMD_WIDTH; ++l) if (mask >> l & 1) acc = acc + at<T>(in, l);
  *(T*)out = acc;
}
template <class T> void product(const void* const* in, uint32_t mask, uint32_t, int64_t, void* out) {
  T acc = T(1);
  for (uint32_t l = 0; l < MSL_SIMD_WIDTH; ++l) if (mask >> l & 1) acc = acc * at<T>(in, l);
  *(T*)out = acc;
}
template <class T> void vmax(const void* const* in, uint32_t mask, uint32_t, int64_t, void* out) {
  int first = __builtin_ctz(mask);
  T acc = at<T>(in, first);
  for (uint32_t l = first + 1; l < MSL_SIMD_WIDTH; ++l) if (mask >> l & 1) acc = ::metal::max(acc, at<T>(in, l));
  *(T*)out = acc;
}
template <class T> void vmin(const void* const* in, uint32_t mask, uint32_t, int64_t, void* out) {
  int first = __builtin_ctz(mask);
  T acc = at<T>(in, first);
  for (uint32_t l = first + 1; l < MSL_SIMD_WIDTH; ++l) if (mask >> l & 1) acc = ::metal::min(acc, at<T>(in, l));
  *(T*)out = acc;
}
template <class T> void band(const void* const* in, uint32_t mask, uint32_t, int64_t, void* out) {
  T acc = ~T(0);
  for (uint32_t l = 0; l < MSL_SIMD_WIDTH; ++l) if (mask >> l & 1) acc &= at<T>(in, l);
  *(T*)out = acc;
}
template <class T> void bor(const void* const* in, uint32_t mask, uint32_t, int64_t, void* out) {
  T acc = T(0);
  for (uint32_t l = 0; l < MSL_SIMD_WIDTH; ++l) if (mask >> l & 1) acc |= at<T>(in, l);
  *(T*)out = acc;
}
template <class T> void bxor(const void* const* in, uint32_t mask, uint32_t, int64_t, void* out) {
  T acc = T(0);
  for (uint32_t l = 0; l < MSL_SIMD_WIDTH; ++l) if (mask >> l & 1) acc ^= at<T>(in, l);
  *(T*)out = acc;
}
template <class T, bool Inclusive, bool Mul>
void prefix(const void* const* in, uint32_t mask, uint32_t lane, int64_t, void* out) {
  T acc = Mul ? T(1) : T(0);
  for (uint32_t l = 0; l < lane; ++l)
    if (mask >> l & 1) acc = Mul ? acc * at<T>(in, l) : acc + at<T>(in, l);
  if (Inclusive) acc = Mul ? acc * at<T>(in, lane) : acc + at<T>(in, lane);
  *(T*)out = acc;
}
// Reads lane `src` if it is active, otherwise poison (like reading an
// inactive lane's register on hardware: unspecified).
template <class T> MSL_INLINE void from_lane(const void* const* in, uint32_t mask, int64_t src, void* out) {
  if (src >= 0 && src < MSL_SIMD_WIDTH && (mask >> src & 1)) *(T*)out = at<T>(in, (uint32_t)src);
  else poison((T*)out);
}
template <class T> void shuffle(const void* const* in, uint32_t mask, uint32_t, int64_t p, void* out) {
  from_lane<T>(in, mask, p, out);
}
template <class T> void shuffle_xor(const void* const* in, uint32_t mask, uint32_t lane, int64_t p, void* out) {
  from_lane<T>(in, mask, (int64_t)(lane ^ (uint32_t)p), out);
}
template <class T> void shuffle_down(const void* const* in, uint32_t mask, uint32_t lane, int64_t p, void* out) {
  // The upper `delta` lanes keep their own value.
  if (lane + p >= MSL_SIMD_WIDTH) *(T*)out = at<T>(in, lane);
  else from_lane<T>(in, mask, lane + p, out);
}
template <class T> void shuffle_up(const void* const* in, uint32_t mask, uint32_t lane, int64_t p, void* out) {
  // The lower `delta` lanes keep their own value.
  if ((int64_t)lane < p) *(T*)out = at<T>(in, lane);
  else from_lane<T>(in, mask, lane - p, out);
}
template <class T> void rotate_down(const void* const* in, uint32_t mask, uint32_t lane, int64_t p, void* out) {
  from_lane<T>(in, mask, (lane + p) % MSL_SIMD_WIDTH, out);
}
template <class T> void rotate_up(const void* const* in, uint32_t mask, uint32_t lane, int64_t p, void* out) {
  from_lane<T>(in, mask, ((int64_t)lane - p % MSL_SIMD_WIDTH + MSL_SIMD_WIDTH) % MSL_SIMD_WIDTH, out);
}
template <class T> void first(const void* const* in, uint32_t mask, uint32_t, int64_t, void* out) {
  *(T*)out = at<T>(in, __builtin_ctz(mask));
}
inline void ballot(const void* const* in, uint32_t mask, uint32_t, int64_t, void* out) {
  uint64_t r = 0;
  for (uint32_t l = 0; l < MSL_SIMD_WIDTH; ++l) if ((mask >> l & 1) && at<bool>(in, l)) r |= 1ull << l;
  *(uint64_t*)out = r;
}
inline void active(const void* const*, uint32_t mask, uint32_t, int64_t, void* out) {
  *(uint64_t*)out = mask;
}
}  // namespace simd_ops

#define MSL_SIMD_FN(name, op, ...)                                              \
  template <class T> MSL_INLINE T name(T x __VA_ARGS__) {                            \
    T out;                                                                     \
    msl_rt_simd(&x, &out, MSL_SIMD_PARAM, &simd_ops::op<T>, MSL_SIMD_OP, MSL_SITE()); \
    return out;                                                                \
  }
#define MSL_SIMD_PARAM 0
MSL_SIMD_FN(simd_sum, sum, )
MSL_SIMD_FN(simd_product, product, )
MSL_SIMD_FN(simd_max, vmax, )
MSL_SIMD_FN(simd_min, vmin, )
MSL_SIMD_FN(simd_and, band, )
MSL_SIMD_FN(simd_or, bor, )
MSL_SIMD_FN(simd_xor, bxor, )
MSL_SIMD_FN(simd_broadcast_first, first, )
#undef MSL_SIMD_PARAM
#define MSL_SIMD_PARAM (int64_t)p
MSL_SIMD_FN(simd_shuffle, shuffle, , ushort p)
MSL_SIMD_FN(simd_broadcast, shuffle, , ushort p)
MSL_SIMD_FN(simd_shuffle_xor, shuffle_xor, , ushort p)
MSL_SIMD_FN(simd_shuffle_down, shuffle_down, , ushort p)
MSL_SIMD_FN(simd_shuffle_up, shuffle_up, , ushort p)
MSL_SIMD_FN(simd_shuffle_rotate_down, rotate_down, , ushort p)
MSL_SIMD_FN(simd_shuffle_rotate_up, rotate_up, , ushort p)
#undef MSL_SIMD_PARAM
#undef MSL_SIMD_FN

#define MSL_SIMD_PREFIX(name, inc, mul)                                         \
  template <class T> MSL_INLINE T name(T x) {                                  \
    T out;                                                                     \
    msl_rt_simd(&x, &out, 0, &simd_ops::prefix<T, inc, mul>, MSL_SIMD_OP, MSL_SITE()); \
    return out;                                                                \
  }
MSL_SIMD_PREFIX(simd_prefix_exclusive_sum, false, false)
MSL_SIMD_PREFIX(simd_prefix_inclusive_sum, true, false)
MSL_SIMD_PREFIX(simd_prefix_exclusive_product, false, true)
MSL_SIMD_PREFIX(simd_prefix_inclusive_product, true, true)
#undef MSL_SIMD_PREFIX

struct simd_vote {
  uint64_t v;
  MSL_INLINE explicit operator uint64_t() const { return v; }
};
MSL_INLINE simd_vote simd_ballot(bool b) {
  uint64_t out;
  msl_rt_simd(&b, &out, 0, &simd_ops::ballot, MSL_SIMD_OP, MSL_SITE());
  return simd_vote{out};
}
MSL_INLINE simd_vote simd_active_threads_mask() {
  uint64_t out;
  msl_rt_simd(nullptr, &out, 0, &simd_ops::active, MSL_SIMD_OP, MSL_SITE());
  return simd_vote{out};
}
MSL_INLINE bool simd_all(bool b) {
  uint64_t out, act;
  msl_rt_simd(&b, &out, 0, &simd_ops::ballot, MSL_SIMD_OP, MSL_SITE());
  msl_rt_simd(nullptr, &act, 0, &simd_ops::active, MSL_SIMD_OP, MSL_SITE());
  return out == act;
}
MSL_INLINE bool simd_any(bool b) {
  uint64_t out;
  msl_rt_simd(&b, &out, 0, &simd_ops::ballot, MSL_SIMD_OP, MSL_SITE());
  return out != 0;
}
MSL_INLINE bool simd_is_first() {
  uint64_t act;
  msl_rt_simd(nullptr, &act, 0, &simd_ops::active, MSL_SIMD_OP, MSL_SITE());
  return msl_rt_thread()->thread_index_in_simdgroup[0] == (uint32_t)__builtin_ctzll(act);
}

// ---------------------------------------------------------------- simdgroup_matrix
// Every lane holds the whole 8x8 matrix (the value is simdgroup-uniform);
// each operation is a SIMD-group sync point that requires all 32 lanes.
template <class T, int Rows, int Cols> struct simdgroup_matrix {
  static_assert(Rows == 8 && Cols == 8, "only 8x8 simdgroup matrices are supported");
  T e[Rows * Cols];
  MSL_INLINE simdgroup_matrix() { memset((void*)e, 0xff, sizeof(e)); }
  MSL_INLINE explicit simdgroup_matrix(T diag) {
    for (int i = 0; i < Rows * Cols; ++i) e[i] = (i / Cols == i % Cols) ? diag : T(0);
  }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

MSL_INLINE void msl_simdgroup_uniform(const void* site) {
  msl_rt_simd(nullptr, nullptr, 0, nullptr, MSL_SIMD_UNIFORM, site);
}
template <class T, int R, int C>
MSL_INLINE simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, R, C> m;
  for (int i = 0; i < R * C; ++i) m.e[i] = v;
  return m;
}
// origin = (column, row) of the matrix's first element in the source.
template <class T, int R, int C, class P>
MSL_INLINE void simdgroup_load(thread simdgroup_matrix<T, R, C>& d, P* src, ulong elements_per_row = C,
                               ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  msl_simdgroup_uniform(MSL_SITE());
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      ulong row = transpose_matrix ? c : r, col = transpose_matrix ? r : c;
      d.e[r * C + c] = (T)src[(matrix_origin.y + row) * elements_per_row + matrix_origin.x + col];
    }
  msl_simdgroup_uniform(MSL_SITE());
}
// Lane l stores elements 2l and 2l+1, so the race checker sees the store
// spread over the simdgroup like on hardware.
template <class T, int R, int C, class P>
MSL_INLINE void simdgroup_store(thread const simdgroup_matrix<T, R, C>& s, P* dst, ulong elements_per_row = C,
                                ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  msl_simdgroup_uniform(MSL_SITE());
  uint32_t lane = msl_rt_thread()->thread_index_in_simdgroup[0];
  for (uint32_t i = 2 * lane; i < 2 * lane + 2 && i < (uint32_t)(R * C); ++i) {
    ulong r = i / C, c = i % C;
    ulong row = transpose_matrix ? c : r, col = transpose_matrix ? r : c;
    dst[(matrix_origin.y + row) * elements_per_row + matrix_origin.x + col] = s.e[i];
  }
  msl_simdgroup_uniform(MSL_SITE());
}
// Products accumulate in float, rounded once to the destination type.
template <class T, class TA, class TB, class TC, int N>
MSL_INLINE void simdgroup_multiply_accumulate(thread simdgroup_matrix<T, N, N>& d,
                                              thread const simdgroup_matrix<TA, N, N>& a,
                                              thread const simdgroup_matrix<TB, N, N>& b,
                                              thread const simdgroup_matrix<TC, N, N>& c) {
  msl_simdgroup_uniform(MSL_SITE());
  simdgroup_matrix<T, N, N> r;
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = (float)c.e[i * N + j];
      for (int k = 0; k < N; ++k) acc += (float)a.e[i * N + k] * (float)b.e[k * N + j];
      r.e[i * N + j] = (T)acc;
    }
  d = r;
}
template <class T, class TA, class TB, int N>
MSL_INLINE void simdgroup_multiply(thread simdgroup_matrix<T, N, N>& d, thread const simdgroup_matrix<TA, N, N>& a,
                                   thread const simdgroup_matrix<TB, N, N>& b) {
  simdgroup_matrix<T, N, N> z(T(0));
  for (int i = 0; i < N * N; ++i) z.e[i] = T(0);
  simdgroup_multiply_accumulate(d, a, b, z);
}

// ---------------------------------------------------------------- atomics
enum memory_order { memory_order_relaxed, memory_order_acquire, memory_order_release,
                    memory_order_acq_rel, memory_order_seq_cst };
template <class T> struct atomic { T __v; };
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;

// Fibres never preempt each other, so a plain read-modify-write is atomic;
// the explicit hook tells the race checker these accesses are atomic. Not
// inlined, so that the sanitizer does not instrument the plain access; the
// return address locates the call in the kernel.
#define MSL_ATOMIC_FN __attribute__((no_sanitize("thread"), noinline))
#define MSL_CALLER() __builtin_return_address(0)
#define MSL_ATOMIC_RMW(name, expr)                                                     \
  template <class A, class V>                                                         \
  MSL_ATOMIC_FN auto name(A* obj, V val, memory_order) {                              \
    msl_rt_atomic_access((const void*)&obj->__v, sizeof(obj->__v), 1, MSL_CALLER());  \
    auto old = obj->__v;                                                              \
    obj->__v = (expr);                                                                \
    return old;                                                                       \
  }
MSL_ATOMIC_RMW(atomic_fetch_add_explicit, old + val)
MSL_ATOMIC_RMW(atomic_fetch_sub_explicit, old - val)
MSL_ATOMIC_RMW(atomic_fetch_and_explicit, old & val)
MSL_ATOMIC_RMW(atomic_fetch_or_explicit, old | val)
MSL_ATOMIC_RMW(atomic_fetch_xor_explicit, old ^ val)
MSL_ATOMIC_RMW(atomic_fetch_max_explicit, old > val ? old : val)
MSL_ATOMIC_RMW(atomic_fetch_min_explicit, old < val ? old : val)
MSL_ATOMIC_RMW(atomic_exchange_explicit, val)
#undef MSL_ATOMIC_RMW
template <class A>
MSL_ATOMIC_FN auto atomic_load_explicit(A* obj, memory_order) {
  msl_rt_atomic_access((const void*)&obj->__v, sizeof(obj->__v), 0, MSL_CALLER());
  return obj->__v;
}
template <class A, class V>
MSL_ATOMIC_FN void atomic_store_explicit(A* obj, V val, memory_order) {
  msl_rt_atomic_access((const void*)&obj->__v, sizeof(obj->__v), 1, MSL_CALLER());
  obj->__v = val;
}
template <class A, class E, class V>
MSL_ATOMIC_FN bool atomic_compare_exchange_weak_explicit(A* obj, E* expected, V desired, memory_order,
                                                      memory_order) {
  msl_rt_atomic_access((const void*)&obj->__v, sizeof(obj->__v), 1, MSL_CALLER());
  if (obj->__v == *expected) { obj->__v = desired; return true; }
  *expected = obj->__v;
  return false;
}
}  // namespace metal
