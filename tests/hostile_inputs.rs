//! Inputs found by attacking the CLI that once panicked, aborted or were silently
//! ignored: limits near `usize::MAX`, a time limit past `Duration`'s range, a tokenizer
//! whose ids skip past `vocab_size`, folder names that are not UTF-8, absurd sizes
//! for `tokenizer train` and `init`, a `generation_config.json` that is a folder, zero
//! calibration samples, and a `--prompts` file with a byte order mark.
mod common;

use common::{assert_clean_failure, assert_ok, gpt2kit, reference, stdout, TempDir};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn infer(model: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hello",
    ];
    args.extend_from_slice(extra);
    gpt2kit(&args)
}

#[test]
fn generation_limits_near_the_integer_limits_are_refused_or_unbounded() {
    let model = reference("hub-tied");
    for flag in ["--max-new-tokens", "--max-length"] {
        for v in ["18446744073709551615", "9223372036854775808"] {
            let o = infer(&model, &[flag, v]);
            assert_clean_failure(&o, 2, "n_positions 64");
        }
    }
    let t = TempDir::new("hostile-genconfig");
    std::fs::write(
        t.path("g.json"),
        r#"{"max_new_tokens": 18446744073709551615}"#,
    )
    .unwrap();
    let o = infer(&model, &["--generation-config", &t.s("g.json")]);
    assert_clean_failure(&o, 2, "n_positions 64");
    // A time limit past Duration's range is no limit, from a flag or a file.
    assert_ok(&infer(
        &model,
        &["--max-time", "1e20", "--max-new-tokens", "2"],
    ));
    std::fs::write(t.path("t.json"), r#"{"max_time": 1e300}"#).unwrap();
    assert_ok(&infer(
        &model,
        &[
            "--generation-config",
            &t.s("t.json"),
            "--max-new-tokens",
            "2",
        ],
    ));
}

/// A tokenizer.json whose ids are not contiguous: 400 tokens, one of them id 5000.
fn sparse_tokenizer_model(t: &TempDir) -> PathBuf {
    let dir = t.path("sparse");
    common::copy_files(&reference("hub-tied"), &dir);
    let path = dir.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let key = vocab
        .iter()
        .find(|(_, v)| v.as_i64() == Some(72))
        .map(|(k, _)| k.clone())
        .unwrap();
    vocab.insert(key, 5000.into());
    std::fs::write(&path, tok.to_string()).unwrap();
    dir
}

#[test]
fn a_tokenizer_whose_ids_skip_past_vocab_size_is_refused() {
    let t = TempDir::new("hostile-sparse");
    let model = sparse_tokenizer_model(&t);
    std::fs::write(t.path("d.jsonl"), "{\"text\": \"h h h\"}\n").unwrap();
    let m = model.to_str().unwrap();
    for args in [
        vec!["inspect", "--model", m],
        vec!["eval", "--model", m, "--data", &t.s("d.jsonl")],
        vec!["infer", "--model", m, "--prompt", "h"],
    ] {
        let o = gpt2kit(&args);
        assert_clean_failure(&o, 2, "with ids up to 5000");
    }
    // init sizes the embedding to the largest id.
    let o = gpt2kit(&[
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        m,
        "--out",
        &t.s("init"),
        "--n-layer",
        "1",
    ]);
    assert_ok(&o);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("init/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["vocab_size"], 5001);
}

#[test]
fn folder_names_that_are_not_utf8_are_written_lossily() {
    let t = TempDir::new("hostile-utf8");
    let name = OsStr::from_bytes(b"x\xff");
    let model = t.path("").join(name);
    common::copy_files(&reference("hub-tied"), &model);
    let o = common::gpt2kit_os(&[
        "inspect".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--json".as_ref(),
    ]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(v["model"].as_str().unwrap().ends_with("x\u{FFFD}"), "{v}");
    let out = t.path("").join(OsStr::from_bytes(b"q\xfe"));
    let o = common::gpt2kit_os(&[
        "quantize".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--method".as_ref(),
        "int8-weight".as_ref(),
        "--decode-tokens".as_ref(),
        "0".as_ref(),
    ]);
    assert_ok(&o);
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn absurd_sizes_are_refused_before_anything_is_allocated() {
    let t = TempDir::new("hostile-sizes");
    std::fs::write(t.path("d.jsonl"), "{\"text\": \"hello there\"}\n").unwrap();
    for size in ["4294967297", "18446744073709551615"] {
        let o = gpt2kit(&[
            "tokenizer",
            "train",
            "--data",
            &t.s("d.jsonl"),
            "--vocab-size",
            size,
            "--out",
            &t.s("tok"),
        ]);
        assert_clean_failure(&o, 2, "--vocab-size");
    }
    let o = gpt2kit(&[
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        reference("hub-tied").to_str().unwrap(),
        "--out",
        &t.s("big"),
        "--n-layer",
        "100000",
    ]);
    assert_clean_failure(&o, 2, "more than this machine's");
    assert!(!t.path("big").exists());
}

#[test]
fn a_generation_config_that_is_a_folder_is_named() {
    let t = TempDir::new("hostile-gcdir");
    let model = t.path("m");
    common::copy_files(&reference("hub-tied"), &model);
    let _ = std::fs::remove_file(model.join("generation_config.json"));
    std::fs::create_dir(model.join("generation_config.json")).unwrap();
    let o = infer(&model, &["--max-new-tokens", "2"]);
    assert_clean_failure(&o, 1, "generation_config.json");
}

#[test]
fn zero_calibration_samples_are_refused() {
    let t = TempDir::new("hostile-calib");
    std::fs::write(t.path("c.jsonl"), "{\"text\": \"hello there general\"}\n").unwrap();
    let o = gpt2kit(&[
        "quantize",
        "--model",
        reference("hub-tied").to_str().unwrap(),
        "--out",
        &t.s("q"),
        "--method",
        "int8-dynamic",
        "--calibration",
        &t.s("c.jsonl"),
        "--smooth-alpha",
        "0.5",
        "--calibration-samples",
        "0",
    ]);
    assert_clean_failure(&o, 2, "--calibration-samples must be at least 1");
    assert!(!t.path("q").exists());
}

#[test]
fn a_prompts_file_may_start_with_a_byte_order_mark() {
    let t = TempDir::new("hostile-bom");
    std::fs::write(t.path("p.jsonl"), "\u{FEFF}{\"prompt\": \"Hello\"}\n").unwrap();
    let o = gpt2kit(&[
        "infer",
        "--model",
        reference("hub-tied").to_str().unwrap(),
        "--prompts",
        &t.s("p.jsonl"),
        "--max-new-tokens",
        "2",
    ]);
    assert_ok(&o);
}

/// A full stdout after the artifact is written says that it was stdout that failed.
#[test]
fn a_full_stdout_is_named_as_such() {
    let t = TempDir::new("hostile-fullout");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .env("GPT2KIT_PACKED_CACHE", "off")
        .args([
            "quantize",
            "--model",
            reference("hub-tied").to_str().unwrap(),
            "--out",
            &t.s("q"),
            "--method",
            "int8-weight",
            "--decode-tokens",
            "0",
        ])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_clean_failure(&o, 1, "writing to stdout: No space left on device");
    assert!(t.path("q/model.safetensors").is_file());
}

/// config.json's pad_token_id is named as such, not as a flag that does not exist.
#[test]
fn a_bad_pad_token_id_names_where_it_comes_from() {
    let t = TempDir::new("hostile-pad");
    let model = t.path("m");
    common::copy_files(&reference("hub-tied"), &model);
    let path = model.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["pad_token_id"] = 9999.into();
    std::fs::write(&path, c.to_string()).unwrap();
    let o = infer(&model, &["--max-new-tokens", "2"]);
    assert_clean_failure(&o, 2, "`pad_token_id` (config.json");
}

/// A negative number is read as the flag's value (and refused by its type), not as an
/// unknown flag.
#[test]
fn negative_numbers_are_values() {
    let model = reference("hub-tied");
    let o = infer(&model, &["--seed", "-1"]);
    assert_clean_failure(&o, 2, "invalid value '-1' for '--seed");
    let o = infer(&model, &["--max-new-tokens", "2", "--length-penalty", "-1"]);
    assert_ok(&o);
}
