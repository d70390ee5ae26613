//! Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via
//! Speculative Decoding"; Chen et al. 2023): a cheap drafter proposes K tokens, the
//! target scores all of them in one forward pass, and the longest acceptable prefix is
//! kept plus one token from the target. Drafts come from a small draft model or, with
//! prompt lookup, from the sequence itself (the tokens that followed the first earlier
//! occurrence of its final n-gram).
//!
//! Greedy: a draft token is kept while it equals the target's argmax, so the output is
//! exactly the target's greedy output. Sampling: a draft token x drawn from q is kept
//! with probability min(1, p(x)/q(x)); at the first rejection the token is drawn from
//! normalise(max(0, p - q)); if all K are kept one more is drawn from p. Every token is
//! then distributed as the target's processed distribution p. Prompt-lookup drafts are
//! deterministic (q is a point mass), which the same rule covers.
//!
//! Both KV caches hold every token of the sequence but the last; after a verification
//! they are truncated back to the accepted length, and the next round feeds whatever a
//! cache lacks. One prompt at a time, one sequence, no beams.
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::cache::KvCache;
use crate::decode::bad_rows;
use crate::error::{Error, Result};
use crate::generate::{
    choose, finish_reason, pick_failed, unpickable, validate, FinishReason, Generated,
    GenerationConfig, Output, Sampling, StopCheck,
};
use crate::model::Gpt2;
use crate::processors::{process, Row};

/// Where draft tokens come from.
pub enum Drafter<'a> {
    Model(&'a Gpt2),
    /// Longest n-gram to look up (it tries n, n-1, ..., 1).
    PromptLookup(usize),
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SpecStats {
    /// Target verification passes (forward passes of the target, the prompt's included).
    pub steps: usize,
    pub proposed: usize,
    pub accepted: usize,
}

impl SpecStats {
    pub fn acceptance_rate(&self) -> f64 {
        if self.proposed == 0 {
            0.0
        } else {
            self.accepted as f64 / self.proposed as f64
        }
    }
    /// Tokens kept per verification pass, the target's own token included.
    pub fn tokens_per_step(&self, generated: usize) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            generated as f64 / self.steps as f64
        }
    }
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
    Ok(())
}

/// Generates each prompt with `target`, drafting `k` tokens per step.
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
    let _seeded = crate::generate::seed_rng(cfg.seed);
    let started = Instant::now();
    let mut stats = SpecStats::default();
    let mut sequences = Vec::with_capacity(prompts.len());
    let mut prefill = None;
    for (row, prompt) in prompts.iter().enumerate() {
        let deadline = cfg.max_time.map(|t| started + t);
        let g = one_prompt(
            target,
            drafter,
            prompt,
            &format!("prompt {row}"),
            cfg,
            k,
            stop,
            deadline,
            &mut stats,
            &mut |t| on_token(row, t),
            &mut || {
                prefill.get_or_insert_with(|| started.elapsed());
            },
        )?;
        sequences.push(vec![g]);
    }
    let prefill = prefill.unwrap_or_default();
    let out = Output {
        sequences,
        prefill,
        decode: started.elapsed().saturating_sub(prefill),
        steps: stats.steps,
    };
    Ok((out, stats))
}

/// Feeds the tokens of `seq` followed by `extra` that `cache` does not hold yet,
/// returning logits for every fed position: (n, V) float.
fn feed(model: &Gpt2, cache: &mut KvCache, seq: &[i64], extra: &[i64]) -> Tensor {
    let start = cache.len() as usize;
    let ids: Vec<i64> = seq.iter().chain(extra).skip(start).copied().collect();
    let n = ids.len() as i64;
    let t = Tensor::from_slice(&ids)
        .view([1, n])
        .to_device(model.device());
    model.forward(&t, cache).squeeze_dim(0).to_kind(Kind::Float)
}

#[allow(clippy::too_many_arguments)]
fn one_prompt(
    target: &Gpt2,
    drafter: &Drafter,
    prompt: &[i64],
    who: &str,
    cfg: &GenerationConfig,
    k: usize,
    stop: StopCheck,
    deadline: Option<Instant>,
    stats: &mut SpecStats,
    on_token: &mut dyn FnMut(i64),
    first_token: &mut dyn FnMut(),
) -> Result<Generated> {
    let sampling = Sampling::of(cfg.processing.do_sample);
    let limit = cfg.limit(prompt.len());
    let capacity = (prompt.len() + limit + k + 1) as i64;
    let mut t_cache = target.new_cache(1, capacity);
    let mut d_cache = match drafter {
        Drafter::Model(d) => Some(d.new_cache(1, capacity)),
        Drafter::PromptLookup(_) => None,
    };
    let mut seq = prompt.to_vec();
    let mut out = Generated::empty(FinishReason::Length);
    let scores_for = |logits: &Tensor, seq: &[i64], drafts: &[i64], n: usize| -> Tensor {
        // Row i predicts the token after seq + drafts[..i]; process each with its history.
        let hist: Vec<Vec<i64>> = (0..n).map(|i| [seq, &drafts[..i]].concat()).collect();
        let rows: Vec<Row> = hist
            .iter()
            .map(|h| Row {
                tokens: h,
                prompt_len: prompt.len(),
                limit: cfg.limit(prompt.len()),
            })
            .collect();
        process(&cfg.processing, logits, &rows, &cfg.eos_token_ids)
    };
    loop {
        let room = limit - out.tokens.len();
        let kk = k.min(room.saturating_sub(1));
        // Draft phase: up to kk proposals and, for a draft model, their distributions.
        let (drafts, q_rows) = match (drafter, &mut d_cache) {
            (Drafter::Model(d), Some(cache)) => {
                let done = out.tokens.len();
                draft(d, cache, &seq, kk, cfg, prompt.len(), sampling, done, who)?
            }
            (Drafter::PromptLookup(n), _) => (lookup(&seq, *n, kk), Vec::new()),
            _ => unreachable!("a draft model always has a cache"),
        };
        // Verify: the target scores seq's unfed tail and every draft in one pass.
        let base = t_cache.len() as usize;
        let logits = feed(target, &mut t_cache, &seq, &drafts); // (fed, V)
        let fed = logits.size()[0] as usize;
        let nd = drafts.len();
        let logits = logits.narrow(0, (fed - nd - 1) as i64, nd as i64 + 1); // (nd + 1, V)
        let scores = scores_for(&logits, &seq, &drafts, nd + 1);
        let logp = scores.log_softmax(-1, Kind::Float);
        stats.steps += 1;
        stats.proposed += nd;
        let kept = accept(&scores, &drafts, &q_rows, sampling, out.tokens.len(), who)?;
        stats.accepted += kept.len() - 1;
        // Emit in order, stopping at EOS, a stop string or the length limit.
        let mut finished = false;
        for (j, &tok) in kept.iter().enumerate() {
            if out.tokens.is_empty() {
                first_token();
            }
            let lp = logp.double_value(&[j as i64, tok]);
            out.tokens.push(tok);
            out.logprobs.push(lp);
            out.score += lp;
            seq.push(tok);
            on_token(tok);
            if let Some(r) = finish_reason(cfg, &out.tokens, limit, stop, false) {
                out.finish_reason = r;
                finished = true;
                break;
            }
        }
        if finished {
            return Ok(out);
        }
        // Roll back: both caches keep only tokens of `seq` except its last.
        t_cache.truncate((seq.len() - 1) as i64);
        debug_assert!(t_cache.len() as usize >= base);
        if let Some(cache) = &mut d_cache {
            cache.truncate((seq.len() - 1) as i64);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            out.finish_reason = FinishReason::Time;
            return Ok(out);
        }
    }
}

/// Up to `kk` tokens drafted by the draft model `d` after `seq` (stopping at EOS) and,
/// when sampling, the distribution each was drawn from. `done`: tokens generated so far.
#[allow(clippy::too_many_arguments)]
fn draft(
    d: &Gpt2,
    cache: &mut KvCache,
    seq: &[i64],
    kk: usize,
    cfg: &GenerationConfig,
    prompt_len: usize,
    sampling: Sampling,
    done: usize,
    who: &str,
) -> Result<(Vec<i64>, Vec<Vec<f64>>)> {
    let mut drafts: Vec<i64> = Vec::with_capacity(kk);
    let mut q_rows: Vec<Vec<f64>> = Vec::new();
    for _ in 0..kk {
        let logits = feed(d, cache, seq, &drafts);
        let last = logits.get(-1).unsqueeze(0);
        let hist: Vec<i64> = [seq, &drafts].concat();
        let row = Row {
            tokens: &hist,
            prompt_len,
            limit: cfg.limit(prompt_len),
        };
        let s = process(&cfg.processing, &last, &[row], &cfg.eos_token_ids);
        let step = done + drafts.len() + 1;
        let x = choose(&s, sampling, &|_| true)
            .map_err(|e| e.at(step, |_| format!("{who} (the draft model's draft)")))?
            .ids[0];
        if sampling == Sampling::Multinomial {
            q_rows.push(to_vec(&s.softmax(-1, Kind::Float).squeeze_dim(0)));
        }
        drafts.push(x);
        if cfg.eos_token_ids.contains(&x) {
            break;
        }
    }
    Ok((drafts, q_rows))
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
