//! The elementwise half of a SwiGLU feed-forward block, `h = silu(gate) * up`,
//! and its gradient, one pass over memory each.
//!
//! In torch these are five to ten separate operations over `[tokens, 4d]`
//! tensors (each a read and a write of megabytes, with dtype conversions in
//! between); here every element is read once, computed in float32 and
//! written once. The arithmetic follows torch's operation by operation, so
//! that results agree with it to the rounding of `exp`:
//!
//! ```text
//! forward:  h  = round(round(g / (1 + exp(-g))) * u)        F.silu(gate) * up
//! backward: s  = 1 / (1 + exp(-g))                          torch.sigmoid (float32)
//!           du = round(dh * (g * s))
//!           dg = round((dh * u) * (s * (1 + g * (1 - s))))
//! ```
//!
//! where `round` is the rounding to the tensors' dtype (none for float32).

use std::sync::Mutex;

use crate::cpu::{self, Isa};
use crate::elem::Elem;
use crate::error::{invalid, Result};
use crate::parallel;

/// Elements per task: large enough that scheduling costs nothing.
const TASK: usize = 32 * 1024;

/// `e^x` in float32 to about 1 ulp, written so that LLVM vectorizes it:
/// `x = n ln2 + r` with |r| <= ln2 / 2, a degree-6 polynomial for `e^r`
/// (Cephes' coefficients) and `2^n` assembled in the exponent bits.
/// Overflow gives +inf, results below the smallest normal float give 0
/// (only ever used as `1 + e^x`, where that makes no difference) and NaN
/// stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Largest x whose e^x is finite; below X_MIN the result is subnormal.
    const X_MAX: f32 = 88.722_83;
    const X_MIN: f32 = -87.336_55;
    // Adding 1.5 * 2^23 rounds |v| < 2^22 to an integer (ties to even) in the
    // low mantissa bits: a plain add where `round_ties_even` would be a libm call per lane.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(X_MIN, X_MAX);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * (r * r) + r + 1.0;
    // n is in [-126, 128]; 2^128 is not a float, so a positive n goes in as
    // 2^(n-1) * 2.
    let ni = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let k = i32::from(ni > 0);
    let scale = f32::from_bits(((ni - k + 127) as u32) << 23);
    let y = er * scale * (1 + k) as f32;
    if x > X_MAX {
        f32::INFINITY
    } else if x < X_MIN {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

#[inline(always)]
fn round<E: Elem>(v: f32) -> f32 {
    E::from_f32(v).to_f32()
}

#[inline(always)]
fn forward_run<E: Elem>(g: &[E], u: &[E], h: &mut [E]) {
    for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
        let x = g.to_f32();
        let silu = round::<E>(x / (1.0 + exp_f32(-x)));
        *h = E::from_f32(silu * u.to_f32());
    }
}

#[inline(always)]
fn backward_run<E: Elem>(g: &[E], u: &[E], dh: &[E], dg: &mut [E], du: &mut [E]) {
    for ((((dg, du), &g), &u), &dh) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dh) {
        let x = g.to_f32();
        let s = 1.0 / (1.0 + exp_f32(-x));
        let d = dh.to_f32();
        *du = E::from_f32(d * (x * s));
        *dg = E::from_f32((d * u.to_f32()) * (s * (1.0 + x * (1.0 - s))));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn forward_avx512<E: Elem>(g: &[E], u: &[E], h: &mut [E]) {
        forward_run(g, u, h)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn forward_avx2<E: Elem>(g: &[E], u: &[E], h: &mut [E]) {
        forward_run(g, u, h)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn backward_avx512<E: Elem>(g: &[E], u: &[E], dh: &[E], dg: &mut [E], du: &mut [E]) {
        backward_run(g, u, dh, dg, du)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn backward_avx2<E: Elem>(g: &[E], u: &[E], dh: &[E], dg: &mut [E], du: &mut [E]) {
        backward_run(g, u, dh, dg, du)
    }
}

fn forward_isa<E: Elem>(isa: Isa, g: &[E], u: &[E], h: &mut [E]) {
    match isa {
        // SAFETY: cpu::usable() only passes instruction sets this CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::forward_avx512(g, u, h) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::forward_avx2(g, u, h) },
        _ => forward_run(g, u, h),
    }
}

fn backward_isa<E: Elem>(isa: Isa, g: &[E], u: &[E], dh: &[E], dg: &mut [E], du: &mut [E]) {
    match isa {
        // SAFETY: as in forward_isa.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::backward_avx512(g, u, dh, dg, du) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::backward_avx2(g, u, dh, dg, du) },
        _ => backward_run(g, u, dh, dg, du),
    }
}

fn same_len(n: usize, lens: &[(usize, &str)]) -> Result<()> {
    for &(len, what) in lens {
        if len != n {
            return Err(invalid(format!("{what} has {len} elements, gate has {n}: all must have the same shape")));
        }
    }
    Ok(())
}

/// `h = silu(gate) * up` elementwise (see the module docs for the rounding).
pub fn swiglu_forward<E: Elem>(isa: Isa, g: &[E], u: &[E], h: &mut [E], threads: usize) -> Result<()> {
    same_len(g.len(), &[(u.len(), "up"), (h.len(), "output")])?;
    let isa = cpu::usable(isa);
    let outs: Vec<Mutex<&mut [E]>> = h.chunks_mut(TASK).map(Mutex::new).collect();
    parallel::run_tasks(threads, outs.len(), &|i| {
        let mut h = outs[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let r = i * TASK..i * TASK + h.len();
        forward_isa(isa, &g[r.clone()], &u[r], &mut h);
    });
    Ok(())
}

/// The gradients of `silu(gate) * up` for the output gradient `dh`, written
/// to `dg` and `du` (see the module docs for the arithmetic).
pub fn swiglu_backward<E: Elem>(
    isa: Isa,
    g: &[E],
    u: &[E],
    dh: &[E],
    dg: &mut [E],
    du: &mut [E],
    threads: usize,
) -> Result<()> {
    let n = g.len();
    same_len(n, &[(u.len(), "up"), (dh.len(), "the output gradient"), (dg.len(), "d_gate"), (du.len(), "d_up")])?;
    let isa = cpu::usable(isa);
    let outs: Vec<Mutex<(&mut [E], &mut [E])>> = dg.chunks_mut(TASK).zip(du.chunks_mut(TASK)).map(Mutex::new).collect();
    parallel::run_tasks(threads, outs.len(), &|i| {
        let mut guard = outs[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (dg, du) = &mut *guard;
        let r = i * TASK..i * TASK + dg.len();
        backward_isa(isa, &g[r.clone()], &u[r.clone()], &dh[r], dg, du);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::tests::data;
    use crate::elem::Bf16;

    fn sigmoid64(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64_over_the_whole_range() {
        let mut x = -87.3f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            let rel = ((got - want) / want).abs();
            assert!(rel <= 2.5e-7, "exp({x}) = {got}, want {want} (rel {rel:e})");
            x += 0.0137;
        }
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(88.72).is_finite() && exp_f32(88.72) > 3.3e38);
        assert!((exp_f32(-87.3) as f64 / (-87.3f32 as f64).exp() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn float32_matches_a_float64_reference_on_every_isa_and_thread_count() {
        let n = 3 * TASK + 17;
        let (g, u, dh) = (data(n, 1, 12.0), data(n, 2, 3.0), data(n, 3, 1.0));
        for isa in cpu::available() {
            for threads in [1, 3] {
                let mut h = vec![0f32; n];
                let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
                swiglu_forward(isa, &g, &u, &mut h, threads).unwrap();
                swiglu_backward(isa, &g, &u, &dh, &mut dg, &mut du, threads).unwrap();
                for i in 0..n {
                    let (x, up, d) = (g[i] as f64, u[i] as f64, dh[i] as f64);
                    let s = sigmoid64(x);
                    let want = [x * s * up, d * x * s, d * up * s * (1.0 + x * (1.0 - s))];
                    let mag = [(x * s * up).abs(), (d * x * s).abs(), (d * up * s * (1.0 + x.abs())).abs()];
                    for ((got, w), m) in [h[i], du[i], dg[i]].into_iter().zip(want).zip(mag) {
                        assert!((got as f64 - w).abs() <= 1e-6 * m + 1e-30, "{isa:?} element {i}: {got} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn bfloat16_rounds_like_the_float32_steps() {
        let n = 1000;
        let g: Vec<Bf16> = data(n, 4, 10.0).into_iter().map(Bf16::from_f32).collect();
        let u: Vec<Bf16> = data(n, 5, 2.0).into_iter().map(Bf16::from_f32).collect();
        let mut h = vec![Bf16::from_f32(0.0); n];
        swiglu_forward(cpu::best(), &g, &u, &mut h, 1).unwrap();
        for i in 0..n {
            let x = g[i].to_f32();
            let silu = Bf16::from_f32(x / (1.0 + (-x).exp())).to_f32();
            let want = Bf16::from_f32(silu * u[i].to_f32()).to_f32();
            // exp differs from libm's by an ulp at most, which can move a bf16 rounding by one step.
            let step = want.abs() * 2f32.powi(-7) + f32::MIN_POSITIVE;
            assert!((h[i].to_f32() - want).abs() <= step, "element {i}: {} vs {want}", h[i].to_f32());
        }
    }

    #[test]
    fn nan_and_infinity_propagate_as_in_torch() {
        let g = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -100.0, 100.0];
        let u = [1.0f32; 6];
        let mut h = [0f32; 6];
        swiglu_forward(cpu::best(), &g, &u, &mut h, 1).unwrap();
        assert!(h[0].is_nan());
        assert_eq!(h[1], f32::INFINITY);
        assert!(h[2].is_nan()); // -inf / (1 + inf), as torch's silu gives
        assert_eq!((h[3], h[4], h[5]), (0.0, -0.0, 100.0));
    }

    #[test]
    fn mismatched_lengths_are_an_error_not_a_panic() {
        let mut h = [0f32; 3];
        let err = swiglu_forward(cpu::best(), &[1.0f32; 3], &[1.0f32; 2], &mut h, 1).unwrap_err();
        assert!(err.to_string().contains("up has 2 elements"), "{err}");
        let (mut dg, mut du) = ([0f32; 3], [0f32; 4]);
        assert!(swiglu_backward(cpu::best(), &[1.0f32; 3], &[1.0f32; 3], &[1.0f32; 3], &mut dg, &mut du, 1).is_err());
    }
}
