//! Token choice for a step: every live single sequence processed together and picked
//! (each sampled one from its own generator), or each beam group's step.
use std::sync::Arc;

use tch::Tensor;

use super::{Engine, Feed, Kind, OnToken, Unit};
use crate::error::Result;
use crate::generate::{
    choose, finish_reason, pick_failed, Choice, NoPick, Sampling, Step, StepContext, Strategy,
};
use crate::processors::{process, Row};
use crate::rng;
use crate::sequence::{FinishReason, Logprobs};

impl Engine<'_> {
    /// Greedy or sampled tokens for every live sequence; per unit, the token to feed
    /// (`None`: it finished). Units that share settings are processed together.
    pub(super) fn pick_singles(
        &mut self,
        scores: &Tensor,
        ends: &StepContext,
        on_token: OnToken,
    ) -> Result<Vec<Option<Feed>>> {
        let n = self.live.len();
        let mut picked = Choice {
            ids: vec![0; n],
            logprobs: vec![0.0; n],
        };
        // Units whose own settings left them no token: they end, the others go on.
        let mut failed: Vec<Option<String>> = vec![None; n];
        let mut raw: Vec<Option<Logprobs>> = vec![None; n];
        for group in self.groups() {
            let own = self.live[group[0]].settings.clone();
            let cfg = own.as_deref().unwrap_or(self.cfg);
            let scores = if group.len() == n {
                scores.shallow_clone()
            } else {
                let index: Vec<i64> = group.iter().map(|&i| i as i64).collect();
                scores.index_select(0, &Tensor::from_slice(&index).to_device(scores.device()))
            };
            let rows: Vec<Row> = group.iter().map(|&i| row(&self.live[i])).collect();
            let processed = process(&cfg.processing, &scores, &rows, &cfg.eos_token_ids);
            drop(rows);
            let c = match self.choose(&processed, Sampling::of(cfg.processing.do_sample), &group) {
                Ok(c) => c,
                // A request with its own settings fails alone (with the requests that
                // share its settings value): a server's other streams go on.
                Err(e) if own.is_some() => {
                    for &i in &group {
                        failed[i] = Some(e.to_string());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(top) = cfg.logprobs {
                let step = match &self.live[group[0]].kind {
                    Kind::One { out, .. } => out.tokens.len() + 1,
                    Kind::Beams(..) => 1,
                };
                let lp = raw_logprobs(&scores, &c.ids, top).map_err(|e| pick_failed(step, e))?;
                for (&i, lp) in group.iter().zip(lp) {
                    raw[i] = Some(lp);
                }
            }
            for (k, &i) in group.iter().enumerate() {
                picked.ids[i] = c.ids[k];
                picked.logprobs[i] = c.logprobs[k];
            }
        }
        let mut feeds = Vec::with_capacity(n);
        let base = self.cfg;
        for (i, (u, (&tok, &lp))) in self
            .live
            .iter_mut()
            .zip(picked.ids.iter().zip(&picked.logprobs))
            .enumerate()
        {
            let cfg = u.settings.as_deref().unwrap_or(base);
            let Kind::One { tokens, out } = &mut u.kind else {
                unreachable!("a run is all beams or all single sequences")
            };
            if let Some(e) = failed[i].take() {
                out.finish_reason = FinishReason::Error;
                self.errors.insert(u.request, e);
                feeds.push(None);
                continue;
            }
            out.tokens.push(tok);
            out.logprobs.push(lp);
            let raw = raw[i].take();
            out.score += lp;
            tokens.push(tok);
            on_token(u.row, tok, raw.as_ref());
            out.raw_logprobs.extend(raw);
            match finish_reason(cfg, &out.tokens, u.limit, ends.stop, ends.timed_out) {
                Some(reason) => {
                    out.finish_reason = reason;
                    feeds.push(None);
                }
                None => feeds.push(Some(Feed {
                    tokens: vec![tok],
                    parents: None,
                })),
            }
        }
        Ok(feeds)
    }

    /// The live units grouped by their settings (the engine's, or one request's own),
    /// each group in live order.
    fn groups(&self) -> Vec<Vec<usize>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, u) in self.live.iter().enumerate() {
            let same = |g: &&mut Vec<usize>| match (&self.live[g[0]].settings, &u.settings) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            match groups.iter_mut().find(same) {
                Some(g) => g.push(i),
                None => groups.push(vec![i]),
            }
        }
        groups
    }

    /// One token per row of `processed` (one row per unit of `units`, indices into the
    /// live units), each sampled row drawing from its own generator when seeded.
    fn choose(
        &mut self,
        processed: &Tensor,
        sampling: Sampling,
        units: &[usize],
    ) -> Result<Choice> {
        let per_request = self.per_request;
        // The error names the row's sequence and its step (its tokens so far + 1).
        let fail = |e: NoPick, u: &Unit| {
            let step = match &u.kind {
                Kind::One { out, .. } => out.tokens.len() + 1,
                Kind::Beams(..) => 1,
            };
            let (i, j) = (u.request, u.row % per_request);
            e.at(step, |_| {
                if per_request > 1 {
                    format!("prompt {i}, sequence {j}")
                } else {
                    format!("prompt {i}")
                }
            })
        };
        let seeded = units.iter().any(|&i| self.live[i].rng.is_some());
        if !seeded || sampling == Sampling::ArgMax {
            return choose(processed, sampling, &|_| true).map_err(|e| match e {
                NoPick::Row(r, _) | NoPick::TooFew { row: r, .. } => fail(e, &self.live[units[r]]),
                NoPick::Torch(_) => fail(e, &self.live[units[0]]),
            });
        }
        let lock = rng::lock();
        let mut all = Choice {
            ids: Vec::with_capacity(units.len()),
            logprobs: Vec::with_capacity(units.len()),
        };
        for (r, &i) in units.iter().enumerate() {
            let u = &mut self.live[i];
            let row = processed.narrow(0, r as i64, 1);
            let pick = || choose(&row, sampling, &|_| true);
            let c = match &mut u.rng {
                Some(rng) => rng.with(&lock, pick)?,
                None => pick(),
            };
            let c = c.map_err(|e| fail(e, u))?;
            all.ids.extend(c.ids);
            all.logprobs.extend(c.logprobs);
        }
        Ok(all)
    }

    /// Each beam group's step on its rows' logits, under its own settings (its length
    /// limit) and the step's stop checks `ends`.
    pub(super) fn pick_beams(
        &mut self,
        scores: &Tensor,
        ends: &StepContext,
        on_token: OnToken,
    ) -> Result<Vec<Option<Feed>>> {
        let on_token = &mut |row, tok| on_token(row, tok, None);
        let mut feeds = Vec::with_capacity(self.live.len());
        let mut offset = 0;
        for u in &mut self.live {
            let n = u.rows() as i64;
            let logits = scores.narrow(0, offset, n);
            offset += n;
            let Kind::Beams(beam, cfg) = &mut u.kind else {
                unreachable!("a run is all beams or all single sequences")
            };
            let ctx = StepContext { cfg, ..*ends };
            let step = match &mut u.rng {
                Some(rng) => rng.with(&rng::lock(), || beam.step(&logits, &ctx, on_token))??,
                None => beam.step(&logits, &ctx, on_token)?,
            };
            feeds.push(match step {
                Step::Done => None,
                Step::Continue { feed, parents } => Some(Feed {
                    tokens: feed,
                    parents,
                }),
            });
        }
        Ok(feeds)
    }
}

/// A single sequence's processor row.
fn row(u: &Unit) -> Row<'_> {
    match &u.kind {
        Kind::One { tokens, .. } => Row {
            tokens,
            prompt_len: u.prompt_len,
            limit: u.limit,
        },
        Kind::Beams(..) => unreachable!("a run is all beams or all single sequences"),
    }
}

/// Each row's picked token's log-probability under the raw `scores` (R, V) and the `top`
/// most likely tokens with theirs.
fn raw_logprobs(
    scores: &Tensor,
    ids: &[i64],
    top: usize,
) -> std::result::Result<Vec<Logprobs>, tch::TchError> {
    let lsm = scores.f_log_softmax(-1, tch::Kind::Float)?; // (R, V)
    let idx = Tensor::from_slice(ids).to_device(lsm.device()).unsqueeze(1);
    let picked = Vec::<f64>::try_from(
        lsm.f_gather(1, &idx, false)?
            .reshape([-1])
            .to_kind(tch::Kind::Double)
            .to_device(tch::Device::Cpu),
    )?;
    let k = (top as i64).min(lsm.size()[1]);
    let (vals, toks) = lsm.f_topk(k, -1, true, true)?;
    let vals = Vec::<f64>::try_from(
        vals.to_kind(tch::Kind::Double)
            .reshape([-1])
            .to_device(tch::Device::Cpu),
    )?;
    let toks = Vec::<i64>::try_from(toks.reshape([-1]).to_device(tch::Device::Cpu))?;
    let k = k as usize;
    Ok(picked
        .into_iter()
        .enumerate()
        .map(|(r, logprob)| Logprobs {
            logprob,
            top: (r * k..(r + 1) * k).map(|j| (toks[j], vals[j])).collect(),
        })
        .collect())
}
