//! SmoothQuant's smoothing (Xiao et al. 2022, arXiv 2211.10438, eq. 4:
//! s_j = max|X_j|^α / max|W_j|^(1-α)); the int8 rounding itself is the format's
//! (`infer::quant`).
use std::collections::BTreeMap;

use tch::Tensor;

pub use infer::quant::quantize_per_channel;

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
