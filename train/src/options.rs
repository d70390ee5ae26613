//! What `gpt2kit train` is asked to do, and the checks of it that run before any data
//! or weights are read: every bad value is an `infer::Error::Input` naming its flag.
use std::path::PathBuf;

use anyhow::Result;
use infer::Gpt2Config;
use tch::Device;

use crate::data::DataOptions;
use crate::lora::LoraOptions;
use crate::optim::AdamWConfig;
use crate::schedule::SchedulerKind;

#[derive(Debug, Clone)]
pub enum Resume {
    Latest,
    Path(PathBuf),
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub model: PathBuf,
    pub data: Vec<PathBuf>,
    pub eval_data: Option<PathBuf>,
    pub eval_split: Option<f64>,
    pub data_options: DataOptions,
    pub output: PathBuf,
    pub lr: f64,
    pub scheduler: SchedulerKind,
    pub warmup_steps: Option<i64>,
    pub warmup_ratio: Option<f64>,
    pub adam: AdamWConfig,
    pub gradient_accumulation_steps: i64,
    /// 0 turns clipping off.
    pub max_grad_norm: f64,
    pub batch_size: i64,
    pub eval_batch_size: i64,
    pub max_steps: Option<i64>,
    pub epochs: i64,
    pub seed: u64,
    pub eval_steps: Option<i64>,
    pub save_steps: Option<i64>,
    pub save_total_limit: Option<usize>,
    pub early_stopping_patience: Option<i64>,
    pub logging_steps: i64,
    pub resume: Option<Resume>,
    pub overwrite_output_dir: bool,
    /// `final/` gets the best checkpoint's weights instead of the last step's.
    pub load_best_model_at_end: bool,
    pub device: Device,
    /// bf16 compute with f32 master weights.
    pub bf16: bool,
    /// Show a progress bar on a terminal (plain log lines otherwise).
    pub progress: bool,
    /// Seconds per phase of each step on stderr.
    pub profile: bool,
    /// Keep freed memory in the process (glibc's allocator; see `trainer`).
    pub keep_freed_memory: bool,
    /// LoRA fine-tuning (the base frozen, only the adapter trained): its options.
    pub lora: Option<LoraOptions>,
    /// LoRA runs: the frozen base held in bf16 (the forward in bf16).
    pub base_bf16: bool,
    /// Recompute each block's activations in the backward pass (`checkpointing`).
    pub gradient_checkpointing: bool,
    /// AdamW through libtorch's fused multi-tensor kernel (transformers'
    /// `adamw_torch_fused`) instead of the one-pass CPU update (`adamw_torch`); `None`:
    /// fused off the CPU.
    pub fused_adamw: Option<bool>,
    /// CUDA float32 matrix products in TF32 (transformers' `tf32`); read on CUDA only.
    pub tf32: bool,
    /// Data-parallel training: the process group of a launched job (`distributed`).
    pub group: Option<std::sync::Arc<dist::Group>>,
    /// Testing hook: fail as a crash would after this many micro-batches of this run.
    pub stop_after_micro_batches: Option<u64>,
}

pub(crate) fn input(msg: String) -> anyhow::Error {
    infer::Error::Input(msg).into()
}

pub(crate) fn check_options(o: &TrainOptions, config: &Gpt2Config) -> Result<()> {
    let positive = [
        ("--batch-size", o.batch_size),
        ("--eval-batch-size", o.eval_batch_size),
        (
            "--gradient-accumulation-steps",
            o.gradient_accumulation_steps,
        ),
        ("--epochs", o.epochs),
        ("--logging-steps", o.logging_steps),
    ];
    for (flag, v) in positive {
        if v < 1 {
            return Err(input(format!("{flag} must be positive, got {v}")));
        }
    }
    for (flag, v) in [
        ("--max-steps", o.max_steps),
        ("--eval-steps", o.eval_steps),
        ("--save-steps", o.save_steps),
        ("--early-stopping-patience", o.early_stopping_patience),
    ] {
        if let Some(v) = v {
            if v < 1 {
                return Err(input(format!("{flag} must be positive, got {v}")));
            }
        }
    }
    if !(o.lr.is_finite() && o.lr >= 0.0) {
        return Err(input(format!(
            "--lr must be a non-negative number, got {}",
            o.lr
        )));
    }
    if !(o.max_grad_norm.is_finite() && o.max_grad_norm >= 0.0) {
        return Err(input(format!(
            "--max-grad-norm must be ≥ 0, got {}",
            o.max_grad_norm
        )));
    }
    let a = o.adam;
    if !(0.0..1.0).contains(&a.beta1) || !(0.0..1.0).contains(&a.beta2) {
        return Err(input(format!(
            "--adam-beta1/--adam-beta2 must lie in [0, 1), got {} and {}",
            a.beta1, a.beta2
        )));
    }
    if !(a.eps.is_finite() && a.eps > 0.0) {
        // With 0, every weight whose gradient is zero (an unused position or token
        // row) becomes 0/0 = NaN at the first update.
        return Err(input(format!(
            "--adam-epsilon must be a positive number, got {}",
            a.eps
        )));
    }
    if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
        return Err(input(format!(
            "--weight-decay must be ≥ 0, got {}",
            a.weight_decay
        )));
    }
    if o.warmup_steps.is_some() && o.warmup_ratio.is_some() {
        return Err(input(
            "give --warmup-steps or --warmup-ratio, not both".into(),
        ));
    }
    if let Some(w) = o.warmup_steps {
        if w < 0 {
            return Err(input(format!("--warmup-steps must be ≥ 0, got {w}")));
        }
    }
    if let Some(r) = o.warmup_ratio {
        if !(0.0..=1.0).contains(&r) {
            return Err(input(format!("--warmup-ratio must lie in [0, 1], got {r}")));
        }
    }
    if o.eval_data.is_some() && o.eval_split.is_some() {
        return Err(input("give --eval-data or --eval-split, not both".into()));
    }
    let has_eval = o.eval_data.is_some() || o.eval_split.is_some();
    if o.eval_steps.is_some() && !has_eval {
        return Err(input(
            "--eval-steps needs --eval-data or --eval-split".into(),
        ));
    }
    if o.early_stopping_patience.is_some() && o.eval_steps.is_none() {
        return Err(input(
            "--early-stopping-patience needs --eval-steps (and eval data)".into(),
        ));
    }
    let bs = o.data_options.block_size;
    if bs < 2 || bs > config.n_positions {
        return Err(input(format!(
            "--block-size must lie in 2..={} (the model's n_positions), got {bs}",
            config.n_positions
        )));
    }
    check_best_model_options(o)?;
    if o.base_bf16 && o.lora.is_none() {
        return Err(input(
            "--base-dtype bf16 needs --lora-r (a frozen base); full fine-tuning has --dtype bf16"
                .into(),
        ));
    }
    if let Some(l) = &o.lora {
        l.check("--lora-r/--lora-alpha/--lora-dropout/--lora-target-modules")?;
        l.layers(config.n_layer)
            .map_err(|e| input(format!("--lora-target-modules: {e}")))?;
    }
    if let Some(0) = o.save_total_limit {
        return Err(input("--save-total-limit must be positive".into()));
    }
    for p in o.data.iter().chain(&o.eval_data) {
        if !p.is_file() {
            return Err(input(format!("{}: no such data file", p.display())));
        }
    }
    Ok(())
}

/// --load-best-model-at-end compares checkpoints by their eval: every save must be one.
fn check_best_model_options(o: &TrainOptions) -> Result<()> {
    if o.load_best_model_at_end {
        match (o.eval_steps, o.save_steps) {
            (Some(e), Some(s)) if s % e == 0 => {}
            (Some(e), Some(s)) => {
                return Err(input(format!(
                    "--load-best-model-at-end needs --save-steps to be a multiple of \
                     --eval-steps (got {s} and {e}), so that every save can be compared"
                )))
            }
            _ => {
                return Err(input(
                    "--load-best-model-at-end needs --eval-steps (and eval data) and --save-steps"
                        .into(),
                ))
            }
        }
    }
    Ok(())
}
