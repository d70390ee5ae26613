//! AdamW as PyTorch's `torch.optim.AdamW` computes it (single-tensor path, no amsgrad):
//! decoupled weight decay `p ← p·(1 − lr·wd)`, `m ← lerp(m, g, 1 − β₁)`,
//! `v ← β₂·v + (1 − β₂)·g²`, `p ← p − lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + ε)`
//! (Loshchilov & Hutter 2019). Its state is plain tensors, saved with checkpoints.
//! Also `clip_grad_norm`, as `torch.nn.utils.clip_grad_norm_`.
use anyhow::{bail, Result};
use std::collections::HashMap;
use tch::Tensor;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// transformers' TrainingArguments defaults.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates taken (PyTorch's `state["step"]`, shared by every tensor here).
    pub step: i64,
    names: Vec<String>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Weight decay applies to tensors of two or more dimensions only (not biases or
    /// layer norms), as transformers' Trainer groups them.
    decay: Vec<bool>,
}

impl AdamW {
    pub fn new(params: &[(String, Tensor)], config: AdamWConfig) -> Self {
        let zeros = || params.iter().map(|(_, p)| p.zeros_like()).collect();
        Self {
            config,
            step: 0,
            names: params.iter().map(|(n, _)| n.clone()).collect(),
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            decay: params.iter().map(|(_, p)| p.dim() >= 2).collect(),
        }
    }

    /// One update of `params` (the same list, in the same order, as at `new`) from
    /// their `.grad()`, at learning rate `lr`.
    pub fn step(&mut self, params: &[(String, Tensor)], lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.config;
        let t = self.step as f64;
        let bias_correction1 = 1.0 - c.beta1.powf(t);
        let bias_correction2 = 1.0 - c.beta2.powf(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        for (i, (_, p)) in params.iter().enumerate() {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let mut p = p.shallow_clone();
            if self.decay[i] && c.weight_decay != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = self.exp_avg[i].lerp_(&g, 1.0 - c.beta1);
            let _ = self.exp_avg_sq[i]
                .g_mul_scalar_(c.beta2)
                .addcmul_(&(&g * (1.0 - c.beta2)), &g);
            let denom = (self.exp_avg_sq[i].sqrt() / bias_correction2_sqrt) + c.eps;
            let _ = p.g_add_(&(self.exp_avg[i].divide(&denom) * (-step_size)));
        }
    }

    /// The state as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`) plus the step.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.names.len() + 1);
        for (i, n) in self.names.iter().enumerate() {
            out.push((format!("exp_avg.{n}"), self.exp_avg[i].shallow_clone()));
            out.push((
                format!("exp_avg_sq.{n}"),
                self.exp_avg_sq[i].shallow_clone(),
            ));
        }
        out.push(("step".into(), Tensor::from_slice(&[self.step])));
        out
    }

    /// Restores the state written by `state_tensors`; every tensor must be present with
    /// its parameter's shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (i, n) in self.names.iter().enumerate() {
            for (prefix, slot) in [
                ("exp_avg", &mut self.exp_avg[i]),
                ("exp_avg_sq", &mut self.exp_avg_sq[i]),
            ] {
                let key = format!("{prefix}.{n}");
                let t = state
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("optimizer state lacks `{key}`"))?;
                if t.size() != slot.size() {
                    bail!(
                        "optimizer state `{key}` has shape {:?}, expected {:?}",
                        t.size(),
                        slot.size()
                    );
                }
                slot.copy_(t);
            }
        }
        let step = state
            .get("step")
            .ok_or_else(|| anyhow::anyhow!("optimizer state lacks `step`"))?;
        self.step = step.int64_value(&[0]);
        Ok(())
    }
}

/// The total 2-norm of the gradients, computed as `clip_grad_norm_` does (norm of the
/// per-tensor norms); when `max_norm > 0` the gradients are scaled by
/// `min(1, max_norm / (norm + 1e-6))`. Returns the norm before clipping.
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> f64 {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params
        .iter()
        .map(|(_, p)| p.grad())
        .filter(Tensor::defined)
        .collect();
    if grads.is_empty() {
        return 0.0;
    }
    let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
    let total = Tensor::stack(&norms, 0).norm();
    if max_norm > 0.0 {
        let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
        for mut g in grads {
            let _ = g.g_mul_(&coef);
        }
    }
    total.double_value(&[])
}

/// Zeroes every gradient.
pub fn zero_grad(params: &[(String, Tensor)]) {
    for (_, p) in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}
