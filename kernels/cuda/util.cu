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

// add_bias_*: y[r, c] += b[c] for y [rows, cols] (the q/k/v projection biases,
// after the cuBLAS GEMM). f32 arithmetic, one rounding.
template <typename T>
__device__ void add_bias_impl(T* y, const T* b, i64 rows, int cols) {
    const i64 n = rows * cols;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = from_f32<T>(to_f32(y[i]) + to_f32(b[i % cols]));
}

#define WB_ADD_BIAS(T, S)                                                                  \
    extern "C" __global__ void add_bias_##S(T* y, const T* b, i64 rows, int cols) {       \
        add_bias_impl<T>(y, b, rows, cols);                                                \
    }
WB_FOR_EACH_DTYPE(WB_ADD_BIAS)
