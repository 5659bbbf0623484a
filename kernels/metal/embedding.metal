// Embedding lookup of a decode step or a prompt: rows of the token-embedding table gathered
// into the residual stream.
//   out[i, c] = table[ids[i], c]   (ids past the table: zeros; the model checks ids first)
// Reference: mamba2_ops::embedding::embedding_slow (index_select).
// T is float, half or bfloat; values are copied, not converted.
// Kernels are named `embedding_gather_<f32|f16|bf16>`.
// Memory: n * d elements read and written; no threadgroup memory.
#include <metal_stdlib>
using namespace metal;

// Mirrors mamba2_ops::metal_params::EmbeddingParams.
struct EmbeddingParams {
    uint n;      // ids
    uint d;      // row length
    uint vocab;  // table rows
};

// embedding_gather_<dtype>
// Arguments:
//   ids   [[buffer(0)]] (n) uint
//   table [[buffer(1)]] (vocab, d) T, contiguous
//   out   [[buffer(2)]] (n, d) T
//   p     [[buffer(3)]] EmbeddingParams
// Grid: 2D, x over the d columns, y over the ids; threads past either end return. Any
// threadgroup shape (the host uses (min(256, d rounded up to 32)), 1)).
template <typename T>
kernel void embedding_gather(
    device const uint* ids [[buffer(0)]],
    device const T* table [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant EmbeddingParams& p [[buffer(3)]],
    uint2 gid [[thread_position_in_grid]]) {
    const uint c = gid.x;
    const uint i = gid.y;
    if (c >= p.d || i >= p.n) {
        return;
    }
    const uint id = ids[i];
    out[(ulong)i * p.d + c] = id < p.vocab ? table[(ulong)id * p.d + c] : T(0.0f);
}

typedef decltype(embedding_gather<float>) embedding_gather_f32_t;
typedef decltype(embedding_gather<half>) embedding_gather_f16_t;
template [[host_name("embedding_gather_f32")]] kernel embedding_gather_f32_t embedding_gather<float>;
template [[host_name("embedding_gather_f16")]] kernel embedding_gather_f16_t embedding_gather<half>;
// bfloat needs MSL 3.1 (macOS 14).
#if !defined(__METAL_VERSION__) || __METAL_VERSION__ >= 310
typedef decltype(embedding_gather<bfloat>) embedding_gather_bf16_t;
template [[host_name("embedding_gather_bf16")]] kernel embedding_gather_bf16_t embedding_gather<bfloat>;
#endif
