//! The choice of a token from a step's processed scores on the CPU. Greedy: each row's
//! first maximal token and its log-softmax, what libtorch's `argmax` and
//! `log_softmax(…).gather` give; for sampled tokens, their log-softmax alone.
//! Those are passes over the (rows × vocab) scores plus a tensor of log-probs the size
//! of the scores (with the processors, 3.5 ms of a batch-8 step at gpt2's 50257
//! tokens); here it is one vectorised pass for the maximum and one for the sum of
//! exponentials. The same pass finds the rows with no token to pick (every score -inf,
//! or a NaN or +inf), before libtorch's `multinomial` would throw on them.
use tch::{Device, Kind, Tensor};

use super::math::{exp, tree_sum};
use super::Simd;

/// Why a row of scores offers no token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRow {
    /// Every score is -inf: the processors banned every token.
    Banned,
    /// A score is NaN or +inf.
    NotFinite,
}

/// Each row's maximum and ln Σ exp(x − max) of a 2-D CPU Float tensor of scores, or why
/// the row has no token to pick.
pub struct Rows {
    s: Tensor,
    v: usize,
    rows: Vec<Result<(f32, f32), BadRow>>,
}

impl Rows {
    /// One pass over `scores` (R, V); `None` unless it is a CPU Float tensor with R, V > 0
    /// (the caller then takes libtorch's ops and `bad_rows`).
    pub fn scan(scores: &Tensor) -> Option<Rows> {
        let (r, v) = scores.size2().ok()?;
        if scores.device() != Device::Cpu || scores.kind() != Kind::Float || r == 0 || v == 0 {
            return None;
        }
        let s = scores.contiguous();
        let v = v as usize;
        let rows = Self::slice(&s, r as usize * v)
            .chunks_exact(v)
            .map(|row| {
                let (m, sum) = max_and_sum_dispatch(row);
                // A NaN anywhere, +inf (inf − inf) or a row of -inf all make the sum NaN.
                if sum.is_finite() {
                    Ok((m, sum.ln()))
                } else {
                    Err(classify(m, row))
                }
            })
            .collect();
        Some(Rows { s, v, rows })
    }

    fn slice(s: &Tensor, n: usize) -> &[f32] {
        // SAFETY: `s` is a contiguous Float CPU tensor of n > 0 elements that `Rows`
        // owns and never writes; the slice borrows it.
        unsafe { std::slice::from_raw_parts(s.data_ptr() as *const f32, n) }
    }

    fn row(&self, r: usize) -> &[f32] {
        &Self::slice(&self.s, self.rows.len() * self.v)[r * self.v..(r + 1) * self.v]
    }

    /// Rows with no token to pick, and why.
    pub fn bad(&self) -> Vec<(usize, BadRow)> {
        bad_of(self.rows.iter().map(|r| r.err()))
    }

    /// Per row, the first index of its maximum and that entry's log-softmax,
    /// ln(1 / Σ exp(x − max)) computed in f32 as libtorch's `log_softmax` does (the
    /// exponentials' sum in another order: within a few ulps). A bad row gives token 0
    /// and NaN.
    pub fn greedy(&self) -> (Vec<i64>, Vec<f64>) {
        (0..self.rows.len())
            .map(|r| match self.rows[r] {
                Ok((m, ln_sum)) => {
                    let row = self.row(r);
                    let i = row.iter().position(|&x| x == m).unwrap_or(0);
                    (i as i64, ((row[i] - m) - ln_sum) as f64)
                }
                Err(_) => (0, f64::NAN),
            })
            .unzip()
    }

    /// The log-softmax of token `tokens[r]` in each row r (chosen elsewhere: sampling
    /// keeps libtorch's `multinomial`, whose draws for a seed are transformers' own);
    /// NaN for a bad row or a token outside the row. `None` if the lengths differ.
    pub fn logprobs(&self, tokens: &[i64]) -> Option<Vec<f64>> {
        if tokens.len() != self.rows.len() {
            return None;
        }
        Some(
            tokens
                .iter()
                .enumerate()
                .map(|(r, &t)| match (self.rows[r], usize::try_from(t)) {
                    (Ok((m, ln_sum)), Ok(t)) if t < self.v => {
                        ((self.row(r)[t] - m) - ln_sum) as f64
                    }
                    _ => f64::NAN,
                })
                .collect(),
        )
    }
}

/// Why a row whose maximum (NaN-blind) is `m` and whose sum of exponentials is not
/// finite has no token: NaN or +inf somewhere, else every score is -inf.
fn classify(m: f32, row: &[f32]) -> BadRow {
    if m == f32::NEG_INFINITY && !row.iter().any(|x| x.is_nan()) {
        BadRow::Banned
    } else {
        BadRow::NotFinite
    }
}

fn bad_of(rows: impl Iterator<Item = Option<BadRow>>) -> Vec<(usize, BadRow)> {
    rows.enumerate()
        .filter_map(|(i, b)| b.map(|b| (i, b)))
        .collect()
}

/// The rows of `scores` (R, V), on any device, with no token to pick: `Rows::scan`'s
/// pass on the CPU, else one libtorch reduction (the maximum, which propagates NaN).
pub fn bad_rows(scores: &Tensor) -> Vec<(usize, BadRow)> {
    if let Some(rows) = Rows::scan(scores) {
        return rows.bad();
    }
    let Ok(max) = scores
        .f_amax([-1].as_slice(), false)
        .and_then(|m| m.f_to_kind(Kind::Double))
        .and_then(|m| m.f_to_device(Device::Cpu))
        .and_then(|m| Vec::<f64>::try_from(m.reshape([-1])).map_err(Into::into))
    else {
        return Vec::new();
    };
    bad_of_max(&max)
}

/// The rows without a token, from each row's maximum score (libtorch's `amax`, which
/// propagates NaN): NaN or +inf, or every score -inf.
pub fn bad_of_max(max: &[f64]) -> Vec<(usize, BadRow)> {
    bad_of(max.iter().map(|&m| {
        if m.is_nan() || m == f64::INFINITY {
            Some(BadRow::NotFinite)
        } else if m == f64::NEG_INFINITY {
            Some(BadRow::Banned)
        } else {
            None
        }
    }))
}

/// Per row of `scores` (R, V), a CPU Float tensor: the first index of its maximum and
/// that entry's log-softmax (see `Rows::greedy`). `None` where this path does not apply
/// (another device or dtype) or a row has no token (see `BadRow`).
pub fn greedy(scores: &Tensor) -> Option<(Vec<i64>, Vec<f64>)> {
    let rows = Rows::scan(scores)?;
    rows.bad().is_empty().then(|| rows.greedy())
}

/// Per row of `scores` (R, V), a CPU Float tensor: the log-softmax of token `tokens[r]`.
/// `None` where this path does not apply (as `greedy`).
pub fn logprobs(scores: &Tensor, tokens: &[i64]) -> Option<Vec<f64>> {
    let rows = Rows::scan(scores)?;
    let lp = rows.logprobs(tokens)?;
    lp.iter().all(|x| x.is_finite()).then_some(lp)
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

    #[test]
    fn rows_with_no_token_are_found_and_told_apart() {
        let ninf = f32::NEG_INFINITY;
        let s = Tensor::from_slice(&[
            0f32,
            1.0,
            2.0, // fine
            ninf,
            ninf,
            ninf, // every token banned
            0.0,
            f32::NAN,
            1.0, // NaN
            ninf,
            f32::INFINITY,
            0.0, // +inf
            ninf,
            f32::NAN,
            ninf, // NaN among banned tokens
        ])
        .view([5, 3]);
        let want = vec![
            (1, BadRow::Banned),
            (2, BadRow::NotFinite),
            (3, BadRow::NotFinite),
            (4, BadRow::NotFinite),
        ];
        let rows = Rows::scan(&s).unwrap();
        assert_eq!(rows.bad(), want);
        let (idx, lp) = rows.greedy();
        assert_eq!(idx[0], 2);
        assert!(lp[0].is_finite() && lp[1].is_nan());
        assert_eq!(bad_rows(&s), want);
        // libtorch's reduction (any tensor the CPU pass does not take) says the same.
        assert_eq!(bad_rows(&s.to_kind(Kind::Double)), want);
        assert!(bad_rows(&s.narrow(0, 0, 1)).is_empty());
    }
}
