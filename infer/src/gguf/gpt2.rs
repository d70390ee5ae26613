//! A GPT-2 in GGUF as llama.cpp names it (gguf-py's `constants.py` and
//! `tensor_mapping.py`, `convert_hf_to_gguf.py`'s `GPT2Model`): the tensor names, the
//! Conv1D weights stored transposed (ggml's rows are the output features), and the
//! `gpt2.*` keys, both ways.
use std::path::Path;

use super::file::Header;
use super::meta::Value;
use crate::config::Gpt2Config;
use crate::error::{Error, Result};

pub const ARCH: &str = "gpt2";
pub const ARCH_KEY: &str = "general.architecture";

/// (checkpoint name under a block, GGUF name under `blk.N.`).
const BLOCK_NAMES: [(&str, &str); 6] = [
    ("ln_1", "attn_norm"),
    ("attn.c_attn", "attn_qkv"),
    ("attn.c_proj", "attn_output"),
    ("ln_2", "ffn_norm"),
    ("mlp.c_fc", "ffn_up"),
    ("mlp.c_proj", "ffn_down"),
];

/// (checkpoint name, GGUF name) outside the blocks.
const TOP_NAMES: [(&str, &str); 5] = [
    ("wte.weight", "token_embd.weight"),
    ("wpe.weight", "position_embd.weight"),
    ("ln_f.weight", "output_norm.weight"),
    ("ln_f.bias", "output_norm.bias"),
    ("lm_head.weight", "output.weight"),
];

fn split_block(name: &str, prefix: &str) -> Option<(u64, String)> {
    let rest = name.strip_prefix(prefix)?;
    let (n, tail) = rest.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0'))
    {
        return None;
    }
    Some((n.parse().ok()?, tail.to_string()))
}

/// The GGUF name of a checkpoint tensor (no `transformer.` prefix).
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((_, g)) = TOP_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let (l, tail) = split_block(hf, "h.")?;
    let (layer, suffix) = tail.rsplit_once('.')?;
    let (_, g) = BLOCK_NAMES.iter().find(|(h, _)| *h == layer)?;
    matches!(suffix, "weight" | "bias").then(|| format!("blk.{l}.{g}.{suffix}"))
}

/// The checkpoint name of a GGUF tensor.
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some((h, _)) = TOP_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let (l, tail) = split_block(gguf, "blk.")?;
    let (layer, suffix) = tail.rsplit_once('.')?;
    let (h, _) = BLOCK_NAMES.iter().find(|(_, g)| *g == layer)?;
    matches!(suffix, "weight" | "bias").then(|| format!("h.{l}.{h}.{suffix}"))
}

/// Whether a checkpoint tensor is a Conv1D weight, stored (in, out) by transformers and
/// (out, in) — ne0 = in — in GGUF.
pub fn is_conv1d_weight(hf: &str) -> bool {
    hf.ends_with(".weight")
        && ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
            .iter()
            .any(|l| hf.ends_with(&format!("{l}.weight")))
}

/// The `gpt2.*` keys (llama.cpp's `LLM_KV_*` for this architecture) of a config.
pub fn config_keys(c: &Gpt2Config) -> Vec<(String, Value)> {
    let u32v = |v: i64| Value::U32(v as u32);
    vec![
        ("gpt2.block_count".into(), u32v(c.n_layer)),
        ("gpt2.context_length".into(), u32v(c.n_positions)),
        ("gpt2.embedding_length".into(), u32v(c.n_embd)),
        ("gpt2.feed_forward_length".into(), u32v(c.inner_dim())),
        ("gpt2.attention.head_count".into(), u32v(c.n_head)),
        (
            "gpt2.attention.layer_norm_epsilon".into(),
            Value::F32(c.layer_norm_epsilon as f32),
        ),
    ]
}

/// The config a GGUF file's metadata describes (its vocabulary from `token_embd`).
/// Refuses another architecture and missing or out-of-range keys, naming the key.
pub fn config_from(h: &Header, path: &Path) -> Result<Gpt2Config> {
    let bad = |reason: String| Error::ModelFolder {
        path: path.into(),
        reason,
    };
    let arch = h.get(ARCH_KEY).and_then(Value::as_str);
    if arch != Some(ARCH) {
        return Err(bad(format!(
            "key `{ARCH_KEY}` is {arch:?}; gpt2kit runs GGUF files of architecture \"gpt2\""
        )));
    }
    let int = |key: &str| -> Result<i64> {
        let v = h
            .get(key)
            .ok_or_else(|| bad(format!("key `{key}` is missing")))?;
        v.as_i128()
            .filter(|&n| n > 0 && n <= u32::MAX as i128)
            .map(|n| n as i64)
            .ok_or_else(|| bad(format!("key `{key}` is {v:?}; expected a positive integer")))
    };
    let eps_key = "gpt2.attention.layer_norm_epsilon";
    let eps = h
        .get(eps_key)
        .and_then(Value::as_f64)
        .ok_or_else(|| bad(format!("key `{eps_key}` is missing or not a number")))?;
    // Stored as f32: its shortest decimal (1e-5, not 9.99999974e-6) is what was meant.
    let eps: f64 = format!("{}", eps as f32).parse().unwrap_or(eps);
    let embd = h
        .tensor("token_embd.weight")
        .ok_or_else(|| bad("tensor `token_embd.weight` is missing".into()))?;
    let vocab = embd.dims.get(1).copied().unwrap_or(0) as i64;
    let token = |key: &str| -> Option<serde_json::Value> {
        h.get(key)
            .and_then(Value::as_i128)
            .map(|v| serde_json::json!(v as i64))
    };
    let n_embd = int("gpt2.embedding_length")?;
    let inner = int("gpt2.feed_forward_length")?;
    let json = serde_json::json!({
        "vocab_size": vocab,
        "n_positions": int("gpt2.context_length")?,
        "n_embd": n_embd,
        "n_layer": int("gpt2.block_count")?,
        "n_head": int("gpt2.attention.head_count")?,
        "n_inner": (inner != 4 * n_embd).then_some(inner),
        "layer_norm_epsilon": eps,
        "activation_function": "gelu_new",
        "tie_word_embeddings": h.tensor("output.weight").is_none(),
        "bos_token_id": token("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token("tokenizer.ggml.eos_token_id"),
        "model_type": "gpt2",
    });
    let config: Gpt2Config =
        serde_json::from_value(json).map_err(|e| bad(format!("metadata: {e}")))?;
    config
        .validate()
        .map_err(|e| bad(format!("the gpt2.* keys describe no valid GPT-2: {e}")))?;
    Ok(config)
}

/// Every tensor a GPT-2 of `config` has, by GGUF name, with its dims (ne0 first).
pub fn expected_tensors(c: &Gpt2Config) -> Vec<(String, Vec<u64>)> {
    let (v, p, e, i) = (
        c.vocab_size as u64,
        c.n_positions as u64,
        c.n_embd as u64,
        c.inner_dim() as u64,
    );
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![e, v]),
        ("position_embd.weight".to_string(), vec![e, p]),
    ];
    for l in 0..c.n_layer {
        let b = |n: &str| format!("blk.{l}.{n}");
        out.extend([
            (b("attn_norm.weight"), vec![e]),
            (b("attn_norm.bias"), vec![e]),
            (b("attn_qkv.weight"), vec![e, 3 * e]),
            (b("attn_qkv.bias"), vec![3 * e]),
            (b("attn_output.weight"), vec![e, e]),
            (b("attn_output.bias"), vec![e]),
            (b("ffn_norm.weight"), vec![e]),
            (b("ffn_norm.bias"), vec![e]),
            (b("ffn_up.weight"), vec![e, i]),
            (b("ffn_up.bias"), vec![i]),
            (b("ffn_down.weight"), vec![i, e]),
            (b("ffn_down.bias"), vec![e]),
        ]);
    }
    out.push(("output_norm.weight".into(), vec![e]));
    out.push(("output_norm.bias".into(), vec![e]));
    if !c.tie_word_embeddings {
        out.push(("output.weight".into(), vec![e, v]));
    }
    out
}

/// The file's tensors are exactly those the metadata implies, at their dims.
pub fn check_tensors(h: &Header, c: &Gpt2Config, path: &Path) -> Result<()> {
    let bad = |reason: String| Error::ModelFolder {
        path: path.into(),
        reason,
    };
    // Each block has tensors of its own: a block count past the file's tensor count is
    // wrong, and is refused before a name is made for each of its blocks.
    if c.n_layer < 0 || c.n_layer as u64 > h.tensors.len() as u64 {
        return Err(bad(format!(
            "gpt2.block_count is {}, but the file holds {} tensors",
            c.n_layer,
            h.tensors.len()
        )));
    }
    let expected = expected_tensors(c);
    for (name, dims) in &expected {
        let t = h.tensor(name).ok_or_else(|| {
            bad(format!(
                "tensor `{name}` is missing (gpt2.block_count is {})",
                c.n_layer
            ))
        })?;
        if &t.dims != dims {
            return Err(bad(format!(
                "tensor `{name}` has dims {:?}, but the gpt2.* keys imply {dims:?} \
                 (embedding_length {}, feed_forward_length {}, context_length {})",
                t.dims,
                c.n_embd,
                c.inner_dim(),
                c.n_positions
            )));
        }
    }
    if let Some(t) = h
        .tensors
        .iter()
        .find(|t| !expected.iter().any(|(n, _)| *n == t.name))
    {
        return Err(bad(format!(
            "tensor `{}` is not part of the GPT-2 the metadata describes \
             (gpt2.block_count is {})",
            t.name, c.n_layer
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (hf, g) in [
            ("wte.weight", "token_embd.weight"),
            ("h.11.attn.c_attn.bias", "blk.11.attn_qkv.bias"),
            ("h.0.mlp.c_proj.weight", "blk.0.ffn_down.weight"),
            ("h.3.ln_2.weight", "blk.3.ffn_norm.weight"),
            ("ln_f.bias", "output_norm.bias"),
            ("lm_head.weight", "output.weight"),
        ] {
            assert_eq!(gguf_name(hf).as_deref(), Some(g));
            assert_eq!(hf_name(g).as_deref(), Some(hf));
        }
        for odd in [
            "h.01.ln_1.weight",
            "h.x.ln_1.weight",
            "h.0.attn.bias",
            "blk.0.foo.weight",
        ] {
            assert_eq!(gguf_name(odd), None, "{odd}");
            assert_eq!(hf_name(odd), None, "{odd}");
        }
        assert!(is_conv1d_weight("h.2.mlp.c_fc.weight"));
        assert!(!is_conv1d_weight("h.2.mlp.c_fc.bias") && !is_conv1d_weight("wte.weight"));
    }
}
