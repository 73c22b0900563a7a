//! Element types at the torch seam. bfloat16 and float16 arrive as their raw
//! 16-bit patterns; conversions are written out with integer operations so they
//! are exact, branch-free and vectorize, and they round like torch does
//! (round-to-nearest-even; NaN stays NaN).

/// Floating-point dtype of a tensor handed to a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// float32 storage holding bfloat16 / float16 values ([`Bf16InF32`], [`F16InF32`]).
    Bf16InF32,
    F16InF32,
}

/// A read-only flat input of one of the supported dtypes.
#[derive(Clone, Copy)]
pub enum Src<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    BF16(&'a [u16]),
}

/// A writable flat output of one of the supported dtypes.
pub enum Dst<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [u16]),
    BF16(&'a mut [u16]),
}

impl Src<'_> {
    pub fn len(&self) -> usize {
        match self {
            Src::F32(s) => s.len(),
            Src::F16(s) | Src::BF16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Dst<'_> {
    pub fn len(&self) -> usize {
        match self {
            Dst::F32(s) => s.len(),
            Dst::F16(s) | Dst::BF16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An element type the kernels are generic over.
pub trait Elem: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// |x| as bits whose unsigned order is the order of |x|, and the threshold
    /// at or above which the value is infinite or NaN.
    fn abs_bits(self) -> u32;
    const NONFINITE_ABS_BITS: u32;
    fn abs_bits_to_f32(bits: u32) -> f32;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        self.to_bits() & 0x7fff_ffff
    }
    const NONFINITE_ABS_BITS: u32 = 0x7f80_0000;
    #[inline(always)]
    fn abs_bits_to_f32(bits: u32) -> f32 {
        f32::from_bits(bits)
    }
}

/// bfloat16 bit pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct Bf16(pub u16);

/// IEEE float16 bit pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct F16(pub u16);

impl Elem for Bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        Bf16(f32_to_bf16_bits(v))
    }
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        (self.0 & 0x7fff) as u32
    }
    const NONFINITE_ABS_BITS: u32 = 0x7f80;
    #[inline(always)]
    fn abs_bits_to_f32(bits: u32) -> f32 {
        f32::from_bits(bits << 16)
    }
}

impl Elem for F16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        F16(f32_to_f16_bits(v))
    }
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        (self.0 & 0x7fff) as u32
    }
    const NONFINITE_ABS_BITS: u32 = 0x7c00;
    #[inline(always)]
    fn abs_bits_to_f32(bits: u32) -> f32 {
        f16_bits_to_f32(bits as u16)
    }
}

/// A float32 holding a bfloat16 value: `from_f32` rounds as [`Bf16`] does
/// and widens back. The output type of a 4-bit dequantization that feeds a
/// float32 matmul the values a bfloat16 one would use, in one pass.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
#[repr(transparent)]
pub struct Bf16InF32(pub f32);

/// A float32 holding a float16 value (as [`Bf16InF32`] for float16).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
#[repr(transparent)]
pub struct F16InF32(pub f32);

macro_rules! widened_elem {
    ($ty:ident, $narrow:ident, $dtype:ident) => {
        impl Elem for $ty {
            const DTYPE: DType = DType::$dtype;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self.0
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                $ty($narrow::from_f32(v).to_f32())
            }
            #[inline(always)]
            fn abs_bits(self) -> u32 {
                self.0.abs_bits()
            }
            const NONFINITE_ABS_BITS: u32 = f32::NONFINITE_ABS_BITS;
            #[inline(always)]
            fn abs_bits_to_f32(bits: u32) -> f32 {
                f32::abs_bits_to_f32(bits)
            }
        }
    };
}
widened_elem!(Bf16InF32, Bf16, Bf16InF32);
widened_elem!(F16InF32, F16, F16InF32);

/// float32 -> bfloat16, round to nearest even; every NaN becomes 0x7fc0 (as
/// torch does).
#[inline(always)]
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let is_nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
    if is_nan {
        0x7fc0
    } else {
        rounded
    }
}

/// float16 -> float32, exact (normals, subnormals, infinities, NaN).
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    const MAGIC: f32 = f32::from_bits(113 << 23);
    const SHIFTED_EXP: u32 = 0x7c00 << 13;
    let h = h as u32;
    let mut o = (h & 0x7fff) << 13;
    let exp = SHIFTED_EXP & o;
    o += (127 - 15) << 23;
    let inf_nan = o + ((128 - 16) << 23);
    let sub = f32::from_bits(o + (1 << 23)) - MAGIC;
    let mag = if exp == SHIFTED_EXP {
        inf_nan
    } else if exp == 0 {
        sub.to_bits()
    } else {
        o
    };
    f32::from_bits(mag | ((h & 0x8000) << 16))
}

/// float32 -> float16, round to nearest even; overflow gives infinity, NaN
/// becomes 0x7e00 (as torch does).
#[inline(always)]
pub fn f32_to_f16_bits(v: f32) -> u16 {
    const F32_INF: u32 = 255 << 23;
    const F16_MAX: u32 = (127 + 16) << 23;
    const DENORM_MAGIC_BITS: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    let bits = v.to_bits();
    let sign = bits & 0x8000_0000;
    let a = bits ^ sign;
    let big = if a > F32_INF { 0x7e00 } else { 0x7c00 };
    let denorm = {
        let f = f32::from_bits(a) + f32::from_bits(DENORM_MAGIC_BITS);
        f.to_bits().wrapping_sub(DENORM_MAGIC_BITS)
    };
    let normal = {
        let mant_odd = (a >> 13) & 1;
        (a.wrapping_add(((15u32).wrapping_sub(127) << 23).wrapping_add(0xfff)) + mant_odd) >> 13
    };
    let o = if a >= F16_MAX {
        big
    } else if a < (113 << 23) {
        denorm
    } else {
        normal
    };
    (o | (sign >> 16)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_roundtrip_every_pattern() {
        for h in 0..=u16::MAX {
            let f = f16_bits_to_f32(h);
            let is_nan = (h & 0x7fff) > 0x7c00;
            if is_nan {
                assert!(f.is_nan(), "{h:#06x}");
                assert_eq!(f32_to_f16_bits(f) & 0x7fff, 0x7e00);
            } else {
                assert_eq!(f32_to_f16_bits(f), h, "{h:#06x} -> {f}");
            }
        }
    }

    #[test]
    fn f16_known_values() {
        assert_eq!(f16_bits_to_f32(0x3c00), 1.0);
        assert_eq!(f16_bits_to_f32(0xc000), -2.0);
        assert_eq!(f16_bits_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f16_bits_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f32_to_f16_bits(65520.0), 0x7c00); // rounds up to infinity
        assert_eq!(f32_to_f16_bits(65504.0), 0x7bff);
        // 1 + 2^-11 is a tie between 1 and 1 + 2^-10: even mantissa wins.
        assert_eq!(f32_to_f16_bits(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f32_to_f16_bits(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(f32_to_f16_bits(1e-8), 0x0000);
        assert_eq!(f32_to_f16_bits(-0.0), 0x8000);
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        // Exactly halfway between 0x3f80 and 0x3f81: tie to even (0x3f80).
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16_bits(f32::NAN) & 0x7fff, 0x7fc0);
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(Bf16(0xbf80).to_f32(), -1.0);
    }
}
