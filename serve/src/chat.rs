//! `POST /v1/chat/completions`: the messages rendered into a prompt with the model
//! folder's chat template (`tokenizer_config.json`'s `chat_template`), as Hugging Face's
//! `apply_chat_template` renders it (Jinja with `trim_blocks` and `lstrip_blocks`,
//! `messages`, `add_generation_prompt`, the special tokens, `raise_exception`), then
//! generated as a completion and answered in Chat's shape.
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use minijinja::{Environment, ErrorKind};
use serde_json::{Map, Value};

use crate::completions::{start, Shape};
use crate::error::ApiError;
use crate::params::{self, Prompt};
use crate::App;

/// A model folder's chat template, ready to render, or why there is none.
pub struct Template {
    env: Result<Environment<'static>, String>,
    /// `bos_token`, `eos_token`, `unk_token`, `pad_token` as the template sees them.
    tokens: Map<String, Value>,
}

const CONFIG: &str = "tokenizer_config.json";

/// A special token's text: a string, or an added token's `{"content": ...}`.
fn token_text(v: &Value) -> Option<&str> {
    v.as_str().or_else(|| v.get("content")?.as_str())
}

impl Template {
    /// The folder's template; a folder without one (or with one that does not compile)
    /// still serves completions, and chat requests hear why not.
    pub fn load(dir: &Path) -> Self {
        let mut tokens = Map::new();
        let config: Option<Value> = std::fs::read(dir.join(CONFIG))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let source = config.as_ref().and_then(|c| {
            for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
                if let Some(t) = c.get(key).and_then(token_text) {
                    tokens.insert(key.into(), t.into());
                }
            }
            match c.get("chat_template")? {
                Value::String(s) => Some(s.clone()),
                // Several named templates: the one named "default".
                Value::Array(list) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(String::from)),
                _ => None,
            }
        });
        let env = match source {
            None => Err(format!(
                "this model has no chat template (no `chat_template` in its {CONFIG}); \
                 use /v1/completions"
            )),
            Some(src) => compile(src).map_err(|e| {
                format!("this model's chat template (in its {CONFIG}) does not compile: {e:#}")
            }),
        };
        if let Err(e) = &env {
            if config.is_some_and(|c| c.get("chat_template").is_some()) {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "warning: {e}");
            }
        }
        Self { env, tokens }
    }

    /// The prompt for `messages`.
    fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String, ApiError> {
        let env = self
            .env
            .as_ref()
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.clone()))?;
        let mut ctx = self.tokens.clone();
        ctx.insert("messages".into(), Value::Array(messages.to_vec()));
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        let render = env
            .get_template("chat")
            .and_then(|t| t.render(minijinja::Value::from_serialize(&ctx)));
        render.map_err(|e| {
            let why = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("refused").to_string(),
                _ => format!("{e:#}"),
            };
            ApiError::invalid(
                "messages",
                format!("the chat template could not render these messages: {why}"),
            )
        })
    }
}

/// Hugging Face's Jinja environment: trim_blocks, lstrip_blocks, Python's string and
/// dict methods, `raise_exception(msg)`.
fn compile(source: String) -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, _> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template_owned("chat", source)?;
    Ok(env)
}

/// The Chat API's own fields (besides `params::SHARED`).
const KNOWN: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "add_generation_prompt",
];

/// One message: `role` a string, `content` a string, a list of text parts (joined), or
/// null; other keys passed to the template as they are.
fn message(i: usize, v: &Value) -> Result<Value, ApiError> {
    let bad = |what: &str| ApiError::invalid("messages", format!("`messages[{i}]` {what}"));
    let Value::Object(m) = v else {
        return Err(bad("must be an object with `role` and `content`"));
    };
    let mut m = m.clone();
    match m.get("role") {
        Some(Value::String(r)) if !r.is_empty() => {}
        _ => return Err(bad("needs a `role` string")),
    }
    let content = match m.get("content") {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) => s.as_str().into(),
        Some(Value::Array(parts)) => {
            let texts: Option<Vec<&str>> = parts
                .iter()
                .map(|p| match p.get("type").and_then(Value::as_str) {
                    Some("text") => p.get("text").and_then(Value::as_str),
                    _ => None,
                })
                .collect();
            let texts = texts.ok_or_else(|| {
                bad("`content` parts must be `{\"type\": \"text\", \"text\": ...}`")
            })?;
            texts.join("\n").into()
        }
        Some(_) => return Err(bad("`content` must be a string or a list of text parts")),
    };
    m.insert("content".into(), content);
    Ok(Value::Object(m))
}

/// Reads a chat body: the completion it asks for and its Chat log-probability count.
pub fn request(chat: &Template, body: &[u8]) -> Result<(params::Completion, Shape), ApiError> {
    let obj = params::object(body)?;
    params::only_known(&obj, &[params::SHARED, KNOWN])?;
    let messages = match obj.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Array(_)) => return Err(ApiError::invalid("messages", "`messages` is empty")),
        Some(v) if !v.is_null() => {
            return Err(ApiError::invalid(
                "messages",
                format!("`messages` must be a list, got {}", params::type_name(v)),
            ))
        }
        _ => return Err(ApiError::invalid("messages", "`messages` is required")),
    };
    let limit = match obj.get("max_completion_tokens") {
        Some(v) if !v.is_null() => "max_completion_tokens",
        _ => "max_tokens",
    };
    let mut c = params::common(&obj, limit)?;
    let logprobs = params::boolean(&obj, "logprobs")?;
    let top = params::integer_in(&obj, "top_logprobs", 0, crate::logprobs::MAX_LOGPROBS)?;
    if top.is_some() && !logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    let top = top.unwrap_or(0) as usize;
    c.logprobs = logprobs.then_some(top);
    c.fill_context = true;
    let add = match obj.get("add_generation_prompt") {
        Some(v) if !v.is_null() => params::boolean(&obj, "add_generation_prompt")?,
        _ => true,
    };
    let prompt = chat.render(&messages, add)?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "the chat template rendered these messages to an empty prompt",
        ));
    }
    c.prompts = vec![Prompt::Text(prompt)];
    Ok((params::checked(c)?, Shape::Chat { top }))
}

pub async fn handle(State(app): State<Arc<App>>, req: Request) -> Response {
    let answer = async {
        let body = crate::body::read_body(req).await?;
        let (c, shape) = request(&app.chat, &body)?;
        start(&app, c, shape).await
    };
    match answer.await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}
