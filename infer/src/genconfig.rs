//! Reading Hugging Face `generation_config.json` files into a `GenerationConfig`:
//! the model folder's own file supplies defaults, a user's file overrides it, flags
//! override both. `null` leaves a value as it is; a field of the wrong type is an error
//! naming the file and the field.
//!
//! No key that would change the generated tokens is ignored silently. Every key is one of:
//! - read (`READ`);
//! - bookkeeping that cannot change the tokens (`IGNORED`: versions, caching, output
//!   format, assistant-model settings);
//! - a transformers setting gpt2kit does not implement (`UNSUPPORTED`): refused, naming
//!   the file and key, unless null or its no-op value (old files list every default);
//! - unknown: transformers keeps such keys as attributes that nothing reads, so they
//!   change nothing there either; refusing them would refuse files transformers loads
//!   (a newer version's keys, a project's own). They come back as warnings for the
//!   caller to show, since a misspelt key (`temprature`) is most likely a mistake.
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::generate::{EarlyStopping, GenerationConfig};
use crate::processors::Processing;

pub const FILE_NAME: &str = crate::folder::GENERATION_CONFIG_FILE;

/// The keys `apply_json` reads.
pub const READ: &[&str] = &[
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "min_length",
    "min_new_tokens",
    "max_new_tokens",
    "max_length",
    "num_beams",
    "num_return_sequences",
    "length_penalty",
    "early_stopping",
    "eos_token_id",
    "pad_token_id",
    "max_time",
    "stop_strings",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_eos_token_id",
    "sequence_bias",
];

/// transformers keys that cannot change the generated tokens of a decoder-only model.
pub const IGNORED: &[&str] = &[
    "transformers_version",
    "_from_model_config",
    "_commit_hash",
    "bos_token_id",
    "decoder_start_token_id",
    "use_cache",
    "cache_implementation",
    "cache_config",
    "max_cache_len",
    "compile_config",
    "disable_compile",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "return_legacy_cache",
    "prefill_chunk_size",
    "continuous_batching_config",
    "low_memory",
    "is_assistant",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "assistant_lookbehind",
    "target_lookbehind",
    "max_matching_ngram_size",
];

/// transformers settings gpt2kit does not implement, with the values that do nothing
/// (besides null).
pub const UNSUPPORTED: &[(&str, &[Noop])] = &[
    ("guidance_scale", &[Noop::Num(1.0)]),
    ("encoder_repetition_penalty", &[Noop::Num(1.0)]),
    ("encoder_no_repeat_ngram_size", &[Noop::Num(0.0)]),
    ("renormalize_logits", &[Noop::Bool(false)]),
    ("forced_bos_token_id", &[]),
    ("remove_invalid_values", &[Noop::Bool(false)]),
    ("exponential_decay_length_penalty", &[]),
    ("token_healing", &[Noop::Bool(false)]),
    ("watermarking_config", &[]),
    ("num_beam_groups", &[Noop::Num(1.0)]),
    ("diversity_penalty", &[Noop::Num(0.0)]),
    ("penalty_alpha", &[Noop::Num(0.0)]),
    ("dola_layers", &[]),
    ("constraints", &[]),
    ("force_words_ids", &[]),
    ("top_h", &[]),
    ("use_mtp", &[Noop::Bool(false)]),
    ("speculation_type", &[]),
    ("prompt_lookup_num_tokens", &[Noop::Num(0.0)]),
    ("assistant_early_exit", &[]),
];

/// A value of an unsupported key that leaves generation as it is.
pub enum Noop {
    Num(f64),
    Bool(bool),
}

/// Applies the fields of the JSON object in `path` to `cfg` and records `path` as the
/// source of each (`GenerationConfig::sources`). Returns warnings about unknown keys.
pub fn apply_file(cfg: &mut GenerationConfig, path: &Path) -> Result<Vec<String>> {
    crate::files::check_regular_file(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let config_error = |reason| Error::Config {
        path: path.into(),
        reason,
    };
    let warnings = apply_json(cfg, &json).map_err(config_error)?;
    if let Some(obj) = json.as_object() {
        for (k, v) in obj {
            if READ.contains(&k.as_str()) && !v.is_null() {
                cfg.sources.insert(k.clone(), path.into());
            }
        }
    }
    Ok(warnings
        .into_iter()
        .map(|w| format!("{}: {w}", path.display()))
        .collect())
}

/// Applies a generation_config object; the error names the field. Returns a warning for
/// each key that is not a transformers setting (see the module's header).
pub fn apply_json(
    cfg: &mut GenerationConfig,
    json: &Value,
) -> std::result::Result<Vec<String>, String> {
    let obj = json.as_object().ok_or("expected a JSON object")?;
    let warnings = check_keys(obj)?;
    let f = Fields(obj);
    apply_scores(&mut cfg.processing, &f)?;
    apply_lengths_and_stops(cfg, &f)?;
    apply_forced(&mut cfg.processing, &f)?;
    Ok(warnings)
}

/// A result whose error names the field at fault.
type Parsed<T> = std::result::Result<T, String>;

/// Refuses unsupported keys set to anything but a no-op value; returns a warning for
/// each unknown key.
fn check_keys(obj: &Map<String, Value>) -> Parsed<Vec<String>> {
    let mut warnings = Vec::new();
    for (k, v) in obj {
        if READ.contains(&k.as_str()) || IGNORED.contains(&k.as_str()) {
            continue;
        }
        match UNSUPPORTED.iter().find(|(name, _)| name == k) {
            Some((_, noops)) => {
                let noop = v.is_null()
                    || noops.iter().any(|n| match n {
                        Noop::Num(x) => v.as_f64() == Some(*x),
                        Noop::Bool(b) => v.as_bool() == Some(*b),
                    });
                if !noop {
                    return Err(format!(
                        "`{k}` ({v}) is a transformers setting gpt2kit does not implement; \
                         remove it or set it to null"
                    ));
                }
            }
            None => warnings.push(format!(
                "unknown key `{k}` ignored (not a generation setting gpt2kit or transformers reads)"
            )),
        }
    }
    Ok(warnings)
}

/// The object's fields, typed; a null field reads as absent.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn float(&self, k: &str) -> Parsed<Option<f64>> {
        self.get(k)
            .map(|v| v.as_f64().ok_or(format!("`{k}` must be a number")))
            .transpose()
    }

    fn uint(&self, k: &str) -> Parsed<Option<usize>> {
        self.get(k)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or(format!("`{k}` must be a non-negative integer"))
            })
            .transpose()
    }

    /// A token id or a list of them.
    fn ids(&self, k: &str) -> Parsed<Option<Vec<i64>>> {
        self.get(k)
            .map(|v| match v {
                Value::Number(n) => n
                    .as_i64()
                    .map(|i| vec![i])
                    .ok_or(format!("`{k}` must be token ids")),
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_i64().ok_or(format!("`{k}` must be token ids")))
                    .collect(),
                _ => Err(format!("`{k}` must be a token id or a list of them")),
            })
            .transpose()
    }
}

/// Sampling, penalties, banned words and minimum lengths.
fn apply_scores(p: &mut Processing, f: &Fields) -> Parsed<()> {
    if let Some(v) = f.get("do_sample") {
        p.do_sample = v.as_bool().ok_or("`do_sample` must be true or false")?;
    }
    if let Some(v) = f.float("temperature")? {
        p.temperature = v;
    }
    if let Some(v) = f.get("top_k") {
        p.top_k = v.as_i64().ok_or("`top_k` must be an integer")?;
    }
    if let Some(v) = f.float("top_p")? {
        p.top_p = v;
    }
    if let Some(v) = f.float("min_p")? {
        p.min_p = Some(v);
    }
    if let Some(v) = f.float("typical_p")? {
        p.typical_p = v;
    }
    if let Some(v) = f.float("epsilon_cutoff")? {
        p.epsilon_cutoff = v;
    }
    if let Some(v) = f.float("eta_cutoff")? {
        p.eta_cutoff = v;
    }
    if let Some(v) = f.float("repetition_penalty")? {
        p.repetition_penalty = v;
    }
    if let Some(v) = f.uint("no_repeat_ngram_size")? {
        p.no_repeat_ngram_size = v;
    }
    if let Some(v) = f.get("bad_words_ids") {
        let words: Option<Vec<Vec<i64>>> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|w| {
                        w.as_array()
                            .and_then(|w| w.iter().map(Value::as_i64).collect())
                    })
                    .collect()
            })
            .unwrap_or(None);
        p.bad_words_ids = words.ok_or("`bad_words_ids` must be a list of lists of token ids")?;
    }
    if let Some(v) = f.uint("min_length")? {
        p.min_length = v;
    }
    if let Some(v) = f.uint("min_new_tokens")? {
        p.min_new_tokens = v;
    }
    Ok(())
}

/// Length limits, beam search, end-of-sequence and padding ids, and stop criteria.
fn apply_lengths_and_stops(cfg: &mut GenerationConfig, f: &Fields) -> Parsed<()> {
    if let Some(v) = f.uint("max_new_tokens")? {
        cfg.max_new_tokens = v;
        cfg.max_length = None;
    } else if let Some(v) = f.uint("max_length")? {
        cfg.max_length = Some(v);
    }
    if let Some(v) = f.uint("num_beams")? {
        cfg.num_beams = v;
    }
    if let Some(v) = f.uint("num_return_sequences")? {
        cfg.num_return_sequences = v;
    }
    if let Some(v) = f.float("length_penalty")? {
        cfg.length_penalty = v;
    }
    if let Some(v) = f.get("early_stopping") {
        cfg.early_stopping = match v {
            Value::Bool(true) => EarlyStopping::True,
            Value::Bool(false) => EarlyStopping::False,
            Value::String(s) if s == "never" => EarlyStopping::Never,
            _ => return Err("`early_stopping` must be true, false or \"never\"".into()),
        };
    }
    if let Some(v) = f.ids("eos_token_id")? {
        cfg.eos_token_ids = v;
    }
    if let Some(v) = f.ids("pad_token_id")? {
        cfg.pad_token_id = v.first().copied();
    }
    if let Some(v) = f.float("max_time")? {
        if v.is_nan() || v < 0.0 {
            return Err(format!(
                "`max_time` must be a number of seconds ≥ 0, got {v}"
            ));
        }
        // Past Duration's range (~5.8e11 years): no limit in practice.
        cfg.max_time =
            Some(std::time::Duration::try_from_secs_f64(v).unwrap_or(std::time::Duration::MAX));
    }
    if let Some(v) = f.get("stop_strings") {
        let strings: Option<Vec<String>> = match v {
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(a) => a.iter().map(|s| s.as_str().map(String::from)).collect(),
            _ => None,
        };
        cfg.stop_strings = strings.ok_or("`stop_strings` must be a string or a list of them")?;
    }
    Ok(())
}

/// Suppressed and forced tokens, and sequence biases.
fn apply_forced(p: &mut Processing, f: &Fields) -> Parsed<()> {
    if let Some(v) = f.ids("suppress_tokens")? {
        p.suppress_tokens = v;
    }
    if let Some(v) = f.ids("begin_suppress_tokens")? {
        p.begin_suppress_tokens = v;
    }
    if let Some(v) = f.ids("forced_eos_token_id")? {
        p.forced_eos_token_id = v;
    }
    if let Some(v) = f.get("sequence_bias") {
        p.sequence_bias = sequence_bias(v)?;
    }
    Ok(())
}

/// `sequence_bias` as a list of `[[token ids], bias]` pairs.
fn sequence_bias(v: &Value) -> Parsed<Vec<(Vec<i64>, f64)>> {
    let why = "`sequence_bias` must be a list of [[token ids], bias] pairs";
    let pairs = v.as_array().ok_or(why)?;
    let mut bias: Vec<(Vec<i64>, f64)> = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let (seq, b) = match pair.as_array().map(Vec::as_slice) {
            Some([seq, b]) => (seq, b),
            _ => return Err(why.into()),
        };
        let seq: Vec<i64> = seq
            .as_array()
            .and_then(|s| s.iter().map(Value::as_i64).collect())
            .ok_or(why)?;
        let b = b.as_f64().ok_or(why)?;
        // transformers keeps a dict: the last bias of a repeated sequence wins.
        bias.retain(|(s, _)| *s != seq);
        bias.push((seq, b));
    }
    Ok(bias)
}

/// Parses `--early-stopping`.
pub fn parse_early_stopping(s: &str) -> Option<EarlyStopping> {
    match s {
        "true" => Some(EarlyStopping::True),
        "false" => Some(EarlyStopping::False),
        "never" => Some(EarlyStopping::Never),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_apply_and_bad_types_name_the_field() {
        let mut cfg = GenerationConfig::default();
        let json = serde_json::json!({
            "do_sample": true, "top_k": 0, "top_p": 0.9, "eos_token_id": [1, 2],
            "early_stopping": "never", "max_length": 30, "temperature": null
        });
        apply_json(&mut cfg, &json).unwrap();
        assert!(cfg.processing.do_sample);
        assert_eq!(cfg.processing.top_k, 0);
        assert_eq!(cfg.processing.temperature, 1.0);
        assert_eq!(cfg.eos_token_ids, vec![1, 2]);
        assert_eq!(cfg.early_stopping, EarlyStopping::Never);
        assert_eq!(cfg.limit(10), 20);
        let err = apply_json(&mut cfg, &serde_json::json!({"top_p": "high"})).unwrap_err();
        assert!(err.contains("top_p"));
        let err = apply_json(
            &mut cfg,
            &serde_json::json!({"early_stopping": "sometimes"}),
        )
        .unwrap_err();
        assert!(err.contains("early_stopping"));
    }
}
