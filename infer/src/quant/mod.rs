//! The int8 artifact format that `gpt2kit quantize` writes and the engine runs, and the
//! int8 linear layers that run it.
//!
//! Format (documented in the README's "Artifact format"): `config.json` carries a
//! `quantization_config` with `quant_method: "gpt2kit"`; in `model.safetensors`, every
//! quantized weight `<name>.weight` is I8 with the float tensor's shape and
//! `<name>.weight_scale` is F32, one scale per output channel: (out,) for a Conv1D
//! weight (in, out), (V,) for `wte` (V, E), whose rows are the tied head's output
//! channels. Symmetric: w ≈ q · scale, q in [-127, 127]. With outlier columns
//! (LLM.int8(), Dettmers et al. 2022, arXiv 2208.07339) `<name>.outlier_columns` (I64,
//! (k,)) lists the input channels that bypass activation quantization: their products
//! run in float against the dequantized weight rows.
//!
//! `int8-dynamic` (W8A8) quantizes each token's activations on the fly (one scale per
//! row, absmax / 127) and multiplies on libtorch's int8 GEMM (`_int_mm`, int32
//! accumulation). SmoothQuant's smoothing (Xiao et al. 2022, arXiv 2211.10438) needs
//! nothing at run time: `quantize` folds it into the LayerNorm before `c_attn`/`c_fc`.
//!
//! One module for the format: names and config here, the arithmetic and the stored
//! tensors in `codec` (used by the `quantize` crate to write and by the engine to read),
//! the runtime layer in `linear` (the loader, `load::int8`, builds an artifact's layers).
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod codec;
mod linear;
mod observe;

pub(crate) use codec::{check_int8_min, held_min, read_int8_checking};
pub use codec::{
    dequantize_artifact, encode_weight, quantize_per_channel, quantize_per_token, quantize_row,
    read_int8, read_outliers, QuantRows,
};
pub use linear::Int8Linear;
pub use observe::InputObserver;

/// `quantization_config.quant_method` of gpt2kit artifacts.
pub const QUANT_METHOD: &str = "gpt2kit";
/// Suffix of the per-output-channel scale beside an int8 `<name>.weight`.
pub const SCALE_SUFFIX: &str = "_scale";
/// `<layer>.outlier_columns`: input channels kept in float (int8-dynamic).
pub const OUTLIER_SUFFIX: &str = "outlier_columns";
pub const GRANULARITY: &str = "per-output-channel";
/// The `config.json` field that holds the `QuantizationConfig`.
pub const CONFIG_KEY: &str = "quantization_config";

/// The scale tensor beside the int8 weight `weight`: `<weight>_scale`.
pub fn scale_name(weight: &str) -> String {
    format!("{weight}{SCALE_SUFFIX}")
}

/// The outlier columns of the layer `layer`: `<layer>.outlier_columns`.
pub fn outlier_name(layer: &str) -> String {
    format!("{layer}.{OUTLIER_SUFFIX}")
}

/// Whether `name` is a scale or an outlier list stored beside a weight.
pub fn is_auxiliary(name: &str) -> bool {
    name.ends_with(SCALE_SUFFIX) || name.ends_with(OUTLIER_SUFFIX)
}

/// Whether a stored weight's rows are its output channels, one scale per row: `wte`
/// (V, E), whose rows are the tied head's outputs, and an untied `lm_head` (V, E).
/// Conv1D weights are stored (in, out), one scale per column.
pub fn rows_are_out(name: &str) -> bool {
    let name = name.strip_prefix("transformer.").unwrap_or(name);
    name == "wte.weight" || name == "lm_head.weight"
}

/// How an artifact's weights are stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    /// Int8 weights, float activations.
    #[serde(rename = "int8-weight")]
    Int8Weight,
    /// Int8 weights, per-token int8 activations, int8 GEMM.
    #[serde(rename = "int8-dynamic")]
    Int8Dynamic,
    /// Float weights (pruning or layer dropping only).
    #[serde(rename = "none")]
    None,
}

impl Method {
    pub const NAMES: &'static [&'static str] = &["int8-weight", "int8-dynamic", "none"];

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "int8-weight" => Self::Int8Weight,
            "int8-dynamic" => Self::Int8Dynamic,
            "none" => Self::None,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Int8Weight => "int8-weight",
            Self::Int8Dynamic => "int8-dynamic",
            Self::None => "none",
        }
    }

    pub fn is_int8(self) -> bool {
        self != Self::None
    }
}

/// `config.json`'s `quantization_config` for a gpt2kit artifact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: String,
    pub method: Method,
    /// 8 for the int8 methods, the float width otherwise.
    pub bits: u32,
    pub granularity: String,
    /// Whether `wte` (and so the tied head) is int8.
    pub quantize_embeddings: bool,
    /// Zeros over all pruned linear weights (0 when not pruned).
    #[serde(default)]
    pub sparsity: f64,
    #[serde(default)]
    pub prune: Option<serde_json::Value>,
    /// Source layer indices dropped, and kept (renumbered 0.. in this artifact).
    #[serde(default)]
    pub dropped_layers: Vec<i64>,
    #[serde(default)]
    pub kept_layers: Vec<i64>,
    /// SHA-256 of the source checkpoint's weight files, in order.
    #[serde(default)]
    pub source_sha256: String,
    #[serde(default)]
    pub smooth_alpha: Option<f64>,
    #[serde(default)]
    pub outlier_threshold: Option<f64>,
    /// Fields a later version may add, kept on a round trip.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl QuantizationConfig {
    /// What `method` fixes (`quant_method`, `bits`, `granularity`); nothing pruned,
    /// dropped or calibrated.
    pub fn new(method: Method, quantize_embeddings: bool) -> Self {
        Self {
            quant_method: QUANT_METHOD.into(),
            method,
            bits: if method.is_int8() { 8 } else { 32 },
            granularity: GRANULARITY.into(),
            quantize_embeddings,
            sparsity: 0.0,
            prune: None,
            dropped_layers: Vec::new(),
            kept_layers: Vec::new(),
            source_sha256: String::new(),
            smooth_alpha: None,
            outlier_threshold: None,
            extra: Default::default(),
        }
    }

    /// Records itself in `config`'s `quantization_config`.
    pub fn insert_into(&self, config: &mut crate::Gpt2Config) -> Result<()> {
        let value = serde_json::to_value(self).map_err(|e| Error::Input(e.to_string()))?;
        config.extra.insert(CONFIG_KEY.into(), value);
        Ok(())
    }

    /// The `quantization_config` of a config's extra fields, validated against the
    /// config; `None` for a plain float model folder.
    pub fn from_config(config: &crate::Gpt2Config, path: &Path) -> Result<Option<Self>> {
        let Some(v) = config.extra.get(CONFIG_KEY) else {
            return Ok(None);
        };
        let bad = |reason: String| Error::Config {
            path: path.into(),
            reason: format!("quantization_config: {reason}"),
        };
        let q: Self = serde_json::from_value(v.clone()).map_err(|e| bad(e.to_string()))?;
        if q.quant_method != QUANT_METHOD {
            return Err(bad(format!(
                "quant_method {:?} is not gpt2kit's ({QUANT_METHOD:?})",
                q.quant_method
            )));
        }
        if q.method.is_int8() && q.bits != 8 {
            return Err(bad(format!(
                "bits {} with method {}",
                q.bits,
                q.method.name()
            )));
        }
        if q.granularity != GRANULARITY {
            return Err(bad(format!(
                "granularity {:?}; supported: {GRANULARITY:?}",
                q.granularity
            )));
        }
        if !(0.0..1.0).contains(&q.sparsity) {
            return Err(bad(format!("sparsity {} outside [0, 1)", q.sparsity)));
        }
        if !q.kept_layers.is_empty() && q.kept_layers.len() as i64 != config.n_layer {
            return Err(bad(format!(
                "kept_layers lists {} layers but n_layer is {}",
                q.kept_layers.len(),
                config.n_layer
            )));
        }
        if q.quantize_embeddings && !q.method.is_int8() {
            return Err(bad("quantize_embeddings with method none".into()));
        }
        Ok(Some(q))
    }
}
