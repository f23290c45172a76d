// paged_attention.cu: decode attention over a paged KV cache (one query token
// per sequence), first correct version: variant v1.
//
// q [batch, q_heads, head_dim]; k_cache, v_cache [num_blocks, block_size,
// kv_heads, head_dim]; block_tables [batch, max_blocks_per_seq] i32;
// context_lens [batch] i32; out [batch, q_heads, head_dim].
//   out[b, h] = sum_j softmax_j(scale * q[b, h] . K[b, j, h / group]) V[b, j, h / group]
// for j < context_lens[b], where token j lives in block
// block_tables[b, j / block_size] at offset j % block_size. GQA: group =
// q_heads / kv_heads. Slots at or past the context length are never read, so
// NaN left in unused cache slots cannot enter a sum (0 * NaN is NaN).
// A context of 0 gives zeros; a block id outside [0, num_blocks) makes that
// head's output NaN instead of reading out of bounds.
//
// Grid (q_heads, batch), 4 warps per block. Warp w takes tokens j = w, w+4, ...;
// lane l holds dims l, l+32, ... (head_dim <= 256). Each warp runs an online
// softmax (running max m, sum l, f32 accumulator); the warps merge through
// shared memory with the usual log-sum-exp rescaling. The order of every sum is
// fixed, so repeated runs are bit-identical. Speed is variant v2's business.

#define PA_WARPS 4
#define PA_MAX_CHUNKS 8  // head_dim <= 32 * 8

template <typename T>
__device__ void paged_attention_v1_impl(T* __restrict__ out, const T* __restrict__ q,
                                        const T* __restrict__ k_cache,
                                        const T* __restrict__ v_cache,
                                        const int* __restrict__ block_tables,
                                        const int* __restrict__ context_lens, float scale,
                                        int q_heads, int kv_heads, int head_dim, int block_size,
                                        int max_blocks_per_seq, int num_blocks) {
    __shared__ float s_m[PA_WARPS];
    __shared__ float s_l[PA_WARPS];
    __shared__ float s_acc[PA_WARPS][32 * PA_MAX_CHUNKS];
    __shared__ int s_bad;

    const int h = blockIdx.x;
    const int b = blockIdx.y;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int kvh = h / (q_heads / kv_heads);
    // A context longer than the block table (or negative) is a caller bug:
    // read nothing and report NaN rather than index past the table.
    const int ctx_raw = context_lens[b];
    const bool ctx_ok = ctx_raw >= 0 && ctx_raw <= max_blocks_per_seq * block_size;
    const int ctx = ctx_ok ? ctx_raw : 0;
    const int* table = block_tables + (i64)b * max_blocks_per_seq;
    if (threadIdx.x == 0) s_bad = 0;
    __syncthreads();  // s_bad is cleared before any warp can set it

    float qr[PA_MAX_CHUNKS];
    const T* qh = q + ((i64)b * q_heads + h) * head_dim;
#pragma unroll
    for (int c = 0; c < PA_MAX_CHUNKS; ++c) {
        const int d = lane + 32 * c;
        qr[c] = d < head_dim ? to_f32(qh[d]) * scale : 0.f;
    }

    float m = WB_NEG_INF, l = 0.f;
    float acc[PA_MAX_CHUNKS];
#pragma unroll
    for (int c = 0; c < PA_MAX_CHUNKS; ++c) acc[c] = 0.f;
    bool bad = !ctx_ok;

    for (int j = warp; j < ctx; j += PA_WARPS) {
        const int blk = table[j / block_size];
        if (blk < 0 || blk >= num_blocks) {
            bad = true;
            continue;
        }
        const i64 slot = (i64)blk * block_size + (j % block_size);
        const i64 off = (slot * kv_heads + kvh) * head_dim;
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < PA_MAX_CHUNKS; ++c) {
            const int d = lane + 32 * c;
            if (d < head_dim) s += qr[c] * to_f32(k_cache[off + d]);
        }
        s = warp_sum(s);
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int c = 0; c < PA_MAX_CHUNKS; ++c) {
            const int d = lane + 32 * c;
            if (d < head_dim) acc[c] = acc[c] * corr + p * to_f32(v_cache[off + d]);
        }
        m = m_new;
    }

    if (bad) s_bad = 1;
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < PA_MAX_CHUNKS; ++c) s_acc[warp][lane + 32 * c] = acc[c];
    __syncthreads();

    // Merge the warps' partial softmaxes: rescale each by exp(m_w - M).
    float M = WB_NEG_INF;
#pragma unroll
    for (int w = 0; w < PA_WARPS; ++w) M = fmaxf(M, s_m[w]);
    float L = 0.f;
    float wgt[PA_WARPS];
#pragma unroll
    for (int w = 0; w < PA_WARPS; ++w) {
        wgt[w] = s_m[w] == WB_NEG_INF ? 0.f : expf(s_m[w] - M);
        L += s_l[w] * wgt[w];
    }
    T* oh = out + ((i64)b * q_heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < PA_WARPS; ++w) o += s_acc[w][d] * wgt[w];
        o = L > 0.f ? o / L : 0.f;
        if (s_bad) o = WB_NAN;
        oh[d] = from_f32<T>(o);
    }
}

#define WB_PAGED_ATTENTION(T, S)                                                                \
    extern "C" __global__ void __launch_bounds__(PA_WARPS * 32)                                 \
        paged_attention_v1_##S(T* out, const T* q, const T* k_cache, const T* v_cache,          \
                               const int* block_tables, const int* context_lens, float scale,   \
                               int q_heads, int kv_heads, int head_dim, int block_size,         \
                               int max_blocks_per_seq, int num_blocks) {                        \
        paged_attention_v1_impl<T>(out, q, k_cache, v_cache, block_tables, context_lens, scale, \
                                   q_heads, kv_heads, head_dim, block_size, max_blocks_per_seq, \
                                   num_blocks);                                                 \
    }
WB_FOR_EACH_DTYPE(WB_PAGED_ATTENTION)
