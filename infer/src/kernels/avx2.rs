//! AVX2 + FMA kernels: a panel row (16 columns) takes two ymm registers, so 8 x rows
//! would need 16 accumulators, all of AVX2's registers, with none left for W. Rows are
//! therefore served in groups of up to 4 (8 accumulators), panel by panel: the second
//! group re-reads a panel (48–192 KiB for GPT-2) from L2, not from memory.
//!
//! `int8_dynamic` (W8A8, see `vnni`) has no `vpdpbusd` here, and `vpmaddubsw` (u8 × i8
//! pairs summed to i16, saturating) cannot take u = xq + 128: 255·127·2 overflows i16.
//! It takes |q| and xq·sign(q) instead (`vpsignb`), whose pairs reach 2·128·127 < 2¹⁵,
//! then `vpmaddwd` by ones to i32: Σ xq·q directly, the same integer as the VNNI sum
//! minus its correction (the trick llama.cpp's AVX2 int8 dot products use).
// Index loops over const-sized arrays of registers say which accumulator meets which
// weight and x value; they unroll fully, and iterators would not read better here.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

use super::qtile::{dequant, QTile};
use super::{Tile, PANEL};

const GROUP: usize = 4;
/// See `avx512::PREFETCH_LINES`.
const PREFETCH_LINES: usize = 32;

/// # Safety
/// The CPU has avx2 and fma; `t` satisfies `Tile`'s field contracts (slice lengths as
/// stated, `y` writable for `rows` rows of `cols` columns at stride `ldy`, by this thread
/// alone).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn f32(t: &Tile) {
    for p in 0..t.n_panels {
        for r0 in (0..t.rows).step_by(GROUP) {
            // SAFETY: forwarded from this function's contract; r0 + rows in group <= rows.
            unsafe {
                match (t.rows - r0).min(GROUP) {
                    1 => f32_panel::<1, 1>(t, p, r0),
                    2 => f32_panel::<2, 1>(t, p, r0),
                    3 => f32_panel::<3, 1>(t, p, r0),
                    _ => f32_panel::<4, 1>(t, p, r0),
                }
            }
        }
    }
}

/// # Safety
/// As `f32`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn bf16(t: &Tile) {
    for p in 0..t.n_panels {
        for r0 in (0..t.rows).step_by(GROUP) {
            // SAFETY: forwarded from this function's contract; r0 + rows in group <= rows.
            unsafe {
                match (t.rows - r0).min(GROUP) {
                    1 => bf16_panel::<1, 1>(t, p, r0),
                    2 => bf16_panel::<2, 1>(t, p, r0),
                    3 => bf16_panel::<3, 1>(t, p, r0),
                    _ => bf16_panel::<4, 1>(t, p, r0),
                }
            }
        }
    }
}

type Acc<const R: usize, const U: usize> = [[[__m256; 2]; R]; U];

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn init<const R: usize, const U: usize>(t: &Tile, p: usize) -> Acc<R, U> {
    let mut acc = [[[_mm256_setzero_ps(); 2]; R]; U];
    // SAFETY: bias holds n_panels * 16 values and p < n_panels.
    let b = unsafe { t.bias.as_ptr().add(p * PANEL) };
    // SAFETY: as above.
    acc[0] = [unsafe { [_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8))] }; R];
    acc
}

/// Panel p for x rows r0 .. r0 + R, U partial sums per row. Every caller passes U = 1:
/// each row sums in input order whatever the number of rows (see `avx512`'s notes).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn f32_panel<const R: usize, const U: usize>(t: &Tile, p: usize, r0: usize) {
    let k = t.k;
    let mut acc = init::<R, U>(t, p);
    // SAFETY: panel p's lines are t.w[p*lpp..(p+1)*lpp] (lpp = k), 64-byte aligned, so
    // both 32-byte halves of a line are aligned; x rows r0..r0+R exist (Tile contract).
    // Prefetches never fault; `wrapping_add` keeps their arithmetic defined.
    unsafe {
        let w = t.w.as_ptr().add(p * t.lines_per_panel) as *const f32;
        let x = t.x.as_ptr().add(r0 * k);
        let mut i = 0;
        while i + U <= k {
            for u in 0..U {
                let wp = w.add((i + u) * PANEL);
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH_LINES * PANEL) as *const i8);
                let w0 = _mm256_load_ps(wp);
                let w1 = _mm256_load_ps(wp.add(8));
                for r in 0..R {
                    let xv = _mm256_set1_ps(*x.add(r * k + i + u));
                    acc[u][r][0] = _mm256_fmadd_ps(w0, xv, acc[u][r][0]);
                    acc[u][r][1] = _mm256_fmadd_ps(w1, xv, acc[u][r][1]);
                }
            }
            i += U;
        }
        while i < k {
            let w0 = _mm256_load_ps(w.add(i * PANEL));
            let w1 = _mm256_load_ps(w.add(i * PANEL + 8));
            for r in 0..R {
                let xv = _mm256_set1_ps(*x.add(r * k + i));
                acc[0][r][0] = _mm256_fmadd_ps(w0, xv, acc[0][r][0]);
                acc[0][r][1] = _mm256_fmadd_ps(w1, xv, acc[0][r][1]);
            }
            i += 1;
        }
        store::<R, U>(t, p, r0, acc);
    }
}

/// Widens one 32-byte half-line of bf16 pairs: (row 2l, row 2l + 1) for 8 columns.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn widen(half: *const f32) -> (__m256, __m256) {
    // SAFETY: the caller passes an aligned half-line inside the panel.
    let v = _mm256_castps_si256(unsafe { _mm256_load_ps(half) });
    let lo = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
    let hi = _mm256_castsi256_ps(_mm256_and_si256(
        v,
        _mm256_set1_epi32(0xffff_0000_u32 as i32),
    ));
    (lo, hi)
}

/// Adds one line (x columns i and i + 1) into one set of R rows' sums.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pair_step<const R: usize>(
    acc: &mut [[__m256; 2]; R],
    wp: *const f32,
    x: *const f32,
    k: usize,
    i: usize,
) {
    // SAFETY: the caller passes a whole line of the panel and x rows of k values with
    // columns i, i + 1 < k.
    unsafe {
        let (lo0, hi0) = widen(wp);
        let (lo1, hi1) = widen(wp.add(8));
        for (r, a) in acc.iter_mut().enumerate() {
            let x0 = _mm256_set1_ps(*x.add(r * k + i));
            let x1 = _mm256_set1_ps(*x.add(r * k + i + 1));
            a[0] = _mm256_fmadd_ps(hi0, x1, _mm256_fmadd_ps(lo0, x0, a[0]));
            a[1] = _mm256_fmadd_ps(hi1, x1, _mm256_fmadd_ps(lo1, x0, a[1]));
        }
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn bf16_panel<const R: usize, const U: usize>(t: &Tile, p: usize, r0: usize) {
    let k = t.k;
    let pairs = k / 2;
    let mut acc = init::<R, U>(t, p);
    // SAFETY: as in `f32_panel`, with lpp = ceil(k/2) lines a panel: line l is read for
    // l < pairs and, when k is odd, l = pairs (its high halves are zero padding and x row
    // k is never read).
    unsafe {
        let w = t.w.as_ptr().add(p * t.lines_per_panel) as *const f32;
        let x = t.x.as_ptr().add(r0 * k);
        let mut l = 0;
        while l + U <= pairs {
            for u in 0..U {
                let wp = w.add((l + u) * PANEL);
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH_LINES * PANEL) as *const i8);
                pair_step(&mut acc[u], wp, x, k, 2 * (l + u));
            }
            l += U;
        }
        while l < pairs {
            pair_step(&mut acc[0], w.add(l * PANEL), x, k, 2 * l);
            l += 1;
        }
        if k % 2 == 1 {
            let (lo0, _) = widen(w.add(pairs * PANEL));
            let (lo1, _) = widen(w.add(pairs * PANEL + 8));
            for r in 0..R {
                let xv = _mm256_set1_ps(*x.add(r * k + k - 1));
                acc[0][r][0] = _mm256_fmadd_ps(lo0, xv, acc[0][r][0]);
                acc[0][r][1] = _mm256_fmadd_ps(lo1, xv, acc[0][r][1]);
            }
        }
        store::<R, U>(t, p, r0, acc);
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store<const R: usize, const U: usize>(t: &Tile, p: usize, r0: usize, mut acc: Acc<R, U>) {
    for u in 1..U {
        for r in 0..R {
            for h in 0..2 {
                acc[0][r][h] = _mm256_add_ps(acc[0][r][h], acc[u][r][h]);
            }
        }
    }
    let cols = t.panel_cols(p);
    for (r, a) in acc[0].iter().enumerate() {
        // SAFETY: y row r0 + r, columns p*16 .. p*16 + cols, lie in this tile (Tile
        // contract); a partial panel goes through a stack buffer so that nothing past
        // `cols` is written.
        unsafe {
            let y = t.y.add((r0 + r) * t.ldy + p * PANEL);
            if cols >= PANEL {
                _mm256_storeu_ps(y, a[0]);
                _mm256_storeu_ps(y.add(8), a[1]);
            } else {
                let mut tmp = [0.0f32; PANEL];
                _mm256_storeu_ps(tmp.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), a[1]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), y, cols);
            }
        }
    }
}

/// # Safety
/// The CPU has avx2 (and fma, as every `Isa::Avx2` kernel assumes); `t` satisfies
/// `QTile`'s field contracts (slice lengths as stated, `y` writable for `rows` rows of
/// `cols` columns at stride `ldy`, by this thread alone).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn int8_dynamic(t: &QTile) {
    for p in 0..t.n_panels {
        for r0 in (0..t.rows).step_by(GROUP) {
            // SAFETY: forwarded from this function's contract; r0 + rows in group <= rows.
            unsafe {
                match (t.rows - r0).min(GROUP) {
                    1 => int8_dynamic_panel::<1>(t, p, r0),
                    2 => int8_dynamic_panel::<2>(t, p, r0),
                    3 => int8_dynamic_panel::<3>(t, p, r0),
                    _ => int8_dynamic_panel::<4>(t, p, r0),
                }
            }
        }
    }
}

/// Panel p for quantized x rows r0 .. r0 + R: Σ xq·q in i32, then `qtile::dequant` with
/// no correction (these sums are of xq, not of xq + 128).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn int8_dynamic_panel<const R: usize>(t: &QTile, p: usize, r0: usize) {
    let lpp = t.lines_per_panel;
    let row_bytes = 4 * lpp;
    let mut acc = [[_mm256_setzero_si256(); 2]; R];
    let ones = _mm256_set1_epi16(1);
    // u = xq + 128 back to xq: flip each byte's top bit.
    let flip = _mm256_set1_epi32(0x8080_8080_u32 as i32);
    // SAFETY: panel p's lines are t.w[p*lpp..(p+1)*lpp], 64-byte aligned, so both
    // 32-byte halves of a line are aligned; line l is read for l < lpp only. x row r0 + r's
    // word l is bytes (r0+r)*row_bytes + 4l .. + 4 of t.xq, read unaligned (rows < t.rows).
    // Prefetches never fault; `wrapping_add` keeps their arithmetic defined.
    unsafe {
        let w = t.w.as_ptr().add(p * lpp) as *const __m256i;
        let x = t.xq.as_ptr().add(r0 * row_bytes);
        for l in 0..lpp {
            let wp = w.add(2 * l);
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(2 * PREFETCH_LINES) as *const i8);
            let wv = [_mm256_load_si256(wp), _mm256_load_si256(wp.add(1))];
            let wabs = [_mm256_abs_epi8(wv[0]), _mm256_abs_epi8(wv[1])];
            for r in 0..R {
                let word = (x.add(r * row_bytes + 4 * l) as *const i32).read_unaligned();
                let xv = _mm256_xor_si256(_mm256_set1_epi32(word), flip);
                for h in 0..2 {
                    // |q| (as u8, 128 for -128) times xq·sign(q): pairs within ±32512.
                    let pairs = _mm256_maddubs_epi16(wabs[h], _mm256_sign_epi8(xv, wv[h]));
                    acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
    }
    let c0 = p * PANEL;
    let cols = t.panel_cols(p);
    for (r, a) in acc.iter().enumerate() {
        let mut sums = [0i32; PANEL];
        // SAFETY: two unaligned 32-byte stores into a 64-byte local array.
        unsafe {
            _mm256_storeu_si256(sums.as_mut_ptr() as *mut __m256i, a[0]);
            _mm256_storeu_si256(sums.as_mut_ptr().add(8) as *mut __m256i, a[1]);
        }
        let s_r = t.sx[r0 + r];
        for c in 0..cols {
            let v = dequant(sums[c], 0, s_r, t.scale[c0 + c], t.bias[c0 + c]);
            // SAFETY: y row r0 + r, column p*16 + c < p*16 + cols, lies in this tile and
            // is this thread's alone (QTile contract).
            unsafe { *t.y.add((r0 + r) * t.ldy + c0 + c) = v };
        }
    }
}
