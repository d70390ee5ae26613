//! The choice of a token from a step's processed scores on the CPU. Greedy: each row's
//! first maximal token and its log-softmax, what libtorch's `argmax` and
//! `log_softmax(…).gather` give; for sampled tokens, their log-softmax alone.
//! Those are passes over the (rows × vocab) scores plus a tensor of log-probs the size
//! of the scores (with the processors, 3.5 ms of a batch-8 step at gpt2's 50257
//! tokens); here it is one vectorised pass for the maximum and one for the sum of
//! exponentials.
use tch::{Device, Kind, Tensor};

use super::math::{exp, tree_sum};
use super::Simd;

/// Per row of `scores` (R, V), a CPU Float tensor: the first index of its maximum and
/// that entry's log-softmax, ln(1 / Σ exp(x − max)) computed in f32 as libtorch's
/// `log_softmax` does (the exponentials' sum in another order: within a few ulps).
/// `None` where this path does not apply (another device or dtype, a NaN or +inf score,
/// a row of -inf): the caller takes libtorch's ops, which define those cases.
pub fn greedy(scores: &Tensor) -> Option<(Vec<i64>, Vec<f64>)> {
    let picked = per_row(scores, |_, row, m| {
        let i = row.iter().position(|&x| x == m)?;
        Some((i as i64, row[i]))
    })?;
    Some(picked.into_iter().unzip())
}

/// Per row of `scores` (R, V), a CPU Float tensor: the log-softmax of token `tokens[r]`
/// (chosen elsewhere: sampling keeps libtorch's `multinomial`, whose draws for a seed
/// are transformers' own). `None` where this path does not apply (as `greedy`).
pub fn logprobs(scores: &Tensor, tokens: &[i64]) -> Option<Vec<f64>> {
    if scores.size().first() != Some(&(tokens.len() as i64)) {
        return None;
    }
    let picked = per_row(scores, |r, row, _| {
        let t = tokens[r];
        Some((t, *row.get(usize::try_from(t).ok()?)?))
    })?;
    Some(picked.into_iter().map(|(_, lp)| lp).collect())
}

/// For each row r of `scores` (a 2-D CPU Float tensor), `pick(r, row, max)` chooses a
/// token and returns it with its score x; the result pairs it with its log-softmax
/// (x − max) − ln Σ exp(row − max), in f32 as libtorch's `log_softmax`. `None` when
/// `scores` is not such a tensor, a row's sum is not finite (a NaN, +inf, or every
/// score -inf) or `pick` declines.
fn per_row(
    scores: &Tensor,
    mut pick: impl FnMut(usize, &[f32], f32) -> Option<(i64, f32)>,
) -> Option<Vec<(i64, f64)>> {
    let (r, v) = scores.size2().ok()?;
    if scores.device() != Device::Cpu || scores.kind() != Kind::Float || r == 0 || v == 0 {
        return None;
    }
    let s = scores.contiguous();
    // SAFETY: `s` is a contiguous Float CPU tensor of r·v > 0 elements, alive and not
    // written to until the slice's last use at the end of this function.
    let xs = unsafe { std::slice::from_raw_parts(s.data_ptr() as *const f32, (r * v) as usize) };
    let mut out = Vec::with_capacity(r as usize);
    for (i, row) in xs.chunks_exact(v as usize).enumerate() {
        let (m, sum) = max_and_sum_dispatch(row);
        // A NaN anywhere, +inf (inf − inf) or a row of -inf all make the sum NaN.
        if !sum.is_finite() {
            return None;
        }
        let (token, x) = pick(i, row, m)?;
        out.push((token, ((x - m) - sum.ln()) as f64));
    }
    Some(out)
}

fn max_and_sum_dispatch(row: &[f32]) -> (f32, f32) {
    match Simd::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Simd::detect` saw avx512f on this CPU.
        Simd::Avx512 => unsafe { max_and_sum_avx512(row) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Simd::detect` saw avx2 and fma on this CPU.
        Simd::Avx2 => unsafe { max_and_sum_avx2(row) },
        _ => max_and_sum(row),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_and_sum_avx512(row: &[f32]) -> (f32, f32) {
    max_and_sum(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn max_and_sum_avx2(row: &[f32]) -> (f32, f32) {
    max_and_sum(row)
}

/// The row's maximum (NaN-blind) and Σ exp(x − max): NaN if any x is NaN or the
/// maximum is infinite.
#[inline(always)]
fn max_and_sum(row: &[f32]) -> (f32, f32) {
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    let mut mx = [f32::NEG_INFINITY; 16];
    for c in chunks.clone() {
        let c: &[f32; 16] = c.try_into().expect("chunks of 16");
        for i in 0..16 {
            mx[i] = if c[i] > mx[i] { c[i] } else { mx[i] };
        }
    }
    let m = rest
        .iter()
        .chain(&mx)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut acc = [0f32; 16];
    for c in chunks {
        let c: &[f32; 16] = c.try_into().expect("chunks of 16");
        for i in 0..16 {
            acc[i] += exp(c[i] - m);
        }
    }
    // A NaN x passes through `exp` (its clamp keeps NaN), as does x − m for m = ±inf.
    (
        m,
        tree_sum(acc) + rest.iter().map(|&x| exp(x - m)).sum::<f32>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_matches_libtorch() {
        tch::manual_seed(0);
        for v in [1, 15, 16, 17, 1000, 50257] {
            let s = Tensor::randn([3, v], (Kind::Float, Device::Cpu)) * 4.0;
            if v > 20 {
                // Masked tokens, and a tie for the maximum (the first one wins).
                let _ = s.narrow(1, 3, 5).fill_(f64::NEG_INFINITY);
                let top = s.get(1).max();
                let _ = s.get(1).narrow(0, 7, 1).copy_(&top.unsqueeze(0));
                let _ = s.get(1).narrow(0, v - 2, 1).copy_(&top.unsqueeze(0));
            }
            let (idx, logp) = greedy(&s).expect("finite scores");
            let want_idx = Vec::<i64>::try_from(s.argmax(-1, false)).unwrap();
            let want_logp = Vec::<f64>::try_from(
                s.log_softmax(-1, Kind::Float)
                    .gather(1, &s.argmax(-1, true), false)
                    .view([-1])
                    .to_kind(Kind::Double),
            )
            .unwrap();
            assert_eq!(idx, want_idx, "v = {v}");
            assert_eq!(logprobs(&s, &idx), Some(logp.clone()), "v = {v}");
            for (a, b) in logp.iter().zip(&want_logp) {
                // f32 sums of up to 50257 terms in another order.
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "v = {v}: {a} vs {b}"
                );
            }
        }
        // Rows libtorch defines differently: NaN is argmax's maximum; all -inf gives NaN.
        let nan = Tensor::from_slice(&[0f32, f32::NAN, 1.0]).view([1, 3]);
        assert!(greedy(&nan).is_none());
        let inf = Tensor::from_slice(&[0f32, f32::INFINITY, 1.0]).view([1, 3]);
        assert!(greedy(&inf).is_none());
        let masked = Tensor::from_slice(&[f32::NEG_INFINITY; 3]).view([1, 3]);
        assert!(greedy(&masked).is_none());
    }
}
