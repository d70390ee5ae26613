//! Eval loss and perplexity: mean token-level cross-entropy under no_grad, through the
//! model's cache-free forward, so any model `Gpt2::load` returns can be measured.
use std::io::Write;
use std::path::Path;

use anyhow::Result;
use infer::{Gpt2, Tokenizer};
use serde_json::json;

use crate::checkpoint::TrainerState;
use crate::data::{self, DataOptions, Sample};
use crate::metrics::Metrics;
use crate::options::TrainOptions;
use crate::trainable::Trainable;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy per predicted token (nats).
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Predicted tokens counted.
    pub tokens: i64,
}

/// Mean loss of `model` over `samples`, `batch_size` examples at a time.
pub fn evaluate(model: &Gpt2, samples: &[Sample], batch_size: i64, pad: i64) -> Result<EvalResult> {
    evaluate_with(model.device(), samples, batch_size, pad, &|ids| {
        Ok(model.forward_train(ids))
    })
}

/// `evaluate` with the logits of `logits`, run on inputs placed on `device`.
pub fn evaluate_with(
    device: tch::Device,
    samples: &[Sample],
    batch_size: i64,
    pad: i64,
    logits: &dyn Fn(&tch::Tensor) -> Result<tch::Tensor>,
) -> Result<EvalResult> {
    if batch_size < 1 {
        return Err(
            infer::Error::Input(format!("batch size must be positive, got {batch_size}")).into(),
        );
    }
    let _guard = tch::no_grad_guard();
    let mut sum = 0f64;
    let mut tokens = 0i64;
    for chunk in samples.chunks(batch_size as usize) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let (ids, labels) = data::collate(&refs, pad, device);
        let logits = logits(&ids)?;
        sum += data::lm_loss_sum(&logits, &labels).double_value(&[]);
        tokens += chunk.iter().map(Sample::target_tokens).sum::<i64>();
    }
    if tokens == 0 {
        return Err(infer::Error::Input("no tokens to evaluate".into()).into());
    }
    let loss = sum / tokens as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}

/// Loss and perplexity of `model` on a JSONL file (text rows packed into `block_size`
/// blocks, prompt/completion rows scored on their completions).
pub fn perplexity_on_jsonl(
    model: &Gpt2,
    tokenizer: &Tokenizer,
    path: &Path,
    block_size: i64,
    batch_size: i64,
) -> Result<EvalResult> {
    let n_pos = model.config.n_positions;
    if block_size > n_pos {
        return Err(infer::Error::Input(format!(
            "block size {block_size} exceeds the model's n_positions ({n_pos})"
        ))
        .into());
    }
    let eos = data::eos_id(&model.config, tokenizer)?;
    let mut opts = DataOptions::new(block_size);
    opts.truncation = true;
    let (samples, _) = data::load_jsonl(&[path.to_path_buf()], tokenizer, eos, &opts)?;
    evaluate(model, &samples, batch_size, eos)
}

// During training: an eval of the model being trained, recorded in the trainer state
// and the metrics.

/// The eval a resumed, already complete run recorded at its last step.
pub(crate) fn saved_eval(state: &TrainerState) -> Option<EvalResult> {
    if state.last_eval_step != Some(state.global_step) {
        return None;
    }
    let loss = state.last_eval_loss?;
    let tokens = state
        .log_history
        .iter()
        .rev()
        .find_map(|e| e.get("eval_tokens").and_then(|t| t.as_i64()))
        .unwrap_or(0);
    Some(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}

pub(crate) fn run_eval(
    tr: &Trainable,
    set: &[Sample],
    batch_size: i64,
    eos: i64,
) -> Result<EvalResult> {
    let _g = tch::no_grad_guard();
    let model = &tr.model;
    evaluate_with(
        model.device(),
        set,
        batch_size,
        eos,
        &|ids| match tr.autocast() {
            Some(device) => crate::fused::autocast_bf16(device, || tr.logits(model, ids, false))?,
            None => tr.logits(model, ids, false),
        },
    )
}

/// Records the eval of a step and prints it; true when early stopping's patience ran
/// out. Lines on `out` are for people: a reader that went away (`| head`) loses them,
/// the run goes on to its final model.
pub(crate) fn record_step_eval(
    o: &TrainOptions,
    state: &mut TrainerState,
    metrics: &mut Metrics,
    r: &EvalResult,
    out: &mut dyn Write,
) -> bool {
    let step = state.global_step;
    record_eval(state, metrics, step, r);
    let _ = writeln!(
        out,
        "step {step}: eval loss {:.4} · perplexity {:.3}",
        r.loss, r.perplexity
    );
    let Some(p) = o.early_stopping_patience else {
        return false;
    };
    if state.evals_without_improvement < p {
        return false;
    }
    let _ = writeln!(
        out,
        "early stopping at step {step}: no better eval loss in {p} evals (best {:.4})",
        state.best_metric.unwrap_or(f64::NAN)
    );
    true
}

pub(crate) fn record_eval(
    state: &mut TrainerState,
    metrics: &mut Metrics,
    step: i64,
    r: &EvalResult,
) {
    state.log_history.push(json!({
        "step": step, "eval_loss": r.loss, "eval_perplexity": r.perplexity, "eval_tokens": r.tokens,
    }));
    metrics.eval(step, r.loss, r.perplexity);
    state.last_eval_loss = Some(r.loss);
    state.last_eval_step = Some(step);
    if state.best_metric.is_none_or(|b| r.loss < b) {
        state.best_metric = Some(r.loss);
        state.evals_without_improvement = 0;
    } else {
        state.evals_without_improvement += 1;
    }
}
