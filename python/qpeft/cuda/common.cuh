// Shared pieces of qpeft's CUDA kernels: element types as raw bits, float
// conversions that round exactly as rust/src/elem.rs does, and block-wide
// reductions. No CUDA headers are needed, so NVRTC compiles every kernel
// with nothing but libnvrtc (the CI compile check relies on that).
//
// Every float operation whose rounding matters is written with an explicit
// _rn intrinsic, so the results do not depend on --fmad (contraction of a
// multiply and an add into one FMA would change the last bit).
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// Element types: float32, and 16-bit floats stored as their bits.
struct F32 { typedef float T; };
struct BF16 { typedef u16 T; };
struct F16 { typedef u16 T; };

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
#ifdef QPEFT_HOST_EMULATION  // tests/cuda_emulator.py runs the kernels on the CPU
    return qpeft_host_f16_to_f32(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

// Round to nearest even; NaN becomes 0x7fc0 (elem.rs f32_to_bf16_bits).
__device__ __forceinline__ u16 f32_to_bf16(float v) {
    u32 bits = __float_as_uint(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (u16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// IEEE round to nearest even (the hardware conversion); NaN becomes 0x7e00
// with the input's sign, as elem.rs f32_to_f16_bits does.
__device__ __forceinline__ u16 f32_to_f16(float v) {
    u32 bits = __float_as_uint(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (u16)(0x7e00u | ((bits >> 16) & 0x8000u));
#ifdef QPEFT_HOST_EMULATION
    return qpeft_host_f32_to_f16(v);
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#endif
}

template <class E> struct Elem;
template <> struct Elem<F32> {
    __device__ __forceinline__ static float load(float v) { return v; }
    __device__ __forceinline__ static float store(float v) { return v; }
    // |x| as ordered bits, and the smallest such value that is not finite.
    __device__ __forceinline__ static u32 abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }
    static constexpr u32 NONFINITE = 0x7f800000u;
    __device__ __forceinline__ static float abs_bits_to_f32(u32 b) { return __uint_as_float(b); }
};
template <> struct Elem<BF16> {
    __device__ __forceinline__ static float load(u16 v) { return bf16_to_f32(v); }
    __device__ __forceinline__ static u16 store(float v) { return f32_to_bf16(v); }
    __device__ __forceinline__ static u32 abs_bits(u16 v) { return v & 0x7fffu; }
    static constexpr u32 NONFINITE = 0x7f80u;
    __device__ __forceinline__ static float abs_bits_to_f32(u32 b) { return bf16_to_f32((u16)b); }
};
template <> struct Elem<F16> {
    __device__ __forceinline__ static float load(u16 v) { return f16_to_f32(v); }
    __device__ __forceinline__ static u16 store(float v) { return f32_to_f16(v); }
    __device__ __forceinline__ static u32 abs_bits(u16 v) { return v & 0x7fffu; }
    static constexpr u32 NONFINITE = 0x7c00u;
    __device__ __forceinline__ static float abs_bits_to_f32(u32 b) { return f16_to_f32((u16)b); }
};

// The scaling of a block before encoding (rust/src/scale.rs): multiply by a
// factor, or divide by absmax where the reciprocal would be wrong.
struct Scale {
    float f;
    bool div;
    __device__ __forceinline__ float apply(float x) const { return div ? __fdiv_rn(x, f) : __fmul_rn(x, f); }
};

// bitsandbytes' CUDA rule (FP4 and 8-bit): multiply by the float32
// reciprocal; zeros for an all-zero block; divide where 1/absmax overflows.
__device__ __forceinline__ Scale cuda_rule(float absmax) {
    if (absmax == 0.0f) return Scale{0.0f, false};
    float inv = __fdiv_rn(1.0f, absmax);
    if (isinf(inv)) return Scale{absmax, true};
    return Scale{inv, false};
}

// bitsandbytes' CPU rule (NF4): the partial last block and absmax below
// 1e-38 (which bitsandbytes clamps) divide; other blocks multiply.
__device__ __forceinline__ Scale cpu_rule(float absmax, bool partial) {
    if (absmax == 0.0f) return Scale{0.0f, false};
    if (partial || absmax < 1e-38f) return Scale{absmax, true};
    return Scale{__fdiv_rn(1.0f, absmax), false};
}

// Maximum of `v` over aligned groups of `group` threads (a power of two,
// at most blockDim.x, which is a multiple of 32 and at most 1024). Every
// thread of the block must call it; `scratch` holds blockDim.x / 32 words.
__device__ __forceinline__ u32 group_max(u32 v, int group, u32* scratch) {
    int width = group < 32 ? group : 32;
    for (int o = width / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (group <= 32) return v;
    int warp = threadIdx.x >> 5;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[warp] = v;
    __syncthreads();
    int per = group >> 5;
    int first = warp / per * per;
    u32 m = 0;
    for (int w = 0; w < per; ++w) m = max(m, scratch[first + w]);
    return m;
}

// Records the first bad block (the Python side reads it after the launch).
__device__ __forceinline__ void report_bad(i64* bad, i64 index) {
    atomicMin((unsigned long long*)bad, (unsigned long long)index);
}
