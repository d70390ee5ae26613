//! From a checked completions request to what the engine runs: each prompt's token ids
//! and token limit, and each choice's own `GenerationConfig` (the server's defaults, then
//! the request's fields), checked against the model before anything is queued.
use std::path::Path;

use infer::generate::{check_settings, GenerationConfig};
use infer::{genconfig, Gpt2Config, Tokenizer};

use crate::error::ApiError;
use crate::params::{Completion, Prompt};

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: usize = 16;

/// The server's defaults: OpenAI's (temperature 1, top_p 1, no top-k), then the model
/// folder's generation_config.json where it has one, as vLLM takes them.
pub fn defaults(dir: &Path, config: &Gpt2Config) -> infer::Result<GenerationConfig> {
    let mut cfg = GenerationConfig {
        eos_token_ids: config.eos_ids(),
        pad_token_id: config.pad_token_id,
        ..GenerationConfig::default()
    };
    cfg.processing.top_k = 0;
    let own = dir.join(genconfig::FILE_NAME);
    if own.symlink_metadata().is_ok() {
        for warning in genconfig::apply_file(&mut cfg, &own)? {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "warning: {warning}");
        }
    }
    Ok(cfg)
}

/// Each prompt's token ids, every id inside the vocabulary.
pub fn prompt_ids(tok: &Tokenizer, prompts: &[Prompt]) -> Result<Vec<Vec<i64>>, ApiError> {
    let bound = tok.id_bound() as i64;
    prompts
        .iter()
        .map(|p| match p {
            Prompt::Text(s) => tok
                .encode(s)
                .map_err(|e| ApiError::invalid("prompt", e.to_string())),
            Prompt::Ids(ids) => match ids.iter().find(|&&id| id < 0 || id >= bound) {
                Some(id) => Err(ApiError::invalid(
                    "prompt",
                    format!("token id {id} is outside the vocabulary (size {bound})"),
                )),
                None => Ok(ids.clone()),
            },
        })
        .collect()
}

/// The token limit of a prompt of `prompt_len` tokens: `max_tokens` (default 16, or
/// what the context leaves), refused when prompt and limit pass `max_model_len`.
pub fn token_limit(
    max_tokens: Option<usize>,
    prompt_len: usize,
    max_model_len: usize,
) -> Result<usize, ApiError> {
    let room = max_model_len.saturating_sub(prompt_len);
    if room == 0 {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "this model's maximum context length is {max_model_len} tokens; the prompt has \
                 {prompt_len}, which leaves no room to generate"
            ),
        ));
    }
    match max_tokens {
        None => Ok(DEFAULT_MAX_TOKENS.min(room)),
        Some(m) if m > room => Err(ApiError::invalid(
            "max_tokens",
            format!(
                "this model's maximum context length is {max_model_len} tokens; the prompt has \
                 {prompt_len} and max_tokens asks for {m} more ({} in all)",
                prompt_len + m
            ),
        )),
        Some(m) => Ok(m),
    }
}

fn in_vocab(key: &str, ids: &[i64], vocab: i64) -> Result<(), ApiError> {
    match ids.iter().find(|&&id| id < 0 || id >= vocab) {
        Some(id) => Err(ApiError::invalid(
            key,
            format!("token id {id} is outside the vocabulary (vocab_size {vocab})"),
        )),
        None => Ok(()),
    }
}

/// Choice `j`'s settings (its seed is `seed + j`, so that the choices differ and each
/// is the same whatever else runs).
pub fn choice_config(
    base: &GenerationConfig,
    c: &Completion,
    tok: &Tokenizer,
    config: &Gpt2Config,
    j: usize,
) -> Result<GenerationConfig, ApiError> {
    let mut cfg = base.clone();
    cfg.sources.clear();
    cfg.max_length = None;
    let s = &c.sampling;
    let p = &mut cfg.processing;
    if let Some(t) = s.temperature {
        p.temperature = t;
    }
    // OpenAI's and vLLM's meaning: temperature 0 is greedy decoding.
    p.do_sample = p.temperature > 0.0;
    if !p.do_sample {
        p.temperature = 1.0;
    }
    let set = |to: &mut f64, v: Option<f64>| {
        if let Some(v) = v {
            *to = v;
        }
    };
    set(&mut p.top_p, s.top_p);
    set(&mut p.typical_p, s.typical_p);
    set(&mut p.repetition_penalty, s.repetition_penalty);
    set(&mut p.presence_penalty, s.presence_penalty);
    set(&mut p.frequency_penalty, s.frequency_penalty);
    if let Some(k) = s.top_k {
        p.top_k = k.max(0); // vLLM's -1: off
    }
    p.min_p = s.min_p.or(p.min_p);
    if let Some(n) = s.no_repeat_ngram_size {
        p.no_repeat_ngram_size = n;
    }
    if let Some(n) = s.min_tokens {
        if c.max_tokens.is_some_and(|m| n > m) {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("`min_tokens` {n} is more than `max_tokens`"),
            ));
        }
        p.min_new_tokens = n;
    }
    let vocab = config.vocab_size;
    for &(id, bias) in &s.logit_bias {
        in_vocab("logit_bias", &[id], vocab)?;
        p.sequence_bias.push((vec![id], bias));
    }
    for word in &s.bad_words {
        let ids = tok
            .encode(word)
            .map_err(|e| ApiError::invalid("bad_words", e.to_string()))?;
        if ids.is_empty() {
            return Err(ApiError::invalid(
                "bad_words",
                format!("`bad_words` {word:?} encodes to no tokens"),
            ));
        }
        p.bad_words_ids.push(ids);
    }
    if s.ignore_eos {
        cfg.eos_token_ids.clear();
    }
    in_vocab("stop_token_ids", &s.stop_token_ids, vocab)?;
    cfg.eos_token_ids.extend(&s.stop_token_ids);
    cfg.seed = c.seed.map(|seed| seed.wrapping_add(j as u64));
    cfg.logprobs = c.logprobs;
    if let Some(stop) = &c.stop {
        cfg.stop_strings = stop.clone();
    }
    check_settings(config, 1, &cfg)
        .map_err(|e| ApiError::new(axum::http::StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(cfg)
}
