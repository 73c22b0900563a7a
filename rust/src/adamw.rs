//! Fused AdamW with float32 state: one pass per parameter tensor that reads
//! p, g, m, v once and writes p, m, v once.
//!
//! The arithmetic follows torch.optim.AdamW's default (foreach) CPU path
//! operation by operation (torch's vectorized kernels fuse the multiply-adds
//! below). The results equal torch's `fused=True` CPU kernel bit for bit on
//! its 16-lane vectors, and the foreach path except where MKL's `sqrt`,
//! which torch uses there, is not correctly rounded (about 0.7% of elements,
//! one ulp):
//!
//! ```text
//! p = p * decay                        decay     = f32(1 - lr*wd)
//! m = fma(w, g - m, m)                 w = f32(1 - beta1) < 0.5   (torch.lerp)
//!   = fma(w - 1, g - m, g)             otherwise
//! v = fma((1-beta2) * g, g, v * beta2)                            (mul_, addcmul_)
//! d = sqrt(v) / bc2_sqrt + eps
//! p = p + (step_size * m) / d          step_size = f32(-lr / bc1)  (addcdiv_)
//! ```
//!
//! The scalars are computed by the caller in float64 exactly as torch does
//! and rounded once to float32 ([`AdamW32`]). The kernels take plain slices
//! and no step count, so a paged optimizer can run them on any page-sized
//! piece of a tensor.

use std::sync::Mutex;

use crate::cpu::{self, Isa};
use crate::elem::Elem;
use crate::error::{invalid, Result};
use crate::parallel;

/// The float32 scalars of one AdamW step (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW32 {
    /// f32(1 - lr * weight_decay); 1.0 without weight decay.
    pub decay: f32,
    /// f32(1 - beta1), the weight of torch's lerp.
    pub lerp_weight: f32,
    pub beta2: f32,
    /// f32(1 - beta2).
    pub one_minus_beta2: f32,
    /// f32(sqrt(1 - beta2**step)).
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// f32(-lr / (1 - beta1**step)).
    pub step_size: f32,
    /// Ascend instead of descend (the gradient is negated first).
    pub maximize: bool,
}

/// `x / c` for float32 `x` and a float32 constant `c`, correctly rounded,
/// given `inv = 1 / c` rounded to float64: a multiply instead of a divide
/// (the divide is the slowest instruction of the update).
///
/// Why it is exact: x * inv in float64 is within 2^-52 (relative) of x / c;
/// a float32 rounding boundary (a 25-bit midpoint) that is not x / c itself
/// lies at least 2^-49 away from a quotient of two 24-bit significands, and
/// x / c is never exactly a midpoint unless c is a power of two, where the
/// product is exact. So rounding the float64 product to float32 gives the
/// float32 quotient (tested against the divide in both kernels' tests).
#[inline(always)]
pub(crate) fn div_by_const(x: f32, inv: f64) -> f32 {
    (x as f64 * inv) as f32
}

/// `sqrt(v) / c`, correctly rounded either way: through [`div_by_const`]
/// (`F64 = true`) or the float32 divide. Which is faster depends on the
/// core: Intel's 512-bit divide is slow enough for the float64 multiply to
/// win, while on AMD Zen 3 the 256-bit divide beats the conversions (1.0 vs
/// 0.7 ns per element for the whole 32-bit update, single thread).
#[inline(always)]
pub(crate) fn scaled_root<const F64: bool>(v: f32, c: f32, inv: f64) -> f32 {
    if F64 {
        div_by_const(v.sqrt(), inv)
    } else {
        v.sqrt() / c
    }
}

/// Elements per parallel task: big enough that scheduling is free.
const TASK: usize = 1 << 16;

#[inline(always)]
fn step_chunk<T: Elem, const F64: bool>(p: &mut [T], g: &[T], m: &mut [f32], v: &mut [f32], h: &AdamW32) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    let sign = if h.maximize { -1.0f32 } else { 1.0 };
    let small = h.lerp_weight.abs() < 0.5;
    // torch.lerp picks its formula from the weight; the choice is uniform
    // over the tensor, so it is hoisted out of the loop.
    let (coeff, from_m) = if small { (h.lerp_weight, true) } else { (h.lerp_weight - 1.0, false) };
    let inv_bc2 = 1.0 / h.bc2_sqrt as f64;
    for i in 0..n {
        // Negation is exact, so maximize costs nothing in accuracy.
        let gi = g[i].to_f32() * sign;
        let mi = m[i];
        let base = if from_m { mi } else { gi };
        let m1 = coeff.mul_add(gi - mi, base);
        let v1 = (h.one_minus_beta2 * gi).mul_add(gi, v[i] * h.beta2);
        let d = scaled_root::<F64>(v1, h.bc2_sqrt, inv_bc2) + h.eps;
        let p1 = p[i].to_f32() * h.decay;
        p[i] = T::from_f32(p1 + (h.step_size * m1) / d);
        m[i] = m1;
        v[i] = v1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn step_chunk_avx512<T: Elem>(p: &mut [T], g: &[T], m: &mut [f32], v: &mut [f32], h: &AdamW32) {
    step_chunk::<T, true>(p, g, m, v, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn step_chunk_avx2<T: Elem>(p: &mut [T], g: &[T], m: &mut [f32], v: &mut [f32], h: &AdamW32) {
    step_chunk::<T, false>(p, g, m, v, h)
}

fn step_chunk_isa<T: Elem>(isa: Isa, p: &mut [T], g: &[T], m: &mut [f32], v: &mut [f32], h: &AdamW32) {
    match isa {
        // SAFETY: callers pass cpu::usable(..), so the CPU has these features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { step_chunk_avx512(p, g, m, v, h) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { step_chunk_avx2(p, g, m, v, h) },
        _ => step_chunk::<T, true>(p, g, m, v, h),
    }
}

pub(crate) fn check_lengths(n: usize, g: usize, m: usize, v: usize) -> Result<()> {
    if g != n || m != n || v != n {
        return Err(invalid(format!(
            "parameter, gradient and both state tensors must have the same number of elements, \
             got {n}, {g}, {m} and {v}"
        )));
    }
    Ok(())
}

/// One AdamW step over `p` in place, with float32 state `m`, `v` (same
/// length), on the best instruction set of this CPU.
pub fn adamw_step<T: Elem>(p: &mut [T], g: &[T], m: &mut [f32], v: &mut [f32], h: &AdamW32, threads: usize) -> Result<()> {
    adamw_step_isa(cpu::best(), p, g, m, v, h, threads)
}

/// [`adamw_step`] on a chosen instruction set (one the CPU lacks runs the
/// scalar path); for tests and benchmarks.
pub fn adamw_step_isa<T: Elem>(
    isa: Isa,
    p: &mut [T],
    g: &[T],
    m: &mut [f32],
    v: &mut [f32],
    h: &AdamW32,
    threads: usize,
) -> Result<()> {
    check_lengths(p.len(), g.len(), m.len(), v.len())?;
    let isa = cpu::usable(isa);
    let n = p.len();
    let per_task = TASK.max(n.div_ceil(threads.max(1) * 4)).next_multiple_of(64);
    if threads <= 1 || n <= per_task {
        step_chunk_isa(isa, p, g, m, v, h);
        return Ok(());
    }
    // As adamw8: one lock per task, taken once, so that torch's OpenMP team
    // (inside torch) can run the tasks instead of a second pool.
    type Task<'a, T> = (&'a mut [T], &'a [T], &'a mut [f32], &'a mut [f32]);
    let tasks: Vec<Mutex<Task<T>>> = p
        .chunks_mut(per_task)
        .zip(g.chunks(per_task))
        .zip(m.chunks_mut(per_task))
        .zip(v.chunks_mut(per_task))
        .map(|(((p, g), m), v)| Mutex::new((p, g, m, v)))
        .collect();
    parallel::run_tasks(threads, tasks.len(), &|i| {
        let mut t = tasks[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (p, g, m, v) = &mut *t;
        step_chunk_isa(isa, p, g, m, v, h);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elem::Bf16;
    use proptest::prelude::*;

    fn hyper(step: i32, lr: f64, wd: f64, b1: f64, b2: f64, eps: f64, maximize: bool) -> AdamW32 {
        let bc1 = 1.0 - b1.powi(step);
        let bc2 = 1.0 - b2.powi(step);
        AdamW32 {
            decay: (1.0 - lr * wd) as f32,
            lerp_weight: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: eps as f32,
            step_size: (-(lr / bc1)) as f32,
            maximize,
        }
    }

    /// The textbook update in float64: what the float32 kernel approximates.
    /// `decay` is torch's float32 factor: its rounding (up to 3e-8 of p per
    /// step, always the same way) is part of torch's algorithm, not an error.
    #[allow(clippy::too_many_arguments)]
    fn reference(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], step: i32, lr: f64, decay: f32, b1: f64, b2: f64, eps: f64) {
        for i in 0..p.len() {
            p[i] *= decay as f64;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let d = v[i].sqrt() / (1.0 - b2.powi(step)).sqrt() + eps;
            p[i] -= lr / (1.0 - b1.powi(step)) * m[i] / d;
        }
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    #[test]
    fn matches_float64_reference_over_many_steps() {
        let n = 1000;
        let mut p: Vec<f32> = data(n, 1);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let mut p64: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let (mut m64, mut v64) = (vec![0f64; n], vec![0f64; n]);
        for step in 1..=50 {
            let g = data(n, 100 + step as u64);
            let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            let h = hyper(step, 1e-3, 0.01, 0.9, 0.999, 1e-8, false);
            adamw_step(&mut p, &g, &mut m, &mut v, &h, 1).unwrap();
            reference(&mut p64, &g64, &mut m64, &mut v64, step, 1e-3, h.decay, 0.9, 0.999, 1e-8);
        }
        // Two float32 roundings of p per step (half an ulp, 3e-8 of p, each)
        // random-walk to a few 1e-7 of p after 50 steps; 4e-6 is the worst case.
        for i in 0..n {
            assert!((p[i] as f64 - p64[i]).abs() <= 4e-6 * p64[i].abs().max(1e-3), "{i}: {} vs {}", p[i], p64[i]);
            assert!((m[i] as f64 - m64[i]).abs() <= 1e-5 * m64[i].abs() + 1e-7);
        }
    }

    #[test]
    fn every_isa_and_thread_count_gives_the_same_bits() {
        let n = 300_001; // several tasks and a ragged tail
        let p0 = data(n, 3);
        let g = data(n, 4);
        let m0: Vec<f32> = data(n, 5).iter().map(|x| x * 0.1).collect();
        let v0: Vec<f32> = data(n, 6).iter().map(|x| x * x * 0.01).collect();
        let mut results = Vec::new();
        for isa in cpu::available() {
            for threads in [1, 3] {
                for (b1, maximize) in [(0.9, false), (0.3, true)] {
                    let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
                    let h = hyper(7, 1e-2, 0.1, b1, 0.99, 1e-8, maximize);
                    adamw_step_isa(isa, &mut p, &g, &mut m, &mut v, &h, threads).unwrap();
                    results.push(((b1 * 10.0) as i32, p, m, v));
                }
            }
        }
        for r in &results {
            let first = results.iter().find(|f| f.0 == r.0).unwrap();
            assert!(r.1 == first.1 && r.2 == first.2 && r.3 == first.3);
        }
    }

    #[test]
    fn bf16_params_round_to_nearest_even_of_the_f32_update() {
        let n = 777;
        let pf: Vec<f32> = data(n, 9);
        let pb: Vec<Bf16> = pf.iter().map(|&x| Bf16::from_f32(x)).collect();
        let g: Vec<f32> = data(n, 10);
        let gb: Vec<Bf16> = g.iter().map(|&x| Bf16::from_f32(x)).collect();
        let h = hyper(3, 1e-2, 0.0, 0.9, 0.999, 1e-8, false);
        // Reference: widen, update in f32, round once.
        let mut p32: Vec<f32> = pb.iter().map(|x| x.to_f32()).collect();
        let g32: Vec<f32> = gb.iter().map(|x| x.to_f32()).collect();
        let (mut m1, mut v1) = (vec![0.01f32; n], vec![0.02f32; n]);
        adamw_step(&mut p32, &g32, &mut m1, &mut v1, &h, 1).unwrap();
        let (mut m2, mut v2) = (vec![0.01f32; n], vec![0.02f32; n]);
        let mut p = pb.clone();
        adamw_step(&mut p, &gb, &mut m2, &mut v2, &h, 2).unwrap();
        assert_eq!(m1, m2);
        assert_eq!(v1, v2);
        for i in 0..n {
            assert_eq!(p[i], Bf16::from_f32(p32[i]));
        }
    }

    #[test]
    fn division_by_a_constant_through_float64_is_exact() {
        let mut constants: Vec<f32> = vec![1.0, 0.5, 0.75, 1.0 / 3.0, f32::MIN_POSITIVE, 3e-5];
        for b2 in [0.999f64, 0.99, 0.95, 0.9999, 0.5] {
            for step in [1, 2, 3, 10, 100, 1000, 100_000] {
                constants.push((1.0 - b2.powi(step)).sqrt() as f32);
            }
        }
        for &c in &constants {
            let inv = 1.0 / c as f64;
            // Every 997th float32 from the smallest subnormal up to 2^64.
            let mut bits = 1u32;
            while bits < 0x5f80_0000 {
                let x = f32::from_bits(bits);
                assert_eq!(div_by_const(x, inv).to_bits(), (x / c).to_bits(), "{x:e} / {c:e}");
                bits += 997;
            }
            for x in [0.0f32, -0.0, f32::INFINITY, f32::MAX, 1.0, c] {
                assert_eq!(div_by_const(x, inv).to_bits(), (x / c).to_bits(), "{x:e} / {c:e}");
            }
            assert!(div_by_const(f32::NAN, inv).is_nan());
        }
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let h = hyper(1, 1e-3, 0.0, 0.9, 0.999, 1e-8, false);
        let mut p = vec![0f32; 4];
        let (mut m, mut v) = (vec![0f32; 4], vec![0f32; 3]);
        assert!(adamw_step(&mut p, &[0.0; 4], &mut m, &mut v, &h, 1).is_err());
        assert!(adamw_step(&mut p, &[0.0; 5], &mut m, &mut [0.0; 4], &h, 1).is_err());
        let mut e: Vec<f32> = vec![];
        adamw_step(&mut e, &[], &mut [], &mut [], &h, 4).unwrap();
    }

    proptest! {
        #[test]
        fn one_step_is_the_documented_formula(
            p in -10.0f32..10.0, g in -10.0f32..10.0, m in -1.0f32..1.0, v in 0.0f32..1.0,
            step in 1i32..1000, wd in 0.0f64..0.5, b1 in 0.0f64..0.99,
        ) {
            let h = hyper(step, 1e-3, wd, b1, 0.999, 1e-8, false);
            let (mut pp, mut mm, mut vv) = ([p], [m], [v]);
            adamw_step(&mut pp, &[g], &mut mm, &mut vv, &h, 1).unwrap();
            let m1 = if h.lerp_weight < 0.5 { h.lerp_weight.mul_add(g - m, m) } else { (h.lerp_weight - 1.0).mul_add(g - m, g) };
            let v1 = (h.one_minus_beta2 * g).mul_add(g, v * h.beta2);
            let p1 = p * h.decay + (h.step_size * m1) / (v1.sqrt() / h.bc2_sqrt + h.eps);
            prop_assert_eq!(mm[0].to_bits(), m1.to_bits());
            prop_assert_eq!(vv[0].to_bits(), v1.to_bits());
            prop_assert_eq!(pp[0].to_bits(), p1.to_bits());
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod timing {
    use super::*;
    use std::time::Instant;

    /// Single-thread cost of the AVX2 update with either divide, on blocks
    /// that stay in cache, alternating to share the machine's noise (run with
    /// `cargo test --release adamw::timing -- --ignored --nocapture`).
    #[test]
    #[ignore = "timing, not a check"]
    fn divides() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")) {
            eprintln!("skipped: this CPU lacks AVX2");
            return;
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn run<const F64: bool>(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamW32) {
            step_chunk::<f32, F64>(p, g, m, v, h)
        }
        let n = 4096;
        let reps = 20_000;
        let g: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.618).fract() - 0.5) * 0.02).collect();
        let (mut p, mut m, mut v) = (vec![0.5f32; n], vec![0f32; n], vec![0f32; n]);
        let h = AdamW32 { decay: 1.0, lerp_weight: 0.1, beta2: 0.999, one_minus_beta2: 0.001, bc2_sqrt: 0.03, eps: 1e-8, step_size: -1e-9, maximize: false };
        let (mut best_f64, mut best_div) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..7 {
            let t = Instant::now();
            for _ in 0..reps {
                unsafe { run::<true>(&mut p, std::hint::black_box(&g), &mut m, &mut v, &h) };
            }
            best_f64 = best_f64.min(t.elapsed().as_nanos() as f64 / (reps * n) as f64);
            let t = Instant::now();
            for _ in 0..reps {
                unsafe { run::<false>(&mut p, std::hint::black_box(&g), &mut m, &mut v, &h) };
            }
            best_div = best_div.min(t.elapsed().as_nanos() as f64 / (reps * n) as f64);
        }
        eprintln!("AVX2 update: float64 multiply {best_f64:.3} ns/elem, float32 divide {best_div:.3} ns/elem");
    }
}
