//! Scalar arithmetic of the fused decode step, written to inline and vectorise into the
//! ISA-specific entry points: bf16 rounding as libtorch's, sums in a fixed lane order,
//! and branch-free exp, tanh and erf.
#[inline(always)]
pub(super) fn round(x: f32, bf16: bool) -> f32 {
    if bf16 {
        round_bf16(x)
    } else {
        x
    }
}
/// f32 → bf16 → f32, rounding to nearest even as libtorch's conversion does.
#[inline(always)]
pub(super) fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}
#[inline(always)]
pub(super) fn bf16_bits(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}
#[inline(always)]
pub(super) fn sum(xs: &[f32]) -> f32 {
    // Sixteen partial sums: vectorises, and sums in a tree like libtorch's reductions.
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    tree_sum(acc) + chunks.remainder().iter().sum::<f32>()
}
/// Σ (x − mean)², in the lane order of `sum`.
#[inline(always)]
pub(super) fn sum_sq_dev(xs: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += (v - mean) * (v - mean);
        }
    }
    let rest = chunks.remainder().iter().map(|v| (v - mean) * (v - mean));
    tree_sum(acc) + rest.sum::<f32>()
}
#[inline(always)]
pub(super) fn dot<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        // Fixed-size arrays, so that the 16 lanes become one vector operation.
        let x: &[f32; 16] = x.try_into().expect("chunks of 16");
        let y: &[T; 16] = y.try_into().expect("chunks of 16");
        let y = y.map(Elem::f32);
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    tree_sum(acc) + ra.iter().zip(rb).map(|(x, y)| x * y.f32()).sum::<f32>()
}
/// The 16 lanes summed by halves (8 + 8, 4 + 4, ...): a few vector adds, where a
/// left-to-right sum is 15 dependent scalar adds (it dominated attention's q·k).
#[inline(always)]
pub(super) fn tree_sum(mut acc: [f32; 16]) -> f32 {
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}
/// eˣ in f32 to about 1 ulp (Cephes' `expf`), without branches so loops vectorise.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(-87.3, 88.3);
    // `floor`, not `as i32`: a saturating float-to-int cast does not vectorise (it left
    // this function scalar: perf), floor is one instruction.
    let nf = (x * LOG2E + 0.5).floor();
    let z = x - nf * 0.693_359_4 + nf * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * z + 1.398_199_9e-3;
    p = p * z + 8.333_452e-3;
    p = p * z + 4.166_579_6e-2;
    p = p * z + 1.666_666_5e-1;
    p = p * z + 5.000_000_1e-1;
    p = p * z * z + z + 1.0;
    // 2ⁿ for the integer n = nf in [-126, 127]: n + 1.5·2²³ holds n in its low mantissa
    // bits, so its bits minus those of 1.5·2²³ are n (two's complement), without a cast.
    let n = (nf + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    p * f32::from_bits(n.wrapping_add(127) << 23)
}
/// tanh via eˣ: 1 − 2 / (e²ˣ + 1); for |x| < 0.05 its odd series (relative accuracy
/// near 0, where the subtraction would cancel).
#[inline(always)]
pub(super) fn tanh(x: f32) -> f32 {
    let big = 1.0 - 2.0 / (exp(2.0 * x) + 1.0);
    let x2 = x * x;
    let small = x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0)));
    if x.abs() < 0.05 {
        small
    } else {
        big
    }
}
/// erf to 1.5e-7 absolute (Abramowitz and Stegun 7.1.26, evaluated in f64).
#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    let a = (x as f64).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-a * a).exp();
    (if x < 0.0 { -y } else { y }) as f32
}
/// A cache element: f32, or bf16 stored as its bits.
pub(super) trait Elem: Copy {
    /// Whether the element is bf16 bits (else f32).
    const BF16: bool;
    fn f32(self) -> f32;
}
impl Elem for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}
impl Elem for u16 {
    const BF16: bool = true;
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn exp_and_tanh_match_std() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let (e, want) = (exp(x), x.exp());
            assert!(
                (e - want).abs() <= 2.0 * f32::EPSILON * want,
                "exp({x}) = {e}, std {want}"
            );
            let (t, want) = (tanh(x), x.tanh());
            assert!(
                (t - want).abs() <= 4.0 * f32::EPSILON,
                "tanh({x}) = {t}, std {want}"
            );
        }
        assert!(exp(-200.0) < 1e-37 && exp(200.0) > 1e38);
        // erf against libtorch's.
        let xs: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.01).collect();
        let want = Vec::<f32>::try_from(Tensor::from_slice(&xs).erf()).unwrap();
        for (x, w) in xs.iter().zip(&want) {
            assert!(
                (erf(*x) - w).abs() <= 2e-7,
                "erf({x}) = {}, libtorch {w}",
                erf(*x)
            );
        }
    }

    #[test]
    fn bf16_rounding_matches_libtorch() {
        let xs: Vec<f32> = (0..10_000)
            .map(|i| ((i as f32) * 0.7371).sin() * 10f32.powi(i % 7 - 3))
            .collect();
        let want = Vec::<f32>::try_from(
            Tensor::from_slice(&xs)
                .to_kind(Kind::BFloat16)
                .to_kind(Kind::Float),
        )
        .unwrap();
        for (x, w) in xs.iter().zip(&want) {
            assert_eq!(round_bf16(*x), *w, "{x}");
        }
    }
}
