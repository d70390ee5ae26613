//! `gpt2kit train`: fine-tune GPT-2 on JSONL data.
use clap::Args as ClapArgs;

use crate::Out;

#[derive(ClapArgs)]
pub struct Args {}

pub fn run(_args: &Args, _out: &mut Out) -> anyhow::Result<()> {
    anyhow::bail!("`gpt2kit train` is not built yet")
}
