//! Log-probabilities in OpenAI's shapes: the legacy Completions object
//! (`{tokens, token_logprobs, top_logprobs, text_offset}`) and Chat's
//! (`{content: [{token, logprob, bytes, top_logprobs}]}`). The values are the model's own
//! (log-softmax before any processor), as vLLM returns by default; each token's text is
//! its own decoding.
use infer::generate::Logprobs;
use infer::Tokenizer;
use serde_json::{json, Map, Value};

/// The most `logprobs` (Completions) or `top_logprobs` (Chat) a request may ask for,
/// vLLM's default limit.
pub const MAX_LOGPROBS: i64 = 20;

/// A token's text; a piece of a UTF-8 character as OpenAI writes it (`bytes:\\xe2\\x80`),
/// so that distinct tokens keep distinct names.
fn text(tok: &Tokenizer, id: i64) -> String {
    let t = tok.decode(&[id]).unwrap_or_default();
    if !t.contains('\u{FFFD}') {
        return t;
    }
    match tok.token_bytes(id) {
        Some(b) if std::str::from_utf8(&b).is_err() => {
            let hex: String = b.iter().map(|x| format!("\\x{x:02x}")).collect();
            format!("bytes:{hex}")
        }
        _ => t,
    }
}

/// What the text a token adds takes, in characters (a piece of a character: none).
fn width(tok: &Tokenizer, id: i64) -> usize {
    let t = tok.decode(&[id]).unwrap_or_default();
    t.chars().filter(|&c| c != '\u{FFFD}').count()
}

/// A choice's `logprobs` for Completions: `ids` the generated tokens, `raw` theirs (one
/// each; extra ones ignored), the first at text offset `offset`; with the offset after
/// the last. Tokens in `enders` (EOS) take no room in the text.
pub fn completion(
    tok: &Tokenizer,
    ids: &[i64],
    raw: &[Logprobs],
    enders: &[i64],
    mut offset: usize,
) -> (Value, usize) {
    let mut tokens = Vec::with_capacity(ids.len());
    let mut token_logprobs = Vec::with_capacity(ids.len());
    let mut top_logprobs = Vec::with_capacity(ids.len());
    let mut text_offset = Vec::with_capacity(ids.len());
    for (&id, lp) in ids.iter().zip(raw) {
        let t = text(tok, id);
        text_offset.push(offset);
        if !enders.contains(&id) {
            offset += width(tok, id);
        }
        let mut top = Map::new();
        for &(k, v) in &lp.top {
            top.entry(text(tok, k)).or_insert(json!(v));
        }
        // vLLM's: the chosen token is among them even when less likely than the top n.
        top.entry(t.clone()).or_insert(json!(lp.logprob));
        tokens.push(t);
        token_logprobs.push(lp.logprob);
        top_logprobs.push(Value::Object(top));
    }
    let v = json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    });
    (v, offset)
}

/// One token in Chat's shape.
fn chat_token(tok: &Tokenizer, id: i64, logprob: f64) -> Value {
    let t = text(tok, id);
    let bytes = tok
        .token_bytes(id)
        .unwrap_or_else(|| t.clone().into_bytes());
    json!({"token": t, "logprob": logprob, "bytes": bytes})
}

/// A choice's `logprobs` for Chat: `top` the most likely tokens per position.
pub fn chat(tok: &Tokenizer, ids: &[i64], raw: &[Logprobs], top: usize) -> Value {
    let content: Vec<Value> = ids
        .iter()
        .zip(raw)
        .map(|(&id, lp)| {
            let mut v = chat_token(tok, id, lp.logprob);
            v["top_logprobs"] = lp
                .top
                .iter()
                .take(top)
                .map(|&(k, l)| chat_token(tok, k, l))
                .collect();
            v
        })
        .collect();
    json!({ "content": content })
}
