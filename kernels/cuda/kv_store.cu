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
// One block per token; threads stride over kv_heads * head_dim elements with
// 16-byte vectors when head_dim allows (the row is contiguous in both places).

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

#define WB_KV_STORE(T, S)                                                                      \
    extern "C" __global__ void kv_store_##S(T* k_cache, T* v_cache, const T* k, const T* v,    \
                                            const i64* slot_mapping, i64 num_slots,            \
                                            int row_elems) {                                   \
        kv_store_impl<T>(k_cache, v_cache, k, v, slot_mapping, num_slots, row_elems);          \
    }
WB_FOR_EACH_DTYPE(WB_KV_STORE)
