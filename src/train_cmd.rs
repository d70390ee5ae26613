//! `gpt2kit train`: fine-tune GPT-2 on JSONL data.
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args as ClapArgs;
use train::data::DataOptions;
use train::lora::{LoraOptions, DEFAULT_ALPHA, DEFAULT_TARGETS};
use train::optim::AdamWConfig;
use train::trainer::{train, Resume, TrainOptions};

use crate::choices::{LrScheduler, Optim, TrainDtype};

#[derive(ClapArgs)]
/// Negative numbers are values, not flags (`--seed -1` is refused by its type).
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// Model folder to start from (Hugging Face layout, or one made by `gpt2kit init`).
    #[arg(long)]
    model: PathBuf,
    /// Training JSONL file (repeat for several): {"text": ...} or {"prompt", "completion"} rows.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Eval JSONL file.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Fraction of the training examples held out for eval (seeded by --seed).
    #[arg(long)]
    eval_split: Option<f64>,
    /// Field holding a text row's text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Skip invalid lines (and report how many) instead of failing.
    #[arg(long)]
    skip_invalid: bool,
    /// Tokens per packed block and per prompt/completion example (default: n_positions, at most 1024).
    #[arg(long)]
    block_size: Option<i64>,
    /// Cut prompt/completion examples longer than --block-size instead of refusing them.
    #[arg(long)]
    truncation: bool,
    /// Output folder: checkpoint-STEP/ folders, final/ and runs/ (TensorBoard).
    #[arg(long)]
    output: PathBuf,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// Learning-rate schedule after warmup (constant_with_warmup is constant).
    #[arg(long, value_enum, default_value_t = LrScheduler::Linear)]
    lr_scheduler: LrScheduler,
    /// Linear warmup steps.
    #[arg(long)]
    warmup_steps: Option<i64>,
    /// Linear warmup as a fraction of the total steps.
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// AdamW weight decay (tensors of ≥ 2 dimensions only).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    adam_epsilon: f64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    gradient_accumulation_steps: i64,
    /// Clip the gradients' total norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: i64,
    /// Examples per eval forward.
    #[arg(long, default_value_t = 8)]
    eval_batch_size: i64,
    /// Optimizer steps to take (overrides --epochs).
    #[arg(long)]
    max_steps: Option<i64>,
    /// Passes over the training data.
    #[arg(long, default_value_t = 1)]
    epochs: i64,
    /// Seed of the data order and of --eval-split.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Evaluate every N steps (and at the end).
    #[arg(long)]
    eval_steps: Option<i64>,
    /// Save a checkpoint every N steps (and at the end).
    #[arg(long)]
    save_steps: Option<i64>,
    /// Keep the K newest checkpoints plus the best by eval loss.
    #[arg(long)]
    save_total_limit: Option<usize>,
    /// Continue from the latest checkpoint in --output, or from the given checkpoint folder.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest")]
    resume: Option<String>,
    /// Stop after N evals without a better eval loss.
    #[arg(long)]
    early_stopping_patience: Option<i64>,
    /// Log (TensorBoard, log lines, trainer_state.json) every N steps.
    #[arg(long, default_value_t = 10)]
    logging_steps: i64,
    /// Start over in an --output that already holds checkpoints.
    #[arg(long)]
    overwrite_output_dir: bool,
    /// Make final/ the best checkpoint's weights (by eval loss) instead of the last
    /// step's; needs --eval-steps and --save-steps a multiple of it.
    #[arg(long)]
    load_best_model_at_end: bool,
    /// Testing hook: fail as a crash would after N micro-batches of this run.
    #[arg(long, hide = true)]
    stop_after_micro_batches: Option<u64>,
    /// Testing hook: die by SIGKILL at the Nth step of writing a checkpoint or final/
    /// (`infer::faults`).
    #[arg(long, hide = true)]
    crash_at_write: Option<u64>,
    /// cpu, cuda, cuda:N or mps.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// bf16: bf16 compute with f32 master weights, where the device supports it.
    #[arg(long, value_enum, default_value_t = TrainDtype::F32)]
    dtype: TrainDtype,
    /// LoRA rank: train a LoRA adapter (peft's format) on the frozen model instead of every weight.
    #[arg(long)]
    lora_r: Option<i64>,
    /// LoRA alpha: the adapter's output is scaled by alpha / r (default 8, peft's).
    #[arg(long, requires = "lora_r")]
    lora_alpha: Option<f64>,
    /// Dropout probability on the adapter's input (default 0).
    #[arg(long, requires = "lora_r")]
    lora_dropout: Option<f64>,
    /// Layers to adapt, comma-separated peft names: c_attn, c_proj (attn and mlp), c_fc, attn.c_proj, ... (default c_attn).
    #[arg(long, requires = "lora_r", value_delimiter = ',')]
    lora_target_modules: Vec<String>,
    /// LoRA: hold the frozen base in f32 or bf16 (then the forward runs in bf16; the adapter and AdamW stay f32).
    #[arg(long, value_enum, default_value_t = TrainDtype::F32)]
    base_dtype: TrainDtype,
    /// Recompute each block's activations in the backward pass: less memory, one more forward.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// AdamW's implementation: adamw_torch (one pass per tensor on the CPU, op by op elsewhere) or adamw_torch_fused (libtorch's multi-tensor kernel) (default: adamw_torch on the CPU, adamw_torch_fused on CUDA).
    #[arg(long, value_enum)]
    optim: Option<Optim>,
    /// CUDA f32 runs: matrix products in TF32 (true, false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    tf32: bool,
    /// Data-parallel runs (under `gpt2kit launch` or torchrun): c10d's backend, gloo or nccl (default: nccl on CUDA, gloo on the CPU).
    #[arg(long, visible_alias = "dist-backend", value_enum)]
    ddp_backend: Option<DdpBackend>,
    /// Data-parallel runs: seconds joining the job or a collective waits for the other ranks before the run stops with an error.
    #[arg(long, visible_alias = "dist-timeout", default_value_t = 1800.0)]
    ddp_timeout: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DdpBackend {
    Gloo,
    Nccl,
}

/// The device and process group of a run: a launched job (torchrun's variables set)
/// joins its group, a CUDA run on the device of its LOCAL_RANK.
fn placement(args: &Args) -> anyhow::Result<(tch::Device, Option<Arc<dist::Group>>)> {
    let device = infer::device::parse_device(&args.device)?;
    let bad = |m: String| anyhow::Error::from(infer::Error::Input(m));
    let timeout = crate::seconds("--ddp-timeout", args.ddp_timeout)?;
    let Some(launch) = dist::Launch::from_env().map_err(|e| bad(e.to_string()))? else {
        return Ok((device, None));
    };
    let device = launch.device(&args.device, device);
    let backend = match args.ddp_backend {
        Some(DdpBackend::Gloo) => dist::Backend::Gloo,
        Some(DdpBackend::Nccl) => dist::Backend::Nccl,
        None if device.is_cuda() => dist::Backend::Nccl,
        None => dist::Backend::Gloo,
    };
    let group = Arc::new(dist::Group::join(&launch, backend, timeout)?);
    dist::keep_until_exit(&group);
    Ok((device, Some(group)))
}

/// The LoRA options of the flags (peft's defaults where a flag is not given).
fn lora_options(args: &Args) -> Option<LoraOptions> {
    let r = args.lora_r?;
    let targets = if args.lora_target_modules.is_empty() {
        DEFAULT_TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        args.lora_target_modules.clone()
    };
    Some(LoraOptions {
        r,
        alpha: args.lora_alpha.unwrap_or(DEFAULT_ALPHA),
        dropout: args.lora_dropout.unwrap_or(0.0),
        target_modules: targets,
    })
}

pub fn run(args: &Args, out: &mut dyn Write) -> anyhow::Result<()> {
    if let Some(n) = args.crash_at_write {
        infer::faults::crash_at(n);
    }
    let (device, group) = placement(args)?;
    // Only rank 0 of a data-parallel run reports; the others' results are its own.
    let mut quiet = std::io::sink();
    let out: &mut dyn Write = match group.as_ref().is_some_and(|g| g.rank() != 0) {
        true => &mut quiet,
        false => out,
    };
    let block_size = match args.block_size {
        Some(b) => b,
        None => {
            infer::model::check_model_dir(&args.model)?;
            let c = infer::Gpt2Config::from_file(&args.model.join("config.json"))?;
            c.n_positions.min(1024)
        }
    };
    let mut data_options = DataOptions::new(block_size);
    data_options.text_field = args.text_field.clone();
    data_options.skip_invalid = args.skip_invalid;
    data_options.truncation = args.truncation;
    let options = TrainOptions {
        model: args.model.clone(),
        data: args.data.clone(),
        eval_data: args.eval_data.clone(),
        eval_split: args.eval_split,
        data_options,
        output: args.output.clone(),
        lr: args.lr,
        scheduler: args.lr_scheduler.kind(),
        warmup_steps: args.warmup_steps,
        warmup_ratio: args.warmup_ratio,
        adam: AdamWConfig {
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
            weight_decay: args.weight_decay,
        },
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        max_grad_norm: args.max_grad_norm,
        batch_size: args.batch_size,
        eval_batch_size: args.eval_batch_size,
        max_steps: args.max_steps,
        epochs: args.epochs,
        seed: args.seed,
        eval_steps: args.eval_steps,
        save_steps: args.save_steps,
        save_total_limit: args.save_total_limit,
        early_stopping_patience: args.early_stopping_patience,
        logging_steps: args.logging_steps,
        resume: args.resume.as_deref().map(|r| match r {
            "latest" => Resume::Latest,
            p => Resume::Path(PathBuf::from(p)),
        }),
        overwrite_output_dir: args.overwrite_output_dir,
        load_best_model_at_end: args.load_best_model_at_end,
        device,
        bf16: args.dtype == TrainDtype::Bf16,
        progress: std::io::stderr().is_terminal(),
        // Documented switches of the environment, read here only.
        profile: std::env::var_os("GPT2KIT_TRAIN_PROFILE").is_some(),
        keep_freed_memory: std::env::var_os("GPT2KIT_TRAIN_MALLOC_DEFAULT").is_none(),
        stop_after_micro_batches: args.stop_after_micro_batches,
        group,
        lora: lora_options(args),
        gradient_checkpointing: args.gradient_checkpointing,
        fused_adamw: args.optim.map(|o| o == Optim::AdamwTorchFused),
        tf32: args.tf32,
        base_bf16: args.base_dtype == TrainDtype::Bf16,
    };
    let s = train(&options, out)?;
    writeln!(
        out,
        "trained {} steps · final loss {} · {} non-finite steps skipped · {} invalid lines skipped{}{}",
        s.global_step,
        s.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.nan_steps_skipped,
        s.skipped_lines,
        if s.early_stopped { " · stopped early" } else { "" },
        s.peak_rss.map_or(String::new(), |b| format!(
            " · peak RSS {}",
            train::memory::format_bytes(b)
        ))
    )?;
    if let Some(b) = &s.best_model_checkpoint {
        writeln!(out, "best checkpoint: {}", args.output.join(b).display())?;
    }
    let which = match &s.final_from {
        Some(name) => format!("the weights of {name}, the best eval loss"),
        None if s.best_model_checkpoint.is_some() && s.early_stopped => format!(
            "the last step's weights, step {}; --load-best-model-at-end would make it the best checkpoint's",
            s.global_step
        ),
        None => format!("the last step's weights, step {}", s.global_step),
    };
    writeln!(out, "final model: {} ({which})", s.final_dir.display())?;
    if let Some(e) = s.eval {
        writeln!(
            out,
            "final model's eval loss {:.4} · perplexity {:.3}",
            e.loss, e.perplexity
        )?;
    }
    Ok(())
}
