//! GPT-2's byte-level BPE in GGUF metadata, as `convert_hf_to_gguf.py` writes it
//! (`_set_vocab_gpt2`, gguf-py's `SpecialVocab`): `tokenizer.ggml.model = gpt2`, the
//! pre-tokenizer name `gpt-2`, every token by id in its byte-level spelling with its
//! type (normal, control, user-defined, unused padding), the merges as "a b" strings,
//! and the special ids. Read back, the same keys make a `tokenizer.json`.
use std::path::Path;

use serde_json::{json, Map, Value as Json};

use super::file::Header;
use super::meta::{ty, Value};
use crate::error::{Error, Result};

/// gguf-py's `TokenType`.
pub const NORMAL: i32 = 1;
pub const CONTROL: i32 = 3;
pub const USER_DEFINED: i32 = 4;
pub const UNUSED: i32 = 5;

/// The special ids a GGUF records for GPT-2.
pub struct SpecialIds {
    pub bos: Option<i64>,
    pub eos: Option<i64>,
    pub unk: Option<i64>,
    /// `tokenizer_config.json`'s `add_bos_token` / `add_eos_token`, when it has them.
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
}

fn strings(items: Vec<String>) -> Value {
    Value::Array(ty::STRING, items.into_iter().map(Value::String).collect())
}

/// The `tokenizer.ggml.*` keys of a tokenizer (`j`: its `tokenizer.json` value, read
/// from `path`), with `vocab_size` tokens (ids the tokenizer lacks become `[PADn]`,
/// unused, as the converter pads them).
pub fn tokenizer_keys(
    j: &Json,
    path: &Path,
    vocab_size: i64,
    ids: &SpecialIds,
) -> Result<Vec<(String, Value)>> {
    let bad = |reason: &str| Error::Tokenizer {
        path: path.into(),
        reason: reason.into(),
    };
    // `Value` indexing never panics (a missing key or index reads as null).
    let model = &j["model"];
    if model["type"] != "BPE" {
        return Err(bad("GGUF export needs GPT-2's byte-level BPE tokenizer"));
    }
    let mut tokens = vec![None; vocab_size as usize];
    let mut types = vec![UNUSED; vocab_size as usize];
    for (t, id) in model["vocab"].as_object().into_iter().flatten() {
        if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
            *slot = Some(t.clone());
            // In range: `tokens` and `types` have the same length.
            types[id.as_u64().unwrap_or(0) as usize] = NORMAL;
        }
    }
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(content.to_string());
            let special = a["special"].as_bool().unwrap_or(false)
                || (content.starts_with("<|") && content.ends_with("|>"));
            // In range: `tokens` and `types` have the same length.
            types[id as usize] = if special { CONTROL } else { USER_DEFINED };
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => s.clone(),
            // A pair `[a, b]`; indexing a `Value` reads null where there is nothing.
            _ => format!(
                "{} {}",
                m[0].as_str().unwrap_or_default(),
                m[1].as_str().unwrap_or_default()
            ),
        })
        .collect();
    let id = |v: i64| Value::U32(v as u32);
    let mut out = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(ty::I32, types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(merges)),
    ];
    for (key, v) in [
        ("bos_token_id", ids.bos),
        ("eos_token_id", ids.eos),
        ("unknown_token_id", ids.unk),
    ] {
        if let Some(v) = v {
            out.push((format!("tokenizer.ggml.{key}"), id(v)));
        }
    }
    for (key, v) in [
        ("add_bos_token", ids.add_bos),
        ("add_eos_token", ids.add_eos),
    ] {
        if let Some(v) = v {
            out.push((format!("tokenizer.ggml.{key}"), Value::Bool(v)));
        }
    }
    Ok(out)
}

/// A `tokenizer.json` (byte-level BPE as transformers' GPT2TokenizerFast has it) from a
/// GGUF file's `tokenizer.ggml.*` keys; errors name the key.
pub fn tokenizer_json(h: &Header, path: &Path) -> Result<Json> {
    let bad = |reason: String| Error::Tokenizer {
        path: path.into(),
        reason,
    };
    let model = h.get("tokenizer.ggml.model").and_then(Value::as_str);
    if model != Some("gpt2") {
        return Err(bad(format!(
            "key `tokenizer.ggml.model` is {model:?}; gpt2kit reads GPT-2's BPE (\"gpt2\")"
        )));
    }
    let list = |key: &str| -> Result<&[Value]> {
        h.get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("key `{key}` is missing or not an array")))
    };
    let text = |key: &str, v: &Value| -> Result<String> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| bad(format!("key `{key}` holds a non-string")))
    };
    let tokens = list("tokenizer.ggml.tokens")?;
    let types = match h.get("tokenizer.ggml.token_type") {
        Some(_) => list("tokenizer.ggml.token_type")?,
        None => &[],
    };
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(bad(format!(
            "key `tokenizer.ggml.token_type` has {} entries for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let t = text("tokenizer.ggml.tokens", t)?;
        let kind = types.get(i).and_then(Value::as_i128).unwrap_or(1) as i32;
        if kind == CONTROL || kind == USER_DEFINED {
            added.push(
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": kind == CONTROL}),
            );
        }
        if vocab.insert(t.clone(), json!(i)).is_some() {
            return Err(bad(format!(
                "key `tokenizer.ggml.tokens`: token {t:?} appears twice"
            )));
        }
    }
    let mut merges = Vec::new();
    for m in list("tokenizer.ggml.merges")? {
        let m = text("tokenizer.ggml.merges", m)?;
        // llama.cpp splits at the first space after the first character.
        let cut = m
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(i, _)| i);
        let Some(cut) = cut else {
            return Err(bad(format!(
                "key `tokenizer.ggml.merges`: {m:?} is not two tokens"
            )));
        };
        // `cut` is a space's char boundary (one byte): both slices are on boundaries.
        merges.push(json!([&m[..cut], &m[cut + 1..]]));
    }
    let byte_level = |prefix: bool, trim: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": trim,
            "use_regex": true})
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level(false, true),
        "post_processor": byte_level(true, false),
        "decoder": byte_level(true, true),
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
}
