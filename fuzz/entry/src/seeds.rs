//! Seed inputs for every target, made from the reference models (`make reference`,
//! `GPT2KIT_REFERENCE_DIR`) and small files written here: what `make fuzz` starts each
//! fuzzer from, and what the replay test runs first.
use std::path::PathBuf;

use infer::Gpt2Config;
use serde_json::json;

use crate::{weights_bytes, SEP, TINY_CONFIG};

/// The reference models' folder: `GPT2KIT_REFERENCE_DIR`, else target/reference.
pub fn reference_dir() -> PathBuf {
    std::env::var_os("GPT2KIT_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../target/reference"
            ))
        })
}

/// The tokenizer the JSONL target encodes with, if the reference models are there.
pub fn tokenizer_dir() -> Option<PathBuf> {
    let d = reference_dir().join("hub-tied");
    d.join("tokenizer.json").is_file().then_some(d)
}

/// The tiny config's weights, GPT-2's initialisation, as safetensors bytes.
pub fn tiny_weights() -> Vec<u8> {
    let config: Gpt2Config = serde_json::from_str(TINY_CONFIG).expect("the tiny config parses");
    weights_bytes(&train::init::init_tensors(&config, 0.02, 1))
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// (target, seed) pairs; reference files that are missing are left out.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let r = reference_dir();
    let read = |p: &str| std::fs::read(r.join(p)).ok();
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let tiny = tiny_weights();
    for m in [
        "hub-tied",
        "prefixed-untied",
        "sharded-f16",
        "bf16-quickgelu",
    ] {
        out.extend(read(&format!("{m}/config.json")).map(|b| ("config", b)));
        out.extend(read(&format!("{m}/generation_config.json")).map(|b| ("generation_config", b)));
        out.extend(read(&format!("{m}/tokenizer.json")).map(|b| ("tokenizer_json", b)));
    }
    out.push(("config", TINY_CONFIG.as_bytes().to_vec()));
    let gen = br#"{"do_sample": true, "top_k": 5, "top_p": 0.9, "temperature": 0.7,
        "repetition_penalty": 1.2, "num_beams": 2, "eos_token_id": [0, 1],
        "max_new_tokens": 4, "bad_words_ids": [[3, 4]], "early_stopping": "never"}"#;
    out.push(("generation_config", gen.to_vec()));
    out.push(("model_folder", tiny.clone()));
    out.push(("gguf", tiny_gguf()));
    out.push(("model_folder", cat(&[TINY_CONFIG.as_bytes(), SEP, &tiny])));
    let int8 = br#"{"model_type": "gpt2", "vocab_size": 16, "n_positions": 8, "n_embd": 8,
 "n_layer": 1, "n_head": 2, "quantization_config": {"quant_method": "gpt2kit",
 "method": "int8-weight", "bits": 8, "granularity": "per-output-channel",
 "quantize_embeddings": true, "kept_layers": [0]}}"#;
    out.push(("model_folder", cat(&[int8, SEP, &tiny])));
    out.extend(read("sharded-f16/model.safetensors.index.json").map(|b| ("shard_index", b)));
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&tiny)
        .map(|st| st.names().into_iter().map(String::from).collect())
        .unwrap_or_default();
    let map: serde_json::Map<String, serde_json::Value> = names
        .into_iter()
        .map(|n| (n, "model-00001-of-00001.safetensors".into()))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": tiny.len()}, "weight_map": map});
    out.push(("shard_index", index.to_string().into_bytes()));
    if let (Some(v), Some(m)) = (
        read("prefixed-untied/vocab.json"),
        read("prefixed-untied/merges.txt"),
    ) {
        out.push(("vocab_merges", cat(&[&v, SEP, &m])));
    }
    let small_vocab = br#"{"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}"#;
    out.push((
        "vocab_merges",
        cat(&[small_vocab, SEP, b"#version: 0.2\na b\n"]),
    ));
    let rows = concat!(
        "{\"text\": \"the model reads every weight once\"}\n",
        "\n",
        "{\"prompt\": \"2 + 2 =\", \"completion\": \" 4\"}\n",
        "{\"text\": \"caf\\u00e9 \\ud83d\\ude00 tabs\\tand\\nnewlines\"}\n",
    );
    out.push(("jsonl", rows.as_bytes().to_vec()));
    out.push((
        "jsonl",
        b"{\"text\": 5}\nnot json\n[1]\n{\"prompt\": \"x\"}\n".to_vec(),
    ));
    let sha_of_braces = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
    let manifest = serde_json::json!({"format": infer::manifest::FORMAT,
        "files": {"config.json": {"bytes": 2, "sha256": sha_of_braces}}});
    out.push(("manifest", manifest.to_string().into_bytes()));
    out.extend(request_seeds());
    out
}

/// `infer --prompts` files and `serve` request bodies: every accepted shape.
fn request_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let prompts: [&[u8]; 4] = [
        b"{\"prompt\": \"Once upon a time\"}\n{\"text\": \"The model\", \"max_new_tokens\": 3}\n",
        b"\xEF\xBB\xBF{\"prompt\": \"caf\\u00e9\", \"max_new_tokens\": null}\r\n\r\n{\"prompt\": \"x\"}\r\n",
        b"{\"body\": \"a field named by --text-field\", \"prompt\": 1}\n",
        b"{\"prompt\": \"\\ud83d\\ude00 tabs\\tand\\nnewlines\", \"max_new_tokens\": 18446744073709551615}\n",
    ];
    let completions = [
        json!({"prompt": "Hello", "max_tokens": 4}),
        json!({"model": "hub-tied", "prompt": ["a", "b c"], "n": 2, "temperature": 0.7,
            "top_p": 0.9, "stop": ["\n", "."], "seed": 7, "stream": true,
            "stream_options": {"include_usage": true}, "user": "u"}),
        json!({"prompt": [1, 2, 3], "logprobs": 2, "logit_bias": {"5": -100, "6": 2.5},
            "presence_penalty": 0.5, "frequency_penalty": -0.5, "best_of": 1}),
        json!({"prompt": [[1, 2], [3]], "top_k": 5, "min_p": 0.1, "typical_p": 0.9,
            "repetition_penalty": 1.2, "no_repeat_ngram_size": 2, "min_tokens": 1,
            "max_tokens": 8, "stop_token_ids": [0], "ignore_eos": true,
            "bad_words": ["bad"], "echo": true, "suffix": null}),
        json!({"prompt": "x", "stop": "y", "top_k": -1, "logprobs": false, "temperature": 0}),
    ];
    let chats = [
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        json!({"messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": " Hello "}]},
            {"role": "assistant", "content": "Hi.", "name": "a"}],
            "max_completion_tokens": 3, "logprobs": true, "top_logprobs": 2, "n": 2,
            "add_generation_prompt": false, "stream": true, "stop": ["\n"]}),
        json!({"messages": [{"role": "user", "content": "x"}], "temperature": 0.5,
            "top_k": 3, "min_p": 0.05, "logit_bias": {"1": 1}, "seed": 1, "ignore_eos": true}),
    ];
    let mut out: Vec<(&'static str, Vec<u8>)> =
        prompts.iter().map(|p| ("prompts", p.to_vec())).collect();
    out.extend(
        completions
            .iter()
            .map(|b| ("completions", b.to_string().into_bytes())),
    );
    out.extend(
        chats
            .iter()
            .map(|b| ("chat_completions", b.to_string().into_bytes())),
    );
    out
}

/// The tiny model as a GGUF file (f32, a 16-token vocabulary, one merge).
pub fn tiny_gguf() -> Vec<u8> {
    use infer::gguf::{blocks, file, gpt2, meta::ty, GgmlType, TensorData, Value};
    let config: Gpt2Config = serde_json::from_str(TINY_CONFIG).expect("the tiny config parses");
    let tensors: std::collections::HashMap<String, tch::Tensor> =
        train::init::init_tensors(&config, 0.02, 1)
            .into_iter()
            .collect();
    let data: Vec<TensorData> = gpt2::expected_tensors(&config)
        .into_iter()
        .map(|(name, dims)| {
            let hf = gpt2::hf_name(&name).expect("a GPT-2 tensor name");
            let mut t = tensors[&hf].to_kind(tch::Kind::Float);
            if gpt2::is_conv1d_weight(&hf) {
                t = t.transpose(0, 1);
            }
            let v = Vec::<f32>::try_from(t.contiguous().reshape([-1])).expect("f32 values");
            let bytes =
                blocks::quantize(GgmlType::F32, &v, dims[0] as usize, None).expect("f32 encodes");
            TensorData {
                name,
                dims,
                ty: GgmlType::F32,
                bytes,
            }
        })
        .collect();
    // `<|endoftext|>`, a..n, and "ab" (the one merge's result).
    let mut tokens: Vec<Value> = (b'a'..=b'n')
        .map(|c| Value::String((c as char).into()))
        .collect();
    tokens.insert(0, Value::String("<|endoftext|>".into()));
    tokens.push(Value::String("ab".into()));
    let mut types = vec![Value::I32(1); 16];
    types[0] = Value::I32(3);
    let mut meta = vec![(
        "general.architecture".to_string(),
        Value::String("gpt2".into()),
    )];
    meta.extend(gpt2::config_keys(&config));
    meta.extend([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(ty::STRING, tokens),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(ty::I32, types),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            Value::Array(ty::STRING, vec![Value::String("a b".into())]),
        ),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(0)),
    ]);
    // One folder per call: tests build the seed from several threads at once.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("gpt2kit-gguf-seed-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a seed folder");
    let path = dir.join("tiny.gguf");
    file::write(&path, &meta, &data).expect("the tiny GGUF writes");
    let bytes = std::fs::read(&path).expect("the tiny GGUF reads");
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}
