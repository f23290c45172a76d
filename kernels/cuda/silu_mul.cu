// silu_mul.cu: the SwiGLU activation of Qwen2's MLP.
//
//   out[t, i] = silu(input[t, i]) * input[t, I + i],  silu(g) = g / (1 + exp(-g))
//
// Shapes: input [tokens, 2*I] laid out gate | up (the fused gate_up projection's
// output); out [tokens, I]. f32 arithmetic, one rounding at the store (HF
// rounds silu(gate) to T before the multiply; the difference is under one ulp).
//
// v1: a grid-stride loop over tokens*I elements; 16-byte vectors when I is a
//     multiple of 16/sizeof(T) and the pointers are aligned. Each iteration
//     divides a 64-bit index, which sits on the critical path of small shapes.
// v2: U vectors per thread over the flat [tokens, I/N] vector index in 32-bit
//     arithmetic (the launcher guarantees tokens*I/N < 2^32), every load issued
//     before the first store; U = 4 for large shapes, 1 for small ones, where
//     spreading over more blocks beats fewer, longer threads. Vector case only:
//     the launcher sends unaligned shapes to v1.
// v3: v2 with streaming (evict-first) loads and stores: each byte is touched
//     once, so nothing is worth keeping in L2.
// v4: no division at all: blockIdx.x is the token and blockIdx.y a run of
//     blockDim.x vectors of its row, one vector of gate and one of up per
//     thread (FlashInfer's layout of the work). Vector case only.
// v5: v4 with silu(g) = __fdividef(g, 1 + __expf(-g)) on the special function
//     unit (one MUFU.EX2 and one MUFU.RCP an element) instead of IEEE expf and
//     division. For bf16 the compiled v5 (sm_90a, NVRTC 13) is 144 straight-line
//     instructions a thread with no call and one branch, where v4 is 368 with
//     8 slow-path calls and 25 branches. At 1-8 tokens the kernel is one load,
//     N silus and one store on a few SMs, so that chain is the time
//     (CHALLENGES #23). __expf's relative error is about 2^-21.5 + 2^-24 * |g|
//     * log2(e), under 5e-6 for |g| <= 80, and __fdividef's 2 ulp: far below a
//     bf16/f16 output's rounding; f32 storage keeps the IEEE path (its check
//     allows 1e-5 and should not be spent on this). exp overflow (g < -88)
//     gives g * rcp(inf) = -0, the right limit.

__device__ __forceinline__ float silu_f32(float g) {
    // exp(-g) overflows to inf for g < -88: g / inf = -0, the right limit.
    return g / (1.f + expf(-g));
}

template <typename T>
__device__ void silu_mul_impl(T* __restrict__ out, const T* __restrict__ input, i64 tokens,
                              int inter) {
    pdl_wait();
    constexpr int N = Vec16<T>::N;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (inter % N == 0 && aligned16(out) && aligned16(input)) {
        const int per_row = inter / N;
        const i64 total = tokens * per_row;
        for (i64 v = first; v < total; v += stride) {
            const i64 t = v / per_row;
            const int i = (int)(v - t * per_row) * N;
            const T* row = input + t * 2 * inter;
            Vec16<T> g = load16(row + i);
            Vec16<T> u = load16(row + inter + i);
            Vec16<T> o;
#pragma unroll
            for (int j = 0; j < N; ++j) o.v[j] = from_f32<T>(silu_f32(to_f32(g.v[j])) * to_f32(u.v[j]));
            store16(out + t * inter + i, o);
        }
    } else {
        const i64 total = tokens * inter;
        for (i64 e = first; e < total; e += stride) {
            const i64 t = e / inter;
            const int i = (int)(e - t * inter);
            const T* row = input + t * 2 * inter;
            out[e] = from_f32<T>(silu_f32(to_f32(row[i])) * to_f32(row[inter + i]));
        }
    }
}

template <typename T, int U, bool STREAM>
__device__ void silu_mul_v2_impl(T* __restrict__ out, const T* __restrict__ input,
                                 unsigned total, unsigned per_row, int inter) {
    pdl_wait();
    constexpr int N = Vec16<T>::N;
    const unsigned first = blockIdx.x * (blockDim.x * U) + threadIdx.x;
    Vec16<T> g[U], u[U];
    unsigned t[U], c[U];
#pragma unroll
    for (int j = 0; j < U; ++j) {
        const unsigned v = first + j * blockDim.x;
        t[j] = v / per_row;  // unsigned 32-bit: a few instructions, not a call
        c[j] = (v - t[j] * per_row) * N;
        if (v < total) {
            const T* row = input + (i64)t[j] * 2 * inter + c[j];
            g[j] = STREAM ? load16_cs(row) : load16(row);
            u[j] = STREAM ? load16_cs(row + inter) : load16(row + inter);
        }
    }
#pragma unroll
    for (int j = 0; j < U; ++j) {
        if (first + j * blockDim.x >= total) break;
        Vec16<T> o;
#pragma unroll
        for (int e = 0; e < N; ++e)
            o.v[e] = from_f32<T>(silu_f32(to_f32(g[j].v[e])) * to_f32(u[j].v[e]));
        T* dst = out + (i64)t[j] * inter + c[j];
        if (STREAM) store16_cs(dst, o);
        else store16(dst, o);
    }
}

__device__ __forceinline__ float silu_fast_f32(float g) {
    return __fdividef(g, 1.f + __expf(-g));
}

template <typename T, bool FAST>
__device__ void silu_mul_v4_impl(T* __restrict__ out, const T* __restrict__ input, int inter) {
    pdl_wait();
    constexpr int N = Vec16<T>::N;
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * N;
    if (c >= inter) return;
    const T* row = input + (i64)blockIdx.x * 2 * inter;
    const Vec16<T> g = load16(row + c), u = load16(row + inter + c);
    Vec16<T> o;
#pragma unroll
    for (int e = 0; e < N; ++e) {
        const float x = to_f32(g.v[e]);
        const float si = FAST && sizeof(T) < 4 ? silu_fast_f32(x) : silu_f32(x);
        o.v[e] = from_f32<T>(si * to_f32(u.v[e]));
    }
    store16(out + (i64)blockIdx.x * inter + c, o);
}

#define WB_SILU_MUL(T, S)                                                                    \
    extern "C" __global__ void silu_mul_##S(T* out, const T* input, i64 tokens, int inter) { \
        silu_mul_impl<T>(out, input, tokens, inter);                                         \
    }                                                                                        \
    extern "C" __global__ void silu_mul_v2u1_##S(T* out, const T* input, unsigned total,     \
                                                 unsigned per_row, int inter) {              \
        silu_mul_v2_impl<T, 1, false>(out, input, total, per_row, inter);                    \
    }                                                                                        \
    extern "C" __global__ void silu_mul_v2u4_##S(T* out, const T* input, unsigned total,     \
                                                 unsigned per_row, int inter) {              \
        silu_mul_v2_impl<T, 4, false>(out, input, total, per_row, inter);                    \
    }                                                                                        \
    extern "C" __global__ void silu_mul_v3u1_##S(T* out, const T* input, unsigned total,     \
                                                 unsigned per_row, int inter) {              \
        silu_mul_v2_impl<T, 1, true>(out, input, total, per_row, inter);                     \
    }                                                                                        \
    extern "C" __global__ void silu_mul_v3u4_##S(T* out, const T* input, unsigned total,     \
                                                 unsigned per_row, int inter) {              \
        silu_mul_v2_impl<T, 4, true>(out, input, total, per_row, inter);                     \
    }                                                                                        \
    extern "C" __global__ void silu_mul_v4_##S(T* out, const T* input, int inter) {          \
        silu_mul_v4_impl<T, false>(out, input, inter);                                       \
    }                                                                                        \
    extern "C" __global__ void silu_mul_v5_##S(T* out, const T* input, int inter) {          \
        silu_mul_v4_impl<T, true>(out, input, inter);                                        \
    }
WB_FOR_EACH_DTYPE(WB_SILU_MUL)
