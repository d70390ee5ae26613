//! The x86 kernels of `BlockLinear` for Q8_0 and Q4_0 weights (see `super` for the
//! order they follow and the portable `scalar_dot` they equal). One body, two ways to
//! make a block's eight lanes of integer sums: AVX2's `vpmaddubsw` + `vpmaddwd`
//! ([`Maddubs`]), or AVX-512 VNNI's `vpdpbusd` ([`Dpbusd`]), one instruction that also
//! adds the lanes' starting values. Neither saturates on these levels (|nibble·y| ≤
//! 15·127, |x|·|y| ≤ 127·127, pairs under 2¹⁵), so both give the same integers and the
//! same bits.
//!
//! The helpers carry no target features of their own and are always inlined: they are
//! compiled into the entry point (`outputs`, `outputs_vnni`) that enables the features.
use std::arch::x86_64::*;

use super::{GROUP, Q4_0_BYTES, Q8_0_BYTES};
use crate::gguf::dot::avx2::lanes_sum as hsum;

/// How far ahead of a weight row's loads to prefetch, in bytes: the hardware prefetcher
/// alone left one core reading Q8_0 rows at ~6 GB/s.
const PREFETCH: usize = 1024;

/// How a block's eight lanes of sums of four level products are made.
trait Lanes {
    /// `start` plus, per lane, Σ of four products of unsigned `u` with signed `s`.
    ///
    /// # Safety
    /// The entry point enables the instructions this uses.
    unsafe fn dot(start: __m256i, u: __m256i, s: __m256i) -> __m256i;
}

/// AVX2: `vpmaddubsw` (pairs into i16) then `vpmaddwd` by ones (pairs of pairs into i32).
struct Maddubs;

impl Lanes for Maddubs {
    #[inline(always)]
    unsafe fn dot(start: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX2 (the entry point's features).
        unsafe {
            let pairs = _mm256_maddubs_epi16(u, s);
            _mm256_add_epi32(start, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }
}

/// AVX-512 VNNI (256-bit form): `vpdpbusd`, the four products and the add in one.
struct Dpbusd;

impl Lanes for Dpbusd {
    #[inline(always)]
    unsafe fn dot(start: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX-512 VNNI and VL (the entry point's features).
        unsafe { _mm256_dpbusd_epi32(start, u, s) }
    }
}

/// The f16 scale at `p`, widened.
///
/// # Safety
/// `p` points at two readable bytes; AVX2 and F16C.
#[inline(always)]
unsafe fn half(p: *const u8) -> f32 {
    // The half is loaded into a register of its own with a broadcast that LLVM cannot
    // see through. From intrinsics, LLVM keeps only lane 0 of whatever load it is given
    // and makes it an insert (`vpinsrw`) into some register still in use, often the
    // accumulator: each block's scale then waited on the previous block's sum, and the
    // Q8_0 kernel ran at half speed.
    let v: __m128i;
    // SAFETY: two bytes at `p` (the caller's promise); the instruction only reads them.
    unsafe {
        std::arch::asm!(
            "vpbroadcastw {v}, word ptr [{p}]",
            p = in(reg) p,
            v = out(xmm_reg) v,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    _mm_cvtss_f32(unsafe { _mm_cvtph_ps(v) })
}

/// The 32 weight levels of block `b` (Q4_0: its nibbles, 0..15; Q8_0: i8), and its
/// scale.
///
/// # Safety
/// `w` holds at least `b + 1` blocks; AVX2 and F16C.
#[inline(always)]
pub(super) unsafe fn weights<const Q4: bool>(w: &[u8], b: usize) -> (__m256i, f32) {
    // SAFETY: block b is in `w` (the caller's promise).
    unsafe {
        if Q4 {
            let p = w.as_ptr().add(b * Q4_0_BYTES);
            let t = _mm_loadu_si128(p.add(2).cast());
            let both =
                _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(t), _mm_srli_epi16::<4>(t));
            (_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), half(p))
        } else {
            let p = w.as_ptr().add(b * Q8_0_BYTES);
            (_mm256_loadu_si256(p.add(2).cast()), half(p))
        }
    }
}

/// Activation block `b`'s levels.
///
/// # Safety
/// `a` holds at least `b + 1` Q8_0 blocks; AVX.
#[inline(always)]
unsafe fn act_levels(a: &[u8], b: usize) -> __m256i {
    // SAFETY: block b is in `a` (the caller's promise).
    unsafe { _mm256_loadu_si256(a.as_ptr().add(b * Q8_0_BYTES + 2).cast()) }
}

/// Weight rows of `blocks` blocks, one after another in `w`, against up to 8
/// activation rows `a` (their block scales widened in `d`, and for Q4_0 their lanes'
/// offsets, −8·Σ of four levels, in `off`): `out[o * a.len() + i]` is weight row o with
/// `a[i]`, each as `scalar_dot` computes it.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `w` holds `out.len() / a.len()` rows of `blocks`
/// Q8_0 (or Q4_0, `q4`) blocks, each row of `a` as many Q8_0 blocks, of `d` as many
/// scales and for Q4_0 of `off` eight offsets a block; `a`, `d` and `off` hold 1 to 8
/// rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn outputs(
    q4: bool,
    blocks: usize,
    w: &[u8],
    a: &[&[u8]],
    d: &[&[f32]],
    off: &[&[i32]],
    out: &mut [f32],
) {
    // SAFETY: the caller's promises; the features are enabled here.
    unsafe { run::<Maddubs>(q4, blocks, w, a, d, off, out) }
}

/// `outputs` with AVX-512 VNNI's `vpdpbusd`: the same bits.
///
/// # Safety
/// As `outputs`, and the CPU has AVX-512 VNNI and VL.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub unsafe fn outputs_vnni(
    q4: bool,
    blocks: usize,
    w: &[u8],
    a: &[&[u8]],
    d: &[&[f32]],
    off: &[&[i32]],
    out: &mut [f32],
) {
    // SAFETY: the caller's promises; the features are enabled here.
    unsafe { run::<Dpbusd>(q4, blocks, w, a, d, off, out) }
}

/// The body of `outputs`, inlined into each entry point.
#[inline(always)]
unsafe fn run<L: Lanes>(
    q4: bool,
    blocks: usize,
    w: &[u8],
    a: &[&[u8]],
    d: &[&[f32]],
    off: &[&[i32]],
    out: &mut [f32],
) {
    let row = blocks * if q4 { Q4_0_BYTES } else { Q8_0_BYTES };
    assert!((1..=8).contains(&a.len()) && d.len() == a.len());
    assert!(out.len().is_multiple_of(a.len()) && w.len() >= out.len() / a.len() * row);
    assert!(a.iter().all(|r| r.len() >= blocks * Q8_0_BYTES));
    assert!(d.iter().all(|r| r.len() >= blocks));
    assert!(off.len() == a.len() && (!q4 || off.iter().all(|r| r.len() >= 8 * blocks)));
    // A row count (and type) known at compile time keeps the accumulators in registers.
    macro_rules! counts {
        ($q4:literal; $($n:literal)*) => {
            match a.len() {
                $($n => {
                    let a: [&[u8]; $n] = std::array::from_fn(|i| a[i]);
                    let d: [&[f32]; $n] = std::array::from_fn(|i| d[i]);
                    let off: [&[i32]; $n] = std::array::from_fn(|i| off[i]);
                    // One row: Q4_0's unpacking makes a single chain of blocks
                    // compute-bound, so four outputs run side by side; Q8_0 reads one
                    // weight row at a time (four rows' streams at once halved what one
                    // core read: 6.7 against 13 GB/s).
                    let side = if $n == 1 && $q4 { out.len() / GROUP * GROUP } else { 0 };
                    for o in (0..side).step_by(GROUP) {
                        let w: [&[u8]; GROUP] =
                            std::array::from_fn(|g| &w[(o + g) * row..(o + g + 1) * row]);
                        // SAFETY: the caller's promises, checked above.
                        let v = unsafe { tile::<L, $q4, GROUP, $n>(blocks, w, a, d, off) };
                        for (g, v) in v.into_iter().enumerate() {
                            out[(o + g) * $n..(o + g + 1) * $n].copy_from_slice(&v);
                        }
                    }
                    let rest = out[side * $n..].chunks_exact_mut($n);
                    for (o, out) in (side..).zip(rest) {
                        let w = [&w[o * row..(o + 1) * row]];
                        // SAFETY: as above.
                        let v = unsafe { tile::<L, $q4, 1, $n>(blocks, w, a, d, off) };
                        out.copy_from_slice(&v[0]);
                    }
                })*
                _ => unreachable!("1 to 8 rows"),
            }
        };
    }
    if q4 {
        counts!(true; 1 2 3 4 5 6 7 8);
    } else {
        counts!(false; 1 2 3 4 5 6 7 8);
    }
}

/// `G` weight rows against `N` activation rows, `G·N` independent accumulators.
///
/// # Safety
/// As `outputs`, for these rows.
#[inline(always)]
unsafe fn tile<L: Lanes, const Q4: bool, const G: usize, const N: usize>(
    blocks: usize,
    w: [&[u8]; G],
    a: [&[u8]; N],
    d: [&[f32]; N],
    off: [&[i32]; N],
) -> [[f32; N]; G] {
    let wb = if Q4 { Q4_0_BYTES } else { Q8_0_BYTES };
    let mut acc = [[_mm256_setzero_ps(); N]; G];
    // Several rows side by side are one contiguous run of G rows (adjacent outputs), read
    // together: a fixed 1 KB ahead of each then lands inside the run itself, a few
    // blocks' time ahead, and the loads waited on memory for weights larger than the
    // cache (perf annotate, gpt2-xl Q4_0: the first use of each weight load held half
    // the samples). Ahead by the run, the same block of the next run's rows.
    let ahead = if G > 1 { G * blocks * wb } else { PREFETCH };
    for b in 0..blocks {
        for g in 0..G {
            // A hint only: it may point past the row (no fault, no read).
            _mm_prefetch::<_MM_HINT_T0>(w[g].as_ptr().wrapping_add(b * wb + ahead).cast());
            // SAFETY: block b of every row is in bounds (the caller's promise).
            let (qx, dw) = unsafe { weights::<Q4>(w[g], b) };
            for r in 0..N {
                // SAFETY: as above.
                let qy = unsafe { act_levels(a[r], b) };
                // eight lanes of Σ of four level products, as ggml's
                // `mul_sum_i8_pairs_float` has them: Q4_0's unsigned nibbles times
                // the activations from a start of −8 times their sums (the same
                // integers as (nibble − 8)·y), Q8_0's with the sign moved onto the
                // activations
                // SAFETY: the entry point's features; eight offsets a block (asserted).
                let lanes = unsafe {
                    if Q4 {
                        let start = _mm256_loadu_si256(off[r][8 * b..8 * b + 8].as_ptr().cast());
                        L::dot(start, qx, qy)
                    } else {
                        let ax = _mm256_sign_epi8(qx, qx);
                        L::dot(_mm256_setzero_si256(), ax, _mm256_sign_epi8(qy, qx))
                    }
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
            // SAFETY: AVX (the entry point's features).
            out[g][r] = unsafe { hsum(acc[g][r]) };
        }
    }
    out
}
