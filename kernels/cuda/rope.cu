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
// One block per token; threads stride over (head, i) pairs of q then k.

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

#define WB_ROPE(T, S)                                                                           \
    extern "C" __global__ void rope_##S(T* q, T* k, const int* positions, const float* cos_sin, \
                                        int max_positions, int q_heads, int kv_heads,           \
                                        int head_dim) {                                         \
        rope_impl<T>(q, k, positions, cos_sin, max_positions, q_heads, kv_heads, head_dim);     \
    }
WB_FOR_EACH_DTYPE(WB_ROPE)
