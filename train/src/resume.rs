//! Resuming a run: which checkpoint (`--resume`, `--resume DIR` for a checkpoint or an
//! output folder), whether its saved state can be trusted, and whether this run is the
//! one that checkpoint continues (the same model, schedule, seed and data), as
//! transformers' Trainer `resume_from_checkpoint` expects.
use std::path::{Path, PathBuf};

use std::io::Write;

use anyhow::{Context, Result};
use infer::manifest::{self, Verified};
use infer::{Gpt2Config, Tokenizer};

use crate::checkpoint::{self as ckpt, RngState, SchedulerState, TrainerState};
use crate::options::{input, Resume, TrainOptions};
use crate::schedule::Schedule;

/// The checkpoint to resume from: the latest of --output, a checkpoint folder, or the
/// latest checkpoint of another output folder. A checkpoint must match its manifest
/// (`infer::manifest`): one named by --resume that does not is an error naming the
/// file; when the latest does not, a warning names the file and the one before it is
/// taken (those of --output are first renamed `checkpoint-STEP.corrupt`, kept for a
/// look but out of the run's way). A checkpoint with no manifest (written before
/// manifests existed) loads as it always did.
pub fn resolve(o: &TrainOptions) -> Result<Option<PathBuf>> {
    let latest_of = |dir: &Path| {
        let own = same_folder(dir, &o.output);
        latest_sound(dir, own, &mut std::io::stderr())
    };
    Ok(match &o.resume {
        None => None,
        Some(Resume::Path(p)) if ckpt::is_checkpoint(p) => {
            verify(p).map_err(|e| input(format!("--resume {}: {e}", p.display())))?;
            Some(p.clone())
        }
        Some(Resume::Path(p)) => Some(latest_of(p)?.ok_or_else(|| {
            input(format!(
                "--resume {}: neither a checkpoint folder (no {}) nor a folder holding a                  sound one",
                p.display(),
                ckpt::TRAINER_STATE
            ))
        })?),
        Some(Resume::Latest) => Some(latest_of(&o.output)?.ok_or_else(|| {
            input(format!(
                "--resume: {} holds no sound checkpoint to resume from",
                o.output.display()
            ))
        })?),
    })
}

/// A checkpoint's files against its manifest; without one, its trainer state must
/// at least be there.
pub fn verify(dir: &Path) -> Result<Verified> {
    let v = manifest::verify(dir)?;
    let state = dir.join(ckpt::TRAINER_STATE);
    if !state.is_file() {
        return Err(infer::Error::Integrity {
            path: state,
            reason: "missing".into(),
        }
        .into());
    }
    Ok(v)
}

/// The newest checkpoint of `dir` that verifies, warning (to `warn`) about each newer
/// one that does not; with `own`, those are renamed aside.
pub fn latest_sound(dir: &Path, own: bool, warn: &mut dyn Write) -> Result<Option<PathBuf>> {
    for (_, path) in ckpt::list_checkpoints(dir).into_iter().rev() {
        let e = match verify(&path) {
            Ok(_) => return Ok(Some(path)),
            Err(e) => e,
        };
        let aside = if own { Some(move_aside(&path)?) } else { None };
        let _ = writeln!(
            warn,
            "warning: checkpoint {} is not sound ({e:#}){}; trying the one before it",
            path.display(),
            aside.map_or(String::new(), |a| format!("; moved to {}", a.display()))
        );
    }
    Ok(None)
}

/// Renames a checkpoint that failed its check to `checkpoint-STEP.corrupt` (`.corrupt-N`
/// if taken): its bytes are kept, and it no longer counts as a checkpoint.
fn move_aside(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut aside = path.with_file_name(format!("{name}.corrupt"));
    let mut n = 1;
    while aside.symlink_metadata().is_ok() {
        n += 1;
        aside = path.with_file_name(format!("{name}.corrupt-{n}"));
    }
    std::fs::rename(path, &aside).with_context(|| format!("moving {} aside", path.display()))?;
    Ok(aside)
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
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
    // A LoRA checkpoint holds no config.json: its adapter's shapes are checked against
    // the base when it is read.
    let lora = !checkpoint.join("config.json").exists()
        && checkpoint.join(crate::lora::ADAPTER_CONFIG).is_file();
    let saved = if lora {
        config.clone()
    } else {
        Gpt2Config::from_file(&checkpoint.join("config.json"))?
    };
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
/// A resumed run takes micro-batches of the checkpoint's size (`--batch-size` times the
/// processes of a data-parallel job): the data position counts them, so another size
/// would continue from another example than the one the checkpoint stopped before.
pub fn check_same_batch(dir: &Path, state: &TrainerState, batch: i64) -> Result<()> {
    match state.train_batch_size {
        Some(saved) if saved != batch => Err(input(format!(
            "--resume {}: the checkpoint was trained on micro-batches of {saved} examples \
             (--batch-size times the processes); this run's are {batch}: resume with the \
             same --batch-size and number of processes",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

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
