//! Reading Hugging Face `generation_config.json` files into a `GenerationConfig`:
//! the model folder's own file supplies defaults, a user's file overrides it, flags
//! override both. Only the fields gpt2kit implements are read; `null` leaves a value as
//! it is; a field of the wrong type is an error naming the file and the field.
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::generate::{EarlyStopping, GenerationConfig};

pub const FILE_NAME: &str = "generation_config.json";

/// Applies the fields of the JSON object in `path` to `cfg`.
pub fn apply_file(cfg: &mut GenerationConfig, path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        reason: e.to_string(),
    })?;
    apply_json(cfg, &json).map_err(|reason| Error::Config {
        path: path.into(),
        reason,
    })
}

/// Applies a generation_config object; the error names the field.
pub fn apply_json(cfg: &mut GenerationConfig, json: &Value) -> std::result::Result<(), String> {
    let obj = json.as_object().ok_or("expected a JSON object")?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let float = |k: &str| -> std::result::Result<Option<f64>, String> {
        get(k)
            .map(|v| v.as_f64().ok_or(format!("`{k}` must be a number")))
            .transpose()
    };
    let uint = |k: &str| -> std::result::Result<Option<usize>, String> {
        get(k)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or(format!("`{k}` must be a non-negative integer"))
            })
            .transpose()
    };
    let ids = |k: &str| -> std::result::Result<Option<Vec<i64>>, String> {
        get(k)
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
    };
    let p = &mut cfg.processing;
    if let Some(v) = get("do_sample") {
        p.do_sample = v.as_bool().ok_or("`do_sample` must be true or false")?;
    }
    if let Some(v) = float("temperature")? {
        p.temperature = v;
    }
    if let Some(v) = get("top_k") {
        p.top_k = v.as_i64().ok_or("`top_k` must be an integer")?;
    }
    if let Some(v) = float("top_p")? {
        p.top_p = v;
    }
    if let Some(v) = float("min_p")? {
        p.min_p = Some(v);
    }
    if let Some(v) = float("typical_p")? {
        p.typical_p = v;
    }
    if let Some(v) = float("epsilon_cutoff")? {
        p.epsilon_cutoff = v;
    }
    if let Some(v) = float("eta_cutoff")? {
        p.eta_cutoff = v;
    }
    if let Some(v) = float("repetition_penalty")? {
        p.repetition_penalty = v;
    }
    if let Some(v) = uint("no_repeat_ngram_size")? {
        p.no_repeat_ngram_size = v;
    }
    if let Some(v) = get("bad_words_ids") {
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
    if let Some(v) = uint("min_length")? {
        p.min_length = v;
    }
    if let Some(v) = uint("min_new_tokens")? {
        p.min_new_tokens = v;
    }
    if let Some(v) = uint("max_new_tokens")? {
        cfg.max_new_tokens = v;
        cfg.max_length = None;
    } else if let Some(v) = uint("max_length")? {
        cfg.max_length = Some(v);
    }
    if let Some(v) = uint("num_beams")? {
        cfg.num_beams = v;
    }
    if let Some(v) = uint("num_return_sequences")? {
        cfg.num_return_sequences = v;
    }
    if let Some(v) = float("length_penalty")? {
        cfg.length_penalty = v;
    }
    if let Some(v) = get("early_stopping") {
        cfg.early_stopping = match v {
            Value::Bool(true) => EarlyStopping::True,
            Value::Bool(false) => EarlyStopping::False,
            Value::String(s) if s == "never" => EarlyStopping::Never,
            _ => return Err("`early_stopping` must be true, false or \"never\"".into()),
        };
    }
    if let Some(v) = ids("eos_token_id")? {
        cfg.eos_token_ids = v;
    }
    if let Some(v) = ids("pad_token_id")? {
        cfg.pad_token_id = v.first().copied();
    }
    if let Some(v) = float("max_time")? {
        cfg.max_time = Some(std::time::Duration::from_secs_f64(v.max(0.0)));
    }
    Ok(())
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
