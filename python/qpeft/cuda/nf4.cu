// Blockwise 4-bit (NF4 / FP4) quantization and dequantization, the GPU
// twin of rust/src/nf4.rs: block b holds flat elements [b*bs, (b+1)*bs);
// element e goes to byte e/2, even e in the high nibble. Quantization gives
// the same bytes as the CPU kernels: the same absmax (largest |x| of the
// input type), the same scaling rule, the same float32 thresholds.
#include "codebook.cuh"

// ------------------------------------------------------------- quantize
//
// EPT consecutive elements per thread (8, or 16 for blocks of 4096), bs/EPT
// threads per block of the format, blockDim.x (256) / (bs/EPT) format
// blocks per thread block. A block whose absmax is not finite is reported
// through `bad` (the smallest such block's first element) and left unwritten.
template <class E, int EPT>
__device__ void quantize_4bit(const typename E::T* __restrict__ x, u8* __restrict__ packed,
                              float* __restrict__ absmax, i64* bad, i64 n, int bs, int fp4) {
    typedef typename E::T T;
    __shared__ u32 scratch[32];
    const int group = bs / EPT;
    const i64 n_blocks = (n + bs - 1) / bs;
    const i64 qb = (i64)blockIdx.x * (blockDim.x / group) + threadIdx.x / group;
    const i64 e0 = qb * bs + (i64)(threadIdx.x % group) * EPT;
    alignas(16) T raw[EPT];
    const bool full = e0 + EPT <= n;
    if (full) {
        const uint4* src = reinterpret_cast<const uint4*>(x + e0);
#pragma unroll
        for (int q = 0; q < EPT * (int)sizeof(T) / 16; ++q)
            reinterpret_cast<uint4*>(raw)[q] = __ldg(src + q);
    } else {
#pragma unroll
        for (int i = 0; i < EPT; ++i) raw[i] = e0 + i < n ? x[e0 + i] : (T)0;
    }
    u32 m = 0;
#pragma unroll
    for (int i = 0; i < EPT; ++i) m = max(m, Elem<E>::abs_bits(raw[i]));
    m = group_max(m, group, scratch);
    if (qb >= n_blocks) return;
    if (m >= Elem<E>::NONFINITE) {
        if (threadIdx.x % group == 0) report_bad(bad, qb * bs);
        return;
    }
    const float a = Elem<E>::abs_bits_to_f32(m);
    if (threadIdx.x % group == 0) absmax[qb] = a;
    const Scale s = fp4 ? cuda_rule(a) : cpu_rule(a, (qb + 1) * bs > n);
    u32 bytes[EPT / 2];
#pragma unroll
    for (int j = 0; j < EPT / 2; ++j) {
        // Elements past n are 0.0 (the pad of an odd n).
        float v0 = s.apply(Elem<E>::load(raw[2 * j]));
        float v1 = s.apply(Elem<E>::load(raw[2 * j + 1]));
        u32 c0 = fp4 ? encode_fp4(v0) : encode_nf4(v0);
        u32 c1 = fp4 ? encode_fp4(v1) : encode_nf4(v1);
        bytes[j] = (c0 << 4) | c1;
    }
    if (full) {
        u32 words[EPT / 8];
#pragma unroll
        for (int w = 0; w < EPT / 8; ++w)
            words[w] = bytes[4 * w] | (bytes[4 * w + 1] << 8) | (bytes[4 * w + 2] << 16) | (bytes[4 * w + 3] << 24);
        if constexpr (EPT == 8) {
            *reinterpret_cast<u32*>(packed + e0 / 2) = words[0];
        } else {
            *reinterpret_cast<uint2*>(packed + e0 / 2) = make_uint2(words[0], words[1]);
        }
    } else {
        const i64 n_bytes = (n + 1) / 2;
#pragma unroll
        for (int j = 0; j < EPT / 2; ++j)
            if (e0 / 2 + j < n_bytes) packed[e0 / 2 + j] = (u8)bytes[j];
    }
}

// ----------------------------------------------------------- dequantize
//
// A thread block covers 32 * blockDim.x elements as 4 rounds of 8 elements
// per thread (4 packed bytes in, 8 values out), thread t taking group
// t + j * blockDim.x in round j: every warp-wide load and store is one
// contiguous run of memory. Every block size is a multiple of 8, so the 8
// elements share one scale (Scales4, dequantized here when nested).

// 8 values to 8 consecutive outputs (32 bytes of float32 or 16 of 16-bit).
template <class E>
__device__ __forceinline__ void store8(typename E::T* out, const float* v) {
    if constexpr (sizeof(typename E::T) == 4) {
        float4* o = reinterpret_cast<float4*>(out);
        o[0] = make_float4(v[0], v[1], v[2], v[3]);
        o[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        u32 w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = (u32)Elem<E>::store(v[2 * i]) | ((u32)Elem<E>::store(v[2 * i + 1]) << 16);
        *reinterpret_cast<uint4*>(out) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

template <class E>
__device__ void dequantize_4bit(const u8* __restrict__ packed, Scales4 sc, typename E::T* __restrict__ out,
                                i64 n, int bs, int fp4) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = QPEFT_CODE4[fp4 ? 1 : 0][threadIdx.x];
    __syncthreads();
    const i64 tile = (i64)blockIdx.x * blockDim.x * 32;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const i64 e0 = tile + ((i64)j * blockDim.x + threadIdx.x) * 8;
        if (e0 >= n) continue;
        const float s = sc.get(e0 / bs);
        if (e0 + 8 <= n) {
            const u32 w = __ldg(reinterpret_cast<const u32*>(packed + e0 / 2));
            float v[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u32 byte = (w >> (8 * i)) & 0xffu;
                v[2 * i] = __fmul_rn(table[byte >> 4], s);
                v[2 * i + 1] = __fmul_rn(table[byte & 15u], s);
            }
            store8<E>(out + e0, v);
        } else {
            for (i64 e = e0; e < n; ++e) {
                const u32 byte = packed[e >> 1];
                const u32 c = (e & 1) ? (byte & 15u) : (byte >> 4);
                out[e] = Elem<E>::store(__fmul_rn(table[c], s));
            }
        }
    }
}

#define QPEFT_NF4_KERNELS(NAME, E)                                                                       \
    extern "C" __global__ void __launch_bounds__(256) quantize_4bit_##NAME(                             \
        const E::T* x, u8* packed, float* absmax, i64* bad, i64 n, int bs, int fp4) {                    \
        if (bs == 4096) quantize_4bit<E, 16>(x, packed, absmax, bad, n, bs, fp4);                        \
        else quantize_4bit<E, 8>(x, packed, absmax, bad, n, bs, fp4);                                    \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) dequantize_4bit_##NAME(                           \
        const u8* packed, const float* absmax, const u8* qabsmax, const float* absmax2,                  \
        const float* code2, float offset, int bs2, E::T* out, i64 n, int bs, int fp4) {                  \
        Scales4 sc{absmax, qabsmax, absmax2, code2, offset, bs2};                                        \
        dequantize_4bit<E>(packed, sc, out, n, bs, fp4);                                                 \
    }

QPEFT_NF4_KERNELS(f32, F32)
QPEFT_NF4_KERNELS(bf16, BF16)
QPEFT_NF4_KERNELS(f16, F16)
