//! What a generation is asked to do: `GenerationConfig` (transformers' names) and its
//! checks against the model and the prompts, run before any model work.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::processors::Processing;

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
    /// Per generated token, its log-probability under the model's own distribution
    /// (the raw scores' log-softmax, before any processor, as vLLM and OpenAI return it)
    /// and the `n` most likely tokens with theirs (`Generated::raw_logprobs`); `None`:
    /// not computed. Single sequences only (not beams, not speculative decoding).
    pub logprobs: Option<usize>,
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
            logprobs: None,
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

/// Checks prompts and settings against the model's config before any model work;
/// each error names the flag, or the generation_config.json file and key that set the
/// value (`GenerationConfig::sources`).
pub fn validate(config: &Gpt2Config, prompts: &[Vec<i64>], cfg: &GenerationConfig) -> Result<()> {
    check_settings(config, prompts.len(), cfg)?;
    check_prompts(config, prompts, cfg)
}

/// `validate` for requests with their own token limits (`Request::max_new_tokens`, from
/// a prompts file): each is checked against its own limit, and one that kept the
/// settings' limit as `validate` checks it (naming the flag).
pub fn validate_requests(
    config: &Gpt2Config,
    requests: &[super::Request],
    cfg: &GenerationConfig,
) -> Result<()> {
    check_settings(config, requests.len(), cfg)?;
    for (i, r) in requests.iter().enumerate() {
        check_request_at(config, i, r, cfg)?;
    }
    Ok(())
}

/// Request `i` of `validate_requests` on its own (after `check_settings`), so that a
/// caller can say where it came from; under its own settings if it has them (checked
/// here too).
pub fn check_request_at(
    config: &Gpt2Config,
    i: usize,
    r: &super::Request,
    cfg: &GenerationConfig,
) -> Result<()> {
    let cfg = match &r.settings {
        Some(own) => {
            check_settings(config, 1, own)?;
            own
        }
        None => cfg,
    };
    check_prompt(config, i, &r.prompt, r.max_new_tokens, cfg)
}

/// The settings alone, for `n_prompts` prompts (the first part of `validate`).
pub fn check_settings(config: &Gpt2Config, n_prompts: usize, cfg: &GenerationConfig) -> Result<()> {
    let bad = |msg: String| Err(Error::Input(msg));
    let n = |key: &str| cfg.name(key);
    let p = &cfg.processing;
    if n_prompts == 0 {
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
    if cfg.logprobs.is_some() && cfg.num_beams > 1 {
        return bad(format!(
            "raw log-probabilities (`logprobs`) are given for single sequences, not with {} > 1",
            n("num_beams")
        ));
    }
    check_token_ids(config, cfg)
}

/// Every token id a setting names lies inside the vocabulary.
fn check_token_ids(config: &Gpt2Config, cfg: &GenerationConfig) -> Result<()> {
    let bad = |msg: String| Err(Error::Input(msg));
    let n = |key: &str| cfg.name(key);
    let p = &cfg.processing;
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
    Ok(())
}

/// Every prompt is non-empty, in the vocabulary, and fits the context with its limit.
fn check_prompts(config: &Gpt2Config, prompts: &[Vec<i64>], cfg: &GenerationConfig) -> Result<()> {
    for (i, prompt) in prompts.iter().enumerate() {
        check_prompt(config, i, prompt, cfg.limit(prompt.len()), cfg)?;
    }
    Ok(())
}

/// Prompt `i` is non-empty, in the vocabulary, and fits the context with `limit` new
/// tokens. The error names the flag or file that set the limit when it is the
/// settings', else `max_new_tokens` (a request's own, from a prompts file).
fn check_prompt(
    config: &Gpt2Config,
    i: usize,
    prompt: &[i64],
    limit: usize,
    cfg: &GenerationConfig,
) -> Result<()> {
    let bad = |msg: String| Err(Error::Input(msg));
    let n = |key: &str| cfg.name(key);
    let n_positions = config.n_positions;
    let own = limit != cfg.limit(prompt.len());
    if prompt.is_empty() {
        return bad(format!("prompt {i} is empty (it encodes to no tokens)"));
    }
    config.check_ids(prompt)?;
    if limit == 0 {
        return bad(if own {
            format!("prompt {i}: max_new_tokens must be at least 1")
        } else {
            format!(
                "prompt {i} has {} tokens, already {} {}: nothing left to generate",
                prompt.len(),
                n("max_length"),
                cfg.max_length.unwrap_or(0)
            )
        });
    }
    // Saturating: a limit near usize::MAX must not wrap around below n_positions.
    let need = prompt.len().saturating_add(limit);
    if need > n_positions.max(0) as usize {
        let flag = match (own, cfg.max_length) {
            (true, _) => format!("max_new_tokens {limit}"),
            (false, Some(l)) => format!("{} {l}", n("max_length")),
            (false, None) => format!("{} {}", n("max_new_tokens"), cfg.max_new_tokens),
        };
        return bad(format!(
            "prompt {i} has {} tokens; with {flag} that is {need} positions, \
             more than the model's context (n_positions {n_positions})",
            prompt.len()
        ));
    }
    Ok(())
}
