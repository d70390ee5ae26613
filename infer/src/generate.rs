//! The generation loop, once for every strategy: left-pad the prompts into one batch,
//! prefill the KV cache, expand each prompt to its beams or samples, then per step:
//! logits of the last position → the strategy picks tokens (and, for beams, which row
//! each new row continues) → the cache is reordered if rows moved → the picked tokens
//! are fed. Greedy and sampling (`Single`) and beam search (`beam::Beam`) differ only
//! in `Strategy::step`. Semantics follow transformers' `generate`; see
//! `processors.rs` for the one deliberate difference (padding is not history).
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

use crate::beam::Beam;
use crate::config::Gpt2Config;
use crate::ensemble::Ensemble;
use crate::error::{Error, Result};
use crate::model::Gpt2;
use crate::processors::{process, Processing, Row};

/// transformers' `early_stopping`: `true`, `false` (its default) or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    True,
    False,
    Never,
}

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Tokens generated after each prompt, at most.
    pub max_new_tokens: usize,
    /// When set, a prompt plus its generated tokens end at this length instead
    /// (transformers' `max_length`, counted per prompt, not over the padded batch).
    pub max_length: Option<usize>,
    /// Any of these ends a sequence (it is kept in the output, as transformers does).
    pub eos_token_ids: Vec<i64>,
    /// Fed for finished rows and used to left-pad; defaults to the first EOS id, else 0.
    pub pad_token_id: Option<i64>,
    pub processing: Processing,
    pub num_beams: usize,
    pub num_return_sequences: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    /// Seeds libtorch's generator before decoding (as `torch.manual_seed`).
    pub seed: Option<u64>,
    /// Ends generation after the step during which this much time has passed.
    pub max_time: Option<Duration>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            max_length: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            processing: Processing::default(),
            num_beams: 1,
            num_return_sequences: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            seed: None,
            max_time: None,
        }
    }
}

impl GenerationConfig {
    /// How many tokens a prompt of `prompt_len` tokens may be followed by.
    pub fn limit(&self, prompt_len: usize) -> usize {
        match self.max_length {
            Some(total) => total.saturating_sub(prompt_len),
            None => self.max_new_tokens,
        }
    }
}

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

/// Checks prompts and settings against the model's config before any model work;
/// each error names the flag.
pub fn validate(config: &Gpt2Config, prompts: &[Vec<i64>], cfg: &GenerationConfig) -> Result<()> {
    let bad = |msg: String| Err(Error::Input(msg));
    let p = &cfg.processing;
    if prompts.is_empty() {
        return bad("no prompt given".into());
    }
    if cfg.max_length.is_none() && cfg.max_new_tokens < 1 {
        return bad("--max-new-tokens must be at least 1".into());
    }
    if p.do_sample && !(p.temperature.is_finite() && p.temperature > 0.0) {
        return bad(format!(
            "--temperature must be a positive number when sampling, got {}; for deterministic \
             output use greedy decoding (drop --do-sample)",
            p.temperature
        ));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return bad(format!("--top-p must be in (0, 1], got {}", p.top_p));
    }
    if p.top_k < 0 {
        return bad(format!(
            "--top-k must be ≥ 0 (0 disables it), got {}",
            p.top_k
        ));
    }
    if let Some(m) = p.min_p {
        if !(0.0..=1.0).contains(&m) {
            return bad(format!("--min-p must be in [0, 1], got {m}"));
        }
    }
    if !(p.typical_p > 0.0 && p.typical_p <= 1.0) {
        return bad(format!(
            "--typical-p must be in (0, 1], got {}",
            p.typical_p
        ));
    }
    for (flag, v) in [
        ("--epsilon-cutoff", p.epsilon_cutoff),
        ("--eta-cutoff", p.eta_cutoff),
    ] {
        if !(0.0..1.0).contains(&v) {
            return bad(format!("{flag} must be in [0, 1), got {v}"));
        }
    }
    if !(p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0) {
        return bad(format!(
            "--repetition-penalty must be positive, got {}",
            p.repetition_penalty
        ));
    }
    for (flag, v) in [
        ("--presence-penalty", p.presence_penalty),
        ("--frequency-penalty", p.frequency_penalty),
    ] {
        if !v.is_finite() {
            return bad(format!("{flag} must be a finite number, got {v}"));
        }
    }
    if !cfg.length_penalty.is_finite() {
        return bad(format!(
            "--length-penalty must be a finite number, got {}",
            cfg.length_penalty
        ));
    }
    if cfg.num_beams < 1 {
        return bad("--num-beams must be at least 1".into());
    }
    if cfg.num_return_sequences < 1 {
        return bad("--num-return-sequences must be at least 1".into());
    }
    if cfg.num_beams > 1 && cfg.num_return_sequences > cfg.num_beams {
        return bad(format!(
            "--num-return-sequences ({}) cannot exceed --num-beams ({})",
            cfg.num_return_sequences, cfg.num_beams
        ));
    }
    if cfg.num_beams == 1 && !p.do_sample && cfg.num_return_sequences > 1 {
        return bad("--num-return-sequences > 1 needs --do-sample or --num-beams > 1 (greedy gives one answer)".into());
    }
    let v = config.vocab_size;
    let in_vocab = |flag: &str, ids: &[i64]| match ids.iter().find(|&&id| id < 0 || id >= v) {
        Some(id) => bad(format!(
            "{flag}: token id {id} is outside the vocabulary (vocab_size {v})"
        )),
        None => Ok(()),
    };
    in_vocab("--eos-token-id", &cfg.eos_token_ids)?;
    if let Some(pad) = cfg.pad_token_id {
        in_vocab("--pad-token-id", &[pad])?;
    }
    for w in &p.bad_words_ids {
        if w.is_empty() {
            return bad("--bad-words: an entry encodes to no tokens".into());
        }
        in_vocab("--bad-words", w)?;
    }
    let n_positions = config.n_positions;
    for (i, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            return bad(format!("prompt {i} is empty (it encodes to no tokens)"));
        }
        config.check_ids(prompt)?;
        let limit = cfg.limit(prompt.len());
        if limit == 0 {
            return bad(format!(
                "prompt {i} has {} tokens, already --max-length {}: nothing left to generate",
                prompt.len(),
                cfg.max_length.unwrap_or(0)
            ));
        }
        let need = (prompt.len() + limit) as i64;
        if need > n_positions {
            let flag = match cfg.max_length {
                Some(l) => format!("--max-length {l}"),
                None => format!("--max-new-tokens {}", cfg.max_new_tokens),
            };
            return bad(format!(
                "prompt {i} has {} tokens; with {flag} that is {need} positions, \
                 more than the model's context (n_positions {n_positions})",
                prompt.len()
            ));
        }
    }
    Ok(())
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
    /// `logits`: (R, V) float, one row per live sequence.
    fn step(
        &mut self,
        logits: &Tensor,
        ctx: &StepContext,
        on_token: &mut dyn FnMut(usize, i64),
    ) -> Step;
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
        let step = strategy.step(&scores, &ctx, &mut on_token);
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
        }
    }
}

impl Strategy for Single {
    fn step(
        &mut self,
        logits: &Tensor,
        ctx: &StepContext,
        on_token: &mut dyn FnMut(usize, i64),
    ) -> Step {
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
        let scores = process(&cfg.processing, logits, &rows, &cfg.eos_token_ids); // (R, V)
        let greedy = (!cfg.processing.do_sample)
            .then(|| crate::decode::greedy(&scores))
            .flatten();
        let (next, logp) = greedy.unwrap_or_else(|| {
            // libtorch's multinomial: for a seed, on the CPU, transformers' own draws.
            let next = if cfg.processing.do_sample {
                scores
                    .softmax(-1, Kind::Float)
                    .multinomial(1, false)
                    .squeeze_dim(1)
            } else {
                scores.argmax(-1, false)
            };
            let next: Vec<i64> =
                Vec::try_from(next.to_device(tch::Device::Cpu)).expect("int64 tokens");
            let logp = crate::decode::logprobs(&scores, &next).unwrap_or_else(|| {
                let idx = Tensor::from_slice(&next).to_device(scores.device());
                let logp = scores
                    .log_softmax(-1, Kind::Float)
                    .gather(1, &idx.unsqueeze(1), false)
                    .squeeze_dim(1);
                Vec::try_from(logp.to_device(tch::Device::Cpu)).expect("float log-probs")
            });
            (next, logp)
        });
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
        if self.done.iter().all(|&d| d) {
            Step::Done
        } else {
            Step::Continue {
                feed,
                parents: None,
            }
        }
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
pub(crate) fn seed_rng(seed: Option<u64>) -> Option<std::sync::MutexGuard<'static, ()>> {
    static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let seed = seed?;
    let guard = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(seed as i64);
    Some(guard)
}
