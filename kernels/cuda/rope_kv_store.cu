// rope_kv_store.cu: RoPE on q and k, then k and v written into the paged KV
// cache, in one pass (the prefill path of the engine).
//
// q [tokens, q_heads, head_dim] is rotated in place; k [tokens, kv_heads,
// head_dim] is rotated on the fly and written only to k_cache (the k buffer
// is left as it was: attention reads keys from the cache); v [tokens,
// kv_heads, head_dim] is copied to v_cache. Caches [num_blocks, block_size,
// kv_heads, head_dim], addressed as [num_slots, kv_heads, head_dim] at
// slot_mapping [tokens] (i64; negative = do not store, q is still rotated).
// positions [tokens] i32 and cos_sin [max_positions, head_dim] f32 as in
// rope.cu; an out-of-range position makes that token's q and stored k NaN.
//
// Bytes: read q, k, v once; write q, k_cache, v_cache once. The unfused pair
// (rope then kv_store) also writes k back and reads it again.
//
// v1: two grid-stride loops in one launch: (token, q or k head, chunk of
// 16/sizeof(T) rotation pairs) with 16-byte loads of both halves and float4
// cos/sin, then (token, 16-byte vector of v). A scalar loop covers head dims
// whose half is not a multiple of the vector width.

template <typename T>
__device__ __forceinline__ void rotate_chunk(Vec16<T>& a, Vec16<T>& b, const float* cs, int i, int half,
                                             bool valid) {
    constexpr int N = Vec16<T>::N;
    if (!valid) {
#pragma unroll
        for (int j = 0; j < N; ++j) a.v[j] = b.v[j] = from_f32<T>(WB_NAN);
        return;
    }
    float cv[N], sv[N];
#pragma unroll
    for (int j = 0; j < N; j += 4) {
        *reinterpret_cast<float4*>(cv + j) = *reinterpret_cast<const float4*>(cs + i + j);
        *reinterpret_cast<float4*>(sv + j) = *reinterpret_cast<const float4*>(cs + half + i + j);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const float x1 = to_f32(a.v[j]), x2 = to_f32(b.v[j]);
        a.v[j] = from_f32<T>(x1 * cv[j] - x2 * sv[j]);
        b.v[j] = from_f32<T>(x2 * cv[j] + x1 * sv[j]);
    }
}

template <typename T>
__device__ void rope_kv_store_impl(T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                   T* __restrict__ k_cache, T* __restrict__ v_cache,
                                   const int* __restrict__ positions, const float* __restrict__ cos_sin,
                                   const i64* __restrict__ slot_mapping, int max_positions, i64 num_slots,
                                   int tokens, int q_heads, int kv_heads, int head_dim) {
    constexpr int N = Vec16<T>::N;
    const int half = head_dim / 2;
    const int heads = q_heads + kv_heads;
    const int kv_row = kv_heads * head_dim;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = half % N == 0 && aligned16(q) && aligned16(k) && aligned16(v) &&
                     aligned16(k_cache) && aligned16(v_cache) && aligned16(cos_sin);
    if (vec) {
        const int chunks = half / N;
        const i64 total = (i64)tokens * heads * chunks;
        for (i64 w = first; w < total; w += stride) {
            const int c = (int)(w % chunks);
            const i64 th = w / chunks;
            const int h = (int)(th % heads);
            const int t = (int)(th / heads);
            const int pos = positions[t];
            const bool valid = pos >= 0 && pos < max_positions;
            const float* cs = cos_sin + (i64)(valid ? pos : 0) * head_dim;
            const int i = c * N;
            if (h < q_heads) {
                T* x = q + ((i64)t * q_heads + h) * head_dim;
                Vec16<T> a = load16(x + i), b = load16(x + half + i);
                rotate_chunk(a, b, cs, i, half, valid);
                store16(x + i, a);
                store16(x + half + i, b);
            } else {
                const i64 slot = slot_mapping[t];
                if (slot < 0 || slot >= num_slots) continue;
                const int kh = h - q_heads;
                const T* x = k + (i64)t * kv_row + kh * head_dim;
                Vec16<T> a = load16(x + i), b = load16(x + half + i);
                rotate_chunk(a, b, cs, i, half, valid);
                T* dst = k_cache + slot * kv_row + kh * head_dim;
                store16(dst + i, a);
                store16(dst + half + i, b);
            }
        }
        const int vrow = kv_row / N;
        const i64 vtotal = (i64)tokens * vrow;
        for (i64 w = first; w < vtotal; w += stride) {
            const i64 t = w / vrow;
            const int j = (int)(w - t * vrow) * N;
            const i64 slot = slot_mapping[t];
            if (slot < 0 || slot >= num_slots) continue;
            store16(v_cache + slot * kv_row + j, load16(v + t * kv_row + j));
        }
    } else {
        const i64 total = (i64)tokens * heads * half;
        for (i64 w = first; w < total; w += stride) {
            const int i = (int)(w % half);
            const i64 th = w / half;
            const int h = (int)(th % heads);
            const int t = (int)(th / heads);
            const int pos = positions[t];
            const bool valid = pos >= 0 && pos < max_positions;
            const float* cs = cos_sin + (i64)(valid ? pos : 0) * head_dim;
            const float c = cs[i], s = cs[half + i];
            const T* src;
            T* dst;
            if (h < q_heads) {
                dst = q + ((i64)t * q_heads + h) * head_dim;
                src = dst;
            } else {
                const i64 slot = slot_mapping[t];
                if (slot < 0 || slot >= num_slots) continue;
                src = k + (i64)t * kv_row + (h - q_heads) * head_dim;
                dst = k_cache + slot * kv_row + (h - q_heads) * head_dim;
            }
            const float x1 = to_f32(src[i]), x2 = to_f32(src[i + half]);
            dst[i] = from_f32<T>(valid ? x1 * c - x2 * s : WB_NAN);
            dst[i + half] = from_f32<T>(valid ? x2 * c + x1 * s : WB_NAN);
        }
        const i64 vtotal = (i64)tokens * kv_row;
        for (i64 w = first; w < vtotal; w += stride) {
            const i64 t = w / kv_row;
            const int j = (int)(w - t * kv_row);
            const i64 slot = slot_mapping[t];
            if (slot < 0 || slot >= num_slots) continue;
            v_cache[slot * kv_row + j] = v[w];
        }
    }
}

#define WB_ROPE_KV_STORE(T, S)                                                                   \
    extern "C" __global__ void rope_kv_store_##S(                                                \
        T* q, const T* k, const T* v, T* k_cache, T* v_cache, const int* positions,              \
        const float* cos_sin, const i64* slot_mapping, int max_positions, i64 num_slots,         \
        int tokens, int q_heads, int kv_heads, int head_dim) {                                   \
        rope_kv_store_impl<T>(q, k, v, k_cache, v_cache, positions, cos_sin, slot_mapping,       \
                              max_positions, num_slots, tokens, q_heads, kv_heads, head_dim);    \
    }
WB_FOR_EACH_DTYPE(WB_ROPE_KV_STORE)
