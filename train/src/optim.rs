//! AdamW as PyTorch's `torch.optim.AdamW` computes it (single-tensor path, no amsgrad):
//! decoupled weight decay `p ← p·(1 − lr·wd)`, `m ← lerp(m, g, 1 − β₁)`,
//! `v ← β₂·v + (1 − β₂)·g²`, `p ← p − lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + ε)`
//! (Loshchilov & Hutter 2019). Its state is plain tensors, saved with checkpoints.
//! Also gradient clipping as `torch.nn.utils.clip_grad_norm_` computes it.
use anyhow::{bail, Result};
use std::collections::HashMap;
use tch::{Device, Tensor};

use crate::fused::{fused_adamw, AdamWScalars};

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
    /// their `.grad()` times `grad_scale` (the clipping coefficient, see
    /// `clip_coefficient`), at learning rate `lr`. Returns the name of the first tensor
    /// the update left holding a NaN or an infinity (an overflowing step size), found in
    /// the same pass on the CPU.
    pub fn step(
        &mut self,
        params: &[(String, Tensor)],
        lr: f64,
        grad_scale: f64,
    ) -> Option<String> {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.config;
        let k = self.coefficients(lr, grad_scale);
        let mut non_finite = None;
        for (i, (name, p)) in params.iter().enumerate() {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let decay = self.decay[i] && c.weight_decay != 0.0;
            let (m, v) = (&self.exp_avg[i], &self.exp_avg_sq[i]);
            let finite = fused_cpu_step(p, &g, m, v, &k, decay).unwrap_or_else(|| {
                tensor_step(p, &g, m, v, &k, decay);
                p.isfinite().all().int64_value(&[]) == 1
            });
            if !finite && non_finite.is_none() {
                non_finite = Some(name.clone());
            }
        }
        non_finite
    }

    /// The scalars of update `self.step`.
    fn coefficients(&self, lr: f64, grad_scale: f64) -> Coefficients {
        let c = self.config;
        let t = self.step as f64;
        let bias_correction1 = 1.0 - c.beta1.powf(t);
        let bias_correction2 = 1.0 - c.beta2.powf(t);
        Coefficients {
            decay: 1.0 - lr * c.weight_decay,
            one_minus_beta1: 1.0 - c.beta1,
            beta2: c.beta2,
            one_minus_beta2: 1.0 - c.beta2,
            bias_correction2_sqrt: bias_correction2.sqrt(),
            eps: c.eps,
            neg_step_size: -(lr / bias_correction1),
            grad_scale,
        }
    }

    /// The same update through libtorch's fused multi-tensor kernel, as
    /// `torch.optim.AdamW(fused=True)` (transformers' `adamw_torch_fused`) makes it: the
    /// gradients scaled in place by `coefficient` (a 0-d tensor on their device, from
    /// `clip_coefficient_tensor`) where one is given, as `clip_grad_norm_` scales them,
    /// then one kernel call per weight-decay group. Nothing waits on the device but the
    /// check that ends it: whether the update left a NaN or an infinity, one reduction
    /// read back once. Returns that tensor's name, as `step` does.
    pub fn step_fused(
        &mut self,
        params: &[(String, Tensor)],
        lr: f64,
        coefficient: Option<&Tensor>,
    ) -> Result<Option<String>> {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.config;
        let mut updated = Vec::new();
        for decay in [true, false] {
            let (mut p, mut g, mut m, mut v) = (vec![], vec![], vec![], vec![]);
            for (i, (_, param)) in params.iter().enumerate() {
                let grad = param.grad();
                if !grad.defined() || (self.decay[i] && c.weight_decay != 0.0) != decay {
                    continue;
                }
                if let Some(k) = coefficient {
                    let _ = grad.shallow_clone().g_mul_(k);
                }
                updated.push(i);
                let (m_i, v_i) = (&self.exp_avg[i], &self.exp_avg_sq[i]);
                if ![param, &grad, m_i, v_i].iter().all(|t| t.is_contiguous()) {
                    // The kernel takes contiguous tensors only: this one goes op by op.
                    tensor_step(param, &grad, m_i, v_i, &self.coefficients(lr, 1.0), decay);
                    continue;
                }
                p.push(param.shallow_clone());
                g.push(grad);
                m.push(self.exp_avg[i].shallow_clone());
                v.push(self.exp_avg_sq[i].shallow_clone());
            }
            let k = AdamWScalars {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                weight_decay: if decay { c.weight_decay } else { 0.0 },
                eps: c.eps,
            };
            fused_adamw(&p, &g, &m, &v, self.step, &k)?;
        }
        if updated.is_empty() {
            return Ok(None);
        }
        let finite: Vec<Tensor> = updated
            .iter()
            .map(|&i| params[i].1.isfinite().all())
            .collect();
        let finite = Vec::<bool>::try_from(Tensor::stack(&finite, 0).to_device(Device::Cpu))?;
        Ok(updated
            .iter()
            .zip(finite)
            .find(|(_, ok)| !ok)
            .map(|(&i, _)| params[i].0.clone()))
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
        if step.numel() != 1 {
            anyhow::bail!(
                "optimizer state `step` holds {} values, not 1",
                step.numel()
            );
        }
        self.step = step.reshape([1]).int64_value(&[0]);
        Ok(())
    }
}

/// The scalars of one update, as PyTorch computes them (f64, used as f32 on f32 data).
struct Coefficients {
    decay: f64,
    one_minus_beta1: f64,
    beta2: f64,
    one_minus_beta2: f64,
    bias_correction2_sqrt: f64,
    eps: f64,
    neg_step_size: f64,
    grad_scale: f64,
}

/// The update through libtorch ops, PyTorch's sequence (any device, any float kind).
fn tensor_step(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, k: &Coefficients, decay: bool) {
    let (mut p, mut m, mut v) = (p.shallow_clone(), m.shallow_clone(), v.shallow_clone());
    let g = if k.grad_scale != 1.0 {
        g * k.grad_scale
    } else {
        g.shallow_clone()
    };
    if decay {
        let _ = p.g_mul_scalar_(k.decay);
    }
    let _ = m.lerp_(&g, k.one_minus_beta1);
    let tmp = &g * k.one_minus_beta2;
    let _ = v.g_mul_scalar_(k.beta2).addcmul_(&tmp, &g);
    let mut denom = v.sqrt();
    let _ = denom
        .g_div_scalar_(k.bias_correction2_sqrt)
        .g_add_scalar_(k.eps);
    let mut update = m.div_out(&tmp, &denom); // m / denom, written into tmp
    let _ = update.g_mul_scalar_(k.neg_step_size);
    let _ = p.g_add_(&update);
}

/// The same update in one pass over contiguous f32 CPU tensors, split over threads:
/// reads p, g, m, v once and writes p, m, v once (libtorch's op-by-op sequence makes
/// about five times as many passes). Element for element the arithmetic is PyTorch's:
/// f32 values, scalars rounded to f32, the same operation order. Returns false when
/// the tensors are not of that kind (the caller falls back to `tensor_step`).
fn fused_cpu_step(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &Coefficients,
    decay: bool,
) -> Option<bool> {
    let ok = |t: &Tensor| {
        t.device() == tch::Device::Cpu && t.kind() == tch::Kind::Float && t.is_contiguous()
    };
    if !(ok(p) && ok(g) && ok(m) && ok(v)) {
        return None;
    }
    let n = p.numel();
    if g.numel() != n || m.numel() != n || v.numel() != n {
        return None;
    }
    // SAFETY: four distinct contiguous f32 CPU buffers of n elements each (p's grad, the
    // optimizer's own m and v are separate allocations from p); nothing else touches
    // them while this runs (no_grad, single trainer thread).
    let (pp, gp, mp, vp) = unsafe {
        (
            std::slice::from_raw_parts_mut(p.data_ptr() as *mut f32, n),
            std::slice::from_raw_parts(g.data_ptr() as *const f32, n),
            std::slice::from_raw_parts_mut(m.data_ptr() as *mut f32, n),
            std::slice::from_raw_parts_mut(v.data_ptr() as *mut f32, n),
        )
    };
    let f = |x: f64| x as f32;
    let (wd, b1c, b2, b2c, bc2, eps, neg_lr, scale) = (
        f(k.decay),
        f(k.one_minus_beta1),
        f(k.beta2),
        f(k.one_minus_beta2),
        f(k.bias_correction2_sqrt),
        f(k.eps),
        f(k.neg_step_size),
        f(k.grad_scale),
    );
    let scaled = k.grad_scale != 1.0;
    // Also whether every updated value is finite, in the same pass.
    let run = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        let mut finite = true;
        for i in 0..p.len() {
            let gi = if scaled { g[i] * scale } else { g[i] };
            let mut pi = p[i];
            if decay {
                pi *= wd;
            }
            // lerp with weight < 0.5: m + w·(g − m), as ATen computes it.
            let mi = m[i] + b1c * (gi - m[i]);
            let vi = v[i] * b2 + (b2c * gi) * gi;
            let denom = vi.sqrt() / bc2 + eps;
            p[i] = pi + neg_lr * (mi / denom);
            m[i] = mi;
            v[i] = vi;
            finite &= p[i].is_finite();
        }
        finite
    };
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    const MIN_CHUNK: usize = 1 << 16;
    if threads < 2 || n < 2 * MIN_CHUNK {
        return Some(run(pp, gp, mp, vp));
    }
    let chunk = n.div_ceil(threads).max(MIN_CHUNK);
    std::thread::scope(|s| {
        let parts: Vec<_> = pp
            .chunks_mut(chunk)
            .zip(gp.chunks(chunk))
            .zip(mp.chunks_mut(chunk))
            .zip(vp.chunks_mut(chunk))
            .map(|(((p, g), m), v)| s.spawn(move || run(p, g, m, v)))
            .collect();
        // A panic in a part is re-raised here, as the scope would.
        Some(parts.into_iter().all(|h| h.join().unwrap()))
    })
}

/// The total 2-norm of the gradients as `clip_grad_norm_` computes it (the norm of the
/// per-tensor norms, in the gradients' kind); `None` when no tensor has a gradient.
pub fn total_grad_norm(params: &[(String, Tensor)]) -> Option<Tensor> {
    let _guard = tch::no_grad_guard();
    let norms: Vec<Tensor> = params
        .iter()
        .map(|(_, p)| p.grad())
        .filter(Tensor::defined)
        .map(|g| g.norm())
        .collect();
    (!norms.is_empty()).then(|| Tensor::stack(&norms, 0).norm())
}

/// `clip_grad_norm_`'s factor: min(1, max_norm / (norm + 1e-6)), computed in the norm's
/// kind; 1 when `max_norm` is 0 (no clipping).
pub fn clip_coefficient(total_norm: &Tensor, max_norm: f64) -> f64 {
    clip_coefficient_tensor(total_norm, max_norm).map_or(1.0, |k| k.double_value(&[]))
}

/// The same factor as a 0-d tensor on the norm's device, read by nobody on the host;
/// `None` when `max_norm` is 0 (no clipping).
pub fn clip_coefficient_tensor(total_norm: &Tensor, max_norm: f64) -> Option<Tensor> {
    (max_norm > 0.0).then(|| ((total_norm + 1e-6).reciprocal() * max_norm).clamp_max(1.0))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass CPU update and libtorch's op-by-op sequence agree to f32 rounding
    /// (libtorch's vectorised kernels may contract or reorder a multiply-add).
    #[test]
    fn fused_step_equals_tensor_ops() {
        tch::manual_seed(0);
        let n = 300_000;
        let mk = |s: f64| Tensor::randn([n], (tch::Kind::Float, tch::Device::Cpu)) * s;
        let (p, g, m) = (mk(0.1), mk(0.01), mk(0.001));
        let v = mk(1e-4).square();
        let k = Coefficients {
            decay: 1.0 - 1e-3 * 0.1,
            one_minus_beta1: 0.1,
            beta2: 0.999,
            one_minus_beta2: 1.0 - 0.999,
            bias_correction2_sqrt: (1.0f64 - 0.999f64.powi(3)).sqrt(),
            eps: 1e-8,
            neg_step_size: -1e-3 / (1.0 - 0.9f64.powi(3)),
            grad_scale: 0.37,
        };
        let (p1, m1, v1) = (p.copy(), m.copy(), v.copy());
        let (p2, m2, v2) = (p.copy(), m.copy(), v.copy());
        assert_eq!(fused_cpu_step(&p1, &g, &m1, &v1, &k, true), Some(true));
        tensor_step(&p2, &g, &m2, &v2, &k, true);
        for (a, b) in [(&p1, &p2), (&m1, &m2), (&v1, &v2)] {
            let rel = (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]);
            // A few f32 ulps of the tensor's scale.
            assert!(rel < 1e-6, "difference {rel} of the largest value");
        }
    }
}
