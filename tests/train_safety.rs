//! `gpt2kit train` never loses a user's work: a resumed run whose rotation deletes the
//! checkpoint it resumed from still saves (and ends bit for bit where an uninterrupted
//! run ends); an output folder is refused when it holds an earlier run's results,
//! owned by one run at a time, cleared by --overwrite-output-dir only where that spares
//! the run's own inputs, and not left behind empty by a failed run; --model must match
//! the checkpoint a run resumes; --load-best-model-at-end makes final/ the best
//! checkpoint's weights; absurd --epochs and an update that makes weights non-finite
//! stop with a message naming the flag or the step.
mod common;

use common::{
    assert_clean_failure, assert_ok, corpus, gpt2kit, reference, stderr, stdout, TempDir,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tch::Tensor;

/// The command line: batch 4, block 64, lr 1e-3, seed 4, a save every 2 steps.
fn base(model: &Path, data: &str, out: &str, steps: &str) -> Vec<String> {
    [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data,
        "--batch-size",
        "4",
        "--block-size",
        "64",
        "--lr",
        "1e-3",
        "--seed",
        "4",
        "--save-steps",
        "2",
        "--lr-scheduler",
        "constant",
        "--max-steps",
        steps,
        "--output",
        out,
    ]
    .map(String::from)
    .to_vec()
}

fn run(args: &[String], extra: &[&str]) -> std::process::Output {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    gpt2kit(&all)
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn checkpoints(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    v.sort_by_key(|n| n["checkpoint-".len()..].parse::<i64>().unwrap());
    v
}

#[test]
fn a_resume_whose_rotation_deletes_its_checkpoint_saves_and_matches_an_uninterrupted_run() {
    let t = TempDir::new("rotate-resume");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(60, 21)).unwrap();
    let data = t.s("train.jsonl");
    let whole = t.s("whole");
    assert_ok(&run(&base(&model, &data, &whole, "16"), &[]));
    let want = std::fs::read(t.path("whole/final/model.safetensors")).unwrap();
    for limit in ["3", "1", "2"] {
        let out = t.s(&format!("r{limit}"));
        let limit_flag = ["--save-total-limit", limit];
        assert_ok(&run(&base(&model, &data, &out, "8"), &limit_flag));
        let o = run(
            &base(&model, &data, &out, "16"),
            &[&limit_flag[..], &["--resume"]].concat(),
        );
        assert_ok(&o);
        let dir = PathBuf::from(&out);
        let kept = checkpoints(&dir);
        let k: usize = limit.parse().unwrap();
        let expected: Vec<String> = (0..k)
            .rev()
            .map(|i| format!("checkpoint-{}", 16 - 2 * i))
            .collect();
        assert_eq!(kept, expected, "--save-total-limit {limit}");
        // checkpoint-8, the one resumed from, was rotated away before the last save.
        assert!(!dir.join("checkpoint-8").exists());
        assert!(
            dir.join("checkpoint-16/tokenizer.json").is_file(),
            "--save-total-limit {limit}"
        );
        assert_eq!(
            std::fs::read(dir.join("final/model.safetensors")).unwrap(),
            want,
            "--save-total-limit {limit}: final/ differs from the uninterrupted run's"
        );
    }
}

#[test]
fn a_failed_resumed_run_says_that_final_is_an_earlier_runs() {
    let t = TempDir::new("stale-final");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(60, 22)).unwrap();
    let (data, out) = (t.s("train.jsonl"), t.s("out"));
    assert_ok(&run(&base(&model, &data, &out, "8"), &[]));
    let mut args: Vec<&str> = Vec::new();
    let b = base(&model, &data, &out, "16");
    args.extend(b.iter().map(String::as_str));
    args.push("--resume");
    // Dies after 5 micro-batches of the resumed run: checkpoint-10 and -12 are saved.
    args.extend(["--stop-after-micro-batches", "5"]);
    let o = gpt2kit(&args);
    assert_clean_failure(&o, 1, "still holds the model of step 8 from an earlier run");
    assert!(
        stderr(&o).contains("checkpoint-12 (step 12)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn overwriting_never_removes_the_model_the_run_starts_from() {
    let t = TempDir::new("overwrite-model");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 23)).unwrap();
    let (data, out) = (t.s("train.jsonl"), t.s("run"));
    assert_ok(&run(&base(&model, &data, &out, "4"), &[]));
    let before = snapshot(&t.path("run"));
    for start in ["run/checkpoint-4", "run/final"] {
        let o = run(
            &base(&t.path(start), &data, &out, "2"),
            &["--overwrite-output-dir"],
        );
        assert_clean_failure(&o, 2, "--model");
        assert!(
            stderr(&o).contains("--overwrite-output-dir would remove"),
            "{}",
            stderr(&o)
        );
        assert_eq!(snapshot(&t.path("run")), before, "--model {start}");
    }
    // Data kept inside the folder is spared the same way.
    std::fs::copy(t.path("train.jsonl"), t.path("run/final/data.jsonl")).unwrap();
    let before = snapshot(&t.path("run"));
    let o = run(
        &base(&model, &t.s("run/final/data.jsonl"), &out, "2"),
        &["--overwrite-output-dir"],
    );
    assert_clean_failure(&o, 2, "--data");
    assert_eq!(snapshot(&t.path("run")), before);
}

#[test]
fn an_output_folder_holding_an_earlier_runs_results_is_refused_untouched() {
    let t = TempDir::new("nonempty");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 24)).unwrap();
    let data = t.s("train.jsonl");
    // No --save-steps: the folder holds final/ and runs/ only.
    let args = |out: &str| {
        [
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &data,
            "--block-size",
            "32",
            "--batch-size",
            "4",
            "--max-steps",
            "2",
            "--output",
            out,
        ]
        .map(String::from)
        .to_vec()
    };
    let out = t.s("out");
    assert_ok(&run(&args(&out), &[]));
    let before = snapshot(&t.path("out"));
    let o = run(&args(&out), &[]);
    assert_clean_failure(&o, 2, "is not empty (it holds final, runs)");
    assert_eq!(snapshot(&t.path("out")), before);
    // A folder of the user's own files is refused as well; overwriting spares them.
    std::fs::create_dir_all(t.path("mine")).unwrap();
    std::fs::write(t.path("mine/notes.txt"), "keep me").unwrap();
    assert_clean_failure(&run(&args(&t.s("mine")), &[]), 2, "notes.txt");
    assert_ok(&run(&args(&t.s("mine")), &["--overwrite-output-dir"]));
    assert_eq!(
        std::fs::read_to_string(t.path("mine/notes.txt")).unwrap(),
        "keep me"
    );
    assert!(t.path("mine/final/model.safetensors").is_file());
    // Told to, a run replaces the earlier final/.
    assert_ok(&run(&args(&out), &["--overwrite-output-dir"]));
}

#[test]
fn a_failed_run_leaves_no_empty_output_folder() {
    let t = TempDir::new("failed-empty");
    let model = reference("hub-tied");
    std::fs::write(t.path("bad.jsonl"), "{\"text\": \"ok\"}\nnot json\n").unwrap();
    let out = t.path("never");
    let o = gpt2kit(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &t.s("bad.jsonl"),
        "--block-size",
        "32",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, 2, "bad.jsonl:2");
    assert!(!out.exists(), "{} was left behind", out.display());
}

#[test]
fn one_run_at_a_time_owns_an_output_folder_and_a_dead_runs_lock_is_taken_over() {
    let t = TempDir::new("lock");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(60, 25)).unwrap();
    let (data, out) = (t.s("train.jsonl"), t.s("out"));
    let long = base(&model, &data, &out, "100000");
    let mut first = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .env("GPT2KIT_PACKED_CACHE", "off")
        .args(&long)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = t.path("out/.gpt2kit-train.lock");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.contains("process")) {
        assert!(
            Instant::now() < deadline,
            "the first run never took the lock"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = run(&base(&model, &data, &out, "2"), &["--resume"]);
    assert_clean_failure(&second, 2, "is in use by another training run");
    assert!(
        stderr(&second).contains(&format!("process {}", first.id())),
        "{}",
        stderr(&second)
    );
    let also = run(&base(&model, &data, &out, "2"), &["--overwrite-output-dir"]);
    assert_clean_failure(&also, 2, "is in use by another training run");
    // The owner dies without cleaning up: its lock file stays, but nobody holds it.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(lock.exists());
    let taken = run(&base(&model, &data, &out, "4"), &["--overwrite-output-dir"]);
    assert_ok(&taken);
    assert!(!lock.exists(), "a finished run removes its lock file");
}

#[test]
fn resume_refuses_a_model_other_than_the_checkpoints() {
    let t = TempDir::new("resume-model");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 26)).unwrap();
    let (data, out) = (t.s("train.jsonl"), t.s("out"));
    assert_ok(&run(&base(&model, &data, &out, "2"), &[]));
    let other = reference("bf16-quickgelu");
    let o = run(&base(&other, &data, &out, "4"), &["--resume"]);
    assert_clean_failure(&o, 2, "is not the model --resume");
    assert!(
        stderr(&o).contains("vocab_size 300 (checkpoint: 400)"),
        "{}",
        stderr(&o)
    );
    // The model the run started from, or the checkpoint itself, is accepted.
    assert_ok(&run(&base(&model, &data, &out, "4"), &["--resume"]));
    let ckpt = t.path("out/checkpoint-4");
    assert_ok(&run(&base(&ckpt, &data, &out, "6"), &["--resume"]));
}

#[test]
fn absurd_epochs_and_epsilon_are_refused_by_flag() {
    let t = TempDir::new("epochs");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 27)).unwrap();
    let mut args = base(&model, &t.s("train.jsonl"), &t.s("out"), "1");
    let i = args.iter().position(|a| a == "--max-steps").unwrap();
    args.drain(i..i + 2);
    let o = run(&args, &["--epochs", "4000000000000000000"]);
    assert_clean_failure(&o, 2, "--epochs 4000000000000000000");
    let o = run(&args, &["--max-steps", "2", "--adam-epsilon", "0"]);
    assert_clean_failure(&o, 2, "--adam-epsilon must be a positive number");
    assert!(!t.path("out").exists());
}

#[test]
fn an_update_that_makes_weights_non_finite_stops_at_that_step() {
    let t = TempDir::new("inf-update");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 28)).unwrap();
    let mut args = base(&model, &t.s("train.jsonl"), &t.s("out"), "20");
    let i = args.iter().position(|a| a == "--lr").unwrap();
    // 1e39 is beyond f32: the step size is infinite, the loss and gradient are not.
    args[i + 1] = "1e39".into();
    let i = args.iter().position(|a| a == "--save-steps").unwrap();
    args[i + 1] = "1".into();
    let o = run(&args, &["--max-grad-norm", "0"]);
    assert_clean_failure(&o, 1, "step 1: the update made `");
    assert!(!t.path("out/checkpoint-1").exists());
    assert!(!t.path("out/final").exists());
}

/// Evals every step at lr 0.05 on a small corpus: the eval loss falls, then rises (the
/// test checks that this premise holds), and patience 2 stops the run.
#[test]
fn load_best_model_at_end_makes_final_the_best_checkpoint() {
    let t = TempDir::new("best");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(60, 29)).unwrap();
    let data = t.s("train.jsonl");
    let args = |out: &str, extra: &[&str]| {
        let mut a: Vec<String> = [
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &data,
            "--block-size",
            "32",
            "--batch-size",
            "4",
            "--lr",
            "0.05",
            "--lr-scheduler",
            "constant",
            "--max-steps",
            "40",
            "--eval-split",
            "0.2",
            "--eval-steps",
            "1",
            "--save-steps",
            "1",
            "--save-total-limit",
            "2",
            "--early-stopping-patience",
            "2",
            "--output",
            out,
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let o = run(&args(&t.s("best"), &["--load-best-model-at-end"]), &[]);
    assert_ok(&o);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.path("best/final/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let best = state["best_model_checkpoint"].as_str().unwrap().to_string();
    let last = format!("checkpoint-{}", state["global_step"].as_i64().unwrap());
    assert_ne!(
        best, last,
        "premise: the run should have got worse after its best"
    );
    assert!(
        stdout(&o).contains(&format!("the weights of {best}")),
        "{}",
        stdout(&o)
    );
    let tensors = |p: PathBuf| -> BTreeMap<String, Tensor> {
        Tensor::read_safetensors(p).unwrap().into_iter().collect()
    };
    let fin = tensors(t.path("best/final/model.safetensors"));
    let want = tensors(t.path(&format!("best/{best}/model.safetensors")));
    let last_w = tensors(t.path(&format!("best/{last}/model.safetensors")));
    assert_eq!(fin.len(), want.len());
    for (name, w) in &fin {
        assert!(w.equal(&want[name]), "{name} differs from {best}'s");
    }
    assert!(
        fin.iter().any(|(n, w)| !w.equal(&last_w[n])),
        "final/ equals the last checkpoint"
    );
    // Without the flag, final/ is the last step's and the summary says so.
    let o = run(&args(&t.s("last"), &[]), &[]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("the last step's weights")
            && stdout(&o).contains("--load-best-model-at-end"),
        "{}",
        stdout(&o)
    );
    // Saves that are not evals could never be compared: refused.
    let mut bad = args(&t.s("bad"), &["--load-best-model-at-end"]);
    let i = bad.iter().position(|a| a == "--eval-steps").unwrap();
    bad[i + 1] = "2".into();
    let i = bad.iter().position(|a| a == "--save-steps").unwrap();
    bad[i + 1] = "3".into();
    assert_clean_failure(&run(&bad, &[]), 2, "--save-steps to be a multiple");
}

/// A lock file planted as a symbolic link or a hard link is refused, and the file it
/// names keeps its bytes (it was truncated and overwritten with the owner's name).
#[test]
fn a_planted_lock_file_never_has_its_target_written() {
    let t = TempDir::new("lock-link");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 31)).unwrap();
    let (data, out) = (t.s("train.jsonl"), t.s("out"));
    assert_ok(&run(&base(&model, &data, &out, "2"), &[]));
    std::fs::write(t.path("victim.txt"), "precious").unwrap();
    let lock = t.path("out/.gpt2kit-train.lock");
    std::os::unix::fs::symlink(t.path("victim.txt"), &lock).unwrap();
    let o = run(&base(&model, &data, &out, "3"), &["--resume"]);
    assert_clean_failure(&o, 2, "is a symbolic link, not a lock file");
    std::fs::remove_file(&lock).unwrap();
    std::fs::hard_link(t.path("victim.txt"), &lock).unwrap();
    let o = run(&base(&model, &data, &out, "3"), &["--resume"]);
    assert_clean_failure(&o, 2, "a hard link to another file");
    assert_eq!(
        std::fs::read_to_string(t.path("victim.txt")).unwrap(),
        "precious"
    );
    std::fs::remove_file(&lock).unwrap();
    std::fs::create_dir(&lock).unwrap();
    let o = run(&base(&model, &data, &out, "3"), &["--resume"]);
    assert_clean_failure(&o, 2, "is a folder, not a lock file");
}

/// Resuming from an older checkpoint of a folder that holds later ones would have
/// rotation (newest by step) delete this run's own saves: refused, nothing touched.
/// A link named like a checkpoint is never taken for the latest one.
#[test]
fn resuming_behind_later_checkpoints_is_refused() {
    let t = TempDir::new("behind");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 32)).unwrap();
    let (data, out) = (t.s("train.jsonl"), t.s("out"));
    assert_ok(&run(&base(&model, &data, &out, "6"), &[]));
    let before = snapshot(&t.path("out"));
    let o = run(
        &base(&model, &data, &out, "4"),
        &[
            "--resume",
            &t.s("out/checkpoint-2"),
            "--save-total-limit",
            "1",
        ],
    );
    assert_clean_failure(
        &o,
        2,
        "already holds later checkpoints (checkpoint-4, checkpoint-6)",
    );
    assert_eq!(snapshot(&t.path("out")), before);
    // Resumed into another folder, the same checkpoint is fine; --resume also takes
    // an output folder and continues its latest checkpoint.
    assert_ok(&run(
        &base(&model, &data, &t.s("branch"), "4"),
        &["--resume", &t.s("out/checkpoint-2")],
    ));
    let o = run(&base(&model, &data, &t.s("more"), "8"), &["--resume", &out]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("checkpoint-6 at step 6"),
        "{}",
        stdout(&o)
    );
    std::os::unix::fs::symlink(t.path("branch/checkpoint-4"), t.path("out/checkpoint-99")).unwrap();
    let o = run(&base(&model, &data, &out, "8"), &["--resume"]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("checkpoint-6 at step 6"),
        "{}",
        stdout(&o)
    );
}

/// A hand-edited trainer_state.json cannot point the run outside its folder or back
/// in time. The checkpoint's manifest is removed first, as a checkpoint written before
/// manifests existed has none: with it, the edit is caught before the state is read
/// (tests/faults.rs).
#[test]
fn a_checkpoints_state_is_checked_before_it_is_trusted() {
    let t = TempDir::new("state");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 33)).unwrap();
    let (data, out) = (t.s("train.jsonl"), t.s("out"));
    assert_ok(&run(&base(&model, &data, &out, "2"), &[]));
    let path = t.path("out/checkpoint-2/trainer_state.json");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(t.path("out/checkpoint-2/gpt2kit-manifest.json")).unwrap();
    for (key, value, needle) in [
        (
            "best_model_checkpoint",
            serde_json::json!("/etc"),
            "is not a checkpoint-STEP name",
        ),
        ("global_step", serde_json::json!(-5), "negative step"),
        ("global_step", serde_json::json!(7), "named for step 2"),
    ] {
        let mut state: serde_json::Value = serde_json::from_str(&good).unwrap();
        state[key] = value;
        std::fs::write(&path, state.to_string()).unwrap();
        let o = run(&base(&model, &data, &out, "4"), &["--resume"]);
        assert_clean_failure(&o, 1, needle);
    }
}

/// Resuming a run that is already complete changes nothing: no second eval in the
/// history, no early-stopping count, no rewritten checkpoint.
#[test]
fn resuming_a_complete_run_changes_nothing() {
    let t = TempDir::new("complete");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(60, 34)).unwrap();
    let (data, out) = (t.s("train.jsonl"), t.s("out"));
    let extra = [
        "--eval-split",
        "0.2",
        "--eval-steps",
        "1",
        "--early-stopping-patience",
        "5",
    ];
    assert_ok(&run(&base(&model, &data, &out, "3"), &extra));
    let ckpt = snapshot(&t.path("out/checkpoint-3"));
    let state = |dir: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(t.path(dir)).unwrap()).unwrap()
    };
    let first = state("out/final/trainer_state.json");
    for _ in 0..2 {
        let o = run(
            &base(&model, &data, &out, "3"),
            &[&extra[..], &["--resume"]].concat(),
        );
        assert_ok(&o);
        assert!(stdout(&o).contains("eval loss"), "{}", stdout(&o));
    }
    assert_eq!(snapshot(&t.path("out/checkpoint-3")), ckpt);
    let again = state("out/final/trainer_state.json");
    assert_eq!(again["log_history"], first["log_history"]);
    assert_eq!(
        again["evals_without_improvement"],
        first["evals_without_improvement"]
    );
}

#[test]
fn output_folders_and_their_paths_fail_cleanly() {
    let t = TempDir::new("paths");
    let model = reference("hub-tied");
    std::fs::write(t.path("train.jsonl"), corpus(40, 35)).unwrap();
    std::fs::write(t.path("bad.jsonl"), "not json\n").unwrap();
    let data = t.s("train.jsonl");
    // A failed run removes every folder it made, parents included.
    let o = run(&base(&model, &t.s("bad.jsonl"), &t.s("a/b/c"), "2"), &[]);
    assert_clean_failure(&o, 2, "bad.jsonl:1");
    assert!(!t.path("a").exists());
    std::os::unix::fs::symlink(t.path("nowhere"), t.path("dangling")).unwrap();
    let o = run(&base(&model, &data, &t.s("dangling"), "2"), &[]);
    assert_clean_failure(&o, 2, "is a symbolic link to nothing");
    // Data kept inside a checkpoint that rotation would delete.
    let out = t.s("out");
    assert_ok(&run(&base(&model, &data, &out, "2"), &[]));
    std::fs::copy(t.path("train.jsonl"), t.path("out/checkpoint-2/d.jsonl")).unwrap();
    let o = run(
        &base(&model, &t.s("out/checkpoint-2/d.jsonl"), &out, "6"),
        &["--resume", "--save-total-limit", "1"],
    );
    assert_clean_failure(&o, 2, "this run may rotate away or replace");
    assert!(t.path("out/checkpoint-2/d.jsonl").is_file());
    // An event file path past PATH_MAX: a clean error, where the TensorBoard writer
    // thread panicked and the process aborted.
    let mut deep = t.path("deep");
    while deep.as_os_str().len() < 4000 {
        deep = deep.join("d".repeat(200));
    }
    let o = run(&base(&model, &data, deep.to_str().unwrap(), "2"), &[]);
    assert_clean_failure(&o, 1, "TensorBoard event file");
}
