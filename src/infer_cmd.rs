//! `gpt2kit infer`: greedy generation from one or more prompts, run as one batch.
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use infer::generate::{generate, validate, GenerationConfig};
use infer::{Error, Gpt2, Gpt2Config, Tokenizer};
use serde_json::json;

use crate::Out;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text; repeat the flag for several prompts (run as one left-padded batch).
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Tokens to generate after each prompt.
    #[arg(long, default_value_t = 20)]
    max_new_tokens: i64,
    /// Weights and compute dtype: f32, f16, bf16, or auto (the checkpoint's own).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda, cuda:N or mps.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// One JSON object per line per prompt: prompt_index, text, token_ids, finish_reason.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args, out: &mut Out) -> anyhow::Result<()> {
    let (device, kind) = crate::device_and_dtype(&args.device, &args.dtype)?;
    if let Some(i) = args.prompt.iter().position(String::is_empty) {
        return Err(Error::Input(format!("--prompt {i} is empty")).into());
    }
    let dir = &args.model;
    infer::model::check_model_dir(dir)?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let prompts = args
        .prompt
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<Result<Vec<_>, _>>()?;
    let config = Gpt2Config::from_file(&dir.join("config.json"))?;
    let cfg = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        eos_token_ids: config.eos_ids(),
        pad_token_id: config.pad_token_id,
    };
    validate(&config, &prompts, &cfg)?;
    let model = Gpt2::load(dir, kind, device)
        .with_context(|| format!("loading model {}", dir.display()))?;
    let results = tch::no_grad(|| generate(&model, &prompts, &cfg, |_, _| {}))?;
    for (i, (prompt, r)) in args.prompt.iter().zip(&results).enumerate() {
        let text = tokenizer.decode(&r.tokens)?;
        if args.json {
            crate::write_json(
                out,
                &json!({
                    "prompt_index": i,
                    "text": text,
                    "token_ids": r.tokens,
                    "finish_reason": r.finish_reason.as_str(),
                }),
            )?;
        } else {
            writeln!(out, "{prompt}{text}")?;
        }
    }
    Ok(())
}
