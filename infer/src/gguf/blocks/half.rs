//! ggml's 16-bit floats: fp32 to fp16 as `ggml_compute_fp32_to_fp16` in `ggml-impl.h` (the
//! portable bit trick: round to nearest even, overflow to ±inf, every NaN to 0x7e00 with its
//! sign) and fp32 to bf16 as `ggml_compute_fp32_to_bf16` (round to nearest even, NaN quieted).
//! Both conversions back are exact.

/// `GGML_FP32_TO_FP16`: the portable `ggml_compute_fp32_to_fp16` of `ggml-impl.h`.
pub fn f32_to_f16(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000);
    let scale_to_zero = f32::from_bits(0x0880_0000);
    let mut base = (f.abs() * scale_to_inf) * scale_to_zero;
    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1_w & 0xFF00_0000).max(0x7100_0000);
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7C00;
    let mantissa_bits = bits & 0x0000_0FFF;
    let nonsign = if shl1_w > 0xFF00_0000 {
        0x7E00
    } else {
        exp_bits + mantissa_bits
    };
    ((sign >> 16) | nonsign) as u16
}

/// `GGML_FP16_TO_FP32`: exact widening of an IEEE half.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1F);
    let man = u32::from(h & 0x03FF);
    match (exp, man) {
        (0, 0) => f32::from_bits(sign),
        // subnormal: man · 2⁻²⁴, exact in f32
        (0, _) => f32::from_bits(sign | (man as f32 * f32::from_bits(0x3380_0000)).to_bits()),
        (31, _) => f32::from_bits(sign | 0x7F80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// `ggml_compute_fp32_to_bf16`: round to nearest even; a NaN keeps its top bits, made quiet.
pub fn f32_to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    if u & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16
}

/// `GGML_BF16_TO_FP32`: the bf16 bits as the top half of an f32.
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Reads the little-endian u16 at `at`.
pub(super) fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// The fp16 at `at`, widened.
pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(le16(bytes, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trip_covers_every_half() {
        // Every finite half widens and narrows back to itself; NaNs narrow to ggml's 0x7e00.
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            let back = f32_to_f16(f);
            if f.is_nan() {
                assert_eq!(back & 0x7FFF, 0x7E00, "{h:#06x}");
            } else {
                assert_eq!(back, h, "{h:#06x}");
            }
        }
    }

    #[test]
    fn f16_rounds_half_to_even_and_overflows_to_inf() {
        // 1 + 2⁻¹¹ lies halfway between 1 and the next half: ties go to the even mantissa.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3C00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02);
        assert_eq!(f32_to_f16(65520.0), 0x7C00);
        assert_eq!(f32_to_f16(-1e30), 0xFC00);
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3F80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x7F80_0001)), 0x7FC0);
    }
}
