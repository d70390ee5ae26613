//! Token choice in one place: how a token is picked from a step's processed scores
//! (`Sampling`), the one chooser (`choose`) that picks one token per row and gives its
//! log-probability under those scores, and its k-best form for beams (`choose_k`).
//! Greedy and sampled decoding, speculative decoding's drafts and target tokens, and
//! beam search pick through them. The processors and
//! warpers (temperature, top-k, top-p, ...) have already shaped the scores
//! (`processors.rs`); what is left is the pick itself.
//!
//! Sampling keeps libtorch's `multinomial` on the softmax of the scores, one draw per
//! row of an (R, V) tensor: for a seed, on the CPU, transformers' own draws.
use tch::{Device, Kind, Tensor};

use crate::decode::{bad_of_max, bad_rows, BadRow, Rows};
use crate::error::Error;

use super::{pick_failed, unpickable};

/// How a token is picked from processed scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// Each row's first maximal token (libtorch's `argmax`).
    ArgMax,
    /// One draw from each row's softmax (libtorch's `multinomial`, without replacement).
    Multinomial,
}

impl Sampling {
    /// `do_sample` of a `GenerationConfig`'s processing.
    pub fn of(do_sample: bool) -> Self {
        if do_sample {
            Sampling::Multinomial
        } else {
            Sampling::ArgMax
        }
    }
}

/// One picked token per row and its log-softmax under the scores it was picked from.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub ids: Vec<i64>,
    pub logprobs: Vec<f64>,
}

/// Why `choose` picked nothing.
#[derive(Debug)]
pub enum NoPick {
    /// A live row offers no token.
    Row(usize, BadRow),
    /// A live row offers `have` tokens where `want` are drawn without replacement.
    TooFew { row: usize, have: i64, want: i64 },
    /// libtorch failed.
    Torch(tch::TchError),
}

impl NoPick {
    /// The error for a pick at `step` (counted from 1); `who(r)` names row r's sequence.
    pub fn at(self, step: usize, who: impl Fn(usize) -> String) -> Error {
        match self {
            NoPick::Row(r, why) => unpickable(step, &who(r), why),
            NoPick::TooFew { row, have, want } => Error::Input(format!(
                "step {step}: {want} continuations are drawn for {}, but only {have} \
                 tokens are allowed; use fewer --num-beams or a larger --top-k / --top-p",
                who(row)
            )),
            NoPick::Torch(e) => pick_failed(step, e),
        }
    }
}

impl From<tch::TchError> for NoPick {
    fn from(e: tch::TchError) -> Self {
        NoPick::Torch(e)
    }
}

/// Picks one token per row of the processed `scores` (R, V) as `sampling` says.
/// `live(r)` says whether row r's pick is used: a live row with no token to pick (see
/// `BadRow`) is an error, a row that is not live gets some token (token 0 and a NaN
/// log-prob on the CPU path) and draws the same randomness as any other row, so that
/// the live rows' draws do not depend on it.
pub fn choose(
    scores: &Tensor,
    sampling: Sampling,
    live: &dyn Fn(usize) -> bool,
) -> std::result::Result<Choice, NoPick> {
    let scan = Rows::scan(scores);
    if scan.is_none() && sampling == Sampling::ArgMax {
        return greedy_in_one_read(scores, live);
    }
    let bad = match &scan {
        Some(rows) => rows.bad(),
        None => bad_rows(scores),
    };
    if let Some(&(r, why)) = bad.iter().find(|(r, _)| live(*r)) {
        return Err(NoPick::Row(r, why));
    }
    let ids = match (&scan, sampling) {
        (Some(rows), Sampling::ArgMax) => {
            let (ids, logprobs) = rows.greedy();
            return Ok(Choice { ids, logprobs });
        }
        (None, Sampling::ArgMax) => unreachable!("greedy_in_one_read"),
        (_, Sampling::Multinomial) => {
            // A row that is not live and has no token would make `multinomial` throw:
            // give it uniform scores (each row draws the same amount of randomness
            // whatever its distribution).
            let scores = if bad.is_empty() {
                scores.shallow_clone()
            } else {
                let s = scores.copy();
                for &(r, _) in &bad {
                    let _ = s.get(r as i64).fill_(0.0);
                }
                s
            };
            scores
                .softmax(-1, Kind::Float)
                .f_multinomial(1, false)?
                .squeeze_dim(1)
        }
    };
    let ids: Vec<i64> = Vec::try_from(ids.to_device(Device::Cpu))?;
    let logprobs = match scan.as_ref().and_then(|rows| rows.logprobs(&ids)) {
        Some(lp) => lp,
        None => {
            let idx = Tensor::from_slice(&ids).to_device(scores.device());
            let logp = scores
                .log_softmax(-1, Kind::Float)
                .gather(1, &idx.unsqueeze(1), false)
                .squeeze_dim(1);
            Vec::try_from(logp.to_device(Device::Cpu))?
        }
    };
    Ok(Choice { ids, logprobs })
}

/// `choose`'s greedy pick where the scores are not CPU f32 (another device, or half
/// precision): each row's maximum (to find rows without a token), first maximal index
/// and its log-softmax computed where the scores are and read back together, one wait
/// on the device a step instead of three. The same values as three reads.
fn greedy_in_one_read(
    scores: &Tensor,
    live: &dyn Fn(usize) -> bool,
) -> std::result::Result<Choice, NoPick> {
    let r = scores.size()[0] as usize;
    let max = scores.f_amax([-1].as_slice(), false)?.to_kind(Kind::Double);
    let ids = scores.f_argmax(-1, false)?;
    let logp = scores
        .f_log_softmax(-1, Kind::Float)?
        .gather(1, &ids.unsqueeze(1), false)
        .squeeze_dim(1)
        .to_kind(Kind::Double);
    // Token ids are exact in f64 (below 2⁵³).
    let all = Tensor::stack(&[max, ids.to_kind(Kind::Double), logp], 0);
    let all = Vec::<f64>::try_from(all.to_device(Device::Cpu).reshape([-1]))?;
    let bad = bad_of_max(&all[..r]);
    if let Some(&(row, why)) = bad.iter().find(|(row, _)| live(*row)) {
        return Err(NoPick::Row(row, why));
    }
    Ok(Choice {
        ids: all[r..2 * r].iter().map(|&i| i as i64).collect(),
        logprobs: all[2 * r..].to_vec(),
    })
}

/// The `k` best continuations of each row of `scores` (R, N) (`ArgMax`), or `k` drawn
/// without replacement from each row's softmax and ranked (`Multinomial`): their
/// scores and indices (R, k), best first. Beam search's pick. `live(r)` as for `choose`:
/// sampling, a live row with a NaN, with no allowed token, or with fewer than `k` is an
/// error.
pub fn choose_k(
    scores: &Tensor,
    k: i64,
    sampling: Sampling,
    live: &dyn Fn(usize) -> bool,
) -> std::result::Result<(Tensor, Tensor), NoPick> {
    if sampling == Sampling::ArgMax {
        let (top, idx) = scores.f_topk(k, -1, true, true)?;
        // The best of a live row must be a real one: -inf when every token is banned,
        // NaN (topk ranks it first) when the scores are not finite.
        let best = Vec::<f64>::try_from(
            top.select(1, 0)
                .to_kind(Kind::Double)
                .to_device(Device::Cpu),
        )?;
        for (r, &b) in best.iter().enumerate() {
            if live(r) && !b.is_finite() {
                let why = if b == f64::NEG_INFINITY {
                    BadRow::Banned
                } else {
                    BadRow::NotFinite
                };
                return Err(NoPick::Row(r, why));
            }
        }
        return Ok((top, idx));
    }
    let probs = scores.softmax(-1, Kind::Float);
    // Drawing k without replacement needs k tokens of nonzero probability (libtorch
    // throws otherwise).
    let allowed = Vec::<i64>::try_from(
        probs
            .gt(0.0)
            .sum_dim_intlist([-1].as_slice(), false, Kind::Int64)
            .to_device(Device::Cpu),
    )?;
    let nan = Vec::<bool>::try_from(probs.isnan().any_dim(-1, false).to_device(Device::Cpu))?;
    for (r, (&have, &nan)) in allowed.iter().zip(&nan).enumerate() {
        if !live(r) {
            continue;
        }
        if nan {
            return Err(NoPick::Row(r, BadRow::NotFinite));
        }
        if have == 0 {
            return Err(NoPick::Row(r, BadRow::Banned));
        }
        if have < k {
            return Err(NoPick::TooFew {
                row: r,
                have,
                want: k,
            });
        }
    }
    let idx = probs.f_multinomial(k, false)?;
    let (top, order) = scores.gather(1, &idx, false).sort(-1, true);
    Ok((top, idx.gather(1, &order, false)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_sampling_draws_from_the_softmax() {
        // No global generator here (other tests seed it in parallel): fixed scores, and
        // rows whose softmax leaves a single token to draw. Seeded parity with
        // transformers is the generation tests' business.
        let v = 1000;
        let s: Vec<f32> = (0..4 * v)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0)
            .collect();
        let s = Tensor::from_slice(&s).view([4, v as i64]);
        let c = choose(&s, Sampling::ArgMax, &|_| true).unwrap();
        assert_eq!(c.ids, Vec::<i64>::try_from(s.argmax(-1, false)).unwrap());
        let lp = s.log_softmax(-1, Kind::Float);
        for (r, (&t, &l)) in c.ids.iter().zip(&c.logprobs).enumerate() {
            assert!((lp.double_value(&[r as i64, t]) - l).abs() < 1e-5);
        }
        let one = s.full_like(f64::NEG_INFINITY);
        for (r, t) in [(0, 5), (1, 999), (2, 0), (3, 417)] {
            let _ = one.get(r).narrow(0, t, 1).fill_(1.5);
        }
        let c = choose(&one, Sampling::Multinomial, &|_| true).unwrap();
        assert_eq!(c.ids, vec![5, 999, 0, 417]);
        assert_eq!(c.logprobs, vec![0.0; 4]);
    }

    #[test]
    fn only_a_live_row_with_no_token_is_an_error() {
        let s = Tensor::from_slice(&[0f32, 1.0, f32::NEG_INFINITY, f32::NEG_INFINITY]).view([2, 2]);
        for sampling in [Sampling::ArgMax, Sampling::Multinomial] {
            assert!(matches!(
                choose(&s, sampling, &|_| true),
                Err(NoPick::Row(1, BadRow::Banned))
            ));
            let c = choose(&s, sampling, &|r| r == 0).unwrap();
            assert!(c.logprobs[0].is_finite());
        }
    }

    #[test]
    fn choose_k_ranks_the_best_or_the_drawn_and_names_a_row_with_too_few() {
        let ninf = f32::NEG_INFINITY;
        let s = Tensor::from_slice(&[0.5f32, 2.0, 1.0, ninf, 3.0, ninf, ninf, ninf]).view([2, 4]);
        let (top, idx) = choose_k(&s, 2, Sampling::ArgMax, &|_| true).unwrap();
        assert_eq!(Vec::<i64>::try_from(idx.get(0)).unwrap(), vec![1, 2]);
        assert_eq!(
            idx.int64_value(&[1, 0]),
            0,
            "row 1's one allowed token first"
        );
        assert_eq!(top.double_value(&[0, 0]), 2.0);
        // Row 1 has one allowed token: two cannot be drawn without replacement.
        assert!(matches!(
            choose_k(&s, 2, Sampling::Multinomial, &|_| true),
            Err(NoPick::TooFew {
                row: 1,
                have: 1,
                want: 2
            })
        ));
        // Drawn two of row 0's three allowed, ranked by score.
        let (top, idx) = choose_k(&s, 2, Sampling::Multinomial, &|r| r == 0).unwrap();
        let (t0, t1) = (top.double_value(&[0, 0]), top.double_value(&[0, 1]));
        assert!(t0 >= t1, "ranked: {t0} {t1}");
        let i0 = idx.int64_value(&[0, 0]);
        assert_eq!(s.double_value(&[0, i0]), t0);
        // Every token banned in a live row: greedy says so too.
        let banned = Tensor::from_slice(&[ninf; 4]).view([1, 4]);
        assert!(matches!(
            choose_k(&banned, 2, Sampling::ArgMax, &|_| true),
            Err(NoPick::Row(0, BadRow::Banned))
        ));
    }

    /// Greedy on scores the CPU scan does not take (bf16 here, any device on a GPU
    /// machine): the tokens of the scan on the same values in f32, log-probabilities
    /// within 1e-5 (libtorch's log-softmax against the scan's own); a banned or NaN row
    /// is an error only when live.
    #[test]
    fn greedy_in_one_read_picks_what_the_scan_picks() {
        tch::manual_seed(3);
        let s = (Tensor::randn([5, 300], (Kind::Float, Device::Cpu)) * 3.0).to_kind(Kind::BFloat16);
        let exact = s.to_kind(Kind::Float);
        let one = choose(&s, Sampling::ArgMax, &|_| true).unwrap();
        let scan = choose(&exact, Sampling::ArgMax, &|_| true).unwrap();
        assert_eq!(one.ids, scan.ids);
        for (a, b) in one.logprobs.iter().zip(&scan.logprobs) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let _ = s.get(1).fill_(f64::NEG_INFINITY);
        let _ = s.get(3).get(7).fill_(f64::NAN);
        assert!(matches!(
            choose(&s, Sampling::ArgMax, &|_| true),
            Err(NoPick::Row(1, BadRow::Banned))
        ));
        assert!(matches!(
            choose(&s, Sampling::ArgMax, &|r| r != 1),
            Err(NoPick::Row(3, BadRow::NotFinite))
        ));
        let rest = choose(&s, Sampling::ArgMax, &|r| r != 1 && r != 3).unwrap();
        for r in [0, 2, 4] {
            assert_eq!(rest.ids[r], scan.ids[r]);
        }
    }
}
