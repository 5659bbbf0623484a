// Metal Shading Language on the CPU: the subset of the MSL standard library
// our kernels use, implemented in C++17 for clang. Included (via -include)
// before every rewritten .metal file. Every SIMD-group or barrier operation is
// a call into the harness runtime, which switches fibres; everything else is
// plain C++ running on the emulated thread's fibre.
//
// Under -DMSL_STRICT the address-space keywords become real clang address
// spaces, so mixing them up fails to compile like it does with Apple's
// compiler. That build is syntax-only.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <type_traits>
#include "msl_abi.h"

#define MSL_INLINE inline __attribute__((always_inline))
// Call sites are identified by the runtime from its own return address, which
// lands inside the kernel because every wrapper is always_inline (and the
// kernel is compiled with -fno-optimize-sibling-calls). The explicit argument
// is kept for ABI stability and is always null.
#define MSL_SITE() ((const void*)0)

// ---------------------------------------------------------------- qualifiers
#ifdef MSL_STRICT
#define device __attribute__((address_space(1)))
#define constant const __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#else
#define device
#define constant const
#define threadgroup
#endif
#define thread
#define kernel
#define threadgroup_imageblock threadgroup
#define ray_data

// ---------------------------------------------------------------- scalars
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;
typedef __bf16 bfloat;
typedef size_t size_t;

// ---------------------------------------------------------------- vectors
#define MSL_VEC_TYPES(T, name)                                        \
  typedef T name##2 __attribute__((ext_vector_type(2)));              \
  typedef T name##3 __attribute__((ext_vector_type(3)));              \
  typedef T name##4 __attribute__((ext_vector_type(4)));              \
  namespace msl { namespace detail {                                  \
  template <> struct vec_info<name##2> { typedef T elem; enum { n = 2 }; }; \
  template <> struct vec_info<name##3> { typedef T elem; enum { n = 3 }; }; \
  template <> struct vec_info<name##4> { typedef T elem; enum { n = 4 }; }; \
  template <> struct make_vec_t<T, 2> { typedef name##2 type; };      \
  template <> struct make_vec_t<T, 3> { typedef name##3 type; };      \
  template <> struct make_vec_t<T, 4> { typedef name##4 type; };      \
  } }

namespace msl { namespace detail {
template <class V> struct vec_info { typedef V elem; enum { n = 1 }; };
template <class T, int N> struct make_vec_t;
template <class T> struct make_vec_t<T, 1> { typedef T type; };
} }

MSL_VEC_TYPES(float, float)
MSL_VEC_TYPES(half, half)
MSL_VEC_TYPES(bfloat, bfloat)
MSL_VEC_TYPES(int, int)
MSL_VEC_TYPES(uint, uint)
MSL_VEC_TYPES(short, short)
MSL_VEC_TYPES(ushort, ushort)
MSL_VEC_TYPES(char, char)
MSL_VEC_TYPES(uchar, uchar)
MSL_VEC_TYPES(long, long)
MSL_VEC_TYPES(ulong, ulong)
MSL_VEC_TYPES(bool, bool)

namespace msl { namespace detail {
template <class T> using elem_t = typename vec_info<std::remove_cv_t<T>>::elem;
template <class T> constexpr int vec_n = vec_info<std::remove_cv_t<T>>::n;
template <class T> constexpr bool is_vec = vec_n<T> > 1;

template <class T, class A>
MSL_INLINE void vec_put(T* dst, int& i, const A& a) {
  if constexpr (is_vec<A>) {
    for (int k = 0; k < vec_n<A>; ++k) dst[i++] = (T)a[k];
  } else {
    dst[i++] = (T)a;
  }
}
template <class A> constexpr int count_elems() { return vec_n<A>; }

// Vector constructors: float4(x), float4(a, b, c, d), float4(float2, z, w),
// float4(half4). Conversions go element by element (never a bit cast).
template <class T, int N, class... A>
MSL_INLINE typename make_vec_t<T, N>::type make_vec(A... a) {  // by value: drops address spaces
  typedef typename make_vec_t<T, N>::type V;
  if constexpr (sizeof...(A) == 0) {
    return V(0);
  } else if constexpr (sizeof...(A) == 1 && (!is_vec<A> && ...)) {
    return V((T)(a, ...));
  } else {
    static_assert((count_elems<A>() + ...) == N,
                  "vector constructor: component count does not match");
    T tmp[N];
    int i = 0;
    (vec_put(tmp, i, a), ...);
    V v;
    for (int k = 0; k < N; ++k) v[k] = tmp[k];
    return v;
  }
}
} }

// Function-like macros named like the vector types: `float4 x;` is left
// alone, `float4(a, b, c, d)` becomes a constructor call.
#define float2(...) ::msl::detail::make_vec<float, 2>(__VA_ARGS__)
#define float3(...) ::msl::detail::make_vec<float, 3>(__VA_ARGS__)
#define float4(...) ::msl::detail::make_vec<float, 4>(__VA_ARGS__)
#define half2(...) ::msl::detail::make_vec<half, 2>(__VA_ARGS__)
#define half3(...) ::msl::detail::make_vec<half, 3>(__VA_ARGS__)
#define half4(...) ::msl::detail::make_vec<half, 4>(__VA_ARGS__)
#define bfloat2(...) ::msl::detail::make_vec<bfloat, 2>(__VA_ARGS__)
#define bfloat3(...) ::msl::detail::make_vec<bfloat, 3>(__VA_ARGS__)
#define bfloat4(...) ::msl::detail::make_vec<bfloat, 4>(__VA_ARGS__)
#define int2(...) ::msl::detail::make_vec<int, 2>(__VA_ARGS__)
#define int3(...) ::msl::detail::make_vec<int, 3>(__VA_ARGS__)
#define int4(...) ::msl::detail::make_vec<int, 4>(__VA_ARGS__)
#define uint2(...) ::msl::detail::make_vec<uint, 2>(__VA_ARGS__)
#define uint3(...) ::msl::detail::make_vec<uint, 3>(__VA_ARGS__)
#define uint4(...) ::msl::detail::make_vec<uint, 4>(__VA_ARGS__)
#define short2(...) ::msl::detail::make_vec<short, 2>(__VA_ARGS__)
#define short3(...) ::msl::detail::make_vec<short, 3>(__VA_ARGS__)
#define short4(...) ::msl::detail::make_vec<short, 4>(__VA_ARGS__)
#define ushort2(...) ::msl::detail::make_vec<ushort, 2>(__VA_ARGS__)
#define ushort3(...) ::msl::detail::make_vec<ushort, 3>(__VA_ARGS__)
#define ushort4(...) ::msl::detail::make_vec<ushort, 4>(__VA_ARGS__)
#define char2(...) ::msl::detail::make_vec<char, 2>(__VA_ARGS__)
#define char3(...) ::msl::detail::make_vec<char, 3>(__VA_ARGS__)
#define char4(...) ::msl::detail::make_vec<char, 4>(__VA_ARGS__)
#define uchar2(...) ::msl::detail::make_vec<uchar, 2>(__VA_ARGS__)
#define uchar3(...) ::msl::detail::make_vec<uchar, 3>(__VA_ARGS__)
#define uchar4(...) ::msl::detail::make_vec<uchar, 4>(__VA_ARGS__)
#define long2(...) ::msl::detail::make_vec<long, 2>(__VA_ARGS__)
#define long3(...) ::msl::detail::make_vec<long, 3>(__VA_ARGS__)
#define long4(...) ::msl::detail::make_vec<long, 4>(__VA_ARGS__)
#define ulong2(...) ::msl::detail::make_vec<ulong, 2>(__VA_ARGS__)
#define ulong3(...) ::msl::detail::make_vec<ulong, 3>(__VA_ARGS__)
#define ulong4(...) ::msl::detail::make_vec<ulong, 4>(__VA_ARGS__)
#define bool2(...) ::msl::detail::make_vec<bool, 2>(__VA_ARGS__)
#define bool3(...) ::msl::detail::make_vec<bool, 3>(__VA_ARGS__)
#define bool4(...) ::msl::detail::make_vec<bool, 4>(__VA_ARGS__)

// ---------------------------------------------------------------- constants
#define INFINITY __builtin_huge_valf()
#define NAN __builtin_nanf("")
#define HUGE_VALF __builtin_huge_valf()
#define MAXFLOAT 3.40282347e38f
#define FLT_MAX 3.40282347e38f
#define FLT_MIN 1.17549435e-38f
#define FLT_EPSILON 1.1920929e-7f
#define HALF_MAX ((half)65504.0f)
#define HALF_MIN ((half)6.10351562e-05f)
#define M_E_F 2.71828183f
#define M_LOG2E_F 1.44269504f
#define M_LOG10E_F 0.434294482f
#define M_LN2_F 0.693147181f
#define M_LN10_F 2.30258509f
#define M_PI_F 3.14159265f
#define M_PI_2_F 1.57079633f
#define M_PI_4_F 0.785398163f
#define M_1_PI_F 0.318309886f
#define M_2_PI_F 0.636619772f
#define M_2_SQRTPI_F 1.12837917f
#define M_SQRT2_F 1.41421356f
#define M_SQRT1_2_F 0.707106781f

// ---------------------------------------------------------------- builtins & binding
namespace msl { namespace detail {
struct BuiltinArg {
  const uint32_t* v;
  MSL_INLINE operator uint() const { return v[0]; }
  MSL_INLINE operator int() const { return (int)v[0]; }
  MSL_INLINE operator ushort() const { return (ushort)v[0]; }
  // (aliases: `uint2(` would invoke the constructor macro)
  typedef ::uint2 u2;
  typedef ::uint3 u3;
  typedef ::ushort2 us2;
  typedef ::ushort3 us3;
  MSL_INLINE operator u2() const { return uint2(v[0], v[1]); }
  MSL_INLINE operator u3() const { return uint3(v[0], v[1], v[2]); }
  MSL_INLINE operator us2() const { return ushort2(v[0], v[1]); }
  MSL_INLINE operator us3() const { return ushort3(v[0], v[1], v[2]); }
};

#ifdef MSL_STRICT
template <class T> constexpr bool msl_is_buffer_space(__attribute__((address_space(1))) T*) { return true; }
template <class T> constexpr bool msl_is_buffer_space(const __attribute__((address_space(2))) T*) { return true; }
constexpr bool msl_is_buffer_space(...) { return false; }
template <class T> constexpr bool msl_is_tg_space(__attribute__((address_space(3))) T*) { return true; }
constexpr bool msl_is_tg_space(...) { return false; }
#endif

struct BufferArg {
  uint32_t index;
  template <class T> MSL_INLINE operator T*() const {
#ifdef MSL_STRICT
    static_assert(msl_is_buffer_space((T*)nullptr),
                  "[[buffer(i)]] pointer parameters must point to device or constant memory");
#endif
    return (T*)msl_rt_buffer(index, 0, alignof(T), sizeof(T), MSL_SITE());
  }
  template <class T> MSL_INLINE operator T&() const {
#ifdef MSL_STRICT
    static_assert(msl_is_buffer_space((T*)nullptr),
                  "[[buffer(i)]] reference parameters must refer to device or constant memory");
#endif
    return *(T*)msl_rt_buffer(index, sizeof(T), alignof(T), 0, MSL_SITE());
  }
};
struct TgArg {
  uint32_t index;
  template <class T> MSL_INLINE operator T*() const {
#ifdef MSL_STRICT
    static_assert(msl_is_tg_space((T*)nullptr),
                  "[[threadgroup(i)]] parameters must point to threadgroup memory");
#endif
    return (T*)msl_rt_tg_arg(index, alignof(T), MSL_SITE());
  }
};
MSL_INLINE void* tg_static(uint32_t slot, uint64_t size, uint64_t align, const char* name) {
  return msl_rt_tg_static(slot, size, align, name, MSL_SITE());
}
} }
#define MSL_BUILTIN(name) ::msl::detail::BuiltinArg{msl_rt_thread()->name}
#define MSL_BUFFER(i) ::msl::detail::BufferArg{i}
#define MSL_TG_ARG(i) ::msl::detail::TgArg{i}

// ---------------------------------------------------------------- namespace metal
namespace metal {

template <class T> using msl_e = ::msl::detail::elem_t<T>;

// Scalar math happens in float (or double for nothing: MSL has no double);
// half and bfloat results are rounded back by the conversion.
#define MSL_UNARY(name, expr)                                                  \
  template <class T> MSL_INLINE T name(T x) {                                  \
    if constexpr (::msl::detail::is_vec<T>) {                                  \
      T r;                                                                     \
      for (int i = 0; i < ::msl::detail::vec_n<T>; ++i) r[i] = name(msl_e<T>(x[i])); \
      return r;                                                                \
    } else {                                                                   \
      float v = (float)x;                                                      \
      (void)v;                                                                 \
      return (T)(expr);                                                        \
    }                                                                          \
  }
MSL_UNARY(exp, __builtin_expf(v))
MSL_UNARY(exp2, __builtin_exp2f(v))
MSL_UNARY(exp10, __builtin_powf(10.0f, v))
MSL_UNARY(log, __builtin_logf(v))
MSL_UNARY(log2, __builtin_log2f(v))
MSL_UNARY(log10, __builtin_log10f(v))
MSL_UNARY(log1p, __builtin_log1pf(v))
MSL_UNARY(expm1, __builtin_expm1f(v))
MSL_UNARY(sqrt, __builtin_sqrtf(v))
MSL_UNARY(rsqrt, 1.0f / __builtin_sqrtf(v))
MSL_UNARY(sin, __builtin_sinf(v))
MSL_UNARY(cos, __builtin_cosf(v))
MSL_UNARY(tan, __builtin_tanf(v))
MSL_UNARY(tanh, __builtin_tanhf(v))
MSL_UNARY(sinh, __builtin_sinhf(v))
MSL_UNARY(cosh, __builtin_coshf(v))
MSL_UNARY(asin, __builtin_asinf(v))
MSL_UNARY(acos, __builtin_acosf(v))
MSL_UNARY(atan, __builtin_atanf(v))
MSL_UNARY(erf, __builtin_erff(v))
MSL_UNARY(floor, __builtin_floorf(v))
MSL_UNARY(ceil, __builtin_ceilf(v))
MSL_UNARY(round, __builtin_roundf(v))
MSL_UNARY(rint, __builtin_rintf(v))
MSL_UNARY(trunc, __builtin_truncf(v))
MSL_UNARY(fract, v - __builtin_floorf(v))
MSL_UNARY(fabs, __builtin_fabsf(v))
MSL_UNARY(saturate, v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v))
MSL_UNARY(sign, v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f))
#undef MSL_UNARY

template <class T> MSL_INLINE bool isnan(T x) { return __builtin_isnan((float)x); }
template <class T> MSL_INLINE bool isinf(T x) { return __builtin_isinf((float)x); }
template <class T> MSL_INLINE bool isfinite(T x) { return __builtin_isfinite((float)x); }

template <class T> struct msl_id { typedef T type; };
template <class T> using msl_same = typename msl_id<T>::type;

template <class T> MSL_INLINE T abs(T x) {
  if constexpr (::msl::detail::is_vec<T>) {
    T r;
    for (int i = 0; i < ::msl::detail::vec_n<T>; ++i) r[i] = abs(msl_e<T>(x[i]));
    return r;
  } else if constexpr (std::is_integral_v<T>) {
    return x < 0 ? (T)-x : x;
  } else {
    return (T)__builtin_fabsf((float)x);
  }
}
#define MSL_BINARY(name, sexpr)                                                \
  template <class T> MSL_INLINE T name(T a, msl_same<T> b) {                   \
    if constexpr (::msl::detail::is_vec<T>) {                                  \
      T r;                                                                     \
      for (int i = 0; i < ::msl::detail::vec_n<T>; ++i)                        \
        r[i] = name(msl_e<T>(a[i]), msl_e<T>(b[i]));                           \
      return r;                                                                \
    } else {                                                                   \
      return (T)(sexpr);                                                       \
    }                                                                          \
  }
MSL_BINARY(max, (std::is_integral_v<T> ? (a > b ? a : b) : (T)__builtin_fmaxf((float)a, (float)b)))
MSL_BINARY(min, (std::is_integral_v<T> ? (a < b ? a : b) : (T)__builtin_fminf((float)a, (float)b)))
MSL_BINARY(fmax, __builtin_fmaxf((float)a, (float)b))
MSL_BINARY(fmin, __builtin_fminf((float)a, (float)b))
MSL_BINARY(pow, __builtin_powf((float)a, (float)b))
MSL_BINARY(powr, __builtin_powf((float)a, (float)b))
MSL_BINARY(fmod, __builtin_fmodf((float)a, (float)b))
MSL_BINARY(atan2, __builtin_atan2f((float)a, (float)b))
MSL_BINARY(copysign, __builtin_copysignf((float)a, (float)b))
MSL_BINARY(step, (float)b < (float)a ? 0.0f : 1.0f)
#undef MSL_BINARY

template <class T> MSL_INLINE T divide(T a, msl_same<T> b) { return a / b; }
template <class T, int N> using vec = typename ::msl::detail::make_vec_t<T, N>::type;
template <class T> MSL_INLINE T clamp(T x, msl_same<T> lo, msl_same<T> hi) { return min(max(x, lo), hi); }
template <class T> MSL_INLINE T fma(T a, msl_same<T> b, msl_same<T> c) {
  if constexpr (::msl::detail::is_vec<T>) {
    T r;
    for (int i = 0; i < ::msl::detail::vec_n<T>; ++i) r[i] = fma(msl_e<T>(a[i]), msl_e<T>(b[i]), msl_e<T>(c[i]));
    return r;
  } else {
    return (T)__builtin_fmaf((float)a, (float)b, (float)c);
  }
}
template <class T> MSL_INLINE T mix(T a, msl_same<T> b, msl_same<T> t) { return a + (b - a) * t; }
template <class T, class C> MSL_INLINE T select(T a, msl_same<T> b, C c) {
  if constexpr (::msl::detail::is_vec<C>) {
    T r;
    for (int i = 0; i < ::msl::detail::vec_n<T>; ++i) r[i] = c[i] ? b[i] : a[i];
    return r;
  } else {
    return c ? b : a;
  }
}

template <class T> struct numeric_limits;
template <> struct numeric_limits<float> {
  static constexpr float max() { return 3.40282347e38f; }
  static constexpr float min() { return 1.17549435e-38f; }
  static constexpr float lowest() { return -3.40282347e38f; }
  static constexpr float epsilon() { return 1.1920929e-7f; }
  static constexpr float infinity() { return __builtin_huge_valf(); }
  static constexpr float quiet_NaN() { return __builtin_nanf(""); }
};
template <> struct numeric_limits<half> {
  static constexpr half max() { return (half)65504.0f; }
  static constexpr half min() { return (half)6.10351562e-05f; }
  static constexpr half lowest() { return (half)-65504.0f; }
  static constexpr half epsilon() { return (half)0.000976562f; }
  static constexpr half infinity() { return (half)__builtin_huge_valf(); }
  static constexpr half quiet_NaN() { return (half)__builtin_nanf(""); }
};
template <> struct numeric_limits<bfloat> {
  static constexpr bfloat max() { return (bfloat)3.38953139e38f; }
  static constexpr bfloat lowest() { return (bfloat)-3.38953139e38f; }
  static constexpr bfloat infinity() { return (bfloat)__builtin_huge_valf(); }
  static constexpr bfloat quiet_NaN() { return (bfloat)__builtin_nanf(""); }
};
template <> struct numeric_limits<int> {
  static constexpr int max() { return 2147483647; }
  static constexpr int min() { return -2147483647 - 1; }
  static constexpr int lowest() { return -2147483647 - 1; }
};
template <> struct numeric_limits<uint> {
  static constexpr uint max() { return 4294967295u; }
  static constexpr uint min() { return 0; }
  static constexpr uint lowest() { return 0; }
};
template <class T> MSL_INLINE msl_e<T> dot(T a, msl_same<T> b) {
  msl_e<T> s = 0;
  for (int i = 0; i < ::msl::detail::vec_n<T>; ++i) s += a[i] * b[i];
  return s;
}
template <class T> MSL_INLINE msl_e<T> length(T a) { return sqrt(dot(a, a)); }
template <class T> MSL_INLINE bool all(T v) {
  if constexpr (::msl::detail::is_vec<T>) {
    for (int i = 0; i < ::msl::detail::vec_n<T>; ++i) if (!v[i]) return false;
    return true;
  } else { return (bool)v; }
}
template <class T> MSL_INLINE bool any(T v) {
  if constexpr (::msl::detail::is_vec<T>) {
    for (int i = 0; i < ::msl::detail::vec_n<T>; ++i) if (v[i]) return true;
    return false;
  } else { return (bool)v; }
}
template <class T> MSL_INLINE T popcount(T x) { return (T)__builtin_popcountll((unsigned long long)x); }
template <class T> MSL_INLINE T mulhi(T a, T b) {
  return (T)(((__int128)a * (__int128)b) >> (8 * sizeof(T)));
}

template <class To, class From> MSL_INLINE To as_type(From f) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  return __builtin_bit_cast(To, f);
}

namespace fast { using namespace ::metal; }
namespace precise { using namespace ::metal; }

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
