//! The engine: independent sequences, each in its own row of the KV cache (its slot),
//! decoded together one step at a time. A sequence joins between steps (its prompt
//! prefilled into a free slot, in chunks when long) and leaves as soon as it finishes
//! (its slot freed for the next one), so a finished sequence costs nothing afterwards
//! and every step runs the live rows only, each at its own length. This is continuous
//! batching as vLLM's scheduler does it (`vllm/v1/core/sched/scheduler.py`: a waiting
//! queue, a running set, sequences admitted whenever a slot frees), with llama.cpp's
//! view of a step (`llama_batch`: every token with its own position and sequence).
//!
//! A unit joins and leaves whole: one sequence (greedy or sampled), or one prompt's
//! beams (a group whose rows are reordered through the cache's slot table). Greedy and
//! sampled rows are processed together each step; each sampled sequence draws from its
//! own generator (`SeqRng`), seeded `seed + k` for output row k, so that a sequence
//! gives the same tokens whatever else is decoded beside it.
use std::collections::VecDeque;
use std::time::Instant;

use tch::{Device, Tensor};

use crate::beam::Beam;
use crate::cache::KvCache;
use crate::ensemble::Ensemble;
use crate::error::Result;
use crate::processors::{process, Row};
use crate::rng::{self, RngLock, SeqRng};

use super::{
    choose, finish_reason, Choice, FinishReason, Generated, GenerationConfig, NoPick, Sampling,
    Step, StepContext, StopCheck, Strategy,
};

/// How the engine admits sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Schedule {
    /// At most this many rows decode at once (a beam group counts its beams); `None`:
    /// every request at once.
    pub max_num_seqs: Option<usize>,
    /// Admit only when no sequence is running (static batches, each run to its longest
    /// member), instead of refilling a freed slot at once.
    pub static_batches: bool,
}

/// Longest prompt piece prefilled in one forward pass.
const PREFILL_CHUNK: usize = 512;

/// One request: a prompt and how many new tokens it may take.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<i64>,
    pub max_new_tokens: usize,
}

/// What a unit decodes with.
enum Kind {
    /// One sequence: prompt then generated tokens, and its output so far.
    One { tokens: Vec<i64>, out: Generated },
    /// One prompt's beams (`num_beams` rows), and the settings with its length limit.
    Beams(Box<Beam>, Box<GenerationConfig>),
}

/// Sequences that join and leave together.
struct Unit {
    /// The request it serves and its first output row (`request × per_request + j`).
    request: usize,
    row: usize,
    prompt_len: usize,
    limit: usize,
    /// Its cache rows, one per decoded row.
    slots: Vec<usize>,
    /// Per model: the hidden state of each row's newest position (rows, E).
    hidden: Vec<Tensor>,
    rng: Option<SeqRng>,
    kind: Kind,
}

impl Unit {
    fn rows(&self) -> usize {
        self.slots.len()
    }
}

/// Per request, its finished sequences (output row order; beams best first).
pub type Finished = Vec<Vec<Generated>>;

pub struct Engine<'a> {
    models: &'a Ensemble<'a>,
    cfg: &'a GenerationConfig,
    schedule: Schedule,
    /// Per model: the slot pool.
    caches: Vec<KvCache>,
    free: Vec<usize>,
    waiting: VecDeque<usize>,
    live: Vec<Unit>,
    requests: Vec<Request>,
    /// Units per request (its samples), rows per unit (its beams).
    per_request: usize,
    beams: usize,
    done: Vec<Vec<Option<Generated>>>,
    started: Instant,
    /// Decode steps taken.
    pub steps: usize,
    device: Device,
    /// Held while sequences draw from their own generators (libtorch's are global).
    rng_lock: Option<RngLock>,
    threads: Threads,
}

impl<'a> Engine<'a> {
    /// An engine for `requests` under `cfg` (validated by the caller), with a slot pool
    /// sized for the schedule and the longest request.
    pub fn new(
        models: &'a Ensemble<'a>,
        cfg: &'a GenerationConfig,
        requests: Vec<Request>,
        schedule: Schedule,
    ) -> Self {
        let beams = cfg.num_beams.max(1);
        let per_request = if beams > 1 {
            1
        } else {
            cfg.num_return_sequences.max(1)
        };
        let rows = requests.len() * per_request * beams;
        let pool = schedule
            .max_num_seqs
            .map_or(rows, |m| m.max(beams).min(rows));
        let capacity = requests
            .iter()
            .map(|r| r.prompt.len() + r.max_new_tokens)
            .max()
            .unwrap_or(1)
            .max(1) as i64;
        let caches = models
            .models
            .iter()
            .map(|m| m.new_cache(pool as i64, capacity))
            .collect();
        let waiting = (0..requests.len() * per_request).collect();
        let done = (0..requests.len())
            .map(|_| {
                vec![
                    None;
                    if beams > 1 {
                        cfg.num_return_sequences
                    } else {
                        per_request
                    }
                ]
            })
            .collect();
        Self {
            device: models.models[0].device(),
            models,
            cfg,
            schedule,
            caches,
            free: (0..pool).rev().collect(),
            waiting,
            live: Vec::new(),
            requests,
            per_request,
            beams,
            done,
            started: Instant::now(),
            steps: 0,
            rng_lock: (cfg.seed.is_some() && cfg.processing.do_sample).then(rng::lock),
            threads: Threads(None),
        }
    }

    /// Whether every request has finished.
    pub fn is_idle(&self) -> bool {
        self.live.is_empty() && self.waiting.is_empty()
    }

    /// The finished sequences per request (after `is_idle`).
    pub fn finish(self) -> Finished {
        self.done
            .into_iter()
            .map(|seqs| seqs.into_iter().flatten().collect())
            .collect()
    }

    /// Admits waiting units into free slots (all of them that fit, or with static
    /// batches only when nothing runs) and prefills their prompts.
    fn admit(&mut self) -> Result<()> {
        if self.schedule.static_batches && !self.live.is_empty() {
            return Ok(());
        }
        let mut joined = Vec::new();
        while let Some(&u) = self.waiting.front() {
            if self.free.len() < self.beams {
                break;
            }
            self.waiting.pop_front();
            let slots: Vec<usize> = (0..self.beams).filter_map(|_| self.free.pop()).collect();
            joined.push(self.unit(u, slots)?);
        }
        self.prefill(&mut joined)?;
        self.live.extend(joined);
        Ok(())
    }

    /// Unit `u` (request `u / per_request`) in `slots`, not yet prefilled.
    fn unit(&self, u: usize, slots: Vec<usize>) -> Result<Unit> {
        let request = u / self.per_request;
        let req = &self.requests[request];
        let row = u;
        let sampled = self.cfg.processing.do_sample;
        let rng = match self.cfg.seed {
            Some(seed) if sampled => {
                Some(SeqRng::seeded(seed.wrapping_add(row as u64), self.device)?)
            }
            _ => None,
        };
        let kind = if self.beams > 1 {
            let mut cfg = self.cfg.clone();
            cfg.max_new_tokens = req.max_new_tokens;
            cfg.max_length = None;
            let beam = Beam::new(std::slice::from_ref(&req.prompt), &cfg);
            Kind::Beams(Box::new(beam), Box::new(cfg))
        } else {
            Kind::One {
                tokens: req.prompt.clone(),
                out: Generated {
                    tokens: vec![],
                    logprobs: vec![],
                    score: 0.0,
                    finish_reason: FinishReason::Length,
                },
            }
        };
        Ok(Unit {
            request,
            row,
            prompt_len: req.prompt.len(),
            limit: req.max_new_tokens,
            slots,
            hidden: Vec::new(),
            rng,
            kind,
        })
    }

    /// Prefills the joined units: each distinct request once (the prompts of one length
    /// together, in chunks), then copied to its other units' and beams' slots.
    fn prefill(&mut self, joined: &mut [Unit]) -> Result<()> {
        // The first unit of each request among the joined does the forward pass.
        let mut firsts: Vec<usize> = Vec::new();
        for (i, u) in joined.iter().enumerate() {
            if !firsts.iter().any(|&f| joined[f].request == u.request) {
                firsts.push(i);
            }
        }
        let mut by_len: Vec<(usize, Vec<usize>)> = Vec::new();
        for &f in &firsts {
            let n = joined[f].prompt_len;
            match by_len.iter_mut().find(|(len, _)| *len == n) {
                Some((_, group)) => group.push(f),
                None => by_len.push((n, vec![f])),
            }
        }
        for (len, group) in by_len {
            let rows: Vec<usize> = group.iter().map(|&f| joined[f].slots[0]).collect();
            let ids: Vec<i64> = group
                .iter()
                .flat_map(|&f| self.requests[joined[f].request].prompt.iter().copied())
                .collect();
            let ids = Tensor::from_slice(&ids)
                .view([group.len() as i64, len as i64])
                .to_device(self.device);
            let tokens = group.len() * len.min(PREFILL_CHUNK);
            let models = &self.models.models;
            self.threads
                .one(models.iter().all(|m| m.prefills_on_kernels(tokens)));
            for (m, (model, cache)) in self.models.models.iter().zip(&mut self.caches).enumerate() {
                let mut h = None;
                for start in (0..len).step_by(PREFILL_CHUNK) {
                    let t = PREFILL_CHUNK.min(len - start) as i64;
                    let span = cache.span(Some(&rows), t).map_err(crate::Error::Input)?;
                    let piece = ids.narrow(1, start as i64, t);
                    h = Some(model.forward_span(&piece, cache, &span));
                }
                let h = h.expect("prompts are not empty").select(1, -1); // (G, E)
                for (i, &f) in group.iter().enumerate() {
                    let hidden = &mut joined[f].hidden;
                    hidden.resize_with(m + 1, Tensor::new);
                    hidden[m] = h.narrow(0, i as i64, 1);
                }
            }
        }
        // The other units of a request, and every beam, copy the first's slot.
        for i in 0..joined.len() {
            let f = firsts
                .iter()
                .copied()
                .find(|&f| joined[f].request == joined[i].request)
                .expect("every request has a first");
            let from = joined[f].slots[0];
            let hidden: Vec<Tensor> = joined[f].hidden.iter().map(|h| h.shallow_clone()).collect();
            let u = &mut joined[i];
            for cache in &mut self.caches {
                for &to in &u.slots {
                    if to != from {
                        cache.copy_row(from, to);
                    }
                }
            }
            let rows = u.rows() as i64;
            u.hidden = hidden
                .iter()
                .map(|h| h.expand([rows, h.size()[1]], false).contiguous())
                .collect();
        }
        Ok(())
    }

    /// One step: admit what fits, pick a token for every live row, let finished units
    /// leave, feed the picked tokens. `on_token(row, id)` sees each picked token of a
    /// single sequence (output row `row`).
    pub fn step(&mut self, stop: StopCheck, on_token: &mut dyn FnMut(usize, i64)) -> Result<()> {
        self.admit()?;
        if self.live.is_empty() {
            return Ok(());
        }
        let rows = self.live.iter().map(Unit::rows).sum();
        let models = &self.models.models;
        self.threads
            .one(models.iter().all(|m| m.decodes_on_kernels(rows)));
        let hidden: Vec<Tensor> = (0..self.models.models.len())
            .map(|m| {
                Tensor::cat(
                    &self.live.iter().map(|u| &u.hidden[m]).collect::<Vec<_>>(),
                    0,
                )
            })
            .collect();
        let scores = self.models.scores(&hidden); // (R, V)
        let timed_out = self
            .cfg
            .max_time
            .is_some_and(|t| self.started.elapsed() >= t);
        self.steps += 1;
        let feeds = if self.beams > 1 {
            self.pick_beams(&scores, stop, timed_out, on_token)?
        } else {
            self.pick_singles(&scores, stop, timed_out, on_token)?
        };
        self.retire(&feeds);
        self.feed(feeds)
    }

    /// Greedy or sampled tokens for every live sequence; per unit, the token to feed
    /// (`None`: it finished).
    fn pick_singles(
        &mut self,
        scores: &Tensor,
        stop: StopCheck,
        timed_out: bool,
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
            match finish_reason(cfg, &out.tokens, u.limit, stop, timed_out) {
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

    /// Each beam group's step on its rows' logits.
    fn pick_beams(
        &mut self,
        scores: &Tensor,
        stop: StopCheck,
        timed_out: bool,
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
            let ctx = StepContext {
                cfg,
                stop,
                timed_out,
            };
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

    /// Finished units leave: their slots are freed, their sequences stored.
    fn retire(&mut self, feeds: &[Option<Feed>]) {
        let mut keep = Vec::with_capacity(self.live.len());
        for (u, f) in std::mem::take(&mut self.live).into_iter().zip(feeds) {
            if f.is_some() {
                keep.push(u);
                continue;
            }
            for cache in &mut self.caches {
                for &s in &u.slots {
                    cache.free_row(s);
                }
            }
            self.free.extend(u.slots.iter().rev());
            let j = u.row % self.per_request;
            match u.kind {
                Kind::One { out, .. } => self.done[u.request][j] = Some(out),
                Kind::Beams(beam, _) => {
                    let seqs = Strategy::finish(beam).into_iter().next();
                    for (j, g) in seqs.into_iter().flatten().enumerate() {
                        self.done[u.request][j] = Some(g);
                    }
                }
            }
        }
        self.live = keep;
    }

    /// Feeds every continuing unit's tokens (after reordering beams' slots).
    fn feed(&mut self, feeds: Vec<Option<Feed>>) -> Result<()> {
        let feeds: Vec<Feed> = feeds.into_iter().flatten().collect();
        if feeds.is_empty() {
            return Ok(());
        }
        // Beams: row i of a group continues its parent's slots (through the table).
        if feeds.iter().any(|f| f.parents.is_some()) {
            let b = self.caches[0].batch_size();
            let mut index: Vec<i64> = (0..b).collect();
            for (u, f) in self.live.iter().zip(&feeds) {
                if let Some(parents) = &f.parents {
                    for (&slot, &p) in u.slots.iter().zip(parents) {
                        index[slot] = u.slots[p as usize] as i64;
                    }
                }
            }
            let index = Tensor::from_slice(&index);
            for cache in &mut self.caches {
                cache.reorder(&index);
            }
        }
        let slots: Vec<usize> = self
            .live
            .iter()
            .flat_map(|u| u.slots.iter().copied())
            .collect();
        let ids: Vec<i64> = feeds
            .iter()
            .flat_map(|f| f.tokens.iter().copied())
            .collect();
        let r = ids.len() as i64;
        let ids = Tensor::from_slice(&ids).view([r, 1]).to_device(self.device);
        for (m, (model, cache)) in self.models.models.iter().zip(&mut self.caches).enumerate() {
            let span = cache.span(Some(&slots), 1).map_err(crate::Error::Input)?;
            let h = model.forward_span(&ids, cache, &span).select(1, 0); // (R, E)
            let mut offset = 0;
            for u in &mut self.live {
                let n = u.rows() as i64;
                u.hidden[m] = h.narrow(0, offset, n);
                offset += n;
            }
        }
        Ok(())
    }
}

/// The tokens a continuing unit feeds next, one per row, and for beams the row of the
/// group each new row continues.
struct Feed {
    tokens: Vec<i64>,
    parents: Option<Vec<i64>>,
}

/// Limits libtorch's intra-op threads to one while the kernels' own pool does the matrix
/// products: libtorch's threads would only fight it for the cores over the small ops
/// between them (measured on a 2-core machine: a prompt of 8 × 11 tokens 20% faster).
/// Holds the count to restore; switches only when the wanted state changes.
struct Threads(Option<i32>);

impl Threads {
    fn one(&mut self, on: bool) {
        match (on, self.0) {
            (true, None) => {
                self.0 = Some(tch::get_num_threads());
                tch::set_num_threads(1);
            }
            (false, Some(n)) => {
                tch::set_num_threads(n);
                self.0 = None;
            }
            _ => {}
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.one(false);
    }
}
