//! Q4_K and Q6_K row dot products in the order of ggml-cpu's AVX2 kernels
//! (`ggml_vec_dot_q4_K_q8_K`, `ggml_vec_dot_q6_K_q8_K` in `arch/x86/quants.c`): per
//! super-block, eight i32 lanes of scaled integer sums (lane l holds, for each 32-weight
//! piece, its scale times the sum over weights 4l..4l+4, as `vpmaddubsw` + `vpmaddwd`
//! leave them), each lane converted to f32 and added into its accumulator with one fused
//! multiply-add by the super-block's scale; Q4_K's mins go into four lanes of their own
//! (`bsums` paired, times the mins), and Q6_K's level offset of 32 comes off each lane
//! from the activations' sums of 16 (as llama.cpp 0.3.36's kernel does). At the end the
//! lanes are summed pairwise. The portable path computes the same lanes in the same order,
//! so the two agree bit for bit, and with ggml's AVX2 build (`tests/gguf_blocks.rs`).
//!
//! One weight super-block is unpacked once for up to [`MAX_ROWS`] activation rows; each
//! row's value is the one it gets alone.
use super::DotPath;
use crate::gguf::blocks::half::{f16_at, le16};
use crate::gguf::types::{GgmlType, QK_K};

/// Activation rows one pass over a weight row serves.
pub(crate) const MAX_ROWS: usize = 8;

const Q8_K_BYTES: usize = 4 + QK_K + 32;

/// Whether `ty` runs here.
pub(crate) fn handles(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K)
}

/// Weight rows of `n` weights of `ty` (Q4_K or Q6_K), one after another in `w`, each
/// against up to [`MAX_ROWS`] activation rows quantized to Q8_K: `out[o * acts.len() + i]`
/// is weight row o with `acts[i]`, for `out.len() / acts.len()` weight rows.
///
/// # Panics
/// If `ty` is not handled here, a row is short, or `out` is not a whole number of
/// `acts.len()` values.
pub(crate) fn rows(
    path: DotPath,
    ty: GgmlType,
    n: usize,
    w: &[u8],
    acts: &[&[u8]],
    out: &mut [f32],
) {
    assert!(handles(ty), "{} is not Q4_K or Q6_K", ty.name());
    assert!((1..=MAX_ROWS).contains(&acts.len()) && out.len().is_multiple_of(acts.len()));
    let blocks = n / QK_K;
    let outputs = out.len() / acts.len();
    assert!(w.len() >= outputs * blocks * ty.type_size());
    assert!(acts.iter().all(|a| a.len() >= blocks * Q8_K_BYTES));
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's path is supported on this CPU; the lengths are checked above.
        DotPath::Avx2 | DotPath::Vnni => unsafe { avx2::rows(ty, blocks, w, acts, out) },
        _ => {
            let row = blocks * ty.type_size();
            for (o, out) in out.chunks_exact_mut(acts.len()).enumerate() {
                for (v, a) in out.iter_mut().zip(acts) {
                    *v = portable(ty, blocks, &w[o * row..(o + 1) * row], a);
                }
            }
        }
    }
}

/// Q4_K's eight 6-bit scales (bytes 0–7 of the little-endian words) and eight mins
/// (bytes 8–15) from its 12 packed bytes, as ggml unpacks them with `kmask1..3` (`utmp`).
#[inline(always)]
fn q4k_scales_mins(s: &[u8]) -> [u32; 4] {
    const K1: u32 = 0x3f3f_3f3f;
    const K2: u32 = 0x0f0f_0f0f;
    const K3: u32 = 0x0303_0303;
    let u = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (u(0), u(1), u(2));
    [
        u0 & K1,
        (u2 & K2) | (((u0 >> 6) & K3) << 4),
        u1 & K1,
        ((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4),
    ]
}

/// Byte `i` of the four words.
fn byte(words: &[u32; 4], i: usize) -> u8 {
    (words[i / 4] >> (8 * (i % 4))) as u8
}

/// A Q8_K block's f32 scale.
#[inline(always)]
fn q8k_scale(a: &[u8]) -> f32 {
    f32::from_le_bytes([a[0], a[1], a[2], a[3]])
}

/// The portable kernel: ggml's AVX2 lanes, one by one.
fn portable(ty: GgmlType, blocks: usize, w: &[u8], a: &[u8]) -> f32 {
    let ws = ty.type_size();
    let mut acc = [0f32; 8];
    let mut acc_m = [0f32; 4];
    for b in 0..blocks {
        let (wb, ab) = (
            &w[b * ws..(b + 1) * ws],
            &a[b * Q8_K_BYTES..(b + 1) * Q8_K_BYTES],
        );
        let yd = q8k_scale(ab);
        let y = |i: usize| i32::from(ab[4 + i] as i8);
        let mut lanes = [0i32; 8];
        if ty == GgmlType::Q4_K {
            let sm: [u8; 16] = std::array::from_fn(|i| byte(&q4k_scales_mins(&wb[4..16]), i));
            let qs = &wb[16..144];
            // piece p (32 weights): scale sm[p]; the low nibbles of qs[32(p/2)..] for even
            // p, the high ones for odd p
            for p in 0..8 {
                let scale = i32::from(sm[p]);
                for (l, lane) in lanes.iter_mut().enumerate() {
                    let s: i32 = (4 * l..4 * l + 4)
                        .map(|k| {
                            let byte = qs[32 * (p / 2) + k];
                            let q = if p % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                            i32::from(q) * y(32 * p + k)
                        })
                        .sum();
                    *lane += scale * s;
                }
            }
            let d = yd * f16_at(wb, 0);
            let dmin = -yd * f16_at(wb, 2);
            let bsum = |j: usize| le16(ab, 4 + QK_K + 2 * j) as i16;
            for (i, m) in acc_m.iter_mut().enumerate() {
                // `_mm_hadd_epi16` of the sums, `_mm_madd_epi16` with the mins
                let pair = |k: usize| i32::from(bsum(2 * k).wrapping_add(bsum(2 * k + 1)));
                let prod = i32::from(sm[8 + 2 * i]) * pair(2 * i)
                    + i32::from(sm[8 + 2 * i + 1]) * pair(2 * i + 1);
                *m = dmin.mul_add(prod as f32, *m);
            }
            for (acc, &lane) in acc.iter_mut().zip(&lanes) {
                *acc = d.mul_add(lane as f32, *acc);
            }
        } else {
            let (ql, qh, sc) = (&wb[..128], &wb[128..192], &wb[192..208]);
            // piece p = 4h + k (32 weights from 128h + 32k): the low nibbles of
            // ql[64h + 32(k % 2)..] for k < 2, the high ones for k ≥ 2, and bits 2k, 2k+1
            // of qh[32h..], 0..63; weights 16 at a time share a signed scale
            for p in 0..8 {
                let (h, k) = (p / 4, p % 4);
                for (l, lane) in lanes.iter_mut().enumerate() {
                    let scale = i32::from(sc[2 * p + l / 4] as i8);
                    let s: i32 = (4 * l..4 * l + 4)
                        .map(|e| {
                            let low = ql[64 * h + 32 * (k % 2) + e];
                            let low = if k < 2 { low & 0x0F } else { low >> 4 };
                            let high = (qh[32 * h + e] >> (2 * k)) & 3;
                            i32::from(low | (high << 4)) * y(32 * p + e)
                        })
                        .sum();
                    *lane += scale * s;
                }
            }
            // the levels' offset of 32, from the sums of 16: lane l covers the sums and
            // scales 2l and 2l + 1 (`q8sclsub`)
            let bsum = |j: usize| i32::from(le16(ab, 4 + QK_K + 2 * j) as i16);
            for (l, lane) in lanes.iter_mut().enumerate() {
                let (s0, s1) = (i32::from(sc[2 * l] as i8), i32::from(sc[2 * l + 1] as i8));
                *lane -= (bsum(2 * l) * s0 + bsum(2 * l + 1) * s1) << 5;
            }
            let d = yd * f16_at(wb, 208);
            for (acc, &lane) in acc.iter_mut().zip(&lanes) {
                *acc = d.mul_add(lane as f32, *acc);
            }
        }
    }
    let m = (acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]);
    super::lanes_sum(acc) + m
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::avx2::lanes_sum as hsum8;
    use super::{q4k_scales_mins, q8k_scale, Q8_K_BYTES};
    use crate::gguf::types::{GgmlType, QK_K};

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn load(bytes: &[u8], at: usize) -> __m256i {
        assert!(bytes.len() >= at + 32);
        // SAFETY: 32 readable bytes from `at`, checked above; no alignment needed.
        unsafe { _mm256_loadu_si256(bytes.as_ptr().add(at).cast()) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn load16(bytes: &[u8], at: usize) -> __m128i {
        assert!(bytes.len() >= at + 16);
        // SAFETY: as `load`, 16 bytes.
        unsafe { _mm_loadu_si128(bytes.as_ptr().add(at).cast()) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn hsum4(acc: __m128) -> f32 {
        let q = _mm_add_ps(acc, _mm_movehl_ps(acc, acc));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)))
    }

    /// Each piece's 32 levels, unsigned, and its scales as i16 lanes.
    type Pieces = ([__m256i; 8], [__m256i; 8]);

    /// A Q4_K super-block's levels (0..15) and scales; its mins (as 8 i16) and d, dmin.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn q4k_pieces(wb: &[u8]) -> (Pieces, __m128i) {
        let t = q4k_scales_mins(&wb[4..16]);
        let both = _mm256_cvtepu8_epi16(_mm_set_epi32(
            t[3] as i32,
            t[2] as i32,
            t[1] as i32,
            t[0] as i32,
        ));
        let sc = _mm256_castsi256_si128(both);
        let scales = _mm256_set_m128i(sc, sc);
        let m4 = _mm256_set1_epi8(0x0F);
        let mut q = [_mm256_setzero_si256(); 8];
        let mut s = [_mm256_setzero_si256(); 8];
        for j in 0..4 {
            let bits = load(wb, 16 + 32 * j);
            q[2 * j] = _mm256_and_si256(bits, m4);
            q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
        }
        for (p, s) in s.iter_mut().enumerate() {
            // i16 lane p of `scales` in every lane (`get_scale_shuffle_k4`)
            let pick = _mm256_set1_epi16((((2 * p + 1) << 8) | (2 * p)) as i16);
            *s = _mm256_shuffle_epi8(scales, pick);
        }
        ((q, s), _mm256_extracti128_si256::<1>(both))
    }

    /// A Q6_K super-block's levels (0..63, the offset of 32 taken off from the activation
    /// sums) and scales.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn q6k_pieces(wb: &[u8]) -> Pieces {
        let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
        let scales = load16(wb, 192);
        let mut q = [_mm256_setzero_si256(); 8];
        let mut s = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let l1 = load(wb, 64 * h);
            let l2 = load(wb, 64 * h + 32);
            let hb = load(wb, 128 + 32 * h);
            let high = |shift: i32| {
                let bits = _mm256_srl_epi16(hb, _mm_cvtsi32_si128(shift));
                _mm256_slli_epi16::<4>(_mm256_and_si256(bits, m2))
            };
            q[4 * h] = _mm256_or_si256(_mm256_and_si256(l1, m4), high(0));
            q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l2, m4), high(2));
            q[4 * h + 2] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4), high(4));
            q[4 * h + 3] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l2), m4), high(6));
        }
        for (p, s) in s.iter_mut().enumerate() {
            // scale 2p for the piece's first 16 weights, 2p + 1 for the rest
            // (`get_scale_shuffle`), widened to i16
            let pick = _mm_set_epi64x(
                0x0101_0101_0101_0101 * (2 * p as i64 + 1),
                0x0101_0101_0101_0101 * (2 * p as i64),
            );
            *s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
        }
        (q, s)
    }

    /// See `super::rows`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `w` holds `out.len() / acts.len()` rows of `blocks`
    /// super-blocks of `ty`, each of `acts` `blocks` Q8_K blocks; `acts` holds 1 to 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows(ty: GgmlType, blocks: usize, w: &[u8], acts: &[&[u8]], out: &mut [f32]) {
        let row = blocks * ty.type_size();
        // A row count known at compile time keeps the accumulators in registers.
        macro_rules! counts {
            ($($n:literal)*) => {
                match acts.len() {
                    $($n => {
                        let a: [&[u8]; $n] = std::array::from_fn(|i| acts[i]);
                        for (o, out) in out.chunks_exact_mut($n).enumerate() {
                            let w = &w[o * row..(o + 1) * row];
                            let v = if ty == GgmlType::Q4_K {
                                q4k_rows::<$n>(blocks, w, a)
                            } else {
                                q6k_rows::<$n>(blocks, w, a)
                            };
                            out.copy_from_slice(&v);
                        }
                    })*
                    _ => unreachable!("1 to 8 rows"),
                }
            };
        }
        counts!(1 2 3 4 5 6 7 8);
    }

    /// Two f16 values at `at`, widened by F16C (exactly, as the portable `f16_at`): one
    /// 32-bit load, which keeps the conversion off other registers' dependency chains.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn halves(bytes: &[u8], at: usize) -> (f32, f32) {
        let bits = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let both = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
        (_mm_cvtss_f32(both), _mm_cvtss_f32(_mm_movehdup_ps(both)))
    }

    /// How far ahead of a super-block to prefetch, in bytes (as the Q8_0 kernels do).
    const PREFETCH: usize = 1024;

    /// Hints only (no fault past the end): the stream ahead of super-block `wb`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn prefetch_ahead(wb: &[u8]) {
        for line in (0..wb.len()).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(wb.as_ptr().wrapping_add(PREFETCH + line).cast());
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn q4k_rows<const N: usize>(blocks: usize, w: &[u8], a: [&[u8]; N]) -> [f32; N] {
        const WS: usize = 144;
        let mut acc = [_mm256_setzero_ps(); N];
        let mut acc_m = [_mm_setzero_ps(); N];
        for b in 0..blocks {
            let wb = &w[b * WS..(b + 1) * WS];
            prefetch_ahead(wb);
            let ((q, s), mins) = q4k_pieces(wb);
            let (wd, wmin) = halves(wb, 0);
            for r in 0..N {
                let ab = &a[r][b * Q8_K_BYTES..(b + 1) * Q8_K_BYTES];
                let yd = q8k_scale(ab);
                let sums = load(ab, 4 + QK_K);
                let pairs = _mm_hadd_epi16(
                    _mm256_castsi256_si128(sums),
                    _mm256_extracti128_si256::<1>(sums),
                );
                let prod = _mm_madd_epi16(mins, pairs);
                let dmin = _mm_set1_ps(-yd * wmin);
                acc_m[r] = _mm_fmadd_ps(dmin, _mm_cvtepi32_ps(prod), acc_m[r]);
                let mut sumi = _mm256_setzero_si256();
                for p in 0..8 {
                    let prod = _mm256_maddubs_epi16(q[p], load(ab, 4 + 32 * p));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(s[p], prod));
                }
                let d = _mm256_set1_ps(yd * wd);
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc[r]);
            }
        }
        let mut out = [0f32; N];
        for r in 0..N {
            out[r] = hsum8(acc[r]) + hsum4(acc_m[r]);
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn q6k_rows<const N: usize>(blocks: usize, w: &[u8], a: [&[u8]; N]) -> [f32; N] {
        const WS: usize = 210;
        let mut acc = [_mm256_setzero_ps(); N];
        for b in 0..blocks {
            let wb = &w[b * WS..(b + 1) * WS];
            prefetch_ahead(wb);
            let (q, s) = q6k_pieces(wb);
            let scales = _mm256_cvtepi8_epi16(load16(wb, 192));
            // the scale after the last two sub-block scales
            let wd = halves(wb, 206).1;
            for r in 0..N {
                let ab = &a[r][b * Q8_K_BYTES..(b + 1) * Q8_K_BYTES];
                // the levels' offset of 32: 32 · Σ scale·(sum of 16), two per lane
                let offset = _mm256_madd_epi16(load(ab, 4 + QK_K), scales);
                let mut sumi = _mm256_setzero_si256();
                for p in 0..8 {
                    let prod = _mm256_maddubs_epi16(q[p], load(ab, 4 + 32 * p));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(s[p], prod));
                }
                let sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32::<5>(offset));
                let d = _mm256_set1_ps(q8k_scale(ab) * wd);
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc[r]);
            }
        }
        // Q6_K has no mins: ggml's sum is the eight lanes' (plus zero, as the portable path)
        let mut out = [0f32; N];
        for r in 0..N {
            out[r] = hsum8(acc[r]) + 0.0;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::blocks::kquants::scale_min_k4;

    #[test]
    fn q4k_scales_unpack_as_get_scale_min_k4() {
        let mut s = 0x9E37_79B9u32;
        for _ in 0..200 {
            let bytes: [u8; 12] = std::array::from_fn(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 24) as u8
            });
            let sm = q4k_scales_mins(&bytes);
            for j in 0..8 {
                let got = (byte(&sm, j), byte(&sm, 8 + j));
                assert_eq!(got, scale_min_k4(j, &bytes), "{bytes:?} {j}");
            }
        }
    }
}
