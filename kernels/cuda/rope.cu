// rope.cu: rotary position embedding, NeoX style (rotate halves), in place.
//
// q [tokens, q_heads, head_dim], k [tokens, kv_heads, head_dim] (both updated
// in place); positions [tokens] i32; cos_sin [max_positions, head_dim] f32,
// each row = cos(p * inv_freq[0..d/2]) | sin(p * inv_freq[0..d/2]) with
// inv_freq[i] = theta^(-2i/d), built once on the host in f64 and stored in f32
// (computing p * inv_freq in f32 loses ~1e-3 rad at p ~ 3e4).
//
// For each head and i < d/2, with x1 = x[i], x2 = x[i + d/2]:
//   x[i]       = x1 * cos - x2 * sin
//   x[i + d/2] = x2 * cos + x1 * sin
// which is HF's `q * cos + rotate_half(q) * sin`.
//
// A position outside [0, max_positions) has no table row: that token's q and k
// are set to NaN so the bad input is loud downstream, and nothing is read out
// of bounds.
//
// v1: one block per token; threads stride over (head, i) pairs of q then k,
//     2-byte loads.
// v2: a grid-stride loop over (token, head, chunk of 16/sizeof(T) pairs):
//     each thread loads 16 bytes from each half of the head and 2 x 16 bytes
//     each of cos and sin, so every access is a full vector (head_dim/2 a
//     multiple of 16/sizeof(T), aligned; otherwise the scalar loop).
// v3: no loop and no 64-bit division: a block is R tokens x (heads * chunks)
//     threads (blockDim = (heads * chunks, R)), one 16-byte chunk of each half
//     per thread; the position and the head's chunks are loaded together, so
//     only the cos/sin row waits on the position. Vector case only (the
//     launcher sends other shapes to v2).
// v4: up to 256 tokens, v3 with a token's chunks split over blocks of at
//     most 128 threads (grid.y), so one token of a 72-head model runs on five
//     SMs instead of one 576-thread block; above, v3's launch.

template <typename T>
__device__ void rope_impl(T* __restrict__ q, T* __restrict__ k, const int* __restrict__ positions,
                          const float* __restrict__ cos_sin, int max_positions, int q_heads,
                          int kv_heads, int head_dim) {
    const int t = blockIdx.x;
    const int half = head_dim / 2;
    const int pos = positions[t];
    const bool valid = pos >= 0 && pos < max_positions;
    const float* cs = cos_sin + (i64)(valid ? pos : 0) * head_dim;
    const int pairs_q = q_heads * half;
    const int pairs = (q_heads + kv_heads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        T* row;
        int pp;
        if (p < pairs_q) {
            pp = p;
            row = q + (i64)t * q_heads * head_dim;
        } else {
            pp = p - pairs_q;
            row = k + (i64)t * kv_heads * head_dim;
        }
        const int h = pp / half;
        const int i = pp - h * half;
        T* x = row + h * head_dim;
        if (!valid) {
            x[i] = from_f32<T>(WB_NAN);
            x[i + half] = from_f32<T>(WB_NAN);
            continue;
        }
        const float c = cs[i];
        const float s = cs[half + i];
        const float x1 = to_f32(x[i]);
        const float x2 = to_f32(x[i + half]);
        x[i] = from_f32<T>(x1 * c - x2 * s);
        x[i + half] = from_f32<T>(x2 * c + x1 * s);
    }
}

template <typename T>
__device__ void rope_v2_impl(T* __restrict__ q, T* __restrict__ k, const int* __restrict__ positions,
                             const float* __restrict__ cos_sin, int max_positions, int tokens,
                             int q_heads, int kv_heads, int head_dim) {
    constexpr int N = Vec16<T>::N;
    const int half = head_dim / 2;
    const int heads = q_heads + kv_heads;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = half % N == 0 && aligned16(q) && aligned16(k) && aligned16(cos_sin);
    if (vec) {
        const int chunks = half / N;
        const i64 total = (i64)tokens * heads * chunks;
        for (i64 w = first; w < total; w += stride) {
            const int c = (int)(w % chunks);
            const i64 th = w / chunks;
            const int h = (int)(th % heads);
            const int t = (int)(th / heads);
            T* x = h < q_heads ? q + ((i64)t * q_heads + h) * head_dim
                               : k + ((i64)t * kv_heads + (h - q_heads)) * head_dim;
            const int pos = positions[t];
            const bool valid = pos >= 0 && pos < max_positions;
            const int i = c * N;
            Vec16<T> a = load16(x + i), b = load16(x + half + i);
            rotate_chunk(a, b, cos_sin + (i64)(valid ? pos : 0) * head_dim, i, half, valid);
            store16(x + i, a);
            store16(x + half + i, b);
        }
    } else {
        const i64 total = (i64)tokens * heads * half;
        for (i64 w = first; w < total; w += stride) {
            const int i = (int)(w % half);
            const i64 th = w / half;
            const int h = (int)(th % heads);
            const int t = (int)(th / heads);
            T* x = h < q_heads ? q + ((i64)t * q_heads + h) * head_dim
                               : k + ((i64)t * kv_heads + (h - q_heads)) * head_dim;
            const int pos = positions[t];
            if (pos < 0 || pos >= max_positions) {
                x[i] = x[i + half] = from_f32<T>(WB_NAN);
                continue;
            }
            const float* cs = cos_sin + (i64)pos * head_dim;
            const float c = cs[i], s = cs[half + i];
            const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
            x[i] = from_f32<T>(x1 * c - x2 * s);
            x[i + half] = from_f32<T>(x2 * c + x1 * s);
        }
    }
}

template <typename T, bool SPLIT>
__device__ void rope_v3_impl(T* __restrict__ q, T* __restrict__ k, const int* __restrict__ positions,
                             const float* __restrict__ cos_sin, int max_positions, int tokens,
                             int q_heads, int kv_heads, int head_dim) {
    constexpr int N = Vec16<T>::N;
    const int t = blockIdx.x * blockDim.y + threadIdx.y;
    if (t >= tokens) return;
    const int half = head_dim / 2;
    const unsigned chunks = half / N;
    // v3: the block spans the token's chunks; v4: grid.y splits them.
    const unsigned w = SPLIT ? blockIdx.y * blockDim.x + threadIdx.x : threadIdx.x;
    if (SPLIT && w >= (q_heads + kv_heads) * chunks) return;
    const int h = w / chunks;
    const int i = (w - h * chunks) * N;
    T* x = h < q_heads ? q + ((i64)t * q_heads + h) * head_dim
                       : k + ((i64)t * kv_heads + (h - q_heads)) * head_dim;
    const int pos = positions[t];
    Vec16<T> a = load16(x + i), b = load16(x + half + i);
    const bool valid = pos >= 0 && pos < max_positions;
    rotate_chunk(a, b, cos_sin + (i64)(valid ? pos : 0) * head_dim, i, half, valid);
    store16(x + i, a);
    store16(x + half + i, b);
}

#define WB_ROPE(T, S)                                                                           \
    extern "C" __global__ void rope_##S(T* q, T* k, const int* positions, const float* cos_sin, \
                                        int max_positions, int q_heads, int kv_heads,           \
                                        int head_dim) {                                         \
        rope_impl<T>(q, k, positions, cos_sin, max_positions, q_heads, kv_heads, head_dim);     \
    }                                                                                           \
    extern "C" __global__ void rope_v2_##S(T* q, T* k, const int* positions,                    \
                                           const float* cos_sin, int max_positions, int tokens, \
                                           int q_heads, int kv_heads, int head_dim) {           \
        rope_v2_impl<T>(q, k, positions, cos_sin, max_positions, tokens, q_heads, kv_heads,     \
                        head_dim);                                                              \
    }                                                                                           \
    extern "C" __global__ void rope_v3_##S(T* q, T* k, const int* positions,                    \
                                           const float* cos_sin, int max_positions, int tokens, \
                                           int q_heads, int kv_heads, int head_dim) {           \
        rope_v3_impl<T, false>(q, k, positions, cos_sin, max_positions, tokens, q_heads,       \
                               kv_heads, head_dim);                                             \
    }                                                                                           \
    extern "C" __global__ void rope_v4_##S(T* q, T* k, const int* positions,                    \
                                           const float* cos_sin, int max_positions, int tokens, \
                                           int q_heads, int kv_heads, int head_dim) {           \
        rope_v3_impl<T, true>(q, k, positions, cos_sin, max_positions, tokens, q_heads,         \
                              kv_heads, head_dim);                                              \
    }
WB_FOR_EACH_DTYPE(WB_ROPE)
