//! AVX-512F kernels: one zmm register holds a panel row (16 columns), so the
//! accumulators of all 8 x rows stay in registers for a whole pass over a panel, and W
//! is read once, one aligned 64-byte line per step, whatever the number of rows.
//!
//! Two panels are read side by side (P = 2, two streams): each x value is then
//! broadcast once for two lines. With one panel, 8 rows cost 8 FMAs whose broadcast
//! operand makes each two uops per 64-byte line (16 for bf16), which kept the loop
//! below memory speed; with two, bf16 at 8 rows is left bound by its 16 FMAs per line,
//! close to memory speed on 2 cores (the kernel_bench table shows how close).
//! Every row, whatever the number of rows, sums its products in input order into one
//! accumulator per panel (U = 1), so a row's output does not depend on the rows beside
//! it: a sequence decodes the same alone or in any batch. (U = 2 partial sums at 1 row,
//! to break the FMA chain, measured the same on batch-1 decode, f32 and bf16: it is
//! memory-bound, 2 chains with P = 2.) The int8-dynamic sums are exact integers, so its
//! row 1 keeps U = 2.
//! `int8_dynamic` (W8A8, see `vnni`) has the same shape with `vpdpbusd` in place of the
//! FMA: one per line and x row, 4 input rows per line.
// Index loops over const-sized arrays of registers say which accumulator meets which
// weight and x value; they unroll fully, and iterators would not read better here.
#![allow(clippy::needless_range_loop)]
// The AVX-512 intrinsics are stable since Rust 1.89; the workspace's rust-version
// (1.85) predates them, so building this crate now needs 1.89 or later.
#![allow(clippy::incompatible_msrv)]
use std::arch::x86_64::*;

use super::qtile::QTile;
use super::{Tile, PANEL};

/// How far ahead of the loads (in 64-byte lines) to prefetch. The hardware prefetcher
/// follows the stream too, but stops at 4 KiB pages and needs a few misses to start on a
/// new stream; this keeps lines in flight across both. (24–64 measured alike; fewer or
/// none lose 10–15% with 8 rows, when the loop has the most work per line.)
const PREFETCH_LINES: usize = 32;

/// Offset (in lines, from line `i` of a panel) of the line to prefetch for it. Near a
/// panel's end this points into the panel that stream reads next, P panels on: that
/// way the stream of panel p0 + P + q is already on its way when the next block starts
/// it (panel p0 + P itself follows on from p0 + P - 1, but the others start cold).
#[inline(always)]
fn prefetch_ahead<const P: usize>(i: usize, lpp: usize) -> usize {
    if i + PREFETCH_LINES < lpp {
        PREFETCH_LINES
    } else {
        PREFETCH_LINES + (P - 1) * lpp
    }
}

/// # Safety
/// The CPU has avx512f; `t` satisfies `Tile`'s field contracts (slice lengths as stated,
/// `y` writable for `rows` rows of `cols` columns at stride `ldy`, by this thread alone).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn f32(t: &Tile) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        match t.rows {
            1 => f32_rows::<1, 1>(t),
            2 => f32_rows::<2, 1>(t),
            3 => f32_rows::<3, 1>(t),
            4 => f32_rows::<4, 1>(t),
            5 => f32_rows::<5, 1>(t),
            6 => f32_rows::<6, 1>(t),
            7 => f32_rows::<7, 1>(t),
            8 => f32_rows::<8, 1>(t),
            r => unreachable!("tile of {r} rows"),
        }
    }
}

/// # Safety
/// As `f32`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn bf16(t: &Tile) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        match t.rows {
            1 => bf16_rows::<1, 1>(t),
            2 => bf16_rows::<2, 1>(t),
            3 => bf16_rows::<3, 1>(t),
            4 => bf16_rows::<4, 1>(t),
            5 => bf16_rows::<5, 1>(t),
            6 => bf16_rows::<6, 1>(t),
            7 => bf16_rows::<7, 1>(t),
            8 => bf16_rows::<8, 1>(t),
            r => unreachable!("tile of {r} rows"),
        }
    }
}

/// Panels two at a time (one left over when their number is odd).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn f32_rows<const R: usize, const U: usize>(t: &Tile) {
    let mut p = 0;
    while p < t.n_panels {
        // SAFETY: forwarded from `f32`; p (+ 1) < n_panels.
        unsafe {
            if p + 2 <= t.n_panels {
                f32_block::<R, 2, U>(t, p);
            } else {
                f32_block::<R, 1, U>(t, p);
            }
        }
        p += 2;
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bf16_rows<const R: usize, const U: usize>(t: &Tile) {
    let mut p = 0;
    while p < t.n_panels {
        // SAFETY: forwarded from `bf16`; p (+ 1) < n_panels.
        unsafe {
            if p + 2 <= t.n_panels {
                bf16_block::<R, 2, U>(t, p);
            } else {
                bf16_block::<R, 1, U>(t, p);
            }
        }
        p += 2;
    }
}

/// Accumulators: U partial sums, R rows of x, P panels.
type Acc<const R: usize, const P: usize, const U: usize> = [[[__m512; P]; R]; U];

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn init<const R: usize, const P: usize, const U: usize>(
    t: &Tile,
    p0: usize,
) -> Acc<R, P, U> {
    let mut acc = [[[_mm512_setzero_ps(); P]; R]; U];
    for q in 0..P {
        // SAFETY: bias holds n_panels * 16 values and p0 + q < n_panels.
        let b = unsafe { _mm512_loadu_ps(t.bias.as_ptr().add((p0 + q) * PANEL)) };
        for a in acc[0].iter_mut() {
            a[q] = b;
        }
    }
    acc
}

/// R rows of x times panels p0 .. p0 + P.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn f32_block<const R: usize, const P: usize, const U: usize>(t: &Tile, p0: usize) {
    let (k, lpp, x) = (t.k, t.lines_per_panel, t.x.as_ptr());
    let mut acc = init::<R, P, U>(t, p0);
    // SAFETY: panel p0 + q's lines are t.w[(p0+q)*lpp..][..lpp], each a 64-byte-aligned
    // line of 16 f32; line i is read only for i < k = lpp. x holds R*k values.
    // Prefetches may point past the buffer: they never fault, and `wrapping_add` keeps
    // the pointer arithmetic defined.
    unsafe {
        let w = t.w.as_ptr().add(p0 * lpp) as *const f32;
        let line = |q: usize, i: usize| w.add((q * lpp + i) * PANEL);
        let mut i = 0;
        while i < k {
            // U lines in a row into separate sums (only for few rows; fewer at the end).
            let step = if i + U <= k { U } else { 1 };
            for u in 0..U.min(step) {
                let mut wv = [_mm512_setzero_ps(); P];
                let ahead = prefetch_ahead::<P>(i + u, lpp) * PANEL;
                for q in 0..P {
                    let wp = line(q, i + u);
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(ahead) as *const i8);
                    wv[q] = _mm512_load_ps(wp);
                }
                for r in 0..R {
                    let xv = _mm512_set1_ps(*x.add(r * k + i + u));
                    for q in 0..P {
                        acc[u][r][q] = _mm512_fmadd_ps(wv[q], xv, acc[u][r][q]);
                    }
                }
            }
            i += step;
        }
        store::<R, P, U>(t, p0, acc);
    }
}

/// As `f32_block`, for lines holding two input rows of bf16 (row 2l in each u32's low
/// half, 2l + 1 in its high half).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bf16_block<const R: usize, const P: usize, const U: usize>(t: &Tile, p0: usize) {
    let (k, lpp, x) = (t.k, t.lines_per_panel, t.x.as_ptr());
    let pairs = k / 2;
    let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
    let mut acc = init::<R, P, U>(t, p0);
    // SAFETY: as in `f32_block`; a panel has lpp = ceil(k/2) lines, line l is read for
    // l < pairs (x columns 2l, 2l+1 < k) and, when k is odd, l = pairs (x column k-1
    // only, the line's high halves being the zero padding).
    unsafe {
        let w = t.w.as_ptr().add(p0 * lpp) as *const f32;
        let line = |q: usize, l: usize| w.add((q * lpp + l) * PANEL);
        let mut l = 0;
        while l < pairs {
            let step = if l + U <= pairs { U } else { 1 };
            for u in 0..U.min(step) {
                let mut lo = [_mm512_setzero_ps(); P];
                let mut hi = [_mm512_setzero_ps(); P];
                let ahead = prefetch_ahead::<P>(l + u, lpp) * PANEL;
                for q in 0..P {
                    let wp = line(q, l + u);
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(ahead) as *const i8);
                    let v = _mm512_castps_si512(_mm512_load_ps(wp));
                    lo[q] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                    hi[q] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
                }
                let i = 2 * (l + u);
                for r in 0..R {
                    let x0 = _mm512_set1_ps(*x.add(r * k + i));
                    let x1 = _mm512_set1_ps(*x.add(r * k + i + 1));
                    for q in 0..P {
                        acc[u][r][q] =
                            _mm512_fmadd_ps(hi[q], x1, _mm512_fmadd_ps(lo[q], x0, acc[u][r][q]));
                    }
                }
            }
            l += step;
        }
        if k % 2 == 1 {
            for q in 0..P {
                let v = _mm512_castps_si512(_mm512_load_ps(line(q, pairs)));
                let lo = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                for r in 0..R {
                    acc[0][r][q] =
                        _mm512_fmadd_ps(lo, _mm512_set1_ps(*x.add(r * k + k - 1)), acc[0][r][q]);
                }
            }
        }
        store::<R, P, U>(t, p0, acc);
    }
}

/// Sums the partial sums and writes the real columns of panels p0 .. p0 + P of y.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store<const R: usize, const P: usize, const U: usize>(
    t: &Tile,
    p0: usize,
    mut acc: Acc<R, P, U>,
) {
    for u in 1..U {
        for r in 0..R {
            for q in 0..P {
                acc[0][r][q] = _mm512_add_ps(acc[0][r][q], acc[u][r][q]);
            }
        }
    }
    for q in 0..P {
        let p = p0 + q;
        let cols = t.panel_cols(p);
        let mask: __mmask16 = if cols >= PANEL {
            !0
        } else {
            (1u16 << cols) - 1
        };
        for (r, a) in acc[0].iter().enumerate() {
            // SAFETY: y row r, columns p*16 .. p*16 + cols, lie in this tile (Tile
            // contract); the mask keeps the store from touching the columns past `cols`.
            unsafe { _mm512_mask_storeu_ps(t.y.add(r * t.ldy + p * PANEL), mask, a[q]) };
        }
    }
}

/// # Safety
/// As `f32`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn int8(t: &Tile) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        match t.rows {
            1 => int8_rows::<1, 1>(t),
            2 => int8_rows::<2, 1>(t),
            3 => int8_rows::<3, 1>(t),
            4 => int8_rows::<4, 1>(t),
            5 => int8_rows::<5, 1>(t),
            6 => int8_rows::<6, 1>(t),
            7 => int8_rows::<7, 1>(t),
            8 => int8_rows::<8, 1>(t),
            r => unreachable!("tile of {r} rows"),
        }
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn int8_rows<const R: usize, const U: usize>(t: &Tile) {
    let mut p = 0;
    while p < t.n_panels {
        // SAFETY: forwarded from `int8`; p (+ 1) < n_panels.
        unsafe {
            if p + 2 <= t.n_panels {
                int8_block::<R, 2, U>(t, p);
            } else {
                int8_block::<R, 1, U>(t, p);
            }
        }
        p += 2;
    }
}

/// As `f32_block`, for lines holding four input rows of 16 int8 weights (16 bytes per
/// input row, row 4l + i at byte 16·i of line l), widened to f32 in registers. The
/// per-column scale is applied by the caller after the tile.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn int8_block<const R: usize, const P: usize, const U: usize>(t: &Tile, p0: usize) {
    let (k, lpp, x) = (t.k, t.lines_per_panel, t.x.as_ptr());
    let mut acc = init::<R, P, U>(t, p0);
    // SAFETY: a panel has lpp = ceil(k/4) lines of 64 bytes (aligned); row 4l + i is read
    // only for 4l + i < k (x columns < k), 16 bytes at offset 16·i of its line. x holds
    // R*k values. Prefetches never fault; `wrapping_add` keeps the arithmetic defined.
    unsafe {
        let w = t.w.as_ptr().add(p0 * lpp) as *const u8;
        for l in 0..lpp {
            let ahead = prefetch_ahead::<P>(l, lpp) * 64;
            let mut wp = [w; P];
            for q in 0..P {
                wp[q] = w.add((q * lpp + l) * 64);
                _mm_prefetch::<_MM_HINT_T0>(wp[q].wrapping_add(ahead) as *const i8);
            }
            for i in 0..4 {
                let col = 4 * l + i;
                if col >= k {
                    break;
                }
                let mut wv = [_mm512_setzero_ps(); P];
                for q in 0..P {
                    let b = _mm_load_si128(wp[q].add(16 * i) as *const __m128i);
                    wv[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
                }
                let u = i % U;
                for r in 0..R {
                    let xv = _mm512_set1_ps(*x.add(r * k + col));
                    for q in 0..P {
                        acc[u][r][q] = _mm512_fmadd_ps(wv[q], xv, acc[u][r][q]);
                    }
                }
            }
        }
        store::<R, P, U>(t, p0, acc);
    }
}

/// # Safety
/// The CPU has avx512f and avx512vnni; `t` satisfies `QTile`'s field contracts (slice
/// lengths as stated, `y` writable for `rows` rows of `cols` columns at stride `ldy`, by
/// this thread alone).
#[target_feature(enable = "avx512f,avx512vnni")]
pub(super) unsafe fn int8_dynamic(t: &QTile) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        match t.rows {
            1 => int8_dynamic_rows::<1, 2>(t),
            2 => int8_dynamic_rows::<2, 1>(t),
            3 => int8_dynamic_rows::<3, 1>(t),
            4 => int8_dynamic_rows::<4, 1>(t),
            5 => int8_dynamic_rows::<5, 1>(t),
            6 => int8_dynamic_rows::<6, 1>(t),
            7 => int8_dynamic_rows::<7, 1>(t),
            8 => int8_dynamic_rows::<8, 1>(t),
            r => unreachable!("tile of {r} rows"),
        }
    }
}

#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
unsafe fn int8_dynamic_rows<const R: usize, const U: usize>(t: &QTile) {
    let mut p = 0;
    while p < t.n_panels {
        // SAFETY: forwarded from `int8_dynamic`; p (+ 1) < n_panels.
        unsafe {
            if p + 2 <= t.n_panels {
                int8_dynamic_block::<R, 2, U>(t, p);
            } else {
                int8_dynamic_block::<R, 1, U>(t, p);
            }
        }
        p += 2;
    }
}

/// R rows of quantized x times panels p0 .. p0 + P: int32 sums with `vpdpbusd` (x's 4
/// bytes broadcast to every lane, the line's 4 weight bytes per column), then
/// y = (acc − corr)·s_r·scale + b with separate multiplies and add, as `qtile::dequant`.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
unsafe fn int8_dynamic_block<const R: usize, const P: usize, const U: usize>(t: &QTile, p0: usize) {
    let lpp = t.lines_per_panel;
    let row_bytes = 4 * lpp;
    let mut acc = [[[_mm512_setzero_si512(); P]; R]; U];
    // SAFETY: panel p0 + q's lines are t.w[(p0+q)*lpp..][..lpp], each 64-byte aligned;
    // line l is read only for l < lpp. x row r's word l is bytes r*row_bytes + 4l .. + 4
    // of t.xq (rows * row_bytes bytes), read unaligned. corr, scale and bias hold
    // n_panels * 16 values and p0 + q < n_panels; y row r, columns (p0+q)*16 .. + cols,
    // lie in this tile, and the mask keeps the store inside them. Prefetches never
    // fault; `wrapping_add` keeps their arithmetic defined.
    unsafe {
        let w = t.w.as_ptr().add(p0 * lpp) as *const __m512i;
        let x = t.xq.as_ptr();
        let mut l = 0;
        while l < lpp {
            let step = if l + U <= lpp { U } else { 1 };
            for u in 0..U.min(step) {
                let ahead = prefetch_ahead::<P>(l + u, lpp);
                let mut wv = [_mm512_setzero_si512(); P];
                for q in 0..P {
                    let wp = w.add(q * lpp + l + u);
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(ahead) as *const i8);
                    wv[q] = _mm512_load_si512(wp);
                }
                for r in 0..R {
                    let word = (x.add(r * row_bytes + 4 * (l + u)) as *const i32).read_unaligned();
                    let xv = _mm512_set1_epi32(word);
                    for q in 0..P {
                        acc[u][r][q] = _mm512_dpbusd_epi32(acc[u][r][q], xv, wv[q]);
                    }
                }
            }
            l += step;
        }
        for u in 1..U {
            for r in 0..R {
                for q in 0..P {
                    acc[0][r][q] = _mm512_add_epi32(acc[0][r][q], acc[u][r][q]);
                }
            }
        }
        for q in 0..P {
            let p = p0 + q;
            let c0 = p * PANEL;
            let corr = _mm512_loadu_si512(t.corr.as_ptr().add(c0) as *const __m512i);
            let scale = _mm512_loadu_ps(t.scale.as_ptr().add(c0));
            let bias = _mm512_loadu_ps(t.bias.as_ptr().add(c0));
            let cols = t.panel_cols(p);
            let mask: __mmask16 = if cols >= PANEL {
                !0
            } else {
                (1u16 << cols) - 1
            };
            for r in 0..R {
                let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[0][r][q], corr));
                let v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(t.sx[r])), scale);
                let v = _mm512_add_ps(v, bias);
                _mm512_mask_storeu_ps(t.y.add(r * t.ldy + c0), mask, v);
            }
        }
    }
}
