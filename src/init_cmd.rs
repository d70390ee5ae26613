//! `gpt2kit init`: a randomly initialised GPT-2 as a Hugging Face folder.
use clap::Args as ClapArgs;

use crate::Out;

#[derive(ClapArgs)]
pub struct Args {}

pub fn run(_args: &Args, _out: &mut Out) -> anyhow::Result<()> {
    anyhow::bail!("`gpt2kit init` is not built yet")
}
