//! Beam search and beam sampling, as transformers 5's vectorised `_beam_search`
//! (`generation/utils.py`: `_get_top_k_continuations`, `_update_finished_beams`,
//! `_check_early_stop_heuristic`):
//! - processors run on `log_softmax(logits)`; scores accumulate per beam;
//! - the top `max(2, 1 + n_eos) · num_beams` continuations of all beams are kept
//!   (sampled without replacement under `do_sample`); a continuation that hits a
//!   stopping criterion is finished only if it ranks in the top `num_beams`, with score
//!   `sum_logprobs / generated_len ** length_penalty` (generated tokens, EOS included);
//! - the best `num_beams` unfinished continuations run on;
//! - an item stops taking hypotheses once `num_beams` are finished and (early_stopping
//!   false) the best running beam at its current length, or ("never" with a positive
//!   length penalty) at the maximum length, cannot beat the worst finished one; with
//!   early_stopping true the search ends once every item has `num_beams` finished.
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::generate::{
    choose_k, finish_reason, EarlyStopping, FinishReason, Generated, GenerationConfig, Sampling,
    Step, StepContext, Strategy,
};
use crate::processors::{process, Processing, Row};

#[derive(Clone)]
struct Hyp {
    tokens: Vec<i64>,
    logprobs: Vec<f64>,
    /// Sum of the processed log-probabilities.
    score: f64,
}

struct Finished {
    /// The length-normalised score (transformers' `sequences_scores`).
    score: f64,
    hyp: Hyp,
    reason: FinishReason,
}

struct Item {
    prompt: Vec<i64>,
    running: Vec<Hyp>,
    finished: Vec<Finished>,
    /// False once no running beam can improve on the finished ones.
    improvable: bool,
}

pub(crate) struct Beam {
    items: Vec<Item>,
    num_beams: usize,
    num_return_sequences: usize,
    processing: Processing,
    generated: usize,
}

impl Beam {
    pub(crate) fn new(prompts: &[Vec<i64>], cfg: &GenerationConfig) -> Self {
        let first = Hyp {
            tokens: vec![],
            logprobs: vec![],
            score: 0.0,
        };
        // Only beam 0 is live at the start (the others score -1e9 in transformers).
        let mut others = first.clone();
        others.score = -1e9;
        let items = prompts
            .iter()
            .map(|p| Item {
                prompt: p.clone(),
                running: std::iter::once(first.clone())
                    .chain(std::iter::repeat_n(others.clone(), cfg.num_beams - 1))
                    .collect(),
                finished: Vec::new(),
                improvable: true,
            })
            .collect();
        let mut processing = cfg.processing.clone();
        // transformers keeps n_eos + 1 tokens through the warpers under beams.
        processing.min_tokens_to_keep = cfg.eos_token_ids.len() as i64 + 1;
        Self {
            items,
            num_beams: cfg.num_beams,
            num_return_sequences: cfg.num_return_sequences,
            processing,
            generated: 0,
        }
    }
}

impl Beam {
    /// The processed log-probabilities of every running beam's next token: (R, V).
    fn processed(&self, logits: &Tensor, cfg: &GenerationConfig) -> Tensor {
        let nb = self.num_beams;
        let histories: Vec<Vec<i64>> = self
            .items
            .iter()
            .flat_map(|it| {
                it.running
                    .iter()
                    .map(|h| [it.prompt.as_slice(), &h.tokens].concat())
            })
            .collect();
        let rows: Vec<Row> = histories
            .iter()
            .zip(
                self.items
                    .iter()
                    .flat_map(|it| std::iter::repeat_n(it.prompt.len(), nb)),
            )
            .map(|(h, prompt_len)| Row {
                tokens: h,
                prompt_len,
                limit: cfg.limit(prompt_len),
            })
            .collect();
        process(
            &self.processing,
            &logits.log_softmax(-1, Kind::Float),
            &rows,
            &cfg.eos_token_ids,
        )
    }

    /// The `k` best (or, sampling, drawn) continuations of each item over all its beams
    /// from the accumulated scores `acc` (B, nb·V): their scores and flat indices, best
    /// first. An error when an item still searching has too few tokens to choose from.
    fn candidates(&self, acc: &Tensor, k: i64, step: usize) -> Result<(Tensor, Tensor)> {
        let sampling = Sampling::of(self.processing.do_sample);
        choose_k(acc, k, sampling, &|i| self.items[i].improvable)
            .map_err(|e| e.at(step, |i| format!("prompt {i}")))
    }

    /// Item `i`'s continuations (ranked `cands`: beam, token, log-prob, score) become its
    /// finished hypotheses (those hitting a stopping criterion within the top `nb`) and
    /// its next running beams; returns the parent rows and tokens fed, and whether every
    /// continuation hit a criterion.
    fn advance_item(
        &mut self,
        i: usize,
        cands: &[(usize, i64, f64, f64)],
        ctx: &StepContext,
        feed: &mut Vec<i64>,
        parents: &mut Vec<i64>,
    ) -> bool {
        let cfg = ctx.cfg;
        let (nb, gen_len, lp) = (self.num_beams, self.generated, cfg.length_penalty);
        let item = &mut self.items[i];
        let mut all_hit = true;
        let mut next_running: Vec<(usize, Hyp)> = Vec::with_capacity(nb);
        let mut hit_rank: Vec<(usize, Hyp)> = Vec::new();
        let full = item.finished.len() >= nb && cfg.early_stopping == EarlyStopping::True;
        let limit = cfg.limit(item.prompt.len());
        for (rank, &(beam, tok, logp, score)) in cands.iter().enumerate() {
            let mut hyp = item.running[beam].clone();
            hyp.tokens.push(tok);
            hyp.logprobs.push(logp);
            hyp.score = score;
            match finish_reason(cfg, &hyp.tokens, limit, ctx.stop, ctx.timed_out) {
                None => {
                    all_hit = false;
                    if next_running.len() < nb {
                        next_running.push((beam, hyp));
                    }
                }
                Some(reason) => {
                    if rank < nb && item.improvable && !full {
                        let score = hyp.score / (gen_len as f64).powf(lp);
                        item.finished.push(Finished {
                            score,
                            hyp: hyp.clone(),
                            reason,
                        });
                    }
                    hit_rank.push((beam, hyp));
                }
            }
        }
        item.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
        item.finished.truncate(nb);
        // Fewer than nb live continuations: the rest run on at -1e9 and never win.
        for (beam, mut hyp) in hit_rank.into_iter().take(nb - next_running.len()) {
            hyp.score -= 1e9;
            next_running.push((beam, hyp));
        }
        item.running = next_running
            .into_iter()
            .map(|(beam, hyp)| {
                parents.push((i * nb + beam) as i64);
                feed.push(*hyp.tokens.last().expect("a token was just added"));
                hyp
            })
            .collect();
        if item.improvable && item.finished.len() >= nb {
            let best_len = if cfg.early_stopping == EarlyStopping::Never && lp > 0.0 {
                limit
            } else {
                gen_len
            };
            let best_possible = item.running[0].score / (best_len as f64).powf(lp);
            let worst = item.finished.last().map_or(f64::NEG_INFINITY, |f| f.score);
            item.improvable = best_possible > worst;
        }
        all_hit
    }
}

impl Strategy for Beam {
    fn step(
        &mut self,
        logits: &Tensor,
        ctx: &StepContext,
        _on_token: &mut dyn FnMut(usize, i64),
    ) -> Result<Step> {
        let cfg = ctx.cfg;
        let nb = self.num_beams;
        let (r, v) = logits.size2().expect("(R, V)");
        let b = self.items.len() as i64;
        let logp = self.processed(logits, cfg);
        let step = self.generated + 1;
        let running: Vec<f32> = self
            .items
            .iter()
            .flat_map(|it| it.running.iter().map(|h| h.score as f32))
            .collect();
        let running = Tensor::from_slice(&running)
            .to_device(logits.device())
            .view([r, 1]);
        let acc = (&logp + running).view([b, nb as i64 * v]); // (B, nb·V)
        let k = (2.max(1 + cfg.eos_token_ids.len()) * nb) as i64;
        let (top, idx) = self.candidates(&acc, k, step)?;
        let token_logp = logp.view([b, nb as i64 * v]).gather(1, &idx, false);
        let cpu = |t: Tensor| t.to_device(tch::Device::Cpu).contiguous().view(-1);
        let top: Vec<f64> = Vec::try_from(cpu(top)).expect("scores");
        let idx: Vec<i64> = Vec::try_from(cpu(idx)).expect("indices");
        let token_logp: Vec<f64> = Vec::try_from(cpu(token_logp)).expect("log-probs");
        let k = k as usize;
        self.generated += 1;
        let mut parents = Vec::with_capacity(r as usize);
        let mut feed = Vec::with_capacity(r as usize);
        let mut all_hit = true;
        for i in 0..self.items.len() {
            let cands: Vec<(usize, i64, f64, f64)> = (i * k..(i + 1) * k)
                .map(|j| ((idx[j] / v) as usize, idx[j] % v, token_logp[j], top[j]))
                .collect();
            all_hit &= self.advance_item(i, &cands, ctx, &mut feed, &mut parents);
        }
        let any_improvable = self.items.iter().any(|it| it.improvable);
        let all_full = cfg.early_stopping == EarlyStopping::True
            && self.items.iter().all(|it| it.finished.len() >= nb);
        Ok(if !any_improvable || all_full || all_hit {
            Step::Done
        } else {
            Step::Continue {
                feed,
                parents: Some(parents),
            }
        })
    }

    fn finish(self: Box<Self>) -> Vec<Vec<Generated>> {
        let n = self.num_return_sequences;
        self.items
            .into_iter()
            .map(|it| {
                it.finished
                    .into_iter()
                    .take(n)
                    .map(|f| Generated {
                        tokens: f.hyp.tokens,
                        logprobs: f.hyp.logprobs,
                        score: f.score,
                        finish_reason: f.reason,
                        raw_logprobs: vec![],
                    })
                    .collect()
            })
            .collect()
    }
}
