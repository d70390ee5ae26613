//! `gpt2kit eval`: loss and perplexity of a model on JSONL data.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args as ClapArgs;
use infer::{Gpt2, Tokenizer};
use serde_json::json;

use crate::choices::Dtype;
use crate::Out;

#[derive(ClapArgs)]
/// Negative numbers are values, not flags (`--seed -1` is refused by its type).
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// Model folder (Hugging Face layout; a checkpoint or an int8 artifact too).
    #[arg(long)]
    model: PathBuf,
    /// JSONL file: {"text": ...} rows (packed into blocks) or {"prompt", "completion"} rows.
    #[arg(long)]
    data: PathBuf,
    /// Tokens per block (default: the model's n_positions, at most 1024).
    #[arg(long)]
    block_size: Option<i64>,
    /// Blocks per forward pass.
    #[arg(long, default_value_t = 4)]
    batch_size: i64,
    /// cpu, cuda, cuda:N or mps.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights' and compute dtype; auto: the dtype the checkpoint stores (unlike infer,
    /// whose default is f32).
    #[arg(long, value_enum, default_value_t = Dtype::Auto)]
    dtype: Dtype,
    /// The JSON field holding a text row's text (as train's --text-field).
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: crate::EngineArgs,
}

pub fn run(args: &Args, out: &mut Out) -> anyhow::Result<()> {
    let (device, kind) = crate::device_and_dtype(&args.device, args.dtype)?;
    if !args.data.is_file() {
        return Err(
            infer::Error::Input(format!("--data {}: no such file", args.data.display())).into(),
        );
    }
    let model = Gpt2::load_with(&args.model, kind, &[device], &args.engine.options())
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    infer::check_vocab(&model.config, &tokenizer, &args.model)?;
    let block = args
        .block_size
        .unwrap_or(model.config.n_positions.min(1024));
    if block < 2 {
        return Err(
            infer::Error::Input(format!("--block-size must be at least 2, got {block}")).into(),
        );
    }
    if args.batch_size < 1 {
        return Err(infer::Error::Input(format!(
            "--batch-size must be positive, got {}",
            args.batch_size
        ))
        .into());
    }
    let r = perplexity(
        &model,
        &tokenizer,
        &args.data,
        block,
        args.batch_size,
        &args.text_field,
    )?;
    if args.json {
        return crate::write_json(
            out,
            &json!({"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens}),
        );
    }
    writeln!(
        out,
        "loss {:.4} · perplexity {:.3} · {} tokens",
        r.loss, r.perplexity, r.tokens
    )?;
    Ok(())
}

/// Loss and perplexity of `model` on a JSONL file, as `train::eval::perplexity_on_jsonl`
/// computes them, with the text rows' field named by `--text-field`. A loss that is not
/// finite is an error: a model that computes NaN has not been measured.
pub(crate) fn perplexity(
    model: &Gpt2,
    tokenizer: &Tokenizer,
    path: &Path,
    block_size: i64,
    batch_size: i64,
    text_field: &str,
) -> anyhow::Result<train::eval::EvalResult> {
    let n_pos = model.config.n_positions;
    if block_size > n_pos {
        return Err(infer::Error::Input(format!(
            "block size {block_size} exceeds the model's n_positions ({n_pos})"
        ))
        .into());
    }
    let eos = train::data::eos_id(&model.config, tokenizer)?;
    let mut opts = train::data::DataOptions::new(block_size);
    opts.truncation = true;
    opts.text_field = text_field.to_string();
    let (samples, _) = train::data::load_jsonl(&[path.to_path_buf()], tokenizer, eos, &opts)?;
    let r = train::eval::evaluate(model, &samples, batch_size, eos)?;
    // a weight file truncated or rewritten under the mapped model: not its perplexity
    model.check_files()?;
    if !r.loss.is_finite() {
        anyhow::bail!(
            "{}: the loss is {} (the model computes non-finite values; try --dtype f32)",
            path.display(),
            r.loss
        );
    }
    Ok(r)
}
