//! End-to-end tests of `gpt2kit init`, `train` and `eval` on the reference models: bad
//! data fails with file:line and exit code 2 before training, resume after a crash in
//! the middle of an epoch and of gradient accumulation reproduces an uninterrupted run
//! bit for bit, transformers loads our checkpoints and computes the same logits,
//! TensorBoard's own reader sees our event files, checkpoint rotation keeps the newest
//! plus the best, and non-finite steps are skipped, counted and abort training.
mod common;

use common::{
    assert_clean_failure, assert_ok, corpus, gpt2kit, gpt2kit_env, python, reference,
    reference_dir, stderr, stdout, TempDir,
};
use std::path::Path;
use std::process::{Command, Output};

use tch::{Device, Kind, Tensor};

fn ref_script(args: &[&str]) -> Output {
    let o = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/reference/make_train_reference.py"
        ))
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn log_history(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("trainer_state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["log_history"].as_array().unwrap().clone()
}

fn losses(history: &[serde_json::Value]) -> Vec<(i64, f64)> {
    history
        .iter()
        .filter(|e| e.get("loss").is_some())
        .map(|e| (e["step"].as_i64().unwrap(), e["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn bad_data_fails_with_file_and_line_before_training() {
    let t = TempDir::new("bad");
    let model = reference("hub-tied");
    let good = r#"{"text": "the quick brown fox"}"#;
    let cases: &[(&[u8], &str)] = &[
        (b"{\"text\": \"unterminated", "invalid JSON"),
        (b"[1, 2, 3]", "expected a JSON object, got an array"),
        (b"{\"body\": \"x\"}", "field \"text\" is missing"),
        (b"{\"text\": 5}", "field \"text\" is a number"),
        (
            b"{\"prompt\": \"only a prompt\"}",
            "field \"completion\" is missing",
        ),
        (b"{\"text\": \"caf\xe9\"}", "invalid UTF-8"),
    ];
    for (i, (line, reason)) in cases.iter().enumerate() {
        let path = t.path(&format!("bad{i}.jsonl"));
        let mut bytes = format!("{good}\n\n").into_bytes();
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
        std::fs::write(&path, bytes).unwrap();
        let o = gpt2kit(&[
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            path.to_str().unwrap(),
            "--output",
            &t.s("out"),
            "--max-steps",
            "1",
        ]);
        // Line 3: the blank line 2 is counted, not skipped over.
        assert_clean_failure(&o, 2, &format!("{}:3: {reason}", path.display()));
        assert!(
            !t.path("out").join("final").exists(),
            "trained despite bad data"
        );
    }
    // --skip-invalid trains on the good lines and reports how many it skipped.
    let mixed = t.path("mixed.jsonl");
    let mut bytes = Vec::new();
    for (line, _) in cases {
        bytes.extend_from_slice(good.as_bytes());
        bytes.push(b'\n');
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
    }
    std::fs::write(&mixed, &bytes).unwrap();
    let o = gpt2kit(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        mixed.to_str().unwrap(),
        "--output",
        &t.s("skip"),
        "--max-steps",
        "1",
        "--skip-invalid",
    ]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains(&format!("skipped {} invalid line(s)", cases.len())),
        "{}",
        stdout(&o)
    );
    // Nothing left to learn from: an error, as is an example past the block size.
    let empty = t.path("empty.jsonl");
    std::fs::write(&empty, "\n{\"text\": 1}\n").unwrap();
    let o = gpt2kit(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        empty.to_str().unwrap(),
        "--output",
        &t.s("empty"),
        "--skip-invalid",
    ]);
    assert_clean_failure(&o, 2, "the dataset is empty");
    let long = t.path("long.jsonl");
    std::fs::write(
        &long,
        format!(
            "{{\"prompt\": \"{}\", \"completion\": \"fox\"}}\n",
            "the ".repeat(40)
        ),
    )
    .unwrap();
    let args = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        long.to_str().unwrap(),
        "--output",
        &t.s("long"),
        "--block-size",
        "16",
        "--max-steps",
        "1",
    ];
    assert_clean_failure(
        &gpt2kit(&args),
        2,
        &format!("{}:1: the example is", long.display()),
    );
    let mut truncated = args.to_vec();
    truncated.push("--truncation");
    assert_ok(&gpt2kit(&truncated));
    // Bad flag values exit with 2 as well.
    let data = t.path("good.jsonl");
    std::fs::write(&data, corpus(20, 1)).unwrap();
    for (flag, value, needle) in [
        ("--lr-scheduler", "step", "--lr-scheduler"),
        ("--batch-size", "0", "--batch-size"),
        ("--block-size", "65", "--block-size"),
        ("--eval-split", "1.5", "--eval-split"),
        ("--dtype", "f16", "--dtype"),
    ] {
        let o = gpt2kit(&[
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            &t.s("flags"),
            "--max-steps",
            "1",
            flag,
            value,
        ]);
        assert_clean_failure(&o, 2, needle);
    }
}

#[test]
fn resume_after_a_crash_mid_epoch_and_mid_accumulation_is_bit_exact() {
    let t = TempDir::new("resume");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 7)).unwrap();
    let data = t.s("train.jsonl");
    let run = |out: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &data,
            "--output",
            out,
            "--block-size",
            "32",
            "--batch-size",
            "2",
            "--gradient-accumulation-steps",
            "3",
            "--max-steps",
            "10",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "2",
            "--save-steps",
            "4",
            "--logging-steps",
            "1",
            "--lr-scheduler",
            "cosine",
            "--weight-decay",
            "0.01",
        ];
        args.extend(extra);
        gpt2kit_env(&args, env)
    };
    let (full, crashed) = (t.s("full"), t.s("crashed"));
    let o = run(&full, &[], &[]);
    assert_ok(&o);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.path("full/checkpoint-4/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let per_epoch = state["batches_per_epoch"].as_i64().unwrap();
    // Step 4 ends after 12 micro-batches: the crash comes 2 micro-batches into the
    // 3-micro-batch step 5 or 6, with the checkpoint in the middle of an epoch.
    assert!(
        per_epoch > 12 && per_epoch % 3 != 0,
        "{per_epoch} micro-batches per epoch"
    );
    let o = run(&crashed, &["--stop-after-micro-batches", "17"], &[]);
    assert_clean_failure(&o, 1, "stopped after 17 micro-batches");
    assert!(t.path("crashed/checkpoint-4").is_dir() && !t.path("crashed/checkpoint-8").exists());
    // A save cut short leaves a temporary folder: the next start removes it. Its owner's
    // process id is past any pid_max, so no running process owns it (one that does is
    // never touched).
    std::fs::create_dir_all(t.path("crashed/.tmp-checkpoint-8-2000000001")).unwrap();
    // The earlier checkpoint is a loadable model.
    assert_ok(&gpt2kit(&[
        "eval",
        "--model",
        &t.s("crashed/checkpoint-4"),
        "--data",
        &data,
    ]));
    let o = run(&crashed, &["--resume"], &[]);
    assert_ok(&o);
    assert!(stdout(&o).contains("resuming from"), "{}", stdout(&o));
    assert!(!t.path("crashed/.tmp-checkpoint-8-2000000001").exists());
    let (a, b) = (
        log_history(&t.path("full/final")),
        log_history(&t.path("crashed/final")),
    );
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 10);
    for ((sa, x), (sb, y)) in la.iter().zip(&lb) {
        assert_eq!(sa, sb);
        assert_eq!(x.to_bits(), y.to_bits(), "step {sa}: {x} vs {y}");
    }
    assert_eq!(la.len(), lb.len());
    let weights = |p: &str| std::fs::read(t.path(p).join("model.safetensors")).unwrap();
    assert!(
        weights("full/final") == weights("crashed/final"),
        "final weights differ"
    );
    assert!(weights("full/checkpoint-8") == weights("crashed/checkpoint-8"));
    // An explicit path that holds no checkpoint is refused.
    let o = run(&t.s("other"), &["--resume", &t.s("full/runs")], &[]);
    assert_clean_failure(&o, 2, "neither a checkpoint folder");
    // An output folder with checkpoints is not silently trained over.
    assert_clean_failure(
        &run(&full, &[], &[]),
        2,
        "is not empty (it holds checkpoint-10",
    );
}

fn hf_logits(folder: &Path, ids: &[i64], out: &Path) -> Tensor {
    let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
    ref_script(&[
        "--logits",
        folder.to_str().unwrap(),
        "--ids",
        &ids.join(","),
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = Tensor::read_safetensors(out).unwrap();
    t.into_iter().find(|(n, _)| n == "logits").unwrap().1
}

fn our_logits(folder: &Path, ids: &[i64]) -> Tensor {
    let model = infer::Gpt2::load(folder, Some(Kind::Float), Device::Cpu).unwrap();
    let _g = tch::no_grad_guard();
    model
        .forward_train(&Tensor::from_slice(ids).view([1, -1]))
        .get(0)
}

#[test]
fn transformers_loads_our_folders_and_tensorboard_reads_our_runs() {
    let t = TempDir::new("hf");
    let model = reference("hub-tied");
    let ids: Vec<i64> = vec![0, 5, 17, 99, 230, 3, 41, 41, 7, 300];
    // `init`: a folder transformers loads, with the engine's logits.
    let o = gpt2kit(&[
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        model.to_str().unwrap(),
        "--out",
        &t.s("init"),
        "--n-layer",
        "2",
        "--n-embd",
        "64",
        "--n-positions",
        "32",
        "--seed",
        "3",
    ]);
    assert_ok(&o);
    // A training run with eval, checkpoints and TensorBoard scalars.
    std::fs::write(t.path("train.jsonl"), corpus(30, 3)).unwrap();
    let o = gpt2kit(&[
        "train",
        "--model",
        &t.s("init"),
        "--data",
        &t.s("train.jsonl"),
        "--output",
        &t.s("out"),
        "--block-size",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--lr",
        "3e-3",
        "--eval-split",
        "0.2",
        "--eval-steps",
        "2",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
    ]);
    assert_ok(&o);
    assert!(stdout(&o).contains("step 2: eval loss"), "{}", stdout(&o));
    for folder in ["init", "out/checkpoint-4", "out/final"] {
        let dir = t.path(folder);
        let hf = hf_logits(&dir, &ids, &t.path("logits.safetensors"));
        let ours = our_logits(&dir, &ids);
        let diff = (hf - ours).abs().max().double_value(&[]);
        // fp32 in both, the same weights: reordering only, ~1e-6.
        assert!(diff < 1e-4, "{folder}: max |Δlogits| {diff}");
    }
    let o = ref_script(&["--read-tensorboard", &t.s("out/runs")]);
    let scalars: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
    ] {
        let steps: Vec<i64> = scalars[tag]
            .as_array()
            .unwrap_or_else(|| panic!("{tag}: {scalars}"))
            .iter()
            .map(|e| e[0].as_i64().unwrap())
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4], "{tag}");
    }
    let history = log_history(&t.path("out/final"));
    for (e, (step, loss)) in scalars["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .zip(losses(&history))
    {
        assert_eq!(e[0].as_i64().unwrap(), step);
        assert_eq!(e[1].as_f64().unwrap() as f32, loss as f32);
    }
    for tag in ["eval/loss", "eval/perplexity"] {
        let steps: Vec<i64> = scalars[tag]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e[0].as_i64().unwrap())
            .collect();
        assert_eq!(steps, vec![2, 4], "{tag}");
    }
    // Eval of the final model through the CLI agrees with the trainer's last eval on
    // the same model (the split is re-made here from the same seed is not possible from
    // the CLI, so check the training file instead: finite and sane).
    let o = gpt2kit(&[
        "eval",
        "--model",
        &t.s("out/final"),
        "--data",
        &t.s("train.jsonl"),
        "--json",
    ]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!(
        loss.is_finite()
            && loss > 0.0
            && (v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9 * loss.exp()
    );
}

#[test]
fn eval_cli_matches_transformers() {
    let exp: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(reference_dir().join("train/expected.json")).unwrap(),
    )
    .unwrap();
    let data = reference_dir().join("train/eval.jsonl");
    let o = gpt2kit(&[
        "eval",
        "--model",
        reference("hub-tied").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--block-size",
        &exp["eval_block_size"].to_string(),
        "--json",
    ]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want = exp["eval_loss"].as_f64().unwrap();
    // fp32 in both: 1e-5 relative.
    assert!(
        (v["loss"].as_f64().unwrap() - want).abs() < 1e-5 * want,
        "{v} vs {want}"
    );
    assert_eq!(v["tokens"], exp["eval_tokens"]);
    let o = gpt2kit(&[
        "eval",
        "--model",
        reference("hub-tied").to_str().unwrap(),
        "--data",
        "/nonexistent.jsonl",
    ]);
    assert_clean_failure(&o, 2, "/nonexistent.jsonl");
}

#[test]
fn rotation_keeps_the_newest_and_the_best() {
    let t = TempDir::new("rotate");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 11)).unwrap();
    let o = gpt2kit(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &t.s("train.jsonl"),
        "--output",
        &t.s("out"),
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "7",
        "--lr",
        "0.03",
        "--lr-scheduler",
        "constant",
        "--eval-split",
        "0.1",
        "--eval-steps",
        "1",
        "--save-steps",
        "1",
        "--save-total-limit",
        "1",
        "--logging-steps",
        "1",
    ]);
    assert_ok(&o);
    let history = log_history(&t.path("out/final"));
    let evals: Vec<(i64, f64)> = history
        .iter()
        .filter(|e| e.get("eval_loss").is_some())
        .map(|e| {
            (
                e["step"].as_i64().unwrap(),
                e["eval_loss"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(evals.len(), 7);
    let best = evals.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
    let mut kept: Vec<String> = std::fs::read_dir(t.path("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    let mut want = vec![format!("checkpoint-{best}"), "checkpoint-7".to_string()];
    want.sort();
    want.dedup();
    assert_eq!(kept, want, "eval losses {evals:?}");
    // This run's best eval is not its last, so rotation has to spare an older folder.
    assert_eq!(kept.len(), 2, "eval losses {evals:?}");
    assert!(stdout(&o).contains(&format!(
        "best checkpoint: {}",
        t.path(&format!("out/checkpoint-{best}")).display()
    )));
}

#[test]
fn resume_refuses_a_changed_run_and_overwrite_starts_afresh() {
    let t = TempDir::new("changed");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 12)).unwrap();
    let (data, out) = (t.s("train.jsonl"), t.s("out"));
    let run = |steps: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &data,
            "--output",
            &out,
            "--block-size",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            steps,
            "--eval-split",
            "0.1",
            "--save-steps",
            "3",
            "--eval-steps",
            "2",
        ];
        args.extend_from_slice(extra);
        gpt2kit(&args)
    };
    assert_ok(&run("6", &[]));
    // Evals at 2, 4, 6 and saves at 3, 6: checkpoint-3 was never evaluated, so it can
    // never be the best one.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.path("out/checkpoint-3/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert!(
        state["best_model_checkpoint"].is_null(),
        "{}",
        state["best_model_checkpoint"]
    );
    // Resuming with another seed would reshuffle and re-split the data: refused by name.
    assert_clean_failure(
        &run("9", &["--resume", "--seed", "7"]),
        2,
        "--seed 7 (was 42)",
    );
    assert_clean_failure(&run("9", &["--resume", "--lr", "0.5"]), 2, "--lr 0.5");
    // Starting over in the same folder: the old run's checkpoints go, so rotation and
    // --resume only ever see the new run's.
    assert_ok(&run("2", &["--overwrite-output-dir"]));
    let mut kept: Vec<String> = std::fs::read_dir(t.path("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    assert_eq!(kept, ["checkpoint-2"]);
}

#[test]
fn early_stopping_and_non_finite_steps() {
    let t = TempDir::new("stop");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 5)).unwrap();
    let base = |out: &str| {
        vec![
            "train".to_string(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--data".into(),
            t.s("train.jsonl"),
            "--output".into(),
            out.into(),
            "--block-size".into(),
            "32".into(),
            "--batch-size".into(),
            "2".into(),
            "--logging-steps".into(),
            "1".into(),
        ]
    };
    // lr 0 never improves the eval loss: patience 2 stops after the third eval.
    let mut args = base(&t.s("early"));
    args.extend(
        [
            "--lr",
            "0",
            "--max-steps",
            "20",
            "--eval-split",
            "0.1",
            "--eval-steps",
            "1",
            "--early-stopping-patience",
            "2",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = gpt2kit(&args);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("early stopping at step 3"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("trained 3 steps"), "{}", stdout(&o));
    // An absurd learning rate: the first update blows the weights up, every later loss
    // is NaN, each such step is skipped and counted, and five in a row abort.
    let mut args = base(&t.s("nan"));
    args.extend(
        [
            "--lr",
            "1e30",
            "--max-grad-norm",
            "0",
            "--lr-scheduler",
            "constant",
            "--max-steps",
            "20",
            "--save-steps",
            "1",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = gpt2kit(&args);
    assert_clean_failure(&o, 1, "5 steps in a row had a non-finite loss");
    assert_eq!(
        stderr(&o).matches("step skipped").count(),
        5,
        "{}",
        stderr(&o)
    );
    // Every checkpoint written holds finite weights, and there is no final model.
    assert!(!t.path("nan/final").exists());
    for step in 1..=5 {
        let f = t.path(&format!("nan/checkpoint-{step}/model.safetensors"));
        for (name, w) in Tensor::read_safetensors(&f).unwrap() {
            assert!(
                w.isfinite().all().int64_value(&[]) == 1,
                "{name} at step {step}"
            );
        }
    }
}

/// `--optim adamw_torch_fused` (libtorch's multi-tensor kernel, the default on CUDA) run
/// on the CPU: the same training as the one-pass update within f32 rounding, and a run
/// resumed after a crash equals its uninterrupted run bit for bit.
#[test]
fn fused_adamw_trains_as_the_one_pass_update_and_resumes_exactly() {
    let t = TempDir::new("fused-adamw");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(24, 3)).unwrap();
    let data = t.s("train.jsonl");
    let run = |out: &str, optim: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &data,
            "--output",
            out,
            "--block-size",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            "8",
            "--lr",
            "1e-3",
            "--weight-decay",
            "0.1",
            "--max-grad-norm",
            "0.5",
            "--logging-steps",
            "1",
            "--save-steps",
            "4",
            "--optim",
            optim,
        ];
        args.extend(extra);
        gpt2kit(&args)
    };
    let (one_pass, fused, crashed) = (t.s("one-pass"), t.s("fused"), t.s("crashed"));
    assert_ok(&run(&one_pass, "adamw_torch", &[]));
    assert_ok(&run(&fused, "adamw_torch_fused", &[]));
    let (a, b) = (
        losses(&log_history(&t.path("one-pass/final"))),
        losses(&log_history(&t.path("fused/final"))),
    );
    assert_eq!(a.len(), 8);
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        // Step 1 sees the same weights: the same loss. Later steps differ by the updates'
        // f32 rounding (the fused kernel computes its bias corrections in f32, ours in
        // f64), carried through a few steps: stated bound 1e-5 relative.
        if *step == 1 {
            assert_eq!(x, y);
        }
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "step {step}: loss {x} vs {y}"
        );
    }
    let weights = |dir: &str| {
        let mut w = Tensor::read_safetensors(t.path(dir).join("model.safetensors")).unwrap();
        w.sort_by(|x, y| x.0.cmp(&y.0));
        w
    };
    let (wa, wb) = (weights("one-pass/final"), weights("fused/final"));
    assert_eq!(wa.len(), wb.len());
    let mut moved = false;
    for ((name, x), (other, y)) in wa.iter().zip(&wb) {
        assert_eq!(name, other);
        let d = (x - y).abs().max().double_value(&[]);
        moved |= d > 0.0;
        // Adam's normalised step turns rounding noise in a near-zero gradient into a
        // step of up to lr either way: the key bias, whose exact gradient is zero (see
        // tests/reference), may part by 2·lr a step. Every other weight stays within a
        // few f32 ulps of its scale (~1): 1e-6.
        let bound = if name.ends_with("attn.c_attn.bias") {
            8.0 * 2e-3
        } else {
            1e-6
        };
        assert!(d <= bound, "{name}: weights apart by {d}");
    }
    // The two updates are different code: equal bits everywhere would mean one ran twice.
    assert!(moved, "the fused and one-pass runs left the same bits");

    let o = run(
        &crashed,
        "adamw_torch_fused",
        &["--stop-after-micro-batches", "6"],
    );
    assert_clean_failure(&o, 1, "stopped after 6 micro-batches");
    assert_ok(&run(&crashed, "adamw_torch_fused", &["--resume"]));
    assert_eq!(losses(&log_history(&t.path("crashed/final"))), b);
    assert_eq!(
        std::fs::read(t.path("crashed/final/model.safetensors")).unwrap(),
        std::fs::read(t.path("fused/final/model.safetensors")).unwrap()
    );
}

/// `--dtype bf16` trains under bf16 autocast over f32 masters (transformers' `bf16=True`):
/// its losses follow the f32 run's within bf16's rounding (8 significant bits, 2⁻⁹ ≈ 0.2%
/// relative per value; over 6 steps at lr 1e-3 the stated bound is 1%), are not the f32
/// run's bits, and a model folder in f32 comes out.
#[test]
fn bf16_autocast_training_follows_f32() {
    let t = TempDir::new("bf16-autocast");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(16, 5)).unwrap();
    let data = t.s("train.jsonl");
    let run = |out: &str, dtype: &str| {
        gpt2kit(&[
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &data,
            "--output",
            out,
            "--block-size",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            "6",
            "--lr",
            "1e-3",
            "--logging-steps",
            "1",
            "--dtype",
            dtype,
        ])
    };
    let (f32_out, bf16_out) = (t.s("f32"), t.s("bf16"));
    assert_ok(&run(&f32_out, "f32"));
    assert_ok(&run(&bf16_out, "bf16"));
    let a = losses(&log_history(&t.path("f32/final")));
    let b = losses(&log_history(&t.path("bf16/final")));
    assert_eq!(a.len(), 6);
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-2 * x.abs(),
            "step {step}: f32 {x} vs bf16 {y}"
        );
    }
    assert_ne!(a, b, "the bf16 run computed in f32");
    let w = Tensor::read_safetensors(t.path("bf16/final/model.safetensors")).unwrap();
    assert!(w.iter().all(|(_, t)| t.kind() == Kind::Float));
}
