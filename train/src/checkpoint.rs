//! Checkpoints: `OUTPUT/checkpoint-STEP/`, a Hugging Face model folder plus the
//! optimizer state (`optimizer.safetensors`), `scheduler.json`, `rng_state.json` and
//! `trainer_state.json` (step, data position, best metric, log history), written
//! atomically by `folder`. Rotation keeps the newest K plus the best by eval loss.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::folder::{self, FolderContents};
use crate::optim::AdamW;
use crate::options::TrainOptions;
use crate::schedule::Schedule;
use crate::trainable::Trainable;

pub const PREFIX: &str = "checkpoint-";
pub const TRAINER_STATE: &str = "trainer_state.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const SCHEDULER: &str = "scheduler.json";
pub const RNG_STATE: &str = "rng_state.json";

/// Where the trainer is: everything besides tensors that an exact resume needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed (skipped non-finite steps included).
    pub global_step: i64,
    /// Fractional epochs done, for people (transformers' field).
    pub epoch: f64,
    pub max_steps: i64,
    /// The next micro-batch: its epoch and index inside that epoch's order.
    pub data_epoch: i64,
    pub data_batch: i64,
    /// Micro-batches per epoch and examples, to refuse resuming on other data.
    pub batches_per_epoch: i64,
    pub train_examples: i64,
    /// Examples per micro-batch of the whole job (--batch-size × processes), to refuse
    /// resuming with another; absent from checkpoints written before it was recorded.
    #[serde(default)]
    pub train_batch_size: Option<i64>,
    pub best_metric: Option<f64>,
    pub best_model_checkpoint: Option<String>,
    /// Evals in a row without a new best eval loss (early stopping).
    pub evals_without_improvement: i64,
    pub last_eval_loss: Option<f64>,
    /// The step of that eval: a save is the best checkpoint only if it holds exactly
    /// the weights the best eval saw (as transformers, which records the best at saves
    /// that coincide with an eval).
    #[serde(default)]
    pub last_eval_step: Option<i64>,
    pub nan_steps_skipped: i64,
    pub consecutive_nan_steps: i64,
    pub log_history: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerState {
    pub kind: String,
    pub base_lr: f64,
    pub warmup_steps: i64,
    pub total_steps: i64,
    /// Updates the schedule has taken (LambdaLR's `last_epoch`).
    pub last_step: i64,
}

/// The data order is a function of the seed and the epoch: that is all the RNG state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    pub data_epoch: i64,
}

pub fn checkpoint_dir(output: &Path, step: i64) -> PathBuf {
    output.join(format!("{PREFIX}{step}"))
}

/// Whether `dir` is a checkpoint folder (it holds a trainer state or a manifest; a
/// folder with a manifest and no trainer state is a damaged checkpoint).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join(TRAINER_STATE).is_file() || dir.join(infer::manifest::MANIFEST_FILE).is_file()
}

/// Checkpoint folders in `output`, by step (`is_checkpoint`; whether their files are
/// sound is `resume::verify`'s to say).
pub fn list_checkpoints(output: &Path) -> Vec<(i64, PathBuf)> {
    let mut out: Vec<(i64, PathBuf)> = std::fs::read_dir(output)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix(PREFIX)?.parse::<i64>().ok()?;
            // Real folders only: a link named like a checkpoint is not this run's.
            let p = e.path();
            let dir = e.file_type().is_ok_and(|t| t.is_dir());
            (dir && is_checkpoint(&p)).then_some((step, p))
        })
        .collect();
    out.sort();
    out
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Deletes checkpoints beyond the newest `keep`, sparing `best`.
pub fn rotate(output: &Path, keep: usize, best: Option<&Path>) -> Result<Vec<PathBuf>> {
    let all = list_checkpoints(output);
    let n = all.len();
    let mut removed = Vec::new();
    for (i, (_, dir)) in all.into_iter().enumerate() {
        let newest = i + keep >= n;
        let is_best = best.is_some_and(|b| same_dir(b, &dir));
        if !newest && !is_best {
            // Renamed aside first: a process killed while deleting leaves a temporary
            // folder (removed at the next start), never a half-deleted checkpoint.
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            let aside = output.join(format!(
                "{}rotated-{name}-{}",
                crate::folder::TMP_PREFIX,
                std::process::id()
            ));
            std::fs::rename(&dir, &aside)
                .with_context(|| format!("moving {} aside", dir.display()))?;
            infer::faults::point();
            std::fs::remove_dir_all(&aside)
                .with_context(|| format!("removing {}", aside.display()))?;
            removed.push(dir);
        }
    }
    Ok(removed)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    a.file_name() == b.file_name()
}

/// Writes `OUTPUT/checkpoint-STEP/` (the model, optimizer, schedule, RNG and trainer
/// state), records it as the best when it holds the weights of the best eval, then
/// rotates.
pub fn save(
    o: &TrainOptions,
    tr: &Trainable,
    adam: &AdamW,
    schedule: &Schedule,
    state: &mut TrainerState,
    tokenizer_files: &[(String, Vec<u8>)],
) -> Result<()> {
    if !tr.all_finite() {
        bail!(
            "step {}: the weights hold NaN or infinite values; not saving a checkpoint",
            state.global_step
        );
    }
    let dir = checkpoint_dir(&o.output, state.global_step);
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    // The best checkpoint is one saved at the step of the best eval so far.
    if let (Some(last), Some(best)) = (state.last_eval_loss, state.best_metric) {
        if last == best && state.last_eval_step == Some(state.global_step) {
            state.best_model_checkpoint = Some(name.clone());
        }
    }
    let sched = SchedulerState {
        kind: schedule.kind.name().into(),
        base_lr: schedule.base_lr,
        warmup_steps: schedule.warmup_steps,
        total_steps: schedule.total_steps,
        last_step: state.global_step,
    };
    let rng = RngState {
        seed: o.seed,
        data_epoch: state.data_epoch,
    };
    folder::write_model_folder(
        &dir,
        &FolderContents {
            config: &tr.config,
            tensors: &tr.params,
            tokenizer_files,
            extra_files: vec![
                (TRAINER_STATE.into(), serde_json::to_vec_pretty(state)?),
                (SCHEDULER.into(), serde_json::to_vec_pretty(&sched)?),
                (RNG_STATE.into(), serde_json::to_vec_pretty(&rng)?),
            ],
            extra_tensors: vec![(OPTIMIZER.into(), adam.state_tensors())],
            adapter: tr.adapter_folder(&o.model),
        },
        // A folder of this step from an earlier run (resumed from an older checkpoint)
        // is swapped out only once the new one is complete.
        true,
    )?;
    if let Some(k) = o.save_total_limit {
        let best = state
            .best_model_checkpoint
            .as_ref()
            .map(|b| o.output.join(b));
        rotate(&o.output, k, best.as_deref())?;
    }
    Ok(())
}
