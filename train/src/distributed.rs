//! Data-parallel training over a c10d process group (`dist`), as PyTorch's DDP and
//! transformers' Trainer under torchrun run it: `--batch-size` is per process, so a step
//! of W processes sees W times the examples of one. Every rank draws the same seeded
//! order; the global micro-batch `b` is `order[b·B·W .. (b+1)·B·W]`, exactly what one
//! process with `--batch-size B·W` would take, and rank `r` runs its `r`-th slice of
//! it. Each rank's loss is already divided by the whole step's target tokens (every
//! rank knows them: all ranks hold the data), so the gradients are summed, not
//! averaged, and equal one process's: the same losses and weights, up to the order of
//! floating-point sums. Rank 0 starts every rank from its weights, optimizer and data
//! position (a resume reads the checkpoint there only), and alone writes logs,
//! checkpoints and the final model.
use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use dist::Group;
use tch::Tensor;

use crate::checkpoint::TrainerState;
use crate::data::Sample;
use crate::eval::EvalResult;
use crate::optim::AdamW;
use crate::options::TrainOptions;
use crate::trainable::Trainable;

/// Gradient bucket size (DDP's default `bucket_cap_mb` is 25).
const BUCKET_BYTES: usize = 25 << 20;

pub(crate) fn group(o: &TrainOptions) -> Option<&Arc<Group>> {
    o.group.as_ref()
}

/// True on the rank that writes (rank 0, or a run without a group).
pub(crate) fn writes(o: &TrainOptions) -> bool {
    group(o).is_none_or(|g| g.rank() == 0)
}

/// The options with `--batch-size` the global micro-batch (B·W): what the schedule,
/// the data order and the checkpoint's data position count in.
pub(crate) fn global_batches(o: &TrainOptions) -> TrainOptions {
    let mut g = o.clone();
    if let Some(group) = group(o) {
        g.batch_size = o.batch_size * group.world_size() as i64;
    }
    g
}

/// This rank's part of a global micro-batch (empty where the epoch's last batch is
/// short of examples).
pub(crate) fn my_part<'a>(o: &TrainOptions, batch: &'a [usize]) -> &'a [usize] {
    let Some(g) = group(o) else {
        return batch;
    };
    let per_rank = (o.batch_size as usize).div_ceil(g.world_size());
    let start = (g.rank() * per_rank).min(batch.len());
    &batch[start..(start + per_rank).min(batch.len())]
}

/// A micro-batch's number for its dropout seed: distinct per rank, and one process's
/// own numbering without a group.
pub(crate) fn micro_id(o: &TrainOptions, micro: usize) -> usize {
    group(o).map_or(micro, |g| micro * g.world_size() + g.rank())
}

/// Sums the step's gradients and loss over the ranks. A parameter some rank has no
/// gradient for (its slice was empty) gets a zero one there first; one no rank has a
/// gradient for stays without one, as in one process.
pub(crate) fn reduce_step(o: &TrainOptions, tr: &Trainable, loss_sum: &mut f64) -> Result<()> {
    let Some(g) = group(o) else {
        return Ok(());
    };
    let params: Vec<&Tensor> = tr.params.iter().map(|(_, p)| p).collect();
    let mut defined: Vec<f64> = params
        .iter()
        .map(|p| f64::from(u8::from(p.grad().defined())))
        .collect();
    defined.push(*loss_sum);
    g.sum_f64(&mut defined)?;
    *loss_sum = defined.pop().unwrap_or(0.0);
    let missing: Vec<&Tensor> = params
        .iter()
        .zip(&defined)
        .filter(|(p, &d)| d > 0.0 && !p.grad().defined())
        .map(|(p, _)| *p)
        .collect();
    if !missing.is_empty() {
        // d(0·Σp)/dp = 0: gives each such parameter a defined, zero gradient.
        let zero: Tensor = missing
            .iter()
            .map(|p| p.sum(p.kind()) * 0.0)
            .reduce(|a, b| a + b)
            .expect("not empty");
        zero.backward();
    }
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(Tensor::defined)
        .collect();
    g.all_reduce_tensors(&grads, BUCKET_BYTES)
        .context("summing the step's gradients")
}

/// The eval over this rank's share of the eval set (every W-th example), combined over
/// the ranks: the mean over every example's target tokens.
pub(crate) fn eval(
    o: &TrainOptions,
    set: &[Sample],
    run: impl Fn(&[Sample]) -> Result<EvalResult>,
) -> Result<EvalResult> {
    let Some(g) = group(o) else {
        return run(set);
    };
    let share: Vec<Sample> = set
        .iter()
        .skip(g.rank())
        .step_by(g.world_size())
        .cloned()
        .collect();
    let mut sums = match share.is_empty() {
        true => [0.0, 0.0],
        false => {
            let r = run(&share)?;
            [r.loss * r.tokens as f64, r.tokens as f64]
        }
    };
    g.sum_f64(&mut sums)?;
    let loss = sums[0] / sums[1];
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens: sums[1] as i64,
    })
}

/// Refuses a rank whose data or model differs from rank 0's in what it can count (the
/// ranks read their own copies, each on its own node): with other examples it would
/// train on data rank 0 does not have, and with another step count or other weight
/// shapes its collectives would no longer match rank 0's.
fn check_same_job(g: &Group, tr: &Trainable, state: &TrainerState) -> Result<()> {
    let numel: usize = tr.params.iter().map(|(_, p)| p.numel()).sum();
    let mine = [
        state.train_examples,
        state.batches_per_epoch,
        state.max_steps,
        tr.params.len() as i64,
        numel as i64,
    ];
    let mut first = Tensor::from_slice(&mine);
    g.broadcast(&mut first, 0)
        .context("comparing this rank's data and model with rank 0's")?;
    let first = Vec::<i64>::try_from(&first)?;
    let what = [
        "training examples",
        "micro-batches per epoch",
        "steps",
        "trained tensors",
        "trained parameters",
    ];
    let diffs: Vec<String> = what
        .iter()
        .zip(mine.iter().zip(&first))
        .filter(|(_, (m, f))| m != f)
        .map(|(w, (m, f))| format!("{m} {w} (rank 0: {f})"))
        .collect();
    if diffs.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "rank {} of {}: this rank's run differs from rank 0's: {}; every rank needs the same \
         --model, data and flags",
        g.rank(),
        g.world_size(),
        diffs.join(", ")
    )
}

/// Starts every rank where rank 0 is: its weights (as DDP does at construction), its
/// optimizer state and its trainer state (a resumed run's data position and history).
pub(crate) fn start_from_rank0(
    o: &TrainOptions,
    tr: &mut Trainable,
    adam: &mut AdamW,
    state: &mut TrainerState,
) -> Result<()> {
    let Some(g) = group(o) else {
        return Ok(());
    };
    check_same_job(g, tr, state)?;
    let params: Vec<Tensor> = tr.params.iter().map(|(_, p)| p.detach()).collect();
    g.broadcast_tensors(&params, 0)
        .context("receiving rank 0's weights")?;
    let adam_state = adam.state_tensors();
    let tensors: Vec<Tensor> = adam_state.iter().map(|(_, t)| t.shallow_clone()).collect();
    g.broadcast_tensors(&tensors, 0)
        .context("receiving rank 0's optimizer state")?;
    adam.load_state(&adam_state.into_iter().collect::<HashMap<_, _>>())?;
    let json = serde_json::to_vec(state)?;
    let json = g.broadcast_bytes(&json, 0)?;
    *state = serde_json::from_slice(&json).context("rank 0's trainer state")?;
    Ok(())
}
