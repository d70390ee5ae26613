//! Eval loss and perplexity: mean token-level cross-entropy under no_grad, through the
//! model's cache-free forward, so any model `Gpt2::load` returns can be measured.
use std::path::Path;

use anyhow::Result;
use infer::{Gpt2, Tokenizer};

use crate::data::{self, DataOptions, Sample};

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
        let (ids, labels) = data::collate(&refs, pad, model.device());
        let logits = model.forward_train(&ids);
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
    opts.vocab_size = Some(model.config.vocab_size);
    let (samples, _) = data::load_jsonl(&[path.to_path_buf()], tokenizer, eos, &opts)?;
    evaluate(model, &samples, batch_size, eos)
}
