//! Blockwise 8-bit quantization on a 256-entry sorted code (the dynamic maps
//! of bitsandbytes), following its CUDA kernel: scale by the float32
//! reciprocal of the block's absmax, then nearest code value, an exact
//! midpoint going to the even index. Used for double quantization of 4-bit
//! scales (../shared/FORMATS.md §3) and for 8-bit optimizer state.

use rayon::prelude::*;

use crate::cpu;
use crate::elem::Elem;
use crate::error::{invalid, Error, Result};
use crate::{parallel, scale};

/// Block size of the nested (second-level) quantization of 4-bit scales.
pub const NESTED_BLOCKSIZE: usize = 256;

/// A sorted 8-bit code with its float32 midpoints, ready for encoding.
#[derive(Clone)]
pub struct Code8 {
    pub values: [f32; 256],
    /// midpoints[k] = (values[k] + values[k+1]) * 0.5; midpoints[255] = +inf
    /// so a branch-free lower-bound search can use 8 power-of-two steps.
    midpoints: [f32; 256],
}

impl Code8 {
    /// Checks that `values` are finite and strictly ascending.
    pub fn new(values: [f32; 256]) -> Result<Self> {
        if values.iter().any(|v| !v.is_finite()) {
            return Err(invalid("an 8-bit code must hold finite values"));
        }
        if values.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid(
                "an 8-bit code must be strictly ascending (as create_dynamic_map returns it)",
            ));
        }
        let mut midpoints = [f32::INFINITY; 256];
        for k in 0..255 {
            midpoints[k] = (values[k] + values[k + 1]) * 0.5;
        }
        Ok(Code8 { values, midpoints })
    }

    /// Nearest code of a scaled value; ties go to the even index, NaN to 0.
    #[inline(always)]
    pub fn encode(&self, x: f32) -> u8 {
        // idx = number of midpoints strictly below x.
        let mut idx = 0usize;
        for step in [128usize, 64, 32, 16, 8, 4, 2, 1] {
            if self.midpoints[idx + step - 1] < x {
                idx += step;
            }
        }
        // x equal to midpoint idx sits between codes idx and idx+1: choose the even one.
        let tie_up = idx < 255 && (idx & 1) == 1 && self.midpoints[idx] == x;
        (idx + tie_up as usize) as u8
    }
}

pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if blocksize.is_power_of_two() && (16..=65_536).contains(&blocksize) {
        Ok(())
    } else {
        Err(invalid(format!(
            "8-bit blocksize must be a power of two from 16 to 65536, got {blocksize}"
        )))
    }
}

#[inline(always)]
fn quantize_chunk<T: Elem>(
    x: &[T],
    offset: f32,
    code: &Code8,
    bs: usize,
    out: &mut [u8],
    absmax: &mut [f32],
    first: usize,
) -> Result<()> {
    let mut v = vec![0.0f32; bs];
    let mut scaled = vec![0.0f32; bs];
    for (b, (xb, ob)) in x.chunks(bs).zip(out.chunks_mut(bs)).enumerate() {
        let v = &mut v[..xb.len()];
        let scaled = &mut scaled[..xb.len()];
        for (d, s) in v.iter_mut().zip(xb) {
            *d = s.to_f32() - offset;
        }
        let m = v.iter().fold(0u32, |m, f| m.max(f.to_bits() & 0x7fff_ffff));
        if m >= 0x7f80_0000 {
            return Err(Error::NonFinite { index: first + b * bs });
        }
        let a = f32::from_bits(m);
        absmax[b] = a;
        scale::apply(scale::cuda_rule(a), v, scaled);
        for (o, &s) in ob.iter_mut().zip(scaled.iter()) {
            *o = code.encode(s);
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn quantize_chunk_avx512<T: Elem>(
    x: &[T],
    offset: f32,
    code: &Code8,
    bs: usize,
    out: &mut [u8],
    absmax: &mut [f32],
    first: usize,
) -> Result<()> {
    quantize_chunk(x, offset, code, bs, out, absmax, first)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_chunk_avx2<T: Elem>(
    x: &[T],
    offset: f32,
    code: &Code8,
    bs: usize,
    out: &mut [u8],
    absmax: &mut [f32],
    first: usize,
) -> Result<()> {
    quantize_chunk(x, offset, code, bs, out, absmax, first)
}

/// Blockwise 8-bit quantization of `x - offset` (offset 0 for plain use; the
/// mean of the scales for double quantization). `out` has one byte per
/// element, `absmax` one float per block.
pub fn quantize_blockwise<T: Elem>(
    x: &[T],
    offset: f32,
    code: &Code8,
    blocksize: usize,
    out: &mut [u8],
    absmax: &mut [f32],
    threads: usize,
) -> Result<()> {
    check_blocksize(blocksize)?;
    if !offset.is_finite() {
        return Err(invalid("offset must be finite"));
    }
    let n = x.len();
    let n_blocks = n.div_ceil(blocksize);
    if out.len() != n {
        return Err(invalid(format!("output must have {n} bytes, got {}", out.len())));
    }
    if absmax.len() != n_blocks {
        return Err(invalid(format!(
            "absmax output must have {n_blocks} entries, got {}",
            absmax.len()
        )));
    }
    let isa = cpu::best();
    let run = |xs: &[T], os: &mut [u8], am: &mut [f32], first: usize| match isa {
        // SAFETY: cpu::best() reported these features.
        #[cfg(target_arch = "x86_64")]
        cpu::Isa::Avx512 => unsafe { quantize_chunk_avx512(xs, offset, code, blocksize, os, am, first) },
        #[cfg(target_arch = "x86_64")]
        cpu::Isa::Avx2 => unsafe { quantize_chunk_avx2(xs, offset, code, blocksize, os, am, first) },
        _ => quantize_chunk(xs, offset, code, blocksize, os, am, first),
    };
    let per_task = parallel::blocks_per_task(n_blocks, blocksize, threads);
    if threads <= 1 || n_blocks <= per_task {
        return run(x, out, absmax, 0);
    }
    let elems = per_task * blocksize;
    let first_error = parallel::pool(threads).install(|| {
        x.par_chunks(elems)
            .zip(out.par_chunks_mut(elems))
            .zip(absmax.par_chunks_mut(per_task))
            .enumerate()
            .filter_map(|(i, ((xs, os), am))| run(xs, os, am, i * elems).err())
            .min_by_key(|e| match e {
                Error::NonFinite { index } => *index,
                _ => 0,
            })
    });
    first_error.map_or(Ok(()), Err)
}

#[inline(always)]
fn dequantize_chunk<T: Elem>(
    q: &[u8],
    absmax: &[f32],
    offset: f32,
    values: &[f32; 256],
    bs: usize,
    out: &mut [T],
) {
    for (b, (qb, ob)) in q.chunks(bs).zip(out.chunks_mut(bs)).enumerate() {
        let a = absmax[b];
        for (o, &c) in ob.iter_mut().zip(qb) {
            // Multiply, then add: two roundings, as bitsandbytes does it.
            *o = T::from_f32(values[c as usize] * a + offset);
        }
    }
}

/// out[e] = code[q[e]] * absmax[e / bs] + offset, in float32, then rounded to
/// the output type.
pub fn dequantize_blockwise<T: Elem>(
    q: &[u8],
    absmax: &[f32],
    offset: f32,
    values: &[f32; 256],
    blocksize: usize,
    out: &mut [T],
    threads: usize,
) -> Result<()> {
    check_blocksize(blocksize)?;
    let n = q.len();
    let n_blocks = n.div_ceil(blocksize);
    if out.len() != n {
        return Err(invalid(format!("output must have {n} elements, got {}", out.len())));
    }
    if absmax.len() != n_blocks {
        return Err(invalid(format!(
            "expected {n_blocks} block scales for {n} codes in blocks of {blocksize}, got {}",
            absmax.len()
        )));
    }
    crate::memory::advise_hugepages(out);
    let per_task = parallel::blocks_per_task(n_blocks, blocksize, threads);
    if threads <= 1 || n_blocks <= per_task {
        dequantize_chunk(q, absmax, offset, values, blocksize, out);
        return Ok(());
    }
    let elems = per_task * blocksize;
    parallel::pool(threads).install(|| {
        out.par_chunks_mut(elems)
            .zip(q.par_chunks(elems))
            .zip(absmax.par_chunks(per_task))
            .for_each(|((os, qs), am)| dequantize_chunk(qs, am, offset, values, blocksize, os))
    });
    Ok(())
}

/// Mean of the 4-bit scales in float64, rounded once to float32 (the offset
/// of double quantization, for callers that do not take torch's own mean).
pub fn mean(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32
}

/// Double quantization of 4-bit scales: 8-bit codes of `absmax - offset` on
/// `code` in blocks of 256, and one float32 scale per 256 codes.
pub fn double_quantize(
    absmax: &[f32],
    offset: f32,
    code: &Code8,
    qabsmax: &mut [u8],
    absmax2: &mut [f32],
    threads: usize,
) -> Result<()> {
    quantize_blockwise(absmax, offset, code, NESTED_BLOCKSIZE, qabsmax, absmax2, threads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamic_map::{dynamic_signed, dynamic_unsigned};

    /// The nearest code by brute force, ties to the even index.
    fn nearest(values: &[f32; 256], x: f32) -> u8 {
        let mut best = 0usize;
        for k in 1..256 {
            let mid = (values[k - 1] + values[k]) * 0.5;
            if x > mid || (x == mid && k % 2 == 0) {
                best = k;
            }
        }
        best as u8
    }

    #[test]
    fn maps_are_sorted_with_zero_and_one() {
        let s = dynamic_signed();
        assert_eq!(s[127], 0.0);
        assert_eq!(s[255], 1.0);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        let u = dynamic_unsigned();
        assert_eq!(u[0], 0.0);
        assert_eq!(u[255], 1.0);
        assert!(u.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn encode_is_nearest_with_ties_to_even() {
        for values in [dynamic_signed(), dynamic_unsigned()] {
            let code = Code8::new(values).unwrap();
            for k in 0..256 {
                assert_eq!(code.encode(values[k]) as usize, k);
                if k < 255 {
                    let mid = (values[k] + values[k + 1]) * 0.5;
                    let expect = if k % 2 == 0 { k } else { k + 1 };
                    assert_eq!(code.encode(mid) as usize, expect, "tie at {k}");
                    assert_eq!(code.encode(mid.next_up()) as usize, k + 1);
                    assert_eq!(code.encode(mid.next_down()) as usize, k);
                }
            }
            for i in -3000..=3000 {
                let x = i as f32 / 2500.0;
                assert_eq!(code.encode(x), nearest(&values, x), "x={x}");
            }
            assert_eq!(code.encode(f32::NAN), 0);
        }
    }

    #[test]
    fn roundtrip_and_offset() {
        let code = Code8::new(dynamic_signed()).unwrap();
        let x: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.03 + 2.0).collect();
        for threads in [1, 2] {
            let mut q = vec![0u8; x.len()];
            let mut a = vec![0f32; x.len().div_ceil(64)];
            quantize_blockwise(&x, 2.0, &code, 64, &mut q, &mut a, threads).unwrap();
            let mut out = vec![0f32; x.len()];
            dequantize_blockwise(&q, &a, 2.0, &code.values, 64, &mut out, threads).unwrap();
            for (e, (&v, &o)) in x.iter().zip(&out).enumerate() {
                // The widest gap of the signed map is about 0.0148 of absmax.
                assert!((v - o).abs() <= 0.0075 * a[e / 64] + 1e-6, "{v} -> {o}");
            }
        }
    }

    #[test]
    fn zero_block_and_bad_input() {
        let code = Code8::new(dynamic_signed()).unwrap();
        let x = vec![0.0f32; 100];
        let mut q = vec![0u8; 100];
        let mut a = vec![1f32; 2];
        quantize_blockwise(&x, 0.0, &code, 64, &mut q, &mut a, 1).unwrap();
        assert!(q.iter().all(|&c| c == 127));
        assert_eq!(a, vec![0.0, 0.0]);
        let mut bad = x.clone();
        bad[70] = f32::NAN;
        assert_eq!(
            quantize_blockwise(&bad, 0.0, &code, 64, &mut q, &mut a, 1),
            Err(Error::NonFinite { index: 64 })
        );
        assert!(quantize_blockwise(&x, 0.0, &code, 48, &mut q, &mut a, 1).is_err());
        assert!(quantize_blockwise(&x, 0.0, &code, 64, &mut q[..99], &mut a, 1).is_err());
        let mut unsorted = dynamic_signed();
        unsorted.swap(3, 4);
        assert!(Code8::new(unsorted).is_err());
    }
}
