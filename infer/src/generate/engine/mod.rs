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
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

mod admit;
mod pick;
mod speculate;
use std::time::Instant;

use tch::{Device, Tensor};

use crate::cache::KvCache;
use crate::ensemble::Ensemble;
use crate::error::Result;
use crate::generate::beam::Beam;
use crate::prefix::PrefixCache;
use crate::rng::SeqRng;
use crate::sequence::{FinishReason, Logprobs};

use super::{Generated, GenerationConfig, StepContext, StopCheck, Strategy};
pub use speculate::{feed_rows, Ask, Pick, Proposal, SpecStats, Speculator};

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

/// Longest prompt fed one token a step beside the running sequences instead of in a
/// pass of its own. On the CPU kernels a pass costs about 15 ms plus 0.8 ms a row (124M
/// shape, 2 cores), so a short prompt's own pass costs more than its tokens riding along
/// the decode steps; but each step it rides costs the slot a token, about an eighth of a
/// full step: worth it while (p − 1) × 2.7 ms < 15 ms, p ≤ 6.
const RIDE_ALONG_MAX: usize = 6;

/// One request: a prompt, how many new tokens it may take, and optionally its own
/// settings.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<i64>,
    pub max_new_tokens: usize,
    /// This request's own sampling settings, processors, seed and EOS ids (`None`: the
    /// engine's). Only for one sequence a request (no beams, one return sequence): its
    /// sequence draws from a generator seeded with its own `seed` (not `seed + k`), so it
    /// gives the same tokens whenever it runs and whatever runs beside it.
    pub settings: Option<Arc<GenerationConfig>>,
    /// The LoRA adapter (`Gpt2::add_adapter`'s index, on the first model) this request
    /// runs with; `None`: the model's default (`Gpt2::set_default_adapter`).
    pub adapter: Option<usize>,
}

impl Request {
    /// One request per prompt, each with the settings' token limit for its length.
    pub fn each(prompts: &[Vec<i64>], cfg: &GenerationConfig) -> Vec<Request> {
        prompts
            .iter()
            .map(|p| Request {
                prompt: p.clone(),
                max_new_tokens: cfg.limit(p.len()),
                settings: None,
                adapter: None,
            })
            .collect()
    }
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
    /// The request's own settings (`Request::settings`).
    settings: Option<Arc<GenerationConfig>>,
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

/// What sees each picked token: its output row, its id and, where asked for, its raw
/// log-probabilities.
pub type OnToken<'a> = &'a mut dyn FnMut(usize, i64, Option<&Logprobs>);

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
    /// Units whose prompts ride along the decode steps, a token a step (`RIDE_ALONG_MAX`),
    /// with how many of their prompt tokens are in the cache; each joins `live` when its
    /// last prompt token is fed.
    feeding: Vec<(Unit, usize)>,
    requests: Vec<Request>,
    /// Units per request (its samples), rows per unit (its beams).
    per_request: usize,
    beams: usize,
    done: Vec<Vec<Option<Generated>>>,
    /// Per request, whether `take_finished` has returned it.
    taken: Vec<bool>,
    /// Why a request with its own settings ended with `FinishReason::Error`, until
    /// `take_error`.
    errors: HashMap<usize, String>,
    started: Instant,
    /// Decode steps taken.
    pub steps: usize,
    device: Device,
    threads: Threads,
    /// Speculative decoding's drafter and counts (`speculate`), when it runs that way.
    spec: Option<speculate::Speculation<'a>>,
    /// Recent prompts' keys and values, shared with the engines that follow this one.
    prefix: Option<Arc<Mutex<PrefixCache>>>,
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
        let rows = requests.len() * cfg.num_return_sequences.max(cfg.num_beams).max(1);
        let slots = schedule.max_num_seqs.map_or(rows, |m| m.min(rows));
        let capacity = requests
            .iter()
            .map(|r| r.prompt.len() + r.max_new_tokens)
            .max()
            .unwrap_or(1);
        let mut engine = Self::with_pool(models, cfg, schedule, slots, capacity);
        for r in requests {
            engine.queue(r);
        }
        engine
    }

    /// An empty engine with `slots` cache rows (at least one beam group's) of `capacity`
    /// positions each, to which requests are added while it runs (`add`).
    pub fn with_pool(
        models: &'a Ensemble<'a>,
        cfg: &'a GenerationConfig,
        schedule: Schedule,
        slots: usize,
        capacity: usize,
    ) -> Self {
        let beams = cfg.num_beams.max(1);
        let per_request = if beams > 1 {
            1
        } else {
            cfg.num_return_sequences.max(1)
        };
        let pool = slots.max(beams);
        let caches = models
            .models
            .iter()
            .map(|m| m.new_cache(pool as i64, capacity.max(1) as i64))
            .collect();
        Self {
            device: models.models[0].device(),
            models,
            cfg,
            schedule,
            caches,
            free: (0..pool).rev().collect(),
            waiting: VecDeque::new(),
            live: Vec::new(),
            feeding: Vec::new(),
            requests: Vec::new(),
            per_request,
            beams,
            done: Vec::new(),
            taken: Vec::new(),
            errors: HashMap::new(),
            started: Instant::now(),
            steps: 0,
            threads: Threads(None),
            spec: None,
            prefix: None,
        }
    }

    /// Reuses and keeps prompts' keys and values in `cache` (see `crate::prefix`), which
    /// outlives this engine. Speculative engines do not use it.
    pub fn with_prefix_cache(mut self, cache: Arc<Mutex<PrefixCache>>) -> Self {
        if self.spec.is_none() {
            self.prefix = Some(cache);
        }
        self
    }

    /// Queues a request (checked by the caller against the settings, e.g. with
    /// `validate_requests`); returns its id, the index of its sequences in `finish` and
    /// `take_finished`. An error when it cannot fit a cache row.
    pub fn add(&mut self, request: Request) -> Result<usize> {
        let need = request.prompt.len().saturating_add(request.max_new_tokens);
        let capacity = self.caches[0].capacity() as usize;
        if request.prompt.is_empty() || request.max_new_tokens == 0 || need > capacity {
            return Err(crate::Error::Input(format!(
                "a request of {} prompt tokens and max_new_tokens {} needs {need} positions; \
                 the engine's rows hold {capacity} (and both must be at least 1)",
                request.prompt.len(),
                request.max_new_tokens
            )));
        }
        let held = self.models.models[0].adapter_count();
        if let Some(a) = request.adapter.filter(|&a| a >= held) {
            return Err(crate::Error::Input(format!(
                "a request names adapter {a}; the model holds {held}"
            )));
        }
        if let Some(s) = &request.settings {
            if self.beams > 1 || self.per_request > 1 || self.spec.is_some() {
                return Err(crate::Error::Input(
                    "a request's own settings need an engine of one sequence a request (no \
                     beams, one return sequence, no speculative decoding)"
                        .into(),
                ));
            }
            super::check_settings(&self.models.config(), 1, s)?;
            if s.num_beams > 1 || s.num_return_sequences > 1 {
                return Err(crate::Error::Input(format!(
                    "a request's own settings take one sequence: num_beams {} and \
                     num_return_sequences {} must be 1",
                    s.num_beams, s.num_return_sequences
                )));
            }
        }
        Ok(self.queue(request))
    }

    /// `add` without the checks (`new`'s requests fit by construction).
    fn queue(&mut self, request: Request) -> usize {
        let id = self.requests.len();
        self.requests.push(request);
        let n = if self.beams > 1 {
            self.cfg.num_return_sequences
        } else {
            self.per_request
        };
        self.done.push(vec![None; n]);
        self.taken.push(false);
        self.waiting
            .extend(id * self.per_request..(id + 1) * self.per_request);
        id
    }

    /// The requests that have finished since the last call, with their sequences.
    pub fn take_finished(&mut self) -> Vec<(usize, Vec<Generated>)> {
        let mut out = Vec::new();
        for (id, seqs) in self.done.iter_mut().enumerate() {
            if !self.taken[id] && seqs.iter().all(Option::is_some) {
                self.taken[id] = true;
                // A long-running engine keeps only the request's slot in these lists.
                self.requests[id].prompt = Vec::new();
                self.requests[id].settings = None;
                out.push((id, seqs.iter_mut().filter_map(Option::take).collect()));
            }
        }
        out
    }

    /// Why request `id` ended with `FinishReason::Error` (its own settings left a
    /// sequence no token to pick: all banned, or scores not finite), once.
    pub fn take_error(&mut self, id: usize) -> Option<String> {
        self.errors.remove(&id)
    }

    /// Whether `max_time` has passed since the engine started.
    fn timed_out(&self) -> bool {
        self.cfg
            .max_time
            .is_some_and(|t| self.started.elapsed() >= t)
    }

    /// Whether every request has finished.
    pub fn is_idle(&self) -> bool {
        self.live.is_empty() && self.feeding.is_empty() && self.waiting.is_empty()
    }

    /// The finished sequences per request (after `is_idle`).
    pub fn finish(self) -> Finished {
        self.done
            .into_iter()
            .map(|seqs| seqs.into_iter().flatten().collect())
            .collect()
    }

    /// One step: admit what fits, pick a token for every live row, let finished units
    /// leave, feed the picked tokens. `on_token(row, id)` sees each picked token of a
    /// single sequence (output row `row`).
    pub fn step(&mut self, stop: StopCheck, on_token: &mut dyn FnMut(usize, i64)) -> Result<()> {
        self.step_with_logprobs(stop, &mut |row, tok, _| on_token(row, tok))
    }

    /// `step`, with each picked token's raw log-probabilities beside it where its settings
    /// ask for them (`GenerationConfig::logprobs`; a streaming server sends them with
    /// the token).
    pub fn step_with_logprobs(&mut self, stop: StopCheck, on_token: OnToken) -> Result<()> {
        self.admit()?;
        if self.live.is_empty() {
            // Only prompts riding along (their sequences left): feed them on.
            return self.feed(Vec::new());
        }
        if self.spec.is_some() {
            return self.speculate(stop, on_token);
        }
        let rows = self.live.iter().map(Unit::rows).sum::<usize>() + self.feeding.len();
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
        let ctx = StepContext {
            cfg: self.cfg,
            stop,
            timed_out: self.timed_out(),
        };
        self.steps += 1;
        let feeds = if self.beams > 1 {
            self.pick_beams(&scores, &ctx, on_token)?
        } else {
            self.pick_singles(&scores, &ctx, on_token)?
        };
        self.retire(&feeds);
        self.feed(feeds)
    }

    /// Finished units leave: their slots are freed, their sequences stored.
    fn retire(&mut self, feeds: &[Option<Feed>]) {
        let mut keep = Vec::with_capacity(self.live.len());
        for (u, f) in std::mem::take(&mut self.live).into_iter().zip(feeds) {
            match f {
                Some(_) => keep.push(u),
                None => self.release(u, None),
            }
        }
        self.live = keep;
    }

    /// Unit `u` leaves: its slots are freed and its sequences stored, their finish
    /// reason replaced by `reason` if given.
    fn release(&mut self, u: Unit, reason: Option<FinishReason>) {
        for cache in &mut self.caches {
            for &s in &u.slots {
                cache.free_row(s);
            }
        }
        self.free.extend(u.slots.iter().rev());
        let j = u.row % self.per_request;
        let seqs = match u.kind {
            Kind::One { out, .. } => vec![out],
            Kind::Beams(beam, _) => Strategy::finish(beam)
                .into_iter()
                .next()
                .unwrap_or_default(),
        };
        // A beam group (the request's one unit, j = 0) fills every output row.
        for (i, mut g) in seqs.into_iter().enumerate() {
            if let Some(r) = reason {
                g.finish_reason = r;
            }
            if let Some(slot) = self.done[u.request].get_mut(j + i) {
                *slot = Some(g);
            }
        }
    }

    /// Ends request `id` now: its units that have not started never will, its running
    /// ones leave at once with what they have (their slots free for the next step); all
    /// end with `FinishReason::Cancelled`. `false` when it had already finished (or no
    /// such request was added).
    pub fn cancel(&mut self, id: usize) -> bool {
        let Some(seqs) = self.done.get(id) else {
            return false;
        };
        if self.taken[id] || seqs.iter().all(Option::is_some) {
            return false;
        }
        let per_request = self.per_request;
        self.waiting.retain(|&u| u / per_request != id);
        let (mut mine, rest): (Vec<Unit>, Vec<Unit>) = std::mem::take(&mut self.live)
            .into_iter()
            .partition(|u| u.request == id);
        self.live = rest;
        let (fed, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.feeding)
            .into_iter()
            .partition(|(u, _)| u.request == id);
        self.feeding = rest;
        mine.extend(fed.into_iter().map(|(u, _)| u));
        for u in mine {
            self.release(u, Some(FinishReason::Cancelled));
        }
        for slot in &mut self.done[id] {
            slot.get_or_insert_with(|| Generated::empty(FinishReason::Cancelled));
        }
        true
    }

    /// Feeds every continuing unit's tokens (after reordering beams' slots), and the
    /// next prompt token of each unit riding along; those whose prompt is then whole go
    /// live.
    fn feed(&mut self, feeds: Vec<Option<Feed>>) -> Result<()> {
        let feeds: Vec<Feed> = feeds.into_iter().flatten().collect();
        if feeds.is_empty() && self.feeding.is_empty() {
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
        let riding = self
            .feeding
            .iter()
            .map(|(u, fed)| (u.slots[0], self.requests[u.request].prompt[*fed]));
        let slots: Vec<usize> = self
            .live
            .iter()
            .flat_map(|u| u.slots.iter().copied())
            .chain(riding.clone().map(|(slot, _)| slot))
            .collect();
        let ids: Vec<i64> = feeds
            .iter()
            .flat_map(|f| f.tokens.iter().copied())
            .chain(riding.map(|(_, tok)| tok))
            .collect();
        let r = ids.len() as i64;
        let ids = Tensor::from_slice(&ids).view([r, 1]).to_device(self.device);
        for (m, (model, cache)) in self.models.models.iter().zip(&mut self.caches).enumerate() {
            let span = cache.span(Some(&slots), 1).map_err(crate::Error::Input)?;
            let h = model.forward_span(&ids, cache, &span).select(1, 0); // (R, E)
            let mut offset = 0;
            for u in self
                .live
                .iter_mut()
                .chain(self.feeding.iter_mut().map(|(u, _)| u))
            {
                let n = u.rows() as i64;
                u.hidden.resize_with(m + 1, Tensor::new);
                u.hidden[m] = h.narrow(0, offset, n);
                offset += n;
            }
        }
        for (u, fed) in std::mem::take(&mut self.feeding) {
            if fed + 1 == u.prompt_len {
                self.live.push(u);
            } else {
                self.feeding.push((u, fed + 1));
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
