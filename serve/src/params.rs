//! The body of `POST /v1/completions`, read field by field from the JSON so that every
//! error names the field at fault: OpenAI's Completions fields and vLLM's extra sampling
//! fields (`vllm/entrypoints/openai/protocol.py`, `CompletionRequest`). Unknown fields,
//! wrong types and values out of range are refused; fields not supported yet are refused
//! by name rather than ignored.
use serde_json::{Map, Value};

use crate::error::ApiError;

/// One prompt as sent: text, or token ids.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Ids(Vec<i64>),
}

/// The sampling fields; `None` keeps the server's default (the model folder's
/// generation_config.json, else OpenAI's).
#[derive(Debug, Clone, Default)]
pub struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub typical_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub no_repeat_ngram_size: Option<usize>,
    pub min_tokens: Option<usize>,
    /// (token id, bias) from `logit_bias`.
    pub logit_bias: Vec<(i64, f64)>,
    pub bad_words: Vec<String>,
    pub stop_token_ids: Vec<i64>,
    pub ignore_eos: bool,
}

/// A checked completions request.
#[derive(Debug, Clone)]
pub struct Completion {
    pub model: Option<String>,
    pub prompts: Vec<Prompt>,
    /// `None`: up to 16 tokens (with `fill_context`, what the context leaves), fewer
    /// where the context ends sooner.
    pub max_tokens: Option<usize>,
    /// Without `max_tokens`, generate until the context ends (Chat's default).
    pub fill_context: bool,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub echo: bool,
    pub stop: Option<Vec<String>>,
    pub seed: Option<u64>,
    /// Raw log-probabilities of each token and the `n` most likely tokens'.
    pub logprobs: Option<usize>,
    pub sampling: Sampling,
}

/// The most choices one request may ask for (`n` × prompts).
pub const MAX_CHOICES: usize = 128;

/// Fields both endpoints take: the sampling settings and vLLM's extra processors.
pub const SHARED: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "logprobs",
    "top_k",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_tokens",
    "stop_token_ids",
    "ignore_eos",
    "bad_words",
];

/// The Completions API's own fields.
const KNOWN: &[&str] = &["prompt", "echo", "best_of", "suffix"];

/// The body's JSON object (malformed JSON, invalid UTF-8 or another JSON type: 400).
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            format!(
                "the request body must be a JSON object, got {}",
                type_name(&other)
            ),
        )),
    }
}

/// An error naming the first field of `obj` in none of the `known` lists.
pub fn only_known(obj: &Map<String, Value>, known: &[&[&str]]) -> Result<(), ApiError> {
    match obj
        .keys()
        .find(|k| !known.iter().any(|list| list.contains(&k.as_str())))
    {
        Some(k) => Err(ApiError::invalid(k, format!("unknown field `{k}`"))),
        None => Ok(()),
    }
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn wrong(key: &str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        key,
        format!("`{key}` must be {want}, got {}", type_name(got)),
    )
}

/// A field's value, `None` when absent or null.
fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn number(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(v) => Err(wrong(key, "a number", v)),
    }
}

/// A number checked against `ok`, which says what it must be.
fn number_in(
    obj: &Map<String, Value>,
    key: &str,
    ok: impl Fn(f64) -> bool,
    must: &str,
) -> Result<Option<f64>, ApiError> {
    let v = number(obj, key)?;
    match v {
        Some(x) if !(x.is_finite() && ok(x)) => Err(ApiError::invalid(
            key,
            format!("`{key}` must be {must}, got {x}"),
        )),
        _ => Ok(v),
    }
}

pub fn integer(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid(key, format!("`{key}` must be an integer, got {n}"))),
        Some(v) => Err(wrong(key, "an integer", v)),
    }
}

/// An integer in `lo..=hi`.
pub fn integer_in(
    obj: &Map<String, Value>,
    key: &str,
    lo: i64,
    hi: i64,
) -> Result<Option<i64>, ApiError> {
    let v = integer(obj, key)?;
    match v {
        Some(x) if x < lo || x > hi => Err(ApiError::invalid(
            key,
            format!("`{key}` must be between {lo} and {hi}, got {x}"),
        )),
        _ => Ok(v),
    }
}

pub fn boolean(obj: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match field(obj, key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(wrong(key, "a boolean", v)),
    }
}

pub fn string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(wrong(key, "a string", v)),
    }
}

/// A list of token ids (`key` names it in errors).
pub fn ids(v: &Value, key: &str) -> Result<Vec<i64>, ApiError> {
    let Value::Array(items) = v else {
        return Err(wrong(key, "a list of token ids", v));
    };
    items
        .iter()
        .map(|x| {
            x.as_i64()
                .ok_or_else(|| wrong(key, "a list of integer token ids", x))
        })
        .collect()
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
pub fn prompts(obj: &Map<String, Value>) -> Result<Vec<Prompt>, ApiError> {
    let key = "prompt";
    let empty = || ApiError::invalid(key, "`prompt` is empty");
    let Some(v) = field(obj, key) else {
        return Err(ApiError::invalid(key, "`prompt` is required"));
    };
    let out = match v {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(items) if items.is_empty() => return Err(empty()),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![Prompt::Ids(ids(v, key)?)]
        }
        Value::Array(items) => items
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(Prompt::Text(s.clone())),
                Value::Array(_) => Ok(Prompt::Ids(ids(x, key)?)),
                other => Err(wrong(
                    key,
                    "a string, a list of strings, a list of token ids or a list of such lists",
                    other,
                )),
            })
            .collect::<Result<_, _>>()?,
        other => Err(wrong(key, "a string or a list", other))?,
    };
    let is_empty = |p: &Prompt| match p {
        Prompt::Text(s) => s.is_empty(),
        Prompt::Ids(ids) => ids.is_empty(),
    };
    if out.iter().any(is_empty) {
        return Err(empty());
    }
    Ok(out)
}

/// `stop`: a string or a list of (non-empty) strings.
fn stop(obj: &Map<String, Value>) -> Result<Option<Vec<String>>, ApiError> {
    let key = "stop";
    let list = match field(obj, key) {
        None => return Ok(None),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.clone()),
                other => Err(wrong(key, "a string or a list of strings", other)),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(wrong(key, "a string or a list of strings", other)),
    };
    if list.len() > 16 || list.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            key,
            "`stop` takes at most 16 strings, none of them empty",
        ));
    }
    Ok(Some(list))
}

/// `logit_bias`: `{"token id": bias}`, each bias in [-100, 100] as OpenAI's.
fn logit_bias(obj: &Map<String, Value>) -> Result<Vec<(i64, f64)>, ApiError> {
    let key = "logit_bias";
    let map = match field(obj, key) {
        None => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(other) => return Err(wrong(key, "an object of token id → bias", other)),
    };
    map.iter()
        .map(|(id, b)| {
            let id: i64 = id.parse().map_err(|_| {
                ApiError::invalid(key, format!("`logit_bias` key {id:?} is not a token id"))
            })?;
            match b.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b)),
                _ => Err(ApiError::invalid(
                    key,
                    format!("`logit_bias` for token {id} must be a number in [-100, 100], got {b}"),
                )),
            }
        })
        .collect()
}

/// Fields whose non-default values are not supported yet: refused by name.
fn unsupported(obj: &Map<String, Value>) -> Result<(), ApiError> {
    let later = |key: &str, what: &str| {
        Err(ApiError::invalid(
            key,
            format!("`{key}` is not supported yet ({what})"),
        ))
    };
    if field(obj, "suffix").is_some_and(|v| v != &Value::from("")) {
        return later("suffix", "omit it or send null");
    }
    if let Some(b) = integer(obj, "best_of")? {
        let n = integer(obj, "n")?.unwrap_or(1);
        if b != n {
            return later("best_of", "only best_of equal to n");
        }
    }
    Ok(())
}

fn sampling(obj: &Map<String, Value>) -> Result<Sampling, ApiError> {
    let unit = |x: f64| x > 0.0 && x <= 1.0;
    let count = |key: &str| -> Result<Option<usize>, ApiError> {
        Ok(integer_in(obj, key, 0, 1 << 20)?.map(|v| v as usize))
    };
    let bad_words = match field(obj, "bad_words") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(v @ Value::Array(items)) => items
            .iter()
            .map(|x| x.as_str().map(String::from))
            .collect::<Option<_>>()
            .ok_or_else(|| wrong("bad_words", "a list of strings", v))?,
        Some(v) => return Err(wrong("bad_words", "a list of strings", v)),
    };
    Ok(Sampling {
        temperature: number_in(obj, "temperature", |x| x >= 0.0, "a number ≥ 0")?,
        top_p: number_in(obj, "top_p", unit, "in (0, 1]")?,
        top_k: integer_in(obj, "top_k", -1, i64::from(u32::MAX))?,
        min_p: number_in(obj, "min_p", |x| (0.0..=1.0).contains(&x), "in [0, 1]")?,
        typical_p: number_in(obj, "typical_p", unit, "in (0, 1]")?,
        repetition_penalty: number_in(obj, "repetition_penalty", |x| x > 0.0, "a number > 0")?,
        presence_penalty: number_in(obj, "presence_penalty", |x| x.abs() <= 2.0, "in [-2, 2]")?,
        frequency_penalty: number_in(obj, "frequency_penalty", |x| x.abs() <= 2.0, "in [-2, 2]")?,
        no_repeat_ngram_size: count("no_repeat_ngram_size")?,
        min_tokens: count("min_tokens")?,
        logit_bias: logit_bias(obj)?,
        bad_words,
        stop_token_ids: match field(obj, "stop_token_ids") {
            Some(v) => ids(v, "stop_token_ids")?,
            None => Vec::new(),
        },
        ignore_eos: boolean(obj, "ignore_eos")?,
    })
}

/// `stream_options`: only `include_usage`, and only with `stream`.
fn include_usage(obj: &Map<String, Value>, stream: bool) -> Result<bool, ApiError> {
    let key = "stream_options";
    match field(obj, key) {
        None => Ok(false),
        Some(_) if !stream => Err(ApiError::invalid(
            key,
            "`stream_options` needs `stream: true`",
        )),
        Some(Value::Object(o)) => {
            only_known(o, &[&["include_usage", "continuous_usage_stats"]])?;
            if boolean(o, "continuous_usage_stats")? {
                return Err(ApiError::invalid(
                    "continuous_usage_stats",
                    "`continuous_usage_stats` is not supported yet",
                ));
            }
            boolean(o, "include_usage")
        }
        Some(v) => Err(wrong(key, "an object", v)),
    }
}

/// Completions' `logprobs`: how many most likely tokens to show beside each token's own
/// (0 to `MAX_LOGPROBS`); `false` or null: none.
fn logprobs(obj: &Map<String, Value>) -> Result<Option<usize>, ApiError> {
    if field(obj, "logprobs") == Some(&Value::Bool(false)) {
        return Ok(None);
    }
    Ok(integer_in(obj, "logprobs", 0, crate::logprobs::MAX_LOGPROBS)?.map(|v| v as usize))
}

/// Reads a completions body.
pub fn completion(body: &[u8]) -> Result<Completion, ApiError> {
    let obj = object(body)?;
    only_known(&obj, &[SHARED, KNOWN])?;
    unsupported(&obj)?;
    let c = Completion {
        prompts: prompts(&obj)?,
        echo: boolean(&obj, "echo")?,
        logprobs: logprobs(&obj)?,
        ..common(&obj, "max_tokens")?
    };
    if c.echo && c.logprobs.is_some() {
        return Err(ApiError::invalid(
            "logprobs",
            "`echo` with `logprobs` is not supported: it needs the prompt's log-probabilities, \
             which this server does not compute; drop one of `echo` and `logprobs`",
        ));
    }
    checked(c)
}

/// The fields Completions and Chat share (`max_tokens`: the key of the token limit);
/// no prompt, echo or log-probabilities yet.
pub fn common(obj: &Map<String, Value>, max_tokens: &str) -> Result<Completion, ApiError> {
    string(obj, "user")?;
    let stream = boolean(obj, "stream")?;
    Ok(Completion {
        model: string(obj, "model")?,
        prompts: Vec::new(),
        max_tokens: integer_in(obj, max_tokens, 1, 1 << 20)?.map(|v| v as usize),
        fill_context: false,
        n: integer_in(obj, "n", 1, MAX_CHOICES as i64)?.unwrap_or(1) as usize,
        stream,
        include_usage: include_usage(obj, stream)?,
        echo: false,
        stop: stop(obj)?,
        seed: integer_in(obj, "seed", 0, i64::MAX)?.map(|v| v as u64),
        logprobs: None,
        sampling: sampling(obj)?,
    })
}

/// Checks what a whole request asks for.
pub fn checked(c: Completion) -> Result<Completion, ApiError> {
    if c.prompts.len() * c.n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts × n {} is more than {MAX_CHOICES} choices in one request",
                c.prompts.len(),
                c.n
            ),
        ));
    }
    Ok(c)
}
