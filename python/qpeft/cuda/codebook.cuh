// The 4-bit code books (rust/src/codebook.rs) as exact hexadecimal floats,
// and the encoders, shared by nf4.cu and gemv4.cu.
#pragma once
#include "common.cuh"

// NF4 code book and the float32 midpoints (a+b)*0.5 of neighbours
// (rust/src/codebook.rs), as exact hexadecimal floats.
#define NF4_VALUES                                                                         \
    -0x1.0000000000000p+0f, -0x1.6473620000000p-1f, -0x1.0cd6600000000p-1f,                \
    -0x1.9465400000000p-2f, -0x1.23449a0000000p-2f, -0x1.7a6a7e0000000p-3f,                \
    -0x1.74f0e20000000p-4f, 0x0.0p+0f, 0x1.45f5fe0000000p-4f, 0x1.4995c60000000p-3f,       \
    0x1.f809ba0000000p-3f, 0x1.5a06740000000p-2f, 0x1.c349700000000p-2f,                   \
    0x1.200f560000000p-1f, 0x1.7227660000000p-1f, 0x1.0000000000000p+0f
#define NF4_MIDPOINTS                                                                      \
    -0x1.b239b00000000p-1f, -0x1.38a4e00000000p-1f, -0x1.d709000000000p-2f,                \
    -0x1.5bd4ec0000000p-2f, -0x1.e079d80000000p-3f, -0x1.1a71780000000p-3f,                \
    -0x1.74f0e20000000p-5f, 0x1.45f5fe0000000p-5f, 0x1.ec90c40000000p-4f,                  \
    0x1.a0cfc00000000p-3f, 0x1.2b05a80000000p-2f, 0x1.8ea7f20000000p-2f,                   \
    0x1.00da080000000p-1f, 0x1.491b5e0000000p-1f, 0x1.b913b40000000p-1f
// FP4 (E2M1) values by code, and bitsandbytes' CUDA thresholds on |x|.
#define FP4_VALUES                                                                         \
    0x0.0p+0f, 0x1.5555560000000p-8f, 0x1.5555560000000p-1f, 0x1.0000000000000p+0f,        \
    0x1.5555560000000p-2f, 0x1.0000000000000p-1f, 0x1.5555560000000p-3f,                   \
    0x1.0000000000000p-2f, -0x0.0p+0f, -0x1.5555560000000p-8f, -0x1.5555560000000p-1f,     \
    -0x1.0000000000000p+0f, -0x1.5555560000000p-2f, -0x1.0000000000000p-1f,                \
    -0x1.5555560000000p-3f, -0x1.0000000000000p-2f
#define FP4_THRESHOLDS                                                                     \
    0x1.5555720000000p-9f, 0x1.6000000000000p-4f, 0x1.aaaaaa0000000p-3f,                   \
    0x1.2aaaaa0000000p-2f, 0x1.aaaaac0000000p-2f, 0x1.2aaaa00000000p-1f,                   \
    0x1.aaaaaa0000000p-1f

__constant__ float QPEFT_CODE4[2][16] = {{NF4_VALUES}, {FP4_VALUES}};

// Number of midpoints strictly below x: nearest value, a midpoint goes to
// the lower code, NaN gives 0.
__device__ __forceinline__ u32 encode_nf4(float x) {
    const float mid[15] = {NF4_MIDPOINTS};
    u32 c = 0;
#pragma unroll
    for (int i = 0; i < 15; ++i) c += x > mid[i];
    return c;
}

// Sign bit, then the magnitude rank; ranks 0..7 map to codes 0,1,6,7,4,5,2,3.
__device__ __forceinline__ u32 encode_fp4(float x) {
    const float th[7] = {FP4_THRESHOLDS};
    u32 sign = (x < 0.0f) ? 8u : 0u;
    float a = fabsf(x);
    u32 r = 0;
#pragma unroll
    for (int i = 0; i < 7; ++i) r += a > th[i];
    return (r ^ ((r & 2u) << 1)) | sign;
}

// Block scales of a 4-bit tensor, plain or double-quantized:
// code2[qabsmax[b]] * absmax2[b / bs2] + offset, multiply then add. Near
// the top of the float32 range that sum can round past the largest float
// (a block holding FLT_MAX among zero blocks); the largest float is the
// scale such a block had, so it is clamped there (NaN stays NaN), as on
// the CPU (rust/src/nf4.rs nested_scale).
struct Scales4 {
    const float* absmax;  // plain scales, or nullptr when nested
    const u8* qabsmax;
    const float* absmax2;
    const float* code2;
    float offset;
    int bs2;
    __device__ __forceinline__ float get(i64 b) const {
        if (absmax) return __ldg(absmax + b);
        const float s = __fadd_rn(__fmul_rn(__ldg(code2 + __ldg(qabsmax + b)), __ldg(absmax2 + b / bs2)), offset);
        return s > 0x1.fffffep+127f ? 0x1.fffffep+127f : s;
    }
};
