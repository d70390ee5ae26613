//! What a user can type into `gpt2kit infer` that once crashed it, was silently ignored or
//! was blamed on the wrong input: a step with no token to pick (every token banned, or
//! NaN scores), generation_config.json keys (read as transformers reads them, refused,
//! or warned about), bounds on beams, ensemble flags without an ensemble, prompt files,
//! `--stats` and a stderr that cannot be written.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{assert_clean_failure, gpt2kit, python, reference, stderr, stdout};
use serde_json::{json, Value};

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gpt2kit-robust-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small random model with the reference tokenizer (400 tokens) and a context long
/// enough to use up every token under `--no-repeat-ngram-size 1`.
fn long_context_model(dir: &Path) -> PathBuf {
    let out = dir.join("long");
    let o = gpt2kit(&[
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        s(&reference("hub-tied")),
        "--out",
        s(&out),
        "--n-positions",
        "1024",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

/// A copy of the hub-tied reference model whose final layer norm weight is NaN, so that
/// every logit is NaN.
/// A model whose weights are finite (the loader refuses NaN weights) but whose
/// final layer norm scales every hidden value to f32::MAX: the head's products
/// overflow, and the scores are infinities and NaN.
fn nan_model(dir: &Path) -> PathBuf {
    let src = reference("hub-tied");
    let out = dir.join("nan");
    std::fs::create_dir_all(&out).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, out.join(f.file_name().unwrap())).unwrap();
    }
    let tensors = tch::Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    let tensors: Vec<(String, tch::Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| {
            let t = if n.ends_with("ln_f.weight") {
                t.full_like(f32::MAX as f64)
            } else {
                t
            };
            (n, t)
        })
        .collect();
    tch::Tensor::write_safetensors(&tensors, out.join("model.safetensors")).unwrap();
    out
}

fn json_lines(o: &std::process::Output) -> Vec<Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_token_banned_stops_with_an_error_naming_the_step() {
    let dir = scratch("banned");
    let model = long_context_model(&dir);
    // 400 tokens, none repeated: after the prompt and 400 - prompt tokens nothing is left.
    let base = [
        "infer",
        "--model",
        s(&model),
        "--prompt",
        "Hello",
        "--no-repeat-ngram-size",
        "1",
        "--ignore-eos",
        "--max-new-tokens",
        "600",
    ];
    for extra in [
        &["--do-sample"][..],
        &[],
        &["--num-beams", "2"],
        &["--prompt-lookup", "2"],
        &["--prompt-lookup", "2", "--do-sample"],
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let o = gpt2kit(&args);
        assert_clean_failure(&o, 2, "every token is banned");
        assert!(stderr(&o).contains("step 3"), "{extra:?}: {}", stderr(&o));
    }
    // Beam sampling draws 2 continuations per beam without replacement: it needs that
    // many allowed tokens, and says so before there are none.
    let args: Vec<&str> = base
        .iter()
        .chain(&["--num-beams", "2", "--do-sample"])
        .copied()
        .collect();
    let o = gpt2kit(&args);
    assert_clean_failure(&o, 2, "step 3");
    assert!(stderr(&o).contains("allowed"), "{}", stderr(&o));
    // Every token suppressed by a generation config: the first step.
    let all: Vec<i64> = (0..400).collect();
    let file = dir.join("generation_config.json");
    std::fs::write(&file, json!({ "suppress_tokens": all }).to_string()).unwrap();
    let o = gpt2kit(&[
        "infer",
        "--model",
        s(&model),
        "--prompt",
        "Hello",
        "--generation-config",
        s(&file),
    ]);
    assert_clean_failure(&o, 2, "step 1: every token is banned");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nan_scores_stop_with_an_error_naming_the_step() {
    let dir = scratch("nan");
    let nan = nan_model(&dir);
    let good = reference("hub-tied");
    let cases: [(&Path, &[&str]); 9] = [
        (&nan, &[]),
        (&nan, &["--do-sample", "--seed", "1"]),
        (&nan, &["--num-beams", "2"]),
        (&nan, &["--num-beams", "2", "--do-sample"]),
        (&nan, &["--prompt-lookup", "2", "--do-sample"]),
        (&nan, &["--draft-model", s(&good)]),
        (&good, &["--draft-model", s(&nan), "--do-sample"]),
        (&nan, &["--ensemble", s(&good), "--do-sample"]),
        (
            &nan,
            &[
                "--ensemble",
                s(&good),
                "--ensemble-mode",
                "vote",
                "--do-sample",
            ],
        ),
    ];
    for (model, extra) in cases {
        let mut args = vec!["infer", "--model", s(model), "--prompt", "Hello"];
        args.extend(extra);
        let o = gpt2kit(&args);
        assert_clean_failure(&o, 2, "step 1: the scores");
        assert!(
            stderr(&o).contains("not finite"),
            "{extra:?}: {}",
            stderr(&o)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Our tokens for each case against transformers' `generate` with the same settings
/// (greedy and beams: identical tokens; sampled: the same seed gives the same tokens).
#[test]
fn generation_config_processors_and_stop_strings_match_transformers() {
    let dir = scratch("genconfig");
    let model = reference("hub-tied");
    let prompt = "The quick brown fox";
    let run = |extra: &[&str]| {
        let mut args = vec![
            "infer",
            "--model",
            s(&model),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "8",
            "--json",
        ];
        args.extend(extra);
        let o = gpt2kit(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        json_lines(&o)
    };
    let plain = run(&[]).remove(0);
    let ids: Vec<i64> = plain["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert!(ids.len() >= 3, "{plain}");
    let text = plain["text"].as_str().unwrap();
    let stop: String = text.chars().skip(1).take(2).collect();
    let cases = [
        json!({"suppress_tokens": [ids[0], ids[1], ids[2]]}),
        json!({"begin_suppress_tokens": [ids[0]]}),
        json!({"forced_eos_token_id": 7}),
        json!({"forced_eos_token_id": [7, 9], "max_length": 9}),
        json!({"sequence_bias": [[[ids[0], ids[1]], -100.0], [[11], 4.0]]}),
        json!({"stop_strings": [stop]}),
        json!({"num_beams": 3, "suppress_tokens": [ids[0]], "forced_eos_token_id": 5,
               "sequence_bias": [[[12], 2.5]]}),
        json!({"do_sample": true, "top_k": 20, "begin_suppress_tokens": [ids[0]],
               "sequence_bias": [[[ids[0], ids[1]], 3.0]], "seed": 7}),
    ];
    let cases_file = dir.join("cases.json");
    std::fs::write(&cases_file, Value::from(cases.to_vec()).to_string()).unwrap();
    let script = r#"
import json, sys, torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
torch.set_num_threads(2)
model_dir, prompt, cases = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
tok = PreTrainedTokenizerFast(tokenizer_file=model_dir + "/tokenizer.json")
ids = torch.tensor([tok.encode(prompt)])
out = []
for case in cases:
    kw = dict(case)
    seed = kw.pop("seed", None)
    if "max_length" not in kw:
        kw["max_new_tokens"] = 8
    if seed is not None:
        torch.manual_seed(seed)
    seq = model.generate(ids, attention_mask=torch.ones_like(ids), tokenizer=tok, **kw)
    out.append(seq[0, ids.shape[1]:].tolist())
print(json.dumps(out))
"#;
    let py = Command::new(python())
        .args(["-c", script, s(&model), prompt, s(&cases_file)])
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", stderr(&py));
    let want: Vec<Vec<i64>> = serde_json::from_slice(&py.stdout).unwrap();
    for (i, (case, want)) in cases.iter().zip(&want).enumerate() {
        let mut settings = case.clone();
        let seed = settings.as_object_mut().unwrap().remove("seed");
        let file = dir.join(format!("case{i}.json"));
        std::fs::write(&file, settings.to_string()).unwrap();
        let mut extra = vec!["--generation-config", s(&file)];
        let seed = seed.map(|v| v.to_string());
        if let Some(seed) = &seed {
            extra.extend(["--seed", seed]);
        }
        if case.get("max_length").is_some() {
            // --max-new-tokens (set by `run`) would replace the file's max_length.
            let mut args = vec!["infer", "--model", s(&model), "--prompt", prompt, "--json"];
            args.extend(&extra);
            let o = gpt2kit(&args);
            assert!(o.status.success(), "{case}: {}", stderr(&o));
            assert_eq!(json_lines(&o)[0]["token_ids"], json!(want), "{case}");
            continue;
        }
        let got = run(&extra).remove(0);
        assert_eq!(got["token_ids"], json!(want), "{case}");
        assert_ne!(
            got["token_ids"], plain["token_ids"],
            "{case} changed nothing"
        );
        if case.get("stop_strings").is_some() {
            assert_eq!(got["finish_reason"], "stop", "{got}");
            // --stop replaces the file's stop strings.
            let other = run(&["--generation-config", s(&file), "--stop", "\u{1}"]).remove(0);
            assert_eq!(other["token_ids"], plain["token_ids"]);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generation_config_keys_are_read_refused_or_warned_about() {
    let dir = scratch("keys");
    let model = reference("hub-tied");
    let file = dir.join("generation_config.json");
    let run = |config: Value| {
        std::fs::write(&file, config.to_string()).unwrap();
        gpt2kit(&[
            "infer",
            "--model",
            s(&model),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "3",
            "--generation-config",
            s(&file),
        ])
    };
    // A setting transformers applies and gpt2kit does not: refused, naming file and key.
    for (key, value) in [
        ("guidance_scale", json!(1.5)),
        ("renormalize_logits", json!(true)),
        ("forced_bos_token_id", json!(3)),
        ("num_beam_groups", json!(2)),
    ] {
        let o = run(json!({ key: value }));
        assert_clean_failure(&o, 1, &format!("`{key}`"));
        assert!(
            stderr(&o).contains("generation_config.json"),
            "{}",
            stderr(&o)
        );
    }
    // Their no-op values, and bookkeeping, change nothing and pass quietly.
    let o = run(
        json!({"guidance_scale": 1.0, "num_beam_groups": 1, "renormalize_logits": false,
                       "transformers_version": "4.57.0", "_from_model_config": true,
                       "bos_token_id": 0, "use_cache": true, "forced_bos_token_id": null}),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    // A key neither gpt2kit nor transformers knows: a warning (transformers keeps it as an
    // attribute nothing reads), naming file and key.
    let o = run(json!({"temprature": 0.1}));
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("warning")
            && err.contains("generation_config.json")
            && err.contains("`temprature`"),
        "{err}"
    );
    // Bad values from the file name the file and key, not a flag.
    for (config, key) in [
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"do_sample": true, "temperature": 0}), "temperature"),
        (
            json!({"num_beams": 2, "num_return_sequences": 3}),
            "num_return_sequences",
        ),
        (json!({"eos_token_id": 100000}), "eos_token_id"),
        (json!({"suppress_tokens": [100000]}), "suppress_tokens"),
        (json!({"sequence_bias": [[[], 1.0]]}), "sequence_bias"),
        (json!({"max_new_tokens": 500}), "max_new_tokens"),
    ] {
        let mut args = vec![
            "infer",
            "--model",
            s(&model),
            "--prompt",
            "Hello",
            "--generation-config",
            s(&file),
        ];
        std::fs::write(&file, config.to_string()).unwrap();
        if key != "max_new_tokens" {
            args.extend(["--max-new-tokens", "3"]);
        }
        let o = gpt2kit(&args);
        assert_clean_failure(&o, 2, &format!("generation_config.json: `{key}`"));
        let flag = format!("--{}", key.replace('_', "-"));
        assert!(!stderr(&o).contains(&flag), "{}", stderr(&o));
    }
    // A flag that replaces the file's bad value wins, and is what an error names.
    std::fs::write(&file, json!({"top_p": 1.5}).to_string()).unwrap();
    let with = |top_p: &str| {
        gpt2kit(&[
            "infer",
            "--model",
            s(&model),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "3",
            "--generation-config",
            s(&file),
            "--top-p",
            top_p,
        ])
    };
    assert!(with("0.9").status.success());
    assert_clean_failure(&with("2"), 2, "--top-p must be in (0, 1]");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn beams_are_bounded_by_the_vocabulary() {
    let model = reference("hub-tied");
    let base = [
        "infer",
        "--model",
        s(&model),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "2",
    ];
    let with = |n: &str| {
        let mut args = base.to_vec();
        args.extend(["--num-beams", n]);
        gpt2kit(&args)
    };
    // vocab_size 400: 100000 beams once allocated a 2.8 GB cache.
    let o = with("100000");
    assert_clean_failure(&o, 2, "--num-beams 100000");
    assert!(stderr(&o).contains("400"), "{}", stderr(&o));
    assert_clean_failure(&with("401"), 2, "--num-beams");
    assert!(with("8").status.success());
}

#[test]
fn ensemble_flags_need_an_ensemble() {
    let model = reference("hub-tied");
    let base = [
        "infer",
        "--model",
        s(&model),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "2",
    ];
    for (extra, flag) in [
        (&["--ensemble-mode", "vote"][..], "--ensemble-mode"),
        (&["--ensemble-mode", "mean-prob"], "--ensemble-mode"),
        (&["--ensemble-weights", "1"], "--ensemble-weights"),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        assert_clean_failure(&gpt2kit(&args), 2, flag);
    }
    let mut args = base.to_vec();
    args.extend(["--ensemble", s(&model), "--ensemble-mode", "vote"]);
    assert!(gpt2kit(&args).status.success());
}

#[test]
fn prompts_files_take_prompt_or_text_or_the_named_field() {
    let dir = scratch("prompts");
    let model = reference("hub-tied");
    let file = dir.join("prompts.jsonl");
    let run = |content: &str, extra: &[&str]| {
        std::fs::write(&file, content).unwrap();
        let mut args = vec![
            "infer",
            "--model",
            s(&model),
            "--prompts",
            s(&file),
            "--max-new-tokens",
            "2",
            "--json",
        ];
        args.extend(extra);
        gpt2kit(&args)
    };
    // train's data files hold `text`.
    let o = run(
        "{\"text\": \"Hello\"}\n{\"prompt\": \"The quick\", \"text\": \"x\"}\n",
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_lines(&o).len(), 2);
    let o = run("{\"body\": \"Hello\"}\n", &["--text-field", "body"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_clean_failure(
        &run(
            "{\"body\": \"Hello\"}\n{\"text\": \"Hi\"}\n",
            &["--text-field", "body"],
        ),
        2,
        "prompts.jsonl:2: expected an object with a \"body\" string",
    );
    assert_clean_failure(
        &run("{\"text\": \"Hello\"}\n{\"title\": \"Hi\"}\n", &[]),
        2,
        "prompts.jsonl:2: expected an object with a \"prompt\" or \"text\" string",
    );
    assert_clean_failure(
        &run("{\"text\": 3}\n", &[]),
        2,
        "prompts.jsonl:1: \"text\" is not a string",
    );
    assert_clean_failure(
        &run("[\"Hello\"]\n", &[]),
        2,
        "prompts.jsonl:1: expected an object",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--stats`' `steps`: forward passes of the target model (the prompt's included).
#[test]
fn stats_steps_count_forward_passes() {
    let model = reference("hub-tied");
    let stats = |extra: &[&str]| {
        let mut args = vec![
            "infer",
            "--model",
            s(&model),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--stats",
        ];
        args.extend(extra);
        let o = gpt2kit(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_str(stderr(&o).trim()).unwrap();
        (
            v["steps"].as_u64().unwrap(),
            v["generated_tokens"].as_u64().unwrap(),
        )
    };
    assert_eq!(stats(&[]), (12, 12));
    // Beams: one pass per step, however many beams.
    assert_eq!(stats(&["--num-beams", "3"]).0, 12);
    // The model drafting for itself: every greedy draft is accepted, so each pass yields
    // the 4 drafts and the target's own token (12 tokens: 5 + 5 + 2).
    let (steps, tokens) = stats(&["--draft-model", s(&model), "--num-draft-tokens", "4"]);
    assert_eq!(tokens, 12);
    assert_eq!(steps, 3);
}

#[test]
fn stats_on_an_unwritable_stderr_do_not_crash() {
    let model = reference("hub-tied");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .env("GPT2KIT_PACKED_CACHE", "off")
        .args([
            "infer",
            "--model",
            s(&model),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "3",
            "--stats",
        ])
        .stdout(Stdio::piped())
        .stderr(full)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).starts_with("Hello"), "{}", stdout(&o));
}
