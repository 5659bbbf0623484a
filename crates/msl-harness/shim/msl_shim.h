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

#include "msl_math.h"
#include "msl_sync.h"
