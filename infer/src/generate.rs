//! The generation loop, once for every strategy: left-pad the prompts into one batch,
//! prefill the KV cache, expand each prompt to its beams or samples, then per step:
//! logits of the last position → the strategy picks tokens (and, for beams, which row
//! each new row continues) → the cache is reordered if rows moved → the picked tokens
//! are fed. Greedy and sampling (`Single`) and beam search (`beam::Beam`) differ only
//! in `Strategy::step`. Semantics follow transformers' `generate`; see
//! `processors.rs` for the one deliberate difference (padding is not history).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

use crate::beam::Beam;
use crate::config::Gpt2Config;
use crate::decode::{BadRow, Rows};
use crate::ensemble::Ensemble;
use crate::error::{Error, Result};
use crate::model::Gpt2;
use crate::processors::{process_rows, Processing, Row};

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
    /// transformers' `stop_strings`: the caller's `StopCheck` ends a sequence whose text
    /// contains one (the engine holds no tokenizer; the CLI builds the check from these).
    pub stop_strings: Vec<String>,
    /// The generation_config.json that set each field (by its transformers name), so
    /// that `validate` names that file and key rather than a flag.
    pub sources: BTreeMap<String, PathBuf>,
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
            stop_strings: Vec::new(),
            sources: BTreeMap::new(),
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

    /// How an error names the setting `key` (transformers' name): the file that set it
    /// and the key, else its command-line flag.
    pub fn name(&self, key: &str) -> String {
        if let Some(path) = self.sources.get(key) {
            return format!("{}: `{key}`", path.display());
        }
        match key {
            "bad_words_ids" => "--bad-words".into(),
            "stop_strings" => "--stop".into(),
            "suppress_tokens"
            | "begin_suppress_tokens"
            | "forced_eos_token_id"
            | "sequence_bias" => format!("generation config `{key}`"),
            // No flag sets it: it comes from config.json or a generation config.
            "pad_token_id" => "`pad_token_id` (config.json or generation_config.json)".into(),
            _ => format!("--{}", key.replace('_', "-")),
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

/// Checks prompts and settings against the model's config before any model work;
/// each error names the flag, or the generation_config.json file and key that set the
/// value (`GenerationConfig::sources`).
pub fn validate(config: &Gpt2Config, prompts: &[Vec<i64>], cfg: &GenerationConfig) -> Result<()> {
    let bad = |msg: String| Err(Error::Input(msg));
    let n = |key: &str| cfg.name(key);
    let p = &cfg.processing;
    if prompts.is_empty() {
        return bad("no prompt given".into());
    }
    if cfg.max_length.is_none() && cfg.max_new_tokens < 1 {
        return bad(format!("{} must be at least 1", n("max_new_tokens")));
    }
    if p.do_sample && !(p.temperature.is_finite() && p.temperature > 0.0) {
        return bad(format!(
            "{} must be a positive number when sampling, got {}; for deterministic \
             output use greedy decoding (drop --do-sample)",
            n("temperature"),
            p.temperature
        ));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return bad(format!("{} must be in (0, 1], got {}", n("top_p"), p.top_p));
    }
    if p.top_k < 0 {
        return bad(format!(
            "{} must be ≥ 0 (0 disables it), got {}",
            n("top_k"),
            p.top_k
        ));
    }
    if let Some(m) = p.min_p {
        if !(0.0..=1.0).contains(&m) {
            return bad(format!("{} must be in [0, 1], got {m}", n("min_p")));
        }
    }
    if !(p.typical_p > 0.0 && p.typical_p <= 1.0) {
        return bad(format!(
            "{} must be in (0, 1], got {}",
            n("typical_p"),
            p.typical_p
        ));
    }
    for (key, v) in [
        ("epsilon_cutoff", p.epsilon_cutoff),
        ("eta_cutoff", p.eta_cutoff),
    ] {
        if !(0.0..1.0).contains(&v) {
            return bad(format!("{} must be in [0, 1), got {v}", n(key)));
        }
    }
    if !(p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0) {
        return bad(format!(
            "{} must be positive, got {}",
            n("repetition_penalty"),
            p.repetition_penalty
        ));
    }
    for (key, v) in [
        ("presence_penalty", p.presence_penalty),
        ("frequency_penalty", p.frequency_penalty),
    ] {
        if !v.is_finite() {
            return bad(format!("{} must be a finite number, got {v}", n(key)));
        }
    }
    if !cfg.length_penalty.is_finite() {
        return bad(format!(
            "{} must be a finite number, got {}",
            n("length_penalty"),
            cfg.length_penalty
        ));
    }
    if cfg.num_beams < 1 {
        return bad(format!("{} must be at least 1", n("num_beams")));
    }
    // After the first step a beam is a distinct token sequence, and a step can have no
    // more distinct continuations than tokens (only beam 0 is live at the first one):
    // beams beyond the vocabulary could only carry dead hypotheses, each with its own
    // KV-cache row.
    if cfg.num_beams as i64 > config.vocab_size {
        return bad(format!(
            "{} {} is more than the vocabulary's {} tokens; beams beyond that could never \
             hold distinct sequences",
            n("num_beams"),
            cfg.num_beams,
            config.vocab_size
        ));
    }
    if cfg.num_return_sequences < 1 {
        return bad(format!("{} must be at least 1", n("num_return_sequences")));
    }
    if cfg.num_beams > 1 && cfg.num_return_sequences > cfg.num_beams {
        return bad(format!(
            "{} ({}) cannot exceed {} ({})",
            n("num_return_sequences"),
            cfg.num_return_sequences,
            n("num_beams"),
            cfg.num_beams
        ));
    }
    if cfg.num_beams == 1 && !p.do_sample && cfg.num_return_sequences > 1 {
        return bad(format!(
            "{} > 1 needs --do-sample or --num-beams > 1 (greedy gives one answer)",
            n("num_return_sequences")
        ));
    }
    let v = config.vocab_size;
    let in_vocab = |key: &str, ids: &[i64]| match ids.iter().find(|&&id| id < 0 || id >= v) {
        Some(id) => bad(format!(
            "{}: token id {id} is outside the vocabulary (vocab_size {v})",
            n(key)
        )),
        None => Ok(()),
    };
    in_vocab("eos_token_id", &cfg.eos_token_ids)?;
    if let Some(pad) = cfg.pad_token_id {
        in_vocab("pad_token_id", &[pad])?;
    }
    for w in &p.bad_words_ids {
        if w.is_empty() {
            return bad(format!("{}: an entry has no tokens", n("bad_words_ids")));
        }
        in_vocab("bad_words_ids", w)?;
    }
    in_vocab("suppress_tokens", &p.suppress_tokens)?;
    in_vocab("begin_suppress_tokens", &p.begin_suppress_tokens)?;
    in_vocab("forced_eos_token_id", &p.forced_eos_token_id)?;
    for (seq, bias) in &p.sequence_bias {
        if seq.is_empty() {
            return bad(format!("{}: a sequence has no tokens", n("sequence_bias")));
        }
        in_vocab("sequence_bias", seq)?;
        if !bias.is_finite() {
            return bad(format!(
                "{}: the bias of {seq:?} must be a finite number, got {bias}",
                n("sequence_bias")
            ));
        }
    }
    if let Some(s) = cfg.stop_strings.iter().find(|s| s.is_empty()) {
        return bad(format!("{}: {s:?} is empty", n("stop_strings")));
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
                "prompt {i} has {} tokens, already {} {}: nothing left to generate",
                prompt.len(),
                n("max_length"),
                cfg.max_length.unwrap_or(0)
            ));
        }
        // Saturating: a limit near usize::MAX must not wrap around below n_positions.
        let need = prompt.len().saturating_add(limit);
        if need > n_positions.max(0) as usize {
            let flag = match cfg.max_length {
                Some(l) => format!("{} {l}", n("max_length")),
                None => format!("{} {}", n("max_new_tokens"), cfg.max_new_tokens),
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
        let scan = Rows::scan(&scores);
        let bad = match &scan {
            Some(rows) => rows.bad(),
            None => crate::decode::bad_rows(&scores),
        };
        if let Some(&(r, why)) = bad.iter().find(|(r, _)| !self.done[*r]) {
            return Err(unpickable(step, &who(r), why));
        }
        let (next, logp) = match (&scan, cfg.processing.do_sample) {
            (Some(rows), false) => rows.greedy(),
            _ => {
                let next = if cfg.processing.do_sample {
                    // A finished row with no token would make `multinomial` throw: give it
                    // uniform scores (each row draws the same amount of randomness
                    // whatever its distribution, so the live rows' draws do not change).
                    let scores = if bad.is_empty() {
                        scores.shallow_clone()
                    } else {
                        let s = scores.copy();
                        for &(r, _) in &bad {
                            let _ = s.get(r as i64).fill_(0.0);
                        }
                        s
                    };
                    // libtorch's multinomial: for a seed, on the CPU, transformers' own draws.
                    scores
                        .softmax(-1, Kind::Float)
                        .f_multinomial(1, false)
                        .map_err(|e| pick_failed(step, e))?
                        .squeeze_dim(1)
                } else {
                    scores.argmax(-1, false)
                };
                let next: Vec<i64> = Vec::try_from(next.to_device(tch::Device::Cpu))
                    .map_err(|e| pick_failed(step, e))?;
                let logp = match scan.as_ref().and_then(|rows| rows.logprobs(&next)) {
                    Some(lp) => lp,
                    None => {
                        let idx = Tensor::from_slice(&next).to_device(scores.device());
                        let logp = scores
                            .log_softmax(-1, Kind::Float)
                            .gather(1, &idx.unsqueeze(1), false)
                            .squeeze_dim(1);
                        Vec::try_from(logp.to_device(tch::Device::Cpu))
                            .map_err(|e| pick_failed(step, e))?
                    }
                };
                (next, logp)
            }
        };
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
pub(crate) fn seed_rng(seed: Option<u64>) -> Option<std::sync::MutexGuard<'static, ()>> {
    static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let seed = seed?;
    let guard = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(seed as i64);
    Some(guard)
}
