//! The generation loop, once for every strategy: left-pad the prompts into one batch,
//! prefill the KV cache, expand each prompt to its beams or samples, then per step:
//! logits of the last position → the strategy picks tokens (and, for beams, which row
//! each new row continues) → the cache is reordered if rows moved → the picked tokens
//! are fed. Greedy and sampling (`Single`) and beam search (`beam::Beam`) differ only
//! in `Strategy::step`. Semantics follow transformers' `generate`; see
//! `processors.rs` for the one deliberate difference (padding is not history).
use std::time::{Duration, Instant};

use tch::Tensor;

use crate::decode::BadRow;
use crate::ensemble::Ensemble;
use crate::error::{Error, Result};
use crate::model::Gpt2;

mod beam;
mod choose;
mod engine;
mod settings;
pub use crate::sequence::{FinishReason, Generated, Logprobs};
pub use choose::{choose, choose_k, Choice, NoPick, Sampling};
pub use engine::{
    feed_rows, Ask, Engine, OnToken, Pick, Proposal, Request, Schedule, SpecStats, Speculator,
};
pub use settings::{
    check_request_at, check_settings, validate, validate_requests, EarlyStopping, GenerationConfig,
};

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
#[derive(Clone, Copy)]
pub(crate) struct StepContext<'a> {
    pub cfg: &'a GenerationConfig,
    pub stop: StopCheck<'a>,
    pub timed_out: bool,
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

/// Generates for every prompt, all of them decoding at once (see `engine`). `stop` ends
/// a sequence whose generated tokens it accepts; `on_token(row, id)` sees each token as
/// soon as it is picked (greedy and sampling; row k is prompt k / n's sequence k % n for
/// n = `num_return_sequences`).
///
/// With `cfg.seed`, each sampled sequence draws from its own generator seeded `seed + k`
/// (row k; a beam group from its first row's), so a single prompt draws what
/// transformers draws after `torch.manual_seed(seed)`, and a sequence draws the same
/// whatever is decoded beside it.
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
    on_token: impl FnMut(usize, i64),
) -> Result<Output> {
    let requests = Request::each(prompts, cfg);
    generate_requests(models, requests, cfg, Schedule::default(), stop, on_token)
}

/// `generate_ensemble` for requests with their own token limits, admitted as `schedule`
/// says (at most so many at once; refilling freed slots, or in static batches).
pub fn generate_requests(
    models: &Ensemble,
    requests: Vec<Request>,
    cfg: &GenerationConfig,
    schedule: Schedule,
    stop: StopCheck,
    mut on_token: impl FnMut(usize, i64),
) -> Result<Output> {
    validate_requests(&models.config(), &requests, cfg)?;
    let started = Instant::now();
    let mut engine = Engine::new(models, cfg, requests, schedule);
    let mut prefill = None;
    while !engine.is_idle() {
        engine.step(stop, &mut on_token)?;
        prefill.get_or_insert_with(|| started.elapsed());
    }
    let prefill = prefill.unwrap_or_default();
    let steps = engine.steps;
    // A weight file changed under a mapped model: its tokens are not the model's.
    models.models.iter().try_for_each(|m| m.check_files())?;
    Ok(Output {
        sequences: engine.finish(),
        prefill,
        decode: started.elapsed().saturating_sub(prefill),
        steps,
    })
}
