//! `gpt2kit init`: a randomly initialised GPT-2 as a Hugging Face folder.
use std::io::Write;
use std::path::PathBuf;

use clap::Args as ClapArgs;
use train::init::{init_model, InitOptions};

use crate::choices::Preset;
use crate::Out;

#[derive(ClapArgs)]
/// Negative numbers are values, not flags (`--seed -1` is refused by its type).
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// Model shape: tiny (4 layers × 4 heads × 256 wide, 256 positions), small (6 × 8 ×
    /// 512, 512 positions) or a published GPT-2 shape.
    #[arg(long, value_enum)]
    preset: Preset,
    /// Folder with the tokenizer (tokenizer.json, or vocab.json + merges.txt); sets
    /// vocab_size and is copied into the new folder.
    #[arg(long)]
    tokenizer: PathBuf,
    /// The new model folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Override the preset's number of layers.
    #[arg(long)]
    n_layer: Option<i64>,
    /// Override the preset's number of attention heads.
    #[arg(long)]
    n_head: Option<i64>,
    /// Override the preset's hidden width.
    #[arg(long)]
    n_embd: Option<i64>,
    /// Override the preset's context length.
    #[arg(long)]
    n_positions: Option<i64>,
}

pub fn run(args: &Args, out: &mut Out) -> anyhow::Result<()> {
    let config = init_model(&InitOptions {
        preset: &crate::choices::name(&args.preset),
        tokenizer_dir: &args.tokenizer,
        out: &args.out,
        seed: args.seed,
        n_layer: args.n_layer,
        n_head: args.n_head,
        n_embd: args.n_embd,
        n_positions: args.n_positions,
    })?;
    writeln!(
        out,
        "wrote {}: n_layer {} · n_head {} · n_embd {} · n_positions {} · vocab_size {} · {} parameters",
        args.out.display(),
        config.n_layer,
        config.n_head,
        config.n_embd,
        config.n_positions,
        config.vocab_size,
        config.num_parameters()
    )?;
    Ok(())
}
