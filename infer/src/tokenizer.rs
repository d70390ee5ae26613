//! GPT-2's byte-level BPE through the `tokenizers` crate, from `tokenizer.json` or from
//! the original `vocab.json` + `merges.txt` pair (built as transformers'
//! `GPT2TokenizerFast` converts them: byte-level pre-tokenizer, decoder and
//! post-processor, `<|endoftext|>` as a special token).
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::files::{check_regular_file, exists};

pub const TOKENIZER_JSON: &str = "tokenizer.json";
pub const VOCAB_JSON: &str = "vocab.json";
pub const MERGES_TXT: &str = "merges.txt";
const ENDOFTEXT: &str = "<|endoftext|>";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// `id_bound`, counted once: `get_vocab` copies the whole vocabulary, and every
    /// `decode` (a server decodes each stream's text at every token) checks against it.
    id_bound: usize,
}

impl Tokenizer {
    /// Loads the tokenizer of a model folder: `tokenizer.json` if present, else
    /// `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            let file = crate::gguf::GgufFile::open(dir)?;
            let json = crate::gguf::vocab::tokenizer_json(&file.header, dir)?.to_string();
            drop(file);
            return Self::from_json_bytes(json.as_bytes(), dir);
        }
        let json = dir.join(TOKENIZER_JSON);
        let (vocab, merges) = (dir.join(VOCAB_JSON), dir.join(MERGES_TXT));
        if exists(&json) {
            Self::from_json(&json)
        } else if exists(&vocab) && exists(&merges) {
            Self::from_vocab_merges(&vocab, &merges)
        } else {
            Err(Error::Tokenizer {
                path: dir.into(),
                reason: format!("no {TOKENIZER_JSON}, nor {VOCAB_JSON} with {MERGES_TXT}"),
            })
        }
    }

    pub fn from_json(path: &Path) -> Result<Self> {
        check_regular_file(path)?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_bytes(&bytes, path)
    }

    /// A tokenizer from `tokenizer.json` content; `path` names it in errors.
    pub fn from_json_value(json: &serde_json::Value, path: &Path) -> Result<Self> {
        Self::from_json_bytes(json.to_string().as_bytes(), path)
    }

    fn from_json_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Tokenizer {
            path: path.into(),
            reason,
        };
        // tokenizers 0.22 panics instead of failing on some malformed files (found by
        // fuzzing, fuzz/regressions/tokenizer_json): a syntax error inside `decoder`, a
        // `Precompiled` normalizer its own type does not accept. Both are refused here.
        let json: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        check_precompiled(&json).map_err(bad)?;
        // one parsed copy of the vocabulary at a time (GPT-2's is ~50 MB of heap as a tree)
        drop(json);
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| bad(e.to_string()))?;
        Ok(Self::new(inner, path))
    }

    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let err = |e: &dyn std::fmt::Display| Error::Tokenizer {
            path: vocab.into(),
            reason: format!("with {}: {e}", merges.display()),
        };
        check_regular_file(vocab)?;
        check_regular_file(merges)?;
        let (v, m) = (vocab.to_string_lossy(), merges.to_string_lossy());
        let bpe = BPE::from_file(&v, &m).build().map_err(|e| err(&e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::default()))
            .with_post_processor(Some(ByteLevel::new(true, false, true)));
        if inner.token_to_id(ENDOFTEXT).is_some() {
            inner.add_special_tokens(&[AddedToken::from(ENDOFTEXT, true)]);
        }
        Ok(Self::new(inner, vocab))
    }

    fn new(inner: tokenizers::Tokenizer, path: &Path) -> Self {
        let id_bound = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        // Parsing left tens of MB of freed heap (JSON trees, vocabulary copies) that glibc
        // would keep in the process: give it back before the model loads beside it.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free memory to the system.
        unsafe {
            libc::malloc_trim(0);
        }
        Self {
            inner,
            path: path.into(),
            id_bound,
        }
    }

    /// One past the largest token id, added tokens included: the embedding rows the
    /// tokenizer can index.
    pub fn id_bound(&self) -> usize {
        self.id_bound
    }

    /// The vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether both map every token string to the same id (added tokens included).
    pub fn same_vocabulary(&self, other: &Tokenizer) -> bool {
        self.inner.get_vocab(true) == other.inner.get_vocab(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tokenizer as `tokenizer.json` content.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let text = self.inner.to_string(false).map_err(|e| self.error(e))?;
        serde_json::from_str(&text).map_err(|e| self.error(e))
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// The bytes token `id` stands for (GPT-2's byte-level alphabet undone; a special
    /// token's own text); `None` outside the vocabulary.
    pub fn token_bytes(&self, id: i64) -> Option<Vec<u8>> {
        let token = self.inner.id_to_token(u32::try_from(id).ok()?)?;
        let bytes: Option<Vec<u8>> = token.chars().map(byte_of_char).collect();
        Some(bytes.unwrap_or_else(|| token.into_bytes()))
    }

    /// Token ids of `text`, with no special tokens added (GPT-2 adds none).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| self.error(e))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Text of `ids`; bytes that are not valid UTF-8 on their own become U+FFFD.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let vocab = self.id_bound() as i64;
        let mut ids32 = Vec::with_capacity(ids.len());
        for &id in ids {
            if id < 0 || id >= vocab {
                return Err(Error::Input(format!(
                    "token id {id} is outside the tokenizer's vocabulary (size {vocab})"
                )));
            }
            ids32.push(id as u32);
        }
        self.inner.decode(&ids32, false).map_err(|e| self.error(e))
    }

    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }
}

/// Refuses a model folder whose `config.json` has fewer token embeddings than its
/// tokenizer has tokens: a token id past `vocab_size` would index outside `wte`.
/// (A larger `vocab_size`, padded as GPT-2's 50257 → 50304 often is, is fine.)
pub fn check_vocab(config: &Gpt2Config, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    // The largest id, not the count: a tokenizer's ids need not be contiguous.
    let bound = tokenizer.id_bound() as i64;
    if bound <= config.vocab_size {
        return Ok(());
    }
    // a GGUF file's vocab_size is its `token_embd` rows (there is no config.json)
    let source = match crate::gguf::is_gguf(dir) {
        true => "token_embd has rows for",
        false => "config.json has vocab_size",
    };
    Err(Error::Input(format!(
        "{}: {source} {} but the tokenizer ({}) has {} tokens with ids \
         up to {}; token ids {}..{bound} would index past the embedding table",
        dir.display(),
        config.vocab_size,
        tokenizer.path().display(),
        tokenizer.vocab_size(),
        bound - 1,
        config.vocab_size,
    )))
}

/// Every `{"type": "Precompiled", ...}` object in a tokenizer.json is one the tokenizers
/// library's `Precompiled` accepts (its wrapper would panic on one it does not).
fn check_precompiled(v: &serde_json::Value) -> std::result::Result<(), String> {
    match v {
        serde_json::Value::Object(map) => {
            if map.get("type").and_then(|t| t.as_str()) == Some("Precompiled") {
                serde_json::from_value::<tokenizers::normalizers::Precompiled>(v.clone())
                    .map_err(|e| format!("a Precompiled normalizer it cannot read: {e}"))?;
            }
            map.values().try_for_each(check_precompiled)
        }
        serde_json::Value::Array(items) => items.iter().try_for_each(check_precompiled),
        _ => Ok(()),
    }
}

/// The byte GPT-2's byte-level alphabet (`bytes_to_unicode`) writes as `c`: printable
/// Latin-1 bytes as themselves, the others as U+0100 onwards in byte order.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
    let c = c as u32;
    if printable(c) {
        return u8::try_from(c).ok();
    }
    let n = c.checked_sub(256)?;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .and_then(|b| u8::try_from(b).ok())
}

#[cfg(test)]
mod tests {
    use super::byte_of_char;

    #[test]
    fn byte_level_alphabet_undone() {
        // Printable bytes stand for themselves; the 68 others are U+0100 onwards.
        assert_eq!(byte_of_char('A'), Some(b'A'));
        assert_eq!(byte_of_char('ÿ'), Some(0xff));
        assert_eq!(byte_of_char('\u{100}'), Some(0));
        assert_eq!(byte_of_char('Ġ'), Some(b' '));
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('\u{121}'), Some(0x7f));
        assert_eq!(byte_of_char('\u{143}'), Some(0xad));
        assert_eq!(byte_of_char('\u{144}'), None);
        assert_eq!(byte_of_char('€'), None);
    }
}
