//! End-to-end tests of the `gpt2kit` binary on the reference models: output, exit
//! codes (2 for bad flags and inputs, 1 for other failures), no panics or backtraces,
//! and a closed stdout.
mod common;

use common::{assert_clean_failure, gpt2kit, reference, stderr};
use std::io::Read;
use std::process::{Command, Output, Stdio};

fn expected(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(reference(name).join("expected.json")).unwrap())
        .unwrap()
}

#[test]
fn inspect_reports_shape_and_parameters() {
    let model = reference("hub-tied");
    let o = gpt2kit(&["inspect", "--model", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("n_layer 2 · n_head 4 · n_embd 64"), "{text}");
    let o = gpt2kit(&["inspect", "--model", model.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Parameters of the config: wte + wpe + 2 blocks + ln_f, head tied.
    let (e, vocab, p) = (64, v["config"]["vocab_size"].as_i64().unwrap(), 64);
    let block = 12 * e * e + 13 * e;
    assert_eq!(
        v["parameters"].as_i64().unwrap(),
        vocab * e + p * e + 2 * block + 2 * e
    );
    assert_eq!(v["dtype"], "f32");
}

#[test]
fn infer_greedy_equals_transformers_single_and_batched() {
    for name in ["hub-tied", "prefixed-untied", "sharded-f16"] {
        let model = reference(name);
        let exp = expected(name);
        let n = exp["max_new_tokens"].to_string();
        let prompts: Vec<&str> = exp["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        // One prompt alone, then all prompts as one batch.
        let mut args = vec![
            "infer",
            "--model",
            model.to_str().unwrap(),
            "--max-new-tokens",
            &n,
            "--json",
        ];
        for p in &prompts {
            args.extend(["--prompt", p]);
        }
        let single = gpt2kit(&[&args[..6], &args[6..8]].concat());
        let batch = gpt2kit(&args);
        for (o, key, rows) in [
            (&single, "greedy", 1),
            (&batch, "greedy_batch", prompts.len()),
        ] {
            assert!(o.status.success(), "{name}: {}", stderr(o));
            let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.len(), rows);
            for (i, line) in lines.iter().enumerate() {
                assert_eq!(line["prompt_index"], i);
                assert_eq!(line["token_ids"], exp[key][i], "{name} {key} row {i}");
            }
        }
    }
}

#[test]
fn infer_prints_prompt_and_continuation() {
    let model = reference("hub-tied");
    let o = gpt2kit(&[
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("Hello"));
}

#[test]
fn bad_input_gives_clear_errors_and_exit_codes() {
    let model = reference("hub-tied");
    let m = model.to_str().unwrap();
    assert_clean_failure(
        &gpt2kit(&["infer", "--model", "/no/such/model", "--prompt", "x"]),
        1,
        "/no/such/model",
    );
    assert_clean_failure(
        &gpt2kit(&["inspect", "--model", "/no/such/model"]),
        1,
        "does not exist",
    );
    assert_clean_failure(
        &gpt2kit(&["infer", "--model", m, "--prompt", ""]),
        2,
        "empty",
    );
    let long = "the model reads every weight ".repeat(40);
    assert_clean_failure(
        &gpt2kit(&["infer", "--model", m, "--prompt", &long]),
        2,
        "n_positions 64",
    );
    assert_clean_failure(
        &gpt2kit(&[
            "infer",
            "--model",
            m,
            "--prompt",
            "x",
            "--max-new-tokens",
            "0",
        ]),
        2,
        "--max-new-tokens",
    );
    assert_clean_failure(
        &gpt2kit(&["infer", "--model", m, "--prompt", "x", "--device", "tpu"]),
        2,
        "--device",
    );
    assert_clean_failure(
        &gpt2kit(&["infer", "--model", m, "--prompt", "x", "--dtype", "f64"]),
        2,
        "--dtype",
    );
    assert_clean_failure(&gpt2kit(&["infer", "--model", m]), 2, "--prompt");
    if !tch::Cuda::is_available() {
        assert_clean_failure(
            &gpt2kit(&["infer", "--model", m, "--prompt", "x", "--device", "cuda"]),
            2,
            "CUDA is not available",
        );
    }
}

#[test]
fn cuda_is_loaded_only_when_asked_for_and_then_registers_its_backend() {
    // The binary does not link libtorch_cuda.so; `--device cuda` loads it. Where the
    // libtorch has it and the machine has no NVIDIA driver, the error must be the CUDA
    // backend's own ("Found no NVIDIA driver"): had loading not registered the backend,
    // libtorch would say it cannot run the op on the 'CUDA' backend instead.
    let lib = std::path::Path::new(env!("LIBTORCH")).join("lib/libtorch_cuda.so");
    if !lib.exists() || std::path::Path::new("/dev/nvidiactl").exists() {
        eprintln!("skipped: no libtorch_cuda.so, or an NVIDIA driver is present");
        return;
    }
    let model = reference("hub-tied");
    let m = model.to_str().unwrap();
    let o = gpt2kit(&["infer", "--model", m, "--prompt", "x", "--device", "cuda"]);
    assert_clean_failure(&o, 2, "Found no NVIDIA driver");
}

#[test]
fn sampling_and_beam_values_are_refused_with_the_flag_name() {
    let model = reference("hub-tied");
    let m = model.to_str().unwrap();
    let base = ["infer", "--model", m, "--prompt", "Hello"];
    let cases: &[(&[&str], &str)] = &[
        (&["--do-sample", "--temperature", "0"], "--temperature"),
        (&["--do-sample", "--temperature", "-1"], "--temperature"),
        (&["--do-sample", "--temperature", "NaN"], "--temperature"),
        (&["--top-p", "0"], "--top-p"),
        (&["--top-p", "1.5"], "--top-p"),
        (&["--top-k", "-2"], "--top-k"),
        (&["--min-p", "2"], "--min-p"),
        (&["--typical-p", "0"], "--typical-p"),
        (&["--epsilon-cutoff", "1"], "--epsilon-cutoff"),
        (&["--num-beams", "0"], "--num-beams"),
        (
            &["--num-beams", "2", "--num-return-sequences", "3"],
            "--num-return-sequences",
        ),
        (&["--num-return-sequences", "2"], "--num-return-sequences"),
        (&["--repetition-penalty", "0"], "--repetition-penalty"),
        (&["--early-stopping", "maybe"], "--early-stopping"),
        (&["--eos-token-id", "100000"], "--eos-token-id"),
        (&["--max-time", "0"], "--max-time"),
        (&["--stream", "--num-beams", "2"], "--stream"),
        (&["--max-length", "1"], "--max-length"),
    ];
    for (extra, flag) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        assert_clean_failure(&gpt2kit(&args), 2, flag);
    }
}

#[test]
fn prompts_file_errors_name_file_and_line() {
    let model = reference("hub-tied");
    let dir = std::env::temp_dir().join(format!("gpt2kit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("prompts.jsonl");
    std::fs::write(&file, "{\"prompt\": \"Hello\"}\n\n{\"prompt\": 3}\n").unwrap();
    let o = gpt2kit(&[
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        file.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, 2, "prompts.jsonl:3");
    std::fs::write(
        &file,
        "{\"prompt\": \"Hello\"}\r\n{\"prompt\": \"The quick\"}\n",
    )
    .unwrap();
    let o = gpt2kit(&[
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        file.to_str().unwrap(),
        "--json",
        "--max-new-tokens",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stream_prints_what_the_plain_run_prints() {
    let model = reference("prefixed-untied");
    let m = model.to_str().unwrap();
    let plain = gpt2kit(&[
        "infer",
        "--model",
        m,
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "12",
    ]);
    let streamed = gpt2kit(&[
        "infer",
        "--model",
        m,
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "12",
        "--stream",
    ]);
    assert!(
        plain.status.success() && streamed.status.success(),
        "{}",
        stderr(&streamed)
    );
    assert_eq!(plain.stdout, streamed.stdout);
}

#[test]
fn json_fields_stats_and_stop_strings() {
    let model = reference("hub-tied");
    let m = model.to_str().unwrap();
    let o = gpt2kit(&[
        "infer",
        "--model",
        m,
        "--prompt",
        "Hello",
        "--num-beams",
        "3",
        "--num-return-sequences",
        "2",
        "--max-new-tokens",
        "6",
        "--json",
        "--stats",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (j, l) in lines.iter().enumerate() {
        assert_eq!(l["sequence_index"], j);
        let n = l["token_ids"].as_array().unwrap().len();
        assert_eq!(l["logprobs"].as_array().unwrap().len(), n);
        assert!(l["score"].as_f64().unwrap() <= 0.0);
        assert!(["eos", "length"].contains(&l["finish_reason"].as_str().unwrap()));
    }
    assert!(
        lines[0]["score"].as_f64() >= lines[1]["score"].as_f64(),
        "beams best first"
    );
    let stats: serde_json::Value = serde_json::from_str(stderr(&o).trim()).unwrap();
    for key in [
        "prompt_tokens",
        "generated_tokens",
        "prefill_ms",
        "decode_ms",
        "decode_tokens_per_s",
        "peak_rss_mb",
    ] {
        assert!(stats.get(key).is_some(), "{key} missing from {stats}");
    }
    // A stop string taken from the plain run's own output stops it there.
    let plain = gpt2kit(&[
        "infer",
        "--model",
        m,
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    let text = v["text"].as_str().unwrap();
    let stop: String = text.chars().take(2).collect();
    let o = gpt2kit(&[
        "infer",
        "--model",
        m,
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "12",
        "--json",
        "--stop",
        &stop,
    ]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["finish_reason"], "stop");
    assert!(s["text"].as_str().unwrap().contains(&stop));
    assert!(s["token_ids"].as_array().unwrap().len() < 12);
}

#[test]
fn ensembles_from_the_command_line() {
    let a = reference("sharded-f16");
    let b = reference("bf16-quickgelu");
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let base = [
        "infer",
        "--model",
        a,
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "6",
        "--json",
    ];
    for mode in ["mean-prob", "mean-logprob", "rerank", "vote"] {
        let args: Vec<&str> = base
            .iter()
            .copied()
            .chain([
                "--ensemble",
                b,
                "--ensemble-mode",
                mode,
                "--num-beams",
                "2",
                "--num-return-sequences",
                "2",
            ])
            .collect();
        let o = gpt2kit(&args);
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).lines().count(),
            2,
            "{mode}"
        );
    }
    let other = reference("hub-tied");
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--ensemble", other.to_str().unwrap()])
        .collect();
    assert_clean_failure(&gpt2kit(&args), 2, "tokenizer differs");
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--ensemble", b, "--ensemble-weights", "1,2,3"])
        .collect();
    assert_clean_failure(&gpt2kit(&args), 2, "--ensemble-weights");
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--ensemble", b, "--ensemble-mode", "average"])
        .collect();
    assert_clean_failure(&gpt2kit(&args), 2, "--ensemble-mode");
}

#[test]
fn speculative_decoding_from_the_command_line() {
    let t = reference("sharded-f16");
    let d = reference("bf16-quickgelu");
    let (t, d) = (t.to_str().unwrap(), d.to_str().unwrap());
    let base = [
        "infer",
        "--model",
        t,
        "--prompt",
        "Hello",
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "10",
        "--json",
    ];
    let plain = gpt2kit(&base);
    assert!(plain.status.success(), "{}", stderr(&plain));
    for extra in [
        vec!["--draft-model", d, "--num-draft-tokens", "3"],
        vec!["--prompt-lookup", "4"],
    ] {
        let args: Vec<&str> = base
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .chain(["--stats"])
            .collect();
        let o = gpt2kit(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let ids = |out: &[u8]| -> Vec<serde_json::Value> {
            String::from_utf8_lossy(out)
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["token_ids"].clone())
                .collect()
        };
        assert_eq!(
            ids(&o.stdout),
            ids(&plain.stdout),
            "greedy speculative must equal the target alone"
        );
        let stats: serde_json::Value = serde_json::from_str(stderr(&o).trim()).unwrap();
        assert!(
            stats["acceptance_rate"].as_f64().is_some()
                && stats["tokens_per_step"].as_f64().unwrap() >= 1.0,
            "{stats}"
        );
    }
    let hub = reference("hub-tied");
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--draft-model", hub.to_str().unwrap()])
        .collect();
    assert_clean_failure(&gpt2kit(&args), 2, "tokenizer differs");
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--draft-model", d, "--num-beams", "2"])
        .collect();
    assert_clean_failure(&gpt2kit(&args), 2, "--num-beams");
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--prompt-lookup", "0"])
        .collect();
    assert_clean_failure(&gpt2kit(&args), 2, "--prompt-lookup");
}

#[test]
fn tensor_parallel_from_the_command_line() {
    let model = reference("hub-tied");
    let m = model.to_str().unwrap();
    let base = [
        "infer",
        "--model",
        m,
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "8",
        "--json",
    ];
    let ids = |o: &Output| -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["token_ids"].clone()
    };
    let plain = gpt2kit(&base);
    for extra in [
        vec!["--devices", "cpu,cpu"],
        vec!["--tp", "4", "--devices", "cpu,cpu,cpu,cpu"],
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let o = gpt2kit(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(ids(&o), ids(&plain));
    }
    let with = |extra: &[&'static str]| -> Vec<&str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    assert_clean_failure(
        &gpt2kit(&with(&["--tp", "3", "--devices", "cpu,cpu,cpu"])),
        2,
        "4 attention heads",
    );
    assert_clean_failure(
        &gpt2kit(&with(&["--tp", "2", "--devices", "cpu"])),
        2,
        "--tp 2 needs 2 --devices",
    );
    assert_clean_failure(&gpt2kit(&with(&["--devices", "cpu,cuda:7"])), 2, "--device");
    if !tch::Cuda::is_available() {
        assert_clean_failure(&gpt2kit(&with(&["--tp", "2"])), 2, "CUDA devices");
    }
}

/// Long flags of a subcommand, from its `--help`.
fn help_flags(sub: &str) -> std::collections::BTreeSet<String> {
    let mut args: Vec<&str> = sub.split(' ').collect();
    args.push("--help");
    let o = gpt2kit(&args);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    text.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_alphanumeric())
                .to_string()
        })
        .filter(|w| w != "--help" && w != "--version")
        .collect()
}

#[test]
fn readme_documents_every_flag_and_no_other() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for sub in [
        "inspect",
        "init",
        "tokenizer train",
        "train",
        "eval",
        "quantize",
        "dequantize",
        "merge-lora",
        "infer",
        "serve",
        "launch",
    ] {
        // The section of this subcommand: from its heading to the next heading.
        let head = format!("### `gpt2kit {sub}");
        let start = readme
            .find(&head)
            .unwrap_or_else(|| panic!("README has no {head} section"));
        let section = &readme[start..];
        let end = ["\n## ", "\n### "]
            .iter()
            .filter_map(|h| section[4..].find(h))
            .min()
            .map_or(section.len(), |e| e + 4);
        let section = &section[..end];
        let documented: std::collections::BTreeSet<String> = section
            .split(|c: char| !(c.is_alphanumeric() || c == '-'))
            .filter(|w| {
                w.starts_with("--") && w.as_bytes().get(2).is_some_and(u8::is_ascii_alphabetic)
            })
            .map(str::to_string)
            .collect();
        let flags = help_flags(sub);
        let missing: Vec<_> = flags.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&flags).collect();
        assert!(
            missing.is_empty(),
            "README's {sub} section lacks {missing:?}"
        );
        assert!(
            stale.is_empty(),
            "README's {sub} section documents unknown flags {stale:?}"
        );
    }
}

/// The commands of the README's usage section, `\`-continued lines joined, split into
/// words as the shell would for these simple lines (double quotes group words).
fn readme_usage_commands() -> Vec<Vec<String>> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("\n## Usage")
        .expect("README has a ## Usage section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let joined = section.replace("\\\n", " ");
    let mut commands = Vec::new();
    for line in joined.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("gpt2kit ") else {
            continue;
        };
        let rest = rest.split(" #").next().unwrap();
        let (mut words, mut word, mut quoted) = (Vec::new(), String::new(), false);
        for c in rest.chars() {
            match c {
                '"' => quoted = !quoted,
                ' ' if !quoted => {
                    if !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                }
                c => word.push(c),
            }
        }
        if !word.is_empty() {
            words.push(word);
        }
        commands.push(words);
    }
    commands
}

#[test]
fn every_readme_usage_command_parses() {
    let commands = readme_usage_commands();
    assert!(
        commands.len() >= 8,
        "the usage section shows only {} commands",
        commands.len()
    );
    let mut seen = std::collections::BTreeSet::new();
    for words in commands {
        seen.insert(words[0].clone());
        let o = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
            .env("GPT2KIT_PACKED_CACHE", "off")
            .args(&words)
            .arg("--parse-only")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "README usage command `gpt2kit {}` does not parse:\n{}",
            words.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    for sub in ["init", "tokenizer", "train", "eval", "quantize", "infer"] {
        assert!(
            seen.contains(sub),
            "the usage section never runs `gpt2kit {sub}`"
        );
    }
}

#[test]
fn parse_only_still_refuses_bad_flags() {
    // The usage test is only meaningful if parse-only mode rejects what clap rejects.
    for args in [
        &["infer", "--no-such-flag", "--parse-only"][..],
        &[
            "infer",
            "--model",
            "m",
            "--prompt",
            "x",
            "--seed",
            "-1",
            "--parse-only",
        ],
        &[
            "infer",
            "--model",
            "m",
            "--prompt",
            "x",
            "--dtype",
            "f64",
            "--parse-only",
        ],
        &["--parse-only", "tokenizer", "train", "--out", "t"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
            .env("GPT2KIT_PACKED_CACHE", "off")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
    }
    // And that it runs nothing: no model folder is read.
    let o = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .env("GPT2KIT_PACKED_CACHE", "off")
        .args([
            "infer",
            "--model",
            "/no/such/model",
            "--prompt",
            "x",
            "--parse-only",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn choice_flags_take_every_spelling_and_list_their_values() {
    let infer = ["infer", "--model", "m", "--prompt", "x"];
    let train = ["train", "--model", "m", "--data", "d", "--output", "o"];
    let quantize = ["quantize", "--model", "m", "--out", "o", "--method"];
    let init = ["init", "--tokenizer", "t", "--out", "o", "--preset"];
    let parses = |base: &[&str], extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let o = gpt2kit(&[&args[..], &["--parse-only"]].concat());
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    for dtype in [
        "f32", "float32", "fp32", "f16", "float16", "fp16", "half", "bf16",
    ] {
        parses(&infer, &["--dtype", dtype]);
    }
    parses(
        &["eval", "--model", "m", "--data", "d"],
        &["--dtype", "bfloat16"],
    );
    parses(
        &["eval", "--model", "m", "--data", "d"],
        &["--dtype", "auto"],
    );
    for mode in ["mean-prob", "mean-logprob", "rerank", "vote"] {
        parses(&infer, &["--ensemble-mode", mode]);
    }
    for rule in ["true", "false", "never"] {
        parses(&infer, &["--early-stopping", rule]);
    }
    for s in ["constant", "constant_with_warmup", "linear", "cosine"] {
        parses(&train, &["--lr-scheduler", s, "--dtype", "bfloat16"]);
    }
    parses(&train, &["--dtype", "fp32"]);
    for m in ["int8-weight", "int8-dynamic", "none"] {
        parses(
            &quantize,
            &[m, "--prune-scope", "global", "--prune-pattern", "2:4"],
        );
    }
    for p in [
        "tiny",
        "small",
        "gpt2",
        "gpt2-medium",
        "gpt2-large",
        "gpt2-xl",
        "distilgpt2",
    ] {
        parses(&init, &[p]);
    }
    // Any other value is refused before anything runs, naming the flag and the values.
    let refused: [(&[&str], &[&str], &str, &str); 6] = [
        (
            &infer,
            &["--dtype", "F32"],
            "--dtype",
            "f32, f16, bf16, auto",
        ),
        (
            &infer,
            &["--early-stopping", "1"],
            "--early-stopping",
            "true, false, never",
        ),
        (&train, &["--dtype", "f16"], "--dtype", "f32, bf16"),
        (
            &quantize,
            &["int4"],
            "--method",
            "int8-weight, int8-dynamic, none",
        ),
        (
            &quantize,
            &["none", "--prune-scope", "row"],
            "--prune-scope",
            "layer, global",
        ),
        (
            &init,
            &["gpt3"],
            "--preset",
            "tiny, small, gpt2, gpt2-medium,",
        ),
    ];
    for (base, extra, flag, values) in refused {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let o = gpt2kit(&args);
        assert_clean_failure(&o, 2, &format!("for '{flag} <"));
        assert!(
            stderr(&o).contains(&format!("[possible values: {values}")),
            "{args:?}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn closed_stdout_is_not_an_error() {
    let model = reference("hub-tied");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .env("GPT2KIT_PACKED_CACHE", "off")
        .args([
            "infer",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Hello",
            "--prompt",
            "The quick",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before anything is written
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(err.is_empty(), "{err}");
}
