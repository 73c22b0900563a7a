//! Nearest-code search for bitsandbytes' dynamic 8-bit maps by arithmetic
//! instead of a table lookup per element (the 8-bit optimizer's encoder).
//!
//! `create_dynamic_map` puts its positive values in decimal decades: decade
//! `d` (0..=6) holds `n_d` values `10^(d-6) * (0.1 + (k + 0.5) * 0.9 / n_d)`
//! (`n_d = 2^d` signed, `2^(d+1)` unsigned), then 1.0 on top, 0.0 below, and
//! the signed map mirrors them. For a magnitude `a`:
//!
//! 1. the decade: the biased exponent of `a` picks a binary octave, which
//!    holds at most one decade start (decades are 10x wide); one comparison
//!    with that start decides;
//! 2. a candidate index `c = min(base_d + floor(a * S_d + O_d), last_d)`,
//!    the largest value at or below `a` (off by one only within rounding
//!    error of a value, where the nearest value is the one it lands on);
//! 3. the exact rule: `c + (a > thr[c])`, where `thr[c]` is the midpoint of
//!    codes `c` and `c + 1` as [`crate::blockwise8::Code8`] computes it,
//!    lowered by one ulp where a tie goes up to the even index.
//!
//! Steps 1 and 2 are a dozen SIMD operations on registers; step 3 reads
//! `thr` 64 codes at a time with byte shuffles (AVX-512 VBMI, in
//! `adamw8::vbmi`). [`DecadeCode::encode`] is the same arithmetic for one
//! value; a test compares it with the binary search over every float.

use crate::blockwise8::Code8;

/// Exponent tables cover biased exponents `EXP_LO..=EXP_LO + 31` (indexed
/// by the low 5 bits); smaller magnitudes are clamped up to `2^(EXP_LO-127)`.
pub const EXP_LO: u32 = 96;

/// Tables of the arithmetic encoder for one map (see the module docs).
#[derive(Clone, Debug)]
pub struct DecadeCode {
    /// By biased exponent (low 5 bits): `t` (decade + 1, 0 below the
    /// smallest positive value) of the octave's lowest float...
    pub t0: [i32; 32],
    /// ...and the first value of decade `t0` (the next one), if it lies in
    /// the octave (else +inf): at or above it, `t = t0 + 1`.
    pub next: [f32; 32],
    /// By `t`: `floor(a * scale + offset)` is the index within the decade...
    pub scale: [f32; 16],
    pub offset: [f32; 16],
    /// ...plus `base` (the decade's first code), at most `last` (its last).
    pub base: [i32; 16],
    pub last: [i32; 16],
    /// `a > thr[c]` moves candidate `c` up by one; `thr[255] = +inf`.
    pub thr: [f32; 256],
    /// Code of 0.0 (127 signed, 0 unsigned).
    pub zero: u8,
    /// Whether the map is the signed one (negative values mirror positive ones).
    pub signed: bool,
}

impl DecadeCode {
    /// The tables for `values`, or `None` if the map does not have the
    /// decade structure above (then callers keep the lookup-table encoder).
    /// The result agrees with [`Code8::encode`] on every value, midpoint and
    /// decade and octave boundary, give or take 16 ulps (checked here).
    pub fn new(values: &[f32; 256]) -> Option<Self> {
        let reference = Code8::new(*values).ok()?;
        let signed = values[0] < 0.0;
        let zero = if signed { 127 } else { 0 };
        if values[zero] != 0.0 || values[255] != 1.0 {
            return None;
        }
        if signed && (0..127).any(|i| values[i] != -values[254 - i]) {
            return None;
        }
        // Decades of the positive values below 1.0: codes zero+1 ..= 254.
        let mut firsts: Vec<(usize, usize)> = Vec::new(); // (first code, count)
        for (c, &v) in values.iter().enumerate().take(255).skip(zero + 1) {
            // Decade d holds (10^(d-7), 10^(d-6)); they come in order, none empty.
            let d = (v as f64).log10().floor() as i64 + 7;
            if !(0..=6).contains(&d) || (d as usize + 1 != firsts.len() && d as usize != firsts.len()) {
                return None;
            }
            if d as usize == firsts.len() {
                firsts.push((c, 0));
            }
            firsts.last_mut()?.1 += 1;
        }
        if firsts.len() != 7 {
            return None;
        }
        let mut tables = DecadeCode {
            t0: [0; 32],
            next: [f32::INFINITY; 32],
            scale: [0.0; 16],
            offset: [0.0; 16],
            base: [zero as i32; 16],
            last: [zero as i32; 16],
            thr: [f32::INFINITY; 256],
            zero: zero as u8,
            signed,
        };
        for (d, &(first, n)) in firsts.iter().enumerate() {
            let unit = 10f64.powi(d as i32 - 6);
            let step = 0.9 / n as f64;
            for k in 0..n {
                let want = unit * (0.1 + (k as f64 + 0.5) * step);
                if ((values[first + k] as f64 - want) / want).abs() > 1e-6 {
                    return None;
                }
            }
            let t = d + 1;
            tables.scale[t] = (1.0 / (unit * step)) as f32;
            tables.offset[t] = (-0.1 / step - 0.5) as f32;
            tables.base[t] = first as i32;
            tables.last[t] = (first + n - 1) as i32;
        }
        for e in EXP_LO..EXP_LO + 32 {
            let (lo, hi) = (f32::from_bits(e << 23), f32::from_bits((e + 1) << 23));
            let t0 = firsts.iter().filter(|&&(first, _)| values[first] <= lo).count();
            let inside: Vec<f32> = firsts.iter().map(|&(first, _)| values[first]).filter(|&v| v > lo && v < hi).collect();
            if inside.len() > 1 {
                return None;
            }
            tables.t0[(e & 31) as usize] = t0 as i32;
            if let Some(&v) = inside.first() {
                tables.next[(e & 31) as usize] = v;
            }
        }
        for c in 0..255 {
            let mid = (values[c] + values[c + 1]) * 0.5;
            // Ties go to the even code: up from an odd one. Only positive
            // midpoints are compared with (magnitudes, code >= zero).
            tables.thr[c] = if c % 2 == 1 && mid > 0.0 { f32::from_bits(mid.to_bits() - 1) } else { mid };
        }
        // Everywhere the arithmetic could go wrong: around every value, every
        // midpoint, and every decade and octave boundary.
        let mut probes: Vec<f32> = Vec::new();
        for (v, t) in values.iter().zip(&tables.thr) {
            probes.push(v.abs());
            probes.push(t.abs());
        }
        for e in EXP_LO..=130 {
            probes.push(f32::from_bits(e << 23));
        }
        probes.push(f32::MAX);
        for p in probes {
            if !p.is_finite() {
                continue;
            }
            let bits = p.to_bits();
            for b in bits.saturating_sub(16)..=bits + 16 {
                let a = f32::from_bits(b);
                for x in [a, -a] {
                    if !x.is_finite() {
                        continue;
                    }
                    let want = reference.encode(x);
                    let want = if signed && x.is_sign_negative() && want as usize == zero { want - 1 } else { want };
                    if tables.encode(x) != want {
                        return None;
                    }
                }
            }
        }
        Some(tables)
    }

    /// Candidate code of a magnitude (steps 1 and 2 of the module docs).
    #[inline(always)]
    pub fn candidate(&self, a: f32) -> u32 {
        let e = (a.to_bits() >> 23).clamp(EXP_LO, 127) as usize & 31;
        let t = self.t0[e] as usize + (a >= self.next[e]) as usize;
        // Past the top decade y grows without bound (|x| > 1): 512 is past every index.
        let k = a.mul_add(self.scale[t], self.offset[t]).min(512.0).floor() as i32;
        (k + self.base[t]).min(self.last[t]) as u32
    }

    /// Nearest code of a finite `x`, ties to the even code; on the signed
    /// map a negative `x` (or -0.0) never gets the code of 0.0 but the
    /// smallest negative one, as the 8-bit optimizer keeps the sign of m.
    #[inline(always)]
    pub fn encode(&self, x: f32) -> u8 {
        let a = x.abs();
        let c = self.candidate(a);
        let c = c + (a > self.thr[c as usize]) as u32;
        if self.signed && x.is_sign_negative() {
            (254 - c.clamp(128, 254)) as u8
        } else if x.is_sign_negative() {
            0
        } else {
            c as u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamic_map::{dynamic_signed, dynamic_unsigned};

    fn both() -> [(DecadeCode, Code8); 2] {
        [dynamic_signed(), dynamic_unsigned()].map(|v| (DecadeCode::new(&v).expect("a dynamic map"), Code8::new(v).unwrap()))
    }

    /// Every finite float whose bits are `stride` apart, both signs, against
    /// the binary search (with the sign of m kept on the signed map).
    fn sweep(stride: usize) {
        for (code, reference) in both() {
            let top = f32::MAX.to_bits();
            let mut bad = 0u64;
            for b in (0..=top).step_by(stride) {
                let a = f32::from_bits(b);
                for x in [a, -a] {
                    let want = reference.encode(x);
                    let want = if code.signed && x.is_sign_negative() && want == code.zero { want - 1 } else { want };
                    if code.encode(x) != want {
                        bad += 1;
                        assert!(bad < 10, "{x:e} ({b:#x}): {} vs {want}", code.encode(x));
                    }
                }
            }
            assert_eq!(bad, 0);
        }
    }

    #[test]
    fn every_code_value_and_midpoint_encodes_as_the_binary_search() {
        for (code, reference) in both() {
            for c in 0..256 {
                let v = reference.values[c];
                if v < 0.0 && !code.signed {
                    continue;
                }
                let want = if v.is_sign_negative() && c == code.zero as usize { c - 1 } else { c };
                assert_eq!(code.encode(v) as usize, want, "value {v:e}");
            }
        }
    }

    #[test]
    fn a_sweep_of_the_floats_encodes_as_the_binary_search() {
        // Every 61st float (odd, so every low-bit pattern comes round).
        sweep(61);
    }

    #[test]
    #[ignore = "every finite float: about two minutes in release mode"]
    fn every_float_encodes_as_the_binary_search() {
        sweep(1);
    }

    #[test]
    fn maps_without_the_decade_structure_are_refused() {
        let mut v = dynamic_unsigned();
        v[100] = (v[99] + v[100]) * 0.5;
        assert!(DecadeCode::new(&v).is_none());
        let linear: [f32; 256] = std::array::from_fn(|i| i as f32 / 255.0);
        assert!(DecadeCode::new(&linear).is_none());
        let mut s = dynamic_signed();
        s[3] = s[3].next_up();
        assert!(DecadeCode::new(&s).is_none());
    }
}
