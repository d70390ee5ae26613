//! GGUF export: the file llama.cpp's `convert_hf_to_gguf.py` writes for a GPT-2
//! (`--outtype f32|f16|bf16`), or that file passed through `llama-quantize`
//! (`q8_0`, `q4_0`, `q4_k_m`), tensor for tensor.
//!
//! The converter keeps 1-D tensors, norms, biases and `position_embd` in F32 and stores
//! the other weights in the out type; GPT-2's head is tied, so no `output` tensor is
//! written (llama.cpp reads `token_embd` for it), unless the model has its own head.
//! `llama-quantize` (`llama_tensor_get_type` in `llama-quant.cpp`) quantizes only 2-D
//! weights other than `position_embd`; the tied `token_embd` takes the head's type
//! (Q6_K, or Q8_0 for q8_0 and for rows that are not whole blocks); `q4_k_m` gives
//! `attn_qkv` and `ffn_down` Q6_K in the layers `use_more_bits` picks; a row that is not
//! a whole number of blocks falls back (Q4_K → Q5_0, Q6_K → Q8_0, then F16).
use std::collections::BTreeMap;
use std::path::Path;

use infer::gguf::gpt2::{self, ARCH, ARCH_KEY};
use infer::gguf::vocab::{self, SpecialIds};
use infer::gguf::{blocks, file, GgmlType, TensorData, Value};
use infer::{Error, Gpt2Config, Result, Tokenizer};
use tch::{Kind, Tensor};

/// `--method` for a `.gguf` output, with llama.cpp's `llama_ftype` ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4KM,
}

impl Method {
    /// `general.file_type` (`LLAMA_FTYPE_*`).
    pub fn file_type(self) -> u32 {
        match self {
            Method::F32 => 0,
            Method::F16 => 1,
            Method::Q4_0 => 2,
            Method::Q8_0 => 7,
            Method::Q4KM => 15,
            Method::Bf16 => 32,
        }
    }

    /// The type the method stores weights in before the mix (`llama_ftype_get_default_type`).
    fn default_type(self) -> GgmlType {
        match self {
            Method::F32 => GgmlType::F32,
            Method::F16 => GgmlType::F16,
            Method::Bf16 => GgmlType::BF16,
            Method::Q8_0 => GgmlType::Q8_0,
            Method::Q4_0 => GgmlType::Q4_0,
            Method::Q4KM => GgmlType::Q4_K,
        }
    }

    fn quantized(self) -> bool {
        matches!(self, Method::Q8_0 | Method::Q4_0 | Method::Q4KM)
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third
/// one between.
fn use_more_bits(i: u64, n: u64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// `tensor_type_fallback`: a type whose blocks do not tile a row of `ne0`.
fn fallback(ty: GgmlType, ne0: u64) -> GgmlType {
    if ne0 % ty.block_size() as u64 == 0 {
        return ty;
    }
    let next = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if ne0 % next.block_size() as u64 == 0 {
        next
    } else {
        GgmlType::F16
    }
}

/// How a model's tensors are quantized: its layers, a tied head, an importance matrix.
#[derive(Clone, Copy)]
pub struct Mix {
    pub n_layer: u64,
    /// No `output` tensor: `token_embd` is the head.
    pub tied: bool,
    pub has_imatrix: bool,
}

/// The type a GGUF tensor is stored in: the converter's choice for the float methods,
/// then `llama_tensor_get_type` for the quantized ones.
pub fn tensor_type(method: Method, name: &str, dims: &[u64], mix: Mix) -> GgmlType {
    let (n_layer, tied) = (mix.n_layer, mix.tied);
    let keep_f32 = dims.len() < 2
        || name.ends_with("_norm.weight")
        || name == "position_embd.weight"
        || !name.ends_with(".weight");
    if keep_f32 {
        return GgmlType::F32;
    }
    if !method.quantized() {
        return method.default_type();
    }
    let default = method.default_type();
    let ne0 = dims[0];
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let ty = if name == "output.weight" || (tied && name == "token_embd.weight") {
        if ne0 % default.block_size() as u64 != 0 || default == GgmlType::Q8_0 {
            GgmlType::Q8_0
        } else {
            GgmlType::Q6_K
        }
    } else if method == Method::Q4KM
        && (name.ends_with("attn_qkv.weight") || name.ends_with("ffn_down.weight"))
        && use_more_bits(layer, n_layer)
    {
        GgmlType::Q6_K
    } else if method == Method::Q4_0
        && mix.has_imatrix
        && name.ends_with("ffn_down.weight")
        && layer < n_layer / 8
    {
        // llama.cpp guards the first ffn_down layers of an imatrix q4_0 with Q4_1.
        GgmlType::Q4_1
    } else {
        default
    };
    fallback(ty, ne0)
}

/// What one tensor became.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stored {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: &'static str,
    pub bytes: usize,
}

/// The metadata and tensors of a GGUF file of `config`'s GPT-2 from `tensors` (f32,
/// checkpoint names without `transformer.`, Conv1D weights (in, out)). `importance`:
/// per GGUF tensor name, one weight per input column (llama.cpp's imatrix).
pub fn encode(
    config: &Gpt2Config,
    tensors: &BTreeMap<String, Tensor>,
    method: Method,
    tokenizer: &Tokenizer,
    ids: &SpecialIds,
    name: &str,
    importance: &BTreeMap<String, Vec<f32>>,
) -> Result<(Vec<(String, Value)>, Vec<TensorData>)> {
    check_runs_in_llama_cpp(config)?;
    let tied = config.tie_word_embeddings;
    let mut out = Vec::new();
    for (g, want) in gpt2::expected_tensors(config) {
        let hf = gpt2::hf_name(&g).unwrap_or_default();
        let t = tensors
            .get(&hf)
            .ok_or_else(|| Error::Input(format!("tensor `{hf}` is missing")))?;
        let mut t = t.to_kind(Kind::Float).contiguous();
        if gpt2::is_conv1d_weight(&hf) {
            t = t.transpose(0, 1).contiguous(); // (in, out) → (out, in): rows of ne0 = in
        }
        let dims: Vec<u64> = t.size().iter().rev().map(|&d| d as u64).collect();
        if dims != want {
            return Err(Error::Input(format!(
                "tensor `{hf}` has shape {:?}, the config implies {want:?} (ggml order)",
                t.size()
            )));
        }
        let values = Vec::<f32>::try_from(t.reshape([-1]))?;
        let mix = Mix {
            n_layer: config.n_layer as u64,
            tied,
            has_imatrix: !importance.is_empty(),
        };
        let ty = tensor_type(method, &g, &dims, mix);
        let imp = importance.get(&g).map(Vec::as_slice);
        let bytes = blocks::quantize(ty, &values, dims[0] as usize, imp)
            .map_err(|e| Error::Input(format!("tensor `{g}`: {e}")))?;
        out.push(TensorData {
            name: g,
            dims,
            ty,
            bytes,
        });
    }
    let params: u64 = out.iter().map(|t| t.dims.iter().product::<u64>()).sum();
    let mut meta = vec![
        (ARCH_KEY.to_string(), Value::String(ARCH.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        (
            "general.size_label".into(),
            Value::String(size_label(params)),
        ),
    ];
    meta.extend(gpt2::config_keys(config));
    meta.push(("general.file_type".into(), Value::U32(method.file_type())));
    meta.push(("general.quantization_version".into(), Value::U32(2)));
    let json = tokenizer.to_json()?;
    meta.extend(vocab::tokenizer_keys(
        &json,
        tokenizer.path(),
        config.vocab_size,
        ids,
    )?);
    Ok((meta, out))
}

/// llama.cpp's `gpt2` graph is GPT-2's own: tanh GELU, attention scaled by 1/√hs only.
/// A config it would run differently is refused, naming the key.
fn check_runs_in_llama_cpp(c: &Gpt2Config) -> Result<()> {
    let why = if c.activation() != infer::config::Activation::GeluTanh {
        format!("activation_function is {:?}", c.activation_function)
    } else if c.scale_attn_by_inverse_layer_idx {
        "scale_attn_by_inverse_layer_idx is true".into()
    } else if !c.scale_attn_weights {
        "scale_attn_weights is false".into()
    } else {
        return Ok(());
    };
    Err(Error::Input(format!(
        "config.json: {why}; llama.cpp's gpt2 architecture runs GELU (tanh) with attention \
         scaled by 1/sqrt(head_dim) only, so the GGUF file would not compute this model"
    )))
}

/// gguf-py's `model_weight_count_rounded_notation` (`130K`, `124M`, `1.5B`).
pub fn size_label(n: u64) -> String {
    let x = n as f64;
    let (scaled, suffix) = if x > 1e12 {
        (x * 1e-12, "T")
    } else if x > 1e9 {
        (x * 1e-9, "B")
    } else if x > 1e6 {
        (x * 1e-6, "M")
    } else {
        (x * 1e-3, "K")
    };
    let digits = (scaled.round() as u64).to_string();
    let fix = 2usize.saturating_sub(digits.trim_start_matches('0').len());
    format!("{scaled:.fix$}{suffix}")
}

/// Writes the file (nothing is left at `path` if any step fails).
pub fn write(path: &Path, meta: &[(String, Value)], tensors: &[TensorData]) -> Result<()> {
    file::write(path, meta, tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_quants_mix_for_twelve_layers() {
        // n/8 = 1: layer 0, layers from 7·12/8 = 10, and every third from layer 1 + 2.
        let more: Vec<u64> = (0..12).filter(|&i| use_more_bits(i, 12)).collect();
        assert_eq!(more, [0, 3, 6, 9, 10, 11]);
        let mix = Mix {
            n_layer: 12,
            tied: true,
            has_imatrix: false,
        };
        let t = |m, n: &str, d: &[u64]| tensor_type(m, n, d, mix);
        assert_eq!(
            t(Method::Q4KM, "blk.3.attn_qkv.weight", &[768, 2304]),
            GgmlType::Q6_K
        );
        assert_eq!(
            t(Method::Q4KM, "blk.4.attn_qkv.weight", &[768, 2304]),
            GgmlType::Q4_K
        );
        assert_eq!(
            t(Method::Q4KM, "blk.4.ffn_up.weight", &[64, 256]),
            GgmlType::Q5_0
        );
        assert_eq!(
            t(Method::Q4KM, "token_embd.weight", &[768, 50257]),
            GgmlType::Q6_K
        );
        assert_eq!(
            t(Method::Q4KM, "token_embd.weight", &[64, 400]),
            GgmlType::Q8_0
        );
        assert_eq!(
            t(Method::Q4_0, "token_embd.weight", &[64, 400]),
            GgmlType::Q8_0
        );
        assert_eq!(
            t(Method::Q8_0, "token_embd.weight", &[768, 9]),
            GgmlType::Q8_0
        );
        assert_eq!(
            t(Method::Q4_0, "blk.0.ffn_up.weight", &[48, 9]),
            GgmlType::F16
        );
        assert_eq!(
            t(Method::F16, "position_embd.weight", &[768, 1024]),
            GgmlType::F32
        );
        assert_eq!(
            t(Method::Bf16, "blk.0.attn_qkv.bias", &[2304]),
            GgmlType::F32
        );
        assert_eq!(size_label(129_792), "130K");
        assert_eq!(size_label(124_439_808), "124M");
        assert_eq!(size_label(1_557_611_200), "1.6B");
    }
}
