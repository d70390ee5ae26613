//! ggml's K-quant super-blocks of 256 weights (Q4_K, Q5_K, Q6_K): `quantize_row_q*_K_ref`,
//! the importance-weighted `quantize_row_q*_K_impl` and `dequantize_row_q*_K` of
//! `ggml-quants.c`.
use super::half::{f16_at, f16_to_f32, f32_to_f16};
use super::legacy::{impl_weights, GRID_X3};
use super::search::GROUP_MAX_EPS;
use super::search::{make_qkx_quants, make_qp_quants, make_qx_quants, nearest_int, Grid};
use crate::gguf::types::{GgmlType, QK_K};

/// One row of a K-quant type: `_ref` without importance, `_impl` with it.
pub fn quantize_row(ty: GgmlType, row: &[f32], importance: Option<&[f32]>, out: &mut Vec<u8>) {
    for (i, xb) in row.chunks_exact(QK_K).enumerate() {
        let qw = importance.map(|w| &w[i * QK_K..(i + 1) * QK_K]);
        match ty {
            GgmlType::Q4_K => q45_k(xb, qw, 15, out),
            GgmlType::Q5_K => q45_k(xb, qw, 31, out),
            GgmlType::Q6_K => q6_k(xb, qw, out),
            _ => unreachable!("{} is not a K-quant handled here", ty.name()),
        }
    }
}

/// `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` from the 12 packed bytes.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Packs eight 6-bit scales and mins into ggml's 12 bytes.
fn pack_scales(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (ls[j], lm[j]);
        if j < 4 {
            s[j] = ls;
            s[j + 4] = lm;
        } else {
            s[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            s[j - 4] |= (ls >> 4) << 6;
            s[j] |= (lm >> 4) << 6;
        }
    }
    s
}

/// The sub-block scales and mins of `quantize_row_q4_K_ref`/`q5_K_ref`, quantized to 6 bits
/// against their maxima, with the super-block's d and dmin.
fn ref_scales(scales: &[f32; 8], mins: &[f32; 8]) -> ([u8; 8], [u8; 8], f32, f32) {
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for j in 0..8 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let ls = scales.map(|s| (nearest_int(inv_scale * s) as u8).min(63));
    let lm = mins.map(|m| (nearest_int(inv_min * m) as u8).min(63));
    (ls, lm, max_scale / 63.0, max_min / 63.0)
}

/// `quantize_row_q4_K_ref`/`_impl` (`nmax` 15) and `quantize_row_q5_K_ref`/`_impl` (31) of
/// one super-block.
fn q45_k(x: &[f32], qw: Option<&[f32]>, nmax: i32, out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [0f32; 32];
    let (ls, lm, d, dmin) = match qw {
        None => {
            let grid = match nmax {
                15 => Grid {
                    rmin: -1.0,
                    rdelta: 0.1,
                    nstep: 20,
                },
                _ => Grid {
                    rmin: -0.5,
                    rdelta: 0.1,
                    nstep: 15,
                },
            };
            for j in 0..8 {
                let xs = &x[32 * j..32 * j + 32];
                let mut sum_x2 = 0f32;
                for &v in xs {
                    sum_x2 += v * v;
                }
                let av_x = (sum_x2 / 32.0).sqrt();
                for (w, &v) in weights.iter_mut().zip(xs) {
                    *w = av_x + v.abs();
                }
                let lj = &mut l[32 * j..32 * j + 32];
                (scales[j], mins[j]) = make_qkx_quants(false, nmax, xs, Some(&weights), lj, grid);
            }
            ref_scales(&scales, &mins)
        }
        Some(qw) => {
            let mut sum_x2 = 0f32;
            for &v in x {
                sum_x2 += v * v;
            }
            let sigma2 = 2.0 * sum_x2 / QK_K as f32;
            let mut sw = [0f32; 8];
            for j in 0..8 {
                let xs = &x[32 * j..32 * j + 32];
                impl_weights(&qw[32 * j..32 * j + 32], sigma2, xs, &mut weights);
                for &w in &weights {
                    sw[j] += w;
                }
                let lj = &mut l[32 * j..32 * j + 32];
                (scales[j], mins[j]) = make_qkx_quants(true, nmax, xs, Some(&weights), lj, GRID_X3);
            }
            let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
            let d = make_qp_quants(63, &scales, &mut ls, &sw);
            let m = make_qp_quants(63, &mins, &mut lm, &sw);
            (ls.map(|v| v.min(63)), lm.map(|v| v.min(63)), d, m)
        }
    };
    let packed = pack_scales(&ls, &lm);
    let (d16, dmin16) = (f32_to_f16(d), f32_to_f16(dmin));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let d = f16_to_f32(d16) * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = f16_to_f32(dmin16) * f32::from(m);
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    out.extend(d16.to_le_bytes());
    out.extend(dmin16.to_le_bytes());
    out.extend(packed);
    if nmax == 31 {
        let mut qh = [0u8; 32];
        for (n, chunk) in l.chunks_exact(64).enumerate() {
            for j in 0..32 {
                qh[j] |= ((chunk[j] >> 4) << (2 * n)) | ((chunk[j + 32] >> 4) << (2 * n + 1));
            }
        }
        out.extend(qh);
    }
    for chunk in l.chunks_exact(64) {
        out.extend((0..32).map(|j| (chunk[j] & 0xF) | ((chunk[j + 32] & 0xF) << 4)));
    }
}

/// `quantize_row_q6_K_ref` (weighted by x²) or `_impl` (weighted by the importance) of one
/// super-block.
fn q6_k(x: &[f32], qw: Option<&[f32]>, out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let mut max_scale = 0f32;
    let mut max_abs_scale = 0f32;
    for (ib, slot) in scales.iter_mut().enumerate() {
        let sub = 16 * ib..16 * ib + 16;
        let w = qw.map(|q| &q[sub.clone()]);
        let scale = make_qx_quants(32, &x[sub.clone()], &mut l[sub], w);
        *slot = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend([0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d16 = f32_to_f16(1.0 / iscale);
    let sc: [i8; 16] = scales.map(|s| nearest_int(iscale * s).min(127) as i8);
    for j in 0..16 {
        let d = f16_to_f32(d16) * f32::from(sc[j]);
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / d).clamp(-32, 31) + 32) as i8;
        }
    }
    let l = l.map(|v| v as u8);
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (h, chunk) in l.chunks_exact(128).enumerate() {
        for i in 0..32 {
            let q = [chunk[i], chunk[i + 32], chunk[i + 64], chunk[i + 96]];
            ql[64 * h + i] = (q[0] & 0xF) | ((q[2] & 0xF) << 4);
            ql[64 * h + i + 32] = (q[1] & 0xF) | ((q[3] & 0xF) << 4);
            qh[32 * h + i] =
                (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.map(|v| v as u8));
    out.extend(d16.to_le_bytes());
}

/// The 256 levels of a Q4_K (`five` false) or Q5_K super-block, 0..15 or 0..31, in weight
/// order, as `dequantize_row_q4_K/q5_K` and the `vec_dot_*` kernels read them.
pub(crate) fn q45k_levels(b: &[u8], five: bool) -> [u8; QK_K] {
    let (qh, qs) = if five {
        (&b[16..48], &b[48..176])
    } else {
        (&b[..0], &b[16..144])
    };
    std::array::from_fn(|i| {
        // sub-block j = i / 32 holds the low (j even) or high nibbles of 32 bytes, and
        // bit j of each qh byte
        let (j, l) = (i / 32, i % 32);
        let q = qs[32 * (j / 2) + l];
        let nibble = if j % 2 == 0 { q & 0xF } else { q >> 4 };
        nibble + if five { ((qh[l] >> j) & 1) << 4 } else { 0 }
    })
}

/// The 256 levels of a Q6_K super-block, -32..31, in weight order.
pub(crate) fn q6k_levels(b: &[u8]) -> [i8; QK_K] {
    let (ql, qh) = (&b[..128], &b[128..192]);
    std::array::from_fn(|i| {
        // half h of 128 weights; within it, quarter k of 32 weights at offset l
        let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
        let low = ql[64 * h + l + 32 * (k % 2)] >> (4 * (k / 2));
        let high = (qh[32 * h + l] >> (2 * k)) & 3;
        ((low & 0xF) | (high << 4)) as i8 - 32
    })
}

/// `dequantize_row_q4_K/q5_K/q6_K` of one super-block. `b` is one whole block of `ty`'s
/// `type_size` bytes (`blocks::dequantize` cuts them): the fixed offsets are in range.
pub fn dequantize_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    if ty == GgmlType::Q6_K {
        let d = f16_at(b, 208);
        let sc = &b[192..208];
        for (i, (yi, &q)) in y.iter_mut().zip(&q6k_levels(b)).enumerate() {
            *yi = d * f32::from(sc[i / 16] as i8) * f32::from(q);
        }
        return;
    }
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let levels = q45k_levels(b, ty == GgmlType::Q5_K);
    for (j, (yj, lj)) in y
        .chunks_exact_mut(32)
        .zip(levels.chunks_exact(32))
        .enumerate()
    {
        let (sc, m) = scale_min_k4(j, &b[4..16]);
        let (dj, mj) = (d * f32::from(sc), min * f32::from(m));
        for (yi, &q) in yj.iter_mut().zip(lj) {
            *yi = dj * f32::from(q) - mj;
        }
    }
}
