//! Token choice for a step: every live single sequence processed together and picked
//! (each sampled one from its own generator), or each beam group's step.
use tch::Tensor;

use super::{Engine, Feed, Kind, Unit};
use crate::error::Result;
use crate::generate::{
    choose, finish_reason, Choice, NoPick, Sampling, Step, StepContext, Strategy,
};
use crate::processors::{process, Row};

impl Engine<'_> {
    /// Greedy or sampled tokens for every live sequence; per unit, the token to feed
    /// (`None`: it finished).
    pub(super) fn pick_singles(
        &mut self,
        scores: &Tensor,
        ends: &StepContext,
        on_token: &mut dyn FnMut(usize, i64),
    ) -> Result<Vec<Option<Feed>>> {
        let cfg = self.cfg;
        let rows: Vec<Row> = self
            .live
            .iter()
            .map(|u| match &u.kind {
                Kind::One { tokens, .. } => Row {
                    tokens,
                    prompt_len: u.prompt_len,
                    limit: u.limit,
                },
                Kind::Beams(..) => unreachable!("a run is all beams or all single sequences"),
            })
            .collect();
        let processed = process(&cfg.processing, scores, &rows, &cfg.eos_token_ids);
        drop(rows);
        let sampling = Sampling::of(cfg.processing.do_sample);
        let per_request = self.per_request;
        let who = move |u: &Unit| {
            let (i, j) = (u.request, u.row % per_request);
            if per_request > 1 {
                format!("prompt {i}, sequence {j}")
            } else {
                format!("prompt {i}")
            }
        };
        let Choice { ids, logprobs } = self.choose(&processed, sampling, &who)?;
        let mut feeds = Vec::with_capacity(self.live.len());
        for (u, (&tok, &lp)) in self.live.iter_mut().zip(ids.iter().zip(&logprobs)) {
            let Kind::One { tokens, out } = &mut u.kind else {
                unreachable!("checked above")
            };
            out.tokens.push(tok);
            out.logprobs.push(lp);
            out.score += lp;
            tokens.push(tok);
            on_token(u.row, tok);
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

    /// One token per row of `processed` (R, V), each sampled row drawing from its own
    /// generator when seeded.
    fn choose(
        &mut self,
        processed: &Tensor,
        sampling: Sampling,
        who: &dyn Fn(&Unit) -> String,
    ) -> Result<Choice> {
        // The error names the row's sequence and its step (its tokens so far + 1).
        let step = |u: &Unit| match &u.kind {
            Kind::One { out, .. } => out.tokens.len() + 1,
            Kind::Beams(..) => 1,
        };
        let fail = |e: NoPick, u: &Unit| e.at(step(u), |_| who(u));
        let seeded = self.live.iter().any(|u| u.rng.is_some());
        if !seeded || sampling == Sampling::ArgMax {
            return choose(processed, sampling, &|_| true).map_err(|e| match e {
                NoPick::Row(r, _) => fail(e, &self.live[r]),
                NoPick::Torch(_) => fail(e, &self.live[0]),
            });
        }
        let mut all = Choice {
            ids: Vec::with_capacity(self.live.len()),
            logprobs: Vec::with_capacity(self.live.len()),
        };
        for (r, u) in self.live.iter_mut().enumerate() {
            let row = processed.narrow(0, r as i64, 1);
            let pick = || choose(&row, sampling, &|_| true);
            let c = match (&mut u.rng, &self.rng_lock) {
                (Some(rng), Some(lock)) => rng.with(lock, pick)?,
                _ => pick(),
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
        on_token: &mut dyn FnMut(usize, i64),
    ) -> Result<Vec<Option<Feed>>> {
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
            let step = match (&mut u.rng, &self.rng_lock) {
                (Some(rng), Some(lock)) => {
                    rng.with(lock, || beam.step(&logits, &ctx, on_token))??
                }
                _ => beam.step(&logits, &ctx, on_token)?,
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
