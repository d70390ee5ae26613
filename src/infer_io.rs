//! `gpt2kit infer`'s input and output around the engine: prompts from JSONL files,
//! UTF-8-safe streaming of tokens as text, the returned sequences (text or JSON lines),
//! and the `--stats` line with the process's peak memory.
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use infer::generate::Output;
use infer::speculative::SpecStats;
use infer::Tokenizer;
use serde_json::json;

/// The prompts of the JSONL file at `path` (see `infer::prompts::parse_prompts`): each
/// one's text, its line's own `max_new_tokens` if any, and its line number. Errors name
/// the file and line.
pub fn read_prompts(
    path: &Path,
    field: Option<&str>,
) -> anyhow::Result<Vec<(String, Option<usize>, usize)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let prompts = infer::prompts::parse_prompts(&bytes, path, field)?;
    Ok(prompts
        .into_iter()
        .map(|p| (p.text, p.max_new_tokens, p.line))
        .collect())
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
    pub fn push(
        &mut self,
        tok: i64,
        tokenizer: &Tokenizer,
        out: &mut dyn Write,
    ) -> anyhow::Result<()> {
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
    pub fn finish(&mut self, tokenizer: &Tokenizer, out: &mut dyn Write) -> anyhow::Result<()> {
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

/// Each returned sequence after its prompt (nothing when it was streamed), or as a
/// JSON line.
pub fn print_sequences(
    json: bool,
    stream: bool,
    texts: &[String],
    output: &Output,
    tokenizer: &Tokenizer,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let several = output.sequences.iter().map(Vec::len).sum::<usize>() > 1;
    for (i, (prompt, seqs)) in texts.iter().zip(&output.sequences).enumerate() {
        for (j, g) in seqs.iter().enumerate() {
            let text = tokenizer.decode(&g.tokens)?;
            if json {
                let line = json!({
                    "prompt_index": i,
                    "sequence_index": j,
                    "text": text,
                    "token_ids": g.tokens,
                    "logprobs": g.logprobs,
                    "score": g.score,
                    "finish_reason": g.finish_reason.as_str(),
                });
                crate::write_json(out, &line)?;
            } else if !stream {
                writeln!(out, "{prompt}{text}")?;
                if several {
                    writeln!(out)?;
                }
            }
        }
    }
    Ok(())
}

/// The `--stats` line on stderr.
pub fn print_stats(prompts: &[Vec<i64>], output: &Output, spec_stats: Option<SpecStats>) {
    let generated: usize = output
        .sequences
        .iter()
        .flatten()
        .map(|g| g.tokens.len())
        .sum();
    let decode_ms = output.decode.as_secs_f64() * 1e3;
    // Tokens per second of the decode phase: every token after the first of each sequence.
    let decode_tokens = generated.saturating_sub(output.sequences.iter().flatten().count());
    let mut stats = json!({
        "prompt_tokens": prompts.iter().map(Vec::len).sum::<usize>(),
        "generated_tokens": generated,
        "steps": output.steps,
        "prefill_ms": output.prefill.as_secs_f64() * 1e3,
        "decode_ms": decode_ms,
        "decode_tokens_per_s": if decode_ms > 0.0 { decode_tokens as f64 / (decode_ms / 1e3) } else { 0.0 },
        "peak_rss_mb": peak_rss_mb(),
    });
    if let Some(st) = spec_stats {
        stats["draft_tokens_proposed"] = json!(st.proposed);
        stats["draft_tokens_accepted"] = json!(st.accepted);
        stats["acceptance_rate"] = json!(st.acceptance_rate());
        stats["tokens_per_step"] = json!(st.tokens_per_step(generated));
    }
    // stderr closed or full (`2>/dev/full`) loses the line, not the run's output.
    let _ = writeln!(std::io::stderr(), "{stats}");
}
