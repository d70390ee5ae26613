//! Speculative decoding as the engine's step (Leviathan et al. 2023, "Fast Inference
//! from Transformers via Speculative Decoding"; Chen et al. 2023): every live sequence's
//! drafter proposes up to k tokens, the target scores the sequence's unfed tail and the
//! drafts in one pass over its cache row (t = k + 1 tokens per row, the step's rows
//! together), the accept rule keeps a prefix of the drafts and adds the target's own
//! token, and the row rolls back to what was kept. Which drafter and which rule come from
//! a [`Speculator`] (`speculative.rs`); the processors, token choice (`choose`), the
//! sequences' own generators and `finish_reason` are the engine's.
//!
//! A speculating row holds every token of its sequence but the last, so a round feeds
//! that token and the drafts. Its prompt is not prefilled on admission: the first
//! round's pass feeds the prompt and the first drafts together, as transformers'
//! assisted generation does, so one verification is one forward pass of the target.
use tch::{Kind, Tensor};

use super::{Engine, Feed, Kind as UnitKind, OnToken, Request, Schedule};
use crate::cache::KvCache;
use crate::ensemble::Ensemble;
use crate::error::{Error, Result};
use crate::generate::{choose, finish_reason, GenerationConfig, NoPick, Sampling, StopCheck};
use crate::model::Gpt2;
use crate::processors::{process, Row};
use crate::rng::{self, RngLock, SeqRng};

/// One sequence's turn to draft.
pub struct Ask<'t> {
    /// Its cache row; a drafter with a cache of its own keeps the same row index.
    pub slot: usize,
    /// Prompt then generated tokens.
    pub tokens: &'t [i64],
    pub prompt_len: usize,
    /// How many tokens the sequence may generate (for the processors).
    pub limit: usize,
    /// At most this many drafts (fewer when the sequence is near its limit).
    pub want: usize,
    /// Names the sequence in errors ("prompt 2").
    pub who: String,
}

impl Ask<'_> {
    /// Tokens generated so far.
    pub fn done(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// A drafter's proposal for one sequence.
#[derive(Debug, Default, Clone)]
pub struct Proposal {
    pub tokens: Vec<i64>,
    /// The distribution each token was drawn from (a sampling draft model); empty: each
    /// token is a point mass (greedy drafts, prompt lookup).
    pub q: Vec<Vec<f64>>,
}

/// Picks one token per row of processed scores (R, V), row i for `asks[rows[i]]`, each
/// sampled row drawing from its sequence's own generator. A `NoPick::Row` names the
/// row of the scores.
pub type Pick<'p> = dyn FnMut(&Tensor, &[usize]) -> std::result::Result<Vec<i64>, NoPick> + 'p;

/// Where drafts come from and the rule that judges them.
pub trait Speculator {
    /// A proposal per ask (its `want` tokens at most), drawn through `pick`.
    fn propose(&mut self, asks: &[Ask], pick: &mut Pick) -> Result<Vec<Proposal>>;
    /// Cache row `slot` keeps its first `len` tokens (0: its sequence left).
    fn roll_back(&mut self, slot: usize, len: usize);
    /// The accept rule over the target's processed `scores` (n + 1, V) for a proposal of
    /// n tokens: the drafts kept, then the target's own token. `done`: tokens generated so
    /// far. It draws from libtorch's default generator, which holds the sequence's own.
    fn accept(
        &self,
        scores: &Tensor,
        proposal: &Proposal,
        sampling: Sampling,
        done: usize,
        who: &str,
    ) -> Result<Vec<i64>>;
}

/// Counts of a speculative run.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpecStats {
    /// Verification passes, one per sequence per round (a sequence's first one feeds its
    /// prompt too): the target's forward passes when sequences decode one at a time.
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

/// The engine's speculative mode.
pub(super) struct Speculation<'a> {
    drafter: Box<dyn Speculator + 'a>,
    k: usize,
    stats: SpecStats,
}

impl<'a> Engine<'a> {
    /// An engine that decodes each request speculatively with one target model, drafting
    /// `k` tokens per round with the speculator `make(slots, capacity)` builds for the
    /// engine's slot pool. One sequence per request (no beams, no samples).
    pub fn speculative(
        models: &'a Ensemble<'a>,
        cfg: &'a GenerationConfig,
        requests: Vec<Request>,
        schedule: Schedule,
        k: usize,
        make: impl FnOnce(usize, usize) -> Box<dyn Speculator + 'a>,
    ) -> Result<Self> {
        if models.models.len() != 1 || cfg.num_beams > 1 || cfg.num_return_sequences > 1 {
            return Err(Error::Input(
                "speculative decoding runs one target model for one sequence per prompt".into(),
            ));
        }
        let mut engine = Self::new(models, cfg, requests, schedule);
        let (slots, capacity) = (engine.free.len(), engine.caches[0].capacity());
        engine.spec = Some(Speculation {
            drafter: make(slots, capacity as usize),
            k,
            stats: SpecStats::default(),
        });
        Ok(engine)
    }

    /// The counts so far of a speculative engine (zero otherwise).
    pub fn spec_stats(&self) -> SpecStats {
        self.spec.as_ref().map(|s| s.stats).unwrap_or_default()
    }

    /// One speculative round for every live sequence (admitted already).
    pub(super) fn speculate(&mut self, stop: StopCheck, on_token: OnToken) -> Result<()> {
        let Some(mut spec) = self.spec.take() else {
            return Ok(());
        };
        // libtorch keeps to one thread while the kernels' pool runs the passes (as in a
        // plain step); a round feeds up to k + 1 tokens per row.
        let tokens = self.live.len() * (spec.k + 1);
        let on_kernels = self.models.models[0].prefills_on_kernels(tokens);
        self.threads.one(on_kernels);
        // The generators leave their units while the drafter draws through them.
        let mut rngs: Vec<Option<SeqRng>> = self.live.iter_mut().map(|u| u.rng.take()).collect();
        let out = self.round(&mut spec, &mut rngs, stop, on_token);
        for (u, rng) in self.live.iter_mut().zip(rngs) {
            u.rng = rng;
        }
        self.spec = Some(spec);
        let feeds = out?;
        self.steps += 1;
        self.retire(&feeds);
        Ok(())
    }

    fn round(
        &mut self,
        spec: &mut Speculation,
        rngs: &mut [Option<SeqRng>],
        stop: StopCheck,
        on_token: OnToken,
    ) -> Result<Vec<Option<Feed>>> {
        let cfg = self.cfg;
        let sampling = Sampling::of(cfg.processing.do_sample);
        let asks: Vec<Ask> = self
            .live
            .iter()
            .map(|u| {
                let UnitKind::One { tokens, out } = &u.kind else {
                    unreachable!("a speculative engine runs single sequences")
                };
                let room = u.limit - out.tokens.len();
                Ask {
                    slot: u.slots[0],
                    tokens,
                    prompt_len: u.prompt_len,
                    limit: u.limit,
                    want: spec.k.min(room.saturating_sub(1)),
                    who: format!("prompt {}", u.request),
                }
            })
            .collect();
        // Held while sequences draw from their own generators (libtorch's are global).
        let held = rngs.iter().any(Option::is_some).then(rng::lock);
        let lock = &held;
        let mut pick = |s: &Tensor, rows: &[usize]| pick_rows(s, rows, rngs, lock, sampling);
        let props = spec.drafter.propose(&asks, &mut pick)?;
        let model = self.models.models[0];
        let scores = verify(
            model,
            self.models,
            &mut self.caches[0],
            cfg,
            &asks,
            &props,
            spec.k,
        )?;
        let logp = scores.log_softmax(-1, Kind::Float);
        drop(asks);
        let timed_out = self.timed_out();
        let mut feeds = Vec::with_capacity(self.live.len());
        let mut offset = 0;
        for ((u, rng), p) in self.live.iter_mut().zip(rngs.iter_mut()).zip(&props) {
            let n = p.tokens.len() as i64 + 1;
            let s = scores.narrow(0, offset, n);
            let UnitKind::One { tokens, out } = &mut u.kind else {
                unreachable!("a speculative engine runs single sequences")
            };
            let who = format!("prompt {}", u.request);
            let done = out.tokens.len();
            let judge = || spec.drafter.accept(&s, p, sampling, done, &who);
            let kept = match (rng, lock) {
                (Some(rng), Some(lock)) => rng.with(lock, judge)??,
                _ => judge()?,
            };
            spec.stats.steps += 1;
            spec.stats.proposed += p.tokens.len();
            spec.stats.accepted += kept.len() - 1;
            // Emit in order, stopping at EOS, a stop string or the length limit (time
            // only after the round's last token).
            let mut reason = None;
            for (j, &tok) in kept.iter().enumerate() {
                let lp = logp.double_value(&[offset + j as i64, tok]);
                out.tokens.push(tok);
                out.logprobs.push(lp);
                out.score += lp;
                tokens.push(tok);
                on_token(u.row, tok, None);
                let late = timed_out && j + 1 == kept.len();
                reason = finish_reason(cfg, &out.tokens, u.limit, stop, late);
                if reason.is_some() {
                    break;
                }
            }
            offset += n;
            let slot = u.slots[0];
            if let Some(r) = reason {
                out.finish_reason = r;
                spec.drafter.roll_back(slot, 0);
                feeds.push(None);
            } else {
                // Roll back: the rows keep every token of the sequence but its last.
                let len = tokens.len() - 1;
                self.caches[0].truncate_row(slot, len as i64);
                spec.drafter.roll_back(slot, len);
                feeds.push(Some(Feed {
                    tokens: vec![],
                    parents: None,
                }));
            }
        }
        Ok(feeds)
    }
}

/// The target's processed scores for every proposal, (N, V) with N = Σ (drafts + 1): each
/// row's unfed tail and its drafts fed in one pass (padded to `k + 1` tokens), row i of a
/// sequence predicting the token after its tokens and `drafts[..i]`.
fn verify(
    model: &Gpt2,
    models: &Ensemble,
    cache: &mut KvCache,
    cfg: &GenerationConfig,
    asks: &[Ask],
    props: &[Proposal],
    k: usize,
) -> Result<Tensor> {
    let fed: Vec<(usize, Vec<i64>)> = asks
        .iter()
        .zip(props)
        .map(|(a, p)| {
            let have = cache.row_len(a.slot) as usize;
            (a.slot, [&a.tokens[have..], &p.tokens].concat())
        })
        .collect();
    let hidden = feed_rows(model, cache, &fed, k + 1)?;
    let last: Vec<Tensor> = hidden
        .iter()
        .zip(props)
        .map(|(h, p)| {
            let n = p.tokens.len() as i64 + 1;
            h.narrow(0, h.size()[0] - n, n)
        })
        .collect();
    let logits = models.scores(&[Tensor::cat(&last, 0)]); // (N, V)
    let hist: Vec<(Vec<i64>, usize, usize)> = asks
        .iter()
        .zip(props)
        .flat_map(|(a, p)| {
            (0..=p.tokens.len())
                .map(|i| ([a.tokens, &p.tokens[..i]].concat(), a.prompt_len, a.limit))
        })
        .collect();
    let rows: Vec<Row> = hist
        .iter()
        .map(|(tokens, prompt_len, limit)| Row {
            tokens,
            prompt_len: *prompt_len,
            limit: *limit,
        })
        .collect();
    Ok(process(&cfg.processing, &logits, &rows, &cfg.eos_token_ids))
}

/// One token per row of processed `scores` (R, V), row i for sequence `rows[i]`; a
/// sampled row with a generator in `rngs` draws from it.
fn pick_rows(
    scores: &Tensor,
    rows: &[usize],
    rngs: &mut [Option<SeqRng>],
    lock: &Option<RngLock>,
    sampling: Sampling,
) -> std::result::Result<Vec<i64>, NoPick> {
    let seeded = rows.iter().any(|&r| rngs[r].is_some());
    if sampling == Sampling::ArgMax || !seeded {
        return Ok(choose(scores, sampling, &|_| true)?.ids);
    }
    let mut ids = Vec::with_capacity(rows.len());
    for (i, &r) in rows.iter().enumerate() {
        let row = scores.narrow(0, i as i64, 1);
        let pick = || choose(&row, sampling, &|_| true);
        let c = match (&mut rngs[r], lock) {
            (Some(rng), Some(lock)) => rng.with(lock, pick).map_err(|e| match e {
                Error::Torch(t) => NoPick::Torch(t),
                other => NoPick::Torch(tch::TchError::Torch(other.to_string())),
            })?,
            _ => pick(),
        };
        let c = c.map_err(|e| match e {
            NoPick::Row(_, why) => NoPick::Row(i, why),
            torch => torch,
        })?;
        ids.extend(c.ids);
    }
    Ok(ids)
}

/// Feeds each row's tokens (its cache row, the tokens) to `model` at the row's next
/// slot, and gives the hidden states of each row's tokens, (n, E). Rows of at most
/// `pad_to` tokens share one pass, each padded at its end to the longest (the padding is
/// written past the row's length and rolled back at once; none of the row's queries
/// sees it); a longer row (a prompt), or one with no room for the padding, goes with the
/// rows of its own length.
pub fn feed_rows(
    model: &Gpt2,
    cache: &mut KvCache,
    rows: &[(usize, Vec<i64>)],
    pad_to: usize,
) -> Result<Vec<Tensor>> {
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, (slot, tokens)) in rows.iter().enumerate() {
        let room = cache.capacity() - cache.row_len(*slot);
        let padded = tokens.len() <= pad_to && pad_to as i64 <= room;
        let key = if padded { 0 } else { tokens.len() };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, group)) => group.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    let mut out: Vec<Tensor> = rows.iter().map(|_| Tensor::new()).collect();
    for (_, group) in groups {
        let t = group.iter().map(|&i| rows[i].1.len()).max().unwrap_or(0);
        if t == 0 {
            return Err(Error::Input(
                "a speculative pass with no tokens to feed".into(),
            ));
        }
        let ids: Vec<i64> = group
            .iter()
            .flat_map(|&i| {
                let tokens = &rows[i].1;
                let pad = *tokens.last().unwrap_or(&0);
                (0..t).map(move |j| tokens.get(j).copied().unwrap_or(pad))
            })
            .collect();
        let slots: Vec<usize> = group.iter().map(|&i| rows[i].0).collect();
        let span = cache.span(Some(&slots), t as i64).map_err(Error::Input)?;
        let ids = Tensor::from_slice(&ids)
            .view([group.len() as i64, t as i64])
            .to_device(model.device());
        let h = model.forward_span(&ids, cache, &span); // (G, t, E)
        for (j, &i) in group.iter().enumerate() {
            let n = rows[i].1.len() as i64;
            if n < t as i64 {
                cache.truncate_row(slots[j], span.starts[j] + n);
            }
            out[i] = h.get(j as i64).narrow(0, 0, n);
        }
    }
    Ok(out)
}
