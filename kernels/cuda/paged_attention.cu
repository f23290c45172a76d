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
// head's output NaN instead of reading out of bounds. A NaN in q or in a
// live token's K/V gives NaN (every variant divides by the softmax sum
// unless it is exactly 0: a NaN sum is never turned into a 0 output).
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
//
// v3 (tensor cores + cp.async pipeline, after FlashAttention-2 and
// flash-decoding): v2 was 4-13x slower than FlashInfer because each thread
// walked a K row with one 16-byte load at a time (few bytes in flight), the V
// loop was serial over tokens, scores went through shared memory and every
// product ran on CUDA cores. v3 keeps v2's grid (kv head, sequence, split) and
// its merge kernel, but inside a block each of 4 warps owns every 4th chunk of
// 16 tokens of the split and streams its chunks' K and V rows into its own
// 3-stage (2 for head_dim > 128) shared-memory ring with 16-byte cp.async.cg,
// resolving each token's slot through the block table one chunk ahead, so
// several chunks per warp are in flight while it computes. The query group,
// padded to 16 rows with zeros, is the A operand of mma.m16n8k16 (bf16 or
// f16, f32 accumulators), held in registers; S = Q K^T takes its B fragments
// from K with ldmatrix, the online softmax runs on the accumulator fragments
// in registers (quad shuffles, exp2 of log2e-scaled scores), and P, rounded
// to the storage type, becomes the A operand of P V with V fragments from
// ldmatrix.trans (FlashAttention-2's register reuse). Masked tokens get score
// -inf and zero-filled K/V rows (cp.async with source size 0), so NaN in
// unused slots cannot reach a sum. The warps merge (max, sum, accumulator)
// through shared memory in a fixed order at the end of the split. Head dims
// 32, 64, 80, 96, 128, 256; f32 storage, other head dims and unaligned
// buffers are dispatched by the launcher to v2 (or v1), since tensor cores
// cannot keep f32's accuracy. Split plan: one resident wave of blocks
// (occupancy from the driver), splits of whole 64-token tiles.

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
    pdl_wait();
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
        o = L == 0.f ? 0.f : o / L;
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
    pdl_wait();
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
            for (int j = 0; j < N; ++j) o.v[j] = from_f32<T>(bad ? WB_NAN : (l == 0.f ? 0.f : acc[u][j] / l));
            store16(out + ((i64)b * q_heads + qh) * d + c * N, o);
        } else {
            float* po = part_o + (((i64)b * q_heads + qh) * splits + split) * d + c * N;
#pragma unroll
            for (int j = 0; j < N; ++j) po[j] = acc[u][j];
        }
    }
    if (splits > 1 && tid < G) {
        float* ml = part_ml + (((i64)b * q_heads + kvh * G + tid) * splits + split) * 2;
        // A NaN sum (NaN scores leave the max at -inf) marks the split bad,
        // or the merge would take it for an empty one and give 0.
        ml[0] = (bad || l_s[tid] != l_s[tid]) ? WB_NAN : m_s[tid];
        ml[1] = l_s[tid];
    }
}

// Combine the splits of one (sequence, query head): weights exp(m_s - M),
// out = sum_s w_s o_s / sum_s w_s l_s. A NaN max marks a bad input.
template <typename T>
__device__ void paged_attention_merge_impl(T* __restrict__ out, const float* __restrict__ part_o,
                                           const float* __restrict__ part_ml, int q_heads,
                                           int head_dim, int splits) {
    pdl_wait();
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
        o = bad ? WB_NAN : (L == 0.f ? 0.f : o / L);
        out[((i64)b * q_heads + h) * head_dim + j] = from_f32<T>(o);
    }
}

// v7's merge (paged_attention_merge2): the same combination as
// paged_attention_merge with the loads in parallel. The merge above walks
// the splits one after another in every thread (a max pass, a sum pass,
// then per output element a load of m_s and a dependent load of o_s), a
// chain of dependent L2 round trips that is most of a batch-1 decode step.
// Here the block loads every split's (m_s, l_s) at once into shared memory
// (thread t takes splits t, t + 128, ...), reduces the max and the sum over
// the block in a fixed order (deterministic), stores the weights
// w_s = exp(m_s - M) once, and each output element's thread then sums
// w_s o_s in split order with loads that do not wait on each other. Up to
// 32 splits, each warp does the reductions with shuffles instead, with no
// block barrier (the block-wide path ran 0.46 us behind v5's merge at
// batch 64 x 1024, where there are 4 splits and 896 merge blocks).
// Needs splits <= PA_MERGE2_MAX (the launcher sends more to the old merge).
#define PA_MERGE2_MAX 1024
// merge2's output: out_row[j] = sum_s w[s] po[s][j] / L, in split order,
// over j = threadIdx.x, threadIdx.x + blockDim.x, ... (NaN when bad, 0 when
// L = 0). w (shared memory) is 0 for an empty split, whose o_s is skipped;
// the loads do not wait on each other.
template <typename T>
__device__ __forceinline__ void pa_merge_store(T* __restrict__ out_row, const float* po,
                                               const float* w, int head_dim, int splits,
                                               float L, bool bad) {
    for (int j = threadIdx.x; j < head_dim; j += blockDim.x) {
        float o = 0.f;
#pragma unroll 8
        for (int s = 0; s < splits; ++s) {
            const float ws = w[s];
            const float v = po[(i64)s * head_dim + j];
            o += ws != 0.f ? v * ws : 0.f;
        }
        o = bad ? WB_NAN : (L == 0.f ? 0.f : o / L);
        out_row[j] = from_f32<T>(o);
    }
}
template <typename T>
__device__ void paged_attention_merge2_impl(T* __restrict__ out, const float* __restrict__ part_o,
                                            const float* __restrict__ part_ml, int q_heads,
                                            int head_dim, int splits) {
    pdl_wait();
    __shared__ float s_w[PA_MERGE2_MAX];  // m_s, then the weights w_s
    __shared__ float s_l[PA_MERGE2_MAX];
    __shared__ float s_red[32];
    const int h = blockIdx.x, b = blockIdx.y;
    const i64 row = (i64)b * q_heads + h;
    const float2* ml = reinterpret_cast<const float2*>(part_ml) + row * splits;
    const float* po = part_o + row * splits * head_dim;
    if (splits <= 32) {
        // Up to 32 splits (most decode steps): every warp reduces them on its
        // own with shuffles (lane s holds split s), with no block barrier; its
        // weights go to its own row of s_w for the output loop.
        const int lane = threadIdx.x & 31;
        float* w_row = s_w + (threadIdx.x >> 5) * 32;
        float m = WB_NEG_INF, l = 0.f;
        if (lane < splits) {
            const float2 v = ml[lane];
            m = v.x;
            l = v.y;
        }
        const bool bad = __any_sync(0xffffffffu, m != m);
        const float M = warp_max(m);
        const float w = m == WB_NEG_INF ? 0.f : expf(m - M);  // 0 past the splits too
        const float L = warp_sum(l * w);
        w_row[lane] = w;
        __syncwarp();
        pa_merge_store<T>(out + row * head_dim, po, w_row, head_dim, splits, L, bad);
        return;
    }
    float mx = WB_NEG_INF;
    int bad = 0;
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
        const float2 v = ml[s];
        s_w[s] = v.x;
        s_l[s] = v.y;
        bad |= v.x != v.x;
        mx = fmaxf(mx, v.x);
    }
    // A NaN max anywhere marks the row bad.
    bad = __syncthreads_or(bad);
    const float M = block_max(mx, s_red);
    float l = 0.f;
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
        const float m = s_w[s];
        const float w = m == WB_NEG_INF ? 0.f : expf(m - M);  // an empty split weighs 0
        s_w[s] = w;
        l += s_l[s] * w;
    }
    const float L = block_sum(l, s_red);  // its barriers also publish s_w
    pa_merge_store<T>(out + row * head_dim, po, s_w, head_dim, splits, L, bad);
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
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) paged_attention_merge2_##S(                \
        T* out, const float* part_o, const float* part_ml, int q_heads, int head_dim,            \
        int splits) {                                                                            \
        paged_attention_merge2_impl<T>(out, part_o, part_ml, q_heads, head_dim, splits);         \
    }
WB_FOR_EACH_DTYPE(WB_PAGED_ATTENTION_V2)

// ---------------------------------------------------------------------------
// v3: tensor cores and a cp.async pipeline (bf16 and f16 storage only).
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix fragments for
// mma.m16n8k16"), lane = 4 g + c, g = lane / 4, c = lane % 4; each 32-bit
// register holds two 16-bit elements, the lower index in the lower half:
//   A 16x16 (row): a0 = A[g][2c..2c+1]   a1 = A[g+8][2c..2c+1]
//                  a2 = A[g][2c+8..2c+9] a3 = A[g+8][2c+8..2c+9]
//   B 16x8 (col):  b0 = B[2c..2c+1][g]   b1 = B[2c+8..2c+9][g]
//   C 16x8 (f32):  c0, c1 = C[g][2c..2c+1]  c2, c3 = C[g+8][2c..2c+1]
// ldmatrix.x4 takes the row addresses of matrix i (8 rows of 8 16-bit
// elements, 16 contiguous bytes each) from lanes 8i..8i+7 and gives lane
// (g, c) in register i the pair M_i[g][2c..2c+1]; with .trans it gives
// M_i[2c][g], M_i[2c+1][g].
//
// One warp step covers a chunk of 16 tokens. Rows of the products are query
// heads of the group (row h < G is head kvh * G + h; rows G..15 are zeros
// and never written out). Shared memory holds the chunk as Ks[16 tokens][D]
// and Vs[16 tokens][D], row stride D + 8 elements.
//   S = Q K^T, per k16 step kk (dims 16 kk..16 kk + 15):
//     A = Q[:, 16kk..]: loaded once from global into qa[kk][0..3] exactly as
//       the A layout says (32-bit loads of two adjacent dims).
//     B for tokens 0-7 (n tile 0): B[k][n] = K[n][16kk + k], so
//       b0 = K[g][16kk+2c..+1] and b1 = K[g][16kk+8+2c..+1]: rows of K in
//       memory order, i.e. ldmatrix without .trans of M0 = K[0..7][16kk..+7]
//       and M1 = K[0..7][16kk+8..+15]; tokens 8-15 (n tile 1) are M2, M3 with
//       rows 8..15. Lane L points at token (L/8 / 2) * 8 + L%8, column
//       16kk + (L/8 % 2) * 8.
//     C: s0 = S[g][tokens 2c, 2c+1], S[g+8][2c, 2c+1]; s1 the same for
//       tokens 8+2c, 9+2c. A thread sees 4 tokens of rows g and g+8; the
//       4 lanes of a quad (same g) see all 16, so row max and sum need only
//       shuffles over lane bits 0 and 1.
//   O += P V, one k16 step (the chunk's 16 tokens):
//     A = P: a0 = P[g][2c..2c+1] = s0[0..1], a1 = P[g+8][2c..] = s0[2..3],
//       a2 = P[g][2c+8..] = s1[0..1], a3 = P[g+8][2c+8..] = s1[2..3]: the C
//       fragments of the two n tiles of S are the A fragment (FA2's trick).
//     B for dims 8nn..8nn+7: B[k][n] = V[k][8nn + n], b0 = V[2c..2c+1][8nn+g]
//       is M^T[g][2c..] of M = V[0..7][8nn..+7] as stored: ldmatrix.trans
//       of M0 = V[0..7][8nn..], M1 = V[8..15][8nn..] (b1), M2, M3 the same
//       for dims 8(nn+1).. (the next n tile). Lane L points at token
//       (L/8 % 2) * 8 + L%8, column 8 (nn + L/8 / 2).
//     C: acc[nn][0..1] = O[g][8nn+2c..], acc[nn][2..3] = O[g+8][8nn+2c..].
// Bank conflicts: ldmatrix reads 8 rows of 16 bytes per matrix; a row stride
// of D + 8 elements is (D/8 + 1) 16-byte units, odd since D is a multiple of
// 16, so the 8 rows land in 8 different 4-bank groups.

#define PA3_WARPS 4
#define PA3_CHUNK 16                      // tokens per warp step (the k16 of P V)
#define PA3_TILE (PA3_WARPS * PA3_CHUNK)  // the host splits in whole tiles
#define PA3_LOG2E 1.4426950408889634f
#define PA3_LN2 0.6931471805599453f

template <int D> struct Pa3Cfg {
    static_assert(D % 16 == 0 && D <= 256, "head_dim a multiple of 16, at most 256");
    static constexpr int STAGES = D <= 128 ? 3 : 2;          // ring depth per warp
    // v9's deep ring, for a plan of about one block per SM: 7 (5 at d128,
    // 2 at d256) chunks in flight per warp instead of 2 (1), so 4 warps
    // keep enough bytes in flight to draw an SM's share of HBM bandwidth.
    // Must match v9_stages in kernels/src/paged_attention.rs.
    static constexpr int DEEP = D <= 96 ? 8 : D <= 128 ? 6 : 3;
    static constexpr int RS = D + 8;                          // smem row stride, elements
    static constexpr int CPR = D / 8;                         // 16-byte pieces per row
    static constexpr int KSTEPS = D / 16;                     // k16 steps of Q K^T
    static constexpr int NT = D / 8;                          // n8 tiles of P V
    static constexpr int STAGE_ELEMS = 2 * PA3_CHUNK * RS;    // K rows, then V rows
    // Must match v3_smem_bytes in kernels/src/paged_attention.rs.
    static constexpr int SMEM_BYTES = PA3_WARPS * STAGES * STAGE_ELEMS * 2;
    // The end-of-split merge reuses the ring for [warps][16][D] f32.
    static_assert(PA3_WARPS * 16 * D * 4 <= SMEM_BYTES, "merge buffer fits the ring");
};

__device__ __forceinline__ unsigned pa3_smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16-byte global -> shared copy, cached in L2 only (.cg: the stream is read
// once), with an L2 prefetch size of 128 bytes: a warp's copies cover whole
// 128- or 256-byte cache rows, and the hint lets L2 fetch each from HBM in
// one request instead of sector by sector. Timed alone on the H100 (same
// machine, two binaries that differ only here): 1.8% faster at 256 x 2048
// with the 7B layout, 3.1% at 64 x 4096 with 1.5B's (CHALLENGES #29).
// With `valid` false the source size is 0: nothing is read and the 16
// destination bytes are zero-filled.
__device__ __forceinline__ void pa3_cp_async16(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void pa3_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void pa3_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void pa3_ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void pa3_ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// The 16-bit type's mma and its pack/unpack of two elements in a register.
template <typename T> struct Pa3Mma;
template <> struct Pa3Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                               unsigned b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const unsigned*>(&h);
    }
    static __device__ __forceinline__ float2 unpack(unsigned u) {
        return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
    }
};
template <> struct Pa3Mma<__half> {
    static __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                               unsigned b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        const __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const unsigned*>(&h);
    }
    static __device__ __forceinline__ float2 unpack(unsigned u) {
        return __half22float2(*reinterpret_cast<const __half2*>(&u));
    }
};

// S = Q K^T for one 16-token chunk: k_addr is this lane's ldmatrix row in
// the stage's K rows (see the layout comment); s0, s1 the two n8 tiles.
template <typename T, int D>
__device__ __forceinline__ void pa3_scores(float (&s0)[4], float (&s1)[4],
                                           const unsigned (&qa)[D / 16][4], unsigned k_addr) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s0[e] = s1[e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned kb[4];
        pa3_ldmatrix_x4(kb, k_addr + kk * 32);
        Pa3Mma<T>::mma(s0, qa[kk], kb[0], kb[1]);
        Pa3Mma<T>::mma(s1, qa[kk], kb[2], kb[3]);
    }
}

// O += P V for one chunk: v_addr is this lane's ldmatrix.trans row in the
// stage's V rows; pa the A fragments of P.
template <typename T, int D>
__device__ __forceinline__ void pa3_pv(float (&acc)[D / 8][4], const unsigned (&pa)[4],
                                       unsigned v_addr) {
#pragma unroll
    for (int nn = 0; nn < D / 8; nn += 2) {
        unsigned vb[4];
        pa3_ldmatrix_x4_trans(vb, v_addr + nn * 16);
        Pa3Mma<T>::mma(acc[nn], pa, vb[0], vb[1]);
        Pa3Mma<T>::mma(acc[nn + 1], pa, vb[2], vb[3]);
    }
}

// Four storage elements: one 8-byte store of the output.
template <typename T> struct alignas(8) Pa3Out4 { T v[4]; };

// The fused prologue's extra inputs (v3f; unused by plain v3): the
// projection's bias [(q_heads + 2 kv_heads) * D], the new token's position
// [batch] i32 and cache slot [batch] i64 (negative or >= num_slots: not
// stored), and the RoPE table [max_positions, D] f32.
template <typename T> struct Pa3Fuse {
    const T* bias;
    const int* positions;
    const float* cos_sin;
    const i64* slot_mapping;
    int max_positions;
    i64 num_slots;
};

// Per-block shared scalars of v3/v5: each warp's row max, sum and merge
// weight, the merged max and sum per row, and the bad-input flag.
struct Pa3Shared {
    float m[PA3_WARPS][16], l[PA3_WARPS][16], w[PA3_WARPS][16];
    float M[16], L[16];
    int bad;
};

// The fused prologue's work (v3f, v5f), spread over the block's threads:
// the group's G q rows of the projection row src, biased and rotated, into
// sq [G][D]; and when new_slot >= 0 the new token's k (biased, rotated) and
// v (biased) into the caches at new_slot, and also into s_new [2][D] when
// given. Work items: G * D/2N q chunks, D/2N k chunks, D/N v pieces, with
// qkv_rope_kv_store's roundings (rotate_chunk, add_bias16).
template <typename T, int D>
__device__ __forceinline__ void pa3_rope_items(T* sq, T* s_new, const T* src, const Pa3Fuse<T>& fz,
                                               const float* cs, bool pvalid, int G, int kvh,
                                               int q_heads, int kv_heads, i64 new_slot,
                                               T* k_cache, T* v_cache) {
    constexpr int N = Vec16<T>::N, HALF = D / 2, HC = HALF / N;
    static_assert(HALF % N == 0, "v3f/v5f need head_dim / 2 a multiple of the 16-byte vector");
    const i64 row = (i64)kv_heads * D;
    const int items = G * HC + (new_slot >= 0 ? HC + D / N : 0);
    for (int it = threadIdx.x; it < items; it += PA3_WARPS * 32) {
        if (it < G * HC) {
            const int h = it / HC, i = (it - h * HC) * N;
            const int col = (kvh * G + h) * D;
            Vec16<T> a = add_bias16(load16(src + col + i), fz.bias + col + i);
            Vec16<T> c2 = add_bias16(load16(src + col + HALF + i), fz.bias + col + HALF + i);
            rotate_chunk(a, c2, cs, i, HALF, pvalid);
            store16(sq + h * D + i, a);
            store16(sq + h * D + HALF + i, c2);
        } else if (it < (G + 1) * HC) {
            const int i = (it - G * HC) * N;
            const int col = q_heads * D + kvh * D;
            Vec16<T> a = add_bias16(load16(src + col + i), fz.bias + col + i);
            Vec16<T> c2 = add_bias16(load16(src + col + HALF + i), fz.bias + col + HALF + i);
            rotate_chunk(a, c2, cs, i, HALF, pvalid);
            T* dst = k_cache + new_slot * row + kvh * D;
            store16(dst + i, a);
            store16(dst + HALF + i, c2);
            if (s_new != nullptr) {
                store16(s_new + i, a);
                store16(s_new + HALF + i, c2);
            }
        } else {
            const int j = (it - (G + 1) * HC) * N;
            const int col = (q_heads + kv_heads) * D + kvh * D;
            const Vec16<T> v = add_bias16(load16(src + col + j), fz.bias + col + j);
            store16(v_cache + new_slot * row + kvh * D + j, v);
            if (s_new != nullptr) store16(s_new + D + j, v);
        }
    }
}

// v3's and v5's q: the A operand fragments qa of the group's rows (zero
// rows past G), from q [batch, q_heads, D], or with FUSED (v3f, v5f) from
// the projection row after the fused prologue (below) put the group's
// biased, rotated rows in shared memory.
template <typename T, int D, bool FUSED>
__device__ __forceinline__ void pa3_load_q(unsigned (&qa)[Pa3Cfg<D>::KSTEPS][4], const T* q,
                                           T* k_cache, T* v_cache, const Pa3Fuse<T>& fz,
                                           unsigned char* smem, int b, int kvh, int split, int G,
                                           int q_heads, int kv_heads, bool ctx_ok, int n,
                                           int start, int end) {
    using C = Pa3Cfg<D>;
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    // v3f: the group's q rows, biased and rotated, go to the ring (unused
    // until the pipeline starts) as [G][D]; the new token's k and v go to
    // the caches (pa3_rope_items).
    const T* q_rows = q + ((i64)b * q_heads + (i64)kvh * G) * D;
    if constexpr (FUSED) {
        const i64 qkv_row = (i64)(q_heads + 2 * kv_heads) * D;
        const T* src = q + (i64)b * qkv_row;
        const int pos = fz.positions[b];
        const bool pvalid = pos >= 0 && pos < fz.max_positions;
        const float* cs = fz.cos_sin + (i64)(pvalid ? pos : 0) * D;
        const bool owner = (ctx_ok && n >= 1) ? (start <= n - 1 && n - 1 < end) : split == 0;
        const i64 slot = owner ? fz.slot_mapping[b] : -1;
        const bool store = slot >= 0 && slot < fz.num_slots;
        T* sq = reinterpret_cast<T*>(smem);
        pa3_rope_items<T, D>(sq, nullptr, src, fz, cs, pvalid, G, kvh, q_heads, kv_heads,
                             store ? slot : -1, k_cache, v_cache);
        // The rotated q is read below, and the new token's row by this
        // block's cp.async copies (which read through L2, where the stores
        // went): the barrier orders both.
        __syncthreads();
        q_rows = sq;
    }

    // Q as the A operand, rows >= G zero (their scores are 0 or -inf, never
    // NaN, and they are never written out).
    {
        const T* q0 = q_rows;
        const unsigned* r0 = reinterpret_cast<const unsigned*>(q0 + g * D + 2 * c);
        const unsigned* r1 = reinterpret_cast<const unsigned*>(q0 + (g + 8) * D + 2 * c);
        const bool h0 = g < G, h1 = g + 8 < G;
#pragma unroll
        for (int kk = 0; kk < C::KSTEPS; ++kk) {
            qa[kk][0] = h0 ? r0[kk * 8] : 0u;      // Q[g][16kk + 2c..]
            qa[kk][1] = h1 ? r1[kk * 8] : 0u;      // Q[g+8][16kk + 2c..]
            qa[kk][2] = h0 ? r0[kk * 8 + 4] : 0u;  // Q[g][16kk + 8 + 2c..]
            qa[kk][3] = h1 ? r1[kk * 8 + 4] : 0u;  // Q[g+8][16kk + 8 + 2c..]
        }
    }
    if constexpr (FUSED) __syncthreads();  // every warp has its q before the ring is refilled
}

// The end of a v3/v5 split: the warps' (max, sum, accumulator) merged
// through shared memory in a fixed order, then the output (one split) or
// the split's partials for the merge kernel.
template <typename T, int D, int PADW = 0>
__device__ __forceinline__ void pa3_finish(T* __restrict__ out, float* __restrict__ part_o,
                                           float* __restrict__ part_ml, unsigned char* smem,
                                           Pa3Shared& sh, const float (&acc)[D / 8][4], float m0,
                                           float m1, float l0, float l1, bool bad, int b, int kvh,
                                           int G, int q_heads, int split, int splits) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    constexpr int NT = D / 8;
    // Row sums over the quad, in a fixed order.
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    bad = __any_sync(0xffffffffu, bad);
    pa3_cp_async_wait<0>();  // only empty groups remain; the ring is reused below
    __syncthreads();         // every warp is done with its ring (and sh.bad is initialized)

    // Merge the warps: partial outputs to shared memory, [warp][16 rows][D].
    // [warp][16 rows][D + PADW] f32. v8 pads each row by 8 floats: with a
    // stride of D floats the 8 rows g of a float2 store all start in the
    // same bank (ncu: 6.2-way conflicts on v5's finish at batch 64); a
    // stride = 8 (mod 32) puts rows 0-3 of a half-warp in distinct banks.
    constexpr int WS = D + PADW;
    static_assert(PA3_WARPS * 16 * WS * 4 <= Pa3Cfg<D>::SMEM_BYTES, "merge buffer fits the ring");
    float* wacc = reinterpret_cast<float*>(smem);
    if (bad && lane == 0) sh.bad = 1;
    if (c == 0) {
        sh.m[warp][g] = m0;
        sh.m[warp][g + 8] = m1;
        sh.l[warp][g] = l0;
        sh.l[warp][g + 8] = l1;
    }
#pragma unroll
    for (int nn = 0; nn < NT; ++nn) {
        float* r0 = wacc + (warp * 16 + g) * WS + nn * 8 + 2 * c;
        float* r1 = wacc + (warp * 16 + g + 8) * WS + nn * 8 + 2 * c;
        *reinterpret_cast<float2*>(r0) = make_float2(acc[nn][0], acc[nn][1]);
        *reinterpret_cast<float2*>(r1) = make_float2(acc[nn][2], acc[nn][3]);
    }
    __syncthreads();
    if (threadIdx.x < 16) {
        const int h = threadIdx.x;
        float mx = WB_NEG_INF;
#pragma unroll
        for (int w = 0; w < PA3_WARPS; ++w) mx = fmaxf(mx, sh.m[w][h]);
        float L = 0.f;
#pragma unroll
        for (int w = 0; w < PA3_WARPS; ++w) {
            const float wm = sh.m[w][h];
            const float wgt = wm == WB_NEG_INF ? 0.f : exp2f(wm - mx);
            sh.w[w][h] = wgt;
            L += sh.l[w][h] * wgt;
        }
        sh.M[h] = mx;
        sh.L[h] = L;
    }
    __syncthreads();

    const bool any_bad = sh.bad != 0;
    constexpr int Q4 = D / 4;
    for (int it = threadIdx.x; it < G * Q4; it += PA3_WARPS * 32) {
        const int h = it / Q4, d = (it - h * Q4) * 4;
        float o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int w = 0; w < PA3_WARPS; ++w) {
            const float wgt = sh.w[w][h];
            const float4 a = *reinterpret_cast<const float4*>(wacc + (w * 16 + h) * WS + d);
            o[0] += a.x * wgt;
            o[1] += a.y * wgt;
            o[2] += a.z * wgt;
            o[3] += a.w * wgt;
        }
        const i64 qh = (i64)b * q_heads + (i64)kvh * G + h;
        if (splits == 1) {
            const float L = sh.L[h];
            Pa3Out4<T> r;
#pragma unroll
            for (int e = 0; e < 4; ++e)
                r.v[e] = from_f32<T>(any_bad ? WB_NAN : (L == 0.f ? 0.f : o[e] / L));
            *reinterpret_cast<Pa3Out4<T>*>(out + qh * D + d) = r;
        } else {
            *reinterpret_cast<float4*>(part_o + (qh * splits + split) * D + d) =
                make_float4(o[0], o[1], o[2], o[3]);
        }
    }
    if (splits > 1 && threadIdx.x < G) {
        // The merge kernel works in natural-log units, as v2 writes them.
        const int h = threadIdx.x;
        const float mx = sh.M[h];
        float* ml = part_ml + (((i64)b * q_heads + (i64)kvh * G + h) * splits + split) * 2;
        // A NaN sum (NaN scores leave the max at -inf) marks the split bad,
        // or the merge would take it for an empty one and give 0.
        const bool nan_sum = sh.L[h] != sh.L[h];
        ml[0] = (any_bad || nan_sum) ? WB_NAN : (mx == WB_NEG_INF ? WB_NEG_INF : mx * PA3_LN2);
        ml[1] = sh.L[h];
    }
}

// FUSED (v3f): q is the engine's projection row qkv [batch, (q_heads +
// 2 kv_heads) * D] before bias and RoPE. The block adds the bias to its
// group's q heads and rotates them (rotate_chunk, the roundings of
// qkv_rope_kv_store) into shared memory, and the block whose split holds
// the new token n - 1 (split 0 when the context is bad) also writes that
// token's k (biased, rotated) and v (biased) into the caches at its slot,
// before its ring reads the cache: out and the caches come out
// bit-identical to qkv_rope_kv_store followed by v3, with one launch fewer.
// Each (sequence, kv head) writes only its own kv head's slice of its own
// slot, so blocks never wait on each other; the engine never points a
// sequence's new slot at a block another sequence reads.
template <typename T, int D, bool FUSED>
__device__ void paged_attention_v3_impl(T* __restrict__ out, float* __restrict__ part_o,
                                        float* __restrict__ part_ml, const T* __restrict__ q,
                                        T* __restrict__ k_cache, T* __restrict__ v_cache,
                                        const int* __restrict__ block_tables,
                                        const int* __restrict__ context_lens, float scale,
                                        int q_heads, int kv_heads, int block_size,
                                        int max_blocks_per_seq, int num_blocks, int split_tokens,
                                        Pa3Fuse<T> fz) {
    pdl_wait();
    using C = Pa3Cfg<D>;
    using M = Pa3Mma<T>;
    // [warps][STAGES][K rows | V rows][16][D + 8] storage elements; after the
    // loop, [warps][16][D] f32 partial outputs.
    extern __shared__ __align__(16) unsigned char pa3_smem[];
    __shared__ Pa3Shared sh;

    const int kvh = blockIdx.x, b = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    const int G = q_heads / kv_heads;
    // As v1/v2: a context outside [0, table capacity] reads nothing, gives NaN.
    const int ctx_raw = context_lens[b];
    const bool ctx_ok = ctx_raw >= 0 && ctx_raw <= max_blocks_per_seq * block_size;
    const int n = ctx_ok ? ctx_raw : 0;
    const int start = split * split_tokens;
    const int end = min(n, start + split_tokens);
    const int nch = end > start ? (end - start + PA3_CHUNK - 1) / PA3_CHUNK : 0;
    // This warp's chunks: warp, warp + 4, ... of the split.
    const int n_my = nch > warp ? (nch - warp + PA3_WARPS - 1) / PA3_WARPS : 0;
    const int* table = block_tables + (i64)b * max_blocks_per_seq;
    const i64 row = (i64)kv_heads * D;  // elements per cache slot
    const T* kbase = k_cache + (i64)kvh * D;
    const T* vbase = v_cache + (i64)kvh * D;
    const float cl2 = scale * PA3_LOG2E;  // scores in log2 units: exp2 below
    if (threadIdx.x == 0) sh.bad = !ctx_ok;

    unsigned qa[C::KSTEPS][4];
    pa3_load_q<T, D, FUSED>(qa, q, k_cache, v_cache, fz, pa3_smem, b, kvh, split, G, q_heads, kv_heads,
                            ctx_ok, n, start, end);

    const unsigned ring =
        pa3_smem_addr(pa3_smem) + (unsigned)(warp * C::STAGES * C::STAGE_ELEMS * 2);
    bool bad = false;

    // Lane l (and l + 16) resolves token l % 16 of a chunk. `fetch` only
    // starts the block-table load; `slot_of` uses it one iteration later, so
    // the load's latency hides behind a chunk of math. Tokens at or past the
    // end of the split get slot -1 (zero-filled, masked).
    auto fetch = [&](int i, int& j, int& blk) {
        j = start + (warp + PA3_WARPS * i) * PA3_CHUNK + (lane & 15);
        blk = (i < n_my && j < end) ? __ldg(table + j / block_size) : 0;
    };
    auto slot_of = [&](int j, int blk) -> int {
        if (j >= end) return -1;
        if (blk < 0 || blk >= num_blocks) {  // never read out of range: NaN result
            bad = true;
            return -1;
        }
        return blk * block_size + (j - (j / block_size) * block_size);
    };
    // Copy a chunk's K and V rows into ring stage `st`. Piece p = lane + 32 k
    // of the 16 x CPR 16-byte pieces is token p / CPR, piece p % CPR of its
    // row: consecutive lanes read consecutive 16 bytes of a row.
    auto issue = [&](int st, int slot) {
        const unsigned kdst = ring + (unsigned)(st * C::STAGE_ELEMS * 2);
        const unsigned vdst = kdst + (unsigned)(PA3_CHUNK * C::RS * 2);
#pragma unroll
        for (int k = 0; k < C::CPR / 2; ++k) {
            const int p = lane + 32 * k;
            const int t = p / C::CPR, col = p - t * C::CPR;
            const int s = __shfl_sync(0xffffffffu, slot, t);
            const bool ok = s >= 0;
            const i64 off = ok ? (i64)s * row + col * 8 : 0;
            const unsigned so = (unsigned)((t * C::RS + col * 8) * 2);
            pa3_cp_async16(kdst + so, kbase + off, ok);
            pa3_cp_async16(vdst + so, vbase + off, ok);
        }
    };

    float m0 = WB_NEG_INF, m1 = WB_NEG_INF;  // running max of rows g, g+8 (log2 units)
    float l0 = 0.f, l1 = 0.f;                // this thread's part of the row sums
    float acc[C::NT][4];
#pragma unroll
    for (int nn = 0; nn < C::NT; ++nn)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nn][e] = 0.f;

    // ldmatrix row addresses of this lane within a stage (see the layout
    // comment): K without .trans, V with .trans.
    const int mi = lane >> 3, mr = lane & 7;
    const unsigned k_lane = (unsigned)((((mi >> 1) * 8 + mr) * C::RS + (mi & 1) * 8) * 2);
    const unsigned v_lane =
        (unsigned)(PA3_CHUNK * C::RS * 2 + (((mi & 1) * 8 + mr) * C::RS + (mi >> 1) * 8) * 2);

    // Pipeline: chunks 0..STAGES-2 in flight before the loop; iteration i
    // issues chunk i + STAGES - 1 into the stage chunk i - 1 used, then waits
    // for chunk i. One commit group per chunk slot (empty past the end) keeps
    // "group i holds chunk i", so wait_group STAGES-1 means chunk i landed.
    int pj, pblk;
#pragma unroll
    for (int s = 0; s < C::STAGES - 1; ++s) {
        fetch(s, pj, pblk);
        if (s < n_my) issue(s, slot_of(pj, pblk));
        pa3_cp_async_commit();
    }
    fetch(C::STAGES - 1, pj, pblk);

    for (int i = 0; i < n_my; ++i) {
        const int nx = i + C::STAGES - 1;
        __syncwarp();  // every lane is done reading stage nx % STAGES (chunk i - 1)
        if (nx < n_my) issue(nx % C::STAGES, slot_of(pj, pblk));
        pa3_cp_async_commit();
        fetch(nx + 1, pj, pblk);
        pa3_cp_async_wait<C::STAGES - 1>();
        __syncwarp();  // other lanes' copies of chunk i are visible

        const unsigned st = ring + (unsigned)((i % C::STAGES) * C::STAGE_ELEMS * 2);
        // Valid tokens of this chunk: t < tt (tt >= 1 here).
        const int tt = end - (start + (warp + PA3_WARPS * i) * PA3_CHUNK);

        // S = Q K^T for the chunk's 16 tokens.
        float s0[4], s1[4];
        pa3_scores<T, D>(s0, s1, qa, st + k_lane);
        // Scale to log2 units and mask: s0[e] is token 2c + (e & 1), s1[e]
        // token 8 + 2c + (e & 1); e < 2 row g, e >= 2 row g + 8.
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int t = 2 * c + (e & 1);
            s0[e] = t < tt ? s0[e] * cl2 : WB_NEG_INF;
            s1[e] = t + 8 < tt ? s1[e] * cl2 : WB_NEG_INF;
        }
        float mx0 = fmaxf(fmaxf(s0[0], s0[1]), fmaxf(s1[0], s1[1]));
        float mx1 = fmaxf(fmaxf(s0[2], s0[3]), fmaxf(s1[2], s1[3]));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // A row whose max is still -inf uses base 0, so -inf - base stays
        // -inf (weight 0) instead of NaN. Token 0 is always valid here, so
        // this only matters for inputs that are themselves -inf.
        const float b0 = mn0 == WB_NEG_INF ? 0.f : mn0;
        const float b1 = mn1 == WB_NEG_INF ? 0.f : mn1;
        const float cr0 = exp2f(m0 - b0), cr1 = exp2f(m1 - b1);  // 0 on the first chunk
        m0 = mn0;
        m1 = mn1;
        unsigned pa[4];
        pa[0] = M::pack(exp2f(s0[0] - b0), exp2f(s0[1] - b0));  // P[g][2c..]
        pa[1] = M::pack(exp2f(s0[2] - b1), exp2f(s0[3] - b1));  // P[g+8][2c..]
        pa[2] = M::pack(exp2f(s1[0] - b0), exp2f(s1[1] - b0));  // P[g][2c+8..]
        pa[3] = M::pack(exp2f(s1[2] - b1), exp2f(s1[3] - b1));  // P[g+8][2c+8..]
        // Sum the weights as rounded for the mma, so numerator and
        // denominator see the same P (a dominant weight then cancels exactly).
        const float2 u0 = M::unpack(pa[0]), u1 = M::unpack(pa[1]);
        const float2 u2 = M::unpack(pa[2]), u3 = M::unpack(pa[3]);
        l0 = l0 * cr0 + ((u0.x + u0.y) + (u2.x + u2.y));
        l1 = l1 * cr1 + ((u1.x + u1.y) + (u3.x + u3.y));
#pragma unroll
        for (int nn = 0; nn < C::NT; ++nn) {
            acc[nn][0] *= cr0;
            acc[nn][1] *= cr0;
            acc[nn][2] *= cr1;
            acc[nn][3] *= cr1;
        }
        // O += P V (masked tokens have P = 0 and zero-filled V rows).
        pa3_pv<T, D>(acc, pa, st + v_lane);
    }

    pa3_finish<T, D>(out, part_o, part_ml, pa3_smem, sh, acc, m0, m1, l0, l1, bad, b, kvh, G, q_heads,
                     split, splits);
}

// ---------------------------------------------------------------------------
// v5: v3 on an instruction diet. ncu on the e2e's batch-256 decode step
// (H200, Qwen2-0.5B heads, ragged contexts) put v3 at 58% of DRAM bandwidth
// with the SMs issuing on 30% of cycles: about 400 instructions per warp
// per 16-token chunk, most of them address math (two runtime divisions by
// block_size per token, a shuffle per 16-byte piece), exp2f's accurate
// path, a rescale of the whole accumulator every chunk, and masking of
// chunks that need none. v5 keeps v3's grid, ring, fragments and merge, and
// - takes only a power-of-two block_size >= 16 (the launcher sends other
//   block sizes to v3), so each 16-token chunk lies in one block: one
//   block-table load per chunk (the same address in every lane), and each
//   lane's 16-byte pieces sit at fixed offsets from the chunk's first slot;
// - loads the first chunk's block id beside the context length, not after;
// - keeps the running max on unscaled scores and folds the scale into one
//   FFMA per weight, exponentiated with ex2.approx (one MUFU op; its error,
//   2^-22 relative, is far below the rounding of P to 16 bits);
// - rescales the accumulator only when a row's max grew (a warp vote);
// - masks only the chunk that holds the split's end.
// Same fused prologue as v3 (v5f). Needs scale > 0 (the max is taken before
// scaling); the launcher sends other scales to v3.
//
// v7 is v5's kernel with paged_attention_merge2 (above), a merge whose
// loads run in parallel; the variant lives in the launcher. v8 is v7 with
// the end-of-split rows padded (pa3_finish's PADW): one change, to time
// alone. v9 is v8's kernel with a deeper ring (Pa3Cfg::DEEP) under a plan
// of the fewest splits that give every SM a block: at batch 64 x 1024 of
// Qwen2-0.5B, one block per (sequence, kv head) and no merge, where v8 cut
// each sequence into 8 splits of 128 tokens (short blocks whose start and
// end latencies are not hidden, then a merge launch).
__device__ __forceinline__ float pa5_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

template <typename T, int D, bool FUSED, int PADW = 0, int STAGES = Pa3Cfg<D>::STAGES>
__device__ void paged_attention_v5_impl(T* __restrict__ out, float* __restrict__ part_o,
                                        float* __restrict__ part_ml, const T* __restrict__ q,
                                        T* __restrict__ k_cache, T* __restrict__ v_cache,
                                        const int* __restrict__ block_tables,
                                        const int* __restrict__ context_lens, float scale,
                                        int q_heads, int kv_heads, int block_size,
                                        int max_blocks_per_seq, int num_blocks, int split_tokens,
                                        Pa3Fuse<T> fz) {
    using C = Pa3Cfg<D>;
    using M = Pa3Mma<T>;
    extern __shared__ __align__(16) unsigned char pa3_smem[];
    __shared__ Pa3Shared sh;
    __shared__ __align__(16) T s_new[2][D];  // v5f: the new token's k and v rows
    // Unfused, q and the new token's cache row come from the previous
    // kernel: wait for it first. v5f waits after its first ring copies (see
    // below).
    if constexpr (!FUSED) pdl_wait();

    const int kvh = blockIdx.x, b = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    const int G = q_heads / kv_heads;
    const int shift = __ffs(block_size) - 1;  // block_size == 1 << shift (host-checked)
    const int cap = max_blocks_per_seq << shift;
    const int* table = block_tables + (i64)b * max_blocks_per_seq;
    const int start = split * split_tokens;
    // Chunk i of this warp starts at token j0(i). Block ids come in batches
    // of 32 chunks: lane L holds chunk 32k + L's (one coalesced load per 32
    // chunks, then shuffles), the next batch loaded while this one is used.
    // Batch 0 is loaded beside the context length, not after it: its
    // entries exist whatever the length (indices clamped to the table).
    auto j0_of = [&](int i) { return start + (warp + PA3_WARPS * i) * PA3_CHUNK; };
    auto tb_load = [&](int k) -> int {
        return cap > 0 ? __ldg(table + (min(j0_of(32 * k + lane), cap - 1) >> shift)) : 0;
    };
    int tb_cur = tb_load(0);
    const int ctx_raw = context_lens[b];
    const bool ctx_ok = ctx_raw >= 0 && ctx_raw <= cap;
    const int n = ctx_ok ? ctx_raw : 0;
    const int end = min(n, start + split_tokens);
    const int nch = end > start ? (end - start + PA3_CHUNK - 1) / PA3_CHUNK : 0;
    const int n_my = nch > warp ? (nch - warp + PA3_WARPS - 1) / PA3_WARPS : 0;
    int tb_k = 0;
    int tb_next = n_my > 32 ? tb_load(1) : 0;
    auto blk_of = [&](int i) -> int {  // i warp-uniform, rising by one
        if ((i >> 5) > tb_k) {
            tb_cur = tb_next;
            ++tb_k;
            tb_next = n_my > 32 * (tb_k + 1) ? tb_load(tb_k + 1) : 0;
        }
        return __shfl_sync(0xffffffffu, tb_cur, i & 31);
    };
    const i64 row = (i64)kv_heads * D;  // elements per cache slot
    const T* kbase = k_cache + (i64)kvh * D;
    const T* vbase = v_cache + (i64)kvh * D;
    const float cl2 = scale * PA3_LOG2E;  // weights in log2 units
    if (threadIdx.x == 0) sh.bad = !ctx_ok;

    // v5f: the block whose split holds the new token n - 1 (split 0 when
    // the context is bad) stores it; when it does, the ring's first chunks
    // are issued before the store without that token's row (`skip_j`),
    // which is copied in from shared memory after the barrier below.
    i64 new_slot = -1;
    int skip_j = -1;
    if constexpr (FUSED) {
        const bool owner = (ctx_ok && n >= 1) ? (start <= n - 1 && n - 1 < end) : split == 0;
        new_slot = owner ? fz.slot_mapping[b] : -1;
        if (new_slot >= fz.num_slots) new_slot = -1;
        if (new_slot >= 0 && ctx_ok && n >= 1) skip_j = n - 1;
    }

    const unsigned ring =
        pa3_smem_addr(pa3_smem) + (unsigned)(warp * STAGES * C::STAGE_ELEMS * 2);
    bool bad = false;
    // Copy chunk i (block id blk) into ring stage st. Piece p = lane + 32 k
    // of the 16 x CPR 16-byte pieces is token p / CPR, 16-byte column
    // p % CPR: its cache offset from the chunk's first slot and its stage
    // offset are the same for every chunk (computed once). A full chunk
    // (the common case) copies unconditionally; the split's last chunk
    // zero-fills tokens past its end, a bad block id zero-fills all, and
    // token `skip` is left for the caller.
    int p_off[C::CPR / 2];
    unsigned p_so[C::CPR / 2];
#pragma unroll
    for (int k = 0; k < C::CPR / 2; ++k) {
        const int p = lane + 32 * k;
        const int t = p / C::CPR, col = p - t * C::CPR;
        p_off[k] = t * (int)row + col * 8;
        p_so[k] = (unsigned)((t * C::RS + col * 8) * 2);
    }
    auto issue = [&](int st, int i, int blk, int skip) {
        const int j0 = j0_of(i);
        const int tt = end - j0;
        const bool ok_blk = blk >= 0 && blk < num_blocks;
        bad |= !ok_blk;  // never read out of range: NaN result
        const i64 slot0 = ((i64)blk << shift) + (j0 & (block_size - 1));
        const T* kc = kbase + (ok_blk ? slot0 * row : 0);
        const T* vc = vbase + (ok_blk ? slot0 * row : 0);
        const unsigned kdst = ring + (unsigned)(st * C::STAGE_ELEMS * 2);
        const unsigned vdst = kdst + (unsigned)(PA3_CHUNK * C::RS * 2);
        if (ok_blk && tt >= PA3_CHUNK && skip < j0) {
#pragma unroll
            for (int k = 0; k < C::CPR / 2; ++k) {
                pa3_cp_async16(kdst + p_so[k], kc + p_off[k], true);
                pa3_cp_async16(vdst + p_so[k], vc + p_off[k], true);
            }
            return;
        }
#pragma unroll
        for (int k = 0; k < C::CPR / 2; ++k) {
            const int t = (lane + 32 * k) / C::CPR;
            if (j0 + t == skip) continue;
            const bool ok = ok_blk && t < tt;
            pa3_cp_async16(kdst + p_so[k], kc + (ok ? p_off[k] : 0), ok);
            pa3_cp_async16(vdst + p_so[k], vc + (ok ? p_off[k] : 0), ok);
        }
    };

    // v3's pipeline: one commit group per chunk slot, chunk i in group i.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_my) issue(s, s, blk_of(s), skip_j);
        pa3_cp_async_commit();
    }

    // v5f: everything above read only what the previous kernel (the q|k|v
    // projection) does not write: context lengths, block tables, slot
    // mapping and the cache's older tokens. The projection is read below.
    // Launched with programmatic dependent launch, this is the point where
    // the block waits for that kernel; the copies above overlap its tail.
    if constexpr (FUSED) pdl_wait();

    // q as the A operand (rows >= G zero). v5f: the group's rows, biased
    // and rotated, staged in the last warp's last ring stage (not written
    // until that warp's first loop iteration, after the barrier below).
    unsigned qa[C::KSTEPS][4];
    const T* q_rows = q + ((i64)b * q_heads + (i64)kvh * G) * D;
    if constexpr (FUSED) {
        T* sq = reinterpret_cast<T*>(pa3_smem + ((PA3_WARPS * STAGES - 1) * C::STAGE_ELEMS) * 2);
        const i64 qkv_row = (i64)(q_heads + 2 * kv_heads) * D;
        const T* src = q + (i64)b * qkv_row;
        const int pos = fz.positions[b];
        const bool pvalid = pos >= 0 && pos < fz.max_positions;
        const float* cs = fz.cos_sin + (i64)(pvalid ? pos : 0) * D;
        pa3_rope_items<T, D>(sq, &s_new[0][0], src, fz, cs, pvalid, G, kvh, q_heads, kv_heads,
                             new_slot, k_cache, v_cache);
        // The rotated q and the new rows are in shared memory, the new rows
        // in the caches (read through L2 by the ring's later copies).
        __syncthreads();
        if (skip_j >= 0) {
            // The chunk holding token n - 1, if the prologue above issued
            // it: its row comes from s_new instead of the cache.
            const int ci = (skip_j - start) / PA3_CHUNK, to = (skip_j - start) % PA3_CHUNK;
            if (ci % PA3_WARPS == warp && ci / PA3_WARPS < STAGES - 1) {
                unsigned char* st = pa3_smem +
                                    (warp * STAGES + ci / PA3_WARPS) * C::STAGE_ELEMS * 2;
#pragma unroll
                for (int k = 0; k < C::CPR / 2; ++k) {
                    const int p = lane + 32 * k;
                    const int t = p / C::CPR, col = p - t * C::CPR;
                    if (t != to) continue;
                    const int so = (t * C::RS + col * 8) * 2;
                    *reinterpret_cast<uint4*>(st + so) =
                        *reinterpret_cast<const uint4*>(&s_new[0][col * 8]);
                    *reinterpret_cast<uint4*>(st + PA3_CHUNK * C::RS * 2 + so) =
                        *reinterpret_cast<const uint4*>(&s_new[1][col * 8]);
                }
            }
        }
        q_rows = sq;
    }
    {
        const unsigned* r0 = reinterpret_cast<const unsigned*>(q_rows + g * D + 2 * c);
        const unsigned* r1 = reinterpret_cast<const unsigned*>(q_rows + (g + 8) * D + 2 * c);
        const bool h0 = g < G, h1 = g + 8 < G;
#pragma unroll
        for (int kk = 0; kk < C::KSTEPS; ++kk) {
            qa[kk][0] = h0 ? r0[kk * 8] : 0u;      // Q[g][16kk + 2c..]
            qa[kk][1] = h1 ? r1[kk * 8] : 0u;      // Q[g+8][16kk + 2c..]
            qa[kk][2] = h0 ? r0[kk * 8 + 4] : 0u;  // Q[g][16kk + 8 + 2c..]
            qa[kk][3] = h1 ? r1[kk * 8 + 4] : 0u;  // Q[g+8][16kk + 8 + 2c..]
        }
    }
    if constexpr (FUSED) __syncthreads();  // every warp has its q before the last stage is refilled

    float m0 = WB_NEG_INF, m1 = WB_NEG_INF;  // running max of rows g, g+8 (log2 units)
    float l0 = 0.f, l1 = 0.f;                // this thread's part of the row sums
    float acc[C::NT][4];
#pragma unroll
    for (int nn = 0; nn < C::NT; ++nn)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nn][e] = 0.f;
    const int mi = lane >> 3, mr = lane & 7;
    const unsigned k_lane = (unsigned)((((mi >> 1) * 8 + mr) * C::RS + (mi & 1) * 8) * 2);
    const unsigned v_lane =
        (unsigned)(PA3_CHUNK * C::RS * 2 + (((mi & 1) * 8 + mr) * C::RS + (mi >> 1) * 8) * 2);

    for (int i = 0; i < n_my; ++i) {
        const int nx = i + STAGES - 1;
        __syncwarp();  // every lane is done reading stage nx % STAGES (chunk i - 1)
        if (nx < n_my) issue(nx % STAGES, nx, blk_of(nx), -1);
        pa3_cp_async_commit();
        pa3_cp_async_wait<STAGES - 1>();
        __syncwarp();  // other lanes' copies (and the patched row) of chunk i are visible
        const unsigned st = ring + (unsigned)((i % STAGES) * C::STAGE_ELEMS * 2);
        float s0[4], s1[4];
        pa3_scores<T, D>(s0, s1, qa, st + k_lane);
        const int tt = end - j0_of(i);
        if (tt < PA3_CHUNK) {  // the split's last chunk: tokens t >= tt masked
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int t = 2 * c + (e & 1);
                if (t >= tt) s0[e] = WB_NEG_INF;
                if (t + 8 >= tt) s1[e] = WB_NEG_INF;
            }
        }
        float mx0 = fmaxf(fmaxf(s0[0], s0[1]), fmaxf(s1[0], s1[1]));
        float mx1 = fmaxf(fmaxf(s0[2], s0[3]), fmaxf(s1[2], s1[3]));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0 * cl2), mn1 = fmaxf(m1, mx1 * cl2);
        // A row whose max is still -inf uses base 0 (weights 0, never NaN).
        const float b0 = mn0 == WB_NEG_INF ? 0.f : mn0;
        const float b1 = mn1 == WB_NEG_INF ? 0.f : mn1;
        if (__any_sync(0xffffffffu, mn0 > m0 || mn1 > m1)) {
            const float cr0 = pa5_ex2(m0 - b0), cr1 = pa5_ex2(m1 - b1);  // 0 on the first chunk
            l0 *= cr0;
            l1 *= cr1;
#pragma unroll
            for (int nn = 0; nn < C::NT; ++nn) {
                acc[nn][0] *= cr0;
                acc[nn][1] *= cr0;
                acc[nn][2] *= cr1;
                acc[nn][3] *= cr1;
            }
        }
        m0 = mn0;
        m1 = mn1;
        unsigned pa[4];
        pa[0] = M::pack(pa5_ex2(fmaf(s0[0], cl2, -b0)), pa5_ex2(fmaf(s0[1], cl2, -b0)));
        pa[1] = M::pack(pa5_ex2(fmaf(s0[2], cl2, -b1)), pa5_ex2(fmaf(s0[3], cl2, -b1)));
        pa[2] = M::pack(pa5_ex2(fmaf(s1[0], cl2, -b0)), pa5_ex2(fmaf(s1[1], cl2, -b0)));
        pa[3] = M::pack(pa5_ex2(fmaf(s1[2], cl2, -b1)), pa5_ex2(fmaf(s1[3], cl2, -b1)));
        // The weights as rounded for the mma (numerator and denominator
        // see the same P).
        const float2 u0 = M::unpack(pa[0]), u1 = M::unpack(pa[1]);
        const float2 u2 = M::unpack(pa[2]), u3 = M::unpack(pa[3]);
        l0 += (u0.x + u0.y) + (u2.x + u2.y);
        l1 += (u1.x + u1.y) + (u3.x + u3.y);
        pa3_pv<T, D>(acc, pa, st + v_lane);
    }
    pa3_finish<T, D, PADW>(out, part_o, part_ml, pa3_smem, sh, acc, m0, m1, l0, l1, bad, b, kvh, G, q_heads,
                     split, splits);
}

// One entry point per (head_dim, 16-bit storage type):
// paged_attention_{v3,v5,v8,v9}_d{D}_{bf16,f16}, and the fused prologue's
// paged_attention_{v3,v5,v8,v9}f_d{D}_{bf16,f16}. 2 blocks per SM is the floor the
// register budget must allow (the ring of a d128 block is 102 KiB).
#define WB_PAGED_ATTENTION_V3(T, S, D)                                                         \
    WB_PA3_ENTRIES(T, S, D, v3, v3, ) WB_PA3_ENTRIES(T, S, D, v5, v5, )                        \
    WB_PA3_ENTRIES(T, S, D, v8, v5, WB_PA8_PAD) WB_PA3_ENTRIES(T, S, D, v9, v5, WB_PA9_DEEP(D))
// v8's split kernel: v5's body with the finish's rows padded (pa3_finish).
#define WB_PA8_PAD , 8
// v9's deep-ring kernel: v8's with Pa3Cfg::DEEP ring stages per warp.
#define WB_PA9_DEEP(D) , 8, Pa3Cfg<D>::DEEP
#define WB_PA3_ENTRIES(T, S, D, V, IMPL, PAD)                                                    \
    extern "C" __global__ void __launch_bounds__(PA3_WARPS * 32, 2)                              \
        paged_attention_##V##_d##D##_##S(T* out, float* part_o, float* part_ml, const T* q,         \
                                      const T* k_cache, const T* v_cache,                        \
                                      const int* block_tables, const int* context_lens,          \
                                      float scale, int q_heads, int kv_heads, int block_size,    \
                                      int max_blocks_per_seq, int num_blocks, int split_tokens) { \
        paged_attention_##IMPL##_impl<T, D, false PAD>(                                          \
            out, part_o, part_ml, q, const_cast<T*>(k_cache), const_cast<T*>(v_cache),           \
            block_tables, context_lens, scale, q_heads, kv_heads, block_size,                    \
            max_blocks_per_seq, num_blocks, split_tokens, Pa3Fuse<T>{});                         \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(PA3_WARPS * 32, 2)                              \
        paged_attention_##V##f_d##D##_##S(                                                       \
            T* out, float* part_o, float* part_ml, const T* qkv, T* k_cache, T* v_cache,         \
            const int* block_tables, const int* context_lens, float scale, int q_heads,          \
            int kv_heads, int block_size, int max_blocks_per_seq, int num_blocks,                \
            int split_tokens, const T* bias, const int* positions, const float* cos_sin,         \
            const i64* slot_mapping, int max_positions, i64 num_slots) {                         \
        paged_attention_##IMPL##_impl<T, D, true PAD>(                                           \
            out, part_o, part_ml, qkv, k_cache, v_cache, block_tables, context_lens, scale,      \
            q_heads, kv_heads, block_size, max_blocks_per_seq, num_blocks, split_tokens,         \
            Pa3Fuse<T>{bias, positions, cos_sin, slot_mapping, max_positions, num_slots});       \
    }
#define WB_PAGED_ATTENTION_V3_DIMS(T, S) \
    WB_PAGED_ATTENTION_V3(T, S, 32)      \
    WB_PAGED_ATTENTION_V3(T, S, 64)      \
    WB_PAGED_ATTENTION_V3(T, S, 80)      \
    WB_PAGED_ATTENTION_V3(T, S, 96)      \
    WB_PAGED_ATTENTION_V3(T, S, 128)     \
    WB_PAGED_ATTENTION_V3(T, S, 256)
WB_PAGED_ATTENTION_V3_DIMS(__nv_bfloat16, bf16)
WB_PAGED_ATTENTION_V3_DIMS(__half, f16)
