// prefill_attention.cu: causal prefill attention of packed variable-length
// sequences over the paged KV cache, on tensor cores: mma.sync (v1-v4, any
// GPU from sm_80) and warpgroup MMA (v5-v7, sm_90a; see the v5 section).
//
// q   [total_q, q_heads, head_dim]   new tokens of all sequences, packed;
//                                    sequence b owns rows cu_seqlens_q[b]..cu_seqlens_q[b+1]
// k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim]
//                                    hold every token of every sequence, the new
//                                    ones included (kv_store ran first)
// block_tables [batch, max_blocks_per_seq] i32; kv_lens [batch] i32 (prefix + new)
// out [total_q, q_heads, head_dim]
//
// Query i of sequence b sits at position p = kv_lens[b] - q_len_b + i and
//   out[row, h] = sum_{j <= p} softmax_j(scale * q[row, h] . K[b, j, h / group]) V[b, j, h / group]
// where token j lives in block block_tables[b, j / block_size] at offset
// j % block_size. One definition covers plain prefill (no prefix), chunked
// prefill and prefix reuse (reference/src/prefill_attention.rs, `prefill_paged`).
//
// Design: FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention
// with Better Parallelism and Work Partitioning") on mma.sync, so the same
// code runs on sm_80 and sm_90a.
// - Grid (q_heads, batch, m-slots). A CTA of 4 warps owns a tile of 64 query
//   rows (16 per warp) of one sequence and one query head, and loops over
//   the sequence's tiles m = n_m-1-z, n_m-1-z-gridDim.z, ... (longest causal
//   range first, so the short tiles fill the tail of the launch). The host
//   sizes gridDim.z from the longest sequence; a smaller value is only slower.
// - The CTA walks the keys in tiles of BN tokens (64, or 32 for head_dim
//   256) up to the last position any of its rows can see; tiles past that
//   are never loaded. K and V tiles are staged in shared memory with
//   cp.async, double-buffered: tile j+1 is in flight while tile j is used.
//   Each token's slot is resolved through the block table as its 16-byte
//   chunks are issued. Tokens past kv_len and tokens in a bad block are
//   zero-filled by cp.async (src-size 0) and never read from global memory.
// - Per warp and key tile: S = Q K^T (mma m16n8k16, f32 accumulators; Q as
//   the A operand from registers, loaded once with ldmatrix; K with
//   ldmatrix); causal mask only on tiles that cross the diagonal; online
//   softmax in registers in the log2 domain (exp2f, scale * log2(e) folded
//   into one fma), row max and sum shared by the 4 lanes of a row (quad
//   shuffles); P rounded to bf16/f16 in registers and used directly as the
//   A operand of O += P V (the C fragment of S has the layout of the A
//   fragment of P V: no shared-memory round trip), V with ldmatrix.trans.
// - At the end O / l is staged through shared memory (the warp's own Q rows)
//   and written with 16-byte stores.
//
// Masking and bad input: a masked score is -inf, so its weight is exactly 0,
// and masked slots of K/V hold zeros (never cache contents: the checks put
// NaN in unused slots, and 0 * NaN is NaN). A sequence whose offsets are out
// of order or outside [0, total_q], whose kv_len is below its query count or
// beyond its block table, or any misaligned pointer, gives NaN for the rows
// it names (clamped into [0, total_q]) and reads nothing. A block id outside
// [0, num_blocks) is not read; the rows that can see one of its tokens get
// NaN. No atomics, no split over keys: every sum has a fixed order, so
// repeated runs are bit-identical.
//
// Shared memory (dynamic), elements of T; rows padded by 8 elements (16
// bytes) so that the 8 row addresses of each ldmatrix 8x8 load fall in 8
// different 16-byte bank groups (row stride = 16 bytes mod 128):
//   q_s [64][D + 8]          Q tile, later the warp's staged output rows
//   k_s [2][BN][D + 8]       K tiles (double buffer)
//   v_s [2][BN][D + 8]       V tiles
//   bad_s [2][BN] int        1 where the token's block id is out of range
// D = 128: 17 KB + 68 KB = 85 KB (two CTAs per SM on an H100 or an A100).
//
// v2 (MT = 2): the same kernel with 128 query rows a CTA, 32 per warp as two
// m16 tiles, and 32-key tiles. Per key tile each K fragment (ldmatrix) feeds
// the two row tiles' S = Q K^T MMAs and each V fragment their O += P V
// MMAs, so shared-memory reads per MMA fall from 0.5 to 0.375 ldmatrix.x4
// (Q comes from shared memory each k-step for D = 128: its fragments would
// not fit the registers beside 2 x 64 O accumulators). ptxas (sm_90a): 255
// registers with 2 bytes of spill for D = 128, none for 64 and 96. D = 80
// has no v2: 32 keys x 10 chunks is not a whole number of chunks per
// thread. Shared memory for D = 128: 34 KB of Q + 34 KB of K/V = 68 KB.
//
// v3 (FAST = true): v2's tiles (64-key tiles for D = 64) with fewer
// instructions beside the MMAs, which v2 issues about as many of as MMAs:
// - the softmax exponent is one ex2.approx.ftz (exp2f adds range scaling);
// - O and l are rescaled only when some row of the warp's m16 tile has a
//   new maximum (a warp vote): after the first tiles the max rarely moves;
// - block_size is a power of two (the host runs v2 otherwise), so a token's
//   block and offset are a shift and a mask, not a 32-bit division and
//   remainder per 16-byte chunk; and the block-table entries of key tile
//   j+2 are loaded while tile j is computed, so no copy waits on them.
// v4: v3's savings on v1's tiles (64 query rows, 16 a warp, 64-key tiles):
// half the barriers, votes and quad reductions per key of v3, Q kept in
// registers, at 0.5 rather than 0.375 shared-memory reads per MMA. ptxas
// (sm_90a): 168/227/255 registers for D = 64/96/128, no spill.
//
// ---------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16} fragment layouts (PTX ISA,
// "Matrix fragments for mma.m16n8k16"). lane = 0..31, g = lane / 4 (the row
// group), c = lane % 4 (the lane in the quad). Each 32-bit register holds two
// 16-bit elements, the lower column index in the low half.
//   A 16x16 row-major: a0 = A[g][2c, 2c+1]      a1 = A[g+8][2c, 2c+1]
//                      a2 = A[g][2c+8, 2c+9]    a3 = A[g+8][2c+8, 2c+9]
//   B 16x8 ("col"):    b0 = B[2c, 2c+1][g]      b1 = B[2c+8, 2c+9][g]
//   C/D 16x8 f32:      c0, c1 = C[g][2c, 2c+1]  c2, c3 = C[g+8][2c, 2c+1]
// ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the row addresses of matrix i
// (8 rows of 16 bytes); register i of lane l receives matrix i's
// [l/4][2(l%4), 2(l%4)+1]; with .trans it receives [2(l%4), 2(l%4)+1][l/4].
//
// S = Q K^T, per warp 16 query rows x BN keys, k-step ks over head_dim:
//   A = Q[16 rows][ks*16 .. +16]: x4 with lane l -> row l%16, column
//       ks*16 + (l/16)*8 gives matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7),
//       (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a0, a1, a2, a3.
//   B[k][n] = K[n][k] for keys n of one n8 tile: column n of B is key row n,
//       contiguous in shared memory, so plain ldmatrix of 8 key rows gives
//       K[g][2c, 2c+1] = B[2c, 2c+1][g] = b0 (and the next 8 columns b1).
//       x4 with lane l -> key row np*16 + l%8 + (l/16)*8, column
//       ks*16 + ((l/8)%2)*8 gives b0, b1 of key tile 2np, then of 2np+1.
//   C: s[nt][0..1] = S[g][nt*8 + 2c, +1], s[nt][2..3] = S[g+8][...].
// O += P V, k-step kk over the BN keys of the tile, n8 tiles over head_dim:
//   A = P[16 rows][kk*16 .. +16] comes from S's accumulators:
//       a0 = (s[2kk][0], s[2kk][1])      = P[g][kk*16 + 2c, +1]
//       a1 = (s[2kk][2], s[2kk][3])      = P[g+8][kk*16 + 2c, +1]
//       a2 = (s[2kk+1][0], s[2kk+1][1])  = P[g][kk*16 + 8 + 2c, +1]
//       a3 = (s[2kk+1][2], s[2kk+1][3])  = P[g+8][kk*16 + 8 + 2c, +1]
//   B[k][n] = V[k][n] (k = key, n = head dim) is row-major in shared memory,
//       so ldmatrix.trans of 8 key rows gives V[2c, 2c+1][g] = b0.
//       x4.trans with lane l -> key row kk*16 + l%16, column dp*16 + (l/16)*8
//       gives b0, b1 of head-dim tile 2dp, then of 2dp+1.
//   C: o[nt][0..1] = O[g][nt*8 + 2c, +1], o[nt][2..3] = O[g+8][...].
// Thread (g, c) of warp w thus owns query rows w*16 + g and w*16 + g + 8 of
// the tile; the four lanes of a quad share those rows (row max and sum are
// reduced with __shfl_xor 1 and 2).
// ---------------------------------------------------------------------------

#define PF_THREADS 128
#define PF_LOG2E 1.4426950408889634f

// 2^x: v1/v2 keep exp2f; v3 one MUFU.EX2 (results below 2^-126 flush to 0,
// far under a 16-bit P's resolution).
template <bool FAST>
__device__ __forceinline__ float pf_exp2(float x) {
    if constexpr (FAST) {
        float y;
        asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
        return y;
    } else {
        return exp2f(x);
    }
}

__device__ __forceinline__ unsigned pf_smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; with valid = false nothing is read and the
// 16 bytes are zero-filled (src-size 0). `src` is then any valid address.
__device__ __forceinline__ void pf_cp_async16(unsigned dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void pf_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void pf_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// volatile: the same address is read again after the buffer is refilled,
// so these loads must not be merged or hoisted.
__device__ __forceinline__ void pf_ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void pf_ldsm_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// The tensor-core product and the f32 -> 16-bit packing, per storage type.
template <typename T> struct PfMma;

template <> struct PfMma<__nv_bfloat16> {
    // c += a (16x16) * b (16x8), f32 accumulate.
    static __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                               unsigned b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    // lo in the low half (the lower column index).
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&v);
    }
};

template <> struct PfMma<__half> {
    static __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                               unsigned b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&v);
    }
};

// D: head_dim (a multiple of 16); BN: keys per tile (a multiple of 16);
// MT: m16 row tiles per warp (v1: 1, a 64-row CTA tile; v2: 2, 128 rows, so
// each K and V fragment read from shared memory feeds two MMAs); FAST: v3's
// instruction savings (block_size must then be a power of two).
template <typename T, int D, int BN, int MT, bool FAST>
__device__ void prefill_attention_impl(T* __restrict__ out, const T* __restrict__ q,
                                          const T* __restrict__ k_cache,
                                          const T* __restrict__ v_cache,
                                          const int* __restrict__ cu_seqlens_q,
                                          const int* __restrict__ kv_lens,
                                          const int* __restrict__ block_tables, float scale,
                                          int total_q, int q_heads, int kv_heads, int block_size,
                                          int max_blocks_per_seq, int num_blocks) {
    static_assert(D % 16 == 0 && BN % 16 == 0, "tiles are whole mma steps");
    constexpr int BM = 64 * MT;        // query rows per CTA: 4 warps x 16 x MT
    constexpr int LD = D + 8;          // shared row stride (elements): 16-byte pad
    constexpr int CH = D / 8;          // 16-byte chunks per row
    constexpr int NT_S = BN / 8;       // n8 tiles of S per warp
    constexpr int NT_O = D / 8;        // n8 tiles of O per warp
    constexpr int KS_QK = D / 16;      // k-steps of Q K^T
    constexpr int KS_PV = BN / 16;     // k-steps of P V
    // Q in registers costs MT*D/4 registers; past 32 (D = 128, MT = 1) the
    // O accumulators (MT*D/2) need the room, and Q is read from shared
    // memory each k-step instead.
    constexpr bool Q_REGS = MT * D <= 128;
    typedef PfMma<T> Mma;

    extern __shared__ __align__(16) unsigned char pf_smem[];
    T* q_s = reinterpret_cast<T*>(pf_smem);                    // [BM][LD]
    T* k_s = q_s + BM * LD;                                    // [2][BN][LD]
    T* v_s = k_s + 2 * BN * LD;                                // [2][BN][LD]
    int* bad_s = reinterpret_cast<int*>(v_s + 2 * BN * LD);    // [2][BN]

    const int h = blockIdx.x, b = blockIdx.y;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c4 = lane & 3;
    const int kvh = h / (q_heads / kv_heads);

    // The sequence's rows, clamped into [0, total_q] so that even bad offsets
    // never index outside q and out.
    const int q0_raw = cu_seqlens_q[b], q1_raw = cu_seqlens_q[b + 1];
    const int lo = min(max(q0_raw, 0), total_q);
    const int hi = min(max(q1_raw, lo), total_q);
    const int q_len = hi - lo;
    const int kv_len = kv_lens[b];
    const bool ok = q0_raw == lo && q1_raw == hi && kv_len >= q_len &&
                    (i64)kv_len <= (i64)max_blocks_per_seq * block_size && aligned16(q) &&
                    aligned16(k_cache) && aligned16(v_cache) && aligned16(out);
    const int n_m = (q_len + BM - 1) / BM;
    const int ctx_off = kv_len - q_len;   // position of the sequence's first new query
    const int* table = block_tables + (i64)b * max_blocks_per_seq;
    const float sl2 = scale * PF_LOG2E;   // scores in log2 units: exp(x) = exp2(x log2 e)
    const i64 row_stride = (i64)q_heads * D;  // elements between consecutive tokens of q/out
    // v3's cache addressing: slot (blk, t) of kv head kvh starts at
    // blk * blk_stride + t * tok_stride + kvh * D (block_size = 2^bs_shift).
    const int bs_shift = 31 - __clz(block_size), bs_mask = block_size - 1;
    const int tok_stride = kv_heads * D;
    const i64 blk_stride = (i64)block_size * tok_stride;
    constexpr int NIT = BN * CH / PF_THREADS;   // 16-byte chunks of a K (or V) tile per thread

    for (int slot = blockIdx.z; slot < n_m; slot += gridDim.z) {
        const int m0 = (n_m - 1 - slot) * BM;      // first row of the tile in the sequence
        const int rows = min(BM, q_len - m0);      // rows of the tile that exist
        if (!ok) {
            for (int i = tid; i < rows * D; i += PF_THREADS) {
                const int r = i / D, d = i - r * D;
                out[(lo + m0 + r) * row_stride + (i64)h * D + d] = from_f32<T>(WB_NAN);
            }
            continue;
        }

        // Q tile [BM][D]: rows past the sequence are zero-filled, not read.
        const T* q_tile = q + (lo + m0) * row_stride + (i64)h * D;
#pragma unroll
        for (int it = 0; it < BM * CH / PF_THREADS; ++it) {   // BM * CH = 8 MT D, D % 16 == 0
            const int i = tid + it * PF_THREADS;
            const int r = i / CH, ch = i - r * CH;
            const bool live = r < rows;
            pf_cp_async16(pf_smem_addr(q_s + r * LD + ch * 8),
                          live ? q_tile + r * row_stride + ch * 8 : q, live);
        }

        // Issue the cp.async copies of key tile j into buffer st; returns
        // whether this thread met a bad block id. Fixed trip count (unrolled):
        // the block-table loads of a tile are in flight together.
        auto load_kv = [&](int j, int st) -> bool {
            static_assert(BN * CH % PF_THREADS == 0, "whole 16-byte chunks per thread");
            bool bad = false;
            T* ks = k_s + st * BN * LD;
            T* vs = v_s + st * BN * LD;
#pragma unroll
            for (int it = 0; it < BN * CH / PF_THREADS; ++it) {
                const int i = tid + it * PF_THREADS;
                const int r = i / CH, ch = i - r * CH;
                const int tok = j * BN + r;
                const T* ksrc = k_cache;
                const T* vsrc = v_cache;
                bool live = tok < kv_len;   // past the context: zeros
                bool blk_bad = false;
                if (live) {
                    const int blk = table[tok / block_size];   // tok < kv_len <= table capacity
                    if (blk < 0 || blk >= num_blocks) {
                        live = false;
                        blk_bad = true;
                    } else {
                        const i64 off =
                            (((i64)blk * block_size + tok % block_size) * kv_heads + kvh) * D + ch * 8;
                        ksrc = k_cache + off;
                        vsrc = v_cache + off;
                    }
                }
                if (ch == 0) bad_s[st * BN + r] = blk_bad;
                bad |= blk_bad;
                pf_cp_async16(pf_smem_addr(ks + r * LD + ch * 8), ksrc, live);
                pf_cp_async16(pf_smem_addr(vs + r * LD + ch * 8), vsrc, live);
            }
            return bad;
        };

        // v3: the block ids of this thread's chunks of key tile j (0 past the
        // context, never read); loads only, consumed by issue_kv a tile later.
        int blk_next[NIT];
        auto fetch_blocks = [&](int j) {
#pragma unroll
            for (int it = 0; it < NIT; ++it) {
                const int tok = j * BN + (tid + it * PF_THREADS) / CH;
                blk_next[it] = tok < kv_len ? table[tok >> bs_shift] : 0;
            }
        };
        // v3: load_kv with the block ids fetched by fetch_blocks(j).
        auto issue_kv = [&](int j, int st) -> bool {
            bool bad = false;
            T* ks = k_s + st * BN * LD;
            T* vs = v_s + st * BN * LD;
#pragma unroll
            for (int it = 0; it < NIT; ++it) {
                const int i = tid + it * PF_THREADS;
                const int r = i / CH, ch = i - r * CH;
                const int tok = j * BN + r;
                const int blk = blk_next[it];
                const bool in_ctx = tok < kv_len;
                const bool blk_bad = in_ctx && (blk < 0 || blk >= num_blocks);
                const bool live = in_ctx && !blk_bad;
                const i64 off = (i64)blk * blk_stride + (tok & bs_mask) * tok_stride + kvh * D + ch * 8;
                if (ch == 0) bad_s[st * BN + r] = blk_bad;
                bad |= blk_bad;
                pf_cp_async16(pf_smem_addr(ks + r * LD + ch * 8), live ? k_cache + off : k_cache, live);
                pf_cp_async16(pf_smem_addr(vs + r * LD + ch * 8), live ? v_cache + off : v_cache, live);
            }
            return bad;
        };

        // Keys 0..kv_last are visible to some row of the tile.
        const int kv_last = ctx_off + m0 + rows - 1;
        const int n_tiles = kv_last / BN + 1;
        bool bad_cur, bad_next = false;
        if constexpr (FAST) {
            fetch_blocks(0);
            bad_cur = issue_kv(0, 0);
            if (n_tiles > 1) fetch_blocks(1);
        } else {
            bad_cur = load_kv(0, 0);
        }
        pf_cp_async_commit();   // group 0: Q and key tile 0

        // This warp's rows: w*16*MT .. +16*MT-1 of the tile, m16 tile mt at
        // wrow + 16 mt; this thread's two rows of tile mt sit at positions
        // pos_a + 16 mt (row g) and pos_a + 16 mt + 8 (row g + 8).
        const int wrow = warp * 16 * MT;
        const bool warp_live = wrow < rows;   // else all its rows are padding
        const int wpos_min = ctx_off + m0 + wrow, wpos_max = wpos_min + 16 * MT - 1;
        const int pos_a = wpos_min + g;

        float m_r[MT][2];      // running row max (raw score units)
        float l_r[MT][2];      // running row sum, this lane's columns only
        bool row_bad[MT][2];
        float o[MT][NT_O][4];  // O [16 MT][D] in C fragments
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                m_r[mt][i] = WB_NEG_INF;
                l_r[mt][i] = 0.f;
                row_bad[mt][i] = false;
            }
#pragma unroll
            for (int nt = 0; nt < NT_O; ++nt)
                o[mt][nt][0] = o[mt][nt][1] = o[mt][nt][2] = o[mt][nt][3] = 0.f;
        }
        unsigned qf[MT][Q_REGS ? KS_QK : 1][4];   // Q [16 MT][D] in A fragments

        for (int j = 0; j < n_tiles; ++j) {
            const int st = j & 1;
            if (j + 1 < n_tiles) {
                if constexpr (FAST) {
                    bad_next = issue_kv(j + 1, st ^ 1);
                    if (j + 2 < n_tiles) fetch_blocks(j + 2);   // in flight during tile j
                } else {
                    bad_next = load_kv(j + 1, st ^ 1);   // buffer st^1 was released by the
                }                                        // barrier that ended iteration j-1
                pf_cp_async_commit();
                pf_cp_async_wait<1>();               // all but tile j+1 have landed
            } else {
                pf_cp_async_wait<0>();
            }
            // Every thread's copies of tile j (and Q) are visible; the OR says
            // whether any token of tile j sits in a bad block.
            const bool tile_bad = __syncthreads_or(bad_cur) != 0;
            bad_cur = bad_next;
            const int n0 = j * BN;
            const T* kt = k_s + st * BN * LD;
            const T* vt = v_s + st * BN * LD;

            if constexpr (Q_REGS) {
                if (j == 0 && warp_live) {
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                        for (int ks = 0; ks < KS_QK; ++ks)
                            pf_ldsm_x4(qf[mt][ks],
                                       pf_smem_addr(q_s + (wrow + 16 * mt + (lane & 15)) * LD +
                                                    ks * 16 + (lane >> 4) * 8));
                }
            }

            // Warp-uniform: skip padding warps and tiles wholly above this
            // warp's diagonal (their weights would all be 0).
            if (warp_live && n0 <= wpos_max) {
                // S = Q K^T: [16 MT][BN] in C fragments; each K fragment
                // serves the warp's MT row tiles.
                float s[MT][NT_S][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < NT_S; ++nt)
                        s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
                for (int ks = 0; ks < KS_QK; ++ks) {
                    unsigned a[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        if constexpr (Q_REGS) {
                            a[mt][0] = qf[mt][ks][0];
                            a[mt][1] = qf[mt][ks][1];
                            a[mt][2] = qf[mt][ks][2];
                            a[mt][3] = qf[mt][ks][3];
                        } else {
                            pf_ldsm_x4(a[mt], pf_smem_addr(q_s + (wrow + 16 * mt + (lane & 15)) * LD +
                                                           ks * 16 + (lane >> 4) * 8));
                        }
                    }
#pragma unroll
                    for (int np = 0; np < NT_S / 2; ++np) {
                        unsigned kb[4];
                        pf_ldsm_x4(kb, pf_smem_addr(kt + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD +
                                                    ks * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            Mma::mma(s[mt][2 * np], a[mt], kb[0], kb[1]);
                            Mma::mma(s[mt][2 * np + 1], a[mt], kb[2], kb[3]);
                        }
                    }
                }

                // Causal mask where the tile crosses the diagonal of some row
                // (keys past kv_len are always past the diagonal); tokens of
                // bad blocks are dropped and poison the rows that see them.
                if (n0 + BN - 1 > wpos_min || tile_bad) {
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                        for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
                            for (int e = 0; e < 4; ++e) {
                                const int col = n0 + nt * 8 + 2 * c4 + (e & 1);
                                const int pos = pos_a + 16 * mt + (e < 2 ? 0 : 8);
                                if (col > pos) {
                                    s[mt][nt][e] = WB_NEG_INF;
                                } else if (tile_bad && bad_s[st * BN + col - n0]) {
                                    s[mt][nt][e] = WB_NEG_INF;
                                    row_bad[mt][e >> 1] = true;
                                }
                            }
                        }
                    }
                }

#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    // Online softmax. New row max over the tile, across the quad.
                    float mx[2] = {m_r[mt][0], m_r[mt][1]};
#pragma unroll
                    for (int nt = 0; nt < NT_S; ++nt) {
                        mx[0] = fmaxf(mx[0], fmaxf(s[mt][nt][0], s[mt][nt][1]));
                        mx[1] = fmaxf(mx[1], fmaxf(s[mt][nt][2], s[mt][nt][3]));
                    }
                    float corr[2], mb[2];
                    bool grew = false;   // v3: some row of this lane has a new max
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                        // A row with nothing visible yet keeps max -inf: use 0 so
                        // that exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN.
                        mb[i] = mx[i] == WB_NEG_INF ? 0.f : mx[i] * sl2;
                        if constexpr (FAST) {
                            const bool up = mx[i] > m_r[mt][i];
                            grew |= up;
                            corr[i] = !up ? 1.f
                                          : (m_r[mt][i] == WB_NEG_INF
                                                 ? 0.f
                                                 : pf_exp2<true>(m_r[mt][i] * sl2 - mb[i]));
                        } else {
                            corr[i] = m_r[mt][i] == WB_NEG_INF ? 0.f : exp2f(m_r[mt][i] * sl2 - mb[i]);
                        }
                        m_r[mt][i] = mx[i];
                    }
                    // p = exp(scale * (s - max)) = exp2(s * sl2 - max * sl2), in place.
                    float rs[2] = {0.f, 0.f};
#pragma unroll
                    for (int nt = 0; nt < NT_S; ++nt) {
                        s[mt][nt][0] = pf_exp2<FAST>(fmaf(s[mt][nt][0], sl2, -mb[0]));
                        s[mt][nt][1] = pf_exp2<FAST>(fmaf(s[mt][nt][1], sl2, -mb[0]));
                        s[mt][nt][2] = pf_exp2<FAST>(fmaf(s[mt][nt][2], sl2, -mb[1]));
                        s[mt][nt][3] = pf_exp2<FAST>(fmaf(s[mt][nt][3], sl2, -mb[1]));
                        rs[0] += s[mt][nt][0] + s[mt][nt][1];
                        rs[1] += s[mt][nt][2] + s[mt][nt][3];
                    }
                    l_r[mt][0] = l_r[mt][0] * corr[0] + rs[0];
                    l_r[mt][1] = l_r[mt][1] * corr[1] + rs[1];
                    // v3: a warp-uniform skip when no row's max moved (every
                    // corr is then exactly 1).
                    if (!FAST || __any_sync(0xffffffffu, grew)) {
#pragma unroll
                        for (int nt = 0; nt < NT_O; ++nt) {
                            o[mt][nt][0] *= corr[0];
                            o[mt][nt][1] *= corr[0];
                            o[mt][nt][2] *= corr[1];
                            o[mt][nt][3] *= corr[1];
                        }
                    }
                }

                // O += P V: P's A fragments straight from S's C fragments;
                // each V fragment serves the warp's MT row tiles.
#pragma unroll
                for (int kk = 0; kk < KS_PV; ++kk) {
                    unsigned a[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        a[mt][0] = Mma::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                        a[mt][1] = Mma::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                        a[mt][2] = Mma::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                        a[mt][3] = Mma::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                    }
#pragma unroll
                    for (int dp = 0; dp < D / 16; ++dp) {
                        unsigned vb[4];
                        pf_ldsm_x4_trans(vb, pf_smem_addr(vt + (kk * 16 + (lane & 15)) * LD + dp * 16 +
                                                          (lane >> 4) * 8));
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            Mma::mma(o[mt][2 * dp], a[mt], vb[0], vb[1]);
                            Mma::mma(o[mt][2 * dp + 1], a[mt], vb[2], vb[3]);
                        }
                    }
                }
            }
            __syncthreads();   // buffer st is refilled with tile j+2 next iteration
        }

        if (warp_live) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                // Whole-row sums and flags across the quad (every lane of a
                // quad ends with the same values: a + b == b + a in floating point).
                float inv[2];
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    float l = l_r[mt][i];
                    l += __shfl_xor_sync(0xffffffffu, l, 1);
                    l += __shfl_xor_sync(0xffffffffu, l, 2);
                    int bad = row_bad[mt][i];
                    bad |= __shfl_xor_sync(0xffffffffu, bad, 1);
                    bad |= __shfl_xor_sync(0xffffffffu, bad, 2);
                    inv[i] = bad ? WB_NAN : (l > 0.f ? 1.f / l : 0.f);
                }
                // Stage the tile's 16 output rows in the warp's own rows of
                // q_s (no other warp reads them), then store 16 bytes per
                // lane and step.
                const int trow = wrow + 16 * mt;
                T* os = q_s + trow * LD;
                __syncwarp();
#pragma unroll
                for (int nt = 0; nt < NT_O; ++nt) {
                    const int col = nt * 8 + 2 * c4;
                    *reinterpret_cast<unsigned*>(os + g * LD + col) =
                        Mma::pack(o[mt][nt][0] * inv[0], o[mt][nt][1] * inv[0]);
                    *reinterpret_cast<unsigned*>(os + (g + 8) * LD + col) =
                        Mma::pack(o[mt][nt][2] * inv[1], o[mt][nt][3] * inv[1]);
                }
                __syncwarp();
                for (int i = lane; i < 16 * CH; i += 32) {
                    const int r = i / CH, ch = i - r * CH;
                    if (trow + r < rows)
                        store16(out + (lo + m0 + trow + r) * row_stride + (i64)h * D + ch * 8,
                                load16(os + r * LD + ch * 8));
                }
            }
        }
        __syncthreads();   // q_s and buffer 0 are refilled by the next tile
    }
}

// ---------------------------------------------------------------------------
// v5: the same tiles of work on Hopper's warpgroup MMA (wgmma, sm_90a only;
// the host runs v3 elsewhere). mma.sync keeps v1-v4 issue-bound (CHALLENGES
// #25): one m16n8k16 per instruction, and every operand fragment loaded by
// ldmatrix. A wgmma m64nNk16 is one instruction for a 64 x N x 16 product
// whose A and B the tensor cores read straight from shared memory.
// - A CTA of 8 warps = 2 warpgroups owns 128 query rows; warpgroup w the 64
//   rows 64w..64w+63, warp i of it rows 16i..16i+15 of those. Key tiles of
//   BN = 128 tokens, double-buffered with cp.async as in v3 (same
//   block-table prefetch, shift/mask addressing, zero fill and bad flags).
// - S = Q K^T: D/16 wgmma m64nBNk16, Q and K from shared memory (K-major).
//   O += P V: BN/16 wgmma m64nDk16, P from registers (S's accumulators have
//   mma.sync's C layout, so P packs to the A fragment exactly as in v3), V
//   from shared memory read as the transposed (MN-major) operand.
// - Online softmax, masks, NaN rules and the staged 16-byte output stores
//   are v3's. Every sum still has a fixed order: bit-identical reruns.
// Shared memory holds each tile in wgmma's 128-byte-swizzle layout (the one
// TMA writes and FlashAttention-3 reads): the tile [R rows][D] is cut into
// D/64 column blocks [R][64]; a row of a block is 128 bytes, and 16-byte
// chunk c of row r sits at chunk position c ^ (r % 8) of its row, so any 8
// consecutive rows' same chunk fall in 8 different bank groups. Every tile
// starts on a 1024-byte boundary (the swizzle is computed on address bits).
//   element (r, col): (col / 64) R 64 + r 64 + 8 ((col % 64 / 8) ^ (r % 8)) + col % 8
// A tile copy gives 16-byte chunk i to row i / CH, chunk i % CH: 8 lanes
// read one token's 128 contiguous bytes and write one 128-byte row.
//   q_s [D/64][BM][64], k_s and v_s [stages][D/64][BN][64], bad_s [stages][BN] int
// (a first layout without swizzle, 8 x 16-byte core matrices, ran 0.67-0.77x
// v3 on the H100; this one 1.15-1.26x v3 at head dim 128: CHALLENGES #26).
// D = 128, BN = 128: 32 KB + 128 KB + 1 KB (+ 1 KB to align), v6's third
// stage 64 KB more (226.5 KB of 227); one CTA of 2 warpgroups per SM
// (ptxas sm_90a: v5 247 registers, v6 255 with 26 bytes of spill).
// Descriptors (PTX ISA "Matrix Descriptor Format", swizzle mode 128B):
//   Q, K (K-major):  stride byte offset 1024 (next 8 rows); k-step ks
//                    starts at column block ks / 4, byte 32 (ks % 4).
//   V (MN-major):    leading byte offset BN x 128 (next 64 head-dim
//                    columns), stride 1024 (next 8 keys); k-step kk starts
//                    at byte 2048 kk.
#include "wgmma.cuh"


#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading
// byte offset, stride byte offset 1024 (each >> 4), base offset 0 (tiles are
// 1024-byte aligned), layout type 1 in bits 62-63.
__device__ __forceinline__ unsigned long long pf_desc_sw128(unsigned addr, unsigned lbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

// Element offset of 16-byte chunk c16 (head-dim columns 8 c16..8 c16+7) of
// row r in a swizzled tile of R rows.
template <int R>
__device__ __forceinline__ int pf_sw(int r, int c16) {
    return (c16 >> 3) * R * 64 + r * 64 + (((c16 & 7) ^ (r & 7)) << 3);
}

// cp.async writes shared memory through the generic proxy; wgmma reads it
// through the async proxy. Each thread fences its own landed copies before
// the barrier that publishes them.
__device__ __forceinline__ void pf_fence_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// OVL (v6): FlashAttention-3's intra-warpgroup overlap. S of key tile j+1 is
// issued before O += P V of tile j, and the softmax of tile j+1 runs while
// the tensor cores do that P V; three K/V stages (tile j read by P V, j+1 by
// S, j+2 landing), one barrier a tile.
// v8 is v5's schedule at head dim 64 on 64-key tiles (S is 64 x 64 a
// warpgroup: 32 accumulators, P 16 registers, O 32), compiled for two blocks
// an SM (at most 128 registers a thread), so 4 warpgroups share an SM and
// one block's barriers and softmax run beside the other's MMAs. v7's
// head-dim-64 kernel holds 254 registers: one block of 8 warps an SM, its
// issue slots 45% busy (ncu). On the H100 (2026-11-26) v8 ran 1.16-1.26x
// v7 there; v7's ping-pong on the same 64-key tiles was 2-3% slower than
// v5's schedule, and the 64-key tiles at one block an SM 0.80-0.85x v7
// (CHALLENGES #30).
// PP (v7): ping-pong between the two warpgroups without a producer warp.
// Warpgroup 0 runs each tile as v5 does (S, softmax, P V); warpgroup 1 runs
// half a tile behind: after the barrier of tile j it first does the softmax
// and P V of tile j-1, then issues S of tile j. So while one warpgroup's
// exponentials run, the other's MMAs hold the tensor cores, in place of
// both doing the same at once. Three K/V stages (warpgroup 1 still reads
// V of tile j-1), one barrier a tile, every MMA waited for before it.
template <typename T, int D, int BN, bool OVL, bool PP = false>
__device__ void prefill_attention_wg_impl(T* __restrict__ out, const T* __restrict__ q,
                                          const T* __restrict__ k_cache,
                                          const T* __restrict__ v_cache,
                                          const int* __restrict__ cu_seqlens_q,
                                          const int* __restrict__ kv_lens,
                                          const int* __restrict__ block_tables, float scale,
                                          int total_q, int q_heads, int kv_heads, int block_size,
                                          int max_blocks_per_seq, int num_blocks) {
    constexpr int NTH = 256;                    // threads: 2 warpgroups
    constexpr int BM = 128;                     // query rows per CTA: 64 a warpgroup
    constexpr int CH = D / 8;                   // 16-byte chunks per row
    constexpr int NT_S = BN / 8;                // n8 tiles of S
    constexpr int NT_O = D / 8;                 // n8 tiles of O
    constexpr int NIT = BN * CH / NTH;  // chunks of a K (or V) tile per thread
    constexpr int QIT = BM * CH / NTH;  // chunks of the Q tile per thread
    static_assert(BN * CH % NTH == 0 && BM * CH % NTH == 0, "whole chunks");
    static_assert(D % 64 == 0 && BN % 8 == 0, "whole swizzle atoms");
    constexpr int NST = OVL || PP ? 3 : 2;      // K/V stages
    typedef PfMma<T> Mma;
    typedef PfWgmma<T, BN> WgS;
    typedef PfWgmma<T, D> WgO;

    extern __shared__ __align__(128) unsigned char pf5_smem[];
    // The swizzle needs 1024-byte-aligned tiles; the host adds 1 KB of room.
    const unsigned smem0 = pf_smem_addr(pf5_smem);
    T* q_s = reinterpret_cast<T*>(pf5_smem + (((smem0 + 1023) & ~1023u) - smem0));   // [D/64][BM][64]
    T* k_s = q_s + BM * D;                                     // [NST][D/64][BN][64]
    T* v_s = k_s + NST * BN * D;                               // [NST][D/64][BN][64]
    int* bad_s = reinterpret_cast<int*>(v_s + NST * BN * D);   // [NST][BN]

    const int h = blockIdx.x, b = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31;
    const int wg = tid >> 7, wwarp = (tid >> 5) & 3;   // warpgroup, warp in it
    const int g = lane >> 2, c4 = lane & 3;
    const int kvh = h / (q_heads / kv_heads);

    const int q0_raw = cu_seqlens_q[b], q1_raw = cu_seqlens_q[b + 1];
    const int lo = min(max(q0_raw, 0), total_q);
    const int hi = min(max(q1_raw, lo), total_q);
    const int q_len = hi - lo;
    const int kv_len = kv_lens[b];
    const bool ok = q0_raw == lo && q1_raw == hi && kv_len >= q_len &&
                    (i64)kv_len <= (i64)max_blocks_per_seq * block_size && aligned16(q) &&
                    aligned16(k_cache) && aligned16(v_cache) && aligned16(out);
    const int n_m = (q_len + BM - 1) / BM;
    const int ctx_off = kv_len - q_len;
    const int* table = block_tables + (i64)b * max_blocks_per_seq;
    const float sl2 = scale * PF_LOG2E;
    const i64 row_stride = (i64)q_heads * D;
    const int bs_shift = 31 - __clz(block_size), bs_mask = block_size - 1;
    const int tok_stride = kv_heads * D;
    const i64 blk_stride = (i64)block_size * tok_stride;

    for (int slot = blockIdx.z; slot < n_m; slot += gridDim.z) {
        const int m0 = (n_m - 1 - slot) * BM;
        const int rows = min(BM, q_len - m0);
        if (!ok) {
            for (int i = tid; i < rows * D; i += NTH) {
                const int r = i / D, d = i - r * D;
                out[(lo + m0 + r) * row_stride + (i64)h * D + d] = from_f32<T>(WB_NAN);
            }
            continue;
        }

        // Q tile: chunk i -> row i / CH, chunk i % CH.
        const T* q_tile = q + (lo + m0) * row_stride + (i64)h * D;
#pragma unroll
        for (int it = 0; it < QIT; ++it) {
            const int i = tid + it * NTH;
            const int r = i / CH, ch = i % CH;
            const bool live = r < rows;
            pf_cp_async16(pf_smem_addr(q_s + pf_sw<BM>(r, ch)), live ? q_tile + r * row_stride + ch * 8 : q,
                          live);
        }

        int blk_next[NIT];
        auto fetch_blocks = [&](int j) {
#pragma unroll
            for (int it = 0; it < NIT; ++it) {
                const int i = tid + it * NTH;
                const int tok = j * BN + i / CH;
                blk_next[it] = tok < kv_len ? table[tok >> bs_shift] : 0;
            }
        };
        auto issue_kv = [&](int j, int st) -> bool {
            bool bad = false;
            T* ks = k_s + st * BN * D;
            T* vs = v_s + st * BN * D;
#pragma unroll
            for (int it = 0; it < NIT; ++it) {
                const int i = tid + it * NTH;
                const int r = i / CH, ch = i % CH;
                const int tok = j * BN + r;
                const int blk = blk_next[it];
                const bool in_ctx = tok < kv_len;
                const bool blk_bad = in_ctx && (blk < 0 || blk >= num_blocks);
                const bool live = in_ctx && !blk_bad;
                const i64 off = (i64)blk * blk_stride + (tok & bs_mask) * tok_stride + kvh * D + ch * 8;
                if (ch == 0) bad_s[st * BN + r] = blk_bad;
                bad |= blk_bad;
                const int e = pf_sw<BN>(r, ch);
                pf_cp_async16(pf_smem_addr(ks + e), live ? k_cache + off : k_cache, live);
                pf_cp_async16(pf_smem_addr(vs + e), live ? v_cache + off : v_cache, live);
            }
            return bad;
        };

        const int kv_last = ctx_off + m0 + rows - 1;
        const int n_tiles = kv_last / BN + 1;

        // This warpgroup's rows wrow..wrow+63; this thread's two rows sit at
        // positions pos_a (row g of its warp's 16) and pos_a + 8.
        const int wrow = wg * 64;
        const bool wg_live = wrow < rows;
        const int wpos_min = ctx_off + m0 + wrow, wpos_max = wpos_min + 63;
        const int pos_a = wpos_min + wwarp * 16 + g;
        const unsigned q_base = pf_smem_addr(q_s) + wrow * 128;   // the warpgroup's rows
        // Warpgroup-uniform (wgmma is issued by all 128 threads together):
        // padding warpgroups and tiles wholly above their diagonal are skipped.
        auto tile_live = [&](int j) { return wg_live && j < n_tiles && j * BN <= wpos_max; };

        float m_r[2] = {WB_NEG_INF, WB_NEG_INF};
        float l_r[2] = {0.f, 0.f};
        bool row_bad[2] = {false, false};
        float o[D / 2];   // O [64][D] of the warpgroup, wgmma accumulator layout
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] = 0.f;

        // S = Q K^T of the tile in stage st (issued and committed, not waited).
        auto issue_s = [&](float (&s)[BN / 2], int st) {
            const unsigned k_base = pf_smem_addr(k_s + st * BN * D);
            pf_wg_fence();
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks)
                WgS::ss(s, pf_desc_sw128(q_base + (ks >> 2) * BM * 128 + (ks & 3) * 32, 16),
                        pf_desc_sw128(k_base + (ks >> 2) * BN * 128 + (ks & 3) * 32, 16), ks > 0);
            pf_wg_commit();
        };
        // O += P V of the tile in stage st, P in A fragments (committed, not waited).
        auto issue_pv = [&](const unsigned (&a)[BN / 16][4], int st) {
            const unsigned v_base = pf_smem_addr(v_s + st * BN * D);
            pf_wg_hold(o);
            pf_wg_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk)
                WgO::rs_tb(o, a[kk], pf_desc_sw128(v_base + kk * 2048, BN * 128), 1);
            pf_wg_commit();
        };
        // Masks, online softmax and P of tile j (stage st) from its S; returns
        // the factors O must be scaled by (corr) and whether any is not 1.
        auto softmax = [&](float (&s)[BN / 2], int j, int st, bool tile_bad, unsigned (&a)[BN / 16][4],
                           float (&corr)[2]) -> bool {
            const int n0 = j * BN;
            if (n0 + BN - 1 > pos_a - g || tile_bad) {   // some row of the warp sees the diagonal
#pragma unroll
                for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int col = n0 + nt * 8 + 2 * c4 + (e & 1);
                        const int pos = pos_a + (e < 2 ? 0 : 8);
                        if (col > pos) {
                            s[4 * nt + e] = WB_NEG_INF;
                        } else if (tile_bad && bad_s[st * BN + col - n0]) {
                            s[4 * nt + e] = WB_NEG_INF;
                            row_bad[e >> 1] = true;
                        }
                    }
                }
            }
            float mx[2] = {m_r[0], m_r[1]};
#pragma unroll
            for (int nt = 0; nt < NT_S; ++nt) {
                mx[0] = fmaxf(mx[0], fmaxf(s[4 * nt], s[4 * nt + 1]));
                mx[1] = fmaxf(mx[1], fmaxf(s[4 * nt + 2], s[4 * nt + 3]));
            }
            float mb[2];
            bool grew = false;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                mb[i] = mx[i] == WB_NEG_INF ? 0.f : mx[i] * sl2;
                const bool up = mx[i] > m_r[i];
                grew |= up;
                corr[i] = !up ? 1.f : (m_r[i] == WB_NEG_INF ? 0.f : pf_exp2<true>(m_r[i] * sl2 - mb[i]));
                m_r[i] = mx[i];
            }
            float rs[2] = {0.f, 0.f};
#pragma unroll
            for (int nt = 0; nt < NT_S; ++nt) {
                s[4 * nt] = pf_exp2<true>(fmaf(s[4 * nt], sl2, -mb[0]));
                s[4 * nt + 1] = pf_exp2<true>(fmaf(s[4 * nt + 1], sl2, -mb[0]));
                s[4 * nt + 2] = pf_exp2<true>(fmaf(s[4 * nt + 2], sl2, -mb[1]));
                s[4 * nt + 3] = pf_exp2<true>(fmaf(s[4 * nt + 3], sl2, -mb[1]));
                rs[0] += s[4 * nt] + s[4 * nt + 1];
                rs[1] += s[4 * nt + 2] + s[4 * nt + 3];
            }
            l_r[0] = l_r[0] * corr[0] + rs[0];
            l_r[1] = l_r[1] * corr[1] + rs[1];
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                a[kk][0] = Mma::pack(s[8 * kk], s[8 * kk + 1]);
                a[kk][1] = Mma::pack(s[8 * kk + 2], s[8 * kk + 3]);
                a[kk][2] = Mma::pack(s[8 * kk + 4], s[8 * kk + 5]);
                a[kk][3] = Mma::pack(s[8 * kk + 6], s[8 * kk + 7]);
            }
            return __any_sync(0xffffffffu, grew);   // warp-uniform: skip when every corr is 1
        };
        auto rescale = [&](const float (&corr)[2]) {
#pragma unroll
            for (int nt = 0; nt < NT_O; ++nt) {
                o[4 * nt] *= corr[0];
                o[4 * nt + 1] *= corr[0];
                o[4 * nt + 2] *= corr[1];
                o[4 * nt + 3] *= corr[1];
            }
        };

        if constexpr (PP) {
            // v7. Tile t in stage t % 3; its copies are issued after the
            // barrier of tile t-1, by which both warpgroups are done with
            // tile t-3 (warpgroup 1 reads V of tile j-1 during tile j).
            fetch_blocks(0);
            bool bad_pend = issue_kv(0, 0);
            if (n_tiles > 1) fetch_blocks(1);
            pf_cp_async_commit();
            float s[BN / 2];   // warpgroup 1: S of the tile behind, kept across the barrier
            bool bad_prev = false;
            for (int j = 0; j < n_tiles; ++j) {
                const int st = j % 3;
                pf_cp_async_wait<0>();
                pf_fence_async_shared();
                const bool tile_bad = __syncthreads_or(bad_pend) != 0;
                bad_pend = false;
                if (j + 1 < n_tiles) {
                    bad_pend = issue_kv(j + 1, (j + 1) % 3);
                    if (j + 2 < n_tiles) fetch_blocks(j + 2);
                }
                pf_cp_async_commit();
                unsigned a[BN / 16][4];
                float corr[2];
                if (wg == 0) {
                    if (tile_live(j)) {
                        issue_s(s, st);
                        pf_wg_wait<0>();
                        pf_wg_hold(s);
                        if (softmax(s, j, st, tile_bad, a, corr)) rescale(corr);
                        issue_pv(a, st);
                        pf_wg_wait<0>();
                        pf_wg_hold(o);
                    }
                } else {
                    if (j > 0 && tile_live(j - 1)) {
                        if (softmax(s, j - 1, (j - 1) % 3, bad_prev, a, corr)) rescale(corr);
                        issue_pv(a, (j - 1) % 3);
                    }
                    if (tile_live(j)) issue_s(s, st);
                    pf_wg_wait<0>();
                    pf_wg_hold(o);
                    pf_wg_hold(s);
                }
                bad_prev = tile_bad;
            }
            // Warpgroup 1's last tile (its stage is not refilled before the
            // barrier that ends this block of rows).
            if (wg == 1 && tile_live(n_tiles - 1)) {
                const int j = n_tiles - 1;
                unsigned a[BN / 16][4];
                float corr[2];
                if (softmax(s, j, j % 3, bad_prev, a, corr)) rescale(corr);
                issue_pv(a, j % 3);
                pf_wg_wait<0>();
                pf_wg_hold(o);
            }
        } else if constexpr (!OVL) {
            // v5: per tile, S, softmax, then P V, each waited for.
            fetch_blocks(0);
            bool bad_cur = issue_kv(0, 0), bad_next = false;
            if (n_tiles > 1) fetch_blocks(1);
            pf_cp_async_commit();
            for (int j = 0; j < n_tiles; ++j) {
                const int st = j & 1;
                if (j + 1 < n_tiles) {
                    bad_next = issue_kv(j + 1, st ^ 1);
                    if (j + 2 < n_tiles) fetch_blocks(j + 2);
                    pf_cp_async_commit();
                    pf_cp_async_wait<1>();
                } else {
                    pf_cp_async_wait<0>();
                }
                pf_fence_async_shared();
                const bool tile_bad = __syncthreads_or(bad_cur) != 0;
                bad_cur = bad_next;
                if (tile_live(j)) {
                    float s[BN / 2];   // S [64][BN]
                    issue_s(s, st);
                    pf_wg_wait<0>();
                    pf_wg_hold(s);
                    unsigned a[BN / 16][4];
                    float corr[2];
                    if (softmax(s, j, st, tile_bad, a, corr)) rescale(corr);
                    issue_pv(a, st);
                    pf_wg_wait<0>();
                    pf_wg_hold(o);
                }
                __syncthreads();   // buffer st is refilled with tile j+2 next iteration
            }
        } else {
            // v6. Group 0: Q and tile 0; group 1: tile 1 (empty past the context).
            fetch_blocks(0);
            const bool bad0 = issue_kv(0, 0);
            pf_cp_async_commit();
            bool bad_pend = false;   // this thread's flag for the tile in flight
            if (n_tiles > 1) {
                fetch_blocks(1);
                bad_pend = issue_kv(1, 1);
                if (n_tiles > 2) fetch_blocks(2);
            }
            pf_cp_async_commit();
            pf_cp_async_wait<1>();
            pf_fence_async_shared();
            const bool bad_t0 = __syncthreads_or(bad0) != 0;
            unsigned a[BN / 16][4];   // P of the tile whose P V comes next
            if (tile_live(0)) {
                float s[BN / 2];
                issue_s(s, 0);
                pf_wg_wait<0>();
                pf_wg_hold(s);
                float corr[2];
                softmax(s, 0, 0, bad_t0, a, corr);   // O is still 0: no rescale
            }
            for (int j = 0; j < n_tiles; ++j) {
                const int st = j % 3, st1 = (j + 1) % 3;
                // Tile j+1 has landed, and every warpgroup's P V of tile j-1 is
                // done: its stage takes tile j+2.
                pf_cp_async_wait<0>();
                pf_fence_async_shared();
                const bool bad_t1 = __syncthreads_or(bad_pend) != 0;
                bad_pend = false;
                if (j + 2 < n_tiles) {
                    bad_pend = issue_kv(j + 2, (j + 2) % 3);
                    if (j + 3 < n_tiles) fetch_blocks(j + 3);
                }
                pf_cp_async_commit();
                const bool live1 = tile_live(j + 1);   // implies tile_live(j)
                float s[BN / 2];                       // S of tile j+1
                if (live1) issue_s(s, st1);
                if (tile_live(j)) issue_pv(a, st);
                if (live1) {
                    pf_wg_wait<1>();   // S of j+1 done; P V of j may still run
                    pf_wg_hold(s);
                    unsigned a1[BN / 16][4];
                    float corr[2];
                    const bool any = softmax(s, j + 1, st1, bad_t1, a1, corr);
                    pf_wg_wait<0>();
                    pf_wg_hold(o);
                    if (any) rescale(corr);
#pragma unroll
                    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
                        for (int x = 0; x < 4; ++x) a[kk][x] = a1[kk][x];
                } else {
                    pf_wg_wait<0>();
                    pf_wg_hold(o);
                }
            }
        }

        if (wg_live) {
            float inv[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                float l = l_r[i];
                l += __shfl_xor_sync(0xffffffffu, l, 1);
                l += __shfl_xor_sync(0xffffffffu, l, 2);
                int bad = row_bad[i];
                bad |= __shfl_xor_sync(0xffffffffu, bad, 1);
                bad |= __shfl_xor_sync(0xffffffffu, bad, 2);
                inv[i] = bad ? WB_NAN : (l > 0.f ? 1.f / l : 0.f);
            }
            // Stage the warp's 16 rows in its own rows of q_s (same swizzled
            // layout: the 8 rows of a store fall in 8 bank groups), then store
            // 16 bytes a lane.
            const int trow = wrow + wwarp * 16;
            __syncwarp();
#pragma unroll
            for (int nt = 0; nt < NT_O; ++nt) {
                const int r = trow + g;
                *reinterpret_cast<unsigned*>(q_s + pf_sw<BM>(r, nt) + 2 * c4) =
                    Mma::pack(o[4 * nt] * inv[0], o[4 * nt + 1] * inv[0]);
                *reinterpret_cast<unsigned*>(q_s + pf_sw<BM>(r + 8, nt) + 2 * c4) =
                    Mma::pack(o[4 * nt + 2] * inv[1], o[4 * nt + 3] * inv[1]);
            }
            __syncwarp();
            for (int i = lane; i < 16 * CH; i += 32) {
                const int r = trow + i / CH, ch = i % CH;
                if (r < rows)
                    store16(out + (lo + m0 + r) * row_stride + (i64)h * D + ch * 8, load16(q_s + pf_sw<BM>(r, ch)));
            }
        }
        __syncthreads();
    }
}
#endif

// prefill_attention_{v5,v6,v7,v8}_d{D}_{bf16,f16}: sm_90a only (the host launches them
// nowhere else; on other targets the body traps).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PF5_BODY(T, D, BN, OVL, PP)                                                                 \
    prefill_attention_wg_impl<T, D, BN, OVL, PP>(out, q, k_cache, v_cache, cu_seqlens_q, kv_lens,            \
                                        block_tables, scale, total_q, q_heads, kv_heads,            \
                                        block_size, max_blocks_per_seq, num_blocks);
#else
#define PF5_BODY(T, D, BN, OVL, PP) __trap();
#endif
// MINB: blocks per SM the registers are budgeted for (v8's 2: at most 128
// registers a thread, so two blocks of 8 warps share an SM).
#define PF5_ENTRY(V, T, S, D, BN, OVL, PP, MINB)                                                      \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                         \
        prefill_attention_##V##_d##D##_##S(T* out, const T* q, const T* k_cache, const T* v_cache,     \
                                         const int* cu_seqlens_q, const int* kv_lens,               \
                                         const int* block_tables, float scale, int total_q,         \
                                         int q_heads, int kv_heads, int block_size,                 \
                                         int max_blocks_per_seq, int num_blocks) {                  \
        PF5_BODY(T, D, BN, OVL, PP)                                                                 \
    }
#define PF5_ENTRIES(T, S)                           \
    PF5_ENTRY(v5, T, S, 64, 128, false, false, 1)   \
    PF5_ENTRY(v5, T, S, 128, 128, false, false, 1)  \
    PF5_ENTRY(v6, T, S, 128, 128, true, false, 1)   \
    PF5_ENTRY(v7, T, S, 64, 128, false, true, 1)    \
    PF5_ENTRY(v7, T, S, 128, 128, false, true, 1)   \
    PF5_ENTRY(v8, T, S, 64, 64, false, false, 2)
PF5_ENTRIES(__nv_bfloat16, bf16)
PF5_ENTRIES(__half, f16)

// One entry point per (variant, head_dim, storage type):
// prefill_attention_{v1,v2,v3}_d{D}_{bf16,f16}. The host
// (src/prefill_attention.rs) keeps the same (D, BN) tables.
#define PF_ENTRY(V, MT, FAST, T, S, D, BN)                                                          \
    extern "C" __global__ void __launch_bounds__(PF_THREADS)                                        \
        prefill_attention_##V##_d##D##_##S(T* out, const T* q, const T* k_cache,                    \
                                            const T* v_cache, const int* cu_seqlens_q,              \
                                            const int* kv_lens, const int* block_tables,            \
                                            float scale, int total_q, int q_heads, int kv_heads,    \
                                            int block_size, int max_blocks_per_seq,                 \
                                            int num_blocks) {                                       \
        prefill_attention_impl<T, D, BN, MT, FAST>(out, q, k_cache, v_cache, cu_seqlens_q, kv_lens, \
                                             block_tables, scale, total_q, q_heads, kv_heads,       \
                                             block_size, max_blocks_per_seq, num_blocks);           \
    }
#define PF_ENTRIES(T, S)                  \
    PF_ENTRY(v1, 1, false, T, S, 64, 64)  \
    PF_ENTRY(v1, 1, false, T, S, 80, 64)  \
    PF_ENTRY(v1, 1, false, T, S, 96, 64)  \
    PF_ENTRY(v1, 1, false, T, S, 128, 64) \
    PF_ENTRY(v1, 1, false, T, S, 256, 32) \
    PF_ENTRY(v2, 2, false, T, S, 64, 32)  \
    PF_ENTRY(v2, 2, false, T, S, 96, 32)  \
    PF_ENTRY(v2, 2, false, T, S, 128, 32) \
    PF_ENTRY(v3, 2, true, T, S, 64, 64)   \
    PF_ENTRY(v3, 2, true, T, S, 96, 32)   \
    PF_ENTRY(v3, 2, true, T, S, 128, 32) \
    PF_ENTRY(v4, 1, true, T, S, 64, 64)   \
    PF_ENTRY(v4, 1, true, T, S, 96, 64)   \
    PF_ENTRY(v4, 1, true, T, S, 128, 64)
// 16-bit storage only: the tensor-core path has no f32 form (the launcher
// refuses f32 with an Unsupported error).
PF_ENTRIES(__nv_bfloat16, bf16)
PF_ENTRIES(__half, f16)
