//! The 512-bit kernel of `BlockLinear` for Q8_0 and Q4_0 weights against 2 to 8
//! activation rows, on CPUs with AVX-512 VNNI. Two activation rows share each 512-bit
//! register (row 2p in the low half, row 2p+1 in the high half) against one weight block
//! broadcast to both halves, so one `vpdpbusd`, conversion, scale product and fused
//! multiply-add serve two rows: the per-row arithmetic that bounds a batch's decode step
//! is halved.
//!
//! Each half does exactly what the 256-bit kernels do for its row, lane for lane: the
//! same eight integer lanes, the same scale product `d_w·d_a` in f32, the same fused
//! multiply-add into the same lane and the same final sum, so the bits are theirs (and
//! `scalar_dot`'s). The weights enter `vpdpbusd` unsigned: Q4_0's nibbles as stored,
//! Q8_0's levels plus 128 (`x ^ 0x80`); each lane starts from −8 (Q4_0) or −128 (Q8_0)
//! times its four activation levels' sum, which gives the same integers as the signed
//! products.
use std::arch::x86_64::*;

use super::avx2::weights;
use super::{Q4_0_BYTES, Q8_0_BYTES, QK};
use crate::gguf::dot::avx2::lanes_sum;

/// Activation rows laid out two by two for the kernel: for each block `b` and pair
/// `p`, 64 level bytes (row 2p's 32, then row 2p+1's), 16 starting sums and 16 scales
/// (each row's scale eight times). An odd last row is paired with itself.
pub struct Pairs {
    pairs: usize,
    blocks: usize,
    levels: Vec<u8>,
    starts: Vec<i32>,
    scales: Vec<f32>,
}

impl Pairs {
    /// `rows` (1 to 8 rows of `blocks` Q8_0 blocks) with their widened scales, against
    /// Q4_0 weights (`q4`) or Q8_0.
    pub fn new(q4: bool, blocks: usize, rows: &[&[u8]], scales: &[&[f32]]) -> Pairs {
        assert!((1..=8).contains(&rows.len()) && scales.len() == rows.len());
        assert!(rows.iter().all(|r| r.len() >= blocks * Q8_0_BYTES));
        assert!(scales.iter().all(|s| s.len() >= blocks));
        let pairs = rows.len().div_ceil(2);
        let offset = if q4 { -8 } else { -128 };
        let mut p = Pairs {
            pairs,
            blocks,
            levels: Vec::with_capacity(blocks * pairs * 64),
            starts: Vec::with_capacity(blocks * pairs * 16),
            scales: Vec::with_capacity(blocks * pairs * 16),
        };
        for b in 0..blocks {
            for pair in 0..pairs {
                for half in 0..2 {
                    let r = (2 * pair + half).min(rows.len() - 1);
                    let block = &rows[r][b * Q8_0_BYTES + 2..(b + 1) * Q8_0_BYTES];
                    p.levels.extend_from_slice(block);
                    p.starts.extend(block.chunks_exact(4).map(|four| {
                        offset * four.iter().map(|&q| i32::from(q as i8)).sum::<i32>()
                    }));
                    p.scales.extend([scales[r][b]; 8]);
                }
            }
        }
        debug_assert_eq!(p.levels.len(), blocks * pairs * 2 * QK);
        p
    }
}

/// Weight rows of `pairs.blocks` blocks, one after another in `w`, against the pairs'
/// `rows` activation rows: `out[o * rows + i]` is weight row o with row i, as
/// `scalar_dot` computes it.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI, AVX2, FMA and F16C; `w` holds `out.len() / rows`
/// rows of Q4_0 (`q4`) or Q8_0 blocks, as many as the pairs were made with, and `rows`
/// is the number of rows they were made from.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn outputs(q4: bool, w: &[u8], pairs: &Pairs, rows: usize, out: &mut [f32]) {
    let blocks = pairs.blocks;
    let row = blocks * if q4 { Q4_0_BYTES } else { Q8_0_BYTES };
    assert!(rows.div_ceil(2) == pairs.pairs && out.len().is_multiple_of(rows));
    assert!(w.len() >= out.len() / rows * row);
    macro_rules! counts {
        ($q4:literal; $($p:literal)*) => {
            match pairs.pairs {
                $($p => {
                    for (o, out) in out.chunks_exact_mut(rows).enumerate() {
                        let w = &w[o * row..(o + 1) * row];
                        // SAFETY: the caller's promises, checked above.
                        let v = unsafe { tile::<$q4, $p>(w, pairs) };
                        for (i, out) in out.iter_mut().enumerate() {
                            *out = v[i / 2][i % 2];
                        }
                    }
                })*
                _ => unreachable!("1 to 4 pairs"),
            }
        };
    }
    if q4 {
        counts!(true; 1 2 3 4);
    } else {
        counts!(false; 1 2 3 4);
    }
}

/// One weight row against `P` pairs of activation rows.
///
/// # Safety
/// As `outputs`, for this row.
#[inline(always)]
unsafe fn tile<const Q4: bool, const P: usize>(w: &[u8], pairs: &Pairs) -> [[f32; 2]; P] {
    let wb = if Q4 { Q4_0_BYTES } else { Q8_0_BYTES };
    let mut acc = [_mm512_setzero_ps(); P];
    let (levels, starts) = (pairs.levels.as_ptr(), pairs.starts.as_ptr());
    let scales = pairs.scales.as_ptr();
    for b in 0..pairs.blocks {
        // A hint only: it may point past the row (no fault, no read).
        _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(b * wb + 1024).cast());
        // SAFETY: block b is in the row (the caller's promise); the features are the
        // entry point's; every pair holds `blocks` blocks of 64 bytes, 16 sums and 16
        // scales (`Pairs::new`).
        unsafe {
            let (qx, dw) = weights::<Q4>(w, b);
            let qx = if Q4 {
                qx
            } else {
                _mm256_xor_si256(qx, _mm256_set1_epi8(-128))
            };
            let qx = _mm512_broadcast_i64x4(qx);
            let dw = _mm512_set1_ps(dw);
            for (p, acc) in acc.iter_mut().enumerate() {
                let at = b * P + p;
                let start = _mm512_loadu_si512(starts.add(16 * at).cast());
                let qy = _mm512_loadu_si512(levels.add(64 * at).cast());
                let lanes = _mm512_dpbusd_epi32(start, qx, qy);
                let scale = _mm512_mul_ps(dw, _mm512_loadu_ps(scales.add(16 * at)));
                *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(lanes), *acc);
            }
        }
    }
    // a loop, not a closure: a closure is a function of its own, without the entry
    // point's features, and the intrinsics in it would not be inlined
    let mut out = [[0f32; 2]; P];
    for (out, a) in out.iter_mut().zip(acc) {
        // SAFETY: the entry point's features.
        unsafe {
            let lo = _mm512_castps512_ps256(a);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
            *out = [lanes_sum(lo), lanes_sum(hi)];
        }
    }
    out
}
