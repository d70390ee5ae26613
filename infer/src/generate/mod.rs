//! The generation loop, once for every strategy: left-pad the prompts into one batch,
//! prefill the KV cache, expand each prompt to its beams or samples, then per step:
//! logits of the last position → the strategy picks tokens (and, for beams, which row
//! each new row continues) → the cache is reordered if rows moved → the picked tokens
//! are fed. Greedy and sampling (`Single`) and beam search (`beam::Beam`) differ only
//! in `Strategy::step`. Semantics follow transformers' `generate`; see
//! `processors.rs` for the one deliberate difference (padding is not history).
use std::time::{Duration, Instant};

use tch::Tensor;

use crate::beam::Beam;
use crate::decode::BadRow;
use crate::ensemble::Ensemble;
use crate::error::{Error, Result};
use crate::model::Gpt2;
use crate::processors::{process_rows, Row};

mod choose;
mod settings;
pub use choose::{choose, Choice, NoPick, Sampling};
pub use settings::{validate, EarlyStopping, GenerationConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
    Time,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Time => "time",
        }
    }
}

/// One returned sequence: the generated tokens only, each token's log-probability under
/// the processed distribution, and the sequence score (beam: transformers'
/// `sequences_scores`; otherwise the sum of the log-probabilities).
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<i64>,
    pub logprobs: Vec<f64>,
    pub score: f64,
    pub finish_reason: FinishReason,
}

/// The sequences of each prompt, and where the time went.
#[derive(Debug)]
pub struct Output {
    /// Per prompt, its `num_return_sequences` sequences (beams: best first).
    pub sequences: Vec<Vec<Generated>>,
    /// Up to the first picked token (prompt forward pass included).
    pub prefill: Duration,
    /// Every later step.
    pub decode: Duration,
    /// Decoding steps: forward passes of the (target) model, the prompt's included. One
    /// per token of the longest sequence in plain decoding; one per verification in
    /// speculative decoding, however many tokens it accepts.
    pub steps: usize,
}

/// Why a sequence whose generated tokens are `tokens` (the newest last) ends now, if it
/// does: EOS, a stop string, its length limit, or time, checked in that order.
pub(crate) fn finish_reason(
    cfg: &GenerationConfig,
    tokens: &[i64],
    limit: usize,
    stop: StopCheck,
    timed_out: bool,
) -> Option<FinishReason> {
    let last = *tokens.last()?;
    if cfg.eos_token_ids.contains(&last) {
        Some(FinishReason::Eos)
    } else if stop(tokens) {
        Some(FinishReason::Stop)
    } else if tokens.len() >= limit {
        Some(FinishReason::Length)
    } else if timed_out {
        Some(FinishReason::Time)
    } else {
        None
    }
}

/// Says whether a sequence's generated tokens end it (`--stop` strings).
pub type StopCheck<'a> = &'a dyn Fn(&[i64]) -> bool;

/// The error for a step at which a sequence has no token to pick. `step` counts from 1
/// (the first generated token); `who` names the sequence ("prompt 2", ...).
pub(crate) fn unpickable(step: usize, who: &str, why: BadRow) -> Error {
    Error::Input(match why {
        BadRow::Banned => format!(
            "step {step}: every token is banned for {who} (all scores are -inf after the \
             processors: no-repeat n-grams, bad words, suppressed tokens, ...); nothing \
             can be generated"
        ),
        BadRow::NotFinite => format!(
            "step {step}: the scores for {who} are not finite (NaN or +inf): the model's \
             activations overflowed, or a setting scaled the logits past f32's range (a \
             --temperature or --repetition-penalty near 0, huge --ensemble-weights)"
        ),
    })
}

/// A libtorch error while picking at `step`, its first line only (libtorch appends a
/// C++ backtrace).
pub(crate) fn pick_failed(step: usize, e: tch::TchError) -> Error {
    let msg = e.to_string();
    Error::Input(format!(
        "step {step}: could not pick a token: {}",
        msg.lines().next().unwrap_or("")
    ))
}

/// What a strategy decided in one step.
pub(crate) enum Step {
    /// Feed `feed` (one token per row) next; `parents[i]` is the row that new row `i`
    /// continues, when rows moved (beams).
    Continue {
        feed: Vec<i64>,
        parents: Option<Vec<i64>>,
    },
    Done,
}

/// Everything a strategy sees of a step besides the logits.
pub(crate) struct StepContext<'a> {
    pub cfg: &'a GenerationConfig,
    pub stop: StopCheck<'a>,
    pub timed_out: bool,
    pub pad: i64,
}

pub(crate) trait Strategy {
    /// `logits`: (R, V) float, one row per live sequence. An error when a sequence has
    /// no token to pick (see `unpickable`).
    fn step(
        &mut self,
        logits: &Tensor,
        ctx: &StepContext,
        on_token: &mut dyn FnMut(usize, i64),
    ) -> Result<Step>;
    /// The returned sequences, per prompt.
    fn finish(self: Box<Self>) -> Vec<Vec<Generated>>;
}

/// Generates for every prompt as one left-padded batch. `stop` ends a sequence whose
/// generated tokens it accepts; `on_token(row, id)` sees each token as soon as it is
/// picked (greedy and sampling; rows are prompt-major).
///
/// With `cfg.seed`, the run seeds libtorch's process-wide generator, as
/// `torch.manual_seed`, so that its samples are transformers' samples. Two seeded runs
/// in one process at the same time would draw from that one generator in turn, and
/// neither would repeat: a seeded run holds a process-wide lock until it returns.
pub fn generate(
    model: &Gpt2,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
    stop: StopCheck,
    on_token: impl FnMut(usize, i64),
) -> Result<Output> {
    generate_ensemble(&Ensemble::single(model), prompts, cfg, stop, on_token)
}

/// `generate` over several models at once (see `ensemble.rs`); each keeps its own cache.
pub fn generate_ensemble(
    models: &Ensemble,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
    stop: StopCheck,
    mut on_token: impl FnMut(usize, i64),
) -> Result<Output> {
    validate(&models.config(), prompts, cfg)?;
    let _seeded = seed_rng(cfg.seed);
    let started = Instant::now();
    let device = models.models[0].device();
    let pad = cfg
        .pad_token_id
        .or_else(|| cfg.eos_token_ids.first().copied())
        .unwrap_or(0);
    let b = prompts.len();
    let t0 = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t0);
    let mut mask = Vec::with_capacity(b * t0);
    for p in prompts {
        let n_pad = t0 - p.len();
        ids.extend(std::iter::repeat_n(pad, n_pad).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, n_pad).chain(std::iter::repeat_n(1, p.len())));
    }
    let shape = [b as i64, t0 as i64];
    let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
    let mask = Tensor::from_slice(&mask).view(shape);

    // Each prompt becomes `expand` rows: its beams, or its independent samples.
    let expand = if cfg.num_beams > 1 {
        cfg.num_beams
    } else {
        cfg.num_return_sequences
    };
    let expand_rows = (expand > 1).then(|| {
        let rows: Vec<i64> = (0..b as i64)
            .flat_map(|i| std::iter::repeat_n(i, expand))
            .collect();
        Tensor::from_slice(&rows).to_device(device)
    });
    let longest = prompts
        .iter()
        .map(|p| cfg.limit(p.len()))
        .max()
        .unwrap_or(0);
    let mut caches = Vec::with_capacity(models.models.len());
    let mut hidden = Vec::with_capacity(models.models.len());
    // While the kernels' own pool does the matrix products, libtorch's threads would only
    // fight it for the cores over the small ops between them: one libtorch thread then
    // (measured on a 2-core machine: a prompt of 8 × 11 tokens 20% faster).
    let prefill_threads = models
        .models
        .iter()
        .all(|m| m.prefills_on_kernels(b * t0))
        .then(|| LibtorchThreads::limit(1));
    for model in &models.models {
        let mut cache = model.new_cache(b as i64, (t0 + longest) as i64);
        cache.set_attention_mask(&mask);
        let mut h = model.forward_hidden(&ids, &mut cache).select(1, -1); // (B, E)
        if let Some(rows) = &expand_rows {
            cache.reorder(rows);
            h = h.index_select(0, rows);
        }
        caches.push(cache);
        hidden.push(h);
    }
    drop(prefill_threads);
    let mut strategy: Box<dyn Strategy> = if cfg.num_beams > 1 {
        Box::new(Beam::new(prompts, cfg))
    } else {
        Box::new(Single::new(prompts, expand))
    };
    let mut prefill = None;
    let mut steps = 0;
    let rows = prompts.len() * expand;
    let _threads = models
        .models
        .iter()
        .all(|m| m.decodes_on_kernels(rows))
        .then(|| LibtorchThreads::limit(1));
    loop {
        let scores = models.scores(&hidden); // (R, V)
        let timed_out = cfg.max_time.is_some_and(|t| started.elapsed() >= t);
        let ctx = StepContext {
            cfg,
            stop,
            timed_out,
            pad,
        };
        let step = strategy.step(&scores, &ctx, &mut on_token)?;
        steps += 1;
        prefill.get_or_insert_with(|| started.elapsed());
        match step {
            Step::Done => break,
            Step::Continue { feed, parents } => {
                let parents = parents.map(|p| Tensor::from_slice(&p).to_device(device));
                let r = feed.len() as i64;
                let feed = Tensor::from_slice(&feed).view([r, 1]).to_device(device);
                for ((model, cache), h) in models.models.iter().zip(&mut caches).zip(&mut hidden) {
                    if let Some(parents) = &parents {
                        cache.reorder(parents);
                    }
                    *h = model.forward_hidden(&feed, cache).select(1, -1);
                }
            }
        }
    }
    let prefill = prefill.unwrap_or_default();
    Ok(Output {
        sequences: strategy.finish(),
        prefill,
        decode: started.elapsed().saturating_sub(prefill),
        steps,
    })
}

/// Limits libtorch's intra-op threads until dropped.
struct LibtorchThreads(i32);

impl LibtorchThreads {
    fn limit(n: i32) -> Self {
        let before = tch::get_num_threads();
        tch::set_num_threads(n);
        Self(before)
    }
}

impl Drop for LibtorchThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

/// Greedy decoding and multinomial sampling: one sequence per row, rows never move.
struct Single {
    prompts: Vec<Vec<i64>>,
    /// Per row: prompt then generated tokens.
    history: Vec<Vec<i64>>,
    out: Vec<Generated>,
    done: Vec<bool>,
    expand: usize,
    /// Steps taken (tokens picked per row so far).
    step: usize,
}

impl Single {
    fn new(prompts: &[Vec<i64>], expand: usize) -> Self {
        let rows = prompts.len() * expand;
        let history = (0..rows).map(|r| prompts[r / expand].clone()).collect();
        let out = (0..rows)
            .map(|_| Generated {
                tokens: vec![],
                logprobs: vec![],
                score: 0.0,
                finish_reason: FinishReason::Length,
            })
            .collect();
        Self {
            prompts: prompts.to_vec(),
            history,
            out,
            done: vec![false; rows],
            expand,
            step: 0,
        }
    }
}

impl Strategy for Single {
    fn step(
        &mut self,
        logits: &Tensor,
        ctx: &StepContext,
        on_token: &mut dyn FnMut(usize, i64),
    ) -> Result<Step> {
        let cfg = ctx.cfg;
        let rows: Vec<Row> = self
            .history
            .iter()
            .enumerate()
            .map(|(r, h)| Row {
                tokens: h,
                prompt_len: self.prompts[r / self.expand].len(),
            })
            .collect();
        let limit = |r: &Row| cfg.limit(r.prompt_len);
        let scores = process_rows(&cfg.processing, logits, &rows, &cfg.eos_token_ids, &limit); // (R, V)
        self.step += 1;
        let step = self.step;
        // A finished row is still computed (it is fed padding), but its scores are not
        // used: only a live row with no token to pick is an error.
        let who = |r: usize| {
            let (i, j) = (r / self.expand, r % self.expand);
            if self.expand > 1 {
                format!("prompt {i}, sequence {j}")
            } else {
                format!("prompt {i}")
            }
        };
        let done = &self.done;
        let Choice {
            ids: next,
            logprobs: logp,
        } = choose(&scores, Sampling::of(cfg.processing.do_sample), &|r| {
            !done[r]
        })
        .map_err(|e| e.at(step, who))?;
        let mut feed = next.clone();
        for (r, &tok) in next.iter().enumerate() {
            if self.done[r] {
                feed[r] = ctx.pad;
                continue;
            }
            let g = &mut self.out[r];
            g.tokens.push(tok);
            g.logprobs.push(logp[r]);
            g.score += logp[r];
            self.history[r].push(tok);
            on_token(r, tok);
            let limit = cfg.limit(self.prompts[r / self.expand].len());
            if let Some(reason) = finish_reason(cfg, &g.tokens, limit, ctx.stop, ctx.timed_out) {
                g.finish_reason = reason;
                self.done[r] = true;
            }
        }
        Ok(if self.done.iter().all(|&d| d) {
            Step::Done
        } else {
            Step::Continue {
                feed,
                parents: None,
            }
        })
    }

    fn finish(self: Box<Self>) -> Vec<Vec<Generated>> {
        let expand = self.expand;
        let mut out = self.out.into_iter();
        (0..self.prompts.len())
            .map(|_| out.by_ref().take(expand).collect())
            .collect()
    }
}

/// Seeds libtorch's global generator and holds the lock that keeps other seeded runs
/// from drawing from it until the guard drops; `None` (unseeded) takes no lock.
pub(crate) fn seed_rng(seed: Option<u64>) -> Option<crate::rng::RngLock> {
    let seed = seed?;
    let guard = crate::rng::lock();
    tch::manual_seed(seed as i64);
    Some(guard)
}
