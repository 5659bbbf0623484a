// rotary.cu: rotary position embedding (RoPE) of the hybrid models' attention layers, HF's
// rotate_half (GPT-NeoX) convention with partial rotation.
#include "common.cuh"

// Most rotated pairs per head: rotary_dim <= 2 * ROPE_MAX_PAIRS (head_dim 256 rotated whole).
#define ROPE_MAX_PAIRS 128

// inv_freq[i] = 1 / theta^(2i / rotary_dim), computed on the host in f32 exactly as the reference
// (rotary.rs `inv_freq`, torch's formula) and passed by value: a kernel parameter (in the
// constant bank, read in place through __grid_constant__), so a launch needs no upload.
struct InvFreq {
    float v[ROPE_MAX_PAIRS];
};

// rotary_embedding_<dtype>
// Reference: rotary.rs `rotary_embedding_slow`. For token t (absolute position
//   p = pos0 + t, as f32) and pair c < half = rotary_dim / 2: a = p * inv_freq[c] (f32),
//   out[c] = x[c] cos a - x[c + half] sin a,  out[c + half] = x[c + half] cos a + x[c] sin a,
//   each product and the sum rounded as the reference does (no FMA contraction); channels
//   rotary_dim.. head_dim pass through. Computed in f32, rounded once to T.
// Arguments:
//   x    (batch, seqlen, n_heads, head_dim) T, strides sb, st, sh (elements), channels
//        contiguous (q or k narrowed out of a fused projection is read in place)
//   out  (batch, seqlen, n_heads, head_dim) T contiguous (output)
//   items = half + head_dim - rotary_dim work items per head row; total = rows * items
// Block layout: 1-D grid of 256-thread blocks, one thread per (head row, item): a rotated pair
//   (two loads, two stores) or a pass-through channel.
// Shared memory: none.
template <typename T>
__device__ void rotary_impl(const T* __restrict__ x, i64 sb, i64 st, i64 sh, T* __restrict__ out,
                            i64 seqlen, i64 n_heads, i64 head_dim, i64 rotary_dim, i64 pos0,
                            const InvFreq& f, i64 items, i64 total) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const i64 row = idx / items, it = idx % items;
    const i64 h = row % n_heads, t = (row / n_heads) % seqlen, b = row / (n_heads * seqlen);
    const T* xr = x + b * sb + t * st + h * sh;
    T* orow = out + row * head_dim;
    const i64 half = rotary_dim / 2;
    if (it < half) {
        const float x1 = to_f32(xr[it]), x2 = to_f32(xr[it + half]);
        const float a = __fmul_rn((float)(pos0 + t), f.v[it]);
        const float c = cosf(a), s = sinf(a);
        orow[it] = from_f32<T>(__fadd_rn(__fmul_rn(x1, c), __fmul_rn(-x2, s)));
        orow[it + half] = from_f32<T>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
    } else {
        const i64 d = rotary_dim + (it - half);
        orow[d] = xr[d];
    }
}

#define ROTARY(SFX, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) rotary_embedding_##SFX(                 \
        const T* x, i64 sb, i64 st, i64 sh, T* out, i64 seqlen, i64 n_heads, i64 head_dim,    \
        i64 rotary_dim, i64 pos0, const __grid_constant__ InvFreq f, i64 items, i64 total) {  \
        rotary_impl<T>(x, sb, st, sh, out, seqlen, n_heads, head_dim, rotary_dim, pos0, f,    \
                       items, total);                                                         \
    }
ROTARY(f32, float)
ROTARY(f16, __half)
ROTARY(bf16, __nv_bfloat16)
