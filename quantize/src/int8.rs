//! Symmetric int8 per-output-channel weight quantization and SmoothQuant's smoothing
//! (Xiao et al. 2022, arXiv 2211.10438, eq. 4: s_j = max|X_j|^α / max|W_j|^(1-α)).
use std::collections::BTreeMap;

use tch::{Kind, Tensor};

/// q = round(w / s) in [-127, 127], s = max|w| / 127 over `dim` (the reduced dimension:
/// 0 for a Conv1D weight (in, out) → scales (out,), 1 for embeddings (V, E) → (V,)).
/// An all-zero channel gets scale 0 and zeros.
pub fn quantize_per_channel(w: &Tensor, dim: i64) -> (Tensor, Tensor) {
    let w = w.to_kind(Kind::Float);
    let scale = w.abs().amax([dim], true) / 127.0;
    let safe = scale.clamp_min(f32::MIN_POSITIVE as f64);
    let q = (&w / &safe)
        .round()
        .clamp(-127.0, 127.0)
        .to_kind(Kind::Int8);
    (q, scale.reshape([-1]).contiguous())
}

/// The float tensor `q` stands for: `q * scale` along `dim`'s other axis.
pub fn dequantize_per_channel(q: &Tensor, scale: &Tensor, dim: i64) -> Tensor {
    q.to_kind(Kind::Float) * scale.unsqueeze(dim)
}

/// Smoothing factors (in,) of a Conv1D weight (in, out) from its inputs' per-channel
/// max |x| (in,): activations are divided by s, weight rows multiplied by it.
pub fn smooth_scales(x_max: &Tensor, w: &Tensor, alpha: f64) -> Tensor {
    let w_max = w.abs().amax([1], false).clamp_min(1e-5); // (in,)
    let x_max = x_max.clamp_min(1e-5);
    (x_max.pow_tensor_scalar(alpha) / w_max.pow_tensor_scalar(1.0 - alpha)).clamp(1e-5, 1e5)
}

/// Folds 1/s into the LayerNorm `ln` feeding the layer and s into the weight's rows:
/// LN(x)·γ/s + β/s, then (·s)·W: the product is unchanged in exact arithmetic.
pub fn fold_smoothing(map: &mut BTreeMap<String, Tensor>, ln: &str, weight: &str, s: &Tensor) {
    for p in ["weight", "bias"] {
        let n = format!("{ln}.{p}");
        let t = &map[&n] / s;
        map.insert(n, t);
    }
    let w = &map[weight] * s.unsqueeze(1);
    map.insert(weight.to_string(), w);
}
