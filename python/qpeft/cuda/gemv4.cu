// Fused 4-bit matrix multiplication for few tokens (decode), the GPU twin
// of rust/src/gemv.rs: y[t, n] = sum_k x[t, k] * W[n, k] for an N x K
// weight W quantized blockwise in bitsandbytes' layout (flat element
// e = n*K + k, block e / bs, byte e / 2, even e in the high nibble).
// W[n, k] = code[nibble] * scale[block]; products are summed in float32 and
// y is rounded to x's type. A dense W is never written: every packed byte
// and scale is read once per launch (one launch per 16 tokens).
#include "codebook.cuh"

// 32 consecutive elements of x as float32 (16-byte aligned).
template <class E>
__device__ __forceinline__ void load_x32(const typename E::T* p, float* v) {
    if constexpr (sizeof(typename E::T) == 4) {
        const float4* q = reinterpret_cast<const float4*>(p);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float4 f = __ldg(q + i);
            v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
        }
    } else {
        const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            uint4 u = __ldg(q + i);
            const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                v[8 * i + 2 * j] = Elem<E>::load((u16)(w[j] & 0xffffu));
                v[8 * i + 2 * j + 1] = Elem<E>::load((u16)(w[j] >> 16));
            }
        }
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

constexpr int GEMV_WARPS = 4;  // warps per thread block
constexpr int GEMV_ROWS = 2;   // rows per warp, sharing each load of x

// K % 32 == 0 and 16-byte aligned packed and x: each lane takes 32-weight
// chunks (16 bytes, one vector load per row) that lie in one block, so one
// scale per chunk; the chunk's code-book sums are scaled once.
template <class E, int TOK>
__device__ void gemv4_tiled(const u8* __restrict__ packed, Scales4 sc, const typename E::T* __restrict__ x,
                            typename E::T* __restrict__ y, int tokens, i64 N, i64 K, int bs, int fp4) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = QPEFT_CODE4[fp4 ? 1 : 0][threadIdx.x];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const i64 row0 = ((i64)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * GEMV_ROWS;
    if (row0 >= N) return;
    float acc[GEMV_ROWS][TOK];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int t = 0; t < TOK; ++t) acc[r][t] = 0.0f;
    const i64 chunks = K / 32;
#pragma unroll 2
    for (i64 c = lane; c < chunks; c += 32) {
        uint4 q[GEMV_ROWS];
        float s[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
            const i64 row = row0 + r < N ? row0 + r : row0;  // a missing last row repeats row0, unused
            const i64 e = row * K + c * 32;
            q[r] = __ldg(reinterpret_cast<const uint4*>(packed + e / 2));
            s[r] = sc.get(e / bs);
        }
        float w[GEMV_ROWS][32];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
            const u32 words[4] = {q[r].x, q[r].y, q[r].z, q[r].w};
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                const u32 byte = (words[i / 4] >> (8 * (i % 4))) & 0xffu;
                w[r][2 * i] = table[byte >> 4];
                w[r][2 * i + 1] = table[byte & 15u];
            }
        }
#pragma unroll
        for (int t = 0; t < TOK; ++t) {
            if (t < tokens) {
                float xv[32];
                load_x32<E>(x + t * K + c * 32, xv);
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; ++r) {
                    // Two chains for instruction-level parallelism.
                    float p0 = 0.0f, p1 = 0.0f;
#pragma unroll
                    for (int i = 0; i < 32; i += 2) {
                        p0 = __fmaf_rn(w[r][i], xv[i], p0);
                        p1 = __fmaf_rn(w[r][i + 1], xv[i + 1], p1);
                    }
                    acc[r][t] = __fmaf_rn(__fadd_rn(p0, p1), s[r], acc[r][t]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int t = 0; t < TOK; ++t) {
            if (t < tokens) {
                const float v = warp_sum(acc[r][t]);
                if (lane == 0 && row0 + r < N) y[t * N + row0 + r] = Elem<E>::store(v);
            }
        }
}

// Any K and alignment (odd K, rows starting mid-byte): one row per warp,
// one weight per lane per step.
template <class E>
__device__ void gemv4_generic(const u8* __restrict__ packed, Scales4 sc, const typename E::T* __restrict__ x,
                              typename E::T* __restrict__ y, int tokens, i64 N, i64 K, int bs, int fp4) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = QPEFT_CODE4[fp4 ? 1 : 0][threadIdx.x];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= N) return;
    float acc[16];
#pragma unroll
    for (int t = 0; t < 16; ++t) acc[t] = 0.0f;
    for (i64 k = lane; k < K; k += 32) {
        const i64 e = row * K + k;
        const u32 byte = packed[e >> 1];
        const float wv = __fmul_rn(table[(e & 1) ? (byte & 15u) : (byte >> 4)], sc.get(e / bs));
#pragma unroll
        for (int t = 0; t < 16; ++t)
            if (t < tokens) acc[t] = __fmaf_rn(wv, Elem<E>::load(x[t * K + k]), acc[t]);
    }
#pragma unroll
    for (int t = 0; t < 16; ++t)
        if (t < tokens) {
            const float v = warp_sum(acc[t]);
            if (lane == 0) y[t * N + row] = Elem<E>::store(v);
        }
}

#define QPEFT_GEMV_ARGS(E)                                                                             \
    const u8 *packed, const float *absmax, const u8 *qabsmax, const float *absmax2, const float *code2, \
        float offset, int bs2, const E::T *x, E::T *y, int tokens, i64 N, i64 K, int bs, int fp4
#define QPEFT_GEMV_SCALES Scales4 sc{absmax, qabsmax, absmax2, code2, offset, bs2};

#define QPEFT_GEMV_TILED(NAME, E, TOK)                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv4_tiled_##NAME##_t##TOK(          \
        QPEFT_GEMV_ARGS(E)) {                                                                           \
        QPEFT_GEMV_SCALES                                                                               \
        gemv4_tiled<E, TOK>(packed, sc, x, y, tokens, N, K, bs, fp4);                                   \
    }
#define QPEFT_GEMV_KERNELS(NAME, E)                                                                     \
    QPEFT_GEMV_TILED(NAME, E, 1)                                                                        \
    QPEFT_GEMV_TILED(NAME, E, 2)                                                                        \
    QPEFT_GEMV_TILED(NAME, E, 4)                                                                        \
    QPEFT_GEMV_TILED(NAME, E, 8)                                                                        \
    QPEFT_GEMV_TILED(NAME, E, 16)                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv4_generic_##NAME(                 \
        QPEFT_GEMV_ARGS(E)) {                                                                           \
        QPEFT_GEMV_SCALES                                                                               \
        gemv4_generic<E>(packed, sc, x, y, tokens, N, K, bs, fp4);                                      \
    }

QPEFT_GEMV_KERNELS(f32, F32)
QPEFT_GEMV_KERNELS(bf16, BF16)
QPEFT_GEMV_KERNELS(f16, F16)
