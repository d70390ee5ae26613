//! The HTTP request bodies of `gpt2kit serve`: a `/v1/completions` or
//! `/v1/chat/completions` body read and checked as the handlers check it (fields, then
//! each prompt's token ids and limit and each choice's generation settings against the
//! reference model's tokenizer and config), without a server or the model's weights.
use std::path::Path;
use std::sync::OnceLock;

use infer::generate::GenerationConfig;
use infer::{Gpt2Config, Tokenizer};
use serve::request::{self, Completion, Template};
use serve::ApiError;

/// What the checks need of a model folder: the reference model's tokenizer, config and
/// server defaults, and a chat template (`TEMPLATE`).
struct Model {
    tokenizer: Tokenizer,
    config: Gpt2Config,
    defaults: GenerationConfig,
    template: Template,
}

/// The chat template the chat target renders with (Hugging Face's style: a role check
/// that raises, string methods, the special tokens, `add_generation_prompt`).
pub const TEMPLATE: &str = "{% for message in messages %}\n\
    {% if message['role'] not in ['system', 'user', 'assistant'] %}\
    {{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}\n\
    {{ bos_token + message['role'] + ': ' + message['content'].strip() + '\\n' }}\
    {% endfor %}\n\
    {% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}";

fn model() -> Option<&'static Model> {
    static MODEL: OnceLock<Option<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = crate::seeds::tokenizer_dir()?;
            let config = Gpt2Config::from_file(&dir.join("config.json")).ok()?;
            let chat =
                std::env::temp_dir().join(format!("gpt2kit-fuzz-chat-{}", std::process::id()));
            std::fs::create_dir_all(&chat).ok()?;
            let tc = serde_json::json!({"bos_token": "<|endoftext|>", "chat_template": TEMPLATE});
            std::fs::write(chat.join("tokenizer_config.json"), tc.to_string()).ok()?;
            let template = Template::load(&chat);
            let _ = std::fs::remove_dir_all(&chat);
            Some(Model {
                tokenizer: Tokenizer::from_dir(&dir).ok()?,
                defaults: request::defaults(&dir, &config).ok()?,
                config,
                template,
            })
        })
        .as_ref()
}

/// The checks `completions::start` makes before queueing: prompt ids inside the
/// vocabulary, each prompt's token limit within the context, each choice's settings.
fn check(m: &Model, c: &Completion) -> Result<(), ApiError> {
    let prompts = request::prompt_ids(&m.tokenizer, &c.prompts)?;
    let context = usize::try_from(m.config.n_positions).unwrap_or(0); // as `serve` sets it
    for p in &prompts {
        let room = context.saturating_sub(p.len());
        let fill = (c.fill_context && room > 0).then_some(room);
        request::token_limit(c.max_tokens.or(fill), p.len(), context)?;
    }
    for j in 0..c.n {
        request::choice_config(&m.defaults, c, &m.tokenizer, &m.config, j)?;
    }
    Ok(())
}

/// A body as the completions (`chat` false) or chat endpoint reads and checks it: the
/// error's message, if any (`None`: the reference model is not there).
pub fn check_body(chat: bool, data: &[u8]) -> Option<Result<(), String>> {
    let m = model()?;
    let c = match chat {
        false => request::completion(data),
        true => request::chat(&m.template, data).map(|(c, _)| c),
    };
    Some(c.and_then(|c| check(m, &c)).map_err(|e| e.message))
}

/// A `POST /v1/completions` body.
pub fn completions(data: &[u8]) {
    let _ = check_body(false, data);
}

/// A `POST /v1/chat/completions` body, rendered with `TEMPLATE`.
pub fn chat_completions(data: &[u8]) {
    let _ = check_body(true, data);
}

/// An `infer --prompts` file, read with the default fields and with `--text-field body`;
/// each prompt then encoded with the reference tokenizer, as `infer` encodes it.
pub fn prompts(data: &[u8]) {
    let path = Path::new("prompts.jsonl");
    for field in [None, Some("body")] {
        let Ok(prompts) = infer::prompts::parse_prompts(data, path, field) else {
            continue;
        };
        if let Some(m) = model() {
            for p in prompts {
                let _ = m.tokenizer.encode(&p.text);
            }
        }
    }
}
