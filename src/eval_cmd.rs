//! `gpt2kit eval`: loss and perplexity of a model on JSONL data.
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args as ClapArgs;
use infer::{Gpt2, Tokenizer};
use serde_json::json;

use crate::Out;

#[derive(ClapArgs)]
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
    /// Weights' dtype: f32, f16, bf16 or auto (as stored).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args, out: &mut Out) -> anyhow::Result<()> {
    let (device, kind) = crate::device_and_dtype(&args.device, &args.dtype)?;
    if !args.data.is_file() {
        return Err(
            infer::Error::Input(format!("--data {}: no such file", args.data.display())).into(),
        );
    }
    let model = Gpt2::load(&args.model, kind, device)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
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
    let r =
        train::eval::perplexity_on_jsonl(&model, &tokenizer, &args.data, block, args.batch_size)?;
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
