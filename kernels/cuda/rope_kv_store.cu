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
// v2: no loop and no 64-bit division (v1's loops compile to 16 slow-path
// calls, kernels/tools/sass_stats.py): a token's work is heads * chunks
// rotation chunks, then kv_row / N vectors of v, one per thread; blocks of
// (columns, R tokens) with the columns split over grid.y when they are many
// (rope.cu v3/v4's launch). The position, slot and data loads are all issued
// before any of them is needed. Vector case only (the launcher sends the
// others to v1); the same roundings as v1, so the results are bit-identical.

// rotate_chunk and add_bias16 live in common.cuh: the fused decode attention
// (paged_attention.cu, v3f) applies the same roundings.

template <typename T>
__device__ __forceinline__ float biased(const T* x, const T* b, int i) {
    return b == nullptr ? to_f32(x[i]) : to_f32(from_f32<T>(to_f32(x[i]) + to_f32(b[i])));
}

// Sources are rows `src_row` elements apart: q at q_src, k at k_src, v at
// v_src (separate buffers, src_row unused per buffer; or one fused q|k|v row
// of the engine's projection). Optional biases (nullptr: none) for q, k, v
// are added before the rotation. Rotated q goes to q_dst [tokens, q_heads,
// head_dim] (which may be q_src itself when q_row == q_heads * head_dim).
template <typename T>
__device__ void rope_kv_store_impl(T* q_dst, const T* q_src, i64 q_row,
                                   const T* __restrict__ k, const T* __restrict__ v, i64 kv_src_row,
                                   const T* q_bias, const T* k_bias, const T* v_bias,
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
    const bool biases_ok = (q_bias == nullptr || (aligned16(q_bias) && aligned16(k_bias) && aligned16(v_bias)));
    const bool vec = half % N == 0 && aligned16(q_dst) && aligned16(q_src) && aligned16(k) && aligned16(v) &&
                     q_row % N == 0 && kv_src_row % N == 0 && biases_ok && aligned16(k_cache) &&
                     aligned16(v_cache) && aligned16(cos_sin);
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
                const T* x = q_src + (i64)t * q_row + h * head_dim;
                const T* b = q_bias == nullptr ? nullptr : q_bias + h * head_dim;
                Vec16<T> a = add_bias16(load16(x + i), b == nullptr ? nullptr : b + i);
                Vec16<T> bb = add_bias16(load16(x + half + i), b == nullptr ? nullptr : b + half + i);
                rotate_chunk(a, bb, cs, i, half, valid);
                T* y = q_dst + ((i64)t * q_heads + h) * head_dim;
                store16(y + i, a);
                store16(y + half + i, bb);
            } else {
                const i64 slot = slot_mapping[t];
                if (slot < 0 || slot >= num_slots) continue;
                const int kh = h - q_heads;
                const T* x = k + (i64)t * kv_src_row + kh * head_dim;
                const T* b = k_bias == nullptr ? nullptr : k_bias + kh * head_dim;
                Vec16<T> a = add_bias16(load16(x + i), b == nullptr ? nullptr : b + i);
                Vec16<T> bb = add_bias16(load16(x + half + i), b == nullptr ? nullptr : b + half + i);
                rotate_chunk(a, bb, cs, i, half, valid);
                T* dst = k_cache + slot * kv_row + kh * head_dim;
                store16(dst + i, a);
                store16(dst + half + i, bb);
            }
        }
        const int vrow = kv_row / N;
        const i64 vtotal = (i64)tokens * vrow;
        for (i64 w = first; w < vtotal; w += stride) {
            const i64 t = w / vrow;
            const int j = (int)(w - t * vrow) * N;
            const i64 slot = slot_mapping[t];
            if (slot < 0 || slot >= num_slots) continue;
            store16(v_cache + slot * kv_row + j,
                    add_bias16(load16(v + t * kv_src_row + j), v_bias == nullptr ? nullptr : v_bias + j));
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
            const T* b;
            T* dst;
            if (h < q_heads) {
                src = q_src + (i64)t * q_row + h * head_dim;
                b = q_bias == nullptr ? nullptr : q_bias + h * head_dim;
                dst = q_dst + ((i64)t * q_heads + h) * head_dim;
            } else {
                const i64 slot = slot_mapping[t];
                if (slot < 0 || slot >= num_slots) continue;
                src = k + (i64)t * kv_src_row + (h - q_heads) * head_dim;
                b = k_bias == nullptr ? nullptr : k_bias + (h - q_heads) * head_dim;
                dst = k_cache + slot * kv_row + (h - q_heads) * head_dim;
            }
            const float x1 = biased(src, b, i), x2 = biased(src, b, i + half);
            dst[i] = from_f32<T>(valid ? x1 * c - x2 * s : WB_NAN);
            dst[i + half] = from_f32<T>(valid ? x2 * c + x1 * s : WB_NAN);
        }
        const i64 vtotal = (i64)tokens * kv_row;
        for (i64 w = first; w < vtotal; w += stride) {
            const i64 t = w / kv_row;
            const int j = (int)(w - t * kv_row);
            const i64 slot = slot_mapping[t];
            if (slot < 0 || slot >= num_slots) continue;
            const T* x = v + t * kv_src_row;
            v_cache[slot * kv_row + j] = v_bias == nullptr ? x[j] : from_f32<T>(biased(x, v_bias, j));
        }
    }
}

template <typename T>
__device__ void rope_kv_store_v2_impl(T* q_dst, const T* q_src, i64 q_row,
                                      const T* __restrict__ k, const T* __restrict__ v, i64 kv_src_row,
                                      const T* q_bias, const T* k_bias, const T* v_bias,
                                      T* __restrict__ k_cache, T* __restrict__ v_cache,
                                      const int* __restrict__ positions,
                                      const float* __restrict__ cos_sin,
                                      const i64* __restrict__ slot_mapping, int max_positions,
                                      i64 num_slots, int tokens, int q_heads, int kv_heads,
                                      int head_dim) {
    constexpr int N = Vec16<T>::N;
    const int t = blockIdx.x * blockDim.y + threadIdx.y;
    if (t >= tokens) return;
    const int half = head_dim / 2;
    const int chunks = half / N;
    const int rot = (q_heads + kv_heads) * chunks;   // rotation chunks of q and k
    const int kv_row = kv_heads * head_dim;
    const int w = blockIdx.y * blockDim.x + threadIdx.x;
    if (w >= rot + kv_row / N) return;
    const i64 slot = slot_mapping[t];
    const bool store = slot >= 0 && slot < num_slots;
    if (w < rot) {
        const int h = w / chunks;
        const int i = (w - h * chunks) * N;
        const bool is_q = h < q_heads;
        const int kh = h - q_heads;
        const T* x = is_q ? q_src + (i64)t * q_row + h * head_dim
                          : k + (i64)t * kv_src_row + kh * head_dim;
        const T* b = is_q ? (q_bias == nullptr ? nullptr : q_bias + h * head_dim)
                          : (k_bias == nullptr ? nullptr : k_bias + kh * head_dim);
        const int pos = positions[t];
        Vec16<T> a = add_bias16(load16(x + i), b == nullptr ? nullptr : b + i);
        Vec16<T> bb = add_bias16(load16(x + half + i), b == nullptr ? nullptr : b + half + i);
        const bool valid = pos >= 0 && pos < max_positions;
        rotate_chunk(a, bb, cos_sin + (i64)(valid ? pos : 0) * head_dim, i, half, valid);
        T* dst;
        if (is_q) {
            dst = q_dst + ((i64)t * q_heads + h) * head_dim;
        } else {
            if (!store) return;
            dst = k_cache + slot * kv_row + kh * head_dim;
        }
        store16(dst + i, a);
        store16(dst + half + i, bb);
    } else {
        const int j = (w - rot) * N;
        const Vec16<T> x =
            add_bias16(load16(v + (i64)t * kv_src_row + j), v_bias == nullptr ? nullptr : v_bias + j);
        if (store) store16(v_cache + slot * kv_row + j, x);
    }
}

#define WB_ROPE_KV_STORE(T, S)                                                                   \
    extern "C" __global__ void rope_kv_store_##S(                                                \
        T* q, const T* k, const T* v, T* k_cache, T* v_cache, const int* positions,              \
        const float* cos_sin, const i64* slot_mapping, int max_positions, i64 num_slots,         \
        int tokens, int q_heads, int kv_heads, int head_dim) {                                   \
        rope_kv_store_impl<T>(q, q, (i64)q_heads * head_dim, k, v, (i64)kv_heads * head_dim,     \
                              nullptr, nullptr, nullptr, k_cache, v_cache, positions, cos_sin,   \
                              slot_mapping, max_positions, num_slots, tokens, q_heads, kv_heads, \
                              head_dim);                                                         \
    }                                                                                            \
    extern "C" __global__ void rope_kv_store_v2_##S(                                             \
        T* q, const T* k, const T* v, T* k_cache, T* v_cache, const int* positions,              \
        const float* cos_sin, const i64* slot_mapping, int max_positions, i64 num_slots,         \
        int tokens, int q_heads, int kv_heads, int head_dim) {                                   \
        rope_kv_store_v2_impl<T>(q, q, (i64)q_heads * head_dim, k, v, (i64)kv_heads * head_dim,  \
                                 nullptr, nullptr, nullptr, k_cache, v_cache, positions,         \
                                 cos_sin, slot_mapping, max_positions, num_slots, tokens,        \
                                 q_heads, kv_heads, head_dim);                                   \
    }
WB_FOR_EACH_DTYPE(WB_ROPE_KV_STORE)

// qkv_rope_kv_store_*: the engine's decode/prefill path straight from its
// fused projection qkv [tokens, qd + 2kd] and bias [qd + 2kd]: q + bias
// rotated into q_out [tokens, qd], k + bias rotated into k_cache, v + bias
// into v_cache. Bit-identical to split_qkv_bias then rope_kv_store (same
// roundings), one launch and one pass instead of two.
#define WB_QKV_ROPE_KV_STORE(T, S)                                                               \
    extern "C" __global__ void qkv_rope_kv_store_##S(                                            \
        T* q_out, const T* qkv, const T* bias, T* k_cache, T* v_cache, const int* positions,     \
        const float* cos_sin, const i64* slot_mapping, int max_positions, i64 num_slots,         \
        int tokens, int q_heads, int kv_heads, int head_dim) {                                   \
        const int qd = q_heads * head_dim, kd = kv_heads * head_dim;                             \
        const i64 row = (i64)qd + 2 * kd;                                                        \
        rope_kv_store_impl<T>(q_out, qkv, row, qkv + qd, qkv + qd + kd, row, bias, bias + qd,    \
                              bias + qd + kd, k_cache, v_cache, positions, cos_sin, slot_mapping, \
                              max_positions, num_slots, tokens, q_heads, kv_heads, head_dim);    \
    }                                                                                            \
    extern "C" __global__ void qkv_rope_kv_store_v2_##S(                                         \
        T* q_out, const T* qkv, const T* bias, T* k_cache, T* v_cache, const int* positions,     \
        const float* cos_sin, const i64* slot_mapping, int max_positions, i64 num_slots,         \
        int tokens, int q_heads, int kv_heads, int head_dim) {                                   \
        const int qd = q_heads * head_dim, kd = kv_heads * head_dim;                             \
        const i64 row = (i64)qd + 2 * kd;                                                        \
        rope_kv_store_v2_impl<T>(q_out, qkv, row, qkv + qd, qkv + qd + kd, row, bias,            \
                                 bias + qd, bias + qd + kd, k_cache, v_cache, positions,         \
                                 cos_sin, slot_mapping, max_positions, num_slots, tokens,        \
                                 q_heads, kv_heads, head_dim);                                   \
    }
WB_FOR_EACH_DTYPE(WB_QKV_ROPE_KV_STORE)
