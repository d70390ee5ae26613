//! A GGUF file that llama.cpp's own converter (convert_hf_to_gguf.py, from the
//! llama-cpp-python sdist that tests/reference/peers.txt pins) made from a Hugging Face
//! GPT-2 folder: gpt2kit loads it and generates the same greedy tokens as from its own
//! GGUF export of the folder (`quantize --method f32`), from the folder itself, and as
//! transformers does. The converter takes only pre-tokenizers it knows, so the model has
//! GPT-2's real 50257-token BPE (tests/reference/llama_converter.py; `make converter`
//! fetches the converter and the BPE files into a cache, `make test` does it first).
mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// Byte-level BPE corners: a leading space, digits, contractions, non-ASCII, a newline.
const PROMPTS: [&str; 3] = [
    "the quick brown fox",
    "Hello, world! It's 2024 and we've 12345 tokens.",
    "  naïve café — ünïcödé\nnext line",
];
const NEW_TOKENS: usize = 12;

/// Where `make converter` put the converter and the BPE files: `GPT2KIT_CONVERTER_DIR`
/// (`make test` sets it), else `~/.cache/gpt2kit/llama-converter-<pinned version>`.
fn converter_cache() -> PathBuf {
    let dir = std::env::var_os("GPT2KIT_CONVERTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let peers = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/peers.txt");
            let peers = std::fs::read_to_string(peers).unwrap();
            let version = peers
                .lines()
                .find_map(|l| l.trim().strip_prefix("llama-cpp-python=="))
                .expect("peers.txt pins llama-cpp-python")
                .trim()
                .to_string();
            let home = std::env::var_os("HOME").expect("HOME");
            Path::new(&home).join(format!(".cache/gpt2kit/llama-converter-{version}"))
        });
    for part in ["llama.cpp", "gpt2-bpe"] {
        assert!(
            dir.join(part).join(".ready").exists(),
            "{} missing: run `make converter` (`make test` does), or `python \
             tests/reference/llama_converter.py fetch --cache {}` (downloads ~77 MB once)",
            dir.join(part).display(),
            dir.display()
        );
    }
    dir
}

fn run_python(args: &[&str]) -> Value {
    let out = reference_script("llama_converter.py", args);
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// gpt2kit's greedy tokens (EOS ignored) for each prompt, and the decoded texts.
fn greedy(model: &str) -> (Vec<Vec<i64>>, Vec<String>) {
    let n = NEW_TOKENS.to_string();
    PROMPTS
        .iter()
        .map(|p| {
            let o = gpt2kit(&[
                "infer",
                "--model",
                model,
                "--prompt",
                p,
                "--max-new-tokens",
                &n,
                "--ignore-eos",
                "--json",
            ]);
            assert_ok(&o);
            let line: Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
            let ids: Vec<i64> = line["token_ids"]
                .as_array()
                .unwrap_or_else(|| panic!("{model}: no token_ids in {line}"))
                .iter()
                .map(|t| t.as_i64().unwrap())
                .collect();
            assert_eq!(ids.len(), NEW_TOKENS, "{model} {p:?}: {line}");
            (ids, line["text"].as_str().unwrap().to_string())
        })
        .unzip()
}

fn inspect(model: &str) -> Value {
    let o = gpt2kit(&["inspect", "--model", model, "--json"]);
    assert_ok(&o);
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

#[test]
fn loads_llama_cpp_converter_output() {
    let cache = converter_cache();
    let tmp = TempDir::new("gguf-converter");
    let folder = tmp.s("model");
    let bpe = cache.join("gpt2-bpe");
    let mut args = vec![
        "make-model",
        "--out",
        &folder,
        "--bpe",
        bpe.to_str().unwrap(),
    ];
    for p in PROMPTS {
        args.extend(["--prompt", p]);
    }
    let made = run_python(&args);
    let hf: Vec<Vec<i64>> = serde_json::from_value(made["greedy"].clone()).unwrap();

    let theirs = tmp.s("theirs.gguf");
    let conv = cache.join("llama.cpp");
    let converted = run_python(&[
        "convert",
        "--model",
        &folder,
        "--out",
        &theirs,
        "--converter",
        conv.to_str().unwrap(),
    ]);
    eprintln!("converter: {converted}");
    // GPT-2's pre-tokenizer recognised by its hash, the byte-level BPE vocabulary.
    assert_eq!(converted["architecture"], "gpt2", "{converted}");
    assert_eq!(converted["pre"], "gpt-2", "{converted}");
    assert_eq!(converted["tokenizer_model"], "gpt2", "{converted}");

    let ours = tmp.s("ours.gguf");
    assert_ok(&gpt2kit(&[
        "quantize",
        "--model",
        &folder,
        "--out",
        &ours,
        "--method",
        "f32",
        "--decode-tokens",
        "0",
    ]));

    // The converter's file reads back as the same model as ours.
    let (ti, oi) = (inspect(&theirs), inspect(&ours));
    for k in [
        "config",
        "parameters",
        "dtype",
        "stored_dtypes",
        "tokenizer_vocab_size",
    ] {
        assert_eq!(ti[k], oi[k], "{k}: theirs {ti}\nours {oi}");
    }
    assert_eq!(ti["tokenizer_vocab_size"], 50257, "{ti}");
    assert_eq!(ti["config"]["n_layer"], 2, "{ti}");

    let (from_folder, text_folder) = greedy(&folder);
    let (from_ours, text_ours) = greedy(&ours);
    let (from_theirs, text_theirs) = greedy(&theirs);
    eprintln!("greedy: {from_folder:?}");
    assert_eq!(from_folder, hf, "folder against transformers");
    assert_eq!(from_ours, from_folder, "ours.gguf against the folder");
    assert_eq!(from_theirs, from_folder, "theirs.gguf against the folder");
    assert_eq!(text_ours, text_folder);
    assert_eq!(text_theirs, text_folder);
    // Not a degenerate model: the tokens move within a prompt and differ across prompts.
    for ids in &from_folder {
        let mut d = ids.clone();
        d.sort();
        d.dedup();
        assert!(
            d.len() >= 4,
            "greedy tokens nearly constant: {from_folder:?}"
        );
    }
    assert!(from_folder[0] != from_folder[1] && from_folder[1] != from_folder[2]);
}
