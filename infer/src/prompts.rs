//! `infer --prompts FILE`: prompts from a JSONL file, one object per line. Errors name
//! the file and line.
use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// One prompt of a prompts file.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub text: String,
    /// The line's own `max_new_tokens`, if it has one.
    pub max_new_tokens: Option<usize>,
    /// The line number (from 1).
    pub line: usize,
}

/// The prompts of a JSONL file's bytes, one object per line: its `field` string, or with
/// no `field` given its `prompt` string, else its `text` (train's data files), and the
/// line's own `max_new_tokens` if it has one. Blank lines are skipped; a UTF-8 byte order
/// mark may start the file (as for train's data). `path` only names the file in
/// errors.
pub fn parse_prompts(bytes: &[u8], path: &Path, field: Option<&str>) -> Result<Vec<Prompt>> {
    let wanted = match field {
        Some(f) => format!("a {f:?} string"),
        None => "a \"prompt\" or \"text\" string".into(),
    };
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let at = |why: &str| Error::Input(format!("{}:{}: {why}", path.display(), i + 1));
        let line = std::str::from_utf8(line).map_err(|_| at("not valid UTF-8"))?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| at(&format!("invalid JSON: {e}")))?;
        if !v.is_object() {
            return Err(at(&format!("expected an object with {wanted}")));
        }
        let key = match field {
            Some(f) => f,
            None if v.get("prompt").is_some() => "prompt",
            None => "text",
        };
        let max_new_tokens = match v.get("max_new_tokens") {
            None | Some(Value::Null) => None,
            Some(n) => match n.as_u64() {
                Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
                _ => {
                    return Err(at(&format!(
                        "\"max_new_tokens\" must be an integer ≥ 1, got {n}"
                    )))
                }
            },
        };
        match v.get(key) {
            Some(Value::String(s)) => out.push(Prompt {
                text: s.clone(),
                max_new_tokens,
                line: i + 1,
            }),
            Some(_) => return Err(at(&format!("{key:?} is not a string"))),
            None => return Err(at(&format!("expected an object with {wanted}"))),
        }
    }
    if out.is_empty() {
        return Err(Error::Input(format!(
            "{}: no prompts in the file",
            path.display()
        )));
    }
    Ok(out)
}
