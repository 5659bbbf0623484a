// Part of the MSL shim (included by msl_shim.h): metal:: math, constants
// helpers, numeric_limits, fast:: / precise::.
#pragma once
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

template <class T> MSL_INLINE T max3(T a, msl_same<T> b, msl_same<T> c) { return max(max(a, b), c); }
template <class T> MSL_INLINE T min3(T a, msl_same<T> b, msl_same<T> c) { return min(min(a, b), c); }
template <class T> MSL_INLINE T clz(T x) {
  return x == 0 ? (T)(8 * sizeof(T)) : (T)(__builtin_clzll((unsigned long long)x) - 64 + 8 * sizeof(T));
}
template <class T> MSL_INLINE T ctz(T x) { return x == 0 ? (T)(8 * sizeof(T)) : (T)__builtin_ctzll((unsigned long long)x); }
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
}  // namespace metal
