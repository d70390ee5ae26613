//! `gpt2kit infer`'s input and output around the engine: prompts from JSONL files,
//! UTF-8-safe streaming of tokens as text, and the process's peak memory for `--stats`.
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use infer::{Error, Tokenizer};

use crate::Out;

fn usage(msg: String) -> anyhow::Error {
    Error::Input(msg).into()
}

/// The prompts of a JSONL file, one object per line: its `field` string, or with no
/// `field` given its `prompt` string, else its `text` (train's data files). Errors name
/// the file and line.
pub fn read_prompts(path: &Path, field: Option<&str>) -> anyhow::Result<Vec<String>> {
    let wanted = match field {
        Some(f) => format!("a {f:?} string"),
        None => "a \"prompt\" or \"text\" string".into(),
    };
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    // A UTF-8 byte order mark starts the file only (as for train's data).
    let text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&text);
    let mut out = Vec::new();
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        let at = |why: &str| usage(format!("{}:{}: {why}", path.display(), i + 1));
        let line = std::str::from_utf8(line).map_err(|_| at("not valid UTF-8"))?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at(&format!("invalid JSON: {e}")))?;
        if !v.is_object() {
            return Err(at(&format!("expected an object with {wanted}")));
        }
        let key = match field {
            Some(f) => f,
            None if v.get("prompt").is_some() => "prompt",
            None => "text",
        };
        match v.get(key) {
            Some(serde_json::Value::String(s)) => out.push(s.clone()),
            Some(_) => return Err(at(&format!("{key:?} is not a string"))),
            None => return Err(at(&format!("expected an object with {wanted}"))),
        }
    }
    if out.is_empty() {
        return Err(usage(format!("{}: no prompts in the file", path.display())));
    }
    Ok(out)
}

/// Prints a token stream as text without splitting a UTF-8 character: the text of all
/// tokens so far is decoded, and only a prefix that does not end in an incomplete
/// character (U+FFFD from the byte-level decoder) is printed.
#[derive(Default)]
pub struct Streamer {
    tokens: Vec<i64>,
    printed: usize,
}

impl Streamer {
    pub fn push(&mut self, tok: i64, tokenizer: &Tokenizer, out: &mut Out) -> anyhow::Result<()> {
        self.tokens.push(tok);
        let text = tokenizer.decode(&self.tokens)?;
        let ready = text.trim_end_matches('\u{FFFD}');
        if ready.len() > self.printed && ready.is_char_boundary(self.printed) {
            write!(out, "{}", &ready[self.printed..])?;
            out.flush()?;
            self.printed = ready.len();
        }
        Ok(())
    }

    /// Prints whatever is left (an incomplete character at the very end included).
    pub fn finish(&mut self, tokenizer: &Tokenizer, out: &mut Out) -> anyhow::Result<()> {
        let text = tokenizer.decode(&self.tokens)?;
        if text.len() > self.printed && text.is_char_boundary(self.printed) {
            write!(out, "{}", &text[self.printed..])?;
        }
        writeln!(out)?;
        Ok(())
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
