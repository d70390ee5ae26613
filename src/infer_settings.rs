//! `gpt2kit infer`'s decoding settings: the flags named after transformers'
//! `generation_config.json` fields, and their merge with transformers' defaults, the
//! model folder's `generation_config.json` and `--generation-config FILE` (flags last).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use infer::generate::GenerationConfig;
use infer::{genconfig, Error, Gpt2Config, Tokenizer};

use crate::choices::EarlyStopping;

fn usage(msg: String) -> anyhow::Error {
    Error::Input(msg).into()
}

/// The decoding flags of `infer`, flattened into its arguments.
#[derive(clap::Args)]
pub(crate) struct GenerationArgs {
    /// A generation_config.json whose fields override the model folder's own.
    #[arg(long)]
    generation_config: Option<PathBuf>,
    /// Tokens to generate after each prompt [default: 20].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Total length (prompt + generated) per prompt; used when --max-new-tokens is absent.
    #[arg(long)]
    max_length: Option<usize>,
    /// No EOS before this many new tokens.
    #[arg(long)]
    min_new_tokens: Option<usize>,
    /// No EOS before the sequence (prompt included) has this many tokens.
    #[arg(long)]
    min_length: Option<usize>,
    /// Sample from the processed distribution instead of taking its argmax.
    #[arg(long)]
    do_sample: bool,
    /// Divide logits by this before sampling (> 0) [default: 1.0].
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f64>,
    /// Keep the k most likely tokens when sampling; 0 disables [default: 50].
    #[arg(long, allow_negative_numbers = true)]
    top_k: Option<i64>,
    /// Keep the smallest set of tokens with probability mass ≥ p, in (0, 1] [default: 1.0].
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f64>,
    /// Drop tokens less likely than min_p × the top token's probability, in [0, 1].
    #[arg(long, allow_negative_numbers = true)]
    min_p: Option<f64>,
    /// Locally typical sampling mass, in (0, 1] [default: 1.0].
    #[arg(long, allow_negative_numbers = true)]
    typical_p: Option<f64>,
    /// Drop tokens with probability below this, in [0, 1) [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    epsilon_cutoff: Option<f64>,
    /// Eta sampling cutoff, in [0, 1) [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    eta_cutoff: Option<f64>,
    /// transformers' repetition penalty over prompt and output (> 0; > 1 penalises) [default: 1.0].
    #[arg(long, allow_negative_numbers = true)]
    repetition_penalty: Option<f64>,
    /// OpenAI/vLLM presence penalty over generated tokens [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    presence_penalty: Option<f64>,
    /// OpenAI/vLLM frequency penalty over generated tokens [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    frequency_penalty: Option<f64>,
    /// Never repeat an n-gram of this size (prompt included); 0 disables.
    #[arg(long)]
    no_repeat_ngram_size: Option<usize>,
    /// Text that must not be generated (its token sequence); repeatable.
    #[arg(long)]
    bad_words: Vec<String>,
    /// Beam search with this many beams [default: 1].
    #[arg(long)]
    num_beams: Option<usize>,
    /// Sequences returned per prompt (≤ --num-beams; > 1 without beams needs --do-sample).
    #[arg(long)]
    num_return_sequences: Option<usize>,
    /// Beam score = sum of log-probs / length^length_penalty [default: 1.0].
    #[arg(long, allow_negative_numbers = true)]
    length_penalty: Option<f64>,
    /// Beam stopping: transformers' three meanings [default: false].
    #[arg(long, value_enum)]
    early_stopping: Option<EarlyStopping>,
    /// End-of-sequence token id; repeatable; replaces the config's.
    #[arg(long)]
    eos_token_id: Vec<i64>,
    /// Generate through EOS tokens (only the length limits stop).
    #[arg(long)]
    ignore_eos: bool,
    /// Stop a sequence once its text contains this string; repeatable; replaces the
    /// generation config's stop_strings.
    #[arg(long)]
    stop: Vec<String>,
    /// Stop after the step during which this many seconds have passed.
    #[arg(long, allow_negative_numbers = true)]
    max_time: Option<f64>,
    /// Seed for sampling: the same seed gives the same tokens on the same device.
    #[arg(long)]
    seed: Option<u64>,
}

/// Merges defaults, files and flags into one config.
pub(crate) fn generation_config(
    args: &GenerationArgs,
    model_dir: &Path,
    config: &Gpt2Config,
    tok: &Tokenizer,
) -> anyhow::Result<GenerationConfig> {
    let mut cfg = GenerationConfig {
        eos_token_ids: config.eos_ids(),
        pad_token_id: config.pad_token_id,
        ..GenerationConfig::default()
    };
    let own = model_dir.join(genconfig::FILE_NAME);
    let mut files = Vec::new();
    // Anything by that name is read (apply_file refuses a folder or FIFO by path).
    if own.symlink_metadata().is_ok() {
        files.push(own);
    }
    files.extend(args.generation_config.iter().cloned());
    for path in &files {
        for warning in genconfig::apply_file(&mut cfg, path)? {
            let _ = writeln!(std::io::stderr(), "warning: {warning}");
        }
    }
    // A flag's value replaces the file's: errors about it name the flag then.
    let from_flag = |cfg: &mut GenerationConfig, key: &str, given: bool| {
        if given {
            cfg.sources.remove(key);
        }
    };
    from_flag(&mut cfg, "do_sample", args.do_sample);
    macro_rules! set {
        ($key:literal, $($field:ident).+ <- $arg:expr) => {
            if let Some(v) = $arg {
                cfg.sources.remove($key);
                $($field).+ = v;
            }
        };
    }
    set!("temperature", cfg.processing.temperature <- args.temperature);
    set!("top_k", cfg.processing.top_k <- args.top_k);
    set!("top_p", cfg.processing.top_p <- args.top_p);
    set!("typical_p", cfg.processing.typical_p <- args.typical_p);
    set!("epsilon_cutoff", cfg.processing.epsilon_cutoff <- args.epsilon_cutoff);
    set!("eta_cutoff", cfg.processing.eta_cutoff <- args.eta_cutoff);
    set!("repetition_penalty", cfg.processing.repetition_penalty <- args.repetition_penalty);
    set!("presence_penalty", cfg.processing.presence_penalty <- args.presence_penalty);
    set!("frequency_penalty", cfg.processing.frequency_penalty <- args.frequency_penalty);
    set!("no_repeat_ngram_size", cfg.processing.no_repeat_ngram_size <- args.no_repeat_ngram_size);
    set!("min_new_tokens", cfg.processing.min_new_tokens <- args.min_new_tokens);
    set!("min_length", cfg.processing.min_length <- args.min_length);
    set!("min_p", cfg.processing.min_p <- args.min_p.map(Some));
    set!("num_beams", cfg.num_beams <- args.num_beams);
    set!("num_return_sequences", cfg.num_return_sequences <- args.num_return_sequences);
    set!("length_penalty", cfg.length_penalty <- args.length_penalty);
    let p = &mut cfg.processing;
    p.do_sample |= args.do_sample;
    for word in &args.bad_words {
        let ids = tok.encode(word)?;
        if ids.is_empty() {
            return Err(usage(format!("--bad-words {word:?} encodes to no tokens")));
        }
        p.bad_words_ids.push(ids);
    }
    from_flag(&mut cfg, "bad_words_ids", !args.bad_words.is_empty());
    if let Some(e) = args.early_stopping {
        cfg.early_stopping = e.into();
    }
    if let Some(n) = args.max_new_tokens {
        cfg.max_new_tokens = n;
        cfg.max_length = None;
        cfg.sources.remove("max_new_tokens");
    } else if let Some(n) = args.max_length {
        cfg.max_length = Some(n);
        cfg.sources.remove("max_length");
    }
    if !args.eos_token_id.is_empty() {
        cfg.eos_token_ids = args.eos_token_id.clone();
        cfg.sources.remove("eos_token_id");
    }
    if !args.stop.is_empty() {
        cfg.stop_strings = args.stop.clone();
        cfg.sources.remove("stop_strings");
    }
    if args.ignore_eos {
        cfg.eos_token_ids.clear();
    }
    if let Some(t) = args.max_time {
        if !(t.is_finite() && t > 0.0) {
            return Err(usage(format!(
                "--max-time must be a positive number of seconds, got {t}"
            )));
        }
        // Past Duration's range (~5.8e11 years): no limit in practice.
        cfg.max_time = Some(Duration::try_from_secs_f64(t).unwrap_or(Duration::MAX));
    }
    cfg.seed = args.seed.or(cfg.seed);
    Ok(cfg)
}
