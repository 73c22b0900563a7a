// 8-bit codes (sorted 256-entry maps) in shared memory and their encoder,
// shared by blockwise8.cu and adamw.cu (rust/src/blockwise8.rs Code8).
#pragma once
#include "common.cuh"

// code[256] and its midpoints (mid[255] = +inf) into shared memory.
__device__ __forceinline__ void load_code8(const float* code, float* values, float* mid) {
    for (int k = threadIdx.x; k < 256; k += blockDim.x) values[k] = code[k];
    __syncthreads();
    for (int k = threadIdx.x; k < 256; k += blockDim.x)
        mid[k] = k < 255 ? __fmul_rn(__fadd_rn(values[k], values[k + 1]), 0.5f) : __int_as_float(0x7f800000);
    __syncthreads();
}

// Nearest code: idx = number of midpoints strictly below x (8 halving
// steps), then a tie moves up to the even neighbour. NaN gives 0.
__device__ __forceinline__ u32 encode8(const float* mid, float x) {
    u32 idx = 0;
#pragma unroll
    for (u32 step = 128; step > 0; step >>= 1)
        if (mid[idx + step - 1] < x) idx += step;
    return idx + (idx < 255 && (idx & 1u) && mid[idx] == x);
}
