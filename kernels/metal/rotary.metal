// Rotary position embedding (RoPE) of the attention layers: HF's `rotate_half` (GPT-NeoX)
// convention with partial rotation (the first rotary_dim channels of each head; Bamba rotates
// half of each head). For token t at absolute position pos = position_offset + t and pair
// c < rotary_dim / 2:
//   angle = float(pos) * inv_freq[c]      (f32, inv_freq from the host: torch's f32 formula)
//   out[c]        = x[c] cos(angle) - x[c + half] sin(angle)
//   out[c + half] = x[c + half] cos(angle) + x[c] sin(angle)
// and out[d] = x[d] for d >= rotary_dim. Activations T are float, half or bfloat; arithmetic is
// f32 (precise::cos/sin: angles reach position x 1 rad), rounded once to T.
// Kernels are named `rotary_embedding_<f32|f16|bf16>`.
#include <metal_stdlib>
using namespace metal;

// Mirrors mamba2_ops::metal_params::RotaryParams.
struct RotaryParams {
    uint batch;
    uint seqlen;
    uint n_heads;
    uint head_dim;
    uint rotary_dim;
    uint position_offset;
    uint x_sb;  // strides of x in elements: batch, token, head (channels are unit-stride)
    uint x_st;
    uint x_sh;
};

// rotary_embedding_<dtype>
// Reference: mamba2_ops::rotary::rotary_embedding_slow.
// Arguments:
//   x         [[buffer(0)]] (batch, seqlen, n_heads, head_dim) T, strided (unit channel stride)
//   inv_freq  [[buffer(1)]] (rotary_dim / 2) f32: 1 / theta^(2c / rotary_dim)
//   out       [[buffer(2)]] (batch, seqlen, n_heads, head_dim) T, contiguous
//   p         [[buffer(3)]] RotaryParams
// Grid: 2D, x over the rotary_dim / 2 + (head_dim - rotary_dim) work items of a head (one per
// rotated pair, then one per pass-through channel), y over the batch * seqlen * n_heads rows;
// threads past either end return. Any threadgroup shape (the host uses (tx, 256 / tx) with tx
// = min(256, items rounded up to 32)). Threadgroup memory: none.
template <typename T>
kernel void rotary_embedding(
    device const T* x [[buffer(0)]],
    device const float* inv_freq [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant RotaryParams& p [[buffer(3)]],
    uint2 gid [[thread_position_in_grid]]) {
    const uint hr = p.rotary_dim / 2;
    const uint items = hr + (p.head_dim - p.rotary_dim);
    const uint c = gid.x;
    const ulong row = gid.y;
    const ulong rows = (ulong)p.batch * p.seqlen * p.n_heads;
    if (c >= items || row >= rows) {
        return;
    }
    const uint h = row % p.n_heads;
    const uint t = (row / p.n_heads) % p.seqlen;
    const uint b = row / ((ulong)p.n_heads * p.seqlen);
    device const T* src = x + (ulong)b * p.x_sb + (ulong)t * p.x_st + (ulong)h * p.x_sh;
    device T* dst = out + row * p.head_dim;
    if (c < hr) {
        const float angle = float(p.position_offset + t) * inv_freq[c];
        const float cs = precise::cos(angle);
        const float sn = precise::sin(angle);
        const float x1 = float(src[c]);
        const float x2 = float(src[c + hr]);
        dst[c] = T(x1 * cs - x2 * sn);
        dst[c + hr] = T(x2 * cs + x1 * sn);
    } else {
        const uint d = p.rotary_dim + (c - hr);
        dst[d] = src[d];
    }
}

typedef decltype(rotary_embedding<float>) rotary_embedding_f32_t;
typedef decltype(rotary_embedding<half>) rotary_embedding_f16_t;
template [[host_name("rotary_embedding_f32")]] kernel rotary_embedding_f32_t rotary_embedding<float>;
template [[host_name("rotary_embedding_f16")]] kernel rotary_embedding_f16_t rotary_embedding<half>;
// bfloat needs MSL 3.1 (macOS 14).
#if !defined(__METAL_VERSION__) || __METAL_VERSION__ >= 310
typedef decltype(rotary_embedding<bfloat>) rotary_embedding_bf16_t;
template [[host_name("rotary_embedding_bf16")]] kernel rotary_embedding_bf16_t rotary_embedding<bfloat>;
#endif
