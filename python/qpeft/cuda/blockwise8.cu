// Blockwise 8-bit quantization on a sorted 256-entry code (bitsandbytes'
// dynamic maps), the GPU twin of rust/src/blockwise8.rs: x - offset is
// scaled by the float32 reciprocal of its block's absmax and mapped to the
// nearest code value, an exact midpoint going to the even index. Used for
// double quantization of 4-bit scales and for 8-bit state.
#include "code8.cuh"

// min(bs, 256) threads per format block, each taking every group-th element
// of it (bs/group of them): a pass for the absmax, a pass to encode.
template <class E>
__device__ void quantize_blockwise(const typename E::T* __restrict__ x, float offset, const float* code,
                                   u8* __restrict__ out, float* __restrict__ absmax, i64* bad, i64 n, int bs) {
    __shared__ float values[256], mid[256];
    __shared__ u32 scratch[32];
    load_code8(code, values, mid);
    const int group = bs < (int)blockDim.x ? bs : (int)blockDim.x;
    const i64 n_blocks = (n + bs - 1) / bs;
    const i64 qb = (i64)blockIdx.x * (blockDim.x / group) + threadIdx.x / group;
    const int j = threadIdx.x % group;
    const i64 start = qb * bs;
    const i64 end = min(start + bs, n);
    u32 m = 0;
    for (i64 e = start + j; e < end; e += group)
        m = max(m, __float_as_uint(__fsub_rn(Elem<E>::load(x[e]), offset)) & 0x7fffffffu);
    m = group_max(m, group, scratch);
    if (qb >= n_blocks) return;
    if (m >= 0x7f800000u) {
        if (j == 0) report_bad(bad, start);
        return;
    }
    const float a = __uint_as_float(m);
    if (j == 0) absmax[qb] = a;
    const Scale s = cuda_rule(a);
    for (i64 e = start + j; e < end; e += group)
        out[e] = (u8)encode8(mid, s.apply(__fsub_rn(Elem<E>::load(x[e]), offset)));
}

// out[e] = code[q[e]] * absmax[e / bs] + offset (multiply, then add), 16
// codes per thread; every block size is a multiple of 16.
template <class E>
__device__ void dequantize_blockwise(const u8* __restrict__ q, const float* __restrict__ absmax, float offset,
                                     const float* code, typename E::T* __restrict__ out, i64 n, int bs) {
    __shared__ float values[256];
    for (int k = threadIdx.x; k < 256; k += blockDim.x) values[k] = code[k];
    __syncthreads();
    const i64 e0 = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * 16;
    if (e0 >= n) return;
    const float a = absmax[e0 / bs];
    if (e0 + 16 <= n) {
        const uint4 c = __ldg(reinterpret_cast<const uint4*>(q + e0));
        const u32 w[4] = {c.x, c.y, c.z, c.w};
        alignas(16) typename E::T v[16];
#pragma unroll
        for (int i = 0; i < 16; ++i)
            v[i] = Elem<E>::store(__fadd_rn(__fmul_rn(values[(w[i / 4] >> (8 * (i % 4))) & 0xffu], a), offset));
        uint4* o = reinterpret_cast<uint4*>(out + e0);
#pragma unroll
        for (int k = 0; k < 16 * (int)sizeof(v[0]) / 16; ++k) o[k] = reinterpret_cast<const uint4*>(v)[k];
    } else {
        for (i64 e = e0; e < n; ++e) out[e] = Elem<E>::store(__fadd_rn(__fmul_rn(values[q[e]], a), offset));
    }
}

#define QPEFT_BLOCKWISE8_KERNELS(NAME, E)                                                              \
    extern "C" __global__ void __launch_bounds__(256) quantize_blockwise_##NAME(                      \
        const E::T* x, float offset, const float* code, u8* out, float* absmax, i64* bad, i64 n,       \
        int bs) {                                                                                      \
        quantize_blockwise<E>(x, offset, code, out, absmax, bad, n, bs);                               \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) dequantize_blockwise_##NAME(                    \
        const u8* q, const float* absmax, float offset, const float* code, E::T* out, i64 n, int bs) { \
        dequantize_blockwise<E>(q, absmax, offset, code, out, n, bs);                                  \
    }

QPEFT_BLOCKWISE8_KERNELS(f32, F32)
QPEFT_BLOCKWISE8_KERNELS(bf16, BF16)
QPEFT_BLOCKWISE8_KERNELS(f16, F16)
