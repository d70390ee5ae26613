//! Data-parallel training under `gpt2kit launch`, over c10d's Gloo on loopback: 2 and 3
//! processes train like one process with the same global batch (losses, eval losses and
//! final weights), a killed or stopped rank ends the job with a clear error instead of a
//! hang, and a job killed inside a save resumes to the uninterrupted job's losses.
mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_clean_failure, assert_ok, corpus, gpt2kit, reference, stderr, TempDir};
use tch::Tensor;

fn train_args(t: &TempDir, out: &str, batch: usize, extra: &[&str]) -> Vec<String> {
    let steps = match extra.contains(&"--ddp-timeout") || extra.contains(&"--forever") {
        true => "100000",
        false => "6",
    };
    let extra: Vec<&&str> = extra.iter().filter(|&&e| e != "--forever").collect();
    let mut a: Vec<String> = [
        "train",
        "--model",
        &t.s("model"),
        "--data",
        &t.s("data.jsonl"),
        "--output",
        &t.s(out),
        "--block-size",
        "32",
        "--batch-size",
        &batch.to_string(),
        "--max-steps",
        steps,
        "--lr",
        "3e-3",
        "--eval-split",
        "0.2",
        "--eval-steps",
        "3",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--seed",
        "5",
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

fn launch_cmd(n: usize, args: &[String]) -> Command {
    launch_cmd_at(n, args, &free_port())
}

fn launch_cmd_at(n: usize, args: &[String], port: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpt2kit"));
    c.args([
        "launch",
        "--nproc-per-node",
        &n.to_string(),
        "--master-port",
    ])
    .arg(port)
    .arg("--")
    .args(args)
    .env("GPT2KIT_PACKED_CACHE", "off")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

fn launch(n: usize, args: &[String]) -> Output {
    launch_cmd(n, args).output().unwrap()
}

/// The run's step losses and eval losses, from final/trainer_state.json.
fn history(out: &Path) -> (Vec<f64>, Vec<f64>) {
    let text = std::fs::read_to_string(out.join("final/trainer_state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let get = |key: &str| -> Vec<f64> {
        v["log_history"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.get(key).and_then(|x| x.as_f64()))
            .collect()
    };
    (get("loss"), get("eval_loss"))
}

fn weights(out: &Path) -> Vec<(String, Tensor)> {
    let mut w = Tensor::read_safetensors(out.join("final/model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn assert_close(what: &str, a: &[f64], b: &[f64], rel: f64) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= rel * x.abs(), "{what}: {a:?} vs {b:?}");
    }
}

#[test]
fn two_and_three_ranks_train_like_one_process_with_the_global_batch() {
    let t = TempDir::new("ddp-equal");
    common::data_parallel_model(&t);
    // (ranks, per-rank batch, gradient accumulation): global micro-batches of 8 and 9.
    for (ranks, batch, accum) in [(2, 4, "1"), (3, 3, "2")] {
        let extra = ["--gradient-accumulation-steps", accum];
        let one = format!("one-{ranks}");
        assert_ok(&gpt2kit(
            &train_args(&t, &one, ranks * batch, &extra)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ));
        let many = format!("many-{ranks}");
        let o = launch(ranks, &train_args(&t, &many, batch, &extra));
        assert_ok(&o);
        // Only rank 0 reports (one summary) and writes.
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(out.matches("final model:").count(), 1, "{out}");
        let (a, b) = (history(&t.path(&one)), history(&t.path(&many)));
        assert_eq!(a.0.len(), 6);
        // The same sums in another order (each rank's partial gradient, then the ranks'
        // sum): fp32 rounding, measured at ~1e-7 relative on these losses; 1e-5 leaves
        // room and still catches a wrong batch, scale or missing rank (>1e-2).
        assert_close("losses", &a.0, &b.0, 1e-5);
        assert_close("eval losses", &a.1, &b.1, 1e-5);
        common::assert_data_parallel_weights(
            &t.path(&one).join("final/model.safetensors"),
            &t.path(&many).join("final/model.safetensors"),
        );
        // The same job started twice is the same, bit for bit.
        if ranks == 2 {
            let again = launch(ranks, &train_args(&t, "again", batch, &extra));
            assert_ok(&again);
            assert_eq!(history(&t.path(&many)), history(&t.path("again")));
        }
    }
}

/// The pid of the launcher's child with RANK=`rank`, once it has started.
fn rank_pid(launcher: &Child, rank: usize) -> i32 {
    let want = format!("RANK={rank}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", launcher.id()))
                .unwrap_or_default();
        for pid in children.split_whitespace() {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
                return pid.parse().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no rank {rank} appeared");
}

/// Waits for `child`, killing it and failing after `limit` (a hang check).
fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the job still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_killed_rank_ends_the_job_naming_it() {
    let t = TempDir::new("ddp-killed");
    common::data_parallel_model(&t);
    let args = train_args(&t, "out", 2, &["--forever"]);
    let launcher = launch_cmd(2, &args).spawn().unwrap();
    let pid = rank_pid(&launcher, 1);
    // Let it get into training, then kill rank 1 as the kernel's OOM killer would.
    std::thread::sleep(Duration::from_millis(1500));
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let o = wait_bounded(launcher, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("rank 1") && err.contains("signal 9"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_stopped_rank_ends_the_job_at_the_timeout() {
    let t = TempDir::new("ddp-stopped");
    common::data_parallel_model(&t);
    let args = train_args(&t, "out", 2, &["--ddp-timeout", "3"]);
    let launcher = launch_cmd(2, &args).spawn().unwrap();
    let pid = rank_pid(&launcher, 1);
    std::thread::sleep(Duration::from_millis(1500));
    // A rank that hangs (SIGSTOP) rather than dies: rank 0's next collective waits the
    // --ddp-timeout, then fails, and the launcher stops rank 1 (SIGKILL after the grace).
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let o = wait_bounded(launcher, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("rank 0 of 2"), "{err}");
    assert!(err.contains("rank 0 (local rank 0"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_job_killed_inside_a_save_resumes_to_the_uninterrupted_losses() {
    let t = TempDir::new("ddp-resume");
    common::data_parallel_model(&t);
    let whole = launch(2, &train_args(&t, "whole", 3, &[]));
    assert_ok(&whole);
    // Rank 0 dies by SIGKILL inside its second save (step 4); the launcher ends the job.
    let crashed = launch(2, &train_args(&t, "out", 3, &["--crash-at-write", "25"]));
    assert_eq!(crashed.status.code(), Some(1), "{}", stderr(&crashed));
    assert!(stderr(&crashed).contains("rank 0"), "{}", stderr(&crashed));
    assert!(!t.path("out/final").exists());
    assert!(t.path("out/checkpoint-2").is_dir() && !t.path("out/checkpoint-4").exists());
    // Another global micro-batch (one process of 7 against 2 × 3) with the same number of
    // batches per epoch (30 examples: 5 either way) would continue from other examples.
    let other = train_args(&t, "out", 7, &["--resume", "latest"]);
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    assert_clean_failure(&gpt2kit(&other), 2, "micro-batches of 6 examples");
    let resumed = launch(2, &train_args(&t, "out", 3, &["--resume", "latest"]));
    assert_ok(&resumed);
    assert!(
        String::from_utf8_lossy(&resumed.stdout).contains("resuming from"),
        "{}",
        String::from_utf8_lossy(&resumed.stdout)
    );
    // Every rank starts from rank 0's checkpoint: the losses are the uninterrupted
    // job's bit for bit.
    assert_eq!(history(&t.path("whole")), history(&t.path("out")));
    let (w1, w2) = (weights(&t.path("whole")), weights(&t.path("out")));
    for ((n, a), (_, b)) in w1.iter().zip(&w2) {
        assert!(a.equal(b), "{n} differs");
    }
}

#[test]
fn bad_launch_variables_and_timeouts_are_named() {
    let t = TempDir::new("ddp-bad");
    common::data_parallel_model(&t);
    let args = train_args(&t, "out", 2, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for (env, needle) in [
        (&[("WORLD_SIZE", "2"), ("RANK", "2")][..], "RANK=2"),
        (&[("WORLD_SIZE", "x"), ("RANK", "0")][..], "WORLD_SIZE"),
        (&[("WORLD_SIZE", "2")][..], "RANK"),
    ] {
        let o = common::gpt2kit_env(&args, env);
        assert_clean_failure(&o, 2, needle);
    }
    for timeout in ["0", "1e30"] {
        let mut bad = args.clone();
        bad.extend(["--ddp-timeout", timeout]);
        assert_clean_failure(&gpt2kit(&bad), 2, "--ddp-timeout");
        let o = common::gpt2kit_env(&bad, &[("WORLD_SIZE", "1"), ("RANK", "0")]);
        assert_clean_failure(&o, 2, "--ddp-timeout");
    }
    assert!(!t.path("out").exists());
}

#[test]
fn rank_0_refusing_to_start_is_the_rank_named() {
    let t = TempDir::new("ddp-rank0-refuses");
    common::data_parallel_model(&t);
    // An earlier run's checkpoint: rank 0 refuses the folder before any collective.
    std::fs::create_dir_all(t.path("out/checkpoint-2")).unwrap();
    let args = train_args(&t, "out", 2, &[]);
    // Rank 0 keeps its connections until it has printed its error and exits, so the
    // other rank fails after it, every time.
    for _ in 0..4 {
        let o = launch(2, &args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("launch failed: rank 0 (local rank 0"),
            "the launcher blames another rank: {err}"
        );
        let refusal = err.find("is not empty").expect(&err);
        if let Some(peer) = err.find("rank 1 of 2") {
            assert!(refusal < peer, "rank 1's error comes first: {err}");
        }
    }
}

#[test]
fn a_rank_with_other_data_or_model_is_refused() {
    let t = TempDir::new("ddp-other-data");
    common::data_parallel_model(&t);
    std::fs::write(t.path("short.jsonl"), corpus(30, 11)).unwrap();
    let other = t.path("other-model");
    assert_ok(&gpt2kit(&[
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        reference("hub-tied").to_str().unwrap(),
        "--out",
        other.to_str().unwrap(),
        "--n-layer",
        "3",
        "--n-embd",
        "64",
        "--n-positions",
        "32",
    ]));
    // Rank 1 reads its own copy of the data or model (as on another node), which differs.
    for (flag, file, needle) in [
        ("--data", t.s("short.jsonl"), "training examples"),
        ("--model", other.display().to_string(), "trained tensors"),
    ] {
        let args = train_args(&t, "out", 2, &[]);
        let at = args.iter().position(|a| a == flag).unwrap() + 1;
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let script = format!(
            "if [ $RANK = 1 ]; then a='{file}'; else a={}; fi; exec '{}' {} \"$a\" {}",
            quoted[at],
            env!("CARGO_BIN_EXE_gpt2kit"),
            quoted[..at].join(" "),
            quoted[at + 1..].join(" ")
        );
        let o = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
            .args(["launch", "--nproc-per-node", "2", "--master-port"])
            .arg(free_port())
            .args(["--exec", "--", "sh", "-c", &script])
            .env("GPT2KIT_PACKED_CACHE", "off")
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("rank 1 of 2: this rank's run differs from rank 0's"),
            "{err}"
        );
        assert!(err.contains(needle), "{err}");
        assert!(err.contains("launch failed: rank 1 (local rank 1"), "{err}");
        assert!(
            !err.contains("panicked") && !err.contains("SIGABRT"),
            "{err}"
        );
        assert!(!t.path("out/final").exists());
        let _ = std::fs::remove_dir_all(t.path("out"));
    }
}

#[test]
fn two_jobs_started_together_on_one_port_leave_one_training() {
    let t = TempDir::new("ddp-same-port");
    common::data_parallel_model(&t);
    // The job whose rank 0 loses the port fails; its rank 1 reaches the other job's
    // store but keeps to its own job's keys, so the other job trains undisturbed.
    for attempt in 0..4 {
        let _ = std::fs::remove_dir_all(t.path("a"));
        let _ = std::fs::remove_dir_all(t.path("b"));
        let port = free_port();
        let start = |out: &str| {
            let args = train_args(&t, out, 2, &[]);
            launch_cmd_at(2, &args, &port).spawn().unwrap()
        };
        let (a, b) = (start("a"), start("b"));
        let (a, b) = (
            wait_bounded(a, Duration::from_secs(120)),
            wait_bounded(b, Duration::from_secs(120)),
        );
        let ok = [&a, &b].iter().filter(|o| o.status.success()).count();
        assert_eq!(
            ok,
            1,
            "attempt {attempt}: one job must train\n{}\n{}",
            stderr(&a),
            stderr(&b)
        );
        let failed = if a.status.success() { &b } else { &a };
        assert!(stderr(failed).contains("EADDRINUSE"), "{}", stderr(failed));
    }
}

#[test]
fn nodes_launched_with_other_world_sizes_are_refused_at_once() {
    let t = TempDir::new("ddp-world-mismatch");
    common::data_parallel_model(&t);
    let port = free_port();
    let node = |nproc: &str, node_rank: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpt2kit"));
        c.args(["launch", "--nproc-per-node", nproc, "--nnodes", "2"])
            .args(["--node-rank", node_rank, "--master-port", &port, "--"])
            .args(train_args(&t, "out", 2, &["--ddp-timeout", "120"]))
            .env("GPT2KIT_PACKED_CACHE", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    // Node 0 makes a job of 2 ranks, node 1 one of 4: node 1's ranks stop at once
    // instead of everyone waiting out the timeout.
    let mut first = node("1", "0");
    let start = Instant::now();
    let second = wait_bounded(node("2", "1"), Duration::from_secs(60));
    assert!(start.elapsed() < Duration::from_secs(30));
    let err = stderr(&second);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains("this rank's WORLD_SIZE is 4 but rank 0's is 2"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    first.kill().unwrap();
    first.wait().unwrap();
}
