// embedding.cu: rows of the embedding table for a batch of token ids (the first node of a
// captured decode step, whose ids live in a device buffer the host refills before each replay).
#include "common.cuh"

// embedding_rows_<dtype>
// Reference: `Tensor::index_select(ids, 0)` on the table (model.rs `step`).
// Arguments:
//   table (rows, dim) T contiguous;  ids (B) u32, checked against `rows` by the host
//   out   (B, dim) T contiguous (output)
// Block layout: grid (B), 256 threads striding over dim. An id past the table (a host bug)
//   writes NaN rather than reading out of bounds.
// Shared memory: none.
template <typename T>
__device__ void embedding_rows(const T* __restrict__ table, const unsigned* __restrict__ ids,
                               T* __restrict__ out, i64 rows, i64 dim) {
    pdl_launch_dependents();
    pdl_wait();  // the previous replay's last kernel may still read `out`
    const i64 b = blockIdx.x;
    const i64 id = ids[b];
    for (i64 i = threadIdx.x; i < dim; i += blockDim.x)
        out[b * dim + i] = id < rows ? table[id * dim + i] : from_f32<T>(__int_as_float(0x7fc00000));
}

#define EMBEDDING(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                        \
        NAME(const T* table, const unsigned* ids, T* out, i64 rows, i64 dim) {               \
        embedding_rows<T>(table, ids, out, rows, dim);                                       \
    }
EMBEDDING(embedding_rows_f32, float)
EMBEDDING(embedding_rows_f16, __half)
EMBEDDING(embedding_rows_bf16, __nv_bfloat16)
