// rmsnorm.cu: RMSNorm, plain and fused with the residual add.
//
//   plain:  out[t, :] = x[t, :] * rsqrt(mean(x[t, :]^2) + eps) * weight
//   fused:  residual[t, :] = round_T(x[t, :] + residual[t, :])      (in place)
//           out[t, :]      = RMSNorm(residual[t, :]) * weight
//
//   partials: fused, with x = round_T(p[0] + p[1] + ...) summed in f32 in split
//           order from f32 partials p [splits, tokens, hidden] (the split-K
//           GEMM's output, kernels/src/linear.rs `linear_split_k`; v1 only).
//
// Shapes: x, residual, out [tokens, hidden]; weight [hidden]. Any hidden >= 1.
// Rounding point (as HF transformers' Qwen2RMSNorm + residual): the sum is
// rounded to the storage type T first and that rounded value is normalized,
// so the residual stream the next layer reads is exactly what was normalized.
// Unlike HF, which rounds the normalized value to T before multiplying by the
// weight, we multiply in f32 and round once at the store.
//
// v1: one block per row. Pass 1 accumulates the sum of squares in f32 (squares of
// bf16 values near 6e4 would overflow f16, never f32); pass 2 re-reads the row
// (from L1/L2) and writes the output. When the block has a thread per 16-byte
// vector of the row, the row and its weights stay in registers instead
// (no second read; the weight load overlaps the row's). 16-byte vectors are used when every
// row starts 16-byte aligned (hidden a multiple of 16/sizeof(T)); other
// hidden sizes take the scalar path.
//
// v2: one warp per row, 4 rows per 128-thread block, the row held in
// registers between the two passes (up to 16 vectors per lane: hidden <= 4096
// in bf16), so x/residual are read once and no __syncthreads is needed. The
// launcher sends longer rows to v1's block-per-row kernel; rows that are not
// vector-aligned take a scalar warp-per-row loop.

// x of row `base` element i given as `splits` f32 partial sums `stride`
// apart (partials mode): their sum in split order, rounded to T once, as
// the unsplit GEMM would have stored it.
template <typename T>
__device__ __forceinline__ T sum_partials(const float* p, int splits, i64 stride) {
    float v = p[0];
    for (int s = 1; s < splits; ++s) v += p[s * stride];
    return from_f32<T>(v);
}

template <typename T>
__device__ __forceinline__ Vec16<T> sum_partials16(const float* p, int splits, i64 stride) {
    constexpr int N = Vec16<T>::N;
    static_assert(N % 4 == 0, "16-bit storage: 8 values, two float4 per split");
    float4 acc[N / 4];
#pragma unroll
    for (int q = 0; q < N / 4; ++q) acc[q] = reinterpret_cast<const float4*>(p)[q];
    for (int s = 1; s < splits; ++s) {
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
            const float4 b = reinterpret_cast<const float4*>(p + s * stride)[q];
            acc[q].x += b.x;
            acc[q].y += b.y;
            acc[q].z += b.z;
            acc[q].w += b.w;
        }
    }
    Vec16<T> a;
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
        a.v[4 * q] = from_f32<T>(acc[q].x);
        a.v[4 * q + 1] = from_f32<T>(acc[q].y);
        a.v[4 * q + 2] = from_f32<T>(acc[q].z);
        a.v[4 * q + 3] = from_f32<T>(acc[q].w);
    }
    return a;
}

// kPartials (with kFused): x comes as `splits` f32 partials [splits, tokens,
// hidden], `part_stride` = tokens * hidden apart (linear_split_k's output).
template <typename T, bool kFused, bool kPartials = false>
__device__ void rmsnorm_row(T* __restrict__ out, T* __restrict__ residual,
                            const T* __restrict__ x, const T* __restrict__ weight,
                            float eps, int hidden, const float* __restrict__ partials = nullptr,
                            int splits = 0, i64 part_stride = 0) {
    pdl_wait();
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    const i64 base = (i64)row * hidden;
    const T* xr = kPartials ? nullptr : x + base;
    const float* pr = kPartials ? partials + base : nullptr;
    T* rr = kFused ? residual + base : nullptr;
    T* orow = out + base;
    constexpr int N = Vec16<T>::N;
    const bool vec = (hidden % N == 0) && aligned16(out) && aligned16(weight) &&
                     (!kFused || aligned16(residual)) &&
                     (kPartials ? N % 4 == 0 && aligned16(partials) && part_stride % 4 == 0
                                : aligned16(x));

    if (vec && hidden <= (int)blockDim.x * N) {
        // One vector per thread (every Qwen2 width: the launcher gives a
        // thread per vector up to 1024): the row and its weights stay in
        // registers, so the second pass loads nothing and the weight load
        // overlaps the first. Same values and roundings as the loops below.
        const int i = threadIdx.x * N;
        const bool live = i < hidden;
        Vec16<T> a, w;
        float ss = 0.f;
        if (live) {
            w = load16(weight + i);
            a = kPartials ? sum_partials16<T>(pr + i, splits, part_stride) : load16(xr + i);
            if (kFused) {
                Vec16<T> r = load16(rr + i);
#pragma unroll
                for (int j = 0; j < N; ++j) a.v[j] = from_f32<T>(to_f32(a.v[j]) + to_f32(r.v[j]));
                store16(rr + i, a);
            }
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const float f = to_f32(a.v[j]);
                ss += f * f;
            }
        }
        const float rstd = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
        if (live) {
            Vec16<T> o;
#pragma unroll
            for (int j = 0; j < N; ++j) o.v[j] = from_f32<T>(to_f32(a.v[j]) * rstd * to_f32(w.v[j]));
            store16(orow + i, o);
        }
        return;
    }

    float ss = 0.f;
    if (vec) {
        for (int i = threadIdx.x * N; i < hidden; i += blockDim.x * N) {
            Vec16<T> a = kPartials ? sum_partials16<T>(pr + i, splits, part_stride) : load16(xr + i);
            if (kFused) {
                Vec16<T> r = load16(rr + i);
#pragma unroll
                for (int j = 0; j < N; ++j) a.v[j] = from_f32<T>(to_f32(a.v[j]) + to_f32(r.v[j]));
                store16(rr + i, a);
            }
#pragma unroll
            for (int j = 0; j < N; ++j) {
                float f = to_f32(a.v[j]);
                ss += f * f;
            }
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            T a = kPartials ? sum_partials<T>(pr + i, splits, part_stride) : xr[i];
            if (kFused) {
                a = from_f32<T>(to_f32(a) + to_f32(rr[i]));
                rr[i] = a;
            }
            float f = to_f32(a);
            ss += f * f;
        }
    }
    const float total = block_sum(ss, scratch);
    const float rstd = rsqrtf(total / (float)hidden + eps);

    // Pass 2 reads back exactly what this thread read or wrote in pass 1.
    const T* src = kFused ? rr : xr;
    if (vec) {
        for (int i = threadIdx.x * N; i < hidden; i += blockDim.x * N) {
            Vec16<T> a = load16(src + i);
            Vec16<T> w = load16(weight + i);
            Vec16<T> o;
#pragma unroll
            for (int j = 0; j < N; ++j) o.v[j] = from_f32<T>(to_f32(a.v[j]) * rstd * to_f32(w.v[j]));
            store16(orow + i, o);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            orow[i] = from_f32<T>(to_f32(src[i]) * rstd * to_f32(weight[i]));
        }
    }
}

#define RMS_V2_ROWS 4
#define RMS_V2_MAXV 16

template <typename T, bool kFused>
__device__ void rmsnorm_v2_rows(T* __restrict__ out, T* __restrict__ residual,
                                const T* __restrict__ x, const T* __restrict__ weight, float eps,
                                int tokens, int hidden) {
    pdl_wait();
    constexpr int N = Vec16<T>::N;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * RMS_V2_ROWS + (threadIdx.x >> 5);
    if (row >= tokens) return;
    const i64 base = (i64)row * hidden;
    const bool vec = hidden % N == 0 && hidden / N <= 32 * RMS_V2_MAXV && aligned16(x) &&
                     aligned16(out) && aligned16(weight) && (!kFused || aligned16(residual));
    if (!vec) {
        // Scalar warp-per-row fallback: two passes over global memory.
        float ss = 0.f;
        for (int i = lane; i < hidden; i += 32) {
            T a = x[base + i];
            if (kFused) {
                a = from_f32<T>(to_f32(a) + to_f32(residual[base + i]));
                residual[base + i] = a;
            }
            const float f = to_f32(a);
            ss += f * f;
        }
        const float rstd = rsqrtf(warp_sum(ss) / (float)hidden + eps);
        const T* src = kFused ? residual + base : x + base;
        for (int i = lane; i < hidden; i += 32)
            out[base + i] = from_f32<T>(to_f32(src[i]) * rstd * to_f32(weight[i]));
        return;
    }
    const int nvec = hidden / N;
    Vec16<T> a[RMS_V2_MAXV];
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < RMS_V2_MAXV; ++u) {
        const int i = (lane + 32 * u) * N;
        if (lane + 32 * u < nvec) {
            a[u] = load16(x + base + i);
            if (kFused) {
                Vec16<T> r = load16(residual + base + i);
#pragma unroll
                for (int j = 0; j < N; ++j) a[u].v[j] = from_f32<T>(to_f32(a[u].v[j]) + to_f32(r.v[j]));
                store16(residual + base + i, a[u]);
            }
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const float f = to_f32(a[u].v[j]);
                ss += f * f;
            }
        }
    }
    const float rstd = rsqrtf(warp_sum(ss) / (float)hidden + eps);
#pragma unroll
    for (int u = 0; u < RMS_V2_MAXV; ++u) {
        const int i = (lane + 32 * u) * N;
        if (lane + 32 * u < nvec) {
            Vec16<T> w = load16(weight + i);
            Vec16<T> o;
#pragma unroll
            for (int j = 0; j < N; ++j) o.v[j] = from_f32<T>(to_f32(a[u].v[j]) * rstd * to_f32(w.v[j]));
            store16(out + base + i, o);
        }
    }
}

#define WB_RMSNORM(T, S)                                                                        \
    extern "C" __global__ void rmsnorm_##S(T* out, const T* x, const T* weight, float eps,     \
                                           int hidden) {                                        \
        rmsnorm_row<T, false>(out, nullptr, x, weight, eps, hidden);                            \
    }                                                                                           \
    extern "C" __global__ void fused_add_rmsnorm_##S(T* out, T* residual, const T* x,          \
                                                     const T* weight, float eps, int hidden) { \
        rmsnorm_row<T, true>(out, residual, x, weight, eps, hidden);                            \
    }                                                                                           \
    extern "C" __global__ void fused_add_rmsnorm_partials_##S(                                 \
        T* out, T* residual, const float* partials, int splits, i64 part_stride,                \
        const T* weight, float eps, int hidden) {                                               \
        rmsnorm_row<T, true, true>(out, residual, nullptr, weight, eps, hidden, partials,       \
                                   splits, part_stride);                                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * RMS_V2_ROWS)                              \
        rmsnorm_v2_##S(T* out, const T* x, const T* weight, float eps, int tokens, int hidden) { \
        rmsnorm_v2_rows<T, false>(out, nullptr, x, weight, eps, tokens, hidden);                \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * RMS_V2_ROWS)                              \
        fused_add_rmsnorm_v2_##S(T* out, T* residual, const T* x, const T* weight, float eps,   \
                                 int tokens, int hidden) {                                      \
        rmsnorm_v2_rows<T, true>(out, residual, x, weight, eps, tokens, hidden);                \
    }
WB_FOR_EACH_DTYPE(WB_RMSNORM)
