//! `gpt2kit tokenizer ...`: tokenizer tools (`train`: a byte-level BPE like GPT-2's).
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand};
use train::tokenizer_train;

use crate::Out;

#[derive(Subcommand)]
pub enum Command {
    /// Train a byte-level BPE tokenizer like GPT-2's on JSONL text.
    Train(TrainArgs),
}

#[derive(ClapArgs)]
pub struct TrainArgs {
    /// JSONL file of `{"text": ...}` or `{"prompt": ..., "completion": ...}` rows;
    /// repeatable
    #[arg(long, value_name = "FILE.jsonl", required = true)]
    data: Vec<PathBuf>,
    /// Vocabulary size, the 256 byte symbols and `<|endoftext|>` (the last id) included
    #[arg(long, value_name = "N")]
    vocab_size: usize,
    /// Folder to write tokenizer.json, tokenizer_config.json, vocab.json, merges.txt
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The field holding each row's text
    #[arg(long, value_name = "NAME", default_value = "text")]
    text_field: String,
    /// A pair must occur this many times to become a merge
    #[arg(long, value_name = "N", default_value_t = 2)]
    min_frequency: u64,
}

pub fn run(command: &Command, out: &mut Out) -> anyhow::Result<()> {
    match command {
        Command::Train(args) => train_tokenizer(args, out),
    }
}

fn train_tokenizer(args: &TrainArgs, out: &mut Out) -> anyhow::Result<()> {
    let min = tokenizer_train::MIN_VOCAB_SIZE;
    if args.vocab_size < min {
        return Err(infer::Error::Input(format!(
            "--vocab-size {} is below {min}: the 256 byte symbols and {}",
            args.vocab_size,
            tokenizer_train::ENDOFTEXT
        ))
        .into());
    }
    // The trainer sizes its tables by the request, not by what the data can give: an
    // absurd size aborted on a failed allocation. GPT-2's vocabulary is 50257; the
    // largest in common use are about 256k.
    if args.vocab_size > tokenizer_train::MAX_VOCAB_SIZE {
        return Err(infer::Error::Input(format!(
            "--vocab-size {} is above {}",
            args.vocab_size,
            tokenizer_train::MAX_VOCAB_SIZE
        ))
        .into());
    }
    // Before the (long) training, and again before writing: a model's folder keeps its
    // tokenizer.
    tokenizer_train::check_new_folder(&args.out).context("--out")?;
    let start = Instant::now();
    let texts = tokenizer_train::read_texts(&args.data, &args.text_field)?;
    let bytes: usize = texts.iter().map(String::len).sum();
    let tokenizer = tokenizer_train::train(&texts, args.vocab_size, args.min_frequency)?;
    let seconds = start.elapsed().as_secs_f64();
    let files = tokenizer_train::save(&tokenizer, &args.out).context("--out")?;
    let tokens = tokenizer_train::count_tokens(&tokenizer, &texts)?;
    let vocab = tokenizer.get_vocab_size(true);
    writeln!(
        out,
        "trained on {} texts ({bytes} bytes) in {seconds:.2} s",
        texts.len()
    )?;
    writeln!(
        out,
        "vocab_size {vocab}: 256 bytes, {} merged tokens, {} = {}",
        vocab - 257,
        tokenizer_train::ENDOFTEXT,
        vocab - 1
    )?;
    if vocab < args.vocab_size {
        writeln!(
            out,
            "(below --vocab-size {}: no pair left that occurs --min-frequency {} times)",
            args.vocab_size, args.min_frequency
        )?;
    }
    writeln!(
        out,
        "{tokens} tokens on the training text: {:.3} bytes per token",
        bytes as f64 / tokens.max(1) as f64
    )?;
    for f in files {
        writeln!(out, "wrote {}", f.display())?;
    }
    Ok(())
}
