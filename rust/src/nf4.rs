//! Blockwise 4-bit (NF4 / FP4) quantization and dequantization
//! (../shared/FORMATS.md §2). Layout: block b holds flat elements
//! [b*bs, min((b+1)*bs, n)); element e goes to byte e/2, even e in the high
//! nibble; an odd n pads the last low nibble with the code of 0.0.

use std::sync::Mutex;

use crate::codebook::{encode_fp4, encode_nf4, QuantType};
use crate::cpu::{self, Isa};
use crate::elem::Elem;
use crate::error::{invalid, Error, Result};
use crate::{parallel, scale};

/// Block sizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Elements per inner tile; every block size is a multiple of it.
const TILE: usize = 32;

pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCK_SIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(invalid(format!(
            "blocksize must be one of {BLOCK_SIZES:?}, got {blocksize}"
        )))
    }
}

/// Per-block scales (absmax) of a 4-bit tensor: plain float32, or
/// double-quantized (8-bit codes on a 256-entry map, float32 scale per
/// `blocksize2` codes, plus a float32 offset).
#[derive(Clone, Copy)]
pub enum Scales<'a> {
    Plain(&'a [f32]),
    Nested(Nested<'a>),
}

/// Double-quantized scales: absmax[b] = code[qabsmax[b]] * absmax2[b / blocksize2] + offset,
/// two float32 roundings (multiply, then add) exactly as bitsandbytes does.
#[derive(Clone, Copy)]
pub struct Nested<'a> {
    pub qabsmax: &'a [u8],
    pub absmax2: &'a [f32],
    pub code: &'a [f32; 256],
    pub offset: f32,
    pub blocksize2: usize,
}

impl Scales<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Scales::Plain(a) => a.len(),
            Scales::Nested(n) => n.qabsmax.len(),
        }
    }

    pub(crate) fn check(&self, n_blocks: usize) -> Result<()> {
        if self.len() != n_blocks {
            return Err(invalid(format!(
                "expected {n_blocks} block scales, got {}",
                self.len()
            )));
        }
        if let Scales::Nested(n) = self {
            if n.blocksize2 == 0 {
                return Err(invalid("nested blocksize must be positive"));
            }
            let need = n.qabsmax.len().div_ceil(n.blocksize2);
            if n.absmax2.len() != need {
                return Err(invalid(format!(
                    "expected {need} nested scales for {} codes in blocks of {}, got {}",
                    n.qabsmax.len(),
                    n.blocksize2,
                    n.absmax2.len()
                )));
            }
        }
        Ok(())
    }

    #[inline(always)]
    pub(crate) fn get(&self, b: usize) -> f32 {
        match self {
            Scales::Plain(a) => a[b],
            Scales::Nested(n) => nested_scale(n.code[n.qabsmax[b] as usize], n.absmax2[b / n.blocksize2], n.offset),
        }
    }
}

/// One double-quantized scale, `code * absmax2 + offset` (multiply, then
/// add). Near the top of the float32 range the sum can round past the
/// largest float (a block holding `f32::MAX` among zero blocks) and inf
/// would turn that block into inf and NaN; the largest float is the scale
/// such a block had. NaN (a corrupt state) stays NaN.
#[inline(always)]
pub(crate) fn nested_scale(code: f32, absmax2: f32, offset: f32) -> f32 {
    let s = code * absmax2 + offset;
    if s > f32::MAX {
        f32::MAX
    } else {
        s
    }
}

/// Bytes of packed output for `n` elements.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

// ---------------------------------------------------------------- quantize

/// Largest |x| of a block as float32, or None if the block is not finite.
#[inline(always)]
fn block_absmax<T: Elem>(x: &[T]) -> Option<f32> {
    // |x| as bits orders like |x|; NaN and infinity sort above every finite value.
    let m = x.iter().fold(0u32, |m, v| m.max(v.abs_bits()));
    (m < T::NONFINITE_ABS_BITS).then(|| T::abs_bits_to_f32(m))
}

#[inline(always)]
fn encode_tile(qt: QuantType, scaled: &[f32; TILE]) -> [u8; TILE / 2] {
    let mut codes = [0u8; TILE];
    match qt {
        QuantType::Nf4 => {
            for (c, &s) in codes.iter_mut().zip(scaled) {
                *c = encode_nf4(s);
            }
        }
        QuantType::Fp4 => {
            for (c, &s) in codes.iter_mut().zip(scaled) {
                *c = encode_fp4(s);
            }
        }
    }
    let mut packed = [0u8; TILE / 2];
    for (j, p) in packed.iter_mut().enumerate() {
        *p = (codes[2 * j] << 4) | codes[2 * j + 1];
    }
    packed
}

#[inline(always)]
fn quantize_block<T: Elem>(x: &[T], qt: QuantType, bs: usize, out: &mut [u8]) -> Option<f32> {
    let absmax = block_absmax(x)?;
    let rule = match qt {
        QuantType::Nf4 => scale::cpu_rule(absmax, x.len() < bs),
        QuantType::Fp4 => scale::cuda_rule(absmax),
    };
    for (xt, ot) in x.chunks(TILE).zip(out.chunks_mut(TILE / 2)) {
        // A short last tile is padded with 0.0, which encodes as the code of 0.
        let mut f = [0.0f32; TILE];
        for (d, s) in f.iter_mut().zip(xt) {
            *d = s.to_f32();
        }
        let mut scaled = [0.0f32; TILE];
        scale::apply(rule, &f, &mut scaled);
        let packed = encode_tile(qt, &scaled);
        ot.copy_from_slice(&packed[..ot.len()]);
    }
    Some(absmax)
}

/// Quantize whole blocks; `first` is the flat index of x[0] (for errors).
#[inline(always)]
fn quantize_chunk<T: Elem>(
    x: &[T],
    qt: QuantType,
    bs: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    first: usize,
) -> Result<()> {
    for (b, (xb, pb)) in x.chunks(bs).zip(packed.chunks_mut(bs / 2)).enumerate() {
        match quantize_block(xb, qt, bs, pb) {
            Some(a) => absmax[b] = a,
            None => return Err(Error::NonFinite { index: first + b * bs }),
        }
    }
    Ok(())
}

// The generic Rust compiled for AVX2 (LLVM vectorizes the inlined loops);
// AVX-512 has a hand-written encoder in `x86`. The caller picks at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_chunk_avx2<T: Elem>(
    x: &[T],
    qt: QuantType,
    bs: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    first: usize,
) -> Result<()> {
    quantize_chunk(x, qt, bs, packed, absmax, first)
}

fn quantize_chunk_isa<T: Elem>(
    isa: Isa,
    x: &[T],
    qt: QuantType,
    bs: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    first: usize,
) -> Result<()> {
    match isa {
        // SAFETY: cpu::usable() only passes instruction sets this CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::quantize_chunk_avx512(x, qt, bs, packed, absmax, first) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { quantize_chunk_avx2(x, qt, bs, packed, absmax, first) },
        _ => quantize_chunk(x, qt, bs, packed, absmax, first),
    }
}

/// Blockwise 4-bit quantization of a flat tensor with the best instruction set.
///
/// `packed` must hold `ceil(n/2)` bytes and `absmax` `ceil(n/bs)` floats.
/// A NaN or infinity anywhere is an error (nothing sensible can be encoded).
pub fn quantize_4bit<T: Elem>(
    x: &[T],
    qt: QuantType,
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    threads: usize,
) -> Result<()> {
    quantize_4bit_isa(cpu::best(), x, qt, blocksize, packed, absmax, threads)
}

/// As [`quantize_4bit`] on a chosen instruction set (for tests and benches).
pub fn quantize_4bit_isa<T: Elem>(
    isa: Isa,
    x: &[T],
    qt: QuantType,
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    threads: usize,
) -> Result<()> {
    check_blocksize(blocksize)?;
    let isa = cpu::usable(isa);
    let n = x.len();
    let n_blocks = n.div_ceil(blocksize);
    if packed.len() != packed_len(n) {
        return Err(invalid(format!(
            "packed output must have {} bytes for {n} elements, got {}",
            packed_len(n),
            packed.len()
        )));
    }
    if absmax.len() != n_blocks {
        return Err(invalid(format!(
            "absmax output must have {n_blocks} entries, got {}",
            absmax.len()
        )));
    }
    let per_task = parallel::blocks_per_task(n_blocks, blocksize, threads);
    if threads <= 1 || n_blocks <= per_task {
        return quantize_chunk_isa(isa, x, qt, blocksize, packed, absmax, 0);
    }
    let elems = per_task * blocksize;
    // On torch's OpenMP team inside torch (see dequantize_4bit); each task
    // keeps its own error, and the first one in element order is reported.
    type Task<'a> = (&'a mut [u8], &'a mut [f32], Option<Error>);
    let tasks: Vec<Mutex<Task>> = packed
        .chunks_mut(elems / 2)
        .zip(absmax.chunks_mut(per_task))
        .map(|(ps, am)| Mutex::new((ps, am, None)))
        .collect();
    parallel::run_tasks(threads, tasks.len(), &|i| {
        let mut t = tasks[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (ps, am, err) = &mut *t;
        let xs = &x[i * elems..n.min((i + 1) * elems)];
        *err = quantize_chunk_isa(isa, xs, qt, blocksize, ps, am, i * elems).err();
    });
    let first_error = tasks
        .into_iter()
        .filter_map(|t| t.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()).2)
        .min_by_key(|e| match e {
            Error::NonFinite { index } => *index,
            _ => 0,
        });
    first_error.map_or(Ok(()), Err)
}

// -------------------------------------------------------------- dequantize

/// Scalar dequantization of up to one tile; the reference for the SIMD paths.
#[inline(always)]
fn dequant_tile_scalar<T: Elem>(p: &[u8], table: &[f32; 16], s: f32, out: &mut [T]) {
    for (pair, &byte) in out.chunks_mut(2).zip(p) {
        pair[0] = T::from_f32(table[(byte >> 4) as usize] * s);
        if let Some(o) = pair.get_mut(1) {
            *o = T::from_f32(table[(byte & 15) as usize] * s);
        }
    }
}

#[inline(always)]
fn dequant_chunk_scalar<T: Elem>(
    packed: &[u8],
    scales: &Scales,
    first_block: usize,
    table: &[f32; 16],
    bs: usize,
    out: &mut [T],
) {
    for (b, (ob, pb)) in out.chunks_mut(bs).zip(packed.chunks(bs / 2)).enumerate() {
        let s = scales.get(first_block + b);
        for (ot, pt) in ob.chunks_mut(TILE).zip(pb.chunks(TILE / 2)) {
            dequant_tile_scalar(pt, table, s, ot);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Hand-written dequantization tiles: the 16-entry code book sits in
    //! registers and a permute does the lookup (one vpermps per 16 values on
    //! AVX-512, two permutes and a blend per 8 on AVX2).
    use super::*;
    use crate::elem::DType;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load16_avx512<T: Elem>(p: *const T) -> __m512 {
        match T::DTYPE {
            DType::F32 | DType::Bf16InF32 | DType::F16InF32 => _mm512_loadu_ps(p as *const f32),
            DType::BF16 => {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            }
            DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        }
    }

    /// Codes of 16 scaled values as i32 lanes, by a 4-step (NF4) or 3-step
    /// (FP4 on |x|) branch-free search over the thresholds held in a register.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn encode16_avx512(qt: QuantType, x: __m512, thresholds: __m512) -> __m512i {
        match qt {
            QuantType::Nf4 => {
                let mut idx = _mm512_setzero_si512();
                for step in [8, 4, 2, 1] {
                    let probe = _mm512_add_epi32(idx, _mm512_set1_epi32(step - 1));
                    let t = _mm512_permutexvar_ps(probe, thresholds);
                    let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, t);
                    idx = _mm512_mask_add_epi32(idx, above, idx, _mm512_set1_epi32(step));
                }
                idx
            }
            QuantType::Fp4 => {
                let sign = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
                let a = _mm512_abs_ps(x);
                let mut rank = _mm512_setzero_si512();
                for step in [4, 2, 1] {
                    let probe = _mm512_add_epi32(rank, _mm512_set1_epi32(step - 1));
                    let t = _mm512_permutexvar_ps(probe, thresholds);
                    let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, t);
                    rank = _mm512_mask_add_epi32(rank, above, rank, _mm512_set1_epi32(step));
                }
                let two = _mm512_and_si512(rank, _mm512_set1_epi32(2));
                let code = _mm512_xor_si512(rank, _mm512_slli_epi32(two, 1));
                _mm512_mask_or_epi32(code, sign, code, _mm512_set1_epi32(8))
            }
        }
    }

    /// 16 codes (i32 lanes) -> 8 packed bytes, even element in the high nibble.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn pack16_avx512(codes: __m512i) -> __m128i {
        let odd = _mm512_srli_epi64(codes, 32);
        let pairs = _mm512_or_si512(_mm512_slli_epi64(codes, 4), odd);
        _mm512_cvtepi64_epi8(pairs)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn quantize_chunk_avx512<T: Elem>(
        x: &[T],
        qt: QuantType,
        bs: usize,
        packed: &mut [u8],
        absmax: &mut [f32],
        first: usize,
    ) -> Result<()> {
        let mut th = [f32::INFINITY; 16];
        match qt {
            QuantType::Nf4 => th[..15].copy_from_slice(&crate::codebook::NF4_MIDPOINTS),
            QuantType::Fp4 => th[..7].copy_from_slice(&crate::codebook::FP4_THRESHOLDS),
        }
        let thresholds = _mm512_loadu_ps(th.as_ptr());
        for (b, (xb, pb)) in x.chunks(bs).zip(packed.chunks_mut(bs / 2)).enumerate() {
            let Some(a) = block_absmax(xb) else {
                return Err(Error::NonFinite { index: first + b * bs });
            };
            absmax[b] = a;
            let rule = match qt {
                QuantType::Nf4 => scale::cpu_rule(a, xb.len() < bs),
                QuantType::Fp4 => scale::cuda_rule(a),
            };
            let full = xb.len() / TILE;
            for k in 0..full {
                let p = xb.as_ptr().add(k * TILE);
                let (v0, v1) = (load16_avx512(p), load16_avx512(p.add(16)));
                let (s0, s1) = match rule {
                    scale::Scale::Mul(m) => {
                        let m = _mm512_set1_ps(m);
                        (_mm512_mul_ps(v0, m), _mm512_mul_ps(v1, m))
                    }
                    scale::Scale::Div(d) => {
                        let d = _mm512_set1_ps(d);
                        (_mm512_div_ps(v0, d), _mm512_div_ps(v1, d))
                    }
                };
                let lo = pack16_avx512(encode16_avx512(qt, s0, thresholds));
                let hi = pack16_avx512(encode16_avx512(qt, s1, thresholds));
                let bytes = _mm_unpacklo_epi64(lo, hi);
                _mm_storeu_si128(pb.as_mut_ptr().add(k * TILE / 2) as *mut __m128i, bytes);
            }
            if full * TILE < xb.len() {
                // The short tail of a partial last block: the generic code.
                let mut f = [0.0f32; TILE];
                for (d, s) in f.iter_mut().zip(&xb[full * TILE..]) {
                    *d = s.to_f32();
                }
                let mut scaled = [0.0f32; TILE];
                scale::apply(rule, &f, &mut scaled);
                let bytes = encode_tile(qt, &scaled);
                let ot = &mut pb[full * TILE / 2..];
                let n = ot.len();
                ot.copy_from_slice(&bytes[..n]);
            }
        }
        Ok(())
    }

    /// Stores 16 values; with `NT`, non-temporal stores (`out` must then be
    /// 64-byte aligned for float32, 32-byte for 16-bit types).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn store16_avx512<T: Elem, const NT: bool>(v: __m512, out: *mut T) {
        let store256 = |p: *mut __m256i, x: __m256i| {
            if NT {
                _mm256_stream_si256(p, x)
            } else {
                _mm256_storeu_si256(p, x)
            }
        };
        let store_f32 = |v: __m512| {
            if NT {
                _mm512_stream_ps(out as *mut f32, v)
            } else {
                _mm512_storeu_ps(out as *mut f32, v)
            }
        };
        // bfloat16 bits (round to nearest even, NaN -> 0x7fc0) in the low half of each lane.
        let bf16_bits = |v: __m512| {
            let bits = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
            let rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb), 16);
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0))
        };
        match T::DTYPE {
            DType::F32 => store_f32(v),
            DType::BF16 => store256(out as *mut __m256i, _mm512_cvtepi32_epi16(bf16_bits(v))),
            DType::F16 => {
                let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                store256(out as *mut __m256i, h);
            }
            DType::Bf16InF32 => store_f32(_mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16))),
            DType::F16InF32 => store_f32(_mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))),
        }
    }

    /// 16 packed bytes -> 32 values. `p` must have 16 readable bytes, `out` 32 slots.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn tile_avx512<T: Elem, const NT: bool>(p: *const u8, table: __m512, s: __m512, out: *mut T) {
        let bytes = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        let lo = _mm_and_si128(bytes, mask);
        // Interleave so nibble order equals element order (high nibble first).
        let first = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
        let second = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
        let v0 = _mm512_mul_ps(_mm512_permutexvar_ps(first, table), s);
        let v1 = _mm512_mul_ps(_mm512_permutexvar_ps(second, table), s);
        store16_avx512::<T, NT>(v0, out);
        store16_avx512::<T, NT>(v1, out.add(16));
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn dequant_chunk_avx512<T: Elem, const NT: bool>(
        packed: &[u8],
        scales: &Scales,
        first_block: usize,
        table: &[f32; 16],
        bs: usize,
        out: &mut [T],
    ) {
        let t = _mm512_loadu_ps(table.as_ptr());
        for (b, (ob, pb)) in out.chunks_mut(bs).zip(packed.chunks(bs / 2)).enumerate() {
            let scale = scales.get(first_block + b);
            let s = _mm512_set1_ps(scale);
            let full = ob.len() / TILE;
            for k in 0..full {
                tile_avx512::<T, NT>(pb.as_ptr().add(k * TILE / 2), t, s, ob.as_mut_ptr().add(k * TILE));
            }
            if full * TILE < ob.len() {
                dequant_tile_scalar(&pb[full * TILE / 2..], table, scale, &mut ob[full * TILE..]);
            }
        }
        if NT {
            // Make the streaming stores visible before the caller reads the output.
            _mm_sfence();
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn store8_avx2<T: Elem>(v: __m256, out: *mut T) {
        // bfloat16 bits (round to nearest even, NaN -> 0x7fc0) in the low half of each lane.
        let bf16_bits = |v: __m256| {
            let bits = _mm256_castps_si256(v);
            let lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
            let rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
            let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan)
        };
        match T::DTYPE {
            DType::F32 => _mm256_storeu_ps(out as *mut f32, v),
            DType::BF16 => {
                let r = bf16_bits(v);
                // Pack 8 x u32 (each < 2^16) to 8 x u16.
                let lo = _mm256_castsi256_si128(r);
                let hi = _mm256_extracti128_si256::<1>(r);
                _mm_storeu_si128(out as *mut __m128i, _mm_packus_epi32(lo, hi));
            }
            DType::F16 => {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(out as *mut __m128i, h);
            }
            DType::Bf16InF32 => _mm256_storeu_ps(out as *mut f32, _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16))),
            DType::F16InF32 => {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm256_storeu_ps(out as *mut f32, _mm256_cvtph_ps(h))
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lookup8_avx2(idx: __m256i, t_lo: __m256, t_hi: __m256) -> __m256 {
        let a = _mm256_permutevar8x32_ps(t_lo, idx);
        let b = _mm256_permutevar8x32_ps(t_hi, idx);
        // Bit 3 of the code moved to the sign bit selects the upper half.
        let sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
        _mm256_blendv_ps(a, b, sel)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2<T: Elem>(p: *const u8, t_lo: __m256, t_hi: __m256, s: __m256, out: *mut T) {
        let bytes = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        let lo = _mm_and_si128(bytes, mask);
        let first = _mm_unpacklo_epi8(hi, lo);
        let second = _mm_unpackhi_epi8(hi, lo);
        let parts = [
            _mm256_cvtepu8_epi32(first),
            _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(first)),
            _mm256_cvtepu8_epi32(second),
            _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(second)),
        ];
        for (k, idx) in parts.into_iter().enumerate() {
            store8_avx2(_mm256_mul_ps(lookup8_avx2(idx, t_lo, t_hi), s), out.add(8 * k));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequant_chunk_avx2<T: Elem>(
        packed: &[u8],
        scales: &Scales,
        first_block: usize,
        table: &[f32; 16],
        bs: usize,
        out: &mut [T],
    ) {
        let t_lo = _mm256_loadu_ps(table.as_ptr());
        let t_hi = _mm256_loadu_ps(table.as_ptr().add(8));
        for (b, (ob, pb)) in out.chunks_mut(bs).zip(packed.chunks(bs / 2)).enumerate() {
            let scale = scales.get(first_block + b);
            let s = _mm256_set1_ps(scale);
            let full = ob.len() / TILE;
            for k in 0..full {
                tile_avx2(pb.as_ptr().add(k * TILE / 2), t_lo, t_hi, s, ob.as_mut_ptr().add(k * TILE));
            }
            if full * TILE < ob.len() {
                dequant_tile_scalar(&pb[full * TILE / 2..], table, scale, &mut ob[full * TILE..]);
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    //! NEON dequantization: the 64-byte code book sits in four registers and
    //! one TBL instruction gathers the bytes of four float32 values.
    use super::*;
    use std::arch::aarch64::*;

    /// 16 packed bytes -> 32 float32 values in `out`.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn tile_neon(p: *const u8, table: uint8x16x4_t, s: float32x4_t, out: &mut [f32; TILE]) {
        let bytes = vld1q_u8(p);
        let hi = vshrq_n_u8::<4>(bytes);
        let lo = vandq_u8(bytes, vdupq_n_u8(0x0f));
        // Codes in element order (high nibble first), times 4 = byte offsets.
        let codes = [vshlq_n_u8::<2>(vzip1q_u8(hi, lo)), vshlq_n_u8::<2>(vzip2q_u8(hi, lo))];
        const SPREAD: [[u8; 16]; 4] = [
            [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3],
            [4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7],
            [8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11],
            [12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15],
        ];
        let lane = vld1q_u8([0u8, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3].as_ptr());
        for (h, c) in codes.iter().enumerate() {
            for (g, spread) in SPREAD.iter().enumerate() {
                let idx = vaddq_u8(vqtbl1q_u8(*c, vld1q_u8(spread.as_ptr())), lane);
                let v = vreinterpretq_f32_u8(vqtbl4q_u8(table, idx));
                vst1q_f32(out.as_mut_ptr().add(16 * h + 4 * g), vmulq_f32(v, s));
            }
        }
    }

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dequant_chunk_neon<T: Elem>(
        packed: &[u8],
        scales: &Scales,
        first_block: usize,
        table: &[f32; 16],
        bs: usize,
        out: &mut [T],
    ) {
        let tp = table.as_ptr() as *const u8;
        let t = uint8x16x4_t(vld1q_u8(tp), vld1q_u8(tp.add(16)), vld1q_u8(tp.add(32)), vld1q_u8(tp.add(48)));
        let mut buf = [0.0f32; TILE];
        for (b, (ob, pb)) in out.chunks_mut(bs).zip(packed.chunks(bs / 2)).enumerate() {
            let scale = scales.get(first_block + b);
            let s = vdupq_n_f32(scale);
            let full = ob.len() / TILE;
            for k in 0..full {
                tile_neon(pb.as_ptr().add(k * TILE / 2), t, s, &mut buf);
                // float32 -> output type with the exact, vectorizable conversions of elem.rs.
                for (o, &v) in ob[k * TILE..(k + 1) * TILE].iter_mut().zip(&buf) {
                    *o = T::from_f32(v);
                }
            }
            if full * TILE < ob.len() {
                dequant_tile_scalar(&pb[full * TILE / 2..], table, scale, &mut ob[full * TILE..]);
            }
        }
    }
}

/// Outputs at least this large are written with non-temporal stores: they do
/// not fit in cache anyway, and streaming skips reading each line before
/// writing it.
const STREAM_MIN_BYTES: usize = 32 << 20;

#[allow(clippy::too_many_arguments)]
fn dequant_chunk_isa<T: Elem>(
    isa: Isa,
    packed: &[u8],
    scales: &Scales,
    first_block: usize,
    table: &[f32; 16],
    bs: usize,
    out: &mut [T],
    stream: bool,
) {
    // The chunk invariants hold by construction: `out` covers whole blocks
    // starting at `first_block`, and `packed` has ceil(out.len()/2) bytes.
    debug_assert_eq!(packed.len(), packed_len(out.len()));
    let _ = stream; // only the AVX-512 path streams
    match isa {
        // SAFETY: cpu::usable() only passes instruction sets this CPU has;
        // every full tile reads 16 bytes and writes 32 values inside the
        // slices checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if stream => unsafe {
            x86::dequant_chunk_avx512::<T, true>(packed, scales, first_block, table, bs, out)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::dequant_chunk_avx512::<T, false>(packed, scales, first_block, table, bs, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dequant_chunk_avx2(packed, scales, first_block, table, bs, out) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { arm::dequant_chunk_neon(packed, scales, first_block, table, bs, out) },
        _ => dequant_chunk_scalar(packed, scales, first_block, table, bs, out),
    }
}

/// Blockwise 4-bit dequantization: out[e] = table[code(e)] * absmax[e / bs],
/// computed in float32 and rounded to the output type.
pub fn dequantize_4bit<T: Elem>(
    packed: &[u8],
    scales: Scales,
    qt: QuantType,
    blocksize: usize,
    out: &mut [T],
    threads: usize,
) -> Result<()> {
    dequantize_4bit_isa(cpu::best(), packed, scales, qt, blocksize, out, threads)
}

/// As [`dequantize_4bit`] on a chosen instruction set (for tests and benches).
pub fn dequantize_4bit_isa<T: Elem>(
    isa: Isa,
    packed: &[u8],
    scales: Scales,
    qt: QuantType,
    blocksize: usize,
    out: &mut [T],
    threads: usize,
) -> Result<()> {
    check_blocksize(blocksize)?;
    let isa = cpu::usable(isa);
    let n = out.len();
    let n_blocks = n.div_ceil(blocksize);
    if packed.len() != packed_len(n) {
        return Err(invalid(format!(
            "packed input must have {} bytes for {n} elements, got {}",
            packed_len(n),
            packed.len()
        )));
    }
    scales.check(n_blocks)?;
    crate::memory::advise_hugepages(out);
    // Streaming stores need 64-byte alignment; every chunk starts a whole
    // number of 32-element tiles (>= 64 bytes) after the start.
    let stream = std::mem::size_of_val(out) >= STREAM_MIN_BYTES && (out.as_ptr() as usize).is_multiple_of(64);
    let table = qt.table();
    let per_task = parallel::blocks_per_task(n_blocks, blocksize, threads);
    if threads <= 1 || n_blocks <= per_task {
        dequant_chunk_isa(isa, packed, &scales, 0, table, blocksize, out, stream);
        return Ok(());
    }
    let elems = per_task * blocksize;
    // torch's OpenMP team runs the tasks inside torch (parallel::run_tasks):
    // this runs between torch operations in every 4-bit forward and
    // backward, just when that team's threads spin for the next one.
    let tasks: Vec<Mutex<&mut [T]>> = out.chunks_mut(elems).map(Mutex::new).collect();
    parallel::run_tasks(threads, tasks.len(), &|i| {
        let mut os = tasks[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let ps = &packed[i * elems / 2..packed.len().min((i + 1) * elems / 2)];
        dequant_chunk_isa(isa, ps, &scales, i * per_task, table, blocksize, &mut os, stream)
    });
    Ok(())
}

/// As [`dequantize_4bit_isa`], each row of `cols` values written to the
/// first `cols` elements of a row of `stride` in `out` (the rest of each
/// row untouched): a weight dequantized straight into a wider matrix, such
/// as a LoRA layer's weight with the adapter's columns beside it, instead of
/// into a buffer of its own and then copied. `cols` must be a multiple of
/// the block size (rows are whole blocks) and `out` hold exactly
/// `rows * stride` elements, `rows` being the packed values over `cols`.
#[allow(clippy::too_many_arguments)]
pub fn dequantize_4bit_rows_isa<T: Elem>(
    isa: Isa,
    packed: &[u8],
    scales: Scales,
    qt: QuantType,
    blocksize: usize,
    cols: usize,
    stride: usize,
    out: &mut [T],
    threads: usize,
) -> Result<()> {
    check_blocksize(blocksize)?;
    if cols == 0 || !cols.is_multiple_of(blocksize) {
        return Err(invalid(format!(
            "cols ({cols}) must be a positive multiple of the block size ({blocksize}), so that every row is whole blocks"
        )));
    }
    if stride < cols {
        return Err(invalid(format!("stride ({stride}) must be at least cols ({cols})")));
    }
    let n = packed.len() * 2;
    if !n.is_multiple_of(cols) {
        return Err(invalid(format!(
            "packed input holds {n} values, not a whole number of rows of {cols}"
        )));
    }
    let rows = n / cols;
    if Some(out.len()) != rows.checked_mul(stride) {
        return Err(invalid(format!(
            "output must have rows * stride = {rows} * {stride} elements, got {}",
            out.len()
        )));
    }
    scales.check(n / blocksize)?;
    if rows == 0 {
        return Ok(());
    }
    let isa = cpu::usable(isa);
    let table = qt.table();
    let per_row = cols / blocksize;
    let rows_per_task = parallel::blocks_per_task(n / blocksize, blocksize, threads).div_ceil(per_row);
    let task = |r0: usize, os: &mut [T]| {
        for (j, row) in os.chunks_exact_mut(stride).enumerate() {
            let r = r0 + j;
            let ps = &packed[r * cols / 2..(r + 1) * cols / 2];
            dequant_chunk_isa(isa, ps, &scales, r * per_row, table, blocksize, &mut row[..cols], false);
        }
    };
    if threads <= 1 || rows <= rows_per_task {
        task(0, out);
        return Ok(());
    }
    let tasks: Vec<Mutex<&mut [T]>> = out.chunks_mut(rows_per_task * stride).map(Mutex::new).collect();
    parallel::run_tasks(threads, tasks.len(), &|i| {
        let mut os = tasks[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        task(i * rows_per_task, &mut os)
    });
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::elem::{Bf16, F16};

    /// Deterministic pseudo-normal values (sum of uniforms), scaled per call.
    pub(crate) fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                let mut acc = 0.0f32;
                for _ in 0..4 {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    acc += ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                }
                acc * scale
            })
            .collect()
    }

    fn roundtrip<T: Elem>(isa: Isa, x: &[T], qt: QuantType, bs: usize, threads: usize) -> (Vec<u8>, Vec<f32>, Vec<T>) {
        let n = x.len();
        let mut p = vec![0u8; packed_len(n)];
        let mut a = vec![0f32; n.div_ceil(bs)];
        quantize_4bit_isa(isa, x, qt, bs, &mut p, &mut a, threads).unwrap();
        let mut out = vec![T::from_f32(0.0); n];
        dequantize_4bit_isa(isa, &p, Scales::Plain(&a), qt, bs, &mut out, threads).unwrap();
        (p, a, out)
    }

    #[test]
    fn reference_encoding_and_layout() {
        // Block of 32 with absmax 1: values equal to code-book entries encode to
        // their own codes; element 0 lands in the high nibble of byte 0.
        let mut x = vec![0.0f32; 32];
        for (i, v) in x.iter_mut().enumerate().take(16) {
            *v = crate::codebook::NF4[i];
        }
        let (p, a, out) = roundtrip(Isa::Scalar, &x, QuantType::Nf4, 32, 1);
        assert_eq!(a, vec![1.0]);
        assert_eq!(&p[..8], &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(&p[8..], &[0x77; 8]);
        assert_eq!(&out[..16], &crate::codebook::NF4[..]);
    }

    #[test]
    fn every_isa_gives_the_same_bytes_and_values() {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for &bs in &BLOCK_SIZES {
                for n in [1, 2, 31, 33, 65, bs * 3 + 17, 20_000] {
                    let x = data(n, n as u64 + bs as u64, 3.0);
                    let xb: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
                    let xh: Vec<F16> = x.iter().map(|&v| F16::from_f32(v)).collect();
                    let r32 = roundtrip(Isa::Scalar, &x, qt, bs, 1);
                    let rb = roundtrip(Isa::Scalar, &xb, qt, bs, 1);
                    let rh = roundtrip(Isa::Scalar, &xh, qt, bs, 1);
                    for isa in cpu::available() {
                        for threads in [1, 3] {
                            assert_eq!(roundtrip(isa, &x, qt, bs, threads), r32, "{isa:?} f32 {qt:?} bs={bs} n={n}");
                            assert_eq!(roundtrip(isa, &xb, qt, bs, threads), rb, "{isa:?} bf16 {qt:?} bs={bs} n={n}");
                            assert_eq!(roundtrip(isa, &xh, qt, bs, threads), rh, "{isa:?} f16 {qt:?} bs={bs} n={n}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rows_go_into_a_wider_matrix_unchanged() {
        for &bs in &BLOCK_SIZES {
            for (rows, per_row) in [(1, 1), (3, 2), (40, 1), (257, 3)] {
                let cols = bs * per_row;
                let x = data(rows * cols, (rows + bs) as u64, 2.0);
                let (p, a, want) = roundtrip(Isa::Scalar, &x, QuantType::Nf4, bs, 1);
                for isa in cpu::available() {
                    for threads in [1, 3] {
                        for extra in [0, 5, 16] {
                            let stride = cols + extra;
                            let mut out = vec![Bf16::from_f32(7.0); rows * stride];
                            dequantize_4bit_rows_isa(isa, &p, Scales::Plain(&a), QuantType::Nf4, bs, cols, stride, &mut out, threads)
                                .unwrap();
                            for (r, row) in out.chunks_exact(stride).enumerate() {
                                let got: Vec<f32> = row[..cols].iter().map(|v| v.to_f32()).collect();
                                let exp: Vec<f32> = want[r * cols..(r + 1) * cols].iter().map(|&v| Bf16::from_f32(v).to_f32()).collect();
                                assert_eq!(got, exp, "{isa:?} bs={bs} rows={rows} cols={cols} stride={stride} row {r}");
                                assert!(row[cols..].iter().all(|v| v.to_f32() == 7.0), "columns past cols were written");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rows_reject_bad_shapes() {
        let x = data(256, 1, 1.0);
        let (p, a, _) = roundtrip(Isa::Scalar, &x, QuantType::Nf4, 64, 1);
        let run = |cols: usize, stride: usize, len: usize| {
            let mut out = vec![0f32; len];
            dequantize_4bit_rows_isa(Isa::Scalar, &p, Scales::Plain(&a), QuantType::Nf4, 64, cols, stride, &mut out, 1)
        };
        assert!(run(128, 130, 260).is_ok());
        assert!(run(96, 100, 400).is_err(), "cols not whole blocks");
        assert!(run(0, 0, 0).is_err(), "cols 0");
        assert!(run(128, 100, 200).is_err(), "stride below cols");
        assert!(run(128, 130, 259).is_err(), "output too short");
        assert!(run(128, 130, 261).is_err(), "output too long");
        assert!(run(192, 192, 384).is_err(), "not whole rows");
    }

    #[test]
    fn large_outputs_stream_the_same_values() {
        // Above STREAM_MIN_BYTES the AVX-512 path uses non-temporal stores.
        let n = STREAM_MIN_BYTES / 4 + 96;
        let x = data(n, 5, 1.0);
        let reference = roundtrip(Isa::Scalar, &x, QuantType::Nf4, 64, 2);
        for isa in cpu::available() {
            assert!(roundtrip(isa, &x, QuantType::Nf4, 64, 2) == reference, "{isa:?}");
        }
        let xb: Vec<Bf16> = data(STREAM_MIN_BYTES / 2 + 32, 6, 1.0).iter().map(|&v| Bf16::from_f32(v)).collect();
        let reference = roundtrip(Isa::Scalar, &xb, QuantType::Fp4, 128, 2);
        for isa in cpu::available() {
            assert!(roundtrip(isa, &xb, QuantType::Fp4, 128, 2) == reference, "{isa:?}");
        }
    }

    #[test]
    fn reconstruction_error_is_within_half_the_widest_gap() {
        let widest = |t: &[f32; 16]| {
            let mut v = t.to_vec();
            v.sort_by(f32::total_cmp);
            v.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max)
        };
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let half_gap = widest(qt.table()) / 2.0;
            for &bs in &BLOCK_SIZES {
                let x = data(bs * 5 + 3, 7, 10.0);
                let (_, a, out) = roundtrip(cpu::best(), &x, qt, bs, 2);
                for (e, (&v, &o)) in x.iter().zip(&out).enumerate() {
                    let bound = half_gap * a[e / bs] * (1.0 + 1e-6);
                    assert!((v - o).abs() <= bound, "{qt:?} bs={bs} e={e}: {v} -> {o}");
                }
            }
        }
    }

    #[test]
    fn zero_blocks_dequantize_to_zero() {
        let x = vec![0.0f32; 200];
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let (p, a, out) = roundtrip(cpu::best(), &x, qt, 64, 1);
            assert!(a.iter().all(|&v| v == 0.0));
            let byte = if qt == QuantType::Nf4 { 0x77 } else { 0x00 };
            assert!(p.iter().all(|&b| b == byte), "{qt:?}: {p:?}");
            assert!(out.iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn widened_outputs_equal_16_bit_outputs_widened() {
        use crate::elem::{Bf16InF32, F16InF32};
        fn check<R: Elem, W: Elem>(isa: Isa, p: &[u8], sc: Scales, qt: QuantType, bs: usize, n: usize) {
            for threads in [1, 3] {
                let mut narrow = vec![R::from_f32(0.0); n];
                dequantize_4bit_isa(isa, p, sc, qt, bs, &mut narrow, threads).unwrap();
                let mut wide = vec![W::from_f32(f32::NAN); n];
                dequantize_4bit_isa(isa, p, sc, qt, bs, &mut wide, threads).unwrap();
                let want: Vec<u32> = narrow.iter().map(|v| v.to_f32().to_bits()).collect();
                let got: Vec<u32> = wide.iter().map(|v| v.to_f32().to_bits()).collect();
                assert_eq!(got, want, "{isa:?} {qt:?} bs={bs} n={n} threads={threads}");
            }
        }
        // Odd lengths, partial last blocks, tiny and huge scales (float16
        // overflow and subnormals), a NaN scale.
        for (i, &n) in [1usize, 63, 4097, 70_001].iter().enumerate() {
            for &bs in &[32usize, 64, 4096] {
                for qt in [QuantType::Nf4, QuantType::Fp4] {
                    let x = data(n, (i * 7 + bs) as u64, [1.0, 1e-38, 1e38, 7e4][i % 4]);
                    let (p, mut a, _) = roundtrip(Isa::Scalar, &x, qt, bs, 1);
                    let mid = a.len() / 2;
                    a[mid] = f32::NAN;
                    for isa in cpu::available() {
                        check::<Bf16, Bf16InF32>(isa, &p, Scales::Plain(&a), qt, bs, n);
                        check::<F16, F16InF32>(isa, &p, Scales::Plain(&a), qt, bs, n);
                    }
                }
            }
        }
    }

    #[test]
    fn nested_scales_past_the_largest_float_are_clamped() {
        use crate::blockwise8::{double_quantize, mean, Code8};
        use crate::dynamic_map::dynamic_signed;
        // The largest float among zero blocks: the block's rebuilt scale
        // (code * absmax2 + offset) rounds past f32::MAX for some lengths.
        let code = Code8::new(dynamic_signed()).unwrap();
        let mut clamped = 0;
        for n in [583usize, 600, 640, 700] {
            let mut x = vec![0f32; n];
            x[0] = f32::MAX;
            let (p, a, _) = roundtrip(Isa::Scalar, &x, QuantType::Nf4, 64, 1);
            let offset = mean(&a);
            let mut q = vec![0u8; a.len()];
            let mut a2 = vec![0f32; a.len().div_ceil(256)];
            double_quantize(&a, offset, &code, &mut q, &mut a2, 1).unwrap();
            clamped += (code.values[q[0] as usize] * a2[0] + offset == f32::INFINITY) as usize;
            let nested = Scales::Nested(Nested { qabsmax: &q, absmax2: &a2, code: &code.values, offset, blocksize2: 256 });
            for isa in cpu::available() {
                let mut out = vec![0f32; n];
                dequantize_4bit_isa(isa, &p, nested, QuantType::Nf4, 64, &mut out, 2).unwrap();
                assert!(out.iter().all(|v| v.is_finite()), "{isa:?} n={n}");
                assert_eq!(out[0], f32::MAX, "{isa:?} n={n}");
            }
        }
        assert!(clamped > 0, "no length rounded past f32::MAX: the test lost its case");
        assert!(nested_scale(1.0, f32::NAN, 0.0).is_nan());
    }

    #[test]
    fn nonfinite_input_is_an_error_naming_its_block() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = data(1000, 3, 1.0);
            x[700] = bad;
            let mut p = vec![0u8; 500];
            let mut a = vec![0f32; 1000usize.div_ceil(64)];
            for threads in [1, 2] {
                let err = quantize_4bit(&x, QuantType::Nf4, 64, &mut p, &mut a, threads).unwrap_err();
                assert_eq!(err, Error::NonFinite { index: 640 });
            }
        }
        // Several tasks, a bad value in two of them: the first is reported,
        // whichever task finishes first.
        let mut x = data(1 << 20, 4, 1.0);
        x[900_001] = f32::NAN;
        x[300_001] = f32::INFINITY;
        let mut p = vec![0u8; 1 << 19];
        let mut a = vec![0f32; (1 << 20) / 64];
        for threads in [2, 3, 8] {
            let err = quantize_4bit(&x, QuantType::Nf4, 64, &mut p, &mut a, threads).unwrap_err();
            assert_eq!(err, Error::NonFinite { index: 300_001 / 64 * 64 }, "threads={threads}");
        }
    }

    #[test]
    fn bad_lengths_and_blocksizes_are_errors() {
        let x = data(100, 1, 1.0);
        let mut p = vec![0u8; 50];
        let mut a = vec![0f32; 2];
        assert!(quantize_4bit(&x, QuantType::Nf4, 48, &mut p, &mut a, 1).is_err());
        assert!(quantize_4bit(&x, QuantType::Nf4, 64, &mut p[..49], &mut a, 1).is_err());
        assert!(quantize_4bit(&x, QuantType::Nf4, 64, &mut p, &mut a[..1], 1).is_err());
        let mut out = vec![0f32; 100];
        assert!(dequantize_4bit(&p, Scales::Plain(&a[..1]), QuantType::Nf4, 64, &mut out, 1).is_err());
        assert!(dequantize_4bit(&p[..10], Scales::Plain(&a), QuantType::Nf4, 64, &mut out, 1).is_err());
    }

    #[test]
    fn nested_scales_match_plain_scales_built_the_same_way() {
        use crate::blockwise8::{double_quantize, mean, Code8};
        use crate::dynamic_map::dynamic_signed;
        let x = data(64 * 600 + 5, 11, 2.0);
        let (p, a, _) = roundtrip(Isa::Scalar, &x, QuantType::Nf4, 64, 1);
        let code = Code8::new(dynamic_signed()).unwrap();
        let offset = mean(&a);
        let mut q = vec![0u8; a.len()];
        let mut a2 = vec![0f32; a.len().div_ceil(256)];
        double_quantize(&a, offset, &code, &mut q, &mut a2, 2).unwrap();
        let rebuilt: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(b, &c)| code.values[c as usize] * a2[b / 256] + offset)
            .collect();
        let nested = Scales::Nested(Nested { qabsmax: &q, absmax2: &a2, code: &code.values, offset, blocksize2: 256 });
        for isa in cpu::available() {
            let mut o1 = vec![0f32; x.len()];
            let mut o2 = vec![0f32; x.len()];
            dequantize_4bit_isa(isa, &p, nested, QuantType::Nf4, 64, &mut o1, 2).unwrap();
            dequantize_4bit_isa(isa, &p, Scales::Plain(&rebuilt), QuantType::Nf4, 64, &mut o2, 2).unwrap();
            assert_eq!(o1, o2);
        }
        // The nested scales are close to the real ones (8-bit dynamic code).
        for (r, t) in rebuilt.iter().zip(&a) {
            assert!((r - t).abs() <= 0.02 * t.abs().max(offset), "{r} vs {t}");
        }
    }

    proptest::proptest! {
        /// Any input, any block size: quantize either succeeds or reports the
        /// first non-finite block, never panics; on success quantize(dequantize(q)) == q.
        #[test]
        fn quantize_is_total_and_idempotent(
            x in proptest::collection::vec(proptest::num::f32::ANY, 0..600),
            bs_i in 0usize..8,
            fp4 in proptest::bool::ANY,
        ) {
            let bs = BLOCK_SIZES[bs_i];
            let qt = if fp4 { QuantType::Fp4 } else { QuantType::Nf4 };
            let n = x.len();
            let mut p = vec![0u8; packed_len(n)];
            let mut a = vec![0f32; n.div_ceil(bs)];
            match quantize_4bit(&x, qt, bs, &mut p, &mut a, 2) {
                Err(Error::NonFinite { index }) => {
                    let first_bad = x.iter().position(|v| !v.is_finite()).unwrap();
                    proptest::prop_assert_eq!(index, first_bad / bs * bs);
                }
                Err(e) => proptest::prop_assert!(false, "unexpected error {e}"),
                Ok(()) => {
                    let mut out = vec![0f32; n];
                    dequantize_4bit(&p, Scales::Plain(&a), qt, bs, &mut out, 2).unwrap();
                    let mut p2 = vec![0u8; p.len()];
                    let mut a2 = vec![0f32; a.len()];
                    quantize_4bit(&out, qt, bs, &mut p2, &mut a2, 2).unwrap();
                    // -0.0 (FP4 code 8) comes back as +0 (code 0); subnormal
                    // blocks lose bits in the product and are skipped.
                    let canon = |c: u8| if qt == QuantType::Fp4 && c == 8 { 0 } else { c };
                    for e in 0..n {
                        if a[e / bs] < f32::MIN_POSITIVE * 16.0 { continue; }
                        let c1 = canon(if e % 2 == 0 { p[e / 2] >> 4 } else { p[e / 2] & 15 });
                        let c2 = canon(if e % 2 == 0 { p2[e / 2] >> 4 } else { p2[e / 2] & 15 });
                        proptest::prop_assert_eq!(c1, c2, "element {}", e);
                    }
                }
            }
        }
    }
}
