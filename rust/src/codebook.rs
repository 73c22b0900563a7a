//! The 4-bit code books and their encoders (../shared/FORMATS.md §1).
//!
//! NF4 is encoded the way bitsandbytes' CPU path does it (the count of
//! code-book midpoints strictly below the scaled value); FP4 the way its CUDA
//! kernel does (sign bit, then a comparison tree on |x| with float literals as
//! thresholds), because that is where most FP4 checkpoints come from.

/// NF4 values by 4-bit code (QLoRA's NormalFloat4; hard-coded, see FORMATS.md).
// Digits as FORMATS.md and bitsandbytes print them, so they can be compared by eye.
#[allow(clippy::excessive_precision)]
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// The float32 midpoints (a + b) * 0.5 of neighbouring NF4 values.
pub const NF4_MIDPOINTS: [f32; 15] = {
    let mut m = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = (NF4[i] + NF4[i + 1]) * 0.5;
        i += 1;
    }
    m
};

/// FP4 (E2M1, bias 2) values by code: magnitudes 0, 0.0625, 8, 12, 4, 6, 2, 3
/// for codes 0..8, divided by 12 in float32; bit 3 is the sign.
pub const FP4: [f32; 16] = {
    const MAG: [f32; 8] = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0];
    let mut t = [0.0f32; 16];
    let mut i = 0;
    while i < 8 {
        t[i] = MAG[i] / 12.0;
        t[i + 8] = -MAG[i] / 12.0;
        i += 1;
    }
    t
};

/// Thresholds of bitsandbytes' CUDA FP4 encoder on |x|, ascending: a value
/// above the k-th and not above the (k+1)-th has magnitude rank k+1.
pub const FP4_THRESHOLDS: [f32; 7] = [
    0.002_604_17,
    0.085_937_5,
    0.208_333_33,
    0.291_666_67,
    0.416_666_7,
    0.583_333,
    0.833_333_3,
];

/// Which 4-bit data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    pub fn table(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4,
            QuantType::Fp4 => &FP4,
        }
    }
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }
}

/// NF4 code of a scaled value: the number of midpoints strictly below it
/// (nearest value; an exact midpoint goes to the lower code; NaN gives 0).
#[inline(always)]
pub fn encode_nf4(x: f32) -> u8 {
    let mut code = 0u8;
    for m in NF4_MIDPOINTS {
        code += (x > m) as u8;
    }
    code
}

/// FP4 code of a scaled value, bitsandbytes' CUDA rule. -0.0 and NaN give 0.
#[inline(always)]
pub fn encode_fp4(x: f32) -> u8 {
    let sign = ((x < 0.0) as u8) << 3;
    let a = x.abs();
    let mut rank = 0u8;
    for t in FP4_THRESHOLDS {
        rank += (a > t) as u8;
    }
    // Magnitude ranks 0..8 map to codes 0, 1, 6, 7, 4, 5, 2, 3: flip bit 2
    // whenever bit 1 is set.
    (rank ^ ((rank & 2) << 1)) | sign
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_encodes_every_code_value_to_itself() {
        for (code, &v) in NF4.iter().enumerate() {
            assert_eq!(encode_nf4(v) as usize, code);
        }
    }

    #[test]
    fn nf4_midpoint_goes_to_lower_code() {
        for (i, &m) in NF4_MIDPOINTS.iter().enumerate() {
            assert_eq!(encode_nf4(m) as usize, i);
            assert_eq!(encode_nf4(m.next_up()) as usize, i + 1);
        }
        assert_eq!(encode_nf4(f32::NAN), 0);
        assert_eq!(encode_nf4(0.0), 7);
        assert_eq!(encode_nf4(-0.0), 7);
    }

    #[test]
    fn fp4_encodes_every_code_value_to_itself() {
        for (code, &v) in FP4.iter().enumerate() {
            if code == 8 {
                continue; // -0.0 encodes as +0 (code 0), as on CUDA
            }
            assert_eq!(encode_fp4(v) as usize, code, "value {v}");
        }
        assert_eq!(encode_fp4(-0.0), 0);
        assert_eq!(encode_fp4(f32::NAN), 0);
    }

    #[test]
    fn fp4_is_nearest_away_from_thresholds() {
        // Sweep [-1, 1] and compare with a brute-force nearest search wherever
        // the value is not within 1e-6 of a threshold.
        for i in -20_000..=20_000 {
            let x = i as f32 / 20_000.0;
            if FP4_THRESHOLDS.iter().any(|t| (x.abs() - t).abs() < 1e-6) {
                continue;
            }
            let got = FP4[encode_fp4(x) as usize];
            let best = FP4
                .iter()
                .map(|v| (v - x).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(((got - x).abs() - best).abs() < 1e-7, "x={x} got={got}");
        }
    }
}
