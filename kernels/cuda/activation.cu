// activation.cu: the MLP activations of the hybrid models (Granite-4.0-H, Falcon-H1, Bamba:
// SwiGLU of a fused [gate | up] projection; Nemotron-H: squared ReLU).
#include "common.cuh"

// Elements per 16-byte vector of T: 4 for f32, 8 for f16/bf16.
template <typename T> struct Vec16 {
    static constexpr int N = 16 / sizeof(T);
    struct alignas(16) Type { T v[N]; };
};

// swiglu_<dtype>
// Reference: activation.rs `swiglu_slow`: y = silu(gate) * up, x = [gate | up] along the last
//   dimension, in f32 (silu(g) = g / (1 + exp(-g))), rounded once to T.
// Arguments:
//   x  (rows, 2n) T: row (i0, i1) (rows = r0 * r1, the flattened leading dims) at
//      i0 * xs0 + i1 * xs1, its 2n channels contiguous (a view of a wider projection is read in
//      place);  y (rows, n) T contiguous (output)
//   vec = 1: n, xs0, xs1 multiples of 16 / sizeof(T) and x 16-byte aligned (checked on the
//      host): each thread takes one 16-byte vector of gate and of up; else one element.
// Block layout: 1-D grid of 256-thread blocks over rows * (n / per_thread) work items, each a
//   run of `per_thread` consecutive outputs of one row (coalesced along the row).
// Shared memory: none.
template <typename T>
__device__ void swiglu_impl(const T* __restrict__ x, i64 xs0, i64 xs1, T* __restrict__ y, i64 r1,
                            i64 n, i64 rows, int vec) {
    constexpr int N = Vec16<T>::N;
    typedef typename Vec16<T>::Type V;
    const i64 per = vec ? N : 1;
    const i64 chunks = n / per;
    const i64 item = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (item >= rows * chunks) return;
    const i64 row = item / chunks, c = (item % chunks) * per;
    const T* xr = x + (row / r1) * xs0 + (row % r1) * xs1;
    T* yr = y + row * n;
    if (vec) {
        const V g = *reinterpret_cast<const V*>(xr + c);
        const V u = *reinterpret_cast<const V*>(xr + n + c);
        V o;
#pragma unroll
        for (int e = 0; e < N; ++e) o.v[e] = from_f32<T>(silu_f(to_f32(g.v[e])) * to_f32(u.v[e]));
        *reinterpret_cast<V*>(yr + c) = o;
    } else {
        yr[c] = from_f32<T>(silu_f(to_f32(xr[c])) * to_f32(xr[n + c]));
    }
}

// relu_squared_<dtype>
// Reference: activation.rs `relu_squared_slow`: y = max(x, 0)^2 in f32, rounded once to T.
// Arguments:
//   x  (rows, dim) T, row (i0, i1) at i0 * xs0 + i1 * xs1 (as swiglu), channels contiguous
//   y  (rows, dim) T contiguous (output)
//   vec = 1: dim, xs0, xs1 multiples of 16 / sizeof(T) and x 16-byte aligned: one 16-byte
//      vector per thread; else one element.
// Block layout: 1-D grid of 256-thread blocks over rows * (dim / per_thread) work items.
// Shared memory: none.
template <typename T>
__device__ void relu_squared_impl(const T* __restrict__ x, i64 xs0, i64 xs1, T* __restrict__ y,
                                  i64 r1, i64 dim, i64 rows, int vec) {
    constexpr int N = Vec16<T>::N;
    typedef typename Vec16<T>::Type V;
    const i64 per = vec ? N : 1;
    const i64 chunks = dim / per;
    const i64 item = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (item >= rows * chunks) return;
    const i64 row = item / chunks, c = (item % chunks) * per;
    const T* xr = x + (row / r1) * xs0 + (row % r1) * xs1;
    T* yr = y + row * dim;
    if (vec) {
        const V a = *reinterpret_cast<const V*>(xr + c);
        V o;
#pragma unroll
        for (int e = 0; e < N; ++e) {
            const float p = fmaxf(to_f32(a.v[e]), 0.0f);
            o.v[e] = from_f32<T>(p * p);
        }
        *reinterpret_cast<V*>(yr + c) = o;
    } else {
        const float p = fmaxf(to_f32(xr[c]), 0.0f);
        yr[c] = from_f32<T>(p * p);
    }
}

#define ACTIVATIONS(SFX, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        swiglu_##SFX(const T* x, i64 xs0, i64 xs1, T* y, i64 r1, i64 n, i64 rows, int vec) {  \
        swiglu_impl<T>(x, xs0, xs1, y, r1, n, rows, vec);                                     \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) relu_squared_##SFX(                     \
        const T* x, i64 xs0, i64 xs1, T* y, i64 r1, i64 dim, i64 rows, int vec) {             \
        relu_squared_impl<T>(x, xs0, xs1, y, r1, dim, rows, vec);                             \
    }
ACTIVATIONS(f32, float)
ACTIVATIONS(f16, __half)
ACTIVATIONS(bf16, __nv_bfloat16)
