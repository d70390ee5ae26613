//! Resuming a run: which checkpoint (`--resume`, `--resume DIR` for a checkpoint or an
//! output folder), whether its saved state can be trusted, and whether this run is the
//! one that checkpoint continues (the same model, schedule, seed and data), as
//! transformers' Trainer `resume_from_checkpoint` expects.
use std::path::{Path, PathBuf};

use anyhow::Result;
use infer::{Gpt2Config, Tokenizer};

use crate::checkpoint::{self as ckpt, RngState, SchedulerState, TrainerState};
use crate::options::{input, Resume, TrainOptions};
use crate::schedule::Schedule;

/// The checkpoint to resume from: the latest of --output, a checkpoint folder, or the
/// latest checkpoint of another output folder.
pub fn resolve(o: &TrainOptions) -> Result<Option<PathBuf>> {
    let latest_of = |dir: &Path| ckpt::list_checkpoints(dir).pop().map(|(_, p)| p);
    Ok(match &o.resume {
        None => None,
        Some(Resume::Path(p)) if p.join(ckpt::TRAINER_STATE).is_file() => Some(p.clone()),
        Some(Resume::Path(p)) => Some(latest_of(p).ok_or_else(|| {
            input(format!(
                "--resume {}: neither a checkpoint folder (no {}) nor a folder holding one",
                p.display(),
                ckpt::TRAINER_STATE
            ))
        })?),
        Some(Resume::Latest) => Some(latest_of(&o.output).ok_or_else(|| {
            input(format!(
                "--resume: {} holds no checkpoint to resume from",
                o.output.display()
            ))
        })?),
    })
}

/// The checkpoint's trainer state, checked where a hand-edited or foreign file could
/// mislead the run: its step matches the folder's name, counters are not negative,
/// and the best checkpoint is named as this tool names one (never a path).
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(ckpt::TRAINER_STATE);
    let state: TrainerState = ckpt::read_json(&path)?;
    let bad = |what: String| anyhow::anyhow!("{}: {what}", path.display());
    if state.global_step < 0 || state.nan_steps_skipped < 0 || state.evals_without_improvement < 0 {
        return Err(bad("negative step or counter".into()));
    }
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(ckpt::PREFIX))
        .and_then(|n| n.parse::<i64>().ok());
    if named.is_some_and(|n| n != state.global_step) {
        return Err(bad(format!(
            "global_step is {} but the folder is named for step {}",
            state.global_step,
            named.unwrap_or_default()
        )));
    }
    if let Some(best) = &state.best_model_checkpoint {
        let ok = best
            .strip_prefix(ckpt::PREFIX)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(bad(format!(
                "best_model_checkpoint {best:?} is not a checkpoint-STEP name"
            )));
        }
    }
    Ok(state)
}

/// Checkpoints in --output past the one resumed from belong to a later point of some
/// run: this run would save its own steps among them, rotation (by step) would delete
/// this run's newest saves first, and a later `--resume` would pick theirs. Refused,
/// naming them, rather than mixing two trajectories in one folder.
pub fn check_no_later_checkpoints(output: &Path, from: &Path, step: i64) -> Result<()> {
    let later: Vec<String> = ckpt::list_checkpoints(output)
        .into_iter()
        .filter(|(s, _)| *s > step)
        .map(|(_, p)| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    if later.is_empty() {
        return Ok(());
    }
    Err(input(format!(
        "--resume {} (step {step}): {} already holds later checkpoints ({}); move them \
         away or resume into another --output",
        from.display(),
        output.display(),
        later.join(", ")
    )))
}

/// `--model` with `--resume`: the checkpoint continues the model of --model, so a
/// --model of another shape or vocabulary (whose tokenizer would encode the data) is
/// refused rather than ignored.
pub fn check_same_model(model: &Path, config: &Gpt2Config, checkpoint: &Path) -> Result<()> {
    let saved = Gpt2Config::from_file(&checkpoint.join("config.json"))?;
    let mut diffs = Vec::new();
    for (key, a, b) in [
        ("vocab_size", config.vocab_size, saved.vocab_size),
        ("n_positions", config.n_positions, saved.n_positions),
        ("n_embd", config.n_embd, saved.n_embd),
        ("n_layer", config.n_layer, saved.n_layer),
        ("n_head", config.n_head, saved.n_head),
        ("n_inner", config.inner_dim(), saved.inner_dim()),
    ] {
        if a != b {
            diffs.push(format!("{key} {a} (checkpoint: {b})"));
        }
    }
    if config.activation_function != saved.activation_function {
        diffs.push(format!(
            "activation_function {} (checkpoint: {})",
            config.activation_function, saved.activation_function
        ));
    }
    if diffs.is_empty() {
        let ours = Tokenizer::from_dir(model)?;
        let theirs = Tokenizer::from_dir(checkpoint)?;
        if !ours.same_vocabulary(&theirs) {
            diffs.push("its tokenizer's vocabulary".into());
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(input(format!(
        "--model {} is not the model --resume {} continues: {}; resume with the --model the \
         run started from",
        model.display(),
        checkpoint.display(),
        diffs.join(", ")
    )))
}

/// An exact resume needs the schedule and the data order the checkpoint was made with:
/// refuses flags that would change them mid-run (naming them), as a silent change would
/// rebuild the LR curve or reshuffle (and, with --eval-split, re-split) the data. The
/// total length may change (`--max-steps` to train further, as transformers allows).
pub fn check_same_run(dir: &Path, schedule: &Schedule, seed: u64) -> Result<()> {
    let saved: SchedulerState = ckpt::read_json(&dir.join(ckpt::SCHEDULER))?;
    let rng: RngState = ckpt::read_json(&dir.join(ckpt::RNG_STATE))?;
    let mut diffs = Vec::new();
    if saved.kind != schedule.kind.name() {
        diffs.push(format!(
            "--lr-scheduler {} (was {})",
            schedule.kind.name(),
            saved.kind
        ));
    }
    if saved.base_lr != schedule.base_lr {
        diffs.push(format!("--lr {} (was {})", schedule.base_lr, saved.base_lr));
    }
    if saved.warmup_steps != schedule.warmup_steps {
        diffs.push(format!(
            "warmup of {} steps (was {}; --warmup-steps/--warmup-ratio)",
            schedule.warmup_steps, saved.warmup_steps
        ));
    }
    if rng.seed != seed {
        diffs.push(format!("--seed {seed} (was {})", rng.seed));
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(input(format!(
        "--resume {}: this run differs from the checkpoint's: {}; resume with the same flags",
        dir.display(),
        diffs.join(", ")
    )))
}
