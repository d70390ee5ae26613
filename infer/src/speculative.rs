//! Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via
//! Speculative Decoding"; Chen et al. 2023): a cheap drafter proposes K tokens, the
//! target scores all of them in one forward pass, and the longest acceptable prefix is
//! kept plus one token from the target. Drafts come from a small draft model or, with
//! prompt lookup, from the sequence itself (the tokens that followed the first earlier
//! occurrence of its final n-gram). This file holds the drafters and the accept rule;
//! the rounds (feed, verify, roll back, finish) are the engine's step in its speculative
//! mode (`generate::engine::speculate`), so several prompts speculate together, each in
//! its own cache row.
//!
//! Greedy: a draft token is kept while it equals the target's argmax, so the output is
//! exactly the target's greedy output. Sampling: a draft token x drawn from q is kept
//! with probability min(1, p(x)/q(x)); at the first rejection the token is drawn from
//! normalise(max(0, p - q)); if all K are kept one more is drawn from p. Every token is
//! then distributed as the target's processed distribution p. Prompt-lookup drafts are
//! deterministic (q is a point mass), which the same rule covers. With a seed, prompt k
//! draws from its own generator seeded `seed + k`, as the engine's sampled sequences do.
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::cache::KvCache;
use crate::decode::bad_rows;
use crate::ensemble::Ensemble;
use crate::error::{Error, Result};
pub use crate::generate::SpecStats;
use crate::generate::{
    choose, feed_rows, pick_failed, unpickable, validate, Ask, Engine, GenerationConfig, NoPick,
    Output, Pick, Proposal, Request, Sampling, Schedule, Speculator, StopCheck,
};
use crate::model::Gpt2;
use crate::processors::{process, Row};

/// Where draft tokens come from.
pub enum Drafter<'a> {
    Model(&'a Gpt2),
    /// Longest n-gram to look up (it tries n, n-1, ..., 1).
    PromptLookup(usize),
}

/// One step of the speculative sampling rule for a draft token `x` drawn from `q`:
/// `Ok(())` keeps it (when `u < p(x)/q(x)`), `Err(residual)` gives the distribution
/// the replacement token is drawn from, normalise(max(0, p - q)).
pub fn accept_or_residual(
    p: &[f64],
    q: &[f64],
    x: usize,
    u: f64,
) -> std::result::Result<(), Vec<f64>> {
    if q[x] > 0.0 && u < p[x] / q[x] {
        return Ok(());
    }
    let mut r: Vec<f64> = p.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect();
    let total: f64 = r.iter().sum();
    if total > 0.0 {
        r.iter_mut().for_each(|v| *v /= total);
    } else {
        r = p.to_vec(); // p == q: rejection has probability 0; fall back to p
    }
    Err(r)
}

fn check(cfg: &GenerationConfig, k: usize) -> Result<()> {
    if k == 0 {
        return Err(Error::Input(
            "--num-draft-tokens (or --prompt-lookup) must be at least 1".into(),
        ));
    }
    if cfg.num_beams > 1 || cfg.num_return_sequences > 1 {
        return Err(Error::Input(
            "speculative decoding returns one sequence: drop --num-beams / --num-return-sequences"
                .into(),
        ));
    }
    if cfg.logprobs.is_some() {
        return Err(Error::Input(
            "speculative decoding gives no raw log-probabilities (`logprobs`)".into(),
        ));
    }
    Ok(())
}

/// Generates each prompt with `target`, drafting `k` tokens per step; the prompts
/// decode together, each in its own cache row.
pub fn generate_speculative(
    target: &Gpt2,
    drafter: &Drafter,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
    k: usize,
    stop: StopCheck,
    mut on_token: impl FnMut(usize, i64),
) -> Result<(Output, SpecStats)> {
    check(cfg, k)?;
    validate(&target.config, prompts, cfg)?;
    if let Drafter::Model(d) = drafter {
        validate(&d.config, prompts, cfg)?;
        if d.config.vocab_size != target.config.vocab_size {
            return Err(Error::Input(format!(
                "--draft-model: vocab_size {} differs from the target's {}",
                d.config.vocab_size, target.config.vocab_size
            )));
        }
    }
    let requests = Request::each(prompts, cfg);
    let models = Ensemble::single(target);
    let started = Instant::now();
    let make = |slots: usize, capacity: usize| -> Box<dyn Speculator + '_> {
        match drafter {
            Drafter::Model(d) => Box::new(DraftModel {
                model: d,
                cache: d.new_cache(slots as i64, capacity as i64),
                cfg,
            }),
            Drafter::PromptLookup(n) => Box::new(Lookup(*n)),
        }
    };
    let mut engine = Engine::speculative(&models, cfg, requests, Schedule::default(), k, make)?;
    let mut prefill = None;
    while !engine.is_idle() {
        engine.step(stop, &mut on_token)?;
        prefill.get_or_insert_with(|| started.elapsed());
    }
    let prefill = prefill.unwrap_or_default();
    let stats = engine.spec_stats();
    let out = Output {
        sequences: engine.finish(),
        prefill,
        decode: started.elapsed().saturating_sub(prefill),
        steps: stats.steps,
    };
    Ok((out, stats))
}

/// Prompt lookup: up to `want` tokens copied from the sequence itself (`lookup`), with
/// the longest n-gram to match.
struct Lookup(usize);

impl Speculator for Lookup {
    fn propose(&mut self, asks: &[Ask], _pick: &mut Pick) -> Result<Vec<Proposal>> {
        Ok(asks
            .iter()
            .map(|a| Proposal {
                tokens: lookup(a.tokens, self.0, a.want),
                q: Vec::new(),
            })
            .collect())
    }

    fn roll_back(&mut self, _slot: usize, _len: usize) {}

    fn accept(
        &self,
        scores: &Tensor,
        p: &Proposal,
        sampling: Sampling,
        done: usize,
        who: &str,
    ) -> Result<Vec<i64>> {
        accept(scores, &p.tokens, &p.q, sampling, done, who)
    }
}

/// A draft model, with a cache row of its own for every engine slot (holding, like the
/// target's, every token of the sequence but the last between rounds).
struct DraftModel<'a> {
    model: &'a Gpt2,
    cache: KvCache,
    cfg: &'a GenerationConfig,
}

impl Speculator for DraftModel<'_> {
    /// Every asking sequence drafts one token per pass, together, until it has its
    /// `want` or drafts EOS; each pass first feeds what the row lacks of the sequence.
    fn propose(&mut self, asks: &[Ask], pick: &mut Pick) -> Result<Vec<Proposal>> {
        let cfg = self.cfg;
        let sampling = Sampling::of(cfg.processing.do_sample);
        let mut props: Vec<Proposal> = asks.iter().map(|_| Proposal::default()).collect();
        let mut active: Vec<usize> = (0..asks.len()).filter(|&i| asks[i].want > 0).collect();
        while !active.is_empty() {
            let hist: Vec<Vec<i64>> = active
                .iter()
                .map(|&i| [asks[i].tokens, &props[i].tokens].concat())
                .collect();
            let fed: Vec<(usize, Vec<i64>)> = active
                .iter()
                .zip(&hist)
                .map(|(&i, h)| {
                    let slot = asks[i].slot;
                    (slot, h[self.cache.row_len(slot) as usize..].to_vec())
                })
                .collect();
            // After a round that kept every draft a row lacks two tokens: pad to two.
            let hidden = feed_rows(self.model, &mut self.cache, &fed, 2)?;
            let last: Vec<Tensor> = hidden
                .iter()
                .map(|h| h.narrow(0, h.size()[0] - 1, 1))
                .collect();
            let logits = self
                .model
                .logits(&Tensor::cat(&last, 0))
                .to_kind(Kind::Float); // (A, V)
            let rows: Vec<Row> = active
                .iter()
                .zip(&hist)
                .map(|(&i, h)| Row {
                    tokens: h,
                    prompt_len: asks[i].prompt_len,
                    limit: asks[i].limit,
                })
                .collect();
            let s = process(&cfg.processing, &logits, &rows, &cfg.eos_token_ids);
            let ids = pick(&s, &active).map_err(|e| {
                let r = match &e {
                    NoPick::Row(r, _) | NoPick::TooFew { row: r, .. } => *r,
                    NoPick::Torch(_) => 0,
                };
                let a = &asks[active[r]];
                let step = a.done() + props[active[r]].tokens.len() + 1;
                e.at(step, |_| format!("{} (the draft model's draft)", a.who))
            })?;
            let q = (sampling == Sampling::Multinomial).then(|| s.softmax(-1, Kind::Float));
            for (j, &i) in active.iter().enumerate() {
                props[i].tokens.push(ids[j]);
                if let Some(q) = &q {
                    props[i].q.push(to_vec(&q.get(j as i64)));
                }
            }
            active.retain(|&i| {
                let p = &props[i].tokens;
                p.len() < asks[i].want && !cfg.eos_token_ids.contains(&p[p.len() - 1])
            });
        }
        Ok(props)
    }

    fn roll_back(&mut self, slot: usize, len: usize) {
        self.cache.truncate_row(slot, len as i64);
    }

    fn accept(
        &self,
        scores: &Tensor,
        p: &Proposal,
        sampling: Sampling,
        done: usize,
        who: &str,
    ) -> Result<Vec<i64>> {
        accept(scores, &p.tokens, &p.q, sampling, done, who)
    }
}

/// The accept rule over the target's processed `scores` (nd + 1, V) for the `drafts`
/// (nd) drawn from `q_rows` (a point mass where absent): the drafts kept and then the
/// target's own token. `done`: tokens generated so far.
fn accept(
    scores: &Tensor,
    drafts: &[i64],
    q_rows: &[Vec<f64>],
    sampling: Sampling,
    done: usize,
    who: &str,
) -> Result<Vec<i64>> {
    // Row i picks token number `done + i + 1`; a row after a rejected
    // draft is never used, so only a used row with no token is an error.
    let bad = bad_rows(scores);
    let usable = |i: usize| match bad.iter().find(|(r, _)| *r == i) {
        Some(&(_, why)) => Err(unpickable(done + i + 1, who, why)),
        None => Ok(()),
    };
    // Greedy: the target's token for every row at once (a row is checked when used).
    let greedy = match sampling {
        Sampling::ArgMax => Some(
            choose(scores, sampling, &|_| false)
                .map_err(|e| e.at(done + 1, |_| who.to_string()))?
                .ids,
        ),
        Sampling::Multinomial => None,
    };
    let mut kept: Vec<i64> = Vec::new();
    let mut next = None;
    for (i, &x) in drafts.iter().enumerate() {
        usable(i)?;
        let accept = if let Some(greedy) = &greedy {
            greedy[i] == x
        } else {
            let p = to_vec(&scores.get(i as i64).softmax(-1, Kind::Float));
            let q = match q_rows.get(i) {
                Some(q) => q.clone(),
                None => {
                    let mut point = vec![0.0; p.len()];
                    point[x as usize] = 1.0;
                    point
                }
            };
            let u = Tensor::rand([1], (Kind::Double, Device::Cpu)).double_value(&[0]);
            match accept_or_residual(&p, &q, x as usize, u) {
                Ok(()) => true,
                Err(residual) => {
                    let r = Tensor::from_slice(&residual);
                    let x = r
                        .f_multinomial(1, false)
                        .map_err(|e| pick_failed(done + i + 1, e))?;
                    next = Some(x.int64_value(&[0]));
                    false
                }
            }
        };
        if !accept {
            break;
        }
        kept.push(x);
    }
    let i = kept.len();
    let last = match next {
        Some(x) => x,
        None => {
            usable(i)?;
            match &greedy {
                Some(greedy) => greedy[i],
                None => {
                    let step = done + i + 1;
                    choose(&scores.narrow(0, i as i64, 1), sampling, &|_| true)
                        .map_err(|e| e.at(step, |_| who.to_string()))?
                        .ids[0]
                }
            }
        }
    };
    kept.push(last);
    Ok(kept)
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double)).expect("floats")
}

/// Up to `k` tokens that followed the earliest earlier occurrence of the sequence's
/// final n-gram (n from `max_n` down to 1) with something after it, as transformers'
/// `PromptLookupCandidateGenerator` does; none when nothing matches.
pub fn lookup(seq: &[i64], max_n: usize, k: usize) -> Vec<i64> {
    for n in (1..=max_n.min(seq.len().saturating_sub(1))).rev() {
        let tail = &seq[seq.len() - n..];
        for start in 0..seq.len() - n {
            if &seq[start..start + n] == tail {
                let from = start + n;
                return seq[from..(from + k).min(seq.len())].to_vec();
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule's output distribution, enumerated exactly: P(x kept) + P(reject) · residual.
    fn output_distribution(p: &[f64], q: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; p.len()];
        for x in 0..q.len() {
            if q[x] == 0.0 {
                continue;
            }
            let keep = (p[x] / q[x]).min(1.0);
            out[x] += q[x] * keep;
            // u ≥ p/q rejects: the residual is the same for every such u.
            if keep < 1.0 {
                let residual = accept_or_residual(p, q, x, 1.0).unwrap_err();
                for (o, r) in out.iter_mut().zip(residual) {
                    *o += q[x] * (1.0 - keep) * r;
                }
            }
        }
        out
    }

    #[test]
    fn the_rule_reproduces_the_target_distribution_exactly() {
        let cases = [
            (vec![0.5, 0.3, 0.2], vec![0.2, 0.3, 0.5]),
            (vec![0.1, 0.0, 0.9], vec![0.6, 0.4, 0.0]),
            (vec![0.25; 4], vec![1.0, 0.0, 0.0, 0.0]), // a point-mass drafter (prompt lookup)
            (vec![0.7, 0.2, 0.1], vec![0.7, 0.2, 0.1]),
        ];
        for (p, q) in cases {
            let out = output_distribution(&p, &q);
            for (a, b) in out.iter().zip(&p) {
                assert!((a - b).abs() < 1e-12, "p {p:?} q {q:?} gave {out:?}");
            }
        }
        assert!(accept_or_residual(&[0.5, 0.5], &[0.25, 0.75], 0, 0.99).is_ok());
        assert!(accept_or_residual(&[0.5, 0.5], &[0.25, 0.75], 1, 0.7).is_err());
    }

    #[test]
    fn lookup_copies_what_followed_the_last_match() {
        assert_eq!(lookup(&[1, 2, 3, 4, 9, 1, 2], 2, 3), vec![3, 4, 9]);
        assert_eq!(lookup(&[1, 2, 3, 2], 3, 5), vec![3, 2]);
        // The earliest match gives the longest continuation of a repetition.
        assert_eq!(lookup(&[7, 7, 7, 7, 7], 2, 3), vec![7, 7, 7]);
        assert_eq!(lookup(&[1, 2, 5, 1, 2, 6, 1, 2], 2, 1), vec![5]);
        assert!(lookup(&[1, 2, 3], 2, 3).is_empty());
        assert!(lookup(&[5], 2, 3).is_empty());
    }
}
