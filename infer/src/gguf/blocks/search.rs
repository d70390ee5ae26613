//! The scale searches of `ggml-quants.c` (`make_qx_quants`, `make_qkx2_quants`,
//! `make_qkx3_quants`, `make_qp_quants`), step for step in f32 with C's evaluation order:
//! a different order rounds differently and picks a different scale.

/// Below this, ggml treats a group as all zero (`GROUP_MAX_EPS`).
pub const GROUP_MAX_EPS: f32 = 1e-15;

/// `nearest_int`: round to nearest even through the 1.5·2²³ magic number, as ggml does (its
/// result for |x| > 4194303 is as meaningless as ggml's, and the same).
#[inline]
pub fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    (val.to_bits() as i32 & 0x007F_FFFF) - 0x0040_0000
}

/// C's `MIN(a, b)`: `a < b ? a : b`.
#[inline]
fn min_c(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

/// `make_qx_quants` with `rmse_type == 1` (the only one the types here use): a symmetric
/// scale for `L[i] ∈ [0, 2·nmax)`, weighted by `qw` or, without it, by x².
pub fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [i8], qw: Option<&[f32]>) -> f32 {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &xi in x {
        let ax = xi.abs();
        if ax > amax {
            amax = ax;
            max = xi;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let weight = |i: usize| qw.map_or(x[i] * x[i], |q| q[i]);
    let level = |iscale: f32, xi: f32| nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for (i, &xi) in x.iter().enumerate() {
            let l = level(iscale, xi) as f32;
            let w = weight(i);
            sumlx += w * xi * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let store = |iscale: f32, l_out: &mut [i8]| {
        for (li, &xi) in l_out.iter_mut().zip(x) {
            *li = (nmax + level(iscale, xi)) as i8;
        }
    };
    let iscale = -(nmax as f32) / max;
    store(iscale, l_out);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            store(iscale, l_out);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The search grid of `make_qkx2_quants`/`make_qkx3_quants`: `rmin + rdelta·is` for
/// `is` in `0..=nstep`.
#[derive(Clone, Copy)]
pub struct Grid {
    pub rmin: f32,
    pub rdelta: f32,
    pub nstep: i32,
}

/// `make_qkx2_quants` (v2) or `make_qkx3_quants` (v3) with `use_mad == false`: a scale and a
/// min (returned as `-min`, ≥ 0) for `L[i] ∈ [0, nmax]`. The two differ only where marked.
/// v3 without `weights` weights by x².
pub fn make_qkx_quants(
    v3: bool,
    nmax: i32,
    x: &[f32],
    weights: Option<&[f32]>,
    l_out: &mut [u8],
    grid: Grid,
) -> (f32, f32) {
    let n = x.len();
    let weight = |i: usize| weights.map_or(x[i] * x[i], |w| w[i]);
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weight(0);
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weight(i);
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if (v3 && max <= min) || (!v3 && max == min) {
        l_out.fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weight(i) * (diff * diff);
    }
    if grid.nstep < 1 {
        return (scale, -min);
    }
    let mut laux = [0u8; 32];
    let laux = &mut laux[..n];
    for is in 0..=grid.nstep {
        let iscale = (grid.rmin + grid.rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let v = iscale * (x[i] - min);
            let l = if !v3 {
                nearest_int(v).clamp(0, nmax)
            } else if v > 0.0 {
                // v3: min may sit at or near max, so v may be out of nearest_int's range
                nearest_int(min_c(v, nmaxf))
            } else {
                0
            };
            laux[i] = l as u8;
            let (w, l) = (weight(i), l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weight(i) * (diff * diff);
            }
            if cur_error < best_error {
                l_out.copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `make_qp_quants`: a scale for non-negative `x` (the sub-block scales or mins of a K-quant
/// super-block) with `L[i] ∈ [0, nmax]`, weighted by `quant_weights`.
pub fn make_qp_quants(nmax: i32, x: &[f32], l_out: &mut [u8], quant_weights: &[f32]) -> f32 {
    let mut max = 0f32;
    for &xi in x {
        max = if max > xi { max } else { xi };
    }
    if max < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mse = |iscale: f32, scale: f32, clamp: bool| {
        let mut mse = 0f32;
        for (&xi, &w) in x.iter().zip(quant_weights) {
            let mut l = nearest_int(iscale * xi);
            if clamp {
                l = l.min(nmax);
            } else {
                l = i32::from(l as u8); // stored to a uint8_t first
            }
            let diff = xi - scale * l as f32;
            mse += w * diff * diff;
        }
        mse
    };
    let mut iscale = nmaxf / max;
    let mut best_mse = mse(iscale, 1.0 / iscale, false);
    for is in (-4..=4).filter(|&is| is != 0) {
        let iscale_is = (0.1 * is as f32 + nmaxf) / max;
        let this = mse(iscale_is, 1.0 / iscale_is, true);
        if this < best_mse {
            best_mse = this;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for ((li, &xi), &w) in l_out.iter_mut().zip(x).zip(quant_weights) {
        let l = nearest_int(iscale * xi).min(nmax);
        *li = l as u8;
        sumlx += w * xi * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for ((li, &xi), &w) in l_out.iter_mut().zip(x).zip(quant_weights) {
            let old = f32::from(*li);
            let mut slx = sumlx - w * xi * old;
            let mut sl2 = suml2 - w * old * old;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(xi * sl2 / slx).min(nmax);
                if new_l != i32::from(*li) {
                    slx += w * xi * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *li = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        let cases = [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (3.49, 3),
            (-7.6, -8),
        ];
        for (x, want) in cases {
            assert_eq!(nearest_int(x), want, "{x}");
        }
    }
}
