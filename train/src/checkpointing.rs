//! One micro-batch's forward and backward, with or without gradient checkpointing
//! (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"; transformers'
//! `gradient_checkpointing_enable`, which checkpoints each block).
//!
//! tch has no `torch.utils.checkpoint` and no custom autograd functions, so the trainer
//! drives the recompute itself: the forward runs every block under no_grad and keeps
//! only each block's input (B, T, E); the loss and its backward run on the last one
//! (a leaf that requires grad); then, from the last block to the first, the block is
//! rerun with grad on its saved input (again a leaf) and backpropagated with the
//! gradient of its output, `sum(y · g)`, whose gradient with respect to y is g exactly,
//! leaving the gradient of its input for the block before. The embeddings take the
//! last one. Every op runs as in the plain pass on the same inputs, so the loss and
//! the gradients equal the plain pass's bit for bit on the CPU (tests/lora.rs checks).
//! The tied `wte` (embedding and head) is the one parameter two segments share: its two
//! gradients are summed in one final backward, so that they are added together to what
//! earlier micro-batches left, as in the plain pass (for that, the head's graph is kept
//! until then: the logits' memory is not saved when the embeddings are trained).
//!
//! The adapter's dropout draws from libtorch's generator, seeded before each block from
//! the run's seed, the step, the micro-batch and the block: the recompute draws the
//! same masks, and a resumed run the masks an uninterrupted one drew.
use anyhow::{anyhow, Result};
use infer::model::Adapters;
use infer::Gpt2;
use tch::Tensor;

use crate::data;
use crate::trainable::{adapters, first_line, Trainable};

/// What a micro-batch's pass needs besides the model.
pub struct Pass<'a> {
    pub ids: &'a Tensor,
    pub labels: &'a Tensor,
    /// Target tokens of the whole step: the loss is summed, divided by it, then
    /// backpropagated.
    pub targets: i64,
    pub checkpointing: bool,
    /// Mixed from the seed, step and micro-batch: the dropout masks' generator.
    pub dropout_seed: u64,
}

/// Forward and backward of one micro-batch on `model` (the trained model or its bf16
/// copy); the gradients accumulate in `tr`'s leaves. Returns the summed loss.
pub fn forward_backward(tr: &Trainable, model: &Gpt2, p: &Pass) -> Result<f64> {
    let layers = tr.lora_layers();
    let adapters = match &layers {
        Some(l) => Some(adapters(model, l, true)?),
        None => None,
    };
    let dropout = tr.lora.as_ref().is_some_and(|l| l.options.dropout > 0.0);
    let seed_block = |layer: usize| {
        if dropout {
            tch::manual_seed(mix(p.dropout_seed, layer as u64) as i64);
        }
    };
    if !p.checkpointing {
        let logits = match &adapters {
            None => model.forward_train(p.ids),
            Some(a) => {
                let mut x = model.train_embed(p.ids);
                for layer in 0..model.h.len() {
                    seed_block(layer);
                    x = model.train_block(layer, x, Some(a));
                }
                model.train_head(&x)
            }
        };
        return backward_loss(&logits, p);
    }
    checkpointed(model, adapters.as_ref(), p, &seed_block)
}

/// The loss of `logits`, divided by the step's targets and backpropagated; the sum.
fn backward_loss(logits: &Tensor, p: &Pass) -> Result<f64> {
    let (loss, sum) = scaled_loss(logits, p);
    backward(&loss)?;
    Ok(sum)
}

/// The loss of `logits` divided by the step's targets (what is backpropagated), and the
/// summed loss.
fn scaled_loss(logits: &Tensor, p: &Pass) -> (Tensor, f64) {
    let loss = data::lm_loss_sum(logits, p.labels);
    let sum = loss.double_value(&[]);
    (loss / p.targets.max(1) as f64, sum)
}

fn backward(t: &Tensor) -> Result<()> {
    t.f_backward()
        .map_err(|e| anyhow!("the backward pass failed: {}", first_line(&e)))
}

/// A leaf over `x`'s values that requires grad: where a recomputed segment starts.
fn leaf(x: &Tensor) -> Tensor {
    let mut l = x.detach();
    let _ = l.requires_grad_(true);
    l
}

/// The gradient `start` received in the backward just run.
fn grad_of(start: &Tensor, what: &str) -> Result<Tensor> {
    let g = start.grad();
    if !g.defined() {
        return Err(anyhow!(
            "gradient checkpointing: no gradient reached {what}"
        ));
    }
    Ok(g)
}

fn checkpointed(
    model: &Gpt2,
    adapters: Option<&Adapters>,
    p: &Pass,
    seed_block: &dyn Fn(usize),
) -> Result<f64> {
    let n = model.h.len();
    // Forward: each block's input kept, nothing else.
    let mut inputs = Vec::with_capacity(n);
    let last = {
        let _g = tch::no_grad_guard();
        let mut x = model.train_embed(p.ids); // (B, T, E)
        for layer in 0..n {
            inputs.push(x.shallow_clone());
            seed_block(layer);
            x = model.train_block(layer, x, adapters);
        }
        x
    };
    let start = leaf(&last);
    let (loss, sum) = scaled_loss(&model.train_head(&start), p);
    // Full fine-tuning: the tied `wte` is used by the head and the embeddings. Its two
    // gradients must reach it in one backward call, summed before they are added to
    // the gradient earlier micro-batches left (as the plain pass adds them): so the
    // head's backward here gives `start` its gradient only, and keeps its graph for one
    // backward with the embeddings' at the end.
    let shared = model.wte.requires_grad() || model.wpe.requires_grad();
    let mut g = if shared {
        let g = Tensor::f_run_backward(&[&loss], &[&start], true, false)
            .map_err(|e| anyhow!("the backward pass failed: {}", first_line(&e)))?;
        g.into_iter()
            .next()
            .ok_or_else(|| anyhow!("no gradient reached the head's input"))?
    } else {
        backward(&loss)?;
        grad_of(&start, "the last block's output")?
    };
    for layer in (0..n).rev() {
        let x = leaf(&inputs[layer]);
        inputs.truncate(layer);
        seed_block(layer);
        let y = model.train_block(layer, x.shallow_clone(), adapters);
        backward(&(y * &g).sum(None::<tch::Kind>))?;
        g = grad_of(&x, &format!("block {layer}'s input"))?;
    }
    if shared {
        let x = model.train_embed(p.ids);
        backward(&(loss + (x * &g).sum(None::<tch::Kind>)))?;
    }
    Ok(sum)
}

/// A seed for block `layer` of the pass seeded `seed` (splitmix64's finaliser).
fn mix(seed: u64, layer: u64) -> u64 {
    let mut z = seed ^ layer.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & (i64::MAX as u64)
}

/// The dropout seed of micro-batch `micro` of step `step` in a run seeded `seed`.
pub fn pass_seed(seed: u64, step: i64, micro: usize) -> u64 {
    mix(mix(seed, step as u64), micro as u64 + 1)
}
