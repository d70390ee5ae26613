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
//! The tied `wte` (embedding and head) is the one parameter two segments share: the
//! head's and the embeddings' gradients are computed without accumulating
//! (`autograd::grad`), summed, and added to what earlier micro-batches left in one
//! step, as the plain pass adds them.
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
    /// bf16 runs: the device whose bf16 autocast every forward piece (and the loss) runs
    /// under; the backward runs outside it, as PyTorch advises.
    pub autocast: Option<tch::Device>,
}

/// `f` under the pass's autocast, if it has one.
fn forward<T>(p: &Pass, f: impl FnOnce() -> T) -> Result<T> {
    match p.autocast {
        Some(device) => crate::fused::autocast_bf16(device, f),
        None => Ok(f()),
    }
}

/// Forward and backward of one micro-batch on `model` (the trained model or its bf16
/// copy); the gradients accumulate in `tr`'s leaves. Returns the summed loss, a 0-d f64
/// tensor on the model's device: nothing here waits for the device to finish.
pub fn forward_backward(tr: &Trainable, model: &Gpt2, p: &Pass) -> Result<Tensor> {
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
        let (loss, sum) = forward(p, || {
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
            scaled_loss(&logits, p)
        })?;
        backward(&loss)?;
        return Ok(sum);
    }
    checkpointed(model, adapters.as_ref(), p, &seed_block)
}

/// The loss of `logits` divided by the step's targets (what is backpropagated), and the
/// summed loss (detached, f64: what the step adds up).
fn scaled_loss(logits: &Tensor, p: &Pass) -> (Tensor, Tensor) {
    let loss = data::lm_loss_sum(logits, p.labels);
    let sum = loss.detach().to_kind(tch::Kind::Double);
    (loss / p.targets.max(1) as f64, sum)
}

fn backward(t: &Tensor) -> Result<()> {
    t.f_backward()
        .map_err(|e| anyhow!("the backward pass failed: {}", first_line(&e)))
}

/// The gradients of `of` with respect to `wanted`, not accumulated into them.
fn grads_of(of: &Tensor, wanted: &[&Tensor]) -> Result<Vec<Tensor>> {
    Tensor::f_run_backward(&[of], wanted, false, false)
        .map_err(|e| anyhow!("the backward pass failed: {}", first_line(&e)))
}

/// Those of `params` that are trained (require grad).
fn trained<'a>(params: &[&'a Tensor]) -> Vec<&'a Tensor> {
    params
        .iter()
        .copied()
        .filter(|p| p.requires_grad())
        .collect()
}

/// The head's weight: `lm_head.weight`, or `wte` when tied.
fn head_weight(model: &Gpt2) -> &Tensor {
    model.lm_head().unwrap_or(&model.wte)
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
) -> Result<Tensor> {
    let n = model.h.len();
    // Forward: each block's input kept, nothing else.
    let mut inputs = Vec::with_capacity(n);
    let last = forward(p, || {
        let _g = tch::no_grad_guard();
        let mut x = model.train_embed(p.ids); // (B, T, E)
        for layer in 0..n {
            inputs.push(x.shallow_clone());
            seed_block(layer);
            x = model.train_block(layer, x, adapters);
        }
        x
    })?;
    let start = leaf(&last);
    let (loss, sum) = forward(p, || scaled_loss(&model.train_head(&start), p))?;
    // The head's backward gives `start` its gradient and the head's parameters theirs,
    // held (not accumulated) so that the tied `wte` receives its two gradients (head and
    // embeddings) summed, as the plain pass adds them to what earlier micro-batches left.
    let head = trained(&[&model.ln_f.weight, &model.ln_f.bias, head_weight(model)]);
    let mut wanted = vec![&start];
    wanted.extend(head.iter().copied());
    let mut grads = grads_of(&loss, &wanted)?.into_iter();
    let mut g = grads
        .next()
        .ok_or_else(|| anyhow!("no gradient reached the head"))?;
    drop(start);
    let mut held: Vec<(&Tensor, Tensor)> = head.into_iter().zip(grads).collect();
    for layer in (0..n).rev() {
        let x = leaf(&inputs[layer]);
        inputs.truncate(layer);
        seed_block(layer);
        let y = forward(p, || model.train_block(layer, x.shallow_clone(), adapters))?;
        backward(&(y * &g).sum(None::<tch::Kind>))?;
        g = grad_of(&x, &format!("block {layer}'s input"))?;
    }
    let embeddings = trained(&[&model.wte, &model.wpe]);
    if !embeddings.is_empty() {
        let x = forward(p, || model.train_embed(p.ids))?;
        let grads = grads_of(&(x * &g).sum(None::<tch::Kind>), &embeddings)?;
        for (param, grad) in embeddings.into_iter().zip(grads) {
            match held
                .iter_mut()
                .find(|(q, _)| q.data_ptr() == param.data_ptr())
            {
                Some((_, sum)) => *sum = &*sum + grad,
                None => held.push((param, grad)),
            }
        }
    }
    // Each held gradient joins its parameter's in one backward: the gradient of
    // sum(p · g) with respect to p is g exactly.
    let total = held
        .iter()
        .map(|(p, g)| (*p * g).sum(None::<tch::Kind>))
        .reduce(|a, b| a + b);
    if let Some(total) = total {
        backward(&total)?;
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
