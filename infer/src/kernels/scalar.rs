//! Portable kernels for CPUs without AVX2, over the same packed layout. Written so that
//! the compiler vectorizes the 16-column inner loop with whatever the target baseline
//! has (SSE2 on x86-64, NEON on aarch64); still one pass over W for up to 8 rows.
use super::qtile::{dequant, QTile};
use super::{Tile, WeightFormat, MAX_ROWS, PANEL};

/// # Safety
/// `t` satisfies `Tile`'s field contracts: slice lengths as stated, and `y` writable for
/// `rows` rows of `cols` columns at stride `ldy`, by this thread alone.
pub(super) unsafe fn run(t: &Tile, format: WeightFormat) {
    let rows = t.rows;
    for p in 0..t.n_panels {
        let panel = &t.w[p * t.lines_per_panel..(p + 1) * t.lines_per_panel];
        let mut bias = [0.0f32; PANEL];
        bias.copy_from_slice(&t.bias[p * PANEL..(p + 1) * PANEL]);
        let mut acc = [bias; MAX_ROWS];
        match format {
            WeightFormat::F32 => {
                for (i, line) in panel.iter().enumerate() {
                    let w = line.0.map(f32::from_bits);
                    add_row(&mut acc[..rows], &w, t.x, t.k, i);
                }
            }
            WeightFormat::Int8 => {
                for (l, line) in panel.iter().enumerate() {
                    let mut bytes = [0u8; 64];
                    for (j, v) in line.0.iter().enumerate() {
                        bytes[4 * j..4 * j + 4].copy_from_slice(&v.to_le_bytes());
                    }
                    for i in 0..4 {
                        if 4 * l + i >= t.k {
                            break;
                        }
                        let mut w = [0f32; PANEL];
                        for (c, w) in w.iter_mut().enumerate() {
                            *w = bytes[16 * i + c] as i8 as f32;
                        }
                        add_row(&mut acc[..rows], &w, t.x, t.k, 4 * l + i);
                    }
                }
            }
            WeightFormat::Int8Dynamic => unreachable!("Int8Dynamic runs `int8_dynamic`"),
            WeightFormat::Bf16 => {
                for (l, line) in panel.iter().enumerate() {
                    let lo = line.0.map(|v| f32::from_bits(v << 16));
                    add_row(&mut acc[..rows], &lo, t.x, t.k, 2 * l);
                    // The odd half of the last line is padding when k is odd.
                    if 2 * l + 1 < t.k {
                        let hi = line.0.map(|v| f32::from_bits(v & 0xffff_0000));
                        add_row(&mut acc[..rows], &hi, t.x, t.k, 2 * l + 1);
                    }
                }
            }
        }
        let cols = t.panel_cols(p);
        for (r, a) in acc[..rows].iter().enumerate() {
            // SAFETY: y row r, columns p*16 .. p*16 + cols, lie in this tile and belong
            // to this thread alone (this function's contract).
            unsafe {
                let y = t.y.add(r * t.ldy + p * PANEL);
                std::ptr::copy_nonoverlapping(a.as_ptr(), y, cols);
            }
        }
    }
}

/// The Int8Dynamic kernel: the same integers as `vpdpbusd` (u8 activations times i8
/// weights, 4 per lane, wrapping i32 sums), then `qtile::dequant`.
///
/// # Safety
/// `t` satisfies `QTile`'s field contracts: slice lengths as stated, and `y` writable for
/// `rows` rows of `cols` columns at stride `ldy`, by this thread alone.
pub(super) unsafe fn int8_dynamic(t: &QTile) {
    let (rows, lpp) = (t.rows, t.lines_per_panel);
    for p in 0..t.n_panels {
        let panel = &t.w[p * lpp..(p + 1) * lpp];
        let mut acc = [[0i32; PANEL]; MAX_ROWS];
        for (l, line) in panel.iter().enumerate() {
            let w = line.0.map(|v| v.to_le_bytes().map(|b| b as i8 as i32));
            for (r, a) in acc[..rows].iter_mut().enumerate() {
                let u = &t.xq[r * 4 * lpp + 4 * l..][..4];
                for (a, w) in a.iter_mut().zip(&w) {
                    let dot: i32 = u.iter().zip(w).map(|(&u, &w)| u as i32 * w).sum();
                    *a = a.wrapping_add(dot);
                }
            }
        }
        let c0 = p * PANEL;
        let cols = t.panel_cols(p);
        for (r, a) in acc[..rows].iter().enumerate() {
            for (c, &sum) in a[..cols].iter().enumerate() {
                let v = dequant(
                    sum,
                    t.corr[c0 + c],
                    t.sx[r],
                    t.scale[c0 + c],
                    t.bias[c0 + c],
                );
                // SAFETY: y row r, column p*16 + c < p*16 + cols, lies in this tile and
                // belongs to this thread alone (this function's contract).
                unsafe { *t.y.add(r * t.ldy + c0 + c) = v };
            }
        }
    }
}

/// acc[r] += w · x[r, i] for every row r.
#[inline(always)]
fn add_row(acc: &mut [[f32; PANEL]], w: &[f32; PANEL], x: &[f32], k: usize, i: usize) {
    for (r, a) in acc.iter_mut().enumerate() {
        let xv = x[r * k + i];
        for (a, w) in a.iter_mut().zip(w) {
            *a += w * xv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Line;

    #[test]
    fn line_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Line>(), 64);
        assert_eq!(std::mem::align_of::<Line>(), 64);
    }
}
