//! How a block's values are brought to [-1, 1] before encoding. The two
//! bitsandbytes back ends differ here and the bytes depend on it.

/// Scaling of one block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    /// Multiply by this factor (the float32 reciprocal of absmax, or 0 for an
    /// all-zero block, which then encodes every element as the code of 0.0).
    Mul(f32),
    /// Divide by absmax.
    Div(f32),
}

/// Smallest absmax that bitsandbytes' CPU path uses unclamped (it clamps to
/// 1e-38 before taking the reciprocal).
const BNB_CPU_MIN_ABSMAX: f32 = 1e-38;

/// bitsandbytes' CPU rule (used for NF4): full blocks multiply by
/// 1/absmax, the partial last block divides by absmax. Where that rule gives
/// wrong codes (absmax below 1e-38, where bitsandbytes clamps) we divide.
#[inline]
pub fn cpu_rule(absmax: f32, partial_block: bool) -> Scale {
    if absmax == 0.0 {
        Scale::Mul(0.0)
    } else if partial_block || absmax < BNB_CPU_MIN_ABSMAX {
        Scale::Div(absmax)
    } else {
        Scale::Mul(1.0 / absmax)
    }
}

/// bitsandbytes' CUDA rule (used for FP4 and 8-bit): multiply by 1/absmax.
/// Where CUDA would produce NaN (absmax 0, or a subnormal absmax whose
/// reciprocal overflows) we encode zeros, or divide.
#[inline]
pub fn cuda_rule(absmax: f32) -> Scale {
    if absmax == 0.0 {
        return Scale::Mul(0.0);
    }
    let inv = 1.0 / absmax;
    if inv.is_finite() {
        Scale::Mul(inv)
    } else {
        Scale::Div(absmax)
    }
}

/// Scale `src` into `dst` (same length).
#[inline(always)]
pub fn apply(scale: Scale, src: &[f32], dst: &mut [f32]) {
    match scale {
        Scale::Mul(m) => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s * m;
            }
        }
        Scale::Div(a) => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s / a;
            }
        }
    }
}
