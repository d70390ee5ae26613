//! `gpt2kit merge-lora`: a base model plus a peft LoRA adapter, merged into a plain
//! Hugging Face model folder.
use std::io::Write;
use std::path::PathBuf;

use clap::Args as ClapArgs;

use crate::Out;

#[derive(ClapArgs)]
pub struct Args {
    /// The base model folder the adapter was trained on.
    #[arg(long)]
    model: PathBuf,
    /// The adapter folder (adapter_config.json, adapter_model.safetensors), as peft or `gpt2kit train --lora-r` writes it.
    #[arg(long)]
    adapter: PathBuf,
    /// The new model folder (must not exist).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: &Args, out: &mut Out) -> anyhow::Result<()> {
    let m = train::merge::merge_lora(&args.model, &args.adapter, &args.out)?;
    writeln!(
        out,
        "merged {} LoRA layers (r {}, scaling {}) into {} ({} layers): {}",
        m.lora.layers.len(),
        m.lora.options.r,
        m.lora.options.scaling(),
        args.model.display(),
        m.config.n_layer,
        args.out.display()
    )?;
    Ok(())
}
