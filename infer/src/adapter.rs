//! LoRA adapters (Hu et al. 2021) in Hugging Face `peft`'s format: which layers a
//! `target_modules` list names (peft's rule: a module's full name equals a target or
//! ends with `.target`, so `c_proj` is both `attn.c_proj` and `mlp.c_proj`), the
//! initialisation of `LoraLayer.reset_lora_parameters` (A kaiming-uniform with a = √5,
//! that is U(−1/√in, 1/√in); B zeros), `adapter_config.json`, the tensor names
//! `save_pretrained` writes (`base_model.model.transformer.h.N.attn.c_attn.lora_A.weight`)
//! and the merge of `merge_and_unload` (W += (B·A)ᵀ·alpha/r for GPT-2's Conv1D, whose
//! weights are stored (in, out): peft's `fan_in_fan_out`).
use std::path::Path;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::Gpt2Config;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// Every linear layer of a GPT-2 block, as named under `transformer.h.N`.
pub const MODULES: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];
/// peft's default targets for GPT-2 (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
pub const DEFAULT_TARGETS: [&str; 1] = ["c_attn"];
/// peft's `LoraConfig` default `lora_alpha`.
pub const DEFAULT_ALPHA: f64 = 8.0;

/// An adapter's hyperparameters: peft's `r`, `lora_alpha`, `lora_dropout`,
/// `target_modules`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraOptions {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
}

fn bad(msg: String) -> Error {
    Error::Input(msg)
}

impl LoraOptions {
    /// peft's `scaling` (without rsLoRA): alpha / r.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// The values, checked; `what` names where they come from (flags or a file).
    pub fn check(&self, what: &str) -> Result<()> {
        if self.r < 1 {
            return Err(bad(format!("{what}: r must be positive, got {}", self.r)));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(bad(format!(
                "{what}: lora_alpha must be a positive number, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad(format!(
                "{what}: lora_dropout must lie in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.target_modules.is_empty() {
            return Err(bad(format!("{what}: target_modules is empty")));
        }
        Ok(())
    }

    /// The (block, module) pairs the targets name, block by block in `MODULES` order;
    /// a target naming no layer of an `n_layer`-block GPT-2 is an error naming it.
    pub fn layers(&self, n_layer: i64) -> Result<Vec<(usize, &'static str)>> {
        let full = |l: usize, m: &str| format!("transformer.h.{l}.{m}");
        let hits = |t: &str, l: usize, m: &str| {
            let f = full(l, m);
            f == t || f.ends_with(&format!(".{t}"))
        };
        for t in &self.target_modules {
            let any = (0..n_layer as usize).any(|l| MODULES.iter().any(|m| hits(t, l, m)));
            if !any {
                return Err(bad(format!(
                    "target module `{t}` names no linear layer of the model (GPT-2's are \
                     c_attn, c_proj, c_fc, or e.g. attn.c_proj, h.0.mlp.c_fc)"
                )));
            }
        }
        let mut out = Vec::new();
        for l in 0..n_layer as usize {
            for m in MODULES {
                if self.target_modules.iter().any(|t| hits(t, l, m)) {
                    out.push((l, m));
                }
            }
        }
        Ok(out)
    }

    /// `adapter_config.json` as peft 0.21 writes it for GPT-2 (the fields a LoRA
    /// adapter uses; the rest at peft's defaults).
    pub fn config_json(&self, base: &str) -> Value {
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 1e15 {
            json!(self.alpha as i64)
        } else {
            json!(self.alpha)
        };
        json!({
            "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": base,
            "bias": "none", "exclude_modules": null, "fan_in_fan_out": true,
            "inference_mode": true, "init_lora_weights": true, "layer_replication": null,
            "layers_pattern": null, "layers_to_transform": null, "lora_alpha": alpha,
            "lora_bias": false, "lora_dropout": self.dropout, "modules_to_save": null,
            "peft_type": "LORA", "r": self.r, "rank_pattern": {}, "revision": null,
            "target_modules": self.target_modules, "task_type": "CAUSAL_LM",
            "use_dora": false, "use_rslora": false,
        })
    }

    /// Reads `DIR/adapter_config.json`, refusing what gpt2kit does not run (another
    /// peft type, DoRA, rsLoRA, per-layer ranks, trained biases, saved modules).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG);
        let text =
            std::fs::read_to_string(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{}: not JSON: {e}", path.display())))?;
        let p = path.display();
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        if field("peft_type").and_then(Value::as_str) != Some("LORA") {
            return Err(bad(format!("{p}: `peft_type` is not \"LORA\"")));
        }
        for (k, ok) in [
            ("use_dora", Value::Bool(false)),
            ("use_rslora", Value::Bool(false)),
            ("lora_bias", Value::Bool(false)),
            ("bias", json!("none")),
            ("fan_in_fan_out", Value::Bool(true)),
        ] {
            if field(k).is_some_and(|x| *x != ok) {
                return Err(bad(format!(
                    "{p}: `{k}` must be {ok} for a GPT-2 LoRA adapter"
                )));
            }
        }
        for k in ["alpha_pattern", "rank_pattern"] {
            if field(k).is_some_and(|x| x.as_object().is_none_or(|o| !o.is_empty())) {
                return Err(bad(format!(
                    "{p}: `{k}` (per-layer values) is not supported"
                )));
            }
        }
        if field("modules_to_save").is_some_and(|x| x.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(bad(format!("{p}: `modules_to_save` is not supported")));
        }
        let r = field("r").and_then(Value::as_i64);
        let alpha = field("lora_alpha").and_then(Value::as_f64);
        let targets = match field("target_modules") {
            Some(Value::Array(a)) => a.iter().map(|t| t.as_str().map(String::from)).collect(),
            Some(Value::String(s)) => {
                return Err(bad(format!(
                    "{p}: `target_modules` is the pattern {s:?}; only a list of names is supported"
                )))
            }
            _ => None,
        };
        let (Some(r), Some(alpha), Some(target_modules)) = (r, alpha, targets) else {
            return Err(bad(format!(
                "{p}: needs `r` (an integer), `lora_alpha` (a number) and `target_modules` \
                 (a list of names)"
            )));
        };
        let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        let o = Self {
            r,
            alpha,
            dropout,
            target_modules,
        };
        o.check(&p.to_string())?;
        Ok(o)
    }
}

/// peft's name of block `l`'s `module` adapter matrix `which` ("A" or "B").
pub fn peft_key(l: usize, module: &str, which: &str) -> String {
    format!("base_model.model.transformer.h.{l}.{module}.lora_{which}.weight")
}

/// (in, out) features of a block's `module`.
fn features(config: &Gpt2Config, module: &str) -> (i64, i64) {
    let (e, inner) = (config.n_embd, config.inner_dim());
    match module {
        "attn.c_attn" => (e, 3 * e),
        "attn.c_proj" => (e, e),
        "mlp.c_fc" => (e, inner),
        _ => (inner, e),
    }
}

/// The adapter of a model: its options, the layers it adapts and its tensors, A then B
/// for each layer in turn, by peft's names.
pub struct Lora {
    pub options: LoraOptions,
    pub layers: Vec<(usize, &'static str)>,
    pub tensors: Vec<(String, Tensor)>,
}

impl Lora {
    /// A fresh adapter as peft initialises one, A drawn from libtorch's generator
    /// seeded with `seed`.
    pub fn init(
        options: &LoraOptions,
        config: &Gpt2Config,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let layers = options.layers(config.n_layer)?;
        tch::manual_seed(seed as i64);
        let _g = tch::no_grad_guard();
        let mut tensors = Vec::with_capacity(2 * layers.len());
        for &(l, m) in &layers {
            let (n_in, n_out) = features(config, m);
            // kaiming_uniform_(a=√5) on (r, in): gain √(2/(1+5)), bound gain·√3/√in.
            let bound = 1.0 / (n_in as f64).sqrt();
            let a = Tensor::empty([options.r, n_in], (Kind::Float, device)).uniform_(-bound, bound);
            let b = Tensor::zeros([n_out, options.r], (Kind::Float, device));
            tensors.push((peft_key(l, m, "A"), a));
            tensors.push((peft_key(l, m, "B"), b));
        }
        Ok(Self {
            options: options.clone(),
            layers,
            tensors,
        })
    }

    /// The adapter in `dir` (peft's folder) for a model of `config`: every tensor its
    /// targets need, with the shapes r and the model give, and no other.
    pub fn read(dir: &Path, config: &Gpt2Config, device: Device) -> Result<Self> {
        let options = LoraOptions::read(dir)?;
        let layers = options
            .layers(config.n_layer)
            .map_err(|e| bad(format!("{}: {e}", dir.join(ADAPTER_CONFIG).display())))?;
        let path = dir.join(ADAPTER_WEIGHTS);
        if !path.is_file() {
            return Err(bad(format!("{}: missing", path.display())));
        }
        let mut stored = crate::folder::read_safetensors(&path, device)?;
        let p = path.display();
        let mut tensors = Vec::with_capacity(2 * layers.len());
        for &(l, m) in &layers {
            let (n_in, n_out) = features(config, m);
            for (which, shape) in [("A", [options.r, n_in]), ("B", [n_out, options.r])] {
                let key = peft_key(l, m, which);
                let t = stored.remove(&key).ok_or_else(|| {
                    bad(format!(
                        "{p}: tensor `{key}` missing (adapter_config.json targets h.{l}.{m})"
                    ))
                })?;
                if t.size() != shape {
                    return Err(bad(format!(
                        "{p}: tensor `{key}` has shape {:?}; r = {} and the base model give {shape:?}",
                        t.size(),
                        options.r
                    )));
                }
                tensors.push((key, t.to_kind(Kind::Float)));
            }
        }
        if let Some(extra) = stored.keys().min() {
            return Err(bad(format!(
                "{p}: tensor `{extra}` is not one of the adapter's (adapter_config.json's \
                 target_modules and the base model's {} blocks)",
                config.n_layer
            )));
        }
        Ok(Self {
            options,
            layers,
            tensors,
        })
    }

    /// Merges the adapter into the model's tensors (named as `Gpt2::named_tensors`
    /// names them, `h.N.attn.c_attn.weight`), as peft's `merge_and_unload`:
    /// W += transpose(B·A)·scaling, in f32.
    pub fn merge_into(&self, named: &mut [(String, Tensor)]) -> Result<()> {
        let _g = tch::no_grad_guard();
        for (&(l, m), ab) in self.layers.iter().zip(self.tensors.chunks(2)) {
            let key = format!("h.{l}.{m}.weight");
            let (_, w) = named
                .iter_mut()
                .find(|(n, _)| *n == key)
                .ok_or_else(|| bad(format!("the base model has no tensor `{key}`")))?;
            let delta = ab[1].1.matmul(&ab[0].1).tr() * self.options.scaling(); // (in, out)
            *w = (w.to_kind(Kind::Float) + delta).to_kind(w.kind());
        }
        Ok(())
    }
}
