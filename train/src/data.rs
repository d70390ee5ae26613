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

use crate::pieces::{encode_in_pieces, splits_like_gpt2, PIECE_BYTES};
use crate::util::stderr_line;

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
}

impl DataOptions {
    pub fn new(block_size: i64) -> Self {
        Self {
            text_field: "text".into(),
            skip_invalid: false,
            block_size,
            truncation: false,
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
    let mut report = LoadReport::default();
    let rows = read_rows(paths, opts, &mut progress, &mut report)?;
    let (mut samples, stream) =
        tokenize_rows(rows, tokenizer, eos, opts, &mut progress, &mut report)?;
    for chunk in stream.chunks(opts.block_size as usize) {
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

/// A parsed row with the file and line (from 1) it came from.
type Located<'p> = (&'p PathBuf, usize, Row);

/// Parses every line of every file, before anything is tokenized; blank lines are
/// skipped, and invalid ones too (counted) under `skip_invalid`.
fn read_rows<'p>(
    paths: &'p [PathBuf],
    opts: &DataOptions,
    progress: &mut Progress,
    report: &mut LoadReport,
) -> Result<Vec<Located<'p>>> {
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
    Ok(rows)
}

/// Tokenizes the rows in order: (the prompt/completion examples, the stream of text
/// rows' tokens with `eos` after each, to be packed).
fn tokenize_rows(
    rows: Vec<Located>,
    tokenizer: &Tokenizer,
    eos: i64,
    opts: &DataOptions,
    progress: &mut Progress,
    report: &mut LoadReport,
) -> Result<(Vec<Sample>, Vec<i64>)> {
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
                let sample = pair_sample(prompt, completion, opts, report)
                    .map_err(|reason| bad_line(path, line, reason))?;
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
    Ok((samples, stream))
}

/// One prompt/completion example, the loss on the completion only; past `block_size`
/// it is cut under `truncation` (counted), else refused.
fn pair_sample(
    prompt: Vec<i64>,
    completion: Vec<i64>,
    opts: &DataOptions,
    report: &mut LoadReport,
) -> std::result::Result<Sample, String> {
    let block = opts.block_size as usize;
    let mut ids = prompt.clone();
    ids.extend(&completion);
    let mut labels = vec![IGNORE; prompt.len()];
    labels.extend(&completion);
    if ids.len() > block {
        if !opts.truncation {
            return Err(format!(
                "the example is {} tokens, longer than --block-size {}; \
                 pass --truncation to cut it",
                ids.len(),
                block
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
    Ok(Sample { ids, labels })
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
    // Shapes of the model's own outputs and of batches this module built, not of file data.
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
    // In range: `n_eval < n` above.
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
#[path = "data_tests.rs"]
mod tests;
