// kv_store.cu: write the new tokens' keys and values into the paged KV cache.
//
// k, v [tokens, kv_heads, head_dim]; k_cache, v_cache [num_blocks, block_size,
// kv_heads, head_dim]; slot_mapping [tokens] i64, slot = block * block_size +
// offset. Because a block's slots are contiguous, the cache is addressed as
// [num_slots, kv_heads, head_dim] and slot s starts at s * kv_heads * head_dim.
// A negative slot means "skip this token" (padding in a CUDA-graph batch). A
// slot >= num_slots is a caller bug the launcher cannot see on the host; it is
// skipped rather than written out of bounds.
//
// v1: one block per token; threads stride over kv_heads * head_dim elements
//     with 16-byte vectors when head_dim allows (the row is contiguous in both
//     places). Small rows (Qwen2-0.5B: 2 x 64) leave most of a block idle.
// v2: one grid-stride loop over (token, 16-byte vector) for k and v together:
//     every thread busy, the grid sized to the work.
// v3: no loop: a block is R tokens x (row_elems / N) threads (blockDim =
//     (row_elems / N, R)), one 16-byte vector of k and one of v per thread,
//     both loaded before the slot is known, so the slot's latency overlaps the
//     data's instead of preceding it. Vector case only (the launcher sends
//     other shapes to v1).

template <typename T>
__device__ void kv_store_impl(T* __restrict__ k_cache, T* __restrict__ v_cache,
                              const T* __restrict__ k, const T* __restrict__ v,
                              const i64* __restrict__ slot_mapping, i64 num_slots, int row_elems) {
    const int t = blockIdx.x;
    const i64 slot = slot_mapping[t];
    if (slot < 0 || slot >= num_slots) return;
    const T* ks = k + (i64)t * row_elems;
    const T* vs = v + (i64)t * row_elems;
    T* kd = k_cache + slot * row_elems;
    T* vd = v_cache + slot * row_elems;
    constexpr int N = Vec16<T>::N;
    if (row_elems % N == 0 && aligned16(k) && aligned16(v) && aligned16(k_cache) &&
        aligned16(v_cache)) {
        for (int i = threadIdx.x * N; i < row_elems; i += blockDim.x * N) {
            store16(kd + i, load16(ks + i));
            store16(vd + i, load16(vs + i));
        }
    } else {
        for (int i = threadIdx.x; i < row_elems; i += blockDim.x) {
            kd[i] = ks[i];
            vd[i] = vs[i];
        }
    }
}

template <typename T>
__device__ void kv_store_v2_impl(T* __restrict__ k_cache, T* __restrict__ v_cache,
                                 const T* __restrict__ k, const T* __restrict__ v,
                                 const i64* __restrict__ slot_mapping, i64 num_slots, i64 tokens,
                                 int row_elems) {
    constexpr int N = Vec16<T>::N;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row_elems % N == 0 && aligned16(k) && aligned16(v) && aligned16(k_cache) &&
        aligned16(v_cache)) {
        const int per_row = row_elems / N;
        const i64 total = tokens * per_row;
        for (i64 w = first; w < total; w += stride) {
            const i64 t = w / per_row;
            const int j = (int)(w - t * per_row) * N;
            const i64 slot = slot_mapping[t];
            if (slot < 0 || slot >= num_slots) continue;
            store16(k_cache + slot * row_elems + j, load16(k + t * row_elems + j));
            store16(v_cache + slot * row_elems + j, load16(v + t * row_elems + j));
        }
    } else {
        const i64 total = tokens * row_elems;
        for (i64 w = first; w < total; w += stride) {
            const i64 t = w / row_elems;
            const int j = (int)(w - t * row_elems);
            const i64 slot = slot_mapping[t];
            if (slot < 0 || slot >= num_slots) continue;
            k_cache[slot * row_elems + j] = k[w];
            v_cache[slot * row_elems + j] = v[w];
        }
    }
}

template <typename T>
__device__ void kv_store_v3_impl(T* __restrict__ k_cache, T* __restrict__ v_cache,
                                 const T* __restrict__ k, const T* __restrict__ v,
                                 const i64* __restrict__ slot_mapping, i64 num_slots, int tokens,
                                 int row_elems) {
    constexpr int N = Vec16<T>::N;
    const int t = blockIdx.x * blockDim.y + threadIdx.y;
    if (t >= tokens) return;
    const int j = threadIdx.x * N;
    const i64 src = (i64)t * row_elems + j;
    const Vec16<T> kv = load16(k + src), vv = load16(v + src);
    const i64 slot = slot_mapping[t];
    if (slot < 0 || slot >= num_slots) return;
    store16(k_cache + slot * row_elems + j, kv);
    store16(v_cache + slot * row_elems + j, vv);
}

#define WB_KV_STORE(T, S)                                                                      \
    extern "C" __global__ void kv_store_##S(T* k_cache, T* v_cache, const T* k, const T* v,    \
                                            const i64* slot_mapping, i64 num_slots,            \
                                            int row_elems) {                                   \
        kv_store_impl<T>(k_cache, v_cache, k, v, slot_mapping, num_slots, row_elems);          \
    }                                                                                          \
    extern "C" __global__ void kv_store_v2_##S(T* k_cache, T* v_cache, const T* k, const T* v, \
                                               const i64* slot_mapping, i64 num_slots,         \
                                               i64 tokens, int row_elems) {                    \
        kv_store_v2_impl<T>(k_cache, v_cache, k, v, slot_mapping, num_slots, tokens,           \
                            row_elems);                                                        \
    }                                                                                          \
    extern "C" __global__ void kv_store_v3_##S(T* k_cache, T* v_cache, const T* k, const T* v, \
                                               const i64* slot_mapping, i64 num_slots,         \
                                               int tokens, int row_elems) {                    \
        kv_store_v3_impl<T>(k_cache, v_cache, k, v, slot_mapping, num_slots, tokens,           \
                            row_elems);                                                        \
    }
WB_FOR_EACH_DTYPE(WB_KV_STORE)
