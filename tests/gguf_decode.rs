//! A quantized GGUF file runs on its blocks (`infer::gguf::matmul`): every layer in
//! Q8_0, Q4_0, Q5_0, Q4_K or Q6_K quantizes its activations and reads the file's bytes,
//! as llama.cpp's CPU backend does. A sequence's tokens do not depend on what decodes
//! beside it, and the model stays within the rounding of its 8-bit activations of the
//! same weights run in f32 (`--no-kernels`: dequantized, float activations).
mod common;

use common::*;
use serde_json::Value;

/// Greedy token ids per prompt, all prompts decoding together (one `--prompts` run).
fn together(file: &str, prompts: &std::path::Path) -> Vec<Value> {
    let o = gpt2kit(&[
        "infer",
        "--model",
        file,
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ]);
    assert_ok(&o);
    stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["token_ids"].clone())
        .collect()
}

fn alone(file: &str, prompt: &str) -> Value {
    let o = gpt2kit(&[
        "infer",
        "--model",
        file,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ]);
    assert_ok(&o);
    let line: Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    line["token_ids"].clone()
}

#[test]
fn block_formats_decode_alone_as_together_and_near_their_float_weights() {
    let tmp = TempDir::new("gguf-decode");
    let model = reference("hub-tied");
    let prompts = ["the model reads", "a", "quick brown fox jumps over", "norm"];
    let file = tmp.path("prompts.jsonl");
    let rows: Vec<String> = prompts
        .iter()
        .map(|p| serde_json::json!({ "prompt": p }).to_string())
        .collect();
    std::fs::write(&file, rows.join("\n") + "\n").unwrap();
    let data = tmp.s("eval.jsonl");
    let text: Vec<String> = corpus(24, 5)
        .lines()
        .map(|l| serde_json::json!({ "text": l }).to_string())
        .collect();
    std::fs::write(&data, text.join("\n") + "\n").unwrap();
    // n_embd 64: q4_k_m's rows of 64 fall back to Q5_0 and Q8_0, its rows of 256
    // (ffn_down) are Q4_K; the tied head is Q8_0 or Q6_K.
    for method in ["q8_0", "q4_0", "q4_k_m"] {
        let out = tmp.s(&format!("{method}.gguf"));
        assert_ok(&gpt2kit(&[
            "quantize",
            "--model",
            model.to_str().unwrap(),
            "--out",
            &out,
            "--method",
            method,
            "--decode-tokens",
            "0",
        ]));
        let batched = together(&out, &file);
        assert_eq!(batched.len(), prompts.len());
        for (p, ids) in prompts.iter().zip(&batched) {
            assert_eq!(ids.as_array().unwrap().len(), 12, "{method} {p:?}");
            assert_eq!(
                &alone(&out, p),
                ids,
                "{method} {p:?}: alone against together"
            );
        }
        // 8-bit activations: each input rounded by at most half a step of its block's
        // amax/127, a relative error of ≤ 0.4% of the block's largest input per element;
        // through two layers the perplexity moves well under 0.5% (llama.cpp's own gap to
        // ours on these files is held to 0.5% in tests/gguf.rs).
        let blocks = perplexity(&out, &data, &[]);
        let float = perplexity(&out, &data, &["--no-kernels"]);
        let gap = (blocks - float).abs() / float;
        eprintln!("{method}: perplexity {blocks:.4} on the blocks, {float:.4} in f32 ({gap:.2e})");
        assert!(gap < 0.005, "{method}: {blocks} against {float}");
    }
}
