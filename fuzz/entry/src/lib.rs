//! The loaders' fuzz entry points. Each target takes arbitrary bytes, lays them out
//! as the file(s) a loader reads (in a scratch folder of this process) and runs that
//! loader; any result is fine, a panic or an abort is a bug. The fuzzers in `fuzz/`
//! (libFuzzer, `make fuzz`) and the replay test (`tests/replay.rs`, in `make test`)
//! call the same functions, so every input a fuzzer saved is a regression case.
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use infer::genconfig::apply_file;
use infer::generate::GenerationConfig;
use infer::{Gpt2, Gpt2Config, Tokenizer};
use tch::{Device, Tensor};

pub mod http;
pub mod seeds;

pub use http::{chat_completions, completions, prompts};

/// The targets by name: what `make fuzz` runs and the corpus folders are named.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("config", config),
    ("generation_config", generation_config),
    ("model_folder", model_folder),
    ("shard_index", shard_index),
    ("tokenizer_json", tokenizer_json),
    ("vocab_merges", vocab_merges),
    ("jsonl", jsonl),
    ("manifest", manifest),
    ("gguf", gguf),
    ("prompts", prompts),
    ("completions", completions),
    ("chat_completions", chat_completions),
];

/// Where a fuzz input's file goes apart from the next: `a SEP b` is two files.
pub const SEP: &[u8] = b"\n--8<--\n";

/// The config of the tiny model `model_folder` loads weights against.
pub const TINY_CONFIG: &str = r#"{"model_type": "gpt2", "vocab_size": 16, "n_positions": 8,
 "n_embd": 8, "n_layer": 1, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0}"#;

thread_local! {
    static SCRATCH: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// This thread's scratch folder, emptied.
fn scratch() -> PathBuf {
    SCRATCH.with(|s| {
        let dir = s
            .borrow_mut()
            .get_or_insert_with(|| {
                let id = format!("{:?}", std::thread::current().id());
                let id: String = id.chars().filter(char::is_ascii_digit).collect();
                std::env::temp_dir().join(format!("gpt2kit-fuzz-{}-{id}", std::process::id()))
            })
            .clone();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch folder in the temp dir");
        dir
    })
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("writing a scratch file");
    p
}

/// `data` cut at the first `SEP`: (before, after).
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.windows(SEP.len()).position(|w| w == SEP) {
        Some(i) => (&data[..i], &data[i + SEP.len()..]),
        None => (data, &[]),
    }
}

/// `config.json`: parsed and validated (`Gpt2Config::from_file`).
pub fn config(data: &[u8]) {
    let dir = scratch();
    if let Ok(c) = Gpt2Config::from_file(&put(&dir, "config.json", data)) {
        let _ = c.num_parameters();
        let _ = (c.eos_ids(), c.bos_ids(), c.inner_dim());
    }
}

/// `generation_config.json` applied over the defaults.
pub fn generation_config(data: &[u8]) {
    let dir = scratch();
    let mut g = GenerationConfig::default();
    let _ = apply_file(&mut g, &put(&dir, "generation_config.json", data));
}

/// A model folder: `config.json SEP model.safetensors`, or the safetensors bytes alone
/// against the tiny config; loaded as `inspect` loads it (the folder check, every
/// tensor's header, NaN scan, shapes against the config, int8 artifacts by their
/// `quantization_config`). A config whose model would be large is not built.
pub fn model_folder(data: &[u8]) {
    let dir = scratch();
    let (a, b) = split(data);
    let (config, weights) = if b.is_empty() {
        (TINY_CONFIG.as_bytes(), a)
    } else {
        (a, b)
    };
    put(&dir, "config.json", config);
    put(&dir, "model.safetensors", weights);
    load_model(&dir);
}

fn load_model(dir: &Path) {
    if infer::model::check_model_dir(dir).is_err() {
        return;
    }
    let Ok(config) = Gpt2Config::from_file(&dir.join("config.json")) else {
        return;
    };
    // Building allocates the config's shapes: bounded so a fuzzed size costs no memory.
    if config.num_parameters() > 1 << 16 || config.n_positions > 64 {
        return;
    }
    let Ok(files) = infer::checkpoint::WeightFiles::open_dir(dir) else {
        return;
    };
    let _ = files.non_finite();
    let kind = infer::model::stored_kind(&files);
    let _ = Gpt2::from_weights(config, &files, kind, &[Device::Cpu]);
}

/// `model.safetensors.index.json` naming shards (the tiny model's weights are written
/// as `model-00001-of-00001.safetensors`).
pub fn shard_index(data: &[u8]) {
    let dir = scratch();
    put(&dir, "config.json", TINY_CONFIG.as_bytes());
    put(&dir, "model.safetensors.index.json", data);
    let _ = infer::folder::weight_paths(&dir);
    let weights = seeds::tiny_weights();
    put(&dir, "model-00001-of-00001.safetensors", &weights);
    load_model(&dir);
}

/// `tokenizer.json`, loaded and used on a short text.
pub fn tokenizer_json(data: &[u8]) {
    let dir = scratch();
    if let Ok(t) = Tokenizer::from_json(&put(&dir, "tokenizer.json", data)) {
        exercise(&t);
    }
}

/// `vocab.json SEP merges.txt`.
pub fn vocab_merges(data: &[u8]) {
    let dir = scratch();
    let (vocab, merges) = split(data);
    let v = put(&dir, "vocab.json", vocab);
    let m = put(&dir, "merges.txt", merges);
    if let Ok(t) = Tokenizer::from_vocab_merges(&v, &m) {
        exercise(&t);
    }
}

fn exercise(t: &Tokenizer) {
    if let Ok(ids) = t.encode("Hello world, the quick brown fox. <|endoftext|>") {
        let _ = t.decode(&ids);
    }
    let _ = t.decode(&[0, 1, 2, i64::MAX, -1]);
}

/// A JSONL data file, read as `train --data` reads it (text and prompt/completion rows,
/// packing), with the reference tokenizer given to `seeds::set_tokenizer_dir`.
pub fn jsonl(data: &[u8]) {
    let Some(tdir) = seeds::tokenizer_dir() else {
        return;
    };
    let Ok(t) = Tokenizer::from_dir(&tdir) else {
        return;
    };
    let dir = scratch();
    let path = put(&dir, "data.jsonl", data);
    for skip_invalid in [false, true] {
        let mut o = train::data::DataOptions::new(16);
        o.skip_invalid = skip_invalid;
        let _ = train::data::load_jsonl(&[path.clone()], &t, 0, &o);
    }
}

/// A folder's `gpt2kit-manifest.json`, checked against a folder holding one file.
pub fn manifest(data: &[u8]) {
    let dir = scratch();
    put(&dir, "config.json", b"{}");
    put(&dir, infer::manifest::MANIFEST_FILE, data);
    let _ = infer::manifest::verify(&dir);
}

/// Tiny random weights as a safetensors file's bytes (for seeds and `shard_index`).
pub fn weights_bytes(tensors: &[(String, Tensor)]) -> Vec<u8> {
    let dir = scratch();
    let p = dir.join("w.safetensors");
    infer::folder::write_safetensors(&p, tensors).expect("writing tiny weights");
    std::fs::read(p).expect("reading tiny weights")
}

/// A `.gguf` file: the container parsed, then (for a small GPT-2) loaded as `infer` loads
/// it: config from the metadata, tensors checked and dequantized, the tokenizer built.
pub fn gguf(data: &[u8]) {
    let _ = infer::gguf::file::parse(data);
    let dir = scratch();
    let path = put(&dir, "model.gguf", data);
    let Ok(config) = Gpt2Config::of_model(&path) else {
        return;
    };
    // Dequantizing allocates the config's shapes: bounded as `load_model` bounds them.
    if config.num_parameters() > 1 << 16 || config.n_positions > 64 {
        return;
    }
    let _ = infer::gguf::load::read(&path);
    if let Ok(t) = Tokenizer::from_dir(&path) {
        exercise(&t);
    }
}
