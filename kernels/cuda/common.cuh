// common.cuh: device helpers shared by every kernel source.
//
// NVRTC takes no separate header files, so the runtime prepends this text to
// each kernel source before compiling it (see kernels/src/compile.rs). Keep it
// free of host code and of the C++ standard library: NVRTC has neither.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef long long i64;

// NVRTC has no <math.h>: spell the special values out.
#define WB_NAN __int_as_float(0x7fc00000)
#define WB_NEG_INF __int_as_float(0xff800000)

// Storage <-> f32 conversions. Every kernel stores bf16/f16/f32 and does its
// arithmetic in f32; one rounding happens at each store.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// A 16-byte vector of storage elements: one 128-bit load or store per thread.
template <typename T> struct alignas(16) Vec16 {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {
    Vec16<T> r;
    *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
    return r;
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const Vec16<T>& r) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

// Streaming 16-byte load and store (PTX `.cs`, evict-first in L1 and L2):
// for data touched exactly once, so it does not push reusable lines out.
template <typename T>
__device__ __forceinline__ Vec16<T> load16_cs(const T* p) {
    Vec16<T> r;
    uint4 u;
    asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
                 : "l"(p));
    *reinterpret_cast<uint4*>(&r) = u;
    return r;
}

template <typename T>
__device__ __forceinline__ void store16_cs(T* p, const Vec16<T>& r) {
    const uint4 u = *reinterpret_cast<const uint4*>(&r);
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.x), "r"(u.y),
                 "r"(u.z), "r"(u.w)
                 : "memory");
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// RoPE (rotate-half) on one 16-byte chunk: a holds x[i..i+N), b holds
// x[half+i..half+i+N) of one head; cs is the position's row of the
// [max_positions, head_dim] f32 table (cos in the first half, sin in the
// second). An invalid position gives NaN. Used by rope_kv_store.cu and by the
// fused decode attention, which must round exactly alike.
template <typename T>
__device__ __forceinline__ void rotate_chunk(Vec16<T>& a, Vec16<T>& b, const float* cs, int i, int half,
                                             bool valid) {
    constexpr int N = Vec16<T>::N;
    if (!valid) {
#pragma unroll
        for (int j = 0; j < N; ++j) a.v[j] = b.v[j] = from_f32<T>(WB_NAN);
        return;
    }
    float cv[N], sv[N];
#pragma unroll
    for (int j = 0; j < N; j += 4) {
        *reinterpret_cast<float4*>(cv + j) = *reinterpret_cast<const float4*>(cs + i + j);
        *reinterpret_cast<float4*>(sv + j) = *reinterpret_cast<const float4*>(cs + half + i + j);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const float x1 = to_f32(a.v[j]), x2 = to_f32(b.v[j]);
        a.v[j] = from_f32<T>(x1 * cv[j] - x2 * sv[j]);
        b.v[j] = from_f32<T>(x2 * cv[j] + x1 * sv[j]);
    }
}

// Adds a bias vector to a 16-byte vector, in f32, rounded once to T (as
// split_qkv_bias does); no-op without a bias.
template <typename T>
__device__ __forceinline__ Vec16<T> add_bias16(Vec16<T> x, const T* b) {
    if (b == nullptr) return x;
    const Vec16<T> y = load16(b);
#pragma unroll
    for (int j = 0; j < Vec16<T>::N; ++j) x.v[j] = from_f32<T>(to_f32(x.v[j]) + to_f32(y.v[j]));
    return x;
}

// Programmatic dependent launch (sm_90+): with the launch attribute set
// (kernels/src/launch.rs, `Gpu::set_pdl`), a kernel may start while the
// previous kernel of the stream is still draining. pdl_wait() blocks until
// that kernel has completed and its writes are visible; a kernel launched
// that way must call it before reading what the previous kernel writes and
// before writing anything. Without the attribute (or before sm_90) it
// returns at once.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (MAX false) or max (MAX true) over the whole block (blockDim.x a
// multiple of 32, at most 1024). `scratch` holds 32 floats of shared
// memory; every thread gets the result. The max is exact in any order and
// ignores NaN, as fmaxf does.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const float t = lane < warps ? scratch[lane] : (MAX ? WB_NEG_INF : 0.f);
    return MAX ? warp_max(t) : warp_sum(t);
}
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    return block_reduce<false>(v, scratch);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    return block_reduce<true>(v, scratch);
}

// Instantiate `extern "C"` entry points named NAME_bf16, NAME_f16 and NAME_f32
// from a template kernel body. The macro keeps one source per kernel while the
// host picks the symbol by storage type.
#define WB_FOR_EACH_DTYPE(X) \
    X(__nv_bfloat16, bf16)   \
    X(__half, f16)           \
    X(float, f32)
