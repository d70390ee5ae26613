//! Every path of `BlockLinear` against the portable one and the float product.
use super::*;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect()
}

/// Every path equals the portable one bit for bit, and the result is the float
/// product of the dequantized weight and activations within the rounding of the
/// activations' quantization.
#[test]
fn block_kernels_agree_across_paths_and_with_the_float_product() {
    // One row (four outputs at a time for Q4_0: 40 whole groups, 41 with a tail), a few
    // (one pair and two, the second an odd row with itself, for the 512-bit kernel),
    // and more than one pass of eight.
    let shapes = [
        (512, 40, 1),
        (512, 41, 1),
        (512, 41, 2),
        (512, 41, 3),
        (512, 40, 11),
    ];
    for (n_in, n_out, rows) in shapes {
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            let w = values(n_in * n_out, 1);
            let bytes = blocks::quantize(ty, &w, n_in, None).unwrap();
            let wq = blocks::dequantize(ty, &bytes, n_in * n_out).unwrap();
            let x = values(n_in * rows, 2);
            let bias: Vec<f32> = values(n_out, 3);
            let layer = BlockLinear::new(ty, n_in, n_out, bytes.clone(), Some(bias.clone()))
                .unwrap()
                .unwrap();
            let mut want = vec![0f32; rows * n_out];
            layer
                .with_path(DotPath::Scalar)
                .unwrap()
                .forward_rows(&x, rows, &mut want);
            for path in [DotPath::Avx2, DotPath::Vnni] {
                let Ok(l) = BlockLinear::new(ty, n_in, n_out, bytes.clone(), Some(bias.clone()))
                    .unwrap()
                    .unwrap()
                    .with_path(path)
                else {
                    continue;
                };
                let mut got = vec![0f32; rows * n_out];
                l.forward_rows(&x, rows, &mut got);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty:?} {path:?}");
            }
            for m in 0..rows {
                for n in 0..n_out {
                    let exact: f32 = (0..n_in)
                        .map(|k| x[m * n_in + k] * wq[n * n_in + k])
                        .sum::<f32>()
                        + bias[n];
                    // Activations rounded to 8 bits: |error| ≤ Σ|w|·amax/254 per block.
                    let bound: f32 =
                        (0..n_in).map(|k| wq[n * n_in + k].abs()).sum::<f32>() * 0.5 / 127.0;
                    let got = want[m * n_out + n];
                    assert!((got - exact).abs() <= bound, "{ty:?} {got} {exact} {bound}");
                }
            }
        }
    }
}

/// A row of NaN and a row too large for Q8_0's f16 scale beside good rows: the good
/// rows get what they get alone, the NaN row NaN, the large row its f32 product.
#[test]
fn a_bad_row_leaves_the_others_alone() {
    let (n_in, n_out) = (64, 12);
    for ty in [GgmlType::Q8_0, GgmlType::Q4_K] {
        let n_in = n_in * if ty == GgmlType::Q4_K { 4 } else { 1 };
        let w = values(n_in * n_out, 4);
        let bytes = blocks::quantize(ty, &w, n_in, None).unwrap();
        let layer = BlockLinear::new(ty, n_in, n_out, bytes.clone(), None)
            .unwrap()
            .unwrap();
        let good = values(n_in, 5);
        let mut big = values(n_in, 6);
        big[3] = 2e7;
        let mut nan = values(n_in, 7);
        nan[1] = f32::NAN;
        let x: Vec<f32> = [&good[..], &nan, &big, &good].concat();
        let mut y = vec![0f32; 4 * n_out];
        layer.forward_rows(&x, 4, &mut y);
        let mut alone = vec![0f32; n_out];
        layer.forward_rows(&good, 1, &mut alone);
        assert_eq!(y[..n_out], alone[..], "{ty:?}");
        assert_eq!(y[3 * n_out..], alone[..], "{ty:?}");
        assert!(y[n_out..2 * n_out].iter().all(|v| v.is_nan()), "{ty:?}");
        let wq = blocks::dequantize(ty, &bytes, n_in * n_out).unwrap();
        for n in 0..n_out {
            let exact: f32 = (0..n_in).map(|k| big[k] * wq[n * n_in + k]).sum();
            let got = y[2 * n_out + n];
            // Q8_0: the f32 product exactly; Q8_K's f32 scale holds the row, on the blocks.
            let tol = if ty == GgmlType::Q8_0 {
                0.0
            } else {
                exact.abs() * 1e-2 + 1.0
            };
            assert!(
                got.is_finite() && (got - exact).abs() <= tol,
                "{ty:?} {got} {exact}"
            );
        }
    }
}
