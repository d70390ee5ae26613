//! The training loop, as transformers' Trainer runs it: shuffled micro-batches,
//! gradient accumulation with the loss averaged over every target token of the step,
//! gradient clipping, AdamW and the LR schedule, a skipped step on a non-finite loss or
//! gradient, periodic eval, checkpoints, early stopping and TensorBoard scalars.
//! Resuming restores weights, optimizer, schedule and data position, so on the CPU the
//! losses after a resume equal an uninterrupted run's bit for bit.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use infer::checkpoint::WeightFiles;
use infer::{Gpt2, Gpt2Config, Tokenizer};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self as ckpt, TrainerState};
use crate::checkpointing::{forward_backward, pass_seed, Pass};
use crate::data::{self, Sample};
use crate::distributed as ddp;
use crate::eval::{record_eval, record_step_eval, run_eval, saved_eval, EvalResult};
use crate::folder::{self, FolderContents};
use crate::lora::{Lora, ADAPTER_CONFIG};
use crate::memory::keep_freed_memory;
use crate::metrics::Metrics;
use crate::optim::{clip_coefficient, clip_coefficient_tensor, total_grad_norm, AdamW};
use crate::options::{check_options, input};
pub use crate::options::{Resume, TrainOptions};
use crate::order::{epoch_order, next_batches};
pub use crate::output::FINAL_DIR;
use crate::output::{self, OutputLock};
use crate::resume;
use crate::schedule::Schedule;
use crate::trainable::{check_bf16, Trainable};

/// Non-finite steps in a row that abort training.
pub const MAX_CONSECUTIVE_NAN_STEPS: i64 = 5;

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub global_step: i64,
    pub final_loss: Option<f64>,
    pub eval: Option<EvalResult>,
    pub nan_steps_skipped: i64,
    pub skipped_lines: usize,
    pub early_stopped: bool,
    pub final_dir: PathBuf,
    /// The checkpoint whose weights `final_dir` holds (--load-best-model-at-end), or
    /// None for the last step's.
    pub final_from: Option<String>,
    pub best_model_checkpoint: Option<String>,
    /// The process's peak resident memory in bytes, where the system reports it.
    pub peak_rss: Option<u64>,
}

pub fn train(o: &TrainOptions, out: &mut dyn Write) -> Result<TrainSummary> {
    if o.keep_freed_memory {
        keep_freed_memory();
    }
    infer::model::check_model_dir(&o.model)?;
    let base_config = Gpt2Config::from_file(&o.model.join("config.json"))?;
    // config.json against the weights' headers, before the tokenizer is compared with
    // it or anything is allocated.
    infer::model::check_sizes(&base_config, &WeightFiles::open_dir(&o.model)?)?;
    check_options(o, &base_config)?;
    if o.bf16 || o.base_bf16 {
        check_bf16(o.device)?;
    }
    if o.device.is_cuda() {
        crate::fused::set_tf32(o.tf32)?;
    }
    let o = &ddp::global_batches(o);
    if !ddp::writes(o) {
        return train_owned(o, &base_config, &mut std::io::sink(), &mut false);
    }
    let created = output::CreatedDirs::create(&o.output)?;
    let mut started = false;
    let result = OutputLock::acquire(&o.output).and_then(|lock| {
        let r = train_owned(o, &base_config, out, &mut started);
        drop(lock);
        r
    });
    result.map_err(|e| {
        created.remove_if_empty();
        if started {
            output::explain_stale_final(e, &o.output)
        } else {
            e
        }
    })
}

/// The run, with the output folder locked.
fn train_owned(
    o: &TrainOptions,
    base_config: &Gpt2Config,
    out: &mut dyn Write,
    started: &mut bool,
) -> Result<TrainSummary> {
    let resume_dir = match ddp::writes(o) {
        true => output::claim(o, out)?,
        false => None,
    };
    let data = load_data(o, base_config, resume_dir.as_deref(), out)?;
    let (schedule, batches_per_epoch) = plan(o, data.train.len())?;
    let (mut tr, mut adam, mut state) = restore(
        o,
        resume_dir.as_deref(),
        &schedule,
        data.train.len(),
        batches_per_epoch,
        out,
    )?;
    ddp::start_from_rank0(o, &mut tr, &mut adam, &mut state)?;
    let total_steps = schedule.total_steps;
    let mut metrics = match ddp::writes(o) {
        true => Metrics::new(
            &o.output.join("runs"),
            o.progress,
            total_steps,
            state.global_step,
        )?,
        false => Metrics::quiet(),
    };
    let n = data.train.len();
    let mut order = epoch_order(n, o.seed, state.data_epoch);
    let mut micro_batches_run: u64 = 0;
    let mut final_loss = None;
    let mut last_eval = None;
    let mut early_stopped = false;
    // Resumed from a checkpoint of this folder: that step is saved already (a resumed
    // run that is already complete then writes nothing new).
    let mut last_saved = resume_dir
        .as_ref()
        .filter(|d| same_folder(d.parent(), &o.output))
        .map(|_| state.global_step);

    *started = true;
    while state.global_step < total_steps {
        let step_start = Instant::now();
        let batches = next_batches(o, &mut state, &mut order, batches_per_epoch);
        let tokens: usize = batches
            .iter()
            .flatten()
            .map(|&i| data.train[i].ids.len())
            .sum();
        let loss = accumulate(
            o,
            &tr,
            &data,
            (state.global_step, &batches),
            &mut micro_batches_run,
        )
        .inspect_err(|_| metrics.finish())?;
        let lr = schedule.lr(state.global_step);
        let grad_norm = update(o, &mut tr, &mut adam, &mut state, &mut metrics, loss, lr)?;
        state.global_step += 1;
        let step = state.global_step;
        state.epoch = state.data_epoch as f64 + state.data_batch as f64 / batches_per_epoch as f64;
        let tokens_per_s = tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9);
        final_loss = Some(loss);
        metrics.step(step, loss, lr, tokens_per_s);
        if step % o.logging_steps == 0 || step == total_steps {
            state.log_history.push(json!({
                "step": step, "epoch": state.epoch, "loss": loss, "learning_rate": lr,
                "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
            }));
            metrics.log(step, loss, lr, grad_norm, tokens_per_s);
        }
        if o.eval_steps.is_some_and(|e| step % e == 0) && !data.eval.is_empty() {
            let r = eval(o, &tr, &data)?;
            early_stopped = record_step_eval(o, &mut state, &mut metrics, &r, out);
            last_eval = Some(r);
        }
        let due = o.save_steps.is_some_and(|s| step % s == 0) || early_stopped;
        if ddp::writes(o) && due && o.save_steps.is_some() {
            ckpt::save(o, &tr, &adam, &schedule, &mut state, &data.tokenizer_files)?;
            last_saved = Some(step);
        }
        if early_stopped {
            break;
        }
    }
    metrics.finish_bar();

    if !data.eval.is_empty() && state.last_eval_step != Some(state.global_step) {
        let r = eval(o, &tr, &data)?;
        let step = state.global_step;
        record_eval(&mut state, &mut metrics, step, &r);
        last_eval = Some(r);
    }
    if ddp::writes(o) && o.save_steps.is_some() && last_saved != Some(state.global_step) {
        ckpt::save(o, &tr, &adam, &schedule, &mut state, &data.tokenizer_files)?;
    }
    let last_eval = last_eval.or_else(|| saved_eval(&state));
    let (final_dir, final_from) = match ddp::writes(o) {
        true => write_final(o, &tr, &state, &data.tokenizer_files)?,
        false => (o.output.join(FINAL_DIR), None),
    };
    metrics.finish();
    let final_eval = match (&final_from, state.best_metric) {
        (Some(_), Some(loss)) => last_eval.as_ref().map(|e| EvalResult {
            loss,
            perplexity: loss.exp(),
            tokens: e.tokens,
        }),
        _ => last_eval,
    };
    Ok(TrainSummary {
        global_step: state.global_step,
        final_loss,
        eval: final_eval,
        nan_steps_skipped: state.nan_steps_skipped,
        skipped_lines: data.skipped_lines,
        early_stopped,
        final_dir,
        final_from,
        best_model_checkpoint: state.best_model_checkpoint.clone(),
        peak_rss: crate::memory::peak_rss_bytes(),
    })
}

/// The run's data, tokenized and checked, and the tokenizer files its saves carry.
struct Dataset {
    tokenizer_files: Vec<(String, Vec<u8>)>,
    eos: i64,
    train: Vec<Sample>,
    eval: Vec<Sample>,
    skipped_lines: usize,
}

fn load_data(
    o: &TrainOptions,
    config: &Gpt2Config,
    resume_dir: Option<&Path>,
    out: &mut dyn Write,
) -> Result<Dataset> {
    let start_dir = o.model.as_path();
    // Kept in memory: the folder they come from (the checkpoint resumed from) may be
    // rotated away before the run's last save.
    let tokenizer_files = folder::read_tokenizer_files(resume_dir.unwrap_or(start_dir))?;
    if let Some(dir) = resume_dir {
        resume::check_same_model(start_dir, config, dir)?;
    }
    let tokenizer = Tokenizer::from_dir(start_dir)
        .with_context(|| format!("the tokenizer of {}", start_dir.display()))?;
    infer::check_vocab(config, &tokenizer, start_dir)?;
    let eos = data::eos_id(config, &tokenizer)?;
    let options = &o.data_options;
    let mut load = |paths: &[PathBuf], what: &str| -> Result<(Vec<Sample>, usize)> {
        let (samples, report) = data::load_jsonl(paths, &tokenizer, eos, options)?;
        if report.skipped > 0 {
            let _ = writeln!(
                out,
                "skipped {} invalid line(s) in the {what} data",
                report.skipped
            );
        }
        Ok((samples, report.skipped))
    };
    let (samples, mut skipped_lines) = load(&o.data, "training")?;
    let (train, eval) = match (&o.eval_data, o.eval_split) {
        (Some(p), _) => {
            let (e, skipped) = load(std::slice::from_ref(p), "eval")?;
            skipped_lines += skipped;
            (samples, e)
        }
        (None, Some(f)) => data::split(samples, f, o.seed)?,
        (None, None) => (samples, Vec::new()),
    };
    Ok(Dataset {
        tokenizer_files,
        eos,
        train,
        eval,
        skipped_lines,
    })
}

/// The schedule over the run's steps, and the micro-batches per epoch of `n` examples.
fn plan(o: &TrainOptions, n: usize) -> Result<(Schedule, i64)> {
    let batches_per_epoch = n.div_ceil(o.batch_size as usize) as i64;
    let accum = o.gradient_accumulation_steps;
    let steps_per_epoch = (batches_per_epoch + accum - 1) / accum;
    let total_steps = match o.max_steps {
        Some(m) => m,
        None => steps_per_epoch.checked_mul(o.epochs).ok_or_else(|| {
            input(format!(
                "--epochs {}: {} epochs of {steps_per_epoch} steps is more steps than can be \
                 counted; give fewer epochs or --max-steps",
                o.epochs, o.epochs
            ))
        })?,
    };
    let warmup = match (o.warmup_steps, o.warmup_ratio) {
        (Some(w), _) => w,
        (None, Some(r)) => Schedule::warmup_from_ratio(r, total_steps),
        _ => 0,
    };
    let schedule = Schedule {
        kind: o.scheduler,
        base_lr: o.lr,
        warmup_steps: warmup,
        total_steps,
    };
    Ok((schedule, batches_per_epoch))
}

/// Model, optimizer and trainer state: fresh, or from the checkpoint resumed from.
fn restore(
    o: &TrainOptions,
    resume_dir: Option<&Path>,
    schedule: &Schedule,
    n: usize,
    batches_per_epoch: i64,
    out: &mut dyn Write,
) -> Result<(Trainable, AdamW, TrainerState)> {
    if let Some(dir) = resume_dir {
        check_same_kind(o, dir)?;
    }
    let tr = match &o.lora {
        Some(l) => {
            let base_kind = if o.base_bf16 {
                Kind::BFloat16
            } else {
                Kind::Float
            };
            Trainable::load_lora(
                &o.model,
                resume_dir,
                l,
                o.seed,
                o.device,
                (o.bf16, base_kind),
            )?
        }
        None => Trainable::load(resume_dir.unwrap_or(&o.model), o.device, o.bf16)?,
    };
    let mut adam = AdamW::new(&tr.params, o.adam);
    let Some(dir) = resume_dir else {
        let state = TrainerState {
            max_steps: schedule.total_steps,
            batches_per_epoch,
            train_examples: n as i64,
            train_batch_size: Some(o.batch_size),
            ..Default::default()
        };
        return Ok((tr, adam, state));
    };
    let mut state = resume::read_state(dir)?;
    resume::check_no_later_checkpoints(&o.output, dir, state.global_step)?;
    if state.train_examples != n as i64 || state.batches_per_epoch != batches_per_epoch {
        return Err(input(format!(
            "--resume {}: the checkpoint was trained on {} examples in {} batches per \
             epoch; this run has {} and {} (different data, --batch-size or processes)",
            dir.display(),
            state.train_examples,
            state.batches_per_epoch,
            n,
            batches_per_epoch
        )));
    }
    if state.data_batch < 0 || state.data_batch > batches_per_epoch || state.data_epoch < 0 {
        return Err(input(format!(
            "{}: data position (epoch {}, batch {}) is outside this data's {} batches",
            dir.join(ckpt::TRAINER_STATE).display(),
            state.data_epoch,
            state.data_batch,
            batches_per_epoch
        )));
    }
    resume::check_same_batch(dir, &state, o.batch_size)?;
    state.train_batch_size = Some(o.batch_size);
    resume::check_same_run(dir, schedule, o.seed)?;
    let opt = folder::read_safetensors(&dir.join(ckpt::OPTIMIZER), o.device)?;
    adam.load_state(&opt)
        .with_context(|| format!("{}", dir.join(ckpt::OPTIMIZER).display()))?;
    state.max_steps = schedule.total_steps;
    let _ = writeln!(
        out,
        "resuming from {} at step {}",
        dir.display(),
        state.global_step
    );
    Ok((tr, adam, state))
}

/// Forward and backward over one step's micro-batches, the gradients accumulating in
/// the leaves; returns the step's loss (mean over every target token of the step, as
/// transformers' `num_items_in_batch`).
fn accumulate(
    o: &TrainOptions,
    tr: &Trainable,
    data: &Dataset,
    (step, batches): (i64, &[Vec<usize>]),
    micro_batches_run: &mut u64,
) -> Result<f64> {
    let targets: i64 = batches
        .iter()
        .flatten()
        .map(|&i| data.train[i].target_tokens())
        .sum();
    // Summed on the device, read once at the end of the step.
    let mut losses: Option<Tensor> = None;
    for (micro, batch) in batches.iter().enumerate() {
        let batch = ddp::my_part(o, batch);
        if batch.is_empty() {
            continue;
        }
        let refs: Vec<&Sample> = batch.iter().map(|&i| &data.train[i]).collect();
        let (ids, labels) = data::collate(&refs, data.eos, o.device);
        let t0 = Instant::now();
        let pass = Pass {
            ids: &ids,
            labels: &labels,
            targets,
            checkpointing: o.gradient_checkpointing,
            dropout_seed: pass_seed(o.seed, step, ddp::micro_id(o, micro)),
            autocast: tr.autocast(),
        };
        let sum = forward_backward(tr, &tr.model, &pass)?;
        losses = Some(losses.map_or(sum.shallow_clone(), |l| l + sum));
        if o.profile {
            // The pass's time, not its launch's: wait for the device.
            if let Device::Cuda(i) = o.device {
                tch::Cuda::synchronize(i as i64);
            }
            let _ = writeln!(
                std::io::stderr(),
                "profile: forward and backward {:.3}s",
                t0.elapsed().as_secs_f64()
            );
        }
        *micro_batches_run += 1;
        if o.stop_after_micro_batches == Some(*micro_batches_run) {
            bail!("stopped after {micro_batches_run} micro-batches (--stop-after-micro-batches)");
        }
    }
    let mut loss_sum = losses.map_or(0.0, |l| l.double_value(&[]));
    ddp::reduce_step(o, tr, &mut loss_sum)?;
    Ok(loss_sum / targets.max(1) as f64)
}

/// The eval loss of the current weights, shared among the ranks of a data-parallel run.
fn eval(o: &TrainOptions, tr: &Trainable, data: &Dataset) -> Result<EvalResult> {
    ddp::eval(o, &data.eval, |set| {
        run_eval(tr, set, o.eval_batch_size, data.eos)
    })
}

/// Clipping and the AdamW update, or a skipped step when the loss or the gradient is
/// not finite (five in a row stop the run); returns the gradient norm.
fn update(
    o: &TrainOptions,
    tr: &mut Trainable,
    adam: &mut AdamW,
    state: &mut TrainerState,
    metrics: &mut Metrics,
    loss: f64,
    lr: f64,
) -> Result<f64> {
    let t_opt = Instant::now();
    let norm = total_grad_norm(&tr.params);
    let grad_norm = norm.as_ref().map_or(0.0, |n| n.double_value(&[]));
    if loss.is_finite() && grad_norm.is_finite() {
        // A finite gradient can still give a non-finite update (an overflowing step
        // size): stop at once rather than train on weights no checkpoint may hold.
        let non_finite = if o.fused_adamw.unwrap_or(o.device != Device::Cpu) {
            let k = norm.and_then(|n| clip_coefficient_tensor(&n, o.max_grad_norm));
            adam.step_fused(&tr.params, lr, k.as_ref())?
        } else {
            let scale = norm.map_or(1.0, |n| clip_coefficient(&n, o.max_grad_norm));
            adam.step(&tr.params, lr, scale)
        };
        state.consecutive_nan_steps = 0;
        if let Some(name) = non_finite {
            metrics.finish();
            bail!(
                "step {}: the update made `{name}` NaN or infinite (loss {loss}, gradient \
                 norm {grad_norm}, lr {lr}); stopping. Lower --lr or check --adam-epsilon",
                state.global_step + 1
            );
        }
    } else {
        state.nan_steps_skipped += 1;
        state.consecutive_nan_steps += 1;
        metrics.line(&format!(
            "step {}: non-finite loss ({loss}) or gradient norm ({grad_norm}); step skipped",
            state.global_step + 1
        ));
        if state.consecutive_nan_steps >= MAX_CONSECUTIVE_NAN_STEPS {
            metrics.finish();
            bail!(
                "{} steps in a row had a non-finite loss or gradient (last at step {}); \
                 stopping. Lower --lr, set --max-grad-norm, or check the data",
                state.consecutive_nan_steps,
                state.global_step + 1
            );
        }
    }
    tr.fresh_leaves()?;
    if o.profile {
        let _ = writeln!(
            std::io::stderr(),
            "profile: clip + adamw + zero_grad {:.3}s",
            t_opt.elapsed().as_secs_f64()
        );
    }
    Ok(grad_norm)
}

/// Writes `final/`: the last step's weights, or with --load-best-model-at-end the best
/// checkpoint's (transformers' `load_best_model_at_end`), read back from its folder,
/// which rotation always spares. Returns the folder and the checkpoint it came from.
fn write_final(
    o: &TrainOptions,
    tr: &Trainable,
    state: &TrainerState,
    tokenizer_files: &[(String, Vec<u8>)],
) -> Result<(PathBuf, Option<String>)> {
    let final_dir = o.output.join(FINAL_DIR);
    if !tr.all_finite() {
        bail!("the trained weights hold NaN or infinite values; the final model is not saved");
    }
    let best = match (&state.best_model_checkpoint, o.load_best_model_at_end) {
        (Some(name), true) => {
            let dir = o.output.join(name);
            resume::verify(&dir)
                .with_context(|| format!("the best checkpoint {}", dir.display()))?;
            Some((
                name.clone(),
                read_weights(tr, &dir)
                    .with_context(|| format!("loading the best checkpoint {}", dir.display()))?,
            ))
        }
        _ => None,
    };
    folder::write_model_folder(
        &final_dir,
        &FolderContents {
            config: &tr.config,
            tensors: best.as_ref().map_or(&tr.params, |(_, t)| t),
            tokenizer_files,
            extra_files: vec![(
                ckpt::TRAINER_STATE.into(),
                serde_json::to_vec_pretty(state)?,
            )],
            extra_tensors: vec![],
            adapter: tr.adapter_folder(&o.model),
        },
        true,
    )?;
    Ok((final_dir, best.map(|(name, _)| name)))
}

/// The trained tensors a checkpoint holds: the model's, or a LoRA run's adapter.
fn read_weights(tr: &Trainable, dir: &Path) -> Result<Vec<(String, tch::Tensor)>> {
    if tr.lora.is_some() {
        return Ok(Lora::read(dir, &tr.config, Device::Cpu)?.tensors);
    }
    let files = WeightFiles::open_dir(dir)?;
    let model = Gpt2::from_weights(tr.config.clone(), &files, Kind::Float, &[Device::Cpu])?;
    Ok(model.named_tensors()?)
}

/// A LoRA run resumes from a LoRA checkpoint, a full fine-tuning run from a model's.
fn check_same_kind(o: &TrainOptions, dir: &Path) -> Result<()> {
    let adapter = dir.join(ADAPTER_CONFIG).is_file();
    match (o.lora.is_some(), adapter) {
        (true, false) => Err(input(format!(
            "--resume {}: a full fine-tuning checkpoint (no {ADAPTER_CONFIG}); --lora-r \
             resumes LoRA checkpoints only",
            dir.display()
        ))),
        (false, true) => Err(input(format!(
            "--resume {}: a LoRA checkpoint ({ADAPTER_CONFIG}); resume it with the run's \
             --lora-r and LoRA flags",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

fn same_folder(a: Option<&Path>, b: &Path) -> bool {
    let real = |p: &Path| p.canonicalize().ok();
    a.and_then(real).is_some_and(|a| real(b) == Some(a))
}
