//! `gpt2kit infer`: every decoding strategy over one or more prompts, run as one
//! left-padded batch. Settings come from transformers' defaults, then the model folder's
//! `generation_config.json`, then `--generation-config FILE`, then flags.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use infer::ensemble::Ensemble;
use infer::generate::{
    check_request_at, check_settings, generate, generate_requests, validate_requests,
    GenerationConfig, Output, Request, Schedule,
};
use infer::speculative::{generate_speculative, Drafter};
use infer::{Error, Gpt2, Gpt2Config, Tokenizer};

use crate::choices::{name, EnsembleMode};
use crate::infer_io::{print_sequences, print_stats, read_prompts, Streamer};
use crate::infer_settings::{generation_config, GenerationArgs};

#[derive(clap::Args)]
/// Negative numbers are values, not flags (`--seed -1` is refused by its type).
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// Hugging Face model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter folder (peft's format) for --model, run beside its weights
    /// (unmerged).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Prompt text; repeat the flag for several prompts (decoded together).
    #[arg(long, required_unless_present = "prompts")]
    prompt: Vec<String>,
    /// JSONL file of prompts, one `{"prompt": "..."}` (or `{"text": "..."}`) object per
    /// line (after any --prompt); a line's `"max_new_tokens"` overrides the flag for it.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// The field of each --prompts line that holds the prompt [default: prompt, else text].
    #[arg(long, requires = "prompts")]
    text_field: Option<String>,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Another model folder decoded together with --model; repeatable. Every model must
    /// share the tokenizer.
    #[arg(long)]
    ensemble: Vec<PathBuf>,
    /// mean-prob (weighted mean of probabilities), mean-logprob, rerank (each model's
    /// candidates scored by all) or vote (minimum-Bayes-risk choice among candidates);
    /// needs --ensemble [default: mean-prob].
    #[arg(long, value_enum)]
    ensemble_mode: Option<EnsembleMode>,
    /// Comma-separated weights, one per model (--model first) [default: equal].
    #[arg(long, value_delimiter = ',')]
    ensemble_weights: Vec<f64>,
    /// Speculative decoding: a small model sharing the tokenizer drafts tokens that the
    /// --model verifies in one pass (one sequence per prompt, no beams).
    #[arg(long)]
    draft_model: Option<PathBuf>,
    /// Tokens the draft model proposes per step.
    #[arg(long, default_value_t = 4)]
    num_draft_tokens: usize,
    /// Speculative decoding without a draft model: propose this many tokens copied from
    /// where the sequence's last n-gram occurred before (transformers'
    /// prompt_lookup_num_tokens).
    #[arg(long)]
    prompt_lookup: Option<usize>,
    /// Longest n-gram --prompt-lookup matches.
    #[arg(long, default_value_t = 2)]
    max_matching_ngram_size: usize,
    #[command(flatten)]
    placement: crate::Placement,
    /// Tensor parallelism across processes (under `gpt2kit launch`): seconds joining the
    /// job or a collective waits for the other ranks before the run stops with an error.
    #[arg(long, default_value_t = 1800.0)]
    dist_timeout: f64,
    /// Print text as it is generated (one prompt, one sequence, no beams).
    #[arg(long)]
    stream: bool,
    /// One JSON object per line per returned sequence.
    #[arg(long)]
    json: bool,
    /// One JSON line of timings and token counts on stderr.
    #[arg(long)]
    stats: bool,
    /// At most N sequences (beams count each) decode at once; the rest wait and take a
    /// freed slot at once [default: all at once].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    max_num_seqs: Option<u64>,
    /// With --max-num-seqs: run the prompts in batches of that size, each to its longest
    /// member, instead of refilling freed slots (for comparison).
    #[arg(long, requires = "max_num_seqs")]
    static_batches: bool,
    /// Untimed warm-up generations (4 tokens each) before the real one, for benchmarks.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    #[command(flatten)]
    engine: crate::EngineArgs,
    #[command(flatten)]
    graphs: crate::GraphArgs,
}

fn usage(msg: String) -> anyhow::Error {
    Error::Input(msg).into()
}

/// The strategy flags against each other and the other models (tokenizers, contexts),
/// before any model is loaded. Returns the ensemble mode.
fn check_strategy(
    args: &Args,
    dir: &Path,
    tokenizer: &Tokenizer,
    requests: &[Request],
    cfg: &GenerationConfig,
) -> anyhow::Result<EnsembleMode> {
    if args.stream
        && (requests.len() > 1 || cfg.num_beams > 1 || cfg.num_return_sequences > 1 || args.json)
    {
        return Err(usage(
            "--stream needs one prompt, one sequence, no beams and no --json".into(),
        ));
    }
    if args.ensemble.is_empty() {
        if let Some(mode) = &args.ensemble_mode {
            return Err(usage(format!(
                "--ensemble-mode {} needs --ensemble (another model to decode with)",
                name(mode)
            )));
        }
        if !args.ensemble_weights.is_empty() {
            return Err(usage(
                "--ensemble-weights needs --ensemble (another model to decode with)".into(),
            ));
        }
    }
    let mode = args.ensemble_mode.unwrap_or(EnsembleMode::MeanProb);
    for other in &args.ensemble {
        infer::model::check_model_dir(other)?;
        let tok = Tokenizer::from_dir(other)?;
        if !tok.same_vocabulary(tokenizer) {
            return Err(usage(format!(
                "--ensemble {}: its tokenizer differs from {}'s; ensembled models must share one",
                other.display(),
                dir.display()
            )));
        }
        let c = Gpt2Config::of_model(other)?;
        validate_requests(&c, requests, cfg)
            .with_context(|| format!("--ensemble {}", other.display()))?;
    }
    if !args.ensemble_weights.is_empty() && args.ensemble_weights.len() != 1 + args.ensemble.len() {
        return Err(usage(format!(
            "--ensemble-weights: {} weights for {} models",
            args.ensemble_weights.len(),
            1 + args.ensemble.len()
        )));
    }
    let pooled = !args.ensemble.is_empty() && mode.pooled();
    let speculative = args.draft_model.is_some() || args.prompt_lookup.is_some();
    if speculative && !args.ensemble.is_empty() {
        return Err(usage(
            "--draft-model / --prompt-lookup cannot be combined with --ensemble".into(),
        ));
    }
    if args.draft_model.is_some() && args.prompt_lookup.is_some() {
        return Err(usage(
            "use either --draft-model or --prompt-lookup, not both".into(),
        ));
    }
    if args.max_matching_ngram_size == 0 {
        return Err(usage("--max-matching-ngram-size must be at least 1".into()));
    }
    if let Some(draft) = &args.draft_model {
        infer::model::check_model_dir(draft)?;
        if !Tokenizer::from_dir(draft)?.same_vocabulary(tokenizer) {
            return Err(usage(format!(
                "--draft-model {}: its tokenizer differs from {}'s; the draft must share it",
                draft.display(),
                dir.display()
            )));
        }
    }
    if args.stream && pooled {
        return Err(usage(
            "--stream cannot show --ensemble-mode rerank or vote".into(),
        ));
    }
    Ok(mode)
}

/// `rerank` and `vote`: each model proposes its own candidates; the pool is scored by
/// all of them.
fn run_pooled(
    ensemble: &Ensemble,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
    stop_check: &dyn Fn(&[i64]) -> bool,
    vote: bool,
) -> anyhow::Result<Output> {
    let mut runs = Vec::new();
    let mut first: Option<Output> = None;
    let mut steps = 0;
    for m in &ensemble.models {
        let o = tch::no_grad(|| generate(m, prompts, cfg, stop_check, |_, _| {}))?;
        runs.push(o.sequences.clone());
        steps += o.steps;
        first.get_or_insert(o);
    }
    let picked = tch::no_grad(|| {
        infer::ensemble::select_candidates(ensemble, prompts, runs, vote, cfg.num_return_sequences)
    });
    let mut o = first.expect("at least one model");
    o.sequences = picked;
    o.steps = steps;
    Ok(o)
}

/// The models at `paths`, each on `device`, named in errors.
fn load_models(
    paths: &[PathBuf],
    kind: Option<tch::Kind>,
    device: tch::Device,
    engine: &infer::EngineOptions,
) -> anyhow::Result<Vec<Gpt2>> {
    paths
        .iter()
        .map(|p| {
            Gpt2::load_with(p, kind, &[device], engine)
                .with_context(|| format!("loading model {}", p.display()))
        })
        .collect()
}

/// Each prompt with its token limit: its --prompts line's `max_new_tokens`, else the
/// settings'. Per-prompt limits and --max-num-seqs apply to plain decoding only.
fn requests(
    args: &Args,
    prompts: &[Vec<i64>],
    from: &Prompts,
    cfg: &GenerationConfig,
    other_strategy: bool,
) -> anyhow::Result<Vec<Request>> {
    let limits = &from.limits;
    if other_strategy {
        if let Some(i) = limits.iter().position(Option::is_some) {
            let at = from.origins[i].as_deref().unwrap_or("--prompts");
            return Err(usage(format!(
                "{at}: prompt {i} sets max_new_tokens: per-prompt limits need plain decoding \
                 (not --draft-model, --prompt-lookup or a rerank/vote --ensemble-mode)"
            )));
        }
        if args.max_num_seqs.is_some() {
            return Err(usage(
                "--max-num-seqs needs plain decoding (not --draft-model, --prompt-lookup or \
                 a rerank/vote --ensemble-mode)"
                    .into(),
            ));
        }
    }
    let requests: Vec<Request> = prompts
        .iter()
        .zip(limits)
        .map(|(p, l)| Request {
            prompt: p.clone(),
            max_new_tokens: l.unwrap_or_else(|| cfg.limit(p.len())),
            settings: None,
            adapter: None,
        })
        .collect();
    Ok(requests)
}

/// The --prompt texts, then the --prompts file's.
struct Prompts {
    texts: Vec<String>,
    /// Each prompt's own token limit, if its --prompts line sets one.
    limits: Vec<Option<usize>>,
    /// Where each prompt came from: `FILE:LINE` for a --prompts line.
    origins: Vec<Option<String>>,
}

fn prompt_texts(args: &Args) -> anyhow::Result<Prompts> {
    let n = args.prompt.len();
    let mut p = Prompts {
        texts: args.prompt.clone(),
        limits: vec![None; n],
        origins: vec![None; n],
    };
    if let Some(path) = &args.prompts {
        for (text, limit, line) in read_prompts(path, args.text_field.as_deref())? {
            p.texts.push(text);
            p.limits.push(limit);
            p.origins.push(Some(format!("{}:{line}", path.display())));
        }
    }
    if let Some(i) = p.texts.iter().position(String::is_empty) {
        return Err(usage(format!("prompt {i} is empty")));
    }
    Ok(p)
}

/// The settings, then every request against its own limit; an error about a --prompts
/// line names the file and line.
fn check_requests(
    config: &Gpt2Config,
    requests: &[Request],
    cfg: &GenerationConfig,
    origins: &[Option<String>],
) -> anyhow::Result<()> {
    check_settings(config, requests.len(), cfg)?;
    for (i, r) in requests.iter().enumerate() {
        if let Err(e) = check_request_at(config, i, r, cfg) {
            return Err(match &origins[i] {
                Some(at) => anyhow::Error::from(e).context(at.clone()),
                None => e.into(),
            });
        }
    }
    Ok(())
}

/// `--warmup`: `n` untimed generations of up to 4 tokens per request.
fn warm_up(
    model: &Gpt2,
    requests: &[Request],
    cfg: &GenerationConfig,
    n: usize,
) -> anyhow::Result<()> {
    let warm: Vec<Request> = requests
        .iter()
        .map(|r| Request {
            prompt: r.prompt.clone(),
            max_new_tokens: r.max_new_tokens.min(4),
            settings: None,
            adapter: None,
        })
        .collect();
    let single = Ensemble::single(model);
    for _ in 0..n {
        tch::no_grad(|| {
            let (w, never) = (warm.clone(), &|_: &[i64]| false);
            generate_requests(&single, w, cfg, Schedule::default(), never, |_, _| {})
        })?;
    }
    Ok(())
}

/// The first flag given that tensor parallelism across processes does not run.
fn unsplit_only(args: &Args) -> Option<&'static str> {
    [
        (args.adapter.is_some(), "--adapter"),
        (!args.ensemble.is_empty(), "--ensemble"),
        (args.draft_model.is_some(), "--draft-model"),
        (args.prompt_lookup.is_some(), "--prompt-lookup"),
    ]
    .into_iter()
    .find_map(|(given, flag)| given.then_some(flag))
}

pub fn run(args: &Args, out: &mut dyn Write) -> anyhow::Result<()> {
    let timeout = crate::seconds("--dist-timeout", args.dist_timeout)?;
    let launched = crate::tp_launch::join(&args.placement, unsplit_only(args), timeout)?;
    let (devices, kind) = match &launched {
        Some(l) => (vec![l.device], l.kind),
        None => args.placement.resolve()?,
    };
    // A launched job prints from rank 0 only.
    let prints = launched.as_ref().is_none_or(|l| l.prints());
    let mut quiet = std::io::sink();
    let out: &mut dyn Write = if prints { out } else { &mut quiet };
    let device = devices[0];
    let from = prompt_texts(args)?;
    let texts = &from.texts;
    let dir = &args.model;
    infer::model::check_model_dir(dir)?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let config = Gpt2Config::of_model(dir)?;
    infer::check_vocab(&config, &tokenizer, dir)?;
    let cfg = generation_config(&args.generation, dir, &config, &tokenizer)?;
    if launched.is_some() && cfg.max_time.is_some() {
        // Each rank's clock would end generation at its own step.
        return Err(usage(
            "--max-time (or generation_config.json's max_time) is not run tensor-parallel \
             across processes"
                .into(),
        ));
    }
    let prompts = texts
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mode = args.ensemble_mode.unwrap_or(EnsembleMode::MeanProb);
    let pooled = !args.ensemble.is_empty() && mode.pooled();
    let speculative = args.draft_model.is_some() || args.prompt_lookup.is_some();
    let requests = requests(args, &prompts, &from, &cfg, pooled || speculative)?;
    check_requests(&config, &requests, &cfg, &from.origins)?;
    let mode = check_strategy(args, dir, &tokenizer, &requests, &cfg)?;
    let engine = args.graphs.apply(args.engine.infer_options());
    let mut model = match &launched {
        Some(l) => Gpt2::load_split(dir, kind, l.device, &engine, &l.split),
        None => Gpt2::load_with(dir, kind, &devices, &engine),
    }
    .with_context(|| format!("loading model {}", dir.display()))?;
    if let Some(a) = &args.adapter {
        let lora = infer::adapter::Lora::read(a, &config, tch::Device::Cpu)
            .with_context(|| format!("the adapter {} on {}", a.display(), dir.display()))?;
        let k = model.add_adapter(&lora).context("--adapter")?;
        model.set_default_adapter(Some(k))?;
    }
    let others = load_models(&args.ensemble, kind, device, &engine)?;
    let weights = (!args.ensemble_weights.is_empty()).then(|| args.ensemble_weights.clone());
    let ensemble = Ensemble::new(
        std::iter::once(&model).chain(&others).collect(),
        weights,
        mode.combine(),
    )?;

    // transformers' StopStringCriteria: a sequence stops at the token that completes a
    // stop string in its text (checked every step, so: once its text contains one).
    let stop_check = |tokens: &[i64]| {
        !cfg.stop_strings.is_empty()
            && tokenizer
                .decode(tokens)
                .is_ok_and(|t| cfg.stop_strings.iter().any(|s| t.contains(s.as_str())))
    };
    warm_up(&model, &requests, &cfg, args.warmup)?;
    let draft = load_models(args.draft_model.as_slice(), kind, device, &engine)?.pop();
    let mut streamer = Streamer::default();
    let mut spec_stats = None;
    let mut stream_err = None;
    if args.stream {
        write!(out, "{}", texts[0])?;
        out.flush()?;
    }
    let mut on_token = |_: usize, tok: i64| {
        if args.stream && stream_err.is_none() {
            if let Err(e) = streamer.push(tok, &tokenizer, out) {
                stream_err = Some(e);
            }
        }
    };
    let output: Output = if speculative {
        let (drafter, k) = match &draft {
            Some(d) => (Drafter::Model(d), args.num_draft_tokens),
            None => (
                Drafter::PromptLookup(args.max_matching_ngram_size),
                args.prompt_lookup.unwrap_or(0),
            ),
        };
        let (o, st) = tch::no_grad(|| {
            generate_speculative(
                &model,
                &drafter,
                &prompts,
                &cfg,
                k,
                &stop_check,
                &mut on_token,
            )
        })?;
        spec_stats = Some(st);
        o
    } else if !pooled {
        let schedule = Schedule {
            max_num_seqs: args.max_num_seqs.map(|n| n as usize),
            static_batches: args.static_batches,
        };
        tch::no_grad(|| {
            generate_requests(
                &ensemble,
                requests,
                &cfg,
                schedule,
                &stop_check,
                &mut on_token,
            )
        })?
    } else {
        run_pooled(
            &ensemble,
            &prompts,
            &cfg,
            &stop_check,
            mode == EnsembleMode::Vote,
        )?
    };

    if let Some(e) = stream_err {
        return Err(e);
    }
    if args.stream {
        streamer.finish(&tokenizer, out)?;
    }
    print_sequences(args.json, args.stream, &texts, &output, &tokenizer, out)?;
    if args.stats && prints {
        print_stats(&prompts, &output, spec_stats);
    }
    args.engine
        .build_packed_later(&model, dir, &name(&args.placement.dtype));
    Ok(())
}
