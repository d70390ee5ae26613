//! JSONL datasets: `{"text": ...}` rows tokenized with an end-of-text token between
//! documents and packed into blocks (as transformers' `run_clm` groups texts), and
//! `{"prompt": ..., "completion": ...}` rows, one example each, whose loss counts the
//! completion tokens only. Every row is checked before training starts; errors name the
//! file and line.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use infer::Tokenizer;
use tch::{Device, Kind, Tensor};

use crate::metrics::stderr_line;

/// The UTF-8 byte order mark, skipped at the start of a file.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Label of a position the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

#[derive(Debug, Clone)]
pub struct DataOptions {
    /// The field holding a text row's text (`--text-field`).
    pub text_field: String,
    /// Skip invalid lines (counting them) instead of failing.
    pub skip_invalid: bool,
    /// Length of packed blocks and the longest prompt/completion example.
    pub block_size: i64,
    /// Truncate prompt/completion examples past `block_size` instead of refusing them.
    pub truncation: bool,
    /// The model's `vocab_size`: a token id (or `eos`) at or past it is refused, naming
    /// the row, before any forward pass indexes the embedding with it (a tokenizer that
    /// is not the model's, e.g. one retrained into its folder).
    pub vocab_size: Option<i64>,
}

impl DataOptions {
    pub fn new(block_size: i64) -> Self {
        Self {
            text_field: "text".into(),
            skip_invalid: false,
            block_size,
            truncation: false,
            vocab_size: None,
        }
    }
}

/// One training example: input ids and labels of the same length (labels are the ids,
/// or `IGNORE`; the model shifts them, as transformers' GPT2LMHeadModel does).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
}

impl Sample {
    /// Tokens the loss counts (labels after the shift that are not ignored).
    pub fn target_tokens(&self) -> i64 {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count() as i64
    }
}

/// What loading found.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub text_rows: usize,
    pub pair_rows: usize,
    /// Lines skipped under `skip_invalid`.
    pub skipped: usize,
    /// Prompt/completion examples cut to `block_size`.
    pub truncated: usize,
}

enum Row {
    Text(String),
    Pair(String, String),
}

fn bad_line(path: &Path, line: usize, reason: impl std::fmt::Display) -> anyhow::Error {
    infer::Error::Input(format!("{}:{line}: {reason}", path.display())).into()
}

/// Parses one JSONL line into a row.
fn parse_row(bytes: &[u8], text_field: &str) -> std::result::Result<Option<Row>, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("invalid UTF-8 (byte {})", e.valid_up_to()))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, got {}", kind_of(&value)))?;
    let field = |name: &str| -> std::result::Result<Option<String>, String> {
        match obj.get(name) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(format!(
                "field {name:?} is {}, expected a string",
                kind_of(v)
            )),
        }
    };
    if let Some(t) = field(text_field)? {
        return Ok(Some(Row::Text(t)));
    }
    match (field("prompt")?, field("completion")?) {
        (Some(p), Some(c)) => Ok(Some(Row::Pair(p, c))),
        (Some(_), None) => Err("field \"completion\" is missing (the row has \"prompt\")".into()),
        (None, Some(_)) => Err("field \"prompt\" is missing (the row has \"completion\")".into()),
        (None, None) => Err(format!(
            "field {text_field:?} is missing (expected {{\"{text_field}\": ...}} or {{\"prompt\": ..., \"completion\": ...}})"
        )),
    }
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Reads, checks and tokenizes the JSONL files; text rows are packed into blocks
/// (a last partial block is kept), prompt/completion rows become one example each.
/// Loads taking more than 2 s report their progress on stderr every 5 s.
pub fn load_jsonl(
    paths: &[PathBuf],
    tokenizer: &Tokenizer,
    eos: i64,
    opts: &DataOptions,
) -> Result<(Vec<Sample>, LoadReport)> {
    load(paths, tokenizer, eos, opts, Progress::stderr())
}

fn load(
    paths: &[PathBuf],
    tokenizer: &Tokenizer,
    eos: i64,
    opts: &DataOptions,
    mut progress: Progress,
) -> Result<(Vec<Sample>, LoadReport)> {
    if opts.block_size < 2 {
        return Err(infer::Error::Input(format!(
            "--block-size must be at least 2, got {}",
            opts.block_size
        ))
        .into());
    }
    if let Some(v) = opts.vocab_size.filter(|&v| !(0..v).contains(&eos)) {
        return Err(infer::Error::Input(format!(
            "the end-of-text id {eos} is outside the model's vocabulary (vocab_size {v})"
        ))
        .into());
    }
    let mut report = LoadReport::default();
    // Every line of every file is parsed before anything is tokenized.
    let mut rows = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        // A byte order mark opens some UTF-8 files (Python reads them as utf-8-sig).
        let bytes = bytes.strip_prefix(UTF8_BOM).unwrap_or(&bytes);
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            progress.tick(|| format!("reading {}: {i} lines", path.display()));
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match parse_row(line, &opts.text_field) {
                Ok(Some(row)) => rows.push((path, i + 1, row)),
                Ok(None) => {}
                Err(reason) if opts.skip_invalid => {
                    let _ = reason;
                    report.skipped += 1;
                }
                Err(reason) => return Err(bad_line(path, i + 1, reason)),
            }
        }
    }
    let block = opts.block_size as usize;
    let splittable = splits_like_gpt2(tokenizer);
    let total_rows = rows.len();
    let mut tokens_so_far = 0usize;
    let mut samples = Vec::new();
    let mut stream: Vec<i64> = Vec::new();
    for (row_index, (path, line, row)) in rows.into_iter().enumerate() {
        let mut encode = |s: &str| -> Result<Vec<i64>> {
            let ids = encode_in_pieces(tokenizer, s, splittable, PIECE_BYTES, &mut |done, n| {
                progress.tick(|| {
                    format!(
                        "tokenizing: row {}/{total_rows} ({}:{line}, {done} of {} bytes), {} tokens",
                        row_index + 1,
                        path.display(),
                        s.len(),
                        tokens_so_far + n
                    )
                })
            })
            .with_context(|| format!("{}:{line}: tokenizing", path.display()))?;
            if let Some(v) = opts.vocab_size {
                if let Some(&id) = ids.iter().find(|&&id| id >= v) {
                    let token = tokenizer.decode(&[id]).unwrap_or_default();
                    return Err(bad_line(
                        path,
                        line,
                        format!(
                            "token id {id} ({token:?}) is outside the model's vocabulary \
                             (vocab_size {v}): the tokenizer ({}) is not the model's",
                            tokenizer.path().display()
                        ),
                    ));
                }
            }
            tokens_so_far += ids.len();
            Ok(ids)
        };
        match row {
            Row::Text(t) => {
                report.text_rows += 1;
                stream.extend(encode(&t)?);
                stream.push(eos);
            }
            Row::Pair(p, c) => {
                report.pair_rows += 1;
                let prompt = encode(&p)?;
                let mut completion = encode(&c)?;
                completion.push(eos);
                let mut ids = prompt.clone();
                ids.extend(&completion);
                let mut labels = vec![IGNORE; prompt.len()];
                labels.extend(&completion);
                if ids.len() > block {
                    if !opts.truncation {
                        return Err(bad_line(
                            path,
                            line,
                            format!(
                                "the example is {} tokens, longer than --block-size {}; \
                                 pass --truncation to cut it",
                                ids.len(),
                                block
                            ),
                        ));
                    }
                    // The prompt's earliest tokens go first, then the completion's last.
                    let cut = (ids.len() - block).min(prompt.len());
                    ids.drain(..cut);
                    labels.drain(..cut);
                    ids.truncate(block);
                    labels.truncate(block);
                    report.truncated += 1;
                }
                let sample = Sample { ids, labels };
                if sample.target_tokens() > 0 {
                    samples.push(sample);
                }
            }
        }
    }
    if progress.reported {
        let line = format!(
            "tokenized {total_rows} rows: {tokens_so_far} tokens in {:.1} s",
            progress.start.elapsed().as_secs_f64()
        );
        (progress.write)(&line);
    }
    for chunk in stream.chunks(block) {
        if chunk.len() >= 2 {
            samples.push(Sample {
                ids: chunk.to_vec(),
                labels: chunk.to_vec(),
            });
        }
    }
    if samples.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(infer::Error::Input(format!(
            "{}: the dataset is empty (no row with tokens to learn from{})",
            names.join(", "),
            if report.skipped > 0 {
                format!("; {} invalid lines skipped", report.skipped)
            } else {
                String::new()
            }
        ))
        .into());
    }
    Ok((samples, report))
}

/// Progress lines on stderr while a dataset loads: the first after 2 s, then every 5 s,
/// so a quick load prints nothing. Writes cannot fail (`stderr_line`).
struct Progress {
    start: Instant,
    next: Duration,
    every: Duration,
    reported: bool,
    write: Box<dyn FnMut(&str)>,
}

impl Progress {
    fn stderr() -> Self {
        Self::new(
            Duration::from_secs(2),
            Duration::from_secs(5),
            Box::new(stderr_line),
        )
    }

    fn new(first: Duration, every: Duration, write: Box<dyn FnMut(&str)>) -> Self {
        Self {
            start: Instant::now(),
            next: first,
            every,
            reported: false,
            write,
        }
    }

    fn tick(&mut self, message: impl FnOnce() -> String) {
        let elapsed = self.start.elapsed();
        if elapsed >= self.next {
            (self.write)(&message());
            self.next = elapsed + self.every;
            self.reported = true;
        }
    }
}

/// Bytes of text encoded per tokenizer call. The `tokenizers` crate keeps roughly 180
/// bytes of bookkeeping per input byte while it encodes (offsets, alignments, token
/// strings): a 20 MB line peaked at 3.6 GB in one call.
pub(crate) const PIECE_BYTES: usize = 1 << 18;

/// `text` in pieces of `piece` bytes or a little more (the last may be shorter), each
/// ending just before an ASCII whitespace byte that follows an ASCII non-whitespace one:
/// GPT-2's split regex always cuts there, so the pieces pre-tokenize (and encode) to the
/// words (and ids) of the whole text. (Every position starts a match of the regex, so
/// its matches tile the text; a match holding a non-whitespace character has whitespace
/// only as its first character, so the match holding byte i-1 ends at i; the regex has
/// no look-behind, so its matches from i on do not depend on what came before; and no
/// special token holds whitespace, so none spans a cut.)
pub(crate) fn gpt2_pieces(text: &str, piece: usize) -> impl Iterator<Item = &str> + Send {
    let bytes = text.as_bytes();
    let piece = piece.max(1);
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= bytes.len() {
            return None;
        }
        let mut end = start.saturating_add(piece).min(bytes.len());
        while end < bytes.len()
            && !(bytes[end].is_ascii_whitespace() && bytes[end - 1].is_ascii_graphic())
        {
            end += 1;
        }
        // Both bytes around a cut are ASCII, so it is a char boundary.
        let s = &text[start..end];
        start = end;
        Some(s)
    })
}

/// Token ids of `text`, encoded in `gpt2_pieces` of `piece` bytes when `splittable`
/// (the tokenizer splits like GPT-2, see `splits_like_gpt2`): the ids of encoding it
/// whole. `on_piece(bytes done, ids so far)` is called before and between pieces.
fn encode_in_pieces(
    tokenizer: &Tokenizer,
    text: &str,
    splittable: bool,
    piece: usize,
    on_piece: &mut dyn FnMut(usize, usize),
) -> infer::Result<Vec<i64>> {
    on_piece(0, 0);
    if !splittable || text.len() <= piece {
        return tokenizer.encode(text);
    }
    let mut ids = Vec::new();
    let mut done = 0;
    for p in gpt2_pieces(text, piece) {
        ids.extend(tokenizer.encode(p)?);
        done += p.len();
        on_piece(done, ids.len());
    }
    Ok(ids)
}

/// Whether `tokenizer` splits text as GPT-2's does, so that `encode_in_pieces` may cut
/// it: a byte-level BPE with the split regex and no prefix space, no normalizer, no
/// truncation or padding, and added tokens without whitespace or strip rules.
/// `vocab.json` + `merges.txt` load that way; a `tokenizer.json` is read to check.
fn splits_like_gpt2(tokenizer: &Tokenizer) -> bool {
    let path = tokenizer.path();
    if path.file_name() != Some(std::ffi::OsStr::new(infer::tokenizer::TOKENIZER_JSON)) {
        return true;
    }
    let Some(json) = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return false;
    };
    let pre = &json["pre_tokenizer"];
    let flag = |v: &serde_json::Value, name: &str, default: bool| {
        v.get(name)
            .map_or(Some(default), serde_json::Value::as_bool)
    };
    let added_ok = json["added_tokens"].as_array().is_some_and(|tokens| {
        tokens.iter().all(|t| {
            t["content"]
                .as_str()
                .is_some_and(|c| !c.chars().any(char::is_whitespace))
                && ["lstrip", "rstrip", "single_word"]
                    .iter()
                    .all(|f| flag(t, f, false) == Some(false))
        })
    });
    json["normalizer"].is_null()
        && json["truncation"].is_null()
        && json["padding"].is_null()
        && pre["type"] == "ByteLevel"
        && flag(pre, "add_prefix_space", true) == Some(false)
        && flag(pre, "use_regex", true) == Some(true)
        && (json["post_processor"].is_null() || json["post_processor"]["type"] == "ByteLevel")
        && json["model"]["type"] == "BPE"
        && json["model"]["dropout"].is_null()
        && added_ok
}

/// A batch padded on the right to its longest example: ids (B, T) padded with `pad`,
/// labels (B, T) padded with `IGNORE`. Causal attention keeps padding out of the real
/// positions' view.
pub fn collate(samples: &[&Sample], pad: i64, device: Device) -> (Tensor, Tensor) {
    let t = samples.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(samples.len() * t);
    let mut labels = Vec::with_capacity(samples.len() * t);
    for s in samples {
        ids.extend(&s.ids);
        ids.extend(std::iter::repeat_n(pad, t - s.ids.len()));
        labels.extend(&s.labels);
        labels.extend(std::iter::repeat_n(IGNORE, t - s.labels.len()));
    }
    let b = samples.len() as i64;
    let shape = [b, t as i64];
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&labels).view(shape).to_device(device),
    )
}

/// Summed cross-entropy of `logits` (B, T, V) against `labels` (B, T) shifted by one,
/// in f32, ignoring `IGNORE` (transformers' ForCausalLMLoss with reduction "sum"). As
/// there, the labels are shifted (padded with `IGNORE`), not the logits, so the large
/// logits tensor is never copied.
pub fn lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Tensor {
    let v = *logits.size().last().expect("logits are (B, T, V)");
    let (b, t) = labels.size2().expect("labels are (B, T)");
    let pad = Tensor::full([b, 1], IGNORE, (Kind::Int64, labels.device()));
    let targets = Tensor::cat(&[labels.narrow(1, 1, t - 1), pad], 1).reshape([-1]);
    logits
        .to_kind(Kind::Float)
        .reshape([-1, v])
        .cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Sum, IGNORE, 0.0)
}

/// The end-of-text id: the config's first `eos_token_id`, else the tokenizer's
/// `<|endoftext|>`.
pub fn eos_id(config: &infer::Gpt2Config, tokenizer: &Tokenizer) -> Result<i64> {
    config
        .eos_ids()
        .first()
        .copied()
        .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
        .ok_or_else(|| {
            infer::Error::Input(
                "the model has no eos_token_id and the tokenizer no <|endoftext|>".into(),
            )
            .into()
        })
}

/// Splits off a seeded random fraction of the samples for eval: (train, eval).
pub fn split(samples: Vec<Sample>, fraction: f64, seed: u64) -> Result<(Vec<Sample>, Vec<Sample>)> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(infer::Error::Input(format!(
            "--eval-split must be between 0 and 1 (exclusive), got {fraction}"
        ))
        .into());
    }
    let n = samples.len();
    let n_eval = ((n as f64) * fraction).ceil() as usize;
    if n_eval >= n {
        return Err(infer::Error::Input(format!(
            "--eval-split {fraction} leaves no training data ({n} examples)"
        ))
        .into());
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let eval_idx: std::collections::HashSet<usize> = order[..n_eval].iter().copied().collect();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, s) in samples.into_iter().enumerate() {
        if eval_idx.contains(&i) {
            eval.push(s);
        } else {
            train.push(s);
        }
    }
    Ok((train, eval))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer_train;
    use std::cell::RefCell;
    use std::rc::Rc;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gpt2kit-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Deterministic pseudo-random numbers (SplitMix64).
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % n as u64) as usize
        }
    }

    /// Texts of words, digits, punctuation, contractions, every kind of whitespace run
    /// (ASCII and not), CJK, emoji and the special token.
    fn texts(n: usize, seed: u64) -> Vec<String> {
        let parts = [
            "the",
            "model",
            "café",
            "日本語",
            "🚀",
            "42",
            "7",
            "x=1;",
            "!!",
            "'s",
            "'ll",
            "don't",
            " ",
            " ",
            " ",
            "  ",
            "\n",
            "\n\n",
            "\t",
            "\r\n",
            " \n ",
            "\u{b}",
            "\u{a0}",
            "\u{3000}",
            "<|endoftext|>",
            "(",
            ")",
            ".",
            ",",
            "-",
        ];
        let mut rng = Rng(seed);
        (0..n)
            .map(|_| {
                (0..rng.below(200))
                    .map(|_| parts[rng.below(parts.len())])
                    .collect()
            })
            .collect()
    }

    /// A GPT-2 style tokenizer trained on `texts`, saved as `tokenizer.json`.
    fn trained_tokenizer(dir: &Path) -> Tokenizer {
        let tok = tokenizer_train::train(&texts(300, 1), 400, 2).unwrap();
        tokenizer_train::save(&tok, dir).unwrap();
        Tokenizer::from_dir(dir).unwrap()
    }

    #[test]
    fn encoding_in_pieces_gives_the_ids_of_the_whole_text() {
        let dir = scratch("pieces");
        let json = trained_tokenizer(&dir.join("tok"));
        let pair =
            Tokenizer::from_vocab_merges(&dir.join("tok/vocab.json"), &dir.join("tok/merges.txt"))
                .unwrap();
        assert!(splits_like_gpt2(&json) && splits_like_gpt2(&pair));
        let mut cuts = 0;
        for (i, text) in texts(400, 2).iter().enumerate() {
            let whole = json.encode(text).unwrap();
            let piece = 1 + i % 13;
            let mut calls = 0usize;
            let ids = encode_in_pieces(&json, text, true, piece, &mut |_, _| calls += 1).unwrap();
            assert_eq!(ids, whole, "{text:?} in pieces of {piece}");
            // One call before the first piece, one after each.
            cuts += calls.saturating_sub(2);
            let ids = encode_in_pieces(&pair, text, true, piece, &mut |_, _| {}).unwrap();
            assert_eq!(ids, whole, "{text:?} in pieces of {piece} (vocab.json)");
        }
        assert!(cuts > 1000, "only {cuts} cuts");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_tokenizers_that_split_like_gpt2_are_cut() {
        let dir = scratch("splits");
        trained_tokenizer(&dir.join("tok"));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("tok/tokenizer.json")).unwrap())
                .unwrap();
        let edits: [(&str, fn(&mut serde_json::Value)); 6] = [
            ("prefix space", |j| {
                j["pre_tokenizer"]["add_prefix_space"] = true.into()
            }),
            ("no regex", |j| {
                j["pre_tokenizer"]["use_regex"] = false.into()
            }),
            ("normalizer", |j| {
                j["normalizer"] = serde_json::json!({"type": "Lowercase"})
            }),
            ("truncation", |j| {
                j["truncation"] = serde_json::json!({"direction": "Right", "max_length": 8,
                    "strategy": "LongestFirst", "stride": 0})
            }),
            ("rstrip", |j| j["added_tokens"][0]["rstrip"] = true.into()),
            ("whitespace pre-tokenizer", |j| {
                j["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"})
            }),
        ];
        for (what, edit) in edits {
            let mut j = json.clone();
            edit(&mut j);
            let d = dir.join(what.replace(' ', "-"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("tokenizer.json"), j.to_string()).unwrap();
            let tok = Tokenizer::from_dir(&d).unwrap();
            assert!(!splits_like_gpt2(&tok), "{what}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_byte_order_mark_starts_a_file_and_nothing_else() {
        let dir = scratch("bom");
        let tok = trained_tokenizer(&dir.join("tok"));
        let rows = "{\"text\": \"the model\"}\n{\"prompt\": \"x\", \"completion\": \"café\"}\n";
        std::fs::write(dir.join("plain.jsonl"), rows).unwrap();
        std::fs::write(dir.join("bom.jsonl"), format!("\u{feff}{rows}")).unwrap();
        std::fs::write(dir.join("mid.jsonl"), format!("{rows}\u{feff}{rows}")).unwrap();
        let opts = DataOptions::new(16);
        let load = |name: &str| load_jsonl(&[dir.join(name)], &tok, 399, &opts);
        let (plain, _) = load("plain.jsonl").unwrap();
        let (bom, _) = load("bom.jsonl").unwrap();
        assert_eq!(bom, plain);
        let err = format!("{:#}", load("mid.jsonl").unwrap_err());
        assert!(err.contains("mid.jsonl:3: invalid JSON"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_slow_load_reports_lines_rows_and_tokens() {
        let dir = scratch("progress");
        let tok = trained_tokenizer(&dir.join("tok"));
        let text = texts(50, 3).join(" ");
        let rows: String = (0..3)
            .map(|_| format!("{}\n", serde_json::json!({ "text": text })))
            .collect();
        let data = dir.join("data.jsonl");
        std::fs::write(&data, rows).unwrap();
        let lines = Rc::new(RefCell::new(Vec::<String>::new()));
        let sink = lines.clone();
        // Every tick reports, as a load past the first delay would.
        let progress = Progress::new(
            Duration::ZERO,
            Duration::ZERO,
            Box::new(move |l| sink.borrow_mut().push(l.to_string())),
        );
        let (samples, _) =
            load(&[data.clone()], &tok, 399, &DataOptions::new(16), progress).unwrap();
        let lines = lines.borrow();
        let name = data.display().to_string();
        assert!(
            lines.contains(&format!("reading {name}: 3 lines")),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("tokenizing: row 3/3 ({name}:3, "))),
            "{lines:?}"
        );
        // The packed stream: each row's tokens and an end-of-text id.
        let tokens = samples.iter().map(|s| s.ids.len()).sum::<usize>() - 3;
        assert_eq!(tokens, 3 * tok.encode(&text).unwrap().len());
        assert!(
            lines
                .last()
                .unwrap()
                .starts_with(&format!("tokenized 3 rows: {tokens} tokens")),
            "{lines:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
