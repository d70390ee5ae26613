//! The AVX2 kernels of `BlockLinear` for Q8_0 and Q4_0 weights (see `super` for the
//! order they follow and the portable `scalar_dot` they equal).
use std::arch::x86_64::*;

use super::{GROUP, Q4_0_BYTES, Q8_0_BYTES};
use crate::gguf::dot::avx2::lanes_sum as hsum;

/// How far ahead of a weight row's loads to prefetch, in bytes: the hardware prefetcher
/// alone left one core reading Q8_0 rows at ~6 GB/s.
const PREFETCH: usize = 1024;

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn half(p: *const u8) -> f32 {
    // SAFETY: the caller's block holds its scale at `p`, two bytes.
    let h = unsafe { p.cast::<u16>().read_unaligned() };
    // a broadcast, not an insert into a register that holds something else (LLVM
    // otherwise chains each conversion to an unrelated earlier value)
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(h as i16)))
}

/// The 32 weight levels of block `b` (Q4_0: its nibbles, 0..15; Q8_0: i8), and its
/// scale.
///
/// # Safety
/// `w` holds at least `b + 1` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn weights(q4: bool, w: &[u8], b: usize) -> (__m256i, f32) {
    if q4 {
        // SAFETY: block b is in `w` (the caller's promise).
        let p = unsafe { w.as_ptr().add(b * Q4_0_BYTES) };
        let t = unsafe { _mm_loadu_si128(p.add(2).cast()) };
        let both = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(t), _mm_srli_epi16::<4>(t));
        (_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), half(p))
    } else {
        // SAFETY: as above.
        let p = unsafe { w.as_ptr().add(b * Q8_0_BYTES) };
        (unsafe { _mm256_loadu_si256(p.add(2).cast()) }, half(p))
    }
}

/// Activation block `b`'s levels.
///
/// # Safety
/// `a` holds at least `b + 1` Q8_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn act_levels(a: &[u8], b: usize) -> __m256i {
    // SAFETY: block b is in `a` (the caller's promise).
    unsafe { _mm256_loadu_si256(a.as_ptr().add(b * Q8_0_BYTES + 2).cast()) }
}

/// Weight rows of `blocks` blocks, one after another in `w`, against up to 8
/// activation rows `a` (their block scales widened in `d`, and for Q4_0 their lane
/// sums times 8 in `s8`): `out[o * a.len() + i]` is weight row o with `a[i]`, each as
/// `scalar_dot` computes it.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `w` holds `out.len() / a.len()` rows of `blocks`
/// Q8_0 (or Q4_0, `q4`) blocks, each row of `a` as many Q8_0 blocks, of `d` as many
/// scales and for Q4_0 of `s8` eight sums a block; `a`, `d` and `s8` hold 1 to 8 rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn outputs(
    q4: bool,
    blocks: usize,
    w: &[u8],
    a: &[&[u8]],
    d: &[&[f32]],
    s8: &[&[i32]],
    out: &mut [f32],
) {
    let row = blocks * if q4 { Q4_0_BYTES } else { Q8_0_BYTES };
    assert!((1..=8).contains(&a.len()) && d.len() == a.len());
    assert!(out.len().is_multiple_of(a.len()) && w.len() >= out.len() / a.len() * row);
    assert!(a.iter().all(|r| r.len() >= blocks * Q8_0_BYTES));
    assert!(d.iter().all(|r| r.len() >= blocks));
    assert!(s8.len() == a.len() && (!q4 || s8.iter().all(|r| r.len() >= 8 * blocks)));
    // A row count known at compile time keeps the accumulators in registers.
    macro_rules! counts {
        ($($n:literal)*) => {
            match a.len() {
                $($n => {
                    let a: [&[u8]; $n] = std::array::from_fn(|i| a[i]);
                    let d: [&[f32]; $n] = std::array::from_fn(|i| d[i]);
                    let s8: [&[i32]; $n] = std::array::from_fn(|i| s8[i]);
                    // One row: Q4_0's unpacking makes a single chain of blocks
                    // compute-bound, so four outputs run side by side; Q8_0 reads one
                    // weight row at a time (four rows' streams at once halved what one
                    // core read: 6.7 against 13 GB/s).
                    let side = if $n == 1 && q4 { out.len() / GROUP * GROUP } else { 0 };
                    for o in (0..side).step_by(GROUP) {
                        let w: [&[u8]; GROUP] =
                            std::array::from_fn(|g| &w[(o + g) * row..(o + g + 1) * row]);
                        // SAFETY: the caller's promises, checked above.
                        let v = unsafe { tile::<GROUP, $n>(q4, blocks, w, a, d, s8) };
                        for (g, v) in v.into_iter().enumerate() {
                            out[(o + g) * $n..(o + g + 1) * $n].copy_from_slice(&v);
                        }
                    }
                    let rest = out[side * $n..].chunks_exact_mut($n);
                    for (o, out) in (side..).zip(rest) {
                        let w = [&w[o * row..(o + 1) * row]];
                        // SAFETY: as above.
                        let v = unsafe { tile::<1, $n>(q4, blocks, w, a, d, s8) };
                        out.copy_from_slice(&v[0]);
                    }
                })*
                _ => unreachable!("1 to 8 rows"),
            }
        };
    }
    counts!(1 2 3 4 5 6 7 8);
}

/// `G` weight rows against `N` activation rows, `G·N` independent accumulators.
///
/// # Safety
/// As `outputs`, for these rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<const G: usize, const N: usize>(
    q4: bool,
    blocks: usize,
    w: [&[u8]; G],
    a: [&[u8]; N],
    d: [&[f32]; N],
    s8: [&[i32]; N],
) -> [[f32; N]; G] {
    let wb = if q4 { Q4_0_BYTES } else { Q8_0_BYTES };
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); N]; G];
    for b in 0..blocks {
        for g in 0..G {
            // A hint only: it may point past the row (no fault, no read).
            _mm_prefetch::<_MM_HINT_T0>(w[g].as_ptr().wrapping_add(b * wb + PREFETCH).cast());
            // SAFETY: block b of every row is in bounds (the caller's promise).
            let (qx, dw) = unsafe { weights(q4, w[g], b) };
            let ax = _mm256_sign_epi8(qx, qx);
            for r in 0..N {
                // SAFETY: as above.
                let qy = unsafe { act_levels(a[r], b) };
                // eight lanes of Σ of four level products, as ggml's
                // `mul_sum_i8_pairs_float` has them: Q4_0's unsigned nibbles times
                // the activations less 8 times their sums (the same integers as
                // (nibble - 8)·y), Q8_0's with the sign moved onto the activations
                let lanes = if q4 {
                    let pairs = _mm256_maddubs_epi16(qx, qy);
                    let off = s8[r][8 * b..8 * b + 8].as_ptr();
                    // SAFETY: eight sums a block (asserted by `outputs`).
                    let off = unsafe { _mm256_loadu_si256(off.cast()) };
                    _mm256_sub_epi32(_mm256_madd_epi16(pairs, ones), off)
                } else {
                    let pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(qy, qx));
                    _mm256_madd_epi16(pairs, ones)
                };
                let sums = _mm256_cvtepi32_ps(lanes);
                let scale = _mm256_set1_ps(dw * d[r][b]);
                acc[g][r] = _mm256_fmadd_ps(scale, sums, acc[g][r]);
            }
        }
    }
    let mut out = [[0f32; N]; G];
    for g in 0..G {
        for r in 0..N {
            out[g][r] = hsum(acc[g][r]);
        }
    }
    out
}
