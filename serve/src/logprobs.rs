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

/// Where tokens' texts start in a choice's text, in characters, as the tokens come: the
/// text is the lossy UTF-8 decoding of the tokens' bytes (a byte sequence that never
/// becomes a character is one U+FFFD, as `String::from_utf8_lossy` writes it), and a
/// token starts at the character that holds its first byte. A character split across
/// tokens belongs to all of them; bytes that may still complete a character wait for the
/// next token.
#[derive(Clone, Debug, Default)]
pub struct Offsets {
    /// Characters complete so far.
    chars: usize,
    /// The start of a character still incomplete.
    pending: Vec<u8>,
}

impl Offsets {
    /// A token of `bytes` comes next: where it starts.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let mut buf = std::mem::take(&mut self.pending);
        let first = buf.len();
        buf.extend_from_slice(bytes);
        let mut start = None;
        // the next character (or U+FFFD), number `chars`, ends before buf[to]: the new
        // token starts there if that is past its first byte
        let place = |start: &mut Option<usize>, chars: &mut usize, to: usize| {
            if start.is_none() && to > first {
                *start = Some(*chars);
            }
            *chars += 1;
        };
        let mut at = 0;
        while at < buf.len() {
            let (valid, bad) = match std::str::from_utf8(&buf[at..]) {
                Ok(s) => (s, None),
                Err(e) => {
                    // the bytes before `valid_up_to` are valid UTF-8
                    let s = std::str::from_utf8(&buf[at..at + e.valid_up_to()]).unwrap_or("");
                    (s, Some(e.error_len()))
                }
            };
            for (p, c) in valid.char_indices() {
                place(&mut start, &mut self.chars, at + p + c.len_utf8());
            }
            at += valid.len();
            match bad {
                None => break,
                Some(Some(n)) => {
                    place(&mut start, &mut self.chars, at + n);
                    at += n;
                }
                Some(None) => {
                    // an incomplete character at the end: it waits for more bytes
                    if start.is_none() {
                        start = Some(self.chars);
                    }
                    self.pending = buf[at..].to_vec();
                    break;
                }
            }
        }
        start.unwrap_or(self.chars)
    }

    /// The text ends here (an EOS token, which adds no text): where it stands, after any
    /// incomplete bytes, which the text shows as U+FFFD.
    pub fn end(&mut self) -> usize {
        let rest = std::mem::take(&mut self.pending);
        self.chars += String::from_utf8_lossy(&rest).chars().count();
        self.chars
    }
}

/// The bytes a token adds to the text: none for one that decodes to nothing (a special
/// token the decoder skips).
fn token_text_bytes(tok: &Tokenizer, id: i64) -> Vec<u8> {
    match tok.decode(&[id]) {
        Ok(t) if t.is_empty() => Vec::new(),
        Ok(t) => tok.token_bytes(id).unwrap_or_else(|| t.into_bytes()),
        Err(_) => Vec::new(),
    }
}

/// A choice's `logprobs` for Completions: `ids` the generated tokens, `raw` theirs (one
/// each; extra ones ignored), placed in the text by `offsets` (which then stands after
/// the last). Tokens in `enders` (EOS) take no room in the text.
pub fn completion(
    tok: &Tokenizer,
    ids: &[i64],
    raw: &[Logprobs],
    enders: &[i64],
    offsets: &mut Offsets,
) -> Value {
    let mut tokens = Vec::with_capacity(ids.len());
    let mut token_logprobs = Vec::with_capacity(ids.len());
    let mut top_logprobs = Vec::with_capacity(ids.len());
    let mut text_offset = Vec::with_capacity(ids.len());
    for (&id, lp) in ids.iter().zip(raw) {
        let t = text(tok, id);
        text_offset.push(match enders.contains(&id) {
            true => offsets.end(),
            false => offsets.push(&token_text_bytes(tok, id)),
        });
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
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
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

#[cfg(test)]
mod tests {
    use super::Offsets;

    fn offsets(tokens: &[&[u8]]) -> Vec<usize> {
        let mut o = Offsets::default();
        tokens.iter().map(|t| o.push(t)).collect()
    }

    #[test]
    fn a_character_split_across_tokens_belongs_to_each() {
        // "aéb" with é's two bytes in two tokens; then "€" (three bytes) in three
        assert_eq!(offsets(&[b"a", &[0xC3], &[0xA9], b"b"]), [0, 1, 1, 2]);
        assert_eq!(
            offsets(&[&[0xE2], &[0x82], &[0xAC, b'x'], b"y"]),
            [0, 0, 0, 2]
        );
    }

    #[test]
    fn bytes_that_never_make_a_character_are_one_replacement_each() {
        // "a\u{FFFD}b": the lone lead byte is one character of the lossy text
        let lossy = String::from_utf8_lossy(&[b'a', 0xC3, b'b']).into_owned();
        assert_eq!(lossy.chars().count(), 3);
        assert_eq!(offsets(&[b"a", &[0xC3], b"b"]), [0, 1, 2]);
        // two incomplete characters in a row: E2 82, cut short by E2, then E2 A9, which
        // 'z' cuts short (A9 still continues the second E2)
        assert_eq!(
            offsets(&[&[0xE2, 0x82], &[0xE2], &[0xA9], b"z"]),
            [0, 1, 1, 2]
        );
        let lossy = String::from_utf8_lossy(&[0xE2, 0x82, 0xE2, 0xA9, b'z']).into_owned();
        assert_eq!(lossy, "\u{FFFD}\u{FFFD}z");
        // a stray continuation byte
        assert_eq!(offsets(&[b"a", &[0xA9], b"b"]), [0, 1, 2]);
        // every token's offset is the lossy character count of the bytes before it, but
        // for a token that continues a character
        let toks: [&[u8]; 5] = [b"ab", &[0xF0, 0x9F], &[0x98, 0x80], &[0xFF], b"c"];
        assert_eq!(offsets(&toks), [0, 2, 2, 3, 4]);
        let all: Vec<u8> = toks.concat();
        assert_eq!(String::from_utf8_lossy(&all).chars().count(), 5);
    }

    #[test]
    fn a_token_with_no_text_stands_where_the_text_is() {
        assert_eq!(offsets(&[b"ab", b"", b"c"]), [0, 2, 2]);
        assert_eq!(offsets(&[&[0xC3], b"", &[0xA9]]), [0, 0, 0]);
        // the end of the text (EOS) stands after the U+FFFD of an incomplete character
        let mut o = Offsets::default();
        assert_eq!((o.push(b"a"), o.push(&[0xC3]), o.end()), (0, 1, 2));
        assert_eq!(o.end(), 2);
    }
}
