//! `gpt2kit infer`'s sequence engine under hostile use: `--max-num-seqs`,
//! `--static-batches` and per-line `"max_new_tokens"` at their edges, prompts of very
//! different lengths (chunked prefill past 512 tokens), many prompts through few slots.
//! Bad input is refused naming the flag, or the file and line; good input gives each
//! prompt the tokens it gets alone (the fused CPU path is bit-identical alone or beside
//! any others).
mod common;

use std::path::Path;

use common::*;
use infer::ensemble::Ensemble;
use infer::generate::{generate_requests, GenerationConfig, Output, Request, Schedule};
use infer::{EngineOptions, Gpt2};
use serde_json::Value;
use tch::{Device, Kind};

fn json_lines(o: &std::process::Output) -> Vec<Value> {
    stdout(o)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Writes `lines` (JSON values) as a prompts file.
fn prompts_file(dir: &TempDir, name: &str, lines: &[Value]) -> String {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.path(name), text).unwrap();
    dir.s(name)
}

/// A fresh random model from `gpt2kit init` (the hub-tied tokenizer, 400 tokens).
fn init_model(dir: &TempDir, name: &str, extra: &[&str]) -> String {
    let tok = reference("hub-tied");
    let out = dir.s(name);
    let mut args = vec![
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    assert_ok(&gpt2kit(&args));
    out
}

/// (token_ids, finish_reason) per (prompt_index, sequence_index), in output order.
fn seqs(o: &std::process::Output) -> Vec<((u64, u64), Vec<i64>, String)> {
    json_lines(o)
        .iter()
        .map(|v| {
            (
                (
                    v["prompt_index"].as_u64().unwrap(),
                    v["sequence_index"].as_u64().unwrap(),
                ),
                serde_json::from_value(v["token_ids"].clone()).unwrap(),
                v["finish_reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn schedule_flags_out_of_range_are_refused_by_name() {
    let m = reference("hub-tied");
    let m = m.to_str().unwrap();
    for n in ["0", "1048577"] {
        let o = gpt2kit(&["infer", "--model", m, "--prompt", "hi", "--max-num-seqs", n]);
        assert_clean_failure(&o, 2, "--max-num-seqs");
    }
    let o = gpt2kit(&["infer", "--model", m, "--prompt", "hi", "--static-batches"]);
    assert_clean_failure(&o, 2, "--max-num-seqs");
    for other in [
        &["--prompt-lookup", "2"][..],
        &["--ensemble", m, "--ensemble-mode", "rerank"],
    ] {
        let mut args = vec![
            "infer",
            "--model",
            m,
            "--prompt",
            "hi",
            "--max-num-seqs",
            "2",
        ];
        args.extend_from_slice(other);
        assert_clean_failure(&gpt2kit(&args), 2, "--max-num-seqs needs plain decoding");
    }
}

/// Every bad `"max_new_tokens"` is refused naming the file and line.
#[test]
fn bad_line_limits_name_file_and_line() {
    let dir = TempDir::new("engine-hostile-limits");
    let m = reference("hub-tied");
    for bad in ["0", "-1", "1.5", "\"10\"", "18446744073709551616"] {
        let text =
            format!("{{\"prompt\": \"a\"}}\n{{\"prompt\": \"b\", \"max_new_tokens\": {bad}}}\n");
        std::fs::write(dir.path("p.jsonl"), text).unwrap();
        let o = gpt2kit(&[
            "infer",
            "--model",
            m.to_str().unwrap(),
            "--prompts",
            &dir.s("p.jsonl"),
        ]);
        assert_clean_failure(&o, 2, "p.jsonl:2: \"max_new_tokens\" must be an integer");
    }
    // null: the flags' limit.
    let text = "{\"prompt\": \"b\", \"max_new_tokens\": null}\n";
    std::fs::write(dir.path("p.jsonl"), text).unwrap();
    let o = gpt2kit(&[
        "infer",
        "--model",
        m.to_str().unwrap(),
        "--prompts",
        &dir.s("p.jsonl"),
        "--json",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
    ]);
    assert_ok(&o);
    assert_eq!(seqs(&o)[0].1.len(), 3);
}

/// A line whose own limit fits the context is decoded, whatever the flags' limit (the
/// default --max-new-tokens 20, or a --max-length the prompt already reaches) would
/// have needed: the line's limit replaces it.
#[test]
fn line_limit_replaces_the_flags_limit_in_the_context_check() {
    let dir = TempDir::new("engine-hostile-near-context");
    let m = reference("hub-tied");
    // 61 'x' tokens (n_positions 64): + 3 fits, + 20 does not.
    let long = "x".repeat(61);
    let f = prompts_file(
        &dir,
        "p.jsonl",
        &[
            serde_json::json!({"prompt": long, "max_new_tokens": 3}),
            serde_json::json!({"prompt": "ab"}),
        ],
    );
    let m = m.to_str().unwrap();
    let o = gpt2kit(&[
        "infer",
        "--model",
        m,
        "--prompts",
        &f,
        "--json",
        "--ignore-eos",
    ]);
    assert_ok(&o);
    assert_eq!(seqs(&o)[0].1.len(), 3);
    let o = gpt2kit(&[
        "infer",
        "--model",
        m,
        "--prompts",
        &f,
        "--json",
        "--max-length",
        "40",
    ]);
    assert_ok(&o);
    let o = gpt2kit(&[
        "infer",
        "--model",
        m,
        "--prompts",
        &f,
        "--json",
        "--ensemble",
        m,
    ]);
    assert_ok(&o);
}

/// Errors about one --prompts line name the file and line, not only an index that
/// counts the --prompt flags first.
#[test]
fn line_limit_errors_name_file_and_line() {
    let dir = TempDir::new("engine-hostile-limit-lines");
    let m = reference("hub-tied");
    let m = m.to_str().unwrap();
    let f = prompts_file(
        &dir,
        "p.jsonl",
        &[
            serde_json::json!({"prompt": "ab"}),
            serde_json::json!({"prompt": "hello", "max_new_tokens": 61}),
        ],
    );
    let o = gpt2kit(&["infer", "--model", m, "--prompt", "first", "--prompts", &f]);
    assert_clean_failure(&o, 2, "p.jsonl:2");
    let f = prompts_file(
        &dir,
        "q.jsonl",
        &[
            serde_json::json!({"prompt": "ab"}),
            serde_json::json!({"prompt": "hello", "max_new_tokens": 2}),
        ],
    );
    let o = gpt2kit(&[
        "infer",
        "--model",
        m,
        "--prompts",
        &f,
        "--prompt-lookup",
        "2",
    ]);
    assert_clean_failure(&o, 2, "q.jsonl:2");
}

/// `--warmup` runs 4 tokens per prompt: a prompt that fits with its own 2 tokens must
/// not be refused because of the warm-up's 4 (nor with a flag the user did not give).
#[test]
fn warmup_near_the_context_is_not_refused() {
    let m = reference("hub-tied");
    let long = "x".repeat(61);
    let o = gpt2kit(&[
        "infer",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        &long,
        "--max-new-tokens",
        "2",
        "--warmup",
        "1",
    ]);
    assert_ok(&o);
}

/// Prompts that finish out of order (long first, short later, EOS mid-way, several
/// samples each) are printed in prompt order, then sequence order, in --json and text;
/// the text output of a refilled run equals the all-at-once run.
#[test]
fn outputs_in_prompt_order_whatever_finishes_first() {
    let dir = TempDir::new("engine-hostile-order");
    let m = reference("hub-tied");
    let m = m.to_str().unwrap();
    let lines: Vec<Value> = [
        (30, "a"),
        (1, "bb"),
        (12, "the fox"),
        (2, "c"),
        (25, "dog dog"),
    ]
    .iter()
    .map(|(n, p)| serde_json::json!({"prompt": p, "max_new_tokens": n}))
    .collect();
    let f = prompts_file(&dir, "p.jsonl", &lines);
    let base = [
        "infer",
        "--model",
        m,
        "--prompts",
        &f,
        "--do-sample",
        "--seed",
        "3",
        "--num-return-sequences",
        "2",
        "--eos-token-id",
        "66",
    ];
    let run = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        let o = gpt2kit(&a);
        assert_ok(&o);
        o
    };
    let all = run(&["--json"]);
    let order: Vec<(u64, u64)> = seqs(&all).iter().map(|s| s.0).collect();
    let want: Vec<(u64, u64)> = (0..5).flat_map(|i| [(i, 0), (i, 1)]).collect();
    assert_eq!(order, want);
    for extra in [
        &["--max-num-seqs", "1"][..],
        &["--max-num-seqs", "3", "--static-batches"],
    ] {
        let mut a = extra.to_vec();
        a.push("--json");
        assert_eq!(seqs(&run(&a)), seqs(&all), "{extra:?}");
    }
    assert_eq!(
        stdout(&run(&["--max-num-seqs", "3"])),
        stdout(&run(&[])),
        "text"
    );
}

/// Prompts from 1 token to past two prefill chunks (512 tokens), mixed, through one slot
/// or all at once: each is its lone run (chunked prefill included).
#[test]
fn long_and_short_prompts_mixed_decode_as_alone() {
    let dir = TempDir::new("engine-hostile-long");
    let model = init_model(
        &dir,
        "long",
        &[
            "--n-layer",
            "1",
            "--n-embd",
            "32",
            "--n-head",
            "2",
            "--n-positions",
            "1100",
        ],
    );
    // Characters the byte-level tokenizer keeps apart often enough: lengths well spread.
    let text = |n: usize, salt: usize| -> String {
        (0..n)
            .map(|i| ["a", "q", "Z", "7", " ", "k"][(i * 7 + salt) % 6])
            .collect()
    };
    let prompts = [
        text(1, 0),
        text(1050, 1),
        text(5, 2),
        text(600, 3),
        text(520, 4),
    ];
    let limits = [9, 3, 14, 6, 2];
    let lines: Vec<Value> = prompts
        .iter()
        .zip(limits)
        .map(|(p, n)| serde_json::json!({"prompt": p, "max_new_tokens": n}))
        .collect();
    let f = prompts_file(&dir, "p.jsonl", &lines);
    let run = |file: &str, extra: &[&str]| {
        let mut a = vec![
            "infer",
            "--model",
            &model,
            "--prompts",
            file,
            "--json",
            "--ignore-eos",
        ];
        a.extend_from_slice(extra);
        let o = gpt2kit(&a);
        assert_ok(&o);
        seqs(&o)
    };
    let all = run(&f, &[]);
    for (i, line) in lines.iter().enumerate() {
        let g = prompts_file(&dir, &format!("{i}.jsonl"), std::slice::from_ref(line));
        let alone = run(&g, &[]);
        assert_eq!(all[i].1, alone[0].1, "prompt {i}");
        assert_eq!(all[i].1.len(), limits[i]);
    }
    assert_eq!(run(&f, &["--max-num-seqs", "1"]), all, "one slot");
}

fn run_lib(model: &Gpt2, reqs: Vec<Request>, cfg: &GenerationConfig, s: Schedule) -> Output {
    let ens = Ensemble::single(model);
    tch::no_grad(|| generate_requests(&ens, reqs, cfg, s, &|_| false, |_, _| {})).unwrap()
}

/// More than 128 sequences live in one step, on a model wide enough (n_embd 256) that
/// libtorch's GEMM and the decode kernel round differently: each sequence's logits must
/// still be those it gets alone. Prompts have distinct lengths, so every prefill pass
/// holds one prompt, as alone: only the step's row count differs.
#[test]
fn more_than_128_live_rows_score_as_alone() {
    let dir = TempDir::new("engine-hostile-wide");
    let model = init_model(
        &dir,
        "wide",
        &[
            "--n-layer",
            "1",
            "--n-embd",
            "256",
            "--n-head",
            "4",
            "--n-positions",
            "160",
        ],
    );
    let model = Gpt2::load_with(
        Path::new(&model),
        Some(Kind::Float),
        &[Device::Cpu],
        &EngineOptions::default(),
    )
    .unwrap();
    assert!(model.fuses_decode());
    let reqs: Vec<Request> = (1..=140usize)
        .map(|n| Request {
            prompt: (0..n)
                .map(|i| 1 + ((i * 31 + n * 17) % 399) as i64)
                .collect(),
            max_new_tokens: 2,
            settings: None,
            adapter: None,
        })
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 1,
        ..GenerationConfig::default()
    };
    let together = run_lib(&model, reqs.clone(), &cfg, Schedule::default());
    // Through at most 128 rows at once, for comparison.
    let s = Schedule {
        max_num_seqs: Some(128),
        static_batches: false,
    };
    let bounded = run_lib(&model, reqs.clone(), &cfg, s);
    let mut differ = Vec::new();
    for (i, r) in reqs.iter().enumerate().step_by(7) {
        let alone = run_lib(&model, vec![r.clone()], &cfg, Schedule::default());
        assert_eq!(
            alone.sequences[0], bounded.sequences[i],
            "request {i}, ≤ 128 rows"
        );
        if alone.sequences[0] != together.sequences[i] {
            differ.push(i);
        }
    }
    assert!(
        differ.is_empty(),
        "requests {differ:?} differ from their lone runs"
    );
}
