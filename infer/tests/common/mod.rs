//! Shared by the integration tests: where the reference models are and what
//! transformers computed for them (written by tests/reference/make_reference.py).
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::Tensor;

pub const MODELS: [&str; 4] = [
    "hub-tied",
    "prefixed-untied",
    "sharded-f16",
    "bf16-quickgelu",
];

/// The reference folder: `$GPT2KIT_REFERENCE_DIR`, else `target/reference`. Missing
/// references fail the test loudly: a skipped comparison would prove nothing.
pub fn reference_dir() -> PathBuf {
    let dir = std::env::var_os("GPT2KIT_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/reference"));
    assert!(
        dir.join(".ready").exists() || dir.join(MODELS[0]).join("expected.json").exists(),
        "reference models not found in {}: run `make reference` (`make test` does)",
        dir.display()
    );
    dir
}

pub fn model_dir(name: &str) -> PathBuf {
    reference_dir().join(name)
}

#[derive(Deserialize)]
pub struct TokenizerCase {
    pub text: String,
    pub ids: Vec<i64>,
}

#[derive(Deserialize)]
pub struct Expected {
    pub prompts: Vec<String>,
    pub ids: Vec<Vec<i64>>,
    pub max_new_tokens: i64,
    pub greedy: Vec<Vec<i64>>,
    pub greedy_batch: Vec<Vec<i64>>,
    pub tokenizer_cases: Vec<TokenizerCase>,
}

pub fn expected(name: &str) -> Expected {
    let path = model_dir(name).join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn expected_tensors(name: &str) -> HashMap<String, Tensor> {
    let path = model_dir(name).join("expected.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    f64::try_from(
        (a.to_kind(tch::Kind::Float) - b.to_kind(tch::Kind::Float))
            .abs()
            .max(),
    )
    .unwrap()
}

/// `config` as JSON with gpt2kit's `quantization_config` for an int8 artifact of
/// `method` (int8 embeddings, every layer kept), as `gpt2kit quantize` writes it.
pub fn int8_config(config: &infer::Gpt2Config, method: &str) -> serde_json::Value {
    let mut cfg = serde_json::to_value(config).unwrap();
    cfg["quantization_config"] = serde_json::json!({
        "quant_method": "gpt2kit",
        "method": method,
        "bits": 8,
        "granularity": "per-output-channel",
        "quantize_embeddings": true,
        "kept_layers": (0..config.n_layer).collect::<Vec<_>>(),
    });
    cfg
}

/// Writes `cfg` as config.json and `tensors` as model.safetensors into `dir`.
pub fn write_model_folder(dir: &Path, cfg: &serde_json::Value, tensors: &HashMap<String, Tensor>) {
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let list: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&list, dir.join("model.safetensors")).unwrap();
}

/// A fresh scratch folder under target/, removed and recreated.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies a reference model folder into a scratch folder, for tests that damage it.
pub fn copy_model(name: &str, test: &str) -> PathBuf {
    let dst = scratch(test);
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    dst
}
