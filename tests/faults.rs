//! Faults injected into the commands that write folders: `train` killed (SIGKILL) at
//! seeded random moments and at seeded steps inside its saves (the hidden
//! `--crash-at-write N`, `infer::faults`), then resumed until done, ends where an
//! uninterrupted run ends, bit for bit, with no temporary folder left; `init`,
//! `quantize`, `dequantize` and `tokenizer train` killed at random moments leave `--out`
//! absent or complete; a damaged checkpoint is named and passed over by `--resume`; a
//! full filesystem, a read-only folder, a missing parent and a path that is a file fail
//! cleanly, with every earlier checkpoint intact.
mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_clean_failure, assert_ok, corpus, gpt2kit, reference, stderr, TempDir};

/// A small seeded generator (SplitMix64): the trials are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Six steps of the tiny reference model, a save every step, the three newest kept, a
/// log entry every step.
fn train_args(model: &Path, data: &Path, out: &Path) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--batch-size",
        "2",
        "--block-size",
        "32",
        "--lr",
        "1e-3",
        "--seed",
        "4",
        "--save-steps",
        "1",
        "--save-total-limit",
        "3",
        "--logging-steps",
        "1",
        "--lr-scheduler",
        "constant",
        "--max-steps",
        "6",
    ]
    .map(String::from)
    .to_vec();
    for (flag, p) in [("--model", model), ("--data", data), ("--output", out)] {
        a.push(flag.into());
        a.push(p.to_str().unwrap().into());
    }
    a
}

fn spawn(args: &[String]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .env("GPT2KIT_PACKED_CACHE", "off")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// What a finished run left that an uninterrupted run must equal: the kept checkpoints'
/// weights and optimizer state, final/'s weights, and the loss curve (log_history
/// without its tokens/s, a timing).
#[derive(Debug, PartialEq)]
struct Outcome {
    files: BTreeMap<String, Vec<u8>>,
    curve: Vec<serde_json::Value>,
}

fn outcome(out: &Path) -> Outcome {
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let step = name.strip_prefix("checkpoint-").map(|s| s.parse::<u64>());
        if matches!(step, Some(Ok(_))) || name == "final" {
            for f in ["model.safetensors", "optimizer.safetensors"] {
                if let Ok(bytes) = std::fs::read(e.path().join(f)) {
                    files.insert(format!("{name}/{f}"), bytes);
                }
            }
        }
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("final/trainer_state.json")).unwrap())
            .unwrap();
    let curve = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.as_object_mut().unwrap().remove("tokens_per_s");
            e
        })
        .collect();
    Outcome { files, curve }
}

/// Temporary folders (`.tmp-*`) in `dir`.
fn temps(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".tmp-"))
                .collect()
        })
        .unwrap_or_default()
}

fn has_checkpoint(out: &Path) -> bool {
    std::fs::read_dir(out).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
    })
}

/// Runs `train` to completion after a kill: `--resume` when a checkpoint exists, else
/// afresh over whatever the killed run left.
fn finish(args: &[String], out: &Path) {
    let mut a = args.to_vec();
    a.push(
        if has_checkpoint(out) {
            "--resume"
        } else {
            "--overwrite-output-dir"
        }
        .into(),
    );
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = gpt2kit(&refs);
    assert_ok(&o);
    assert!(temps(out).is_empty(), "left behind: {:?}", temps(out));
    let v = gpt2kit(&["inspect", "--verify", out.to_str().unwrap()]);
    assert_ok(&v);
}

#[test]
fn train_killed_anywhere_resumes_to_the_uninterrupted_runs_weights_and_losses() {
    let t = TempDir::new("faults-train");
    let model = reference("hub-tied");
    let data = t.path("train.jsonl");
    std::fs::write(&data, corpus(40, 61)).unwrap();
    let whole = t.path("whole");
    let started = Instant::now();
    let o = gpt2kit(
        &train_args(&model, &data, &whole)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_ok(&o);
    let run_time = started.elapsed();
    let want = outcome(&whole);
    assert_eq!(want.curve.len(), 6);
    let mut rng = Rng(20);
    let (mut in_save, mut at_random) = (0, 0);
    // Crashes at seeded write points (each step of every save, rotation and final/),
    // one or two per trial; the number of write points of this run is about 22 a save.
    for trial in 0..10 {
        let out = t.path(&format!("hook-{trial}"));
        let args = train_args(&model, &data, &out);
        for _ in 0..1 + rng.below(2) {
            let mut a = args.clone();
            if has_checkpoint(&out) {
                a.push("--resume".into());
            } else if out.exists() {
                a.push("--overwrite-output-dir".into());
            }
            let n = 1 + rng.below(150);
            a.extend(["--crash-at-write".into(), n.to_string()]);
            let status = spawn(&a).wait().unwrap();
            assert!(
                status.success() || status.signal() == Some(9),
                "trial {trial}, --crash-at-write {n}: {status}"
            );
            in_save += usize::from(status.signal() == Some(9));
        }
        finish(&args, &out);
        assert_eq!(outcome(&out), want, "trial {trial}");
    }
    // SIGKILL from outside at random moments: start-up, steps, saves, the final save.
    for trial in 0..5 {
        let out = t.path(&format!("kill-{trial}"));
        let args = train_args(&model, &data, &out);
        let mut child = spawn(&args);
        let delay = rng.below(run_time.as_millis() as u64 * 5 / 4);
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        at_random += usize::from(child.wait().unwrap().signal() == Some(9));
        finish(&args, &out);
        assert_eq!(outcome(&out), want, "kill trial {trial} after {delay} ms");
    }
    println!(
        "train: {in_save} kills inside saves, {at_random} kills at random moments, all resumed \
         to the uninterrupted run's weights and losses"
    );
    assert!(in_save > 0, "no trial crashed inside a save");
}

/// The uninterrupted run's outcome, for the tests that end where it ends.
fn uninterrupted(t: &TempDir, model: &Path, data: &Path) -> Outcome {
    let whole = t.path("whole");
    let o = gpt2kit(&strs(&train_args(model, data, &whole)));
    assert_ok(&o);
    outcome(&whole)
}

fn strs(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

/// `args` with `--max-steps` set to `n`.
fn steps(mut args: Vec<String>, n: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == "--max-steps").unwrap();
    args[i + 1] = n.into();
    args
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

#[test]
fn resume_names_a_damaged_checkpoint_and_continues_from_the_one_before() {
    let t = TempDir::new("faults-verify");
    let model = reference("hub-tied");
    let data = t.path("train.jsonl");
    std::fs::write(&data, corpus(40, 61)).unwrap();
    let want = uninterrupted(&t, &model, &data);
    let out = t.path("out");
    let args = train_args(&model, &data, &out);
    assert_ok(&gpt2kit(&strs(&steps(args.clone(), "4"))));
    // Rotted bytes in the newest, a truncated file in the one before.
    flip_byte(&out.join("checkpoint-4/optimizer.safetensors"), 4000);
    let st = out.join("checkpoint-3/model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&st)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let v = gpt2kit(&["inspect", "--verify", out.to_str().unwrap()]);
    assert_clean_failure(&v, 1, "checkpoint-3/model.safetensors");
    let o = gpt2kit(&strs(&[&args[..], &["--resume".to_string()]].concat()));
    assert_ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains("checkpoint-4/optimizer.safetensors: SHA-256")
            && err.contains("checkpoint-3/model.safetensors")
            && err.contains("truncated"),
        "{err}"
    );
    assert!(common::stdout(&o).contains("checkpoint-2 at step 2"));
    // Kept, out of the way, and the run ends where the uninterrupted one does.
    assert!(out
        .join("checkpoint-4.corrupt/trainer_state.json")
        .is_file());
    assert!(out.join("checkpoint-3.corrupt").is_dir());
    assert_eq!(outcome(&out), want);
    // A damaged checkpoint named by --resume is an error naming the file.
    let o = gpt2kit(&strs(
        &[
            &steps(args.clone(), "8")[..],
            &["--resume".into(), t.s("out/checkpoint-4.corrupt")],
        ]
        .concat(),
    ));
    assert_clean_failure(&o, 2, "checkpoint-4.corrupt/optimizer.safetensors");
    // A checkpoint from before manifests existed (none) still loads.
    std::fs::remove_file(out.join("checkpoint-6/gpt2kit-manifest.json")).unwrap();
    let v = gpt2kit(&["inspect", "--verify", t.s("out/checkpoint-6").as_str()]);
    assert_clean_failure(&v, 1, "nothing to verify");
    let o = gpt2kit(&strs(
        &[&steps(args, "7")[..], &["--resume".into()]].concat(),
    ));
    assert_ok(&o);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    assert!(common::stdout(&o).contains("checkpoint-6 at step 6"));
    // final/ too.
    flip_byte(&out.join("final/config.json"), 10);
    let v = gpt2kit(&["inspect", "--verify", out.to_str().unwrap(), "--json"]);
    // The first failure in name order is the error; every folder is reported.
    assert_clean_failure(&v, 1, "checkpoint-3.corrupt/model.safetensors");
    let report: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    let failed: Vec<&str> = report["verified"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ok"] == false)
        .map(|r| r["folder"].as_str().unwrap())
        .collect();
    assert_eq!(failed.len(), 3, "{report}");
    assert!(failed[2].ends_with("final"), "{report}");
}

/// A writer command for the kill trials: its arguments for an `--out`, and the files
/// that must equal a complete run's (reports holding timings aside).
struct Writer<'a> {
    name: &'a str,
    args: Box<dyn Fn(&Path) -> Vec<String> + 'a>,
    compare: &'a [&'a str],
}

/// Kills `w` at seeded moments: half at a random time within its run, half just as its
/// temporary folder appears (plus a random few hundred microseconds). Afterwards `--out`
/// is absent or complete (its manifest verifies, its files equal a complete run's); a
/// rerun into an absent `--out` succeeds and removes the killed run's temporary folder.
/// Returns (absent, complete) counts.
fn kill_trials(t: &TempDir, w: &Writer, rng: &mut Rng, trials: usize) -> (usize, usize) {
    let files = |out: &Path| -> Vec<Vec<u8>> {
        w.compare
            .iter()
            .map(|f| std::fs::read(out.join(f)).unwrap())
            .collect()
    };
    let whole = t.path(&format!("{}-whole/out", w.name));
    let started = Instant::now();
    assert_ok(&gpt2kit(&strs(&(w.args)(&whole))));
    let run_time = started.elapsed().as_micros() as u64;
    let want = files(&whole);
    let (mut absent, mut complete) = (0, 0);
    for trial in 0..trials {
        let parent = t.path(&format!("{}-{trial}", w.name));
        let out = parent.join("out");
        let mut child = spawn(&(w.args)(&out));
        if trial % 2 == 0 {
            std::thread::sleep(Duration::from_micros(rng.below(run_time * 5 / 4)));
        } else {
            let spin = Duration::from_micros(rng.below(400));
            while temps(&parent).is_empty() && child.try_wait().unwrap().is_none() {
                std::thread::yield_now();
            }
            let seen = Instant::now();
            while seen.elapsed() < spin {
                std::hint::spin_loop();
            }
        }
        let _ = child.kill();
        child.wait().unwrap();
        if out.exists() {
            complete += 1;
        } else {
            absent += 1;
            assert_ok(&gpt2kit(&strs(&(w.args)(&out))));
        }
        assert_ok(&gpt2kit(&["inspect", "--verify", out.to_str().unwrap()]));
        assert_eq!(files(&out), want, "{} trial {trial}", w.name);
        assert!(
            temps(&parent).is_empty(),
            "{}: {:?}",
            w.name,
            temps(&parent)
        );
    }
    (absent, complete)
}

#[test]
fn init_quantize_dequantize_and_tokenizer_train_killed_leave_out_absent_or_complete() {
    let t = TempDir::new("faults-writers");
    let model = reference("hub-tied");
    let data = t.path("train.jsonl");
    std::fs::write(&data, corpus(200, 62)).unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let artifact = t.path("artifact");
    let quantize = |out: &Path| -> Vec<String> {
        let m = p(&model);
        let o = p(out);
        let a = [
            "quantize",
            "--model",
            &m,
            "--method",
            "int8-weight",
            "--decode-tokens",
            "2",
        ];
        let mut a: Vec<String> = a.map(String::from).to_vec();
        a.extend(["--out".into(), o]);
        a
    };
    assert_ok(&gpt2kit(&strs(&quantize(&artifact))));
    let writers = [
        Writer {
            name: "init",
            args: Box::new(|out: &Path| {
                let a = ["init", "--preset", "tiny", "--seed", "3", "--tokenizer"];
                let mut a: Vec<String> = a.map(String::from).to_vec();
                a.extend([p(&model), "--out".into(), p(out)]);
                a
            }),
            compare: &["model.safetensors", "config.json", "tokenizer.json"],
        },
        Writer {
            name: "quantize",
            args: Box::new(quantize),
            compare: &["model.safetensors", "config.json"],
        },
        Writer {
            name: "dequantize",
            args: Box::new(|out: &Path| {
                ["dequantize", "--model", &p(&artifact), "--out", &p(out)]
                    .map(String::from)
                    .to_vec()
            }),
            compare: &["model.safetensors", "config.json"],
        },
        Writer {
            name: "tokenizer",
            args: Box::new(|out: &Path| {
                let a = ["tokenizer", "train", "--vocab-size", "300", "--data"];
                let mut a: Vec<String> = a.map(String::from).to_vec();
                a.extend([p(&data), "--out".into(), p(out)]);
                a
            }),
            compare: &["tokenizer.json", "vocab.json", "merges.txt"],
        },
    ];
    let mut rng = Rng(21);
    for w in &writers {
        let (absent, complete) = kill_trials(&t, w, &mut rng, 4);
        println!(
            "{}: 4 kills, --out absent {absent}, complete {complete}",
            w.name
        );
    }
}

/// Mounts a tmpfs of `size` at `dir` (options after `size=`, such as `,ro`), unmounted
/// when dropped; None (with a message) where this machine does not allow it.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, options: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!(
                "skipped: cannot mount a tmpfs at {} (needs root)",
                dir.display()
            );
        }
        ok.then(|| Self(dir.to_path_buf()))
    }
    fn remount(&self, options: &str) {
        let s = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(s.success(), "remount {options}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Failed with exit 1 or 2 (not a signal), naming `needle`, without a panic.
fn assert_fails_naming(o: &std::process::Output, needle: &str) {
    let code = o.status.code();
    assert!(matches!(code, Some(1 | 2)), "{code:?}: {}", stderr(o));
    assert_clean_failure(o, code.unwrap(), needle);
}

#[test]
fn a_full_disk_fails_the_save_naming_the_path_and_keeps_the_earlier_checkpoints() {
    let t = TempDir::new("faults-full");
    let model = reference("hub-tied");
    let data = t.path("train.jsonl");
    std::fs::write(&data, corpus(40, 61)).unwrap();
    // Room for two checkpoints (about 1.6 MB each) and not a third.
    let Some(mnt) = Mount::tmpfs(&t.path("mnt"), "size=4m") else {
        return;
    };
    let out = t.path("mnt/out");
    let args = train_args(&model, &data, &out);
    let o = gpt2kit(&strs(&args));
    assert_fails_naming(&o, "No space left on device");
    assert!(stderr(&o).contains(&format!("saving {}", out.join("checkpoint-3").display())));
    assert!(temps(&out).is_empty(), "{:?}", temps(&out));
    assert!(!out.join("checkpoint-3").exists());
    for c in ["checkpoint-1", "checkpoint-2"] {
        assert_ok(&gpt2kit(&[
            "inspect",
            "--verify",
            out.join(c).to_str().unwrap(),
        ]));
    }
    // With room again, the run resumes and ends where an uninterrupted run ends.
    mnt.remount("size=64m");
    let want = uninterrupted(&t, &model, &data);
    finish(&args, &out);
    assert_eq!(outcome(&out), want);
}

#[test]
fn read_only_folders_missing_parents_and_files_in_the_way_fail_cleanly() {
    let t = TempDir::new("faults-paths");
    let model = reference("hub-tied");
    let data = t.path("train.jsonl");
    std::fs::write(&data, corpus(40, 61)).unwrap();
    std::fs::write(t.path("file"), "a file").unwrap();
    let m = model.to_str().unwrap().to_string();
    let d = data.to_str().unwrap().to_string();
    let commands = |out: &str| -> Vec<Vec<String>> {
        let mut train = train_args(&model, &data, Path::new(out));
        train = steps(train, "1");
        [
            train,
            ["init", "--preset", "tiny", "--tokenizer", &m, "--out", out]
                .map(String::from)
                .to_vec(),
            [
                "quantize",
                "--model",
                &m,
                "--method",
                "int8-weight",
                "--out",
                out,
            ]
            .map(String::from)
            .to_vec(),
            [
                "tokenizer",
                "train",
                "--vocab-size",
                "300",
                "--data",
                &d,
                "--out",
                out,
            ]
            .map(String::from)
            .to_vec(),
        ]
        .to_vec()
    };
    let file = t.s("file");
    for out in [file.clone(), format!("{file}/sub/out")] {
        for c in commands(&out) {
            assert_fails_naming(&gpt2kit(&strs(&c)), &file);
        }
    }
    assert_eq!(std::fs::read(t.path("file")).unwrap(), b"a file");
    // Missing parents are made (and a failed run removes those it made).
    for (i, c) in commands(&t.s("new/a/b")).iter().enumerate() {
        let c = strs(c)
            .iter()
            .map(|a| a.replace("new/a/b", &format!("new{i}/a/b")))
            .collect::<Vec<_>>();
        assert_ok(&gpt2kit(&c.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    // A read-only folder, empty or holding a run's checkpoints.
    let Some(ro) = Mount::tmpfs(&t.path("ro"), "size=16m") else {
        return;
    };
    let out = t.path("ro/run");
    let train = train_args(&model, &data, &out);
    assert_ok(&gpt2kit(&strs(&steps(train.clone(), "2"))));
    ro.remount("ro");
    for c in commands(&t.s("ro/new")) {
        assert_fails_naming(&gpt2kit(&strs(&c)), "Read-only file system");
    }
    let o = gpt2kit(&strs(&[&train[..], &["--resume".into()]].concat()));
    assert_fails_naming(&o, &t.s("ro/run"));
    assert_ok(&gpt2kit(&["inspect", "--verify", &t.s("ro/run")]));
}
