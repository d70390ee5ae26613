//! GGUF files from `gpt2kit quantize --out FILE.gguf`, checked by llama.cpp's own tools
//! (tests/reference/check_gguf.py: gguf-py, llama.cpp's quantizer and runtime through
//! llama-cpp-python), loaded back by every command, and refused when corrupt.
mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

const METHODS: [&str; 6] = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"];
const PROMPTS: [&str; 3] = ["the model reads every", "quick brown fox", "attention norm"];

fn run_python(args: &[&str]) -> String {
    reference_script("check_gguf.py", args)
}

/// gpt2kit's greedy tokens (EOS ignored) for each prompt.
fn greedy(file: &str) -> Vec<Value> {
    PROMPTS
        .iter()
        .map(|p| {
            let o = gpt2kit(&[
                "infer",
                "--model",
                file,
                "--prompt",
                p,
                "--max-new-tokens",
                "8",
                "--ignore-eos",
                "--json",
            ]);
            assert_ok(&o);
            let line: Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
            json!({"prompt": p, "ids": line["token_ids"]})
        })
        .collect()
}

fn eval(file: &str, data: &str) -> f64 {
    perplexity(file, data, &[])
}

/// `gpt2kit quantize` to a GGUF file, no decode timing.
fn quantize(model: &Path, out: &str, method: &str, extra: &[&str]) {
    let model = model.to_str().unwrap();
    let mut args = vec![
        "quantize", "--model", model, "--out", out, "--method", method,
    ];
    args.extend(["--decode-tokens", "0"]);
    args.extend(extra);
    assert_ok(&gpt2kit(&args));
}

/// Every method on one model (and, with `calibration`, q4_0 and q4_k_m with an importance
/// matrix), then the whole check script over the files.
fn check_model(model: &Path, tmp: &TempDir, tag: &str, data: &str, calibration: bool) -> Value {
    let mut files = serde_json::Map::new();
    let mut deq = serde_json::Map::new();
    for m in METHODS {
        let out = tmp.s(&format!("{tag}-{m}.gguf"));
        quantize(model, &out, m, &[]);
        let d = tmp.s(&format!("{tag}-{m}.deq"));
        assert_ok(&gpt2kit(&["dequantize", "--model", &out, "--out", &d]));
        files.insert(m.into(), json!(out));
        deq.insert(m.into(), json!(d));
    }
    let f = |m: &str| files[m].as_str().unwrap().to_string();
    let mut imatrix = serde_json::Map::new();
    let mut calibrated = serde_json::Map::new();
    for m in ["q4_0", "q4_k_m"].iter().filter(|_| calibration) {
        let out = tmp.s(&format!("{tag}-{m}-imatrix.gguf"));
        let samples = ["--block-size", "32", "--calibration-samples", "64"];
        quantize(
            model,
            &out,
            m,
            &[&["--calibration", data][..], &samples].concat(),
        );
        calibrated.insert(m.to_string(), json!(eval(&out, data)));
        imatrix.insert(m.to_string(), json!(out));
    }
    let spec = json!({
        "model": model,
        "files": files,
        "dequantized": deq,
        "greedy": {"f32": greedy(&f("f32")), "q8_0": greedy(&f("q8_0"))},
        "perplexity": {"q4_0": eval(&f("q4_0"), data), "q4_k_m": eval(&f("q4_k_m"), data)},
        "data": data,
        "block": 32,
        "imatrix": (!imatrix.is_empty()).then(|| json!({
            "files": imatrix, "data": data, "block": 32, "samples": 64})),
    });
    let spec_path = tmp.path(&format!("{tag}-spec.json"));
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let out = run_python(&["check", "--spec", spec_path.to_str().unwrap()]);
    eprintln!("{tag}: {out}");
    // Perplexity with and without the importance matrix, for the record (not asserted:
    // on a random model the calibration text is not what the weights were fitted to).
    eprintln!("{tag}: perplexity with --calibration {calibrated:?}");
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn llama_cpp_reads_and_runs_every_method() {
    let tmp = TempDir::new("gguf-peers");
    let data = tmp.s("test.jsonl");
    let rows: Vec<String> = corpus(40, 7)
        .lines()
        .map(|l| json!({ "text": l }).to_string())
        .collect();
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    // n_embd 256: K-quants with no fallback, and q4_k_m's use_more_bits mix over 8 layers.
    let k256 = tmp.path("k256");
    let hub = reference("hub-tied");
    run_python(&[
        "make",
        "--out",
        k256.to_str().unwrap(),
        "--tokenizer-from",
        hub.to_str().unwrap(),
    ]);
    let r = check_model(&k256, &tmp, "k256", &data, true);
    assert!(r["types"]["q4_k_m"]["Q6_K"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["imatrix"]["q4_k_m"]["tensors"], 33, "{r}");
    // n_embd 64: rows of 64 fall back (Q4_K → Q5_0, Q6_K → Q8_0); ffn_down's rows of 256
    // do not.
    let r = check_model(&hub, &tmp, "hub", &data, false);
    assert!(r["types"]["q4_k_m"]["Q5_0"].as_u64().unwrap() > 0, "{r}");
}

/// A valid file's bytes, with `edit` applied, written as `name`.
fn corrupt(tmp: &TempDir, src: &str, name: &str, edit: impl Fn(&mut Vec<u8>)) -> String {
    let mut b = std::fs::read(src).unwrap();
    edit(&mut b);
    let p = tmp.s(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn corrupt_files_are_refused_by_name() {
    let tmp = TempDir::new("gguf-corrupt");
    let good = tmp.s("good.gguf");
    let hub = reference("hub-tied");
    assert_ok(&gpt2kit(&[
        "quantize",
        "--model",
        hub.to_str().unwrap(),
        "--out",
        &good,
        "--method",
        "q8_0",
        "--decode-tokens",
        "0",
    ]));
    let len = std::fs::metadata(&good).unwrap().len() as usize;
    // The tensor info of `output_norm.weight`: name, n_dims, ne0, type id, offset.
    let info = |b: &[u8]| find(b, b"output_norm.weight") + "output_norm.weight".len();
    let cases: Vec<(String, &str)> = vec![
        (
            corrupt(&tmp, &good, "trunc.gguf", |b| b.truncate(len - 100)),
            "past the end",
        ),
        (
            corrupt(&tmp, &good, "half.gguf", |b| b.truncate(len / 3)),
            "truncated",
        ),
        (
            corrupt(&tmp, &good, "magic.gguf", |b| b[0] = b'X'),
            "not a GGUF file",
        ),
        (
            corrupt(&tmp, &good, "type.gguf", |b| {
                let at = info(b) + 4 + 8;
                b[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
            }),
            "tensor `output_norm.weight`: unknown ggml type id 77",
        ),
        (
            corrupt(&tmp, &good, "offset.gguf", |b| {
                let at = info(b) + 4 + 8 + 4;
                b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            }),
            "tensor `output_norm.weight`",
        ),
        (
            // 64 → 32 in the embedding length: every tensor now disagrees with it.
            corrupt(&tmp, &good, "shape.gguf", |b| {
                let at = find(b, b"gpt2.embedding_length") + "gpt2.embedding_length".len() + 4;
                b[at..at + 4].copy_from_slice(&32u32.to_le_bytes());
            }),
            "the gpt2.* keys imply",
        ),
    ];
    for (file, needle) in &cases {
        for cmd in [
            vec!["infer", "--model", file, "--prompt", "the"],
            vec!["inspect", "--model", file],
        ] {
            let o = gpt2kit(&cmd);
            assert_ne!(o.status.code(), Some(0), "{cmd:?}");
            let err = stderr(&o);
            assert!(err.contains(needle), "{cmd:?}: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}

#[test]
fn quantize_refuses_what_gguf_cannot_hold_and_writes_nothing() {
    let tmp = TempDir::new("gguf-refuse");
    let hub = reference("hub-tied");
    let hub = hub.to_str().unwrap();
    let out = tmp.s("x.gguf");
    for (extra, needle) in [
        (vec!["--method", "int8-weight"], "a .gguf --out takes"),
        (
            vec!["--method", "q8_0", "--smooth-alpha", "0.5"],
            "--smooth-alpha",
        ),
        (
            vec!["--method", "q4_0", "--keep-embeddings-float"],
            "--keep-embeddings-float",
        ),
    ] {
        let mut args = vec!["quantize", "--model", hub, "--out", &out];
        args.extend(extra);
        assert_clean_failure(&gpt2kit(&args), 2, needle);
        assert!(!Path::new(&out).exists());
    }
    // llama.cpp's gpt2 graph has no exact-erf GELU nor inverse-layer attention scaling.
    let odd = reference("prefixed-untied");
    let o = gpt2kit(&[
        "quantize",
        "--model",
        odd.to_str().unwrap(),
        "--out",
        &out,
        "--method",
        "f32",
    ]);
    assert_clean_failure(&o, 2, "activation_function is \"gelu\"");
    assert!(!Path::new(&out).exists());
    let folder = tmp.s("folder");
    let o = gpt2kit(&[
        "quantize", "--model", hub, "--out", &folder, "--method", "q4_0",
    ]);
    assert_clean_failure(&o, 2, "ending in .gguf");
    // Layer dropping and pruning combine with GGUF.
    let o = gpt2kit(&[
        "quantize",
        "--model",
        hub,
        "--out",
        &out,
        "--method",
        "q4_0",
        "--drop-layers",
        "1",
        "--prune-sparsity",
        "0.5",
        "--decode-tokens",
        "0",
    ]);
    assert_ok(&o);
    let o = gpt2kit(&["inspect", "--model", &out, "--json"]);
    assert_ok(&o);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["config"]["n_layer"], 1);
}
