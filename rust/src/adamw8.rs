//! Fused AdamW with blockwise 8-bit state (../shared/FORMATS.md §5): m on
//! the signed dynamic map, v on the unsigned one, one float32 absmax per 256
//! elements for each.
//!
//! Per block of 256: dequantize m and v (`code[q] * absmax`), update them,
//! update p, then re-quantize with the block's NEW absmax (scaled by its
//! float32 reciprocal, nearest code, ties to the even index). The arithmetic
//! is that of bitsandbytes' CPU `AdamW8bit` (0.50, torch operations):
//!
//! ```text
//! m = fma(g, 1-beta1, m * beta1)                (mul_, add_ with alpha)
//! v = fma((1-beta2) * g, g, v * beta2)          (mul_, addcmul_)
//! d = sqrt(v) / bc2_sqrt + eps
//! p = p * decay + (step_size * m) / d           (mul_, addcdiv_)
//! ```
//!
//! Two rules bitsandbytes' CPU path lacks, taken from its CUDA kernel and
//! FORMATS.md: a negative m that would round to the code of 0 gets the
//! smallest negative code instead (the sign of m survives), and an element
//! whose gradient is not finite (or whose new state overflows) gets zero
//! state and keeps its parameter unchanged, instead of spreading NaN over its
//! whole block.
//!
//! Encoding uses [`FastCode`]: a lookup table indexed by the sign, exponent
//! and top 7 mantissa bits of the float (its top 16 bits, the magnitude
//! clamped to the range that holds midpoints), which leaves at most one
//! midpoint per cell, so one comparison of the low 16 bits with the cell's
//! threshold finishes the search. It is exact against the binary search of
//! [`Code8::encode`].
//!
//! SIMD: AVX-512 and AVX2 read the table with scalar loads into vector
//! lanes (16 or 8: cheaper than gathers on Zen 3 and Zen 4); AVX-512 VBMI
//! dequantizes 64 codes at a time with byte shuffles; the scalar pieces are
//! the reference the SIMD ones are tested against.
//!
//! With VBMI and DQ (Ice Lake, Sapphire Rapids, Zen 4) and float32
//! parameters the whole blocks go through one fused, software-pipelined
//! loop (module `vbmi`): the update of block b (bound by the divide and
//! square root unit) runs interleaved with the encoding of block b - 1, and
//! the codes are dequantized in registers. There the dynamic maps are
//! encoded without a table read per element ([`DecadeCode`]: their decimal
//! decades give each value's code from its exponent and one fused
//! multiply-add, and one comparison with thresholds read 64 at a time by
//! byte shuffles settles rounding and ties); other codes keep the table.
//! The step is compute-bound (it moves 16 bytes per element against the
//! 32-bit step's 28); per element it costs about the 32-bit update's divide
//! and square root plus two encodes and two decodes.

//! The kernel takes slices that start on a block boundary, so a paged
//! optimizer can call it on any run of whole blocks.

use std::sync::{Mutex, OnceLock};

use crate::blockwise8::Code8;
use crate::cpu::{self, Isa};
use crate::decade_code::DecadeCode;
use crate::dynamic_map::{dynamic_signed, dynamic_unsigned};
use crate::elem::Elem;
use crate::error::{invalid, Result};
use crate::parallel;
use crate::scale::{self, Scale};

/// Elements per block of 8-bit state (bitsandbytes hard-codes 256 on CPU).
pub const BLOCK: usize = 256;

/// Code of 0.0 on the signed map; a negative value never gets it.
const SIGNED_ZERO_CODE: u8 = 127;

// Lookup cell: sign (1 bit) | exponent - EMIN clamped to 0..=24 (5 bits) | top
// 7 mantissa bits. Both maps have no midpoint below 2^-24 in magnitude and
// none above 1, and 7 mantissa bits leave at most one midpoint per cell
// (checked when the table is built).
const EMIN: u32 = 103;
const EMAX: u32 = 127;
const MANT_BITS: u32 = 7;
const CELLS: usize = 1 << (1 + 5 + MANT_BITS);

// The table is indexed by the top 16 bits of the float with its magnitude
// clamped to [CLAMP_LO, CLAMP_HI] (the sign kept): sign | exponent | top 7
// mantissa bits, minus LUT_BASE. The positive and negative halves are 2^15
// apart; the unused entries between them are never read. Clamping the bits
// is cheaper than assembling a dense key (one SIMD min, max and merge).
const CLAMP_LO: u32 = EMIN << 23;
const CLAMP_HI: u32 = (EMAX << 23) | 0x7f_ffff;
const LUT_BASE: usize = (CLAMP_LO >> 16) as usize;
const LUT_LEN: usize = (((CLAMP_HI | 0x8000_0000) >> 16) as usize) + 1 - LUT_BASE;
/// Threshold no lane reaches: the cell holds no midpoint.
const NEVER_UP: u32 = 0xffff;

/// Table index of a float's bits (any bits: NaN lands in an end cell).
#[inline(always)]
fn lut_index(bits: u32) -> usize {
    let mag = (bits & 0x7fff_ffff).clamp(CLAMP_LO, CLAMP_HI);
    (((bits & 0x8000_0000) | mag) >> 16) as usize - LUT_BASE
}

/// Table index of a cell (see [`cell_range`]).
fn cell_index(key: usize) -> usize {
    let key = key as u32;
    let sign = key >> (5 + MANT_BITS);
    let ec = (key >> MANT_BITS) & 31;
    let mant = key & ((1 << MANT_BITS) - 1);
    ((sign << 15) | ((ec + EMIN) << MANT_BITS) | mant) as usize - LUT_BASE
}

/// The order bits of a float, in the top 16 bits of a word whose low 16 are
/// zero (what the table's thresholds are compared with).
#[inline(always)]
fn order_word(bits: u32) -> u32 {
    (bits ^ ((bits as i32 >> 31) as u32)) << 16
}

/// The lowest and highest float of a lookup cell (the clamped end cells
/// reach down to zero and up to infinity).
fn cell_range(key: usize) -> (f32, f32) {
    let key = key as u32;
    let sign = key >> (5 + MANT_BITS);
    let ec = (key >> MANT_BITS) & 31;
    let mant = key & ((1 << MANT_BITS) - 1);
    let low_bits = ((ec + EMIN) << 23) | (mant << (23 - MANT_BITS));
    let (lo, hi) = if ec == 0 && mant == 0 {
        (0, low_bits | ((1 << (23 - MANT_BITS)) - 1))
    } else if ec == EMAX - EMIN && mant == (1 << MANT_BITS) - 1 {
        (low_bits, 0x7f80_0000)
    } else {
        (low_bits, low_bits | ((1 << (23 - MANT_BITS)) - 1))
    };
    if sign == 0 {
        (f32::from_bits(lo), f32::from_bits(hi))
    } else {
        (-f32::from_bits(hi), -f32::from_bits(lo))
    }
}

/// The low 16 bits of a float, flipped for negative numbers: within one
/// lookup cell (all floats sharing sign, exponent and top 7 mantissa bits)
/// x < y exactly when `order_bits(x) < order_bits(y)`.
#[inline(always)]
fn order_bits(bits: u32) -> u32 {
    (bits & 0xffff) ^ (0u32.wrapping_sub(bits >> 31) & 0xffff)
}

/// A fast exact encoder for one of the two dynamic maps.
///
/// Each lookup cell stores, in one 32-bit word, `k` (bits 0..8: the code of
/// the cell's lowest floats) and in bits 16..32 a threshold `t`: floats of
/// the cell whose `order_bits` exceed `t` get `k + 1`. `t` is the
/// `order_bits` of the one midpoint inside the cell, less one where a tie
/// goes up (to the even index), or [`NEVER_UP`]. With the float's order bits
/// in the top half of a word ([`order_word`]), one unsigned comparison with
/// the whole entry decides (k < 2^16 never tips it).
pub struct FastCode {
    /// The 256 code values (what dequantization multiplies by absmax).
    pub values: [f32; 256],
    lut: Box<[u32]>,
    /// `lut` with every negative cell's code capped at 126 (the code below
    /// that of 0.0): encoding with it keeps the sign of a negative value
    /// that would round to 0.0, given that -0.0 was made +0.0 first.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    lut_keep_sign: Box<[u32]>,
    /// planes[j][c] = byte j of values[c]: four 256-byte tables that byte
    /// shuffles (AVX-512 VBMI) can index 64 codes at a time.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    planes: [[u8; 256]; 4],
    /// The arithmetic encoder of the dynamic maps (None for other codes),
    /// and the byte planes of its thresholds.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    decade: Option<(DecadeCode, [[u8; 256]; 4])>,
}

/// The four byte planes of 256 floats (what byte shuffles index).
fn byte_planes(values: &[f32; 256]) -> [[u8; 256]; 4] {
    let mut planes = [[0u8; 256]; 4];
    for (c, v) in values.iter().enumerate() {
        for (j, b) in v.to_bits().to_le_bytes().into_iter().enumerate() {
            planes[j][c] = b;
        }
    }
    planes
}

impl FastCode {
    /// Build the table for `values`; fails if some cell holds two midpoints,
    /// or one of the end cells (which also take every smaller or larger
    /// magnitude) holds any (the dynamic maps do neither).
    pub fn new(values: [f32; 256]) -> Result<Self> {
        let reference = Code8::new(values)?;
        let mut midpoints = [f32::INFINITY; 256];
        for k in 0..255 {
            midpoints[k] = (values[k] + values[k + 1]) * 0.5;
        }
        let below = |x: f32| midpoints[..255].iter().filter(|&&m| m < x).count();
        let mut lut = vec![0u32; LUT_LEN].into_boxed_slice();
        for key in 0..CELLS {
            if (key >> MANT_BITS) & 31 > (EMAX - EMIN) as usize {
                continue; // exponents above EMAX are clamped into the top cell
            }
            let (lo, hi) = cell_range(key);
            let k = below(lo);
            let kh = below(hi);
            let inside = kh - k + (kh < 255 && midpoints[kh] == hi) as usize;
            let end_cell = {
                let (ec, mant) = ((key >> MANT_BITS) & 31, key & ((1 << MANT_BITS) - 1));
                (ec == 0 && mant == 0) || (ec as u32 == EMAX - EMIN && mant == (1 << MANT_BITS) - 1)
            };
            if inside > 1 || (inside == 1 && end_cell) {
                return Err(invalid(format!("this 8-bit code has {inside} midpoints in lookup cell {key:#x} ({lo:e}..{hi:e})")));
            }
            // A tie goes to the even index: up from an odd k (255 is the last code).
            let tie_up = k & 1 == 1 && k != 255;
            let (mut k, mut t) = (k as u32, NEVER_UP);
            if inside == 1 {
                match order_bits(midpoints[k as usize].to_bits()).checked_sub(tie_up as u32) {
                    Some(th) => t = th,
                    None => k += 1, // the midpoint is the cell's lowest float and ties go up
                }
            }
            lut[cell_index(key)] = (t << 16) | k;
        }
        let planes = byte_planes(&values);
        let decade = DecadeCode::new(&values).map(|d| {
            let thr = byte_planes(&d.thr);
            (d, thr)
        });
        let mut lut_keep_sign = lut.clone();
        for key in (1 << (5 + MANT_BITS))..CELLS {
            if (key >> MANT_BITS) & 31 > (EMAX - EMIN) as usize {
                continue;
            }
            let e = &mut lut_keep_sign[cell_index(key)];
            let k = *e & 0xff;
            if k >= SIGNED_ZERO_CODE as u32 || (k + 1 == SIGNED_ZERO_CODE as u32 && *e >> 16 != NEVER_UP) {
                *e = (NEVER_UP << 16) | (SIGNED_ZERO_CODE as u32 - 1);
            }
        }
        let code = FastCode { values, lut, lut_keep_sign, planes, decade };
        // A cheap self-check: every code value and midpoint encodes as the
        // binary search does.
        for k in 0..255 {
            for x in [values[k], midpoints[k], midpoints[k].next_up(), midpoints[k].next_down()] {
                if code.encode(x) != reference.encode(x) {
                    return Err(invalid("fast 8-bit encoder disagrees with the reference"));
                }
            }
        }
        Ok(code)
    }

    /// Nearest code of `x`; ties go to the even index, NaN to 0 (as
    /// [`Code8::encode`]).
    #[inline(always)]
    pub fn encode(&self, x: f32) -> u8 {
        let bits = x.to_bits();
        let entry = self.lut[lut_index(bits)];
        let c = (entry & 0xff) + (order_word(bits) > entry) as u32;
        if x.is_nan() {
            0
        } else {
            c as u8
        }
    }

    /// The table with its base moved so that the unclamped index (the top 16
    /// bits of the clamped float) addresses it; only for the SIMD lookups,
    /// whose clamped indices read in bounds.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    fn gather_base(&self) -> *const i32 {
        self.lut.as_ptr().wrapping_sub(LUT_BASE) as *const i32
    }

    /// [`FastCode::gather_base`] of the keep-sign table.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    fn gather_base_keep_sign(&self) -> *const i32 {
        self.lut_keep_sign.as_ptr().wrapping_sub(LUT_BASE) as *const i32
    }
}

/// The signed dynamic map (state of m).
pub fn signed() -> &'static FastCode {
    static CODE: OnceLock<FastCode> = OnceLock::new();
    CODE.get_or_init(|| FastCode::new(dynamic_signed()).expect("the signed dynamic map fits the lookup table"))
}

/// The unsigned dynamic map (state of v).
pub fn unsigned() -> &'static FastCode {
    static CODE: OnceLock<FastCode> = OnceLock::new();
    CODE.get_or_init(|| FastCode::new(dynamic_unsigned()).expect("the unsigned dynamic map fits the lookup table"))
}

/// The float32 scalars of one 8-bit AdamW step, computed by the caller in
/// float64 as bitsandbytes does and rounded once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW8 {
    pub beta1: f32,
    /// f32(1 - beta1).
    pub one_minus_beta1: f32,
    pub beta2: f32,
    /// f32(1 - beta2).
    pub one_minus_beta2: f32,
    /// f32(sqrt(1 - beta2**step)).
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// f32(1 - lr * weight_decay); 1.0 without weight decay.
    pub decay: f32,
    /// f32(-lr / (1 - beta1**step)).
    pub step_size: f32,
    pub maximize: bool,
}

// ------------------------------------------------------------ block pieces

#[inline(always)]
fn dequantize_block(q: &[u8], values: &[f32; 256], absmax: f32, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(q) {
        *o = values[c as usize] * absmax;
    }
}

/// Update one block in float32; returns the new absmax of m and of v.
/// `F64` picks how `sqrt(v) / bc2_sqrt` is computed ([`crate::adamw::scaled_root`]).
#[inline(always)]
fn update_block<T: Elem, const F64: bool>(p: &mut [T], g: &[T], m: &mut [f32], v: &mut [f32], h: &AdamW8) -> (f32, f32) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    let sign = if h.maximize { -1.0f32 } else { 1.0 };
    let (mut max_m, mut max_v) = (0u32, 0u32);
    let inv_bc2 = 1.0 / h.bc2_sqrt as f64;
    for i in 0..n {
        let gi = g[i].to_f32() * sign;
        let m1 = gi.mul_add(h.one_minus_beta1, m[i] * h.beta1);
        let v1 = (h.one_minus_beta2 * gi).mul_add(gi, v[i] * h.beta2);
        // A NaN or infinite gradient makes m1 non-finite; an overflowing
        // square makes v1 infinite. Either way the element starts afresh.
        let ok = m1.is_finite() & v1.is_finite();
        let d = crate::adamw::scaled_root::<F64>(v1, h.bc2_sqrt, inv_bc2) + h.eps;
        let pi = p[i].to_f32();
        let p1 = pi * h.decay + (h.step_size * m1) / d;
        p[i] = T::from_f32(if ok { p1 } else { pi });
        let (m1, v1) = if ok { (m1, v1) } else { (0.0, 0.0) };
        m[i] = m1;
        v[i] = v1;
        max_m = max_m.max(m1.to_bits() & 0x7fff_ffff);
        max_v = max_v.max(v1.to_bits() & 0x7fff_ffff);
    }
    (f32::from_bits(max_m), f32::from_bits(max_v))
}

#[inline(always)]
fn encode_block(x: &[f32], scale: Scale, code: &FastCode, keep_sign: bool, out: &mut [u8]) {
    for (o, &xi) in out.iter_mut().zip(x) {
        let s = match scale {
            Scale::Mul(f) => xi * f,
            Scale::Div(a) => xi / a,
        };
        let c = code.encode(s);
        *o = if keep_sign && c == SIGNED_ZERO_CODE && xi < 0.0 { c - 1 } else { c };
    }
}

/// `base[index[i]]` for each lane of a SIMD encoder, by scalar loads: on
/// Zen 4 a 16-lane `vpgatherdd` costs about 24 cycles even from L1, and
/// sixteen loads straight into vector lanes (`vpinsrd`) take the fused
/// 8-bit step from 2.14 to 1.95 ns per element on one core (same codes);
/// on Zen 3 eight loads beat the AVX2 gather (0.40 against 0.61 ns per
/// element). Plain code, so it inlines into every SIMD caller.
///
/// Safety: each `base + index` must be in bounds; the indices are the top
/// bits of a clamped float (see [`FastCode::gather_base`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lookup_lanes<const N: usize>(base: *const i32, index: &[u32; N]) -> [i32; N] {
    let mut e = [0i32; N];
    for (e, &i) in e.iter_mut().zip(index) {
        *e = *base.wrapping_add(i as usize);
    }
    e
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{FastCode, Scale, CLAMP_HI, CLAMP_LO, SIGNED_ZERO_CODE};

    /// `base[index[i]]` for the 16 lanes (see [`super::lookup_lanes`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn lookup16(base: *const i32, index: __m512i) -> __m512i {
        let mut i = [0u32; 16];
        _mm512_storeu_si512(i.as_mut_ptr() as *mut _, index);
        _mm512_loadu_si512(super::lookup_lanes(base, &i).as_ptr() as *const _)
    }

    /// Codes of 16 scaled values as 32-bit lanes (as [`FastCode::encode`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn encode16(x: __m512, code: &FastCode) -> __m512i {
        let bits = _mm512_castps_si512(x);
        let mag = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
        let mag = _mm512_min_epu32(_mm512_max_epu32(mag, _mm512_set1_epi32(CLAMP_LO as i32)), _mm512_set1_epi32(CLAMP_HI as i32));
        // (bits & sign) | mag
        let clamped = _mm512_ternarylogic_epi32::<0xEC>(bits, mag, _mm512_set1_epi32(i32::MIN));
        let index = _mm512_srli_epi32::<16>(clamped);
        let entry = lookup16(code.gather_base(), index);
        let order = _mm512_slli_epi32::<16>(_mm512_xor_si512(bits, _mm512_srai_epi32::<31>(bits)));
        let up = _mm512_cmpgt_epu32_mask(order, entry);
        let k = _mm512_and_si512(entry, _mm512_set1_epi32(0xff));
        let c = _mm512_mask_add_epi32(k, up, k, _mm512_set1_epi32(1));
        let not_nan = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(x, x);
        _mm512_maskz_mov_epi32(not_nan, c)
    }

    /// `encode_block` for 16-element groups; the tail goes to the scalar code.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn encode_block(x: &[f32], scale: Scale, code: &FastCode, keep_sign: bool, out: &mut [u8]) {
        let n = x.len().min(out.len());
        let full = n / 16 * 16;
        let zero_code = _mm512_set1_epi32(SIGNED_ZERO_CODE as i32);
        for i in (0..full).step_by(16) {
            let xi = _mm512_loadu_ps(x.as_ptr().add(i));
            let s = match scale {
                Scale::Mul(f) => _mm512_mul_ps(xi, _mm512_set1_ps(f)),
                Scale::Div(a) => _mm512_div_ps(xi, _mm512_set1_ps(a)),
            };
            let mut c = encode16(s, code);
            if keep_sign {
                let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(xi, _mm512_setzero_ps());
                let neg_at_zero = _mm512_mask_cmpeq_epi32_mask(neg, c, zero_code);
                c = _mm512_mask_sub_epi32(c, neg_at_zero, c, _mm512_set1_epi32(1));
            }
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, _mm512_cvtepi32_epi8(c));
        }
        super::encode_block(&x[full..n], scale, code, keep_sign, &mut out[full..n]);
    }

    /// `code.values[q] * absmax` for 64 codes at a time without gathers: each
    /// byte of the float32 values is looked up in its own 256-byte plane by
    /// two 128-entry byte shuffles, and the four planes are interleaved back
    /// into floats. The codes are permuted first so that the in-lane
    /// interleave leaves the floats in order.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma")]
    pub(super) unsafe fn dequantize_block_vbmi(q: &[u8], code: &FastCode, absmax: f32, out: &mut [f32]) {
        let n = q.len().min(out.len());
        let full = n / 64 * 64;
        let mut perm = [0u8; 64];
        for (pos, p) in perm.iter_mut().enumerate() {
            let (lane, reg, k) = (pos / 16, (pos % 16) / 4, pos % 4);
            *p = (reg * 16 + lane * 4 + k) as u8;
        }
        let perm = _mm512_loadu_si512(perm.as_ptr() as *const _);
        let t = |j: usize, part: usize| _mm512_loadu_si512(code.planes[j].as_ptr().add(64 * part) as *const _);
        let tables = [
            [t(0, 0), t(0, 1), t(0, 2), t(0, 3)],
            [t(1, 0), t(1, 1), t(1, 2), t(1, 3)],
            [t(2, 0), t(2, 1), t(2, 2), t(2, 3)],
            [t(3, 0), t(3, 1), t(3, 2), t(3, 3)],
        ];
        let a = _mm512_set1_ps(absmax);
        for i in (0..full).step_by(64) {
            let c = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(q.as_ptr().add(i) as *const _));
            let upper = _mm512_movepi8_mask(c);
            let plane = |tb: &[__m512i; 4]| {
                let lo = _mm512_permutex2var_epi8(tb[0], c, tb[1]);
                let hi = _mm512_permutex2var_epi8(tb[2], c, tb[3]);
                _mm512_mask_blend_epi8(upper, lo, hi)
            };
            let (b0, b1, b2, b3) = (plane(&tables[0]), plane(&tables[1]), plane(&tables[2]), plane(&tables[3]));
            let (w01l, w01h) = (_mm512_unpacklo_epi8(b0, b1), _mm512_unpackhi_epi8(b0, b1));
            let (w23l, w23h) = (_mm512_unpacklo_epi8(b2, b3), _mm512_unpackhi_epi8(b2, b3));
            let r = [
                _mm512_unpacklo_epi16(w01l, w23l),
                _mm512_unpackhi_epi16(w01l, w23l),
                _mm512_unpacklo_epi16(w01h, w23h),
                _mm512_unpackhi_epi16(w01h, w23h),
            ];
            for (j, rj) in r.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(i + 16 * j), _mm512_mul_ps(_mm512_castsi512_ps(*rj), a));
            }
        }
        dequantize_block(&q[full..n], &code.values, absmax, &mut out[full..n]);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn dequantize_block(q: &[u8], values: &[f32; 256], absmax: f32, out: &mut [f32]) {
        let n = q.len().min(out.len());
        let full = n / 16 * 16;
        let a = _mm512_set1_ps(absmax);
        for i in (0..full).step_by(16) {
            let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.as_ptr().add(i) as *const __m128i));
            let vals = _mm512_i32gather_ps::<4>(idx, values.as_ptr());
            _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_mul_ps(vals, a));
        }
        super::dequantize_block(&q[full..n], values, absmax, &mut out[full..n]);
    }
}

/// The whole block fused for AVX-512 with VBMI and DQ and float32
/// parameters: codes are dequantized 64 at a time in registers and fed
/// straight to the update, the encoder clamps with `vrangeps`, keeps the
/// sign of m through its table, and packs 64 codes with two byte shuffles.
/// Inputs to the encoder are finite here (non-finite elements were reset),
/// so it skips the NaN test.
#[cfg(target_arch = "x86_64")]
mod vbmi {
    use std::arch::x86_64::*;

    use super::{AdamW8, FastCode, Scale, BLOCK, CLAMP_HI, CLAMP_LO};
    use crate::decade_code::EXP_LO;

    /// The four byte planes of a code's values as 16 registers' worth.
    pub(super) struct Planes([[__m512i; 4]; 4]);

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    pub(super) unsafe fn planes(code: &FastCode) -> Planes {
        planes_of(&code.planes)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    unsafe fn planes_of(bytes: &[[u8; 256]; 4]) -> Planes {
        let t = |j: usize, part: usize| _mm512_loadu_si512(bytes[j].as_ptr().add(64 * part) as *const _);
        Planes([
            [t(0, 0), t(0, 1), t(0, 2), t(0, 3)],
            [t(1, 0), t(1, 1), t(1, 2), t(1, 3)],
            [t(2, 0), t(2, 1), t(2, 2), t(2, 3)],
            [t(3, 0), t(3, 1), t(3, 2), t(3, 3)],
        ])
    }

    /// `values[q] * absmax` for 64 codes (as `avx512::dequantize_block_vbmi`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    pub(super) unsafe fn dequantize64(q: *const u8, tables: &Planes, absmax: __m512) -> [__m512; 4] {
        let v = lookup64(_mm512_loadu_si512(q as *const _), tables);
        [_mm512_mul_ps(v[0], absmax), _mm512_mul_ps(v[1], absmax), _mm512_mul_ps(v[2], absmax), _mm512_mul_ps(v[3], absmax)]
    }

    /// The table's floats at 64 byte indices, in order (16 per register).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    unsafe fn lookup64(q: __m512i, tables: &Planes) -> [__m512; 4] {
        const PERM: [u8; 64] = {
            let mut perm = [0u8; 64];
            let mut pos = 0;
            while pos < 64 {
                let (lane, reg, k) = (pos / 16, (pos % 16) / 4, pos % 4);
                perm[pos] = (reg * 16 + lane * 4 + k) as u8;
                pos += 1;
            }
            perm
        };
        let perm = _mm512_loadu_si512(PERM.as_ptr() as *const _);
        let c = _mm512_permutexvar_epi8(perm, q);
        let upper = _mm512_movepi8_mask(c);
        let plane = |tb: &[__m512i; 4]| {
            let lo = _mm512_permutex2var_epi8(tb[0], c, tb[1]);
            let hi = _mm512_permutex2var_epi8(tb[2], c, tb[3]);
            _mm512_mask_blend_epi8(upper, lo, hi)
        };
        let t = &tables.0;
        let (b0, b1, b2, b3) = (plane(&t[0]), plane(&t[1]), plane(&t[2]), plane(&t[3]));
        let (w01l, w01h) = (_mm512_unpacklo_epi8(b0, b1), _mm512_unpackhi_epi8(b0, b1));
        let (w23l, w23h) = (_mm512_unpacklo_epi8(b2, b3), _mm512_unpackhi_epi8(b2, b3));
        [
            _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01l, w23l)),
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01l, w23l)),
            _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01h, w23h)),
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01h, w23h)),
        ]
    }

    /// Codes of 16 finite scaled values, in the low byte of each lane.
    /// `base` is [`FastCode::gather_base`] or its keep-sign twin.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    unsafe fn encode16(s: __m512, base: *const i32) -> __m512i {
        // |s| clamped to [CLAMP_LO, CLAMP_HI], the sign of s kept (vrangeps:
        // max, then min, of absolute values, sign from the first operand:
        // imm8 bits 1:0 = 11 or 10, bits 3:2 = 00).
        let lo = _mm512_castsi512_ps(_mm512_set1_epi32(CLAMP_LO as i32));
        let hi = _mm512_castsi512_ps(_mm512_set1_epi32(CLAMP_HI as i32));
        let clamped = _mm512_range_ps::<0b0010>(_mm512_range_ps::<0b0011>(s, lo), hi);
        let index = _mm512_srli_epi32::<16>(_mm512_castps_si512(clamped));
        let mut i = [0u32; 16];
        _mm512_storeu_si512(i.as_mut_ptr() as *mut _, index);
        let entry = _mm512_loadu_si512(super::lookup_lanes(base, &i).as_ptr() as *const _);
        let bits = _mm512_castps_si512(s);
        let order = _mm512_slli_epi32::<16>(_mm512_xor_si512(bits, _mm512_srai_epi32::<31>(bits)));
        let up = _mm512_cmpgt_epu32_mask(order, entry);
        _mm512_mask_add_epi32(entry, up, entry, _mm512_set1_epi32(1))
    }

    /// The low bytes of 64 lanes, in order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    unsafe fn pack64(c: [__m512i; 4]) -> __m512i {
        const IDX: [u8; 64] = {
            let mut idx = [0u8; 64];
            let mut i = 0;
            while i < 64 {
                idx[i] = ((i % 32) * 4) as u8;
                i += 1;
            }
            idx
        };
        let idx = _mm512_loadu_si512(IDX.as_ptr() as *const _);
        let lo = _mm512_permutex2var_epi8(c[0], idx, c[1]);
        let hi = _mm512_permutex2var_epi8(c[2], idx, c[3]);
        _mm512_inserti64x4::<1>(lo, _mm512_castsi512_si256(hi))
    }

    /// Codes of the 64 finite values at `x`, scaled by `scale`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    unsafe fn encode64(x: *const f32, scale: Scale, base: *const i32) -> __m512i {
        let zero = _mm512_setzero_ps();
        let mut c = [_mm512_setzero_si512(); 4];
        for (j, cj) in c.iter_mut().enumerate() {
            let xi = _mm512_loadu_ps(x.add(16 * j));
            // Adding +0.0 turns a -0.0 x into +0.0 and changes nothing else
            // (a negative x whose scaled value underflows stays -0.0: the fma
            // rounds the exact, negative, product), so only a value below zero
            // reaches the negative cells.
            let s = match scale {
                Scale::Mul(f) => _mm512_fmadd_ps(xi, _mm512_set1_ps(f), zero),
                Scale::Div(a) => _mm512_div_ps(_mm512_add_ps(xi, zero), _mm512_set1_ps(a)),
            };
            *cj = encode16(s, base);
        }
        pack64(c)
    }

    /// [`DecadeCode`]'s tables in registers (thresholds as byte planes).
    pub(super) struct Decade {
        t0: (__m512i, __m512i),
        next: (__m512, __m512),
        scale: __m512,
        offset: __m512,
        base: __m512i,
        last: __m512i,
        thr: Planes,
        signed: bool,
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    pub(super) unsafe fn decade(code: &FastCode) -> Option<Decade> {
        let (d, thr) = code.decade.as_ref()?;
        let i = |a: &[i32], at: usize| _mm512_loadu_si512(a.as_ptr().add(at) as *const _);
        let f = |a: &[f32], at: usize| _mm512_loadu_ps(a.as_ptr().add(at));
        Some(Decade {
            t0: (i(&d.t0, 0), i(&d.t0, 16)),
            next: (f(&d.next, 0), f(&d.next, 16)),
            scale: f(&d.scale, 0),
            offset: f(&d.offset, 0),
            base: i(&d.base, 0),
            last: i(&d.last, 0),
            thr: planes_of(thr),
            signed: d.signed,
        })
    }

    /// Codes of the 64 finite values at `x`, scaled by `scale`, by the
    /// arithmetic of [`DecadeCode::encode`] (no table read per element):
    /// candidates from the exponent and one fused multiply-add, then one
    /// comparison with the thresholds, read 64 at a time by byte shuffles.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    unsafe fn encode64_decade(x: *const f32, scale: Scale, k: &Decade) -> __m512i {
        let zero = _mm512_setzero_ps();
        let one = _mm512_set1_epi32(1);
        let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
        let mut cand = [_mm512_setzero_si512(); 4];
        let mut mag = [zero; 4];
        let mut neg = 0u64;
        for j in 0..4 {
            let xi = _mm512_loadu_ps(x.add(16 * j));
            // +0.0 as in encode64: a negative x that underflows stays -0.0.
            let s = match scale {
                Scale::Mul(f) => _mm512_fmadd_ps(xi, _mm512_set1_ps(f), zero),
                Scale::Div(a) => _mm512_div_ps(_mm512_add_ps(xi, zero), _mm512_set1_ps(a)),
            };
            let bits = _mm512_castps_si512(s);
            neg |= (_mm512_movepi32_mask(bits) as u64) << (16 * j);
            let a = _mm512_castsi512_ps(_mm512_and_si512(bits, abs_mask));
            // Biased exponent, at least EXP_LO; its low 5 bits index the tables.
            let e = _mm512_srli_epi32::<23>(_mm512_castps_si512(a));
            let e = _mm512_min_epu32(_mm512_max_epu32(e, _mm512_set1_epi32(EXP_LO as i32)), _mm512_set1_epi32(127));
            let t0 = _mm512_permutex2var_epi32(k.t0.0, e, k.t0.1);
            let next = _mm512_permutex2var_ps(k.next.0, e, k.next.1);
            let t = _mm512_mask_add_epi32(t0, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, next), t0, one);
            let y = _mm512_fmadd_ps(a, _mm512_permutexvar_ps(t, k.scale), _mm512_permutexvar_ps(t, k.offset));
            let y = _mm512_min_ps(y, _mm512_set1_ps(512.0));
            let kk = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(y);
            let c = _mm512_add_epi32(kk, _mm512_permutexvar_epi32(t, k.base));
            cand[j] = _mm512_min_epi32(c, _mm512_permutexvar_epi32(t, k.last));
            mag[j] = a;
        }
        let codes = pack64(cand);
        let thr = lookup64(codes, &k.thr);
        let mut up = 0u64;
        for j in 0..4 {
            up |= (_mm512_cmp_ps_mask::<_CMP_GT_OQ>(mag[j], thr[j]) as u64) << (16 * j);
        }
        let codes = _mm512_mask_add_epi8(codes, up, codes, _mm512_set1_epi8(1));
        if !k.signed {
            // Every negative value's nearest is 0.0, code 0 (v never is negative).
            return _mm512_maskz_mov_epi8(!neg, codes);
        }
        // Negative values mirror positive ones (code 254 - c) and never get
        // the code of 0.0 (127), nor 255's mirror (there is no -1.0).
        let c = _mm512_min_epu8(_mm512_max_epu8(codes, _mm512_set1_epi8(128u8 as i8)), _mm512_set1_epi8(254u8 as i8));
        _mm512_mask_sub_epi8(codes, neg, _mm512_set1_epi8(254u8 as i8), c)
    }

    /// [`encode64_decade`] over `x` (finite, its length a multiple of 64),
    /// for tests.
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    pub(super) unsafe fn encode_decade(x: &[f32], scale: Scale, code: &FastCode, out: &mut [u8]) -> bool {
        let Some(k) = decade(code) else { return false };
        for i in (0..x.len() / 64 * 64).step_by(64) {
            _mm512_storeu_si512(out.as_mut_ptr().add(i) as *mut _, encode64_decade(x.as_ptr().add(i), scale, &k));
        }
        true
    }

    /// Encode `x` (finite) into `out` as the scalar `encode_block` does; a
    /// tail short of 64 goes to the scalar code. (The step encodes through
    /// `encode64` directly; this is the piece tests compare.)
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    pub(super) unsafe fn encode_finite(x: &[f32], scale: Scale, code: &FastCode, keep_sign: bool, out: &mut [u8]) {
        let n = x.len().min(out.len());
        let full = n / 64 * 64;
        let base = if keep_sign { code.gather_base_keep_sign() } else { code.gather_base() };
        for i in (0..full).step_by(64) {
            _mm512_storeu_si512(out.as_mut_ptr().add(i) as *mut _, encode64(x.as_ptr().add(i), scale, base));
        }
        super::encode_block(&x[full..n], scale, code, keep_sign, &mut out[full..n]);
    }

    /// The step's scalars, broadcast.
    struct Consts {
        beta1: __m512,
        omb1: __m512,
        beta2: __m512,
        omb2: __m512,
        bc2: __m512,
        eps: __m512,
        decay: __m512,
        step_size: __m512,
        flip: __m512,
    }

    /// Dequantize, update and write back p for the 64 elements at `e`; m and
    /// v go to `mb`, `vb` (reset where not finite); returns the running
    /// largest magnitudes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn update64<const MAXIMIZE: bool>(
        p: *mut f32,
        g: *const f32,
        qm: *const u8,
        qv: *const u8,
        absmax: (__m512, __m512),
        tables: (&Planes, &Planes),
        k: &Consts,
        mb: *mut f32,
        vb: *mut f32,
        max: (__m512, __m512),
    ) -> (__m512, __m512) {
        let (mut max_m, mut max_v) = max;
        let m = dequantize64(qm, tables.0, absmax.0);
        let v = dequantize64(qv, tables.1, absmax.1);
        for j in 0..4 {
            let e = 16 * j;
            // Negation is exact: maximize flips the sign bit.
            let gi = _mm512_loadu_ps(g.add(e));
            let gi = if MAXIMIZE { _mm512_xor_ps(gi, k.flip) } else { gi };
            let m1 = _mm512_fmadd_ps(gi, k.omb1, _mm512_mul_ps(m[j], k.beta1));
            let v1 = _mm512_fmadd_ps(_mm512_mul_ps(k.omb2, gi), gi, _mm512_mul_ps(v[j], k.beta2));
            // NaN or infinite (0x99: QNaN, +inf, -inf, SNaN): the element starts afresh.
            let bad = _mm512_fpclass_ps_mask::<0x99>(m1) | _mm512_fpclass_ps_mask::<0x99>(v1);
            // sqrt(v) / bc2_sqrt, correctly rounded: what div_by_const gives. Here
            // the divider has room to spare (the encoder's work fills the other
            // units), so the divide is cheaper than div_by_const's conversions.
            let d = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v1), k.bc2), k.eps);
            let pi = _mm512_loadu_ps(p.add(e));
            let p1 = _mm512_add_ps(_mm512_mul_ps(pi, k.decay), _mm512_div_ps(_mm512_mul_ps(k.step_size, m1), d));
            _mm512_storeu_ps(p.add(e), _mm512_mask_blend_ps(bad, p1, pi));
            let zero = _mm512_setzero_ps();
            let (m1, v1) = (_mm512_mask_mov_ps(m1, bad, zero), _mm512_mask_mov_ps(v1, bad, zero));
            _mm512_storeu_ps(mb.add(e), m1);
            _mm512_storeu_ps(vb.add(e), v1);
            // Largest magnitude, sign cleared (vrangeps absolute max, imm8 0b1011).
            max_m = _mm512_range_ps::<0b1011>(max_m, m1);
            max_v = _mm512_range_ps::<0b1011>(max_v, v1);
        }
        (max_m, max_v)
    }

    /// The step over whole blocks (`p.len()` a multiple of [`BLOCK`]),
    /// software-pipelined: each pass of the loop updates 64 elements of
    /// block b and encodes 64 of block b - 1 (whose absmax is known by
    /// then), so the update's divides and square roots overlap the
    /// encoder's table reads and integer work.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    pub(super) unsafe fn step_blocks(
        p: &mut [f32],
        g: &[f32],
        qm: &mut [u8],
        qv: &mut [u8],
        am: &mut [f32],
        av: &mut [f32],
        h: &AdamW8,
        cs: &FastCode,
        cu: &FastCode,
    ) {
        if h.maximize {
            pipelined::<true>(p, g, qm, qv, am, av, h, cs, cu)
        } else {
            pipelined::<false>(p, g, qm, qv, am, av, h, cs, cu)
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")]
    unsafe fn pipelined<const MAXIMIZE: bool>(
        p: &mut [f32],
        g: &[f32],
        qm: &mut [u8],
        qv: &mut [u8],
        am: &mut [f32],
        av: &mut [f32],
        h: &AdamW8,
        cs: &FastCode,
        cu: &FastCode,
    ) {
        let nb = p.len() / BLOCK;
        assert!(p.len() == nb * BLOCK && g.len() == p.len() && qm.len() == p.len() && qv.len() == p.len());
        assert!(am.len() == nb && av.len() == nb);
        let tables = (planes(cs), planes(cu));
        let k = Consts {
            beta1: _mm512_set1_ps(h.beta1),
            omb1: _mm512_set1_ps(h.one_minus_beta1),
            beta2: _mm512_set1_ps(h.beta2),
            omb2: _mm512_set1_ps(h.one_minus_beta2),
            bc2: _mm512_set1_ps(h.bc2_sqrt),
            eps: _mm512_set1_ps(h.eps),
            decay: _mm512_set1_ps(h.decay),
            step_size: _mm512_set1_ps(h.step_size),
            flip: _mm512_castsi512_ps(_mm512_set1_epi32(if h.maximize { i32::MIN } else { 0 })),
        };
        let (base_m, base_v) = (cs.gather_base_keep_sign(), cu.gather_base());
        // The arithmetic encoder where both maps have it (the dynamic ones do).
        let decades = match (decade(cs), decade(cu)) {
            (Some(dm), Some(dv)) => Some((dm, dv)),
            _ => None,
        };
        // m and v of two blocks: the one being updated and the one being encoded.
        let mut scratch = [[0f32; BLOCK]; 4];
        let mut scales = (Scale::Mul(0.0), Scale::Mul(0.0));
        let (pp, gp, qmp, qvp) = (p.as_mut_ptr(), g.as_ptr(), qm.as_mut_ptr(), qv.as_mut_ptr());
        for b in 0..=nb {
            let (cur, prev) = (2 * (b % 2), 2 * ((b + 1) % 2));
            let (mcur, vcur) = (scratch[cur].as_mut_ptr(), scratch[cur + 1].as_mut_ptr());
            let (mprev, vprev) = (scratch[prev].as_ptr(), scratch[prev + 1].as_ptr());
            if b + super::PREFETCH_BLOCKS < nb {
                super::prefetch_block::<f32>(pp as usize, gp as usize, qmp as usize, qvp as usize, p.len(), (b + super::PREFETCH_BLOCKS) * BLOCK);
            }
            let absmax = if b < nb { (_mm512_set1_ps(am[b]), _mm512_set1_ps(av[b])) } else { (_mm512_setzero_ps(), _mm512_setzero_ps()) };
            let mut max = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for i in (0..BLOCK).step_by(64) {
                if b < nb {
                    let e = b * BLOCK + i;
                    max = update64::<MAXIMIZE>(pp.add(e), gp.add(e), qmp.add(e), qvp.add(e), absmax, (&tables.0, &tables.1), &k, mcur.add(i), vcur.add(i), max);
                }
                if b > 0 {
                    let e = (b - 1) * BLOCK + i;
                    let (cm, cv) = match &decades {
                        Some((dm, dv)) => (encode64_decade(mprev.add(i), scales.0, dm), encode64_decade(vprev.add(i), scales.1, dv)),
                        None => (encode64(mprev.add(i), scales.0, base_m), encode64(vprev.add(i), scales.1, base_v)),
                    };
                    _mm512_storeu_si512(qmp.add(e) as *mut _, cm);
                    _mm512_storeu_si512(qvp.add(e) as *mut _, cv);
                }
            }
            if b < nb {
                let (new_am, new_av) = (_mm512_reduce_max_ps(max.0), _mm512_reduce_max_ps(max.1));
                am[b] = new_am;
                av[b] = new_av;
                scales = (super::scale::cuda_rule(new_am), super::scale::cuda_rule(new_av));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{FastCode, Scale, CLAMP_HI, CLAMP_LO};

    /// `base[index[i]]` for the 8 lanes (see [`super::lookup_lanes`]).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lookup8(base: *const i32, index: __m256i) -> __m256i {
        let mut i = [0u32; 8];
        _mm256_storeu_si256(i.as_mut_ptr() as *mut __m256i, index);
        _mm256_loadu_si256(super::lookup_lanes(base, &i).as_ptr() as *const __m256i)
    }

    /// Codes of 8 finite scaled values as 32-bit lanes (the AVX-512 `encode16`;
    /// AVX2 compares signed, so both sides of the comparison flip their top
    /// bit). No NaN test: the step's m and v are finite (a non-finite update
    /// resets the element).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn encode8_finite(s: __m256, base: *const i32) -> __m256i {
        let bits = _mm256_castps_si256(s);
        let top = _mm256_set1_epi32(i32::MIN);
        let mag = _mm256_andnot_si256(top, bits);
        let mag = _mm256_min_epu32(_mm256_max_epu32(mag, _mm256_set1_epi32(CLAMP_LO as i32)), _mm256_set1_epi32(CLAMP_HI as i32));
        let index = _mm256_srli_epi32::<16>(_mm256_or_si256(_mm256_and_si256(bits, top), mag));
        let entry = lookup8(base, index);
        let order = _mm256_slli_epi32::<16>(_mm256_xor_si256(bits, _mm256_srai_epi32::<31>(bits)));
        let up = _mm256_cmpgt_epi32(_mm256_xor_si256(order, top), _mm256_xor_si256(entry, top));
        _mm256_sub_epi32(_mm256_and_si256(entry, _mm256_set1_epi32(0xff)), up)
    }

    /// Encode the finite `x` into `out` as the scalar `encode_block` does, 32
    /// values per store. A negative value keeps its sign through the
    /// keep-sign table (as the AVX-512 `encode64`): one addition of +0.0
    /// instead of four operations per 8 values. A tail short of 32 goes to the
    /// scalar code.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn encode_finite(x: &[f32], scale: Scale, code: &FastCode, keep_sign: bool, out: &mut [u8]) {
        let n = x.len().min(out.len());
        let full = n / 32 * 32;
        let base = if keep_sign { code.gather_base_keep_sign() } else { code.gather_base() };
        let zero = _mm256_setzero_ps();
        // Dword order after the two packs: [c0 lo, c1 lo, c2 lo, c3 lo | c0 hi, ...].
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for i in (0..full).step_by(32) {
            let mut c = [_mm256_setzero_si256(); 4];
            for (j, cj) in c.iter_mut().enumerate() {
                let xi = _mm256_loadu_ps(x.as_ptr().add(i + 8 * j));
                // + 0.0 turns -0.0 into +0.0 and changes nothing else (see the
                // AVX-512 encode64), so only values below zero reach the negative cells.
                let s = match scale {
                    Scale::Mul(f) => _mm256_fmadd_ps(xi, _mm256_set1_ps(f), zero),
                    Scale::Div(a) => _mm256_div_ps(_mm256_add_ps(xi, zero), _mm256_set1_ps(a)),
                };
                *cj = encode8_finite(s, base);
            }
            let bytes = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
            _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, _mm256_permutevar8x32_epi32(bytes, order));
        }
        super::encode_block(&x[full..n], scale, code, keep_sign, &mut out[full..n]);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dequantize_block(q: &[u8], values: &[f32; 256], absmax: f32, out: &mut [f32]) {
        let n = q.len().min(out.len());
        let full = n / 8 * 8;
        let a = _mm256_set1_ps(absmax);
        for i in (0..full).step_by(8) {
            let at = |k: usize| *values.get_unchecked(*q.get_unchecked(i + k) as usize);
            let vals = _mm256_setr_ps(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(vals, a));
        }
        super::dequantize_block(&q[full..n], values, absmax, &mut out[full..n]);
    }
}

/// AVX-512 VBMI (byte shuffles across a whole register), for dequantization.
#[cfg(target_arch = "x86_64")]
fn has_vbmi() -> bool {
    static VBMI: OnceLock<bool> = OnceLock::new();
    *VBMI.get_or_init(|| {
        cpu::best() == Isa::Avx512 && is_x86_feature_detected!("avx512vbmi") && is_x86_feature_detected!("avx512dq")
    })
}

/// Which block pieces [`step_blocks`] uses.
const SCALAR: u8 = 0;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const AVX2: u8 = 1;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const AVX512: u8 = 2;

/// How far ahead of the block being updated its inputs are fetched: the
/// update is compute-bound, so the hardware prefetchers alone leave it
/// waiting for memory at the start of each block.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const PREFETCH_BLOCKS: usize = 4;

/// Ask for the cache lines of the block starting at element `at` (nothing
/// past the end). Addresses are passed as integers: a prefetch never faults,
/// but only in-bounds addresses are formed.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_block<T>(p: usize, g: usize, qm: usize, qv: usize, len: usize, at: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0, _MM_HINT_T0};
    if at + BLOCK > len {
        return;
    }
    let w = std::mem::size_of::<T>();
    // SAFETY: prefetching has no side effects; the addresses lie inside the slices.
    unsafe {
        for line in (0..BLOCK * w).step_by(64) {
            _mm_prefetch::<_MM_HINT_ET0>((p + at * w + line) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>((g + at * w + line) as *const i8);
        }
        for line in (0..BLOCK).step_by(64) {
            _mm_prefetch::<_MM_HINT_ET0>((qm + at + line) as *const i8);
            _mm_prefetch::<_MM_HINT_ET0>((qv + at + line) as *const i8);
        }
    }
}

/// One chunk of whole blocks (the last may be partial).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
// The prefetch addresses and block numbers are only read on x86.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn step_blocks<T: Elem, const SIMD: u8>(
    p: &mut [T],
    g: &[T],
    qm: &mut [u8],
    qv: &mut [u8],
    absmax_m: &mut [f32],
    absmax_v: &mut [f32],
    h: &AdamW8,
) {
    let (cs, cu) = (signed(), unsigned());
    #[cfg(target_arch = "x86_64")]
    let (p, g, qm, qv, absmax_m, absmax_v) = if SIMD == AVX512 && T::DTYPE == crate::elem::DType::F32 && has_vbmi() {
        let full = p.len() / BLOCK;
        let (p, p_tail) = p.split_at_mut(full * BLOCK);
        let (g, g_tail) = g.split_at(full * BLOCK);
        let (qm, qm_tail) = qm.split_at_mut(full * BLOCK);
        let (qv, qv_tail) = qv.split_at_mut(full * BLOCK);
        let (am, am_tail) = absmax_m.split_at_mut(full);
        let (av, av_tail) = absmax_v.split_at_mut(full);
        // SAFETY: has_vbmi() checked VBMI and DQ on top of this entry point's
        // AVX-512; T is f32 (checked above), so the casts are identities.
        unsafe {
            let p = std::slice::from_raw_parts_mut(p.as_mut_ptr() as *mut f32, p.len());
            let g = std::slice::from_raw_parts(g.as_ptr() as *const f32, g.len());
            vbmi::step_blocks(p, g, qm, qv, am, av, h, cs, cu);
        }
        // The partial last block, if any, takes the path below.
        (p_tail, g_tail, qm_tail, qv_tail, am_tail, av_tail)
    } else {
        (p, g, qm, qv, absmax_m, absmax_v)
    };
    let mut mb = [0f32; BLOCK];
    let mut vb = [0f32; BLOCK];
    let (p_at, g_at, qm_at, qv_at, len) = (p.as_ptr() as usize, g.as_ptr() as usize, qm.as_ptr() as usize, qv.as_ptr() as usize, p.len());
    let blocks = p
        .chunks_mut(BLOCK)
        .zip(g.chunks(BLOCK))
        .zip(qm.chunks_mut(BLOCK))
        .zip(qv.chunks_mut(BLOCK))
        .zip(absmax_m.iter_mut().zip(absmax_v.iter_mut()));
    for (b, ((((pb, gb), qmb), qvb), (am, av))) in blocks.enumerate() {
        #[cfg(target_arch = "x86_64")]
        if SIMD != SCALAR {
            prefetch_block::<T>(p_at, g_at, qm_at, qv_at, len, (b + PREFETCH_BLOCKS) * BLOCK);
        }
        let n = pb.len();
        let (mb, vb) = (&mut mb[..n], &mut vb[..n]);
        match SIMD {
            // SAFETY (both arms): only instantiated from the entry points
            // of these instruction sets, which cpu::usable() vetted.
            #[cfg(target_arch = "x86_64")]
            AVX512 => unsafe {
                if has_vbmi() {
                    avx512::dequantize_block_vbmi(qmb, cs, *am, mb);
                    avx512::dequantize_block_vbmi(qvb, cu, *av, vb);
                } else {
                    avx512::dequantize_block(qmb, &cs.values, *am, mb);
                    avx512::dequantize_block(qvb, &cu.values, *av, vb);
                }
            },
            #[cfg(target_arch = "x86_64")]
            AVX2 => unsafe {
                avx2::dequantize_block(qmb, &cs.values, *am, mb);
                avx2::dequantize_block(qvb, &cu.values, *av, vb);
            },
            _ => {
                dequantize_block(qmb, &cs.values, *am, mb);
                dequantize_block(qvb, &cu.values, *av, vb);
            }
        }
        // The float32 divide is the faster one on the AVX2 cores measured (Zen 3).
        let (new_am, new_av) = if SIMD == AVX2 {
            update_block::<T, false>(pb, gb, mb, vb, h)
        } else {
            update_block::<T, true>(pb, gb, mb, vb, h)
        };
        *am = new_am;
        *av = new_av;
        let (sm, sv) = (scale::cuda_rule(new_am), scale::cuda_rule(new_av));
        match SIMD {
            #[cfg(target_arch = "x86_64")]
            AVX512 => unsafe {
                avx512::encode_block(mb, sm, cs, true, qmb);
                avx512::encode_block(vb, sv, cu, false, qvb);
            },
            #[cfg(target_arch = "x86_64")]
            AVX2 => unsafe {
                avx2::encode_finite(mb, sm, cs, true, qmb);
                avx2::encode_finite(vb, sv, cu, false, qvb);
            },
            _ => {
                encode_block(mb, sm, cs, true, qmb);
                encode_block(vb, sv, cu, false, qvb);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn step_blocks_avx512<T: Elem>(
    p: &mut [T],
    g: &[T],
    qm: &mut [u8],
    qv: &mut [u8],
    am: &mut [f32],
    av: &mut [f32],
    h: &AdamW8,
) {
    step_blocks::<T, AVX512>(p, g, qm, qv, am, av, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn step_blocks_avx2<T: Elem>(
    p: &mut [T],
    g: &[T],
    qm: &mut [u8],
    qv: &mut [u8],
    am: &mut [f32],
    av: &mut [f32],
    h: &AdamW8,
) {
    step_blocks::<T, AVX2>(p, g, qm, qv, am, av, h)
}

#[allow(clippy::too_many_arguments)]
fn step_blocks_isa<T: Elem>(
    isa: Isa,
    p: &mut [T],
    g: &[T],
    qm: &mut [u8],
    qv: &mut [u8],
    am: &mut [f32],
    av: &mut [f32],
    h: &AdamW8,
) {
    match isa {
        // SAFETY: callers pass cpu::usable(..), so the CPU has these features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { step_blocks_avx512(p, g, qm, qv, am, av, h) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { step_blocks_avx2(p, g, qm, qv, am, av, h) },
        _ => step_blocks::<T, SCALAR>(p, g, qm, qv, am, av, h),
    }
}

/// One 8-bit AdamW step over `p` in place. `qm`, `qv` hold one code per
/// element; `absmax_m`, `absmax_v` one scale per block of [`BLOCK`].
#[allow(clippy::too_many_arguments)]
pub fn adamw8_step<T: Elem>(
    p: &mut [T],
    g: &[T],
    qm: &mut [u8],
    qv: &mut [u8],
    absmax_m: &mut [f32],
    absmax_v: &mut [f32],
    h: &AdamW8,
    threads: usize,
) -> Result<()> {
    adamw8_step_isa(cpu::best(), p, g, qm, qv, absmax_m, absmax_v, h, threads)
}

/// [`adamw8_step`] on a chosen instruction set; for tests and benchmarks.
#[allow(clippy::too_many_arguments)]
pub fn adamw8_step_isa<T: Elem>(
    isa: Isa,
    p: &mut [T],
    g: &[T],
    qm: &mut [u8],
    qv: &mut [u8],
    absmax_m: &mut [f32],
    absmax_v: &mut [f32],
    h: &AdamW8,
    threads: usize,
) -> Result<()> {
    let n = p.len();
    crate::adamw::check_lengths(n, g.len(), qm.len(), qv.len())?;
    let n_blocks = n.div_ceil(BLOCK);
    if absmax_m.len() != n_blocks || absmax_v.len() != n_blocks {
        return Err(invalid(format!(
            "{n} elements in blocks of {BLOCK} need {n_blocks} absmax values for each state, got {} and {}",
            absmax_m.len(),
            absmax_v.len()
        )));
    }
    let isa = cpu::usable(isa);
    let per_task = parallel::blocks_per_task(n_blocks, BLOCK, threads);
    if threads <= 1 || n_blocks <= per_task {
        step_blocks_isa(isa, p, g, qm, qv, absmax_m, absmax_v, h);
        return Ok(());
    }
    let elems = per_task * BLOCK;
    // One lock per task, each taken once: the slices of a task travel to
    // whichever thread claims it (torch's OpenMP team inside torch, whose
    // threads would otherwise spin against a separate pool's for the cores).
    type Task<'a, T> = (&'a mut [T], &'a [T], &'a mut [u8], &'a mut [u8], &'a mut [f32], &'a mut [f32]);
    let tasks: Vec<Mutex<Task<T>>> = p
        .chunks_mut(elems)
        .zip(g.chunks(elems))
        .zip(qm.chunks_mut(elems))
        .zip(qv.chunks_mut(elems))
        .zip(absmax_m.chunks_mut(per_task).zip(absmax_v.chunks_mut(per_task)))
        .map(|((((p, g), qm), qv), (am, av))| Mutex::new((p, g, qm, qv, am, av)))
        .collect();
    parallel::run_tasks(threads, tasks.len(), &|i| {
        let mut t = tasks[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (p, g, qm, qv, am, av) = &mut *t;
        step_blocks_isa(isa, p, g, qm, qv, am, av, h);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elem::Bf16;
    use proptest::prelude::*;

    fn references() -> [(Code8, &'static FastCode); 2] {
        [(Code8::new(dynamic_signed()).unwrap(), signed()), (Code8::new(dynamic_unsigned()).unwrap(), unsigned())]
    }

    #[test]
    fn fast_encoder_is_exact_near_every_midpoint_and_code() {
        for (slow, fast) in references() {
            for k in 0..256 {
                let centres = if k < 255 {
                    vec![fast.values[k], (fast.values[k] + fast.values[k + 1]) * 0.5]
                } else {
                    vec![fast.values[k]]
                };
                for c in centres {
                    let b = c.to_bits() as i64;
                    for d in -300..=300i64 {
                        let x = f32::from_bits((b + d).clamp(0, u32::MAX as i64) as u32);
                        assert_eq!(fast.encode(x), slow.encode(x), "x={x:e} ({:#x})", x.to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn fast_encoder_is_exact_on_a_sweep_of_bit_patterns() {
        // Every 61st pattern over all exponents, both signs (about 70 M floats),
        // plus the special values.
        for (slow, fast) in references() {
            let mut bits = 0u32;
            while bits < u32::MAX - 61 {
                let x = f32::from_bits(bits);
                assert_eq!(fast.encode(x), slow.encode(x), "x={x:e} ({bits:#x})");
                bits += 61;
            }
            for x in [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, f32::MIN_POSITIVE, 1.0, -1.0, 2.0, -2.0] {
                assert_eq!(fast.encode(x), slow.encode(x), "x={x:e}");
            }
        }
    }

    #[test]
    #[ignore = "every float32 bit pattern: about a minute in release mode"]
    fn fast_encoder_is_exact_on_every_bit_pattern() {
        for (slow, fast) in references() {
            for bits in 0..=u32::MAX {
                let x = f32::from_bits(bits);
                assert_eq!(fast.encode(x), slow.encode(x), "{bits:#x}");
            }
        }
        // The step's SIMD encoder (VBMI path) on every finite pattern, both tables.
        #[cfg(target_arch = "x86_64")]
        if has_vbmi() {
            let chunk = 1usize << 16;
            let (mut x, mut a, mut b) = (vec![0f32; chunk], vec![0u8; chunk], vec![0u8; chunk]);
            for (_, fast) in references() {
                for keep_sign in [false, true] {
                    for start in (0..=u32::MAX as usize).step_by(chunk) {
                        for (i, v) in x.iter_mut().enumerate() {
                            let f = f32::from_bits((start + i) as u32);
                            *v = if f.is_finite() { f } else { 0.0 };
                        }
                        encode_block(&x, Scale::Mul(1.0), fast, keep_sign, &mut a);
                        unsafe { vbmi::encode_finite(&x, Scale::Mul(1.0), fast, keep_sign, &mut b) };
                        assert!(a == b, "chunk at {start:#x}, keep_sign {keep_sign}");
                        // The arithmetic encoder (the signed map keeps the sign).
                        if keep_sign == (fast.values[0] < 0.0) {
                            assert!(unsafe { vbmi::encode_decade(&x, Scale::Mul(1.0), fast, &mut b) });
                            assert!(a == b, "decade encoder, chunk at {start:#x}");
                        }
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_blocks_match_scalar_blocks() {
        let avx512 = cpu::available().contains(&Isa::Avx512);
        if !avx512 && !cpu::available().contains(&Isa::Avx2) {
            return;
        }
        let mut s = 12345u64;
        let mut x = Vec::new();
        for _ in 0..20_000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let bits = (s >> 32) as u32;
            // Mostly values in [-1.01, 1.01]; some arbitrary patterns.
            let v = if s & 7 == 0 { f32::from_bits(bits) } else { ((bits as f32 / u32::MAX as f32) - 0.5) * 2.02 };
            x.push(v * if s & 0x30 == 0 { 1e-6 } else { 1.0 });
        }
        // Zeros of both signs, and negative values that scale to -0.0 (their
        // 8-bit m keeps the sign) or just past it.
        for (i, v) in [-0.0f32, 0.0, f32::from_bits(0x8000_0001), f32::from_bits(0x8000_0003), -1e-45, -3e-39, 1e-45, -6e-8, -5.9e-8, -2.9e-8]
            .into_iter()
            .enumerate()
        {
            x[100 + 7 * i] = v;
        }
        for (_, fast) in references() {
            for keep_sign in [false, true] {
                for scale in [Scale::Mul(1.0), Scale::Mul(0.75), Scale::Mul(0.25), Scale::Div(1.3), Scale::Div(4.0)] {
                    let mut a = vec![0u8; x.len() - 3];
                    let mut b = vec![0u8; x.len() - 3];
                    encode_block(&x[3..], scale, fast, keep_sign, &mut a);
                    if avx512 {
                        unsafe { avx512::encode_block(&x[3..], scale, fast, keep_sign, &mut b) };
                        assert_eq!(a, b);
                    }
                    let (mut d1, mut d2) = (vec![0f32; a.len()], vec![0f32; a.len()]);
                    dequantize_block(&a, &fast.values, 0.37, &mut d1);
                    if avx512 {
                        unsafe { avx512::dequantize_block(&a, &fast.values, 0.37, &mut d2) };
                        assert_eq!(d1, d2);
                    }
                    unsafe { avx2::dequantize_block(&a, &fast.values, 0.37, &mut d2) };
                    assert_eq!(d1, d2);
                    // The step's encoders take finite values only.
                    let finite: Vec<f32> = x[3..].iter().map(|&v| if v.is_finite() { v } else { -0.0 }).collect();
                    let mut c1 = vec![0u8; finite.len()];
                    let mut c2 = vec![1u8; finite.len()];
                    encode_block(&finite, scale, fast, keep_sign, &mut c1);
                    unsafe { avx2::encode_finite(&finite, scale, fast, keep_sign, &mut c2) };
                    let bad = c1.iter().zip(&c2).position(|(a, b)| a != b);
                    assert!(bad.is_none(), "AVX2 {scale:?} keep_sign {keep_sign}: x={:e} {:?}", finite[bad.unwrap_or(0)], bad.map(|i| (c1[i], c2[i])));
                    if has_vbmi() {
                        let mut d3 = vec![0f32; a.len()];
                        unsafe { avx512::dequantize_block_vbmi(&a, fast, 0.37, &mut d3) };
                        assert_eq!(d1, d3);
                        c2.fill(1);
                        unsafe { vbmi::encode_finite(&finite, scale, fast, keep_sign, &mut c2) };
                        let bad = c1.iter().zip(&c2).position(|(a, b)| a != b);
                        assert!(bad.is_none(), "{scale:?} keep_sign {keep_sign}: x={:e} {:?}", finite[bad.unwrap_or(0)], bad.map(|i| (c1[i], c2[i])));
                        // The arithmetic encoder: the signed map always keeps the sign.
                        if keep_sign == (fast.values[0] < 0.0) {
                            c2.fill(1);
                            let n = finite.len() / 64 * 64;
                            assert!(unsafe { vbmi::encode_decade(&finite[..n], scale, fast, &mut c2[..n]) }, "a dynamic map");
                            let bad = c1[..n].iter().zip(&c2[..n]).position(|(a, b)| a != b);
                            assert!(bad.is_none(), "decade {scale:?}: x={:e} {:?}", finite[bad.unwrap_or(0)], bad.map(|i| (c1[i], c2[i])));
                        }
                    }
                }
            }
        }
    }

    fn hyper(step: i32, lr: f64, wd: f64, maximize: bool) -> AdamW8 {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        AdamW8 {
            beta1: b1 as f32,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            bc2_sqrt: (1.0 - b2.powi(step)).sqrt() as f32,
            eps: eps as f32,
            decay: (1.0 - lr * wd) as f32,
            step_size: (-lr / (1.0 - b1.powi(step))) as f32,
            maximize,
        }
    }

    /// The documented algorithm written plainly, with the binary-search encoder.
    #[allow(clippy::too_many_arguments)]
    fn reference_step(p: &mut [f32], g: &[f32], qm: &mut [u8], qv: &mut [u8], am: &mut [f32], av: &mut [f32], h: &AdamW8) {
        let (cs, cu) = (Code8::new(dynamic_signed()).unwrap(), Code8::new(dynamic_unsigned()).unwrap());
        for b in 0..am.len() {
            let r = b * BLOCK..((b + 1) * BLOCK).min(p.len());
            let mut m: Vec<f32> = qm[r.clone()].iter().map(|&c| cs.values[c as usize] * am[b]).collect();
            let mut v: Vec<f32> = qv[r.clone()].iter().map(|&c| cu.values[c as usize] * av[b]).collect();
            for (j, e) in r.clone().enumerate() {
                let gi = if h.maximize { -g[e] } else { g[e] };
                let m1 = gi.mul_add(h.one_minus_beta1, m[j] * h.beta1);
                let v1 = (h.one_minus_beta2 * gi).mul_add(gi, v[j] * h.beta2);
                if m1.is_finite() && v1.is_finite() {
                    p[e] = p[e] * h.decay + (h.step_size * m1) / (v1.sqrt() / h.bc2_sqrt + h.eps);
                    m[j] = m1;
                    v[j] = v1;
                } else {
                    m[j] = 0.0;
                    v[j] = 0.0;
                }
            }
            let a1 = m.iter().fold(0f32, |a, x| a.max(x.abs()));
            let a2 = v.iter().fold(0f32, |a, x| a.max(x.abs()));
            am[b] = a1;
            av[b] = a2;
            let (i1, i2) = (if a1 > 0.0 { 1.0 / a1 } else { 0.0 }, if a2 > 0.0 { 1.0 / a2 } else { 0.0 });
            for (j, e) in r.enumerate() {
                let c = cs.encode(m[j] * i1);
                qm[e] = if c == 127 && m[j] < 0.0 { 126 } else { c };
                qv[e] = cu.encode(v[j] * i2);
            }
        }
    }

    fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_add(0x9e3779b97f4a7c15);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    #[test]
    fn steps_match_the_plain_reference_on_every_isa_and_thread_count() {
        let n: usize = 70_000 + 77; // several tasks, a partial last block
        let nb = n.div_ceil(BLOCK);
        for isa in cpu::available() {
            for threads in [1, 2, 3] {
                let mut p = noise(n, 1, 2.0);
                let (mut qm, mut qv) = (vec![127u8; n], vec![0u8; n]);
                let (mut am, mut av) = (vec![0f32; nb], vec![0f32; nb]);
                let mut rp = p.clone();
                let (mut rqm, mut rqv, mut ram, mut rav) = (qm.clone(), qv.clone(), am.clone(), av.clone());
                for step in 1..=5 {
                    let mut g = noise(n, 10 + step as u64, 0.1);
                    g[5] = f32::NAN;
                    g[300] = f32::INFINITY;
                    g[1000] = 1e30; // its square overflows
                    g[2000..2256].iter_mut().for_each(|x| *x = 0.0); // a zero block
                    let h = hyper(step, 1e-3, 0.01, step == 3);
                    adamw8_step_isa(isa, &mut p, &g, &mut qm, &mut qv, &mut am, &mut av, &h, threads).unwrap();
                    reference_step(&mut rp, &g, &mut rqm, &mut rqv, &mut ram, &mut rav, &h);
                    assert!(p == rp && qm == rqm && qv == rqv && am == ram && av == rav, "{isa:?} {threads} step {step}");
                }
            }
        }
    }

    #[test]
    fn non_finite_gradient_resets_the_element_and_keeps_the_weight() {
        let n = 512;
        let mut p = noise(n, 3, 1.0);
        let (mut qm, mut qv) = (vec![127u8; n], vec![0u8; n]);
        let (mut am, mut av) = (vec![0f32; 2], vec![0f32; 2]);
        let g = noise(n, 4, 1.0);
        adamw8_step(&mut p, &g, &mut qm, &mut qv, &mut am, &mut av, &hyper(1, 1e-2, 0.1, false), 1).unwrap();
        let before = p.clone();
        let mut g2 = noise(n, 5, 1.0);
        g2[10] = f32::NAN;
        g2[300] = f32::NEG_INFINITY;
        adamw8_step(&mut p, &g2, &mut qm, &mut qv, &mut am, &mut av, &hyper(2, 1e-2, 0.1, false), 1).unwrap();
        assert_eq!(p[10], before[10]);
        assert_eq!(p[300], before[300]);
        assert_eq!((qm[10], qv[10], qm[300], qv[300]), (127, 0, 127, 0));
        assert!(am.iter().chain(&av).all(|a| a.is_finite() && *a > 0.0));
        assert!(p.iter().all(|x| x.is_finite()));
        assert_ne!(p[11], before[11]);
    }

    #[test]
    fn negative_moment_keeps_its_sign() {
        // One element dwarfs the block, so a tiny negative m scales to almost 0.
        let n = 256;
        let mut p = vec![0f32; n];
        let mut g = vec![1e-9f32; n];
        g[0] = 1.0;
        g[1] = -1e-9;
        let (mut qm, mut qv) = (vec![127u8; n], vec![0u8; n]);
        let (mut am, mut av) = (vec![0f32], vec![0f32]);
        adamw8_step(&mut p, &g, &mut qm, &mut qv, &mut am, &mut av, &hyper(1, 1e-3, 0.0, false), 1).unwrap();
        assert_eq!(qm[1], 126);
        assert_eq!(qm[2], 127);
    }

    #[test]
    fn bf16_params_round_the_f32_result() {
        let n = 1000;
        let p0 = noise(n, 7, 1.0);
        let g = noise(n, 8, 0.1);
        let nb = n.div_ceil(BLOCK);
        let (mut qm1, mut qv1, mut am1, mut av1) = (vec![127u8; n], vec![0u8; n], vec![0f32; nb], vec![0f32; nb]);
        let (mut qm2, mut qv2, mut am2, mut av2) = (qm1.clone(), qv1.clone(), am1.clone(), av1.clone());
        let pb: Vec<Bf16> = p0.iter().map(|&x| Bf16::from_f32(x)).collect();
        let gb: Vec<Bf16> = g.iter().map(|&x| Bf16::from_f32(x)).collect();
        let mut p32: Vec<f32> = pb.iter().map(|x| x.to_f32()).collect();
        let g32: Vec<f32> = gb.iter().map(|x| x.to_f32()).collect();
        let mut p16 = pb.clone();
        let h = hyper(1, 1e-2, 0.0, false);
        adamw8_step(&mut p32, &g32, &mut qm1, &mut qv1, &mut am1, &mut av1, &h, 1).unwrap();
        adamw8_step(&mut p16, &gb, &mut qm2, &mut qv2, &mut am2, &mut av2, &h, 2).unwrap();
        assert_eq!((qm1, qv1, am1, av1), (qm2, qv2, am2, av2));
        for i in 0..n {
            assert_eq!(p16[i], Bf16::from_f32(p32[i]));
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        let h = hyper(1, 1e-3, 0.0, false);
        let mut p = vec![0f32; 300];
        let (mut qm, mut qv) = (vec![0u8; 300], vec![0u8; 300]);
        assert!(adamw8_step(&mut p, &[0.0; 300], &mut qm, &mut qv, &mut [0.0; 1], &mut [0.0; 2], &h, 1).is_err());
        assert!(adamw8_step(&mut p, &[0.0; 299], &mut qm, &mut qv, &mut [0.0; 2], &mut [0.0; 2], &h, 1).is_err());
        adamw8_step(&mut p, &[0.0; 300], &mut qm, &mut qv, &mut [0.0; 2], &mut [0.0; 2], &h, 1).unwrap();
    }

    proptest! {
        #[test]
        fn fast_encoder_matches_binary_search(bits in any::<u32>(), near in -1.1f32..1.1) {
            for (slow, fast) in references() {
                let x = f32::from_bits(bits);
                prop_assert_eq!(fast.encode(x), slow.encode(x));
                prop_assert_eq!(fast.encode(near), slow.encode(near));
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod timing {
    use super::*;

    /// CPU time of this thread: the machines these run on are shared, and
    /// time spent descheduled is not the kernel's.
    #[derive(Clone, Copy)]
    struct Instant(f64);

    impl Instant {
        fn now() -> Self {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: a plain system call writing into `ts`.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            Instant(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
        }
        fn elapsed(&self) -> std::time::Duration {
            std::time::Duration::from_secs_f64(Self::now().0 - self.0)
        }
    }

    /// Per-element cost of each piece on one L1-resident block, for the
    /// widest instruction set this CPU has (AVX-512, else AVX2).
    #[test]
    #[ignore = "timing, not a check"]
    fn pieces_in_cache() {
        let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if !(avx512 || avx2) {
            eprintln!("skipped: this CPU lacks AVX2");
            return;
        }
        const REPS: usize = 200_000;
        fn time(name: &str, mut f: impl FnMut()) {
            let t = Instant::now();
            for _ in 0..REPS {
                f();
            }
            eprintln!("{name:<16}{:.3} ns/elem", t.elapsed().as_nanos() as f64 / (REPS * BLOCK) as f64);
        }
        let x: Vec<f32> = (0..BLOCK).map(|i| ((i as f32 * 0.618).fract() - 0.5) * 2.0).collect();
        let xv: Vec<f32> = x.iter().map(|a| a * a).collect();
        let mut q = vec![0u8; BLOCK];
        let mut y = vec![0f32; BLOCK];
        let (cs, cu) = (signed(), unsigned());
        let mut p = x.clone();
        let g: Vec<f32> = x.iter().map(|v| v * 0.01).collect();
        let (mut m, mut v) = (x.clone(), xv.clone());
        let (mut qm, mut qv) = (vec![127u8; BLOCK], vec![3u8; BLOCK]);
        let (mut am, mut av) = (vec![0.5f32; 1], vec![0.25f32; 1]);
        let h = AdamW8 { beta1: 0.9, one_minus_beta1: 0.1, beta2: 0.999, one_minus_beta2: 0.001, bc2_sqrt: 0.03, eps: 1e-8, decay: 1.0, step_size: -1e-9, maximize: false };
        use std::hint::black_box as bb;
        if avx512 {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            unsafe fn upd(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamW8) -> (f32, f32) {
                update_block::<f32, true>(p, g, m, v, h)
            }
            time("encode", || unsafe { avx512::encode_block(bb(&x), Scale::Mul(1.0), cs, true, &mut q) });
            time("dequant gather", || unsafe { avx512::dequantize_block(bb(&q), &cs.values, 1.0, &mut y) });
            time("dequant vbmi", || unsafe { avx512::dequantize_block_vbmi(bb(&q), cs, 1.0, &mut y) });
            time("update", || {
                bb(unsafe { upd(&mut p, bb(&g), &mut m, &mut v, &h) });
            });
            if has_vbmi() {
                time("fused block", || unsafe {
                    vbmi::step_blocks(&mut p, bb(&g), &mut qm, &mut qv, &mut am, &mut av, &h, cs, cu)
                });
                time("encode vbmi", || unsafe { vbmi::encode_finite(bb(&x), Scale::Mul(1.0), cs, true, &mut q) });
            }
        } else {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn upd(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamW8) -> (f32, f32) {
                update_block::<f32, false>(p, g, m, v, h)
            }
            time("encode signed", || unsafe { avx2::encode_finite(bb(&x), Scale::Mul(1.0), cs, true, &mut q) });
            time("encode unsigned", || unsafe { avx2::encode_finite(bb(&xv), Scale::Mul(1.0), cu, false, &mut q) });
            time("dequant", || unsafe { avx2::dequantize_block(bb(&q), &cs.values, 1.0, &mut y) });
            time("update", || {
                bb(unsafe { upd(&mut p, bb(&g), &mut m, &mut v, &h) });
            });
            time("whole block", || {
                adamw8_step_isa(Isa::Avx2, &mut p, bb(&g), &mut qm, &mut qv, &mut am, &mut av, &h, 1).unwrap()
            });
        }
    }

    /// Best of several whole steps, 8-bit against 32-bit: on blocks that stay
    /// in cache, then on 16.8M elements with 1 and 2 threads (thread CPU
    /// time of the calling thread: meaningful for 1 thread only). Run with
    /// `cargo test --release timing::steps -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a check"]
    fn steps() {
        let n = 1 << 24;
        let x: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.618).fract() - 0.5) * 2.0).collect();
        let mut p = x.clone();
        let g: Vec<f32> = x.iter().map(|v| v * 0.01).collect();
        let (mut qm, mut qv) = (vec![127u8; n], vec![0u8; n]);
        let (mut am, mut av) = (vec![0f32; n / BLOCK], vec![0f32; n / BLOCK]);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let h = AdamW8 { beta1: 0.9, one_minus_beta1: 0.1, beta2: 0.999, one_minus_beta2: 0.001, bc2_sqrt: 0.03, eps: 1e-8, decay: 1.0, step_size: -1e-3, maximize: false };
        let h32 = crate::adamw::AdamW32 { decay: 1.0, lerp_weight: 0.1, beta2: 0.999, one_minus_beta2: 0.001, bc2_sqrt: 0.03, eps: 1e-8, step_size: -1e-3, maximize: false };
        for &k in &[1usize << 16, 1 << 18] {
            let reps = n / k;
            let best = |f: &mut dyn FnMut()| {
                (0..9).map(|_| { let t = Instant::now(); f(); t.elapsed().as_secs_f64() * 1e3 }).fold(f64::INFINITY, f64::min)
            };
            let t8 = best(&mut || for _ in 0..reps { adamw8_step(&mut p[..k], &g[..k], &mut qm[..k], &mut qv[..k], &mut am[..k / BLOCK], &mut av[..k / BLOCK], &h, 1).unwrap() });
            let t32 = best(&mut || for _ in 0..reps { crate::adamw::adamw_step(&mut p[..k], &g[..k], &mut m[..k], &mut v[..k], &h32, 1).unwrap() });
            eprintln!("cached {k}: 8-bit {:.3} ns/elem, 32-bit {:.3} ns/elem", t8 * 1e6 / n as f64, t32 * 1e6 / n as f64);
        }
        for threads in [1, 2] {
            let best = |f: &mut dyn FnMut()| {
                (0..9).map(|_| { let t = Instant::now(); f(); t.elapsed().as_secs_f64() * 1e3 }).fold(f64::INFINITY, f64::min)
            };
            let t8 = best(&mut || adamw8_step(&mut p, &g, &mut qm, &mut qv, &mut am, &mut av, &h, threads).unwrap());
            let t32 = best(&mut || crate::adamw::adamw_step(&mut p, &g, &mut m, &mut v, &h32, threads).unwrap());
            eprintln!("threads {threads}: 8-bit {t8:.2} ms, 32-bit {t32:.2} ms, ratio {:.2}", t8 / t32);
        }
    }

    /// Single-thread cost of the pieces of the 8-bit step (run with
    /// `cargo test --release timing -- --ignored --nocapture`).
    #[test]
    #[ignore = "timing, not a check"]
    fn phases() {
        let n = 1 << 24;
        let x: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.618).fract() - 0.5) * 2.0).collect();
        let mut q = vec![0u8; n];
        let mut y = vec![0f32; n];
        let cs = signed();
        // The pieces are the AVX-512 ones; the whole steps below run on any CPU.
        let pieces = if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") { 2 } else { 0 };
        for _ in 0..pieces {
            let t = Instant::now();
            for (xb, qb) in x.chunks(BLOCK).zip(q.chunks_mut(BLOCK)) {
                unsafe { avx512::encode_block(xb, Scale::Mul(1.0), cs, true, qb) };
            }
            eprintln!("encode   {:.2} ns/elem", t.elapsed().as_nanos() as f64 / n as f64);
            let t = Instant::now();
            for (qb, yb) in q.chunks(BLOCK).zip(y.chunks_mut(BLOCK)) {
                unsafe { avx512::dequantize_block(qb, &cs.values, 1.0, yb) };
            }
            eprintln!("dequant  {:.2} ns/elem", t.elapsed().as_nanos() as f64 / n as f64);
            if has_vbmi() {
                let t = Instant::now();
                for (qb, yb) in q.chunks(BLOCK).zip(y.chunks_mut(BLOCK)) {
                    unsafe { avx512::dequantize_block_vbmi(qb, cs, 1.0, yb) };
                }
                eprintln!("dequant vbmi {:.2} ns/elem", t.elapsed().as_nanos() as f64 / n as f64);
            }
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let t = Instant::now();
            for (xb, qb) in x.chunks(BLOCK).zip(q.chunks_mut(BLOCK)) {
                unsafe { avx2::encode_finite(xb, Scale::Mul(1.0), cs, true, qb) };
            }
            eprintln!("encode avx2  {:.2} ns/elem", t.elapsed().as_nanos() as f64 / n as f64);
            let t = Instant::now();
            for (qb, yb) in q.chunks(BLOCK).zip(y.chunks_mut(BLOCK)) {
                unsafe { avx2::dequantize_block(qb, &cs.values, 1.0, yb) };
            }
            eprintln!("dequant avx2 {:.2} ns/elem", t.elapsed().as_nanos() as f64 / n as f64);
        }
        let mut p = x.clone();
        let g: Vec<f32> = x.iter().map(|v| v * 0.01).collect();
        let (mut qm, mut qv) = (vec![127u8; n], vec![0u8; n]);
        let (mut am, mut av) = (vec![0f32; n / BLOCK], vec![0f32; n / BLOCK]);
        let h = AdamW8 { beta1: 0.9, one_minus_beta1: 0.1, beta2: 0.999, one_minus_beta2: 0.001, bc2_sqrt: 0.03, eps: 1e-8, decay: 1.0, step_size: -1e-3, maximize: false };
        for isa in [Isa::Avx512, Isa::Avx512, Isa::Avx2, Isa::Scalar] {
            let t = Instant::now();
            adamw8_step_isa(isa, &mut p, &g, &mut qm, &mut qv, &mut am, &mut av, &h, 1).unwrap();
            eprintln!("step {isa:?} {:.2} ns/elem", t.elapsed().as_nanos() as f64 / n as f64);
        }
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let h32 = crate::adamw::AdamW32 { decay: 1.0, lerp_weight: 0.1, beta2: 0.999, one_minus_beta2: 0.001, bc2_sqrt: 0.03, eps: 1e-8, step_size: -1e-3, maximize: false };
        for isa in [Isa::Avx512, Isa::Avx512, Isa::Avx2, Isa::Scalar] {
            let t = Instant::now();
            crate::adamw::adamw_step_isa(isa, &mut p, &g, &mut m, &mut v, &h32, 1).unwrap();
            eprintln!("step32 {isa:?} {:.2} ns/elem", t.elapsed().as_nanos() as f64 / n as f64);
        }
    }
}
