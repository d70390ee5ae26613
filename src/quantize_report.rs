//! `quantize`'s report: bytes, perplexity and decode speed of the source model and of
//! what was written (folder or GGUF file), measured the same way for both.
use std::path::{Path, PathBuf};

use anyhow::Context;
use infer::generate::{generate, GenerationConfig};
use infer::{Gpt2, Tokenizer};
use serde_json::json;
use tch::{Device, Kind};

/// The bytes of these files (0 for one that cannot be read).
pub(crate) fn bytes_of(paths: &[PathBuf]) -> u64 {
    paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Greedy batch-1 decode speed: tokens per second over `n` new tokens (EOS ignored).
fn decode_speed(model: &Gpt2, tokenizer: &Tokenizer, n: usize) -> anyhow::Result<Option<f64>> {
    if n == 0 {
        return Ok(None);
    }
    let prompt = tokenizer.encode("The quick brown fox")?;
    let n = n.min((model.config.n_positions as usize).saturating_sub(prompt.len() + 1));
    if n < 2 {
        return Ok(None);
    }
    let cfg = GenerationConfig {
        max_new_tokens: n,
        eos_token_ids: vec![],
        ..GenerationConfig::default()
    };
    let warm = GenerationConfig {
        max_new_tokens: 2,
        ..cfg.clone()
    };
    let p = vec![prompt];
    tch::no_grad(|| generate(model, &p, &warm, &|_| false, |_, _| {}))?;
    let out = tch::no_grad(|| generate(model, &p, &cfg, &|_| false, |_, _| {}))?;
    let steps = out.sequences[0][0].tokens.len().saturating_sub(1).max(1);
    Ok(Some(steps as f64 / out.decode.as_secs_f64().max(1e-9)))
}

/// What the report measures with: `quantize`'s `--model`, `--eval`, `--text-field`,
/// `--decode-tokens` and engine switches.
pub(crate) struct Settings<'a> {
    pub(crate) model: &'a Path,
    pub(crate) eval: Option<&'a Path>,
    pub(crate) text_field: &'a str,
    pub(crate) decode_tokens: usize,
    pub(crate) engine: infer::EngineOptions,
}

pub(crate) struct Measured {
    pub(crate) ppl: Option<f64>,
    pub(crate) tok_s: Option<f64>,
}

/// Perplexity and decode speed of the model in `dir`; `what` names it in errors (the
/// artifact is measured in a temporary folder that is gone when the error is read).
pub(crate) fn measure(
    dir: &Path,
    what: &str,
    args: &Settings,
    block: i64,
) -> anyhow::Result<Measured> {
    let model = Gpt2::load_with(dir, Some(Kind::Float), &[Device::Cpu], &args.engine)
        .with_context(|| format!("loading {what}"))?;
    let tokenizer = Tokenizer::from_dir(dir).with_context(|| format!("loading {what}"))?;
    let ppl = match args.eval {
        Some(path) => Some(
            crate::eval_cmd::perplexity(&model, &tokenizer, path, block, 4, args.text_field)
                .with_context(|| format!("--eval {} on {what}", path.display()))?
                .perplexity,
        ),
        None => None,
    };
    let tok_s = decode_speed(&model, &tokenizer, args.decode_tokens)?;
    Ok(Measured { ppl, tok_s })
}

/// The report's measures: bytes, perplexity and decode speed of `--model` (its weight
/// `paths`) and of what was written (`written`: the model path and its weight files).
pub(crate) fn report(
    args: &Settings,
    paths: &[PathBuf],
    written: (&Path, &[PathBuf]),
    block: i64,
) -> anyhow::Result<serde_json::Value> {
    let dir = args.model;
    let before = measure(dir, &format!("model {}", dir.display()), args, block)?;
    let after = measure(written.0, "the quantized model", args, block)?;
    let (bytes_before, bytes_after) = (bytes_of(paths), bytes_of(written.1));
    Ok(json!({
        "model": dir.to_string_lossy(),
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "size_ratio": bytes_after as f64 / bytes_before.max(1) as f64,
        "perplexity_before": before.ppl,
        "perplexity_after": after.ppl,
        "eval_file": args.eval.map(|p| p.to_string_lossy()),
        "block_size": block,
        "decode_tokens_per_s_before": before.tok_s,
        "decode_tokens_per_s_after": after.tok_s,
        "decode_tokens": args.decode_tokens,
    }))
}
