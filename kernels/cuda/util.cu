// util.cu: device helpers for measurement, not kernels of the model.
//
// fill_random_*: fill a buffer with hashed uniform values in [lo, hi), so
// perf inputs are random (never zeros) without a host round trip at GB sizes.
// copy_vec16: a grid-stride 16-byte copy, one of the two bandwidth ceilings
// (the other is cuMemcpyDtoD); it unrolls 4 independent loads per thread so
// enough bytes are in flight to saturate HBM.

__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
    // splitmix64 finalizer
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

template <typename T>
__device__ void fill_random_impl(T* out, i64 n, unsigned long long seed, float lo, float hi) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const unsigned long long h = mix64(seed ^ mix64((unsigned long long)i));
        const float u = (float)(h >> 40) * (1.0f / 16777216.0f);  // 24 bits in [0, 1)
        out[i] = from_f32<T>(lo + (hi - lo) * u);
    }
}

#define WB_FILL(T, S)                                                                      \
    extern "C" __global__ void fill_random_##S(T* out, i64 n, unsigned long long seed,     \
                                               float lo, float hi) {                       \
        fill_random_impl<T>(out, n, seed, lo, hi);                                         \
    }
WB_FOR_EACH_DTYPE(WB_FILL)

extern "C" __global__ void copy_vec16(uint4* __restrict__ dst, const uint4* __restrict__ src,
                                      i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
        dst[i] = a;
        dst[i + stride] = b;
        dst[i + 2 * stride] = c;
        dst[i + 3 * stride] = d;
    }
    for (; i < n; i += stride) dst[i] = src[i];
}

// gather_rows_*: out[i, :] = src[idx[i], :] for out [n, cols], src [rows, cols],
// idx [n] i32 (the engine's embedding lookup, and the pick of each sequence's
// last hidden row before the LM head). An index outside [0, rows) writes NaN
// (a caller bug made visible, never an out-of-bounds read). 16-byte copies
// when cols is a multiple of the vector width; one block per output row.
template <typename T>
__device__ void gather_rows_impl(T* __restrict__ out, const T* __restrict__ src,
                                 const int* __restrict__ idx, int rows, int cols) {
    pdl_wait();
    const int i = blockIdx.x;
    const int r = idx[i];
    T* o = out + (i64)i * cols;
    if (r < 0 || r >= rows) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = from_f32<T>(WB_NAN);
        return;
    }
    const T* s = src + (i64)r * cols;
    constexpr int N = Vec16<T>::N;
    if (cols % N == 0) {
        for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) store16(o + c, load16(s + c));
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = s[c];
    }
}

#define WB_GATHER(T, S)                                                                    \
    extern "C" __global__ void gather_rows_##S(T* out, const T* src, const int* idx,       \
                                               int rows, int cols) {                       \
        gather_rows_impl<T>(out, src, idx, rows, cols);                                    \
    }
WB_FOR_EACH_DTYPE(WB_GATHER)

// sample_rows_*: one token per row of logits [n, vocab] (row stride ld).
// inv_temp[i] == 0 is greedy (argmax); otherwise the Gumbel-max trick:
// argmax_j(logit_j / T + G_j), G_j = -log(-log u_j), u_j from a hash of
// (seeds[i], j), which draws j with probability softmax(logits / T)_j exactly
// (up to f32 rounding of the keys). Ties go to the lowest index, so a row is
// deterministic for a given seed. NaN logits never win (fmaxf-style compare);
// a row of all NaN gives -1. One block of 512 threads per row.
#define SR_THREADS 512
template <typename T>
__device__ void sample_rows_impl(int* __restrict__ out, const T* __restrict__ logits, i64 ld,
                                 int vocab, const float* __restrict__ inv_temp,
                                 const unsigned long long* __restrict__ seeds) {
    __shared__ float s_key[SR_THREADS / 32];
    __shared__ int s_idx[SR_THREADS / 32];
    const int row = blockIdx.x;
    const T* l = logits + (i64)row * ld;
    const float it = inv_temp[row];
    const unsigned long long seed = seeds[row];
    float best = WB_NEG_INF;
    int best_j = -1;
    for (int j = threadIdx.x; j < vocab; j += SR_THREADS) {
        float key = to_f32(l[j]);
        if (it != 0.f) {
            const unsigned long long h = mix64(seed ^ mix64((unsigned long long)j));
            // 24 bits, centred in (0, 1): never 0 or 1, so both logs are finite.
            const float u = ((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
            key = key * it - logf(-logf(u));
        }
        if (key > best) {  // false for NaN; strided j rises, so ties keep the lowest
            best = key;
            best_j = j;
        }
    }
    // Warp then block argmax; ties (and -inf against -inf) resolve to the lower index.
    for (int o = 16; o > 0; o >>= 1) {
        const float k2 = __shfl_xor_sync(0xffffffffu, best, o);
        const int j2 = __shfl_xor_sync(0xffffffffu, best_j, o);
        if (j2 >= 0 && (best_j < 0 || k2 > best || (k2 == best && j2 < best_j))) {
            best = k2;
            best_j = j2;
        }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        s_key[warp] = best;
        s_idx[warp] = best_j;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float bk = s_key[0];
        int bj = s_idx[0];
        for (int w = 1; w < SR_THREADS / 32; ++w) {
            const float k2 = s_key[w];
            const int j2 = s_idx[w];
            if (j2 >= 0 && (bj < 0 || k2 > bk || (k2 == bk && j2 < bj))) {
                bk = k2;
                bj = j2;
            }
        }
        out[row] = bj;
    }
}

#define WB_SAMPLE(T, S)                                                                         \
    extern "C" __global__ void __launch_bounds__(SR_THREADS)                                    \
        sample_rows_##S(int* out, const T* logits, i64 ld, int vocab, const float* inv_temp,    \
                        const unsigned long long* seeds) {                                      \
        sample_rows_impl<T>(out, logits, ld, vocab, inv_temp, seeds);                           \
    }
WB_FOR_EACH_DTYPE(WB_SAMPLE)

// split_qkv_bias_*: a fused q|k|v projection output qkv [rows, qd + 2kd]
// plus its bias [qd + 2kd] (the reference half of qkv_rope_kv_store's
// bit-identity test; the engine uses the fused kernel), split into contiguous
// q [rows, qd], k [rows, kd], v [rows, kd]. The GEMM's output is already
// rounded to T; the bias is added in f32 and rounded once. Grid-stride over
// rows x (qd + 2kd), one element per thread and step.
template <typename T>
__device__ void split_qkv_bias_impl(T* __restrict__ q, T* __restrict__ k, T* __restrict__ v,
                                    const T* __restrict__ qkv, const T* __restrict__ bias,
                                    i64 rows, int qd, int kd) {
    const int w = qd + 2 * kd;
    const i64 n = rows * w;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const i64 r = i / w;
        const int c = (int)(i - r * w);
        const T y = from_f32<T>(to_f32(qkv[i]) + to_f32(bias[c]));
        if (c < qd)
            q[r * qd + c] = y;
        else if (c < qd + kd)
            k[r * kd + (c - qd)] = y;
        else
            v[r * kd + (c - qd - kd)] = y;
    }
}

#define WB_SPLIT_QKV(T, S)                                                                  \
    extern "C" __global__ void split_qkv_bias_##S(T* q, T* k, T* v, const T* qkv,          \
                                                  const T* bias, i64 rows, int qd, int kd) { \
        split_qkv_bias_impl<T>(q, k, v, qkv, bias, rows, qd, kd);                           \
    }
WB_FOR_EACH_DTYPE(WB_SPLIT_QKV)
