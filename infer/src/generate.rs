//! The generation loop: left-pad a batch of prompts, prefill the KV cache once, then
//! decode one token per step until every row has hit an end-of-sequence id or
//! `max_new_tokens`. Finished rows are fed the pad id, as transformers' `generate`
//! does. Strategies differ in how the next token is picked (`pick`), never in the loop.
use tch::{Kind, Tensor};

use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::model::Gpt2;

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: i64,
    /// Any of these ends a sequence (it is kept in the output, as transformers does).
    pub eos_token_ids: Vec<i64>,
    /// Fed for finished rows and used to left-pad; defaults to the first EOS id, else 0.
    pub pad_token_id: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Length => "length",
        }
    }
}

/// One prompt's result: the generated token ids only.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<i64>,
    pub finish_reason: FinishReason,
}

/// Checks prompts against the model's config before any model work.
pub fn validate(config: &Gpt2Config, prompts: &[Vec<i64>], cfg: &GenerationConfig) -> Result<()> {
    if prompts.is_empty() {
        return Err(Error::Input("no prompt given".into()));
    }
    if cfg.max_new_tokens < 1 {
        return Err(Error::Input(format!(
            "--max-new-tokens must be at least 1, got {}",
            cfg.max_new_tokens
        )));
    }
    let n_positions = config.n_positions;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::Input(format!(
                "prompt {i} is empty (it encodes to no tokens)"
            )));
        }
        config.check_ids(p)?;
        let need = p.len() as i64 + cfg.max_new_tokens;
        if need > n_positions {
            return Err(Error::Input(format!(
                "prompt {i} has {} tokens; with --max-new-tokens {} that is {need} positions, \
                 more than the model's context (n_positions {n_positions})",
                p.len(),
                cfg.max_new_tokens
            )));
        }
    }
    Ok(())
}

/// Greedy decoding of every prompt as one left-padded batch. `on_token(row, id)` sees
/// each generated token as soon as it is picked (streaming).
pub fn generate(
    model: &Gpt2,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
    mut on_token: impl FnMut(usize, i64),
) -> Result<Vec<Generated>> {
    validate(&model.config, prompts, cfg)?;
    let device = model.device();
    let pad = cfg
        .pad_token_id
        .or_else(|| cfg.eos_token_ids.first().copied())
        .unwrap_or(0);
    let b = prompts.len();
    let t0 = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t0);
    let mut mask = Vec::with_capacity(b * t0);
    for p in prompts {
        let n_pad = t0 - p.len();
        ids.extend(std::iter::repeat_n(pad, n_pad).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, n_pad).chain(std::iter::repeat_n(1, p.len())));
    }
    let shape = [b as i64, t0 as i64];
    let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
    let mask = Tensor::from_slice(&mask).view(shape);

    let mut cache = model.new_cache(b as i64, t0 as i64 + cfg.max_new_tokens);
    cache.set_attention_mask(&mask);
    let mut out: Vec<Generated> = (0..b)
        .map(|_| Generated {
            tokens: Vec::new(),
            finish_reason: FinishReason::Length,
        })
        .collect();
    let mut done = vec![false; b];
    let mut hidden = model.forward_hidden(&ids, &mut cache).select(1, -1); // (B, E)
    for step in 0..cfg.max_new_tokens {
        let logits = model.logits(&hidden).to_kind(Kind::Float); // (B, V)
        let next: Vec<i64> = Vec::try_from(pick(&logits))?;
        let mut feed = next.clone();
        for (row, &tok) in next.iter().enumerate() {
            if done[row] {
                feed[row] = pad;
                continue;
            }
            out[row].tokens.push(tok);
            on_token(row, tok);
            if cfg.eos_token_ids.contains(&tok) {
                done[row] = true;
                out[row].finish_reason = FinishReason::Eos;
            }
        }
        if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        let feed = Tensor::from_slice(&feed)
            .view([b as i64, 1])
            .to_device(device);
        hidden = model.forward_hidden(&feed, &mut cache).select(1, -1);
    }
    Ok(out)
}

/// Greedy choice: the argmax of each row (ties go to the lowest id, as torch's argmax).
fn pick(logits: &Tensor) -> Tensor {
    logits.argmax(-1, false).to_device(tch::Device::Cpu)
}
