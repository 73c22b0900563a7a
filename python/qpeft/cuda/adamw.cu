// Fused AdamW steps, the GPU twins of rust/src/adamw.rs (float32 state) and
// rust/src/adamw8.rs (blockwise 8-bit state). Every operation is the CPU
// kernel's, in the same order and with the same float32 roundings (explicit
// _rn intrinsics; sqrt and divide are correctly rounded on both sides), so
// the results are the same bits as on the CPU.
#include "code8.cuh"

// ------------------------------------------------------ float32 state
//
// m = fma(w, g - m, m) (w = 1 - beta1 < 0.5) or fma(w - 1, g - m, g) (torch.lerp)
// v = fma((1 - beta2) * g, g, v * beta2)
// p = p * decay + (step_size * m) / (sqrt(v) / bc2_sqrt + eps)
template <class E>
__device__ void adamw32(typename E::T* __restrict__ p, const typename E::T* __restrict__ g, float* __restrict__ m,
                        float* __restrict__ v, i64 n, float decay, float lerp_weight, float beta2,
                        float one_minus_beta2, float bc2_sqrt, float eps, float step_size, int maximize) {
    const float sign = maximize ? -1.0f : 1.0f;
    const bool small = fabsf(lerp_weight) < 0.5f;
    const float coeff = small ? lerp_weight : __fsub_rn(lerp_weight, 1.0f);
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float gi = __fmul_rn(Elem<E>::load(g[i]), sign);
        const float mi = m[i];
        const float m1 = __fmaf_rn(coeff, __fsub_rn(gi, mi), small ? mi : gi);
        const float v1 = __fmaf_rn(__fmul_rn(one_minus_beta2, gi), gi, __fmul_rn(v[i], beta2));
        const float d = __fadd_rn(__fdiv_rn(__fsqrt_rn(v1), bc2_sqrt), eps);
        const float p1 = __fmul_rn(Elem<E>::load(p[i]), decay);
        p[i] = Elem<E>::store(__fadd_rn(p1, __fdiv_rn(__fmul_rn(step_size, m1), d)));
        m[i] = m1;
        v[i] = v1;
    }
}

// ---------------------------------------------------- 8-bit state
//
// One thread per element of a 256-element state block, the thread block
// walking over state blocks. Per block: m = code_s[qm] * absmax_m and
// v = code_u[qv] * absmax_v; the update of bitsandbytes' CPU AdamW8bit
//   m = fma(g, 1 - beta1, m * beta1)
//   v = fma((1 - beta2) * g, g, v * beta2)
//   p = p * decay + (step_size * m) / (sqrt(v) / bc2_sqrt + eps)
// where a non-finite m or v zeroes the element's state and keeps p; then
// re-encoding on the block's new absmax (nearest code, ties to even; a
// negative m never takes the code of 0).
constexpr int OPTIM_BLOCK = 256;
constexpr u32 SIGNED_ZERO_CODE = 127;

template <class E>
__device__ void adamw8(typename E::T* __restrict__ p, const typename E::T* __restrict__ g, u8* __restrict__ qm,
                       u8* __restrict__ qv, float* __restrict__ absmax_m, float* __restrict__ absmax_v,
                       const float* code_signed, const float* code_unsigned, i64 n, float beta1,
                       float one_minus_beta1, float beta2, float one_minus_beta2, float bc2_sqrt, float eps,
                       float decay, float step_size, int maximize) {
    __shared__ float vs[256], ms[256], vu[256], mu[256];
    __shared__ u32 scratch[32];
    load_code8(code_signed, vs, ms);
    load_code8(code_unsigned, vu, mu);
    const float sign = maximize ? -1.0f : 1.0f;
    const i64 n_blocks = (n + OPTIM_BLOCK - 1) / OPTIM_BLOCK;
    for (i64 b = blockIdx.x; b < n_blocks; b += gridDim.x) {
        const i64 e = b * OPTIM_BLOCK + threadIdx.x;
        const bool valid = e < n;
        float m1 = 0.0f, v1 = 0.0f;
        if (valid) {
            const float mi = __fmul_rn(vs[qm[e]], absmax_m[b]);
            const float vi = __fmul_rn(vu[qv[e]], absmax_v[b]);
            const float gi = __fmul_rn(Elem<E>::load(g[e]), sign);
            m1 = __fmaf_rn(gi, one_minus_beta1, __fmul_rn(mi, beta1));
            v1 = __fmaf_rn(__fmul_rn(one_minus_beta2, gi), gi, __fmul_rn(vi, beta2));
            const bool ok = isfinite(m1) && isfinite(v1);
            const float d = __fadd_rn(__fdiv_rn(__fsqrt_rn(v1), bc2_sqrt), eps);
            const float pi = Elem<E>::load(p[e]);
            const float p1 = __fadd_rn(__fmul_rn(pi, decay), __fdiv_rn(__fmul_rn(step_size, m1), d));
            p[e] = Elem<E>::store(ok ? p1 : pi);
            if (!ok) m1 = v1 = 0.0f;
        }
        const float am = __uint_as_float(group_max(__float_as_uint(m1) & 0x7fffffffu, OPTIM_BLOCK, scratch));
        const float av = __uint_as_float(group_max(__float_as_uint(v1) & 0x7fffffffu, OPTIM_BLOCK, scratch));
        if (!valid) continue;
        if (threadIdx.x == 0) {
            absmax_m[b] = am;
            absmax_v[b] = av;
        }
        u32 cm = encode8(ms, cuda_rule(am).apply(m1));
        if (cm == SIGNED_ZERO_CODE && m1 < 0.0f) cm -= 1;
        qm[e] = (u8)cm;
        qv[e] = (u8)encode8(mu, cuda_rule(av).apply(v1));
    }
}

#define QPEFT_ADAMW_KERNELS(NAME, E)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) adamw32_##NAME(                                \
        E::T* p, const E::T* g, float* m, float* v, i64 n, float decay, float lerp_weight, float beta2, \
        float one_minus_beta2, float bc2_sqrt, float eps, float step_size, int maximize) {             \
        adamw32<E>(p, g, m, v, n, decay, lerp_weight, beta2, one_minus_beta2, bc2_sqrt, eps, step_size, \
                   maximize);                                                                         \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(OPTIM_BLOCK) adamw8_##NAME(                         \
        E::T* p, const E::T* g, u8* qm, u8* qv, float* absmax_m, float* absmax_v,                     \
        const float* code_signed, const float* code_unsigned, i64 n, float beta1,                     \
        float one_minus_beta1, float beta2, float one_minus_beta2, float bc2_sqrt, float eps,          \
        float decay, float step_size, int maximize) {                                                 \
        adamw8<E>(p, g, qm, qv, absmax_m, absmax_v, code_signed, code_unsigned, n, beta1,             \
                  one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, decay, step_size, maximize); \
    }

QPEFT_ADAMW_KERNELS(f32, F32)
QPEFT_ADAMW_KERNELS(bf16, BF16)
