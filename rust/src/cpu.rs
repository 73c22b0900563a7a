//! Run-time CPU feature detection: one wheel, the widest SIMD the CPU has.

use std::sync::OnceLock;

/// Instruction sets the kernels have paths for, widest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// aarch64 Advanced SIMD (ranked with AVX2 and AVX-512: never on the same CPU).
    Neon,
    Avx2,
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Neon => "neon",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

fn detect_widest() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::env::var("QPEFT_FORCE_SCALAR").is_ok_and(|v| v == "1") {
            return Isa::Scalar;
        }
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::env::var("QPEFT_FORCE_SCALAR").is_ok_and(|v| v == "1") {
            return Isa::Scalar;
        }
        if std::arch::is_aarch64_feature_detected!("neon") {
            return Isa::Neon;
        }
    }
    Isa::Scalar
}

/// The widest instruction set, capped by `QPEFT_MAX_ISA` (`scalar`, `avx2`,
/// `neon`): benchmarks use it to stand in for an older CPU on a newer one.
fn detect() -> Isa {
    let widest = detect_widest();
    match std::env::var("QPEFT_MAX_ISA").ok().as_deref() {
        Some("scalar") => Isa::Scalar,
        Some("avx2") | Some("neon") => widest.min(Isa::Avx2),
        _ => widest,
    }
}

/// The best instruction set of this CPU (detected once).
pub fn best() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(detect)
}

/// Whether this CPU has AVX512-BF16 dot products (`vdpbf16ps`) and the
/// AVX-512 path is in use (so `QPEFT_MAX_ISA=avx2` turns them off too).
pub fn has_bf16_dot() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            best() == Isa::Avx512 && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Every instruction set this CPU can run, for tests that compare paths.
pub fn available() -> Vec<Isa> {
    match best() {
        Isa::Scalar => vec![Isa::Scalar],
        Isa::Neon => vec![Isa::Scalar, Isa::Neon],
        Isa::Avx2 => vec![Isa::Scalar, Isa::Avx2],
        Isa::Avx512 => vec![Isa::Scalar, Isa::Avx2, Isa::Avx512],
    }
}

/// `isa` if this CPU can run it, else the scalar path (a request for an
/// instruction set the CPU lacks must never reach its code).
pub fn usable(isa: Isa) -> Isa {
    if available().contains(&isa) {
        isa
    } else {
        Isa::Scalar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_is_the_widest_available_path() {
        assert_eq!(available().last().copied(), Some(best()));
        #[cfg(target_arch = "aarch64")]
        if std::env::var("QPEFT_FORCE_SCALAR").is_err() {
            assert_eq!(best(), Isa::Neon); // NEON is part of the aarch64 baseline
        }
        assert_eq!(usable(Isa::Avx512), if available().contains(&Isa::Avx512) { Isa::Avx512 } else { Isa::Scalar });
    }
}
