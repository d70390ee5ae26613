//! Magnitude pruning of the linear (Conv1D) weights: the smallest |w| become zero,
//! per tensor (`layer`) or with one threshold over all of them (`global`), freely
//! (`unstructured`) or as 2 of every 4 consecutive input rows per output column (`2:4`,
//! the N:M pattern of NVIDIA's sparse tensor cores; Mishra et al. 2021, arXiv 2104.08378).
use infer::{Error, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Layer,
    Global,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Unstructured,
    TwoFour,
}

#[derive(Debug, Clone)]
pub struct Prune {
    /// Fraction of weights to zero, in [0, 1); 0.5 for 2:4.
    pub sparsity: f64,
    pub scope: Scope,
    pub pattern: Pattern,
}

impl Prune {
    /// Validates the flags' values.
    pub fn new(sparsity: Option<f64>, scope: &str, pattern: &str) -> Result<Option<Self>> {
        let scope = match scope {
            "layer" => Scope::Layer,
            "global" => Scope::Global,
            s => {
                return Err(Error::Input(format!(
                    "--prune-scope {s:?}: expected layer or global"
                )))
            }
        };
        let pattern = match pattern {
            "unstructured" => Pattern::Unstructured,
            "2:4" => Pattern::TwoFour,
            p => {
                return Err(Error::Input(format!(
                    "--prune-pattern {p:?}: expected unstructured or 2:4"
                )))
            }
        };
        if let Some(s) = sparsity {
            if !(0.0..1.0).contains(&s) || s.is_nan() {
                return Err(Error::Input(format!(
                    "--prune-sparsity {s}: must lie in [0, 1)"
                )));
            }
        }
        match (pattern, sparsity) {
            (Pattern::TwoFour, Some(s)) if s != 0.5 => Err(Error::Input(format!(
                "--prune-pattern 2:4 zeroes exactly half the weights; --prune-sparsity {s} \
                 contradicts it (leave it out or give 0.5)"
            ))),
            (Pattern::TwoFour, _) => Ok(Some(Self {
                sparsity: 0.5,
                scope,
                pattern,
            })),
            (_, None) | (_, Some(0.0)) => Ok(None),
            (_, Some(s)) => Ok(Some(Self {
                sparsity: s,
                scope,
                pattern,
            })),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "sparsity": self.sparsity,
            "scope": match self.scope { Scope::Layer => "layer", Scope::Global => "global" },
            "pattern": match self.pattern { Pattern::Unstructured => "unstructured", Pattern::TwoFour => "2:4" },
        })
    }
}

/// Prunes the (in, out) weights in place.
pub fn prune(weights: &mut [(String, Tensor)], p: &Prune) -> Result<()> {
    match (p.pattern, p.scope) {
        (Pattern::TwoFour, _) => {
            for (name, w) in weights.iter_mut() {
                *w = two_four(name, w)?;
            }
        }
        (Pattern::Unstructured, Scope::Layer) => {
            for (_, w) in weights.iter_mut() {
                *w = smallest_zeroed(w, p.sparsity);
            }
        }
        (Pattern::Unstructured, Scope::Global) => {
            let all = Tensor::cat(
                &weights
                    .iter()
                    .map(|(_, w)| w.abs().reshape([-1]))
                    .collect::<Vec<_>>(),
                0,
            );
            let k = (p.sparsity * all.numel() as f64).floor() as i64;
            if k > 0 {
                let thr = all.kthvalue(k, 0, false).0.double_value(&[]);
                for (_, w) in weights.iter_mut() {
                    *w = w.where_self(&w.abs().gt(thr), &w.zeros_like());
                }
            }
        }
    }
    Ok(())
}

/// Zeroes exactly floor(s · numel) entries of smallest magnitude.
fn smallest_zeroed(w: &Tensor, s: f64) -> Tensor {
    let k = (s * w.numel() as f64).floor() as i64;
    if k == 0 {
        return w.shallow_clone();
    }
    let flat = w.reshape([-1]);
    let idx = flat.abs().topk(k, 0, false, false).1;
    flat.index_fill(0, &idx, 0.0).reshape(w.size())
}

/// Keeps the 2 largest |w| of every 4 consecutive input rows, per output column.
fn two_four(name: &str, w: &Tensor) -> Result<Tensor> {
    let (n_in, n_out) = w.size2().map_err(|e| Error::Input(e.to_string()))?;
    if n_in % 4 != 0 {
        return Err(Error::Input(format!(
            "--prune-pattern 2:4: `{name}` has {n_in} input rows, not a multiple of 4"
        )));
    }
    let g = w.reshape([n_in / 4, 4, n_out]);
    let idx = g.abs().topk(2, 1, false, false).1; // the two smallest of each group
    let mask = Tensor::ones_like(&g).scatter_value(1, &idx, 0.0);
    Ok((g * mask).reshape([n_in, n_out]).to_kind(Kind::Float))
}
