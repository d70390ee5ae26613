//! Several models decoded as one. At each step the next-token distribution is the
//! weighted mean of the models' probabilities (`mean-prob`, as fairseq's
//! `EnsembleModel`: logsumexp of the log-probabilities plus log-weights), or the
//! renormalised weighted mean of their log-probabilities (`mean-logprob`). Every
//! strategy and processor then runs on that distribution as it would on one model's
//! logits. One model alone is passed through untouched (its raw logits), so a
//! one-model ensemble is exactly the plain run.
use tch::{Kind, Tensor};

use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::model::Gpt2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnsembleMode {
    MeanProb,
    MeanLogprob,
}

pub struct Ensemble<'a> {
    pub models: Vec<&'a Gpt2>,
    /// Normalised to sum to 1.
    weights: Vec<f64>,
    pub mode: EnsembleMode,
}

impl<'a> Ensemble<'a> {
    pub fn single(model: &'a Gpt2) -> Self {
        Self {
            models: vec![model],
            weights: vec![1.0],
            mode: EnsembleMode::MeanProb,
        }
    }

    /// Checks that the models can be combined: same vocabulary size and device.
    /// `weights` (one per model, positive) default to equal.
    pub fn new(
        models: Vec<&'a Gpt2>,
        weights: Option<Vec<f64>>,
        mode: EnsembleMode,
    ) -> Result<Self> {
        let first = models
            .first()
            .ok_or_else(|| Error::Input("an ensemble needs a model".into()))?;
        for m in &models[1..] {
            if m.config.vocab_size != first.config.vocab_size {
                return Err(Error::Input(format!(
                    "--ensemble: vocab_size {} differs from the first model's {}",
                    m.config.vocab_size, first.config.vocab_size
                )));
            }
            if m.device() != first.device() {
                return Err(Error::Input(
                    "--ensemble: every model must run on one device".into(),
                ));
            }
        }
        let weights = weights.unwrap_or_else(|| vec![1.0; models.len()]);
        if weights.len() != models.len() {
            return Err(Error::Input(format!(
                "--ensemble-weights: {} weights for {} models",
                weights.len(),
                models.len()
            )));
        }
        if weights.iter().any(|w| !(w.is_finite() && *w > 0.0)) {
            return Err(Error::Input(format!(
                "--ensemble-weights must be positive, got {weights:?}"
            )));
        }
        let total: f64 = weights.iter().sum();
        Ok(Self {
            weights: weights.iter().map(|w| w / total).collect(),
            models,
            mode,
        })
    }

    /// The config every length check must respect: the first model's, with the smallest
    /// context of all.
    pub fn config(&self) -> Gpt2Config {
        let mut c = self.models[0].config.clone();
        c.n_positions = self
            .models
            .iter()
            .map(|m| m.config.n_positions)
            .min()
            .unwrap_or(c.n_positions);
        c
    }

    /// Next-token scores (R, V) float from each model's hidden state (R, E).
    pub fn scores(&self, hidden: &[Tensor]) -> Tensor {
        if self.models.len() == 1 {
            return self.models[0]
                .decode_logits(&hidden[0])
                .to_kind(Kind::Float);
        }
        let logp: Vec<Tensor> = self
            .models
            .iter()
            .zip(hidden)
            .zip(&self.weights)
            .map(|((m, h), &w)| {
                let lp = m
                    .decode_logits(h)
                    .to_kind(Kind::Float)
                    .log_softmax(-1, Kind::Float);
                match self.mode {
                    EnsembleMode::MeanProb => lp + w.ln(),
                    EnsembleMode::MeanLogprob => lp * w,
                }
            })
            .collect();
        let stacked = Tensor::stack(&logp, 0); // (M, R, V)
        match self.mode {
            EnsembleMode::MeanProb => stacked.logsumexp([0].as_slice(), false),
            EnsembleMode::MeanLogprob => stacked
                .sum_dim_intlist([0].as_slice(), false, Kind::Float)
                .log_softmax(-1, Kind::Float),
        }
    }
}

/// Mean length-normalised log-likelihood of each candidate continuation of `prompt`
/// under every model (raw distributions, no processors): the `rerank` score.
pub fn rerank_scores(models: &Ensemble, prompt: &[i64], candidates: &[Vec<i64>]) -> Vec<f64> {
    candidates
        .iter()
        .map(|cand| {
            if cand.is_empty() {
                return f64::NEG_INFINITY;
            }
            let seq: Vec<i64> = prompt.iter().chain(cand).copied().collect();
            let total: f64 = models
                .models
                .iter()
                .zip(&models.weights)
                .map(|(m, &w)| w * sequence_logprob(m, &seq, prompt.len()) / cand.len() as f64)
                .sum();
            total
        })
        .collect()
}

/// Sum of log p(seq[i] | seq[..i]) over the positions from `start` on.
pub fn sequence_logprob(model: &Gpt2, seq: &[i64], start: usize) -> f64 {
    let device = model.device();
    let n = seq.len() as i64;
    let ids = Tensor::from_slice(seq).view([1, n]).to_device(device);
    let mut cache = model.new_cache(1, n);
    let logp = model
        .forward(&ids, &mut cache)
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float); // (1, n, V)
    let targets = Tensor::from_slice(&seq[start..])
        .to_device(device)
        .view([1, -1, 1]);
    let picked = logp
        .narrow(1, start as i64 - 1, n - start as i64)
        .gather(2, &targets, false);
    f64::try_from(picked.sum(Kind::Float)).unwrap_or(f64::NEG_INFINITY)
}

/// Minimum-Bayes-risk scores: each candidate's mean similarity to the others, where
/// similarity is the mean over n = 1..4 of the F1 overlap of token n-gram multisets
/// (a smoothed BLEU-like agreement). The candidate most like the rest wins: the
/// principled form of majority voting.
pub fn mbr_scores(candidates: &[Vec<i64>]) -> Vec<f64> {
    let n = candidates.len();
    if n < 2 {
        return vec![1.0; n];
    }
    (0..n)
        .map(|i| {
            let s: f64 = (0..n)
                .filter(|&j| j != i)
                .map(|j| similarity(&candidates[i], &candidates[j]))
                .sum();
            s / (n - 1) as f64
        })
        .collect()
}

fn similarity(a: &[i64], b: &[i64]) -> f64 {
    use std::collections::HashMap;
    let grams = |s: &[i64], k: usize| -> HashMap<Vec<i64>, usize> {
        let mut m = HashMap::new();
        for w in s.windows(k) {
            *m.entry(w.to_vec()).or_insert(0) += 1;
        }
        m
    };
    // Orders that neither sequence is long enough for are left out of the mean.
    let (mut total, mut orders) = (0.0, 0);
    for k in 1..=4 {
        let (ga, gb) = (grams(a, k), grams(b, k));
        let (na, nb): (usize, usize) = (ga.values().sum(), gb.values().sum());
        if na + nb == 0 {
            continue;
        }
        let common: usize = ga
            .iter()
            .map(|(g, c)| (*c).min(*gb.get(g).unwrap_or(&0)))
            .sum();
        total += 2.0 * common as f64 / (na + nb) as f64;
        orders += 1;
    }
    if orders == 0 {
        return 1.0; // two empty sequences agree
    }
    total / orders as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbr_prefers_the_consensus() {
        let c = vec![
            vec![1, 2, 3, 4],
            vec![1, 2, 3, 5],
            vec![9, 8, 7, 6],
            vec![1, 2, 3, 4],
        ];
        let s = mbr_scores(&c);
        let best = (0..4).max_by(|&i, &j| s[i].total_cmp(&s[j])).unwrap();
        assert!(best == 0 || best == 3, "{s:?}");
        assert!(s[2] < s[1]);
        assert_eq!(similarity(&[1, 2, 3], &[1, 2, 3]), 1.0);
        assert_eq!(similarity(&[1, 2], &[3, 4]), 0.0);
    }
}

/// `rerank` and `vote`: pools every model's candidates for each prompt (identical token
/// sequences once), scores them (`rerank_scores`, or `mbr_scores` when `vote`), and
/// returns the best `n` per prompt, best first, each with its pooled score.
pub fn select_candidates(
    models: &Ensemble,
    prompts: &[Vec<i64>],
    runs: Vec<Vec<Vec<crate::sequence::Generated>>>,
    vote: bool,
    n: usize,
) -> Vec<Vec<crate::sequence::Generated>> {
    let mut per_prompt: Vec<Vec<crate::sequence::Generated>> = vec![Vec::new(); prompts.len()];
    for run in runs {
        for (i, seqs) in run.into_iter().enumerate() {
            for g in seqs {
                if !per_prompt[i].iter().any(|h| h.tokens == g.tokens) {
                    per_prompt[i].push(g);
                }
            }
        }
    }
    per_prompt
        .into_iter()
        .zip(prompts)
        .map(|(mut pool, prompt)| {
            let tokens: Vec<Vec<i64>> = pool.iter().map(|g| g.tokens.clone()).collect();
            let scores = if vote {
                mbr_scores(&tokens)
            } else {
                rerank_scores(models, prompt, &tokens)
            };
            for (g, s) in pool.iter_mut().zip(scores) {
                g.score = s;
            }
            pool.sort_by(|a, b| b.score.total_cmp(&a.score));
            pool.truncate(n);
            pool
        })
        .collect()
}
