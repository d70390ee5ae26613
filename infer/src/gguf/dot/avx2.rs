//! The AVX2 integer sums of the dot kernels: the same per-block integers as the portable
//! path, from `vpmaddubsw` (u8·i8 pairs to i16; the sign of a signed operand moved onto the
//! other, as ggml's `mul_sum_i8_pairs` does) and `vpmaddwd`. No i16 pair saturates: levels
//! are at most 63 in magnitude against activations of at most 127, except Q8_0 weights,
//! whose |level| ≤ 128 still keeps a pair under 2¹⁵. ggml's Q8_0/Q8_1 quantizers write
//! -128 only in a block whose f16 scale is 0 (`q8_x86`), where a sign moved onto -128
//! wraps, as in ggml, and the block's sum is multiplied by zero.
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::gguf::types::GgmlType;

/// Each block's integer sum (see `scalar_ints`).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub unsafe fn ints(ty: GgmlType, w: &[u8], a: &[u8], ints: &mut [i32]) {
    let act = super::vec_dot_type(ty).expect("a quantized type");
    let blocks = w
        .chunks_exact(ty.type_size())
        .zip(a.chunks_exact(act.type_size()));
    for ((wb, ab), out) in blocks.zip(ints.iter_mut()) {
        *out = match ty {
            GgmlType::Q5_K => {
                // SAFETY: AVX2, this function's own requirement.
                unsafe { q5_k(wb, ab) }
            }
            _ => legacy(ty, wb, &ab[ab.len() - 32..]),
        };
    }
}

/// One Q5_K super-block's integer sum (see `scalar_ints`): Σ over its eight sub-blocks of
/// 32 of scale·Σ level·q8 (the mins come in the f32 step).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn q5_k(wb: &[u8], ab: &[u8]) -> i32 {
    let low4 = _mm256_set1_epi8(0x0F);
    let high = load(&wb[16..48]);
    let mut acc = _mm256_setzero_si256();
    for n in 0..4 {
        let q = load(&wb[48 + 32 * n..]);
        let halves = [
            _mm256_and_si256(q, low4),
            _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4),
        ];
        for (h, x) in halves.into_iter().enumerate() {
            let j = 2 * n + h;
            // bit j of each qh byte, moved to 16
            let shift = _mm_cvtsi32_si128(j as i32);
            let bit = _mm256_and_si256(_mm256_srl_epi16(high, shift), _mm256_set1_epi8(1));
            let x = _mm256_or_si256(x, _mm256_slli_epi16::<4>(bit));
            let scale = _mm256_set1_epi16(i16::from(super::scale_min_k4(j, &wb[4..16]).0));
            let y = load(&ab[4 + 32 * j..]);
            acc = _mm256_add_epi32(acc, madd_us(x, y, scale));
        }
    }
    hsum(acc)
}

/// Four Q5_0 weight rows (`blocks` blocks each) against up to 8 Q8_0 activation rows
/// `a`: `out[r][g]` is what `row_dot` gives row g with `a[r]`, bit for bit (the same exact
/// integer sum per block, then `sumf += (d_w·d_a)·sumi` in block order). Each weight
/// block is unpacked once for every activation row; the four rows' integer sums are
/// reduced together and their f32 steps run side by side in one register.
///
/// # Safety
/// The CPU must support AVX2 and F16C; each `w` row and each `a` row hold `blocks` blocks;
/// `a` holds 1 to 8 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn q5_0_rows4(w: [&[u8]; 4], a: &[&[u8]], blocks: usize) -> [[f32; 4]; 8] {
    macro_rules! counts {
        ($($n:literal)*) => {
            match a.len() {
                $($n => {
                    let a: [&[u8]; $n] = std::array::from_fn(|i| a[i]);
                    // SAFETY: the caller's promises; the features are enabled here.
                    let v = unsafe { q5_0_tile::<$n>(w, a, blocks) };
                    let mut out = [[0f32; 4]; 8];
                    out[..$n].copy_from_slice(&v);
                    out
                })*
                _ => unreachable!("1 to 8 rows"),
            }
        };
    }
    counts!(1 2 3 4 5 6 7 8)
}

/// `q5_0_rows4` for `N` activation rows known at compile time (accumulators in registers).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q5_0_tile<const N: usize>(w: [&[u8]; 4], a: [&[u8]; N], blocks: usize) -> [[f32; 4]; N] {
    const WB: usize = 22;
    const AB: usize = 34;
    assert!(w.iter().all(|r| r.len() >= blocks * WB) && a.iter().all(|r| r.len() >= blocks * AB));
    let ones = _mm256_set1_epi16(1);
    let mut sumf = [_mm_setzero_ps(); N];
    // The four rows are adjacent outputs, one contiguous run: ahead by the run is the
    // same block of the next four (the loads waited on memory without it: perf annotate)
    let ahead = 4 * blocks * WB;
    for b in 0..blocks {
        for r in &w {
            // a hint only: it may point past the rows (no fault, no read)
            _mm_prefetch::<_MM_HINT_T0>(r.as_ptr().wrapping_add(b * WB + ahead).cast());
        }
        // The four blocks' signed levels. Plain loops, no closures: a closure here would
        // not get the entry point's target features, and its intrinsics become calls.
        let mut xs = [_mm256_setzero_si256(); 4];
        let mut dw = [0i16; 4];
        for g in 0..4 {
            let wb = &w[g][b * WB..(b + 1) * WB];
            dw[g] = u16::from_le_bytes([wb[0], wb[1]]) as i16;
            // SAFETY: 16 readable bytes (the block's nibbles); AVX2 (the entry point's).
            unsafe {
                let tmp = _mm_loadu_si128(wb[6..].as_ptr().cast());
                let x = _mm256_and_si256(
                    _mm256_set_m128i(_mm_srli_epi16::<4>(tmp), tmp),
                    _mm256_set1_epi8(0x0F),
                );
                // a clear fifth bit makes the level q - 16: q | 0xF0 as a signed byte
                let high = _mm256_andnot_si256(bits_32(&wb[2..6]), _mm256_set1_epi8(-16));
                xs[g] = _mm256_or_si256(x, high);
            }
        }
        // SAFETY: F16C and AVX2 (the entry point's features).
        unsafe {
            let dw = _mm_cvtph_ps(_mm_setr_epi16(dw[0], dw[1], dw[2], dw[3], 0, 0, 0, 0));
            for r in 0..N {
                let ab = &a[r][b * AB..(b + 1) * AB];
                let y = load(&ab[2..]);
                let mut lanes = [_mm256_setzero_si256(); 4];
                for g in 0..4 {
                    lanes[g] = madd_ss(xs[g], y, ones);
                }
                // the four blocks' integer sums (exact, in any order): [s0, s1, s2, s3]
                let h = _mm256_hadd_epi32(
                    _mm256_hadd_epi32(lanes[0], lanes[1]),
                    _mm256_hadd_epi32(lanes[2], lanes[3]),
                );
                let sumi =
                    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
                let da = _mm_cvtph_ps(_mm_set1_epi16(u16::from_le_bytes([ab[0], ab[1]]) as i16));
                // (d_w·d_a)·sumi, then the add: two roundings, as the scalar step
                let step = _mm_mul_ps(_mm_mul_ps(dw, da), _mm_cvtepi32_ps(sumi));
                sumf[r] = _mm_add_ps(sumf[r], step);
            }
        }
    }
    let mut out = [[0f32; 4]; N];
    for (o, s) in out.iter_mut().zip(sumf) {
        // SAFETY: four f32 into a four-element array.
        unsafe { _mm_storeu_ps(o.as_mut_ptr(), s) };
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn ints(_: GgmlType, _: &[u8], _: &[u8], _: &mut [i32]) {
    unreachable!("the AVX2 path is never supported off x86_64")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn load(bytes: &[u8]) -> __m256i {
    assert!(bytes.len() >= 32);
    // SAFETY: 32 readable bytes, checked above; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

/// `super::lanes_sum` of eight f32 lanes in a register (ggml's `hsum_float_8`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn lanes_sum(acc: __m256) -> f32 {
    let q = _mm_add_ps(_mm256_extractf128_ps::<1>(acc), _mm256_castps256_ps128(acc));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_movehdup_ps(q));
    _mm_cvtss_f32(q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn hsum(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Σ x·y over pairs of i16 lanes of `u8·i8` products, as eight i32 sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn madd_us(x: __m256i, y: __m256i, scales: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), scales)
}

/// As `madd_us` for signed `x`: |x| times y with x's sign.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn madd_ss(x: __m256i, y: __m256i, scales: __m256i) -> __m256i {
    madd_us(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x), scales)
}

/// 32 bytes, byte i = 0xFF where bit i of the little-endian u32 at `qh` is set
/// (`bytes_from_bits_32`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn bits_32(qh: &[u8]) -> __m256i {
    let x32 = i32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let spread = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), spread);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7FBF_DFEF_F7FB_FDFE));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// One 32-weight block: its levels as bytes, then Σ level·q8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn legacy(ty: GgmlType, wb: &[u8], q8: &[u8]) -> i32 {
    let ones = _mm256_set1_epi16(1);
    let y = load(q8);
    if ty == GgmlType::Q8_0 {
        return hsum(madd_ss(load(&wb[2..]), y, ones));
    }
    let qs = &wb[wb.len() - 16..];
    // SAFETY: 16 readable bytes (the block's nibbles).
    let tmp = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
    let nibbles = _mm256_set_m128i(_mm_srli_epi16::<4>(tmp), tmp);
    let x = _mm256_and_si256(nibbles, _mm256_set1_epi8(0x0F));
    let x = match ty {
        GgmlType::Q4_0 => _mm256_sub_epi8(x, _mm256_set1_epi8(8)),
        // a clear fifth bit makes the level q - 16: q | 0xF0 as a signed byte
        GgmlType::Q5_0 => _mm256_or_si256(
            x,
            _mm256_andnot_si256(bits_32(&wb[2..6]), _mm256_set1_epi8(-16)),
        ),
        GgmlType::Q5_1 => _mm256_or_si256(
            x,
            _mm256_and_si256(bits_32(&wb[4..8]), _mm256_set1_epi8(0x10)),
        ),
        _ => x,
    };
    match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 => hsum(madd_us(x, y, ones)),
        _ => hsum(madd_ss(x, y, ones)),
    }
}
