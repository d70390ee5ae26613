//! `gpt2kit eval`: loss and perplexity of a model on JSONL data.
use clap::Args as ClapArgs;

use crate::Out;

#[derive(ClapArgs)]
pub struct Args {}

pub fn run(_args: &Args, _out: &mut Out) -> anyhow::Result<()> {
    anyhow::bail!("`gpt2kit eval` is not built yet")
}
