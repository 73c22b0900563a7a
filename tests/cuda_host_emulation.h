// Just enough of CUDA to run qpeft's kernels on the CPU, for
// tests/cuda_emulator.py: one OS thread per CUDA thread, a std::barrier per
// thread block (__syncthreads) and per warp (shuffles), blocks one after
// another (so `__shared__` can be a static). Float intrinsics map to the
// IEEE operations they name (compiled with -ffp-contract=off).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>

#define QPEFT_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __constant__
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(x)

struct qe_dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local qe_dim3 threadIdx, blockIdx;
inline qe_dim3 blockDim, gridDim;

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

template <class T> inline T max(T a, T b) { return a > b ? a : b; }
template <class T> inline T min(T a, T b) { return a < b ? a : b; }
template <class T> inline T __ldg(const T* p) { return *p; }

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

inline float qpeft_host_f16_to_f32(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short qpeft_host_f32_to_f16(float v) { _Float16 x = (_Float16)v; unsigned short h; std::memcpy(&h, &x, 2); return h; }

inline std::unique_ptr<std::barrier<>> qe_block_barrier;
inline std::unique_ptr<std::barrier<>> qe_warp_barrier[32];
inline unsigned long long qe_slots[32][32];

inline void __syncthreads() { qe_block_barrier->arrive_and_wait(); }

template <class T> inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    qe_slots[w][l] = bits;
    qe_warp_barrier[w]->arrive_and_wait();
    bits = qe_slots[w][l ^ lane_mask];
    qe_warp_barrier[w]->arrive_and_wait();
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}

inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    std::atomic_ref<unsigned long long> a(*p);
    unsigned long long old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {}
    return old;
}

extern "C" void qe_begin_block(unsigned block, unsigned threads, unsigned grid) {
    blockDim.x = threads;
    gridDim.x = grid;
    (void)block;
    qe_block_barrier = std::make_unique<std::barrier<>>(threads);
    for (unsigned w = 0; w < threads / 32; ++w) qe_warp_barrier[w] = std::make_unique<std::barrier<>>(32);
}
extern "C" void qe_set_thread(unsigned thread, unsigned block) { threadIdx.x = thread; blockIdx.x = block; }
// A thread that returned from the kernel no longer holds up the others.
extern "C" void qe_exit_thread() {
    qe_block_barrier->arrive_and_drop();
    qe_warp_barrier[threadIdx.x / 32]->arrive_and_drop();
}
