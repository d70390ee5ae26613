//! ggml's 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1): `quantize_row_*_ref`, the
//! importance-weighted `quantize_row_*_impl` and `dequantize_row_*` of `ggml-quants.c`.
use super::half::{f16_at, f32_to_f16, le16};
use super::search::{make_qkx_quants, make_qx_quants, Grid};

/// Weights per block.
pub const QK: usize = 32;

/// The grid `quantize_row_q4_1_impl`/`q5_1_impl` (and the K-quants' `_impl`) search.
pub const GRID_X3: Grid = Grid {
    rmin: -0.9,
    rdelta: 0.05,
    nstep: 36,
};

/// C's `(int8_t)f` for the in-range values these blocks produce (truncation toward zero).
#[inline]
fn trunc_i8(f: f32) -> i8 {
    f as i32 as i8
}

/// The per-row σ² that the `_impl` quantizers weight by: Σx² / n, summed in order.
pub fn sigma2(row: &[f32]) -> f32 {
    let mut sum_x2 = 0f32;
    for &v in row {
        sum_x2 += v * v;
    }
    sum_x2 / row.len() as f32
}

/// `qw[j] · sqrt(σ² + x[j]²)`: the `_impl` quantizers' per-weight importance.
pub fn impl_weights(qw: &[f32], sigma2: f32, xb: &[f32], out: &mut [f32]) {
    for ((o, &q), &x) in out.iter_mut().zip(qw).zip(xb) {
        *o = q * (sigma2 + x * x).sqrt();
    }
}

/// The value of largest magnitude in a block, the first one on ties (`d = max / -nmax`).
fn signed_absmax(xb: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in xb {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(xb: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in xb {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Packs 32 levels of up to 5 bits: the low nibbles pairwise (`j`, `j + 16`) into 16 bytes,
/// and, when `qh` is given, the fifth bits into a little-endian u32.
fn pack_nibbles(levels: &[u8; QK], with_qh: bool, out: &mut Vec<u8>) {
    if with_qh {
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            qh |= u32::from((levels[j] & 0x10) >> 4) << j;
            qh |= u32::from((levels[j + 16] & 0x10) >> 4) << (j + QK / 2);
        }
        out.extend(qh.to_le_bytes());
    }
    out.extend((0..QK / 2).map(|j| (levels[j] & 0x0F) | ((levels[j + 16] & 0x0F) << 4)));
}

/// `quantize_row_q4_0_ref` (`nmax` 8) or `quantize_row_q5_0_ref` (`nmax` 16) of one block.
fn q_0_ref(xb: &[f32], nmax: i32, out: &mut Vec<u8>) {
    let d = signed_absmax(xb) / -(nmax as f32);
    let id = inverse(d);
    out.extend(f32_to_f16(d).to_le_bytes());
    let top = (2 * nmax - 1) as i8;
    let bias = nmax as f32 + 0.5;
    let mut levels = [0u8; QK];
    for (l, &x) in levels.iter_mut().zip(xb) {
        *l = trunc_i8(x * id + bias).min(top) as u8;
    }
    pack_nibbles(&levels, nmax == 16, out);
}

/// `quantize_row_q4_1_ref` (`nmax` 15) or `quantize_row_q5_1_ref` (`nmax` 31) of one block.
fn q_1_ref(xb: &[f32], nmax: i32, out: &mut Vec<u8>) {
    let (min, max) = min_max(xb);
    let d = (max - min) / nmax as f32;
    let id = inverse(d);
    out.extend(f32_to_f16(d).to_le_bytes());
    out.extend(f32_to_f16(min).to_le_bytes());
    let mut levels = [0u8; QK];
    for (l, &x) in levels.iter_mut().zip(xb) {
        let v = (x - min) * id + 0.5;
        // q4_1 clamps its int8_t to 15; q5_1 converts to uint8_t unclamped
        *l = if nmax == 15 {
            trunc_i8(v).min(15) as u8
        } else {
            v as i32 as u8
        };
    }
    pack_nibbles(&levels, nmax == 31, out);
}

/// `quantize_row_q4_0_impl`/`q5_0_impl` for one block, given its importance weights.
fn q_0_impl(xb: &[f32], weight: &[f32], nmax: i32, out: &mut Vec<u8>) {
    let mut l = [0i8; QK];
    let d = make_qx_quants(nmax, xb, &mut l, Some(weight));
    out.extend(f32_to_f16(d).to_le_bytes());
    pack_nibbles(&l.map(|v| v as u8), nmax == 16, out);
}

/// `quantize_row_q4_1_impl`/`q5_1_impl` for one block, given its importance weights.
fn q_1_impl(xb: &[f32], weight: &[f32], nmax: i32, out: &mut Vec<u8>) {
    let mut l = [0u8; QK];
    let (d, min) = make_qkx_quants(true, nmax, xb, Some(weight), &mut l, GRID_X3);
    out.extend(f32_to_f16(d).to_le_bytes());
    out.extend(f32_to_f16(-min).to_le_bytes());
    pack_nibbles(&l, nmax == 31, out);
}

/// Which of the four 4/5-bit block types, by its `nmax` in the `_impl` search.
#[derive(Clone, Copy)]
pub enum Legacy {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
}

/// One row of a 4/5-bit type: `_ref` without importance, `_impl` with it (σ² over the row).
pub fn quantize_row(kind: Legacy, row: &[f32], importance: Option<&[f32]>, out: &mut Vec<u8>) {
    let (symmetric, nmax) = match kind {
        Legacy::Q4_0 => (true, 8),
        Legacy::Q5_0 => (true, 16),
        Legacy::Q4_1 => (false, 15),
        Legacy::Q5_1 => (false, 31),
    };
    let Some(qw) = importance else {
        for xb in row.chunks_exact(QK) {
            match symmetric {
                true => q_0_ref(xb, nmax, out),
                false => q_1_ref(xb, nmax, out),
            }
        }
        return;
    };
    let s2 = sigma2(row);
    let mut weight = [0f32; QK];
    for (xb, qb) in row.chunks_exact(QK).zip(qw.chunks_exact(QK)) {
        impl_weights(qb, s2, xb, &mut weight);
        match symmetric {
            true => q_0_impl(xb, &weight, nmax, out),
            false => q_1_impl(xb, &weight, nmax, out),
        }
    }
}

/// `quantize_row_q8_0_ref` (and, with `with_sum`, `quantize_row_q8_1_ref`, whose block also
/// carries `s = fp16(d·Σq)`) of one block.
pub fn q8_block(xb: &[f32], with_sum: bool, out: &mut Vec<u8>) {
    let mut amax = 0f32;
    for &v in xb {
        let a = v.abs();
        amax = if amax > a { amax } else { a };
    }
    let d = amax / 127.0;
    let id = inverse(d);
    out.extend(f32_to_f16(d).to_le_bytes());
    let qs: [i8; QK] = std::array::from_fn(|j| (xb[j] * id).round() as i8);
    if with_sum {
        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        out.extend(f32_to_f16(sum as f32 * d).to_le_bytes());
    }
    out.extend(qs.map(|q| q as u8));
}

/// The 32 levels of a 4/5-bit block: `q - 8`/`q - 16` for the symmetric types, `q` (0..31)
/// for the ones with a min, as `dequantize_row_*` and the `vec_dot_*` kernels read them.
pub(crate) fn levels(kind: Legacy, b: &[u8]) -> [i8; QK] {
    let (qh, qs, offset) = match kind {
        Legacy::Q4_0 => (0, &b[2..], 8),
        Legacy::Q5_0 => (qh_at(b, 2), &b[6..], 16),
        Legacy::Q4_1 => (0, &b[4..], 0),
        Legacy::Q5_1 => (qh_at(b, 4), &b[8..], 0),
    };
    std::array::from_fn(|i| {
        let nibble = match i < QK / 2 {
            true => qs[i] & 0x0F,
            false => qs[i - QK / 2] >> 4,
        };
        (nibble | (((qh >> i) & 1) << 4) as u8) as i8 - offset
    })
}

/// `dequantize_row_q4_0/q4_1/q5_0/q5_1` of one block. `b` is one whole block of the
/// type's `type_size` bytes (`blocks::dequantize` cuts them): the fixed offsets are in range.
pub fn dequantize_block(kind: Legacy, b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = match kind {
        Legacy::Q4_1 | Legacy::Q5_1 => Some(f16_at(b, 2)),
        Legacy::Q4_0 | Legacy::Q5_0 => None,
    };
    for (yj, &l) in y.iter_mut().zip(&levels(kind, b)) {
        let v = f32::from(l) * d;
        *yj = m.map_or(v, |m| v + m);
    }
}

fn qh_at(b: &[u8], at: usize) -> u32 {
    u32::from(le16(b, at)) | (u32::from(le16(b, at + 2)) << 16)
}

/// `dequantize_row_q8_0` of one block (one whole block, cut by `blocks::dequantize`: the
/// fixed offsets are in range).
pub fn dequantize_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..2 + QK]) {
        *yj = f32::from(q as i8) * d;
    }
}
