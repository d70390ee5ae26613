//! `gpt2kit tokenizer ...`: tokenizer tools (`train`: a byte-level BPE like GPT-2's).
use clap::{Args as ClapArgs, Subcommand};

use crate::Out;

#[derive(Subcommand)]
pub enum Command {
    /// Train a byte-level BPE tokenizer like GPT-2's on JSONL text.
    Train(TrainArgs),
}

#[derive(ClapArgs)]
pub struct TrainArgs {}

pub fn run(command: &Command, _out: &mut Out) -> anyhow::Result<()> {
    match command {
        Command::Train(_) => anyhow::bail!("`gpt2kit tokenizer train` is not built yet"),
    }
}
