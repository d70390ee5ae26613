//! GPT-2's `config.json`, with Hugging Face's field names and defaults
//! (transformers `GPT2Config`), validated before any weight is read.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `eos_token_id` / `bos_token_id` may be one id or a list in Hugging Face configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gpt2Config {
    #[serde(default = "d::vocab_size")]
    pub vocab_size: i64,
    #[serde(default = "d::n_positions")]
    pub n_positions: i64,
    #[serde(default = "d::n_embd")]
    pub n_embd: i64,
    #[serde(default = "d::n_layer")]
    pub n_layer: i64,
    #[serde(default = "d::n_head")]
    pub n_head: i64,
    /// Width of the MLP; `None` means 4 × n_embd.
    #[serde(default)]
    pub n_inner: Option<i64>,
    #[serde(default = "d::activation")]
    pub activation_function: String,
    #[serde(default = "d::eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "d::yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    #[serde(default = "d::yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "d::token")]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default = "d::token")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(default = "d::model_type")]
    pub model_type: String,
    /// Every other field (dropouts, `architectures`, `torch_dtype`, ...), kept so that a
    /// config read and written again loses nothing.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

mod d {
    use super::TokenIds;
    pub fn vocab_size() -> i64 {
        50257
    }
    pub fn n_positions() -> i64 {
        1024
    }
    pub fn n_embd() -> i64 {
        768
    }
    pub fn n_layer() -> i64 {
        12
    }
    pub fn n_head() -> i64 {
        12
    }
    pub fn activation() -> String {
        "gelu_new".into()
    }
    pub fn eps() -> f64 {
        1e-5
    }
    pub fn yes() -> bool {
        true
    }
    pub fn token() -> Option<TokenIds> {
        Some(TokenIds::One(50256))
    }
    pub fn model_type() -> String {
        "gpt2".into()
    }
}

/// The MLP nonlinearity, by its Hugging Face `ACT2FN` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`, `gelu_accurate`: the tanh form.
    GeluTanh,
    /// `gelu`, `gelu_python`: the exact erf form.
    Gelu,
    QuickGelu,
    Relu,
    Relu6,
    Silu,
    Tanh,
    Sigmoid,
    Mish,
    LeakyRelu,
    Linear,
}

impl Activation {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu_accurate" => Self::GeluTanh,
            "gelu" | "gelu_python" => Self::Gelu,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "relu6" => Self::Relu6,
            "silu" | "swish" => Self::Silu,
            "tanh" => Self::Tanh,
            "sigmoid" => Self::Sigmoid,
            "mish" => Self::Mish,
            "leaky_relu" => Self::LeakyRelu,
            "linear" => Self::Linear,
            _ => return None,
        })
    }

    pub const NAMES: &'static [&'static str] = &[
        "gelu_new",
        "gelu_pytorch_tanh",
        "gelu_fast",
        "gelu_accurate",
        "gelu",
        "gelu_python",
        "quick_gelu",
        "relu",
        "relu6",
        "silu",
        "swish",
        "tanh",
        "sigmoid",
        "mish",
        "leaky_relu",
        "linear",
    ];
}

/// Shapes of the published GPT-2 family.
pub const PRESETS: &[(&str, i64, i64, i64)] = &[
    // (name, n_layer, n_head, n_embd)
    ("gpt2", 12, 12, 768),
    ("gpt2-medium", 24, 16, 1024),
    ("gpt2-large", 36, 20, 1280),
    ("gpt2-xl", 48, 25, 1600),
    ("distilgpt2", 6, 12, 768),
];

impl Gpt2Config {
    /// The configuration of a published GPT-2 shape, e.g. `gpt2-medium`.
    pub fn preset(name: &str) -> Option<Self> {
        let &(_, n_layer, n_head, n_embd) = PRESETS.iter().find(|p| p.0 == name)?;
        let mut config: Gpt2Config =
            // A constant, not a file: every field has a default.
            serde_json::from_str("{}").expect("the empty config takes every default");
        config.n_layer = n_layer;
        config.n_head = n_head;
        config.n_embd = n_embd;
        Some(config)
    }

    /// Reads and validates `config.json`; errors name the file. (`of_model`, which
    /// also reads a `.gguf` file's config, is with the loaders in `load`.)
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::files::check_regular_file(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: Gpt2Config = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.into(),
            reason: e.to_string(),
        })?;
        config.validate().map_err(|reason| Error::Config {
            path: path.into(),
            reason,
        })?;
        Ok(config)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.model_type != "gpt2" {
            return Err(format!(
                "model_type is {:?}; gpt2kit runs GPT-2 models (model_type \"gpt2\")",
                self.model_type
            ));
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ] {
            if value <= 0 {
                return Err(format!("{name} must be positive, got {value}"));
            }
        }
        if self.n_embd % self.n_head != 0 {
            return Err(format!(
                "n_embd ({}) must be divisible by n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        if let Some(n) = self.n_inner {
            if n <= 0 {
                return Err(format!("n_inner must be positive, got {n}"));
            }
        }
        if self.checked_num_parameters().is_none() {
            return Err(format!(
                "the sizes describe more parameters than fit in 64 bits \
                 (vocab_size {}, n_positions {}, n_embd {}, n_layer {}, n_inner {})",
                self.vocab_size,
                self.n_positions,
                self.n_embd,
                self.n_layer,
                self.n_inner.map_or("default".into(), |n| n.to_string())
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(format!(
                "layer_norm_epsilon must be a positive number, got {}",
                self.layer_norm_epsilon
            ));
        }
        if Activation::from_name(&self.activation_function).is_none() {
            return Err(format!(
                "unknown activation_function {:?}; supported: {}",
                self.activation_function,
                Activation::NAMES.join(", ")
            ));
        }
        for id in self.eos_ids().into_iter().chain(self.bos_ids()) {
            if id < 0 || id >= self.vocab_size {
                return Err(format!(
                    "special token id {id} is outside the vocabulary (vocab_size {})",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    pub fn activation(&self) -> Activation {
        Activation::from_name(&self.activation_function).unwrap_or(Activation::GeluTanh)
    }

    pub fn inner_dim(&self) -> i64 {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn head_dim(&self) -> i64 {
        self.n_embd / self.n_head
    }

    pub fn eos_ids(&self) -> Vec<i64> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    pub fn bos_ids(&self) -> Vec<i64> {
        self.bos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Checks that `ids` can be fed: every id inside the vocabulary.
    pub fn check_ids(&self, ids: &[i64]) -> Result<()> {
        let v = self.vocab_size;
        match ids.iter().find(|&&id| id < 0 || id >= v) {
            Some(id) => Err(Error::Input(format!(
                "token id {id} is outside the model's vocabulary (vocab_size {v})"
            ))),
            None => Ok(()),
        }
    }

    /// Parameter count of the model this config describes (tied head counted once).
    /// Saturates at `i64::MAX` for sizes that `validate` refuses.
    pub fn num_parameters(&self) -> i64 {
        self.checked_num_parameters().unwrap_or(i64::MAX)
    }

    /// The parameter count, or `None` when it (or a product on the way) overflows i64.
    fn checked_num_parameters(&self) -> Option<i64> {
        let (e, v, p) = (self.n_embd, self.vocab_size, self.n_positions);
        let i = self.n_inner.map_or_else(|| e.checked_mul(4), Some)?;
        let (add, mul) = (i64::checked_add, i64::checked_mul);
        let ee = mul(e, e)?;
        let ei = mul(e, i)?;
        // ln_1, ln_2 (4e); c_attn (3e² + 3e); attn.c_proj (e² + e); c_fc (ei + i);
        // mlp.c_proj (ei + e).
        let block = [mul(ee, 4)?, mul(ei, 2)?, mul(e, 9)?, i]
            .into_iter()
            .try_fold(0i64, add)?;
        let ve = mul(v, e)?;
        let head = if self.tie_word_embeddings { 0 } else { ve };
        [ve, mul(p, e)?, mul(self.n_layer, block)?, mul(e, 2)?, head]
            .into_iter()
            .try_fold(0i64, add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_published_parameter_counts() {
        // Published counts (tied head): gpt2 124,439,808; gpt2-medium 354,823,168;
        // gpt2-large 774,030,080; gpt2-xl 1,557,611,200; distilgpt2 81,912,576.
        let expected = [
            ("gpt2", 124_439_808),
            ("gpt2-medium", 354_823_168),
            ("gpt2-large", 774_030_080),
            ("gpt2-xl", 1_557_611_200),
            ("distilgpt2", 81_912_576),
        ];
        for (name, count) in expected {
            let c = Gpt2Config::preset(name).unwrap();
            c.validate().unwrap();
            assert_eq!(c.num_parameters(), count, "{name}");
        }
        assert!(Gpt2Config::preset("gpt3").is_none());
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = |json: &str| {
            let c: Gpt2Config = serde_json::from_str(json).unwrap();
            c.validate().unwrap_err()
        };
        assert!(bad(r#"{"n_embd": 100, "n_head": 12}"#).contains("n_head"));
        assert!(bad(r#"{"activation_function": "gelu_xyz"}"#).contains("gelu_xyz"));
        assert!(bad(r#"{"n_layer": 0}"#).contains("n_layer"));
        assert!(bad(r#"{"model_type": "llama"}"#).contains("llama"));
        assert!(bad(r#"{"vocab_size": 100}"#).contains("50256"));
        assert!(bad(r#"{"n_layer": 1000000000000000}"#).contains("n_layer 1000000000000000"));
        assert!(bad(r#"{"n_embd": 4611686018427387904, "n_head": 1}"#).contains("64 bits"));
    }

    #[test]
    fn eos_may_be_a_list_and_unknown_fields_survive() {
        let c: Gpt2Config =
            serde_json::from_str(r#"{"eos_token_id": [1, 2], "resid_pdrop": 0.1}"#).unwrap();
        assert_eq!(c.eos_ids(), vec![1, 2]);
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["resid_pdrop"], 0.1);
    }
}
