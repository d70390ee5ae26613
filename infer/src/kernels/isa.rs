//! Which instruction set a kernel runs with, detected at run time.

/// Instruction set a kernel runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F: one register per panel row, up to 8 x rows in one pass.
    Avx512,
    /// AVX2 + FMA: two registers per panel row, x rows in passes of 4.
    Avx2,
    /// Portable Rust, for any CPU (and as the reference the SIMD paths must agree with).
    Scalar,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Scalar];

    /// The fastest path this CPU supports.
    pub fn detect() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Scalar)
    }

    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            Isa::Scalar => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// Whether this CPU has AVX-512 VNNI (`vpdpbusd` on zmm registers).
pub(super) fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
