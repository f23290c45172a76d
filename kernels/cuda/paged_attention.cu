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
// fixed, so repeated runs are bit-identical. One block per query head reads
// its kv head's K/V once per query head (group times in all) and a single
// block walks the whole context: slow, but obviously right.
//
// v2 (split-KV, GQA-aware, after flash-decoding): grid (kv_heads, batch,
// splits); each block owns one kv head of one sequence and a contiguous slice
// of its context, and serves all `group` query heads of that kv head, so K and
// V leave HBM once per kv head. Per tile of 64 tokens: the block resolves the
// tile's slots through the block table, computes the group's scores into
// shared memory (16-byte K loads), updates each head's running max and sum,
// and accumulates V (16-byte loads) into registers. With one split the block
// writes the output; with several it writes its unnormalized partial output
// and (max, sum) to a workspace, and paged_attention_merge combines the splits
// with the log-sum-exp rule, in a fixed order (deterministic). The split count
// comes from the host: enough blocks to fill the SMs twice. Needs head_dim a
// multiple of 16/sizeof(T) and group <= 16.

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

// v2's score accumulator: f32 for 16-bit storage; f64 for f32 storage, whose
// check tolerance (1e-5) leaves no room for a 256-term sequential f32 sum
// (an absolute score error e scales every softmax weight by up to 1 + e).
template <typename T> struct Pa2Acc { typedef float type; };
template <> struct Pa2Acc<float> { typedef double type; };

#define PA2_THREADS 128
#define PA2_TILE 64
#define PA2_MAX_G 16
#define PA2_MAX_D 256

template <typename T>
__device__ void paged_attention_v2_impl(T* __restrict__ out, float* __restrict__ part_o,
                                        float* __restrict__ part_ml, const T* __restrict__ q,
                                        const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                        const int* __restrict__ block_tables,
                                        const int* __restrict__ context_lens, float scale,
                                        int q_heads, int kv_heads, int head_dim, int block_size,
                                        int max_blocks_per_seq, int num_blocks, int split_tokens) {
    constexpr int N = Vec16<T>::N;
    // Work items (head, chunk of N dims) per thread: enough for G=16, d=256.
    constexpr int IPT = (PA2_MAX_G * PA2_MAX_D / N + PA2_THREADS - 1) / PA2_THREADS;
    extern __shared__ float smem[];
    const int G = q_heads / kv_heads;
    const int d = head_dim;
    const int qs_stride = d + 4;  // pad rows: heads read the same offsets
    float* q_s = smem;                        // [G][d + 4], q * scale
    float* S = q_s + G * qs_stride;           // [G][TILE] scores, then p
    float* m_s = S + G * PA2_TILE;            // [G] running max
    float* l_s = m_s + G;                     // [G] running sum
    float* c_s = l_s + G;                     // [G] rescale of this tile
    int* slot_s = reinterpret_cast<int*>(c_s + G);  // [TILE] token -> slot
    __shared__ int s_bad;

    const int kvh = blockIdx.x, b = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int tid = threadIdx.x;
    const int ctx_raw = context_lens[b];
    const bool ctx_ok = ctx_raw >= 0 && ctx_raw <= max_blocks_per_seq * block_size;
    const int n = ctx_ok ? ctx_raw : 0;
    const int start = split * split_tokens;
    const int end = min(n, start + split_tokens);
    const int* table = block_tables + (i64)b * max_blocks_per_seq;
    const int row = kv_heads * d;  // elements per cache slot

    for (int i = tid; i < G * d; i += PA2_THREADS) {
        const int h = i / d, j = i - h * d;
        q_s[h * qs_stride + j] = to_f32(q[((i64)b * q_heads + kvh * G + h) * d + j]) * scale;
    }
    if (tid < G) {
        m_s[tid] = WB_NEG_INF;
        l_s[tid] = 0.f;
    }
    if (tid == 0) s_bad = !ctx_ok;
    __syncthreads();

    const int chunks = d / N;
    const int items = G * chunks;
    float acc[IPT][N];
#pragma unroll
    for (int u = 0; u < IPT; ++u)
#pragma unroll
        for (int j = 0; j < N; ++j) acc[u][j] = 0.f;

    for (int t0 = start; t0 < end; t0 += PA2_TILE) {
        const int tt = min(PA2_TILE, end - t0);
        // Slots of this tile's tokens; a bad block id poisons the result.
        for (int t = tid; t < tt; t += PA2_THREADS) {
            const int j = t0 + t;
            const int blk = table[j / block_size];
            if (blk < 0 || blk >= num_blocks) {
                s_bad = 1;
                slot_s[t] = -1;
            } else {
                slot_s[t] = blk * block_size + (j % block_size);
            }
        }
        __syncthreads();
        // Scores: one (token, head) pair per thread and step; threads on the
        // same token load the same K row (one transaction, then L1).
        for (int p = tid; p < tt * G; p += PA2_THREADS) {
            const int t = p / G, h = p - t * G;
            const int slot = slot_s[t];
            float s = WB_NEG_INF;
            if (slot >= 0) {
                const T* kr = k_cache + (i64)slot * row + kvh * d;
                const float* qh = q_s + h * qs_stride;
                typename Pa2Acc<T>::type acc_s = 0;
                for (int c = 0; c < chunks; ++c) {
                    const Vec16<T> kv = load16(kr + c * N);
#pragma unroll
                    for (int j = 0; j < N; ++j)
                        acc_s += (typename Pa2Acc<T>::type)qh[c * N + j] * to_f32(kv.v[j]);
                }
                s = (float)acc_s;
            }
            S[h * PA2_TILE + t] = s;
        }
        __syncthreads();
        // Online softmax update, one warp per head.
        const int warp = tid >> 5, lane = tid & 31;
        for (int h = warp; h < G; h += PA2_THREADS / 32) {
            float* sh = S + h * PA2_TILE;
            float mx = WB_NEG_INF;
            for (int t = lane; t < tt; t += 32) mx = fmaxf(mx, sh[t]);
            mx = warp_max(mx);
            const float m_old = m_s[h];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.f;
            for (int t = lane; t < tt; t += 32) {
                const float pv = sh[t] == WB_NEG_INF ? 0.f : expf(sh[t] - m_new);
                sh[t] = pv;
                sum += pv;
            }
            sum = warp_sum(sum);
            __syncwarp();  // every lane has read m_s[h] before lane 0 rewrites it
            if (lane == 0) {
                const float corr = m_old == WB_NEG_INF ? 0.f : expf(m_old - m_new);
                c_s[h] = corr;
                l_s[h] = l_s[h] * corr + sum;
                m_s[h] = m_new;
            }
        }
        __syncthreads();
        // Accumulate V: each thread owns (head, N-dim chunk) items.
#pragma unroll
        for (int u = 0; u < IPT; ++u) {
            const int it = tid + u * PA2_THREADS;
            if (it < items) {
                const int h = it / chunks, c = it - h * chunks;
                const float corr = c_s[h];
                float a[N];
#pragma unroll
                for (int j = 0; j < N; ++j) a[j] = acc[u][j] * corr;
                const float* ph = S + h * PA2_TILE;
                for (int t = 0; t < tt; ++t) {
                    const int slot = slot_s[t];
                    if (slot < 0) continue;
                    const float pv = ph[t];
                    const Vec16<T> vv = load16(v_cache + (i64)slot * row + kvh * d + c * N);
#pragma unroll
                    for (int j = 0; j < N; ++j) a[j] += pv * to_f32(vv.v[j]);
                }
#pragma unroll
                for (int j = 0; j < N; ++j) acc[u][j] = a[j];
            }
        }
        __syncthreads();  // S and slot_s are rewritten by the next tile
    }

    const bool bad = s_bad != 0;
#pragma unroll
    for (int u = 0; u < IPT; ++u) {
        const int it = tid + u * PA2_THREADS;
        if (it >= items) continue;
        const int h = it / chunks, c = it - h * chunks;
        const int qh = kvh * G + h;
        if (splits == 1) {
            const float l = l_s[h];
            Vec16<T> o;
#pragma unroll
            for (int j = 0; j < N; ++j) o.v[j] = from_f32<T>(bad ? WB_NAN : (l > 0.f ? acc[u][j] / l : 0.f));
            store16(out + ((i64)b * q_heads + qh) * d + c * N, o);
        } else {
            float* po = part_o + (((i64)b * q_heads + qh) * splits + split) * d + c * N;
#pragma unroll
            for (int j = 0; j < N; ++j) po[j] = acc[u][j];
        }
    }
    if (splits > 1 && tid < G) {
        float* ml = part_ml + (((i64)b * q_heads + kvh * G + tid) * splits + split) * 2;
        ml[0] = bad ? WB_NAN : m_s[tid];
        ml[1] = l_s[tid];
    }
}

// Combine the splits of one (sequence, query head): weights exp(m_s - M),
// out = sum_s w_s o_s / sum_s w_s l_s. A NaN max marks a bad input.
template <typename T>
__device__ void paged_attention_merge_impl(T* __restrict__ out, const float* __restrict__ part_o,
                                           const float* __restrict__ part_ml, int q_heads,
                                           int head_dim, int splits) {
    const int h = blockIdx.x, b = blockIdx.y;
    const i64 base = ((i64)b * q_heads + h) * splits;
    float M = WB_NEG_INF;
    bool bad = false;
    for (int s = 0; s < splits; ++s) {
        const float m = part_ml[(base + s) * 2];
        bad |= m != m;
        M = fmaxf(M, m);
    }
    float L = 0.f;
    for (int s = 0; s < splits; ++s) {
        const float m = part_ml[(base + s) * 2];
        if (m != WB_NEG_INF) L += part_ml[(base + s) * 2 + 1] * expf(m - M);
    }
    for (int j = threadIdx.x; j < head_dim; j += blockDim.x) {
        float o = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float m = part_ml[(base + s) * 2];
            if (m != WB_NEG_INF) o += part_o[(base + s) * head_dim + j] * expf(m - M);
        }
        o = bad ? WB_NAN : (L > 0.f ? o / L : 0.f);
        out[((i64)b * q_heads + h) * head_dim + j] = from_f32<T>(o);
    }
}

#define WB_PAGED_ATTENTION_V2(T, S)                                                              \
    extern "C" __global__ void __launch_bounds__(PA2_THREADS) paged_attention_v2_##S(            \
        T* out, float* part_o, float* part_ml, const T* q, const T* k_cache, const T* v_cache,   \
        const int* block_tables, const int* context_lens, float scale, int q_heads,              \
        int kv_heads, int head_dim, int block_size, int max_blocks_per_seq, int num_blocks,      \
        int split_tokens) {                                                                      \
        paged_attention_v2_impl<T>(out, part_o, part_ml, q, k_cache, v_cache, block_tables,      \
                                   context_lens, scale, q_heads, kv_heads, head_dim, block_size, \
                                   max_blocks_per_seq, num_blocks, split_tokens);                \
    }                                                                                            \
    extern "C" __global__ void paged_attention_merge_##S(T* out, const float* part_o,            \
                                                         const float* part_ml, int q_heads,      \
                                                         int head_dim, int splits) {             \
        paged_attention_merge_impl<T>(out, part_o, part_ml, q_heads, head_dim, splits);          \
    }
WB_FOR_EACH_DTYPE(WB_PAGED_ATTENTION_V2)
