//! Nothing a user types may lose their work or crash the tool: an existing `--out` is
//! refused with every earlier byte intact, a closed or full stderr loses messages but
//! not the run, JSONL files that Python reads (a byte order mark) train, and a tokenizer
//! that is not the model's is refused naming the row instead of crashing the forward.
mod common;

use common::{assert_clean_failure, gpt2kit, reference, stderr, stdout};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("gpt2kit-robust-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Self(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Every file under `dir` (recursively) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Names in `dir` that start with `.tmp-` (temporary folders left behind).
fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

fn text_rows(n: usize) -> String {
    let words = [
        "the", "model", "reads", "every", "weight", "once", "per", "token",
    ];
    (0..n)
        .map(|i| {
            let text: Vec<&str> = (0..6 + i % 9).map(|j| words[(i * 7 + j * 3) % 8]).collect();
            format!("{}\n", serde_json::json!({ "text": text.join(" ") }))
        })
        .collect()
}

fn tokenizer_train(data: &Path, out: &str) -> Output {
    gpt2kit(&[
        "tokenizer",
        "train",
        "--data",
        data.to_str().unwrap(),
        "--vocab-size",
        "300",
        "--out",
        out,
    ])
}

#[test]
fn tokenizer_train_refuses_an_existing_folder_and_leaves_it_intact() {
    let t = TempDir::new("tok-out");
    let data = t.path("data.jsonl");
    fs::write(&data, text_rows(50)).unwrap();
    let model = t.path("model");
    common::copy_files(&reference("hub-tied"), &model);
    let before = snapshot(&t.0);
    let o = tokenizer_train(&data, &t.s("model"));
    assert_clean_failure(&o, 2, &format!("{}: already exists", model.display()));
    assert_eq!(snapshot(&t.0), before, "a file changed");

    // A file in the way, also refused.
    fs::write(t.path("file"), "keep").unwrap();
    let o = tokenizer_train(&data, &t.s("file"));
    assert_clean_failure(&o, 2, "already exists and is not a folder");
    assert_eq!(fs::read(t.path("file")).unwrap(), b"keep");

    // A new folder, or an existing empty one, is written whole and nothing is left
    // beside it.
    for name in ["new", "empty"] {
        if name == "empty" {
            fs::create_dir(t.path(name)).unwrap();
        }
        let o = tokenizer_train(&data, &t.s(name));
        assert!(o.status.success(), "{}", stderr(&o));
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
        ] {
            assert!(t.path(name).join(f).is_file(), "{name}/{f}");
        }
    }
    assert_eq!(leftovers(&t.0), Vec::<String>::new());
}

#[test]
fn init_refuses_an_existing_folder_and_leaves_it_intact() {
    let t = TempDir::new("init-out");
    let tok = reference("hub-tied");
    let model = t.path("model");
    common::copy_files(&tok, &model);
    fs::write(t.path("file"), "keep").unwrap();
    let before = snapshot(&t.0);
    for out in ["model", "file"] {
        let o = gpt2kit(&[
            "init",
            "--preset",
            "tiny",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--out",
            &t.s(out),
        ]);
        assert_clean_failure(&o, 2, &t.s(out));
    }
    assert_eq!(snapshot(&t.0), before, "a file changed");
}

/// A small model and data to train it on.
fn tiny_run(t: &TempDir) -> [String; 2] {
    let o = gpt2kit(&[
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        reference("hub-tied").to_str().unwrap(),
        "--out",
        &t.s("init"),
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--n-positions",
        "32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    fs::write(t.path("train.jsonl"), text_rows(40)).unwrap();
    [t.s("init"), t.s("train.jsonl")]
}

fn train_command(t: &TempDir, model: &str, data: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpt2kit"));
    c.env("GPT2KIT_PACKED_CACHE", "off");
    c.args([
        "train",
        "--model",
        model,
        "--data",
        data,
        "--output",
        &t.s("run"),
        "--max-steps",
        "6",
        "--logging-steps",
        "1",
        "--batch-size",
        "2",
    ]);
    c
}

/// `gpt2kit train ... 2>&1 | head -1` closed the pipe under a run that still logs to
/// stderr: its writes fail with EPIPE, where `eprintln!` panics, and a panic in the panic
/// hook (which wrote with `eprintln!` too) aborted the process without the final model.
#[test]
fn a_closed_or_full_stderr_does_not_stop_training() {
    let t = TempDir::new("stderr");
    let [model, data] = tiny_run(&t);
    // Stderr a pipe whose read end is closed before anything is written.
    let mut child = train_command(&t, &model, &data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "stdout: {}", stdout(&o));
    assert!(t.path("run/final/model.safetensors").is_file());
    assert!(stdout(&o).contains("trained 6 steps"), "{}", stdout(&o));

    // Stderr a full device.
    fs::remove_dir_all(t.path("run")).unwrap();
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = train_command(&t, &model, &data)
        .stderr(Stdio::from(full))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "stdout: {}", stdout(&o));
    assert!(t.path("run/final/model.safetensors").is_file());
}

/// The issue's own command, `gpt2kit train ... 2>&1 | head -1`, closes stdout too: the
/// eval lines the trainer prints mid-run fail with EPIPE. The run must still finish and
/// write its final model (needs train/src/trainer.rs to ignore failed stdout writes
/// mid-run; it stopped at the first eval line with exit 0 and no `final/`).
#[test]
fn a_closed_stdout_and_stderr_do_not_stop_training() {
    let t = TempDir::new("closed-both");
    let [model, data] = tiny_run(&t);
    let mut child = train_command(&t, &model, &data)
        .args(["--eval-split", "0.2", "--eval-steps", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(t.path("run/final/model.safetensors").is_file());
}

/// An error message to a full stderr: lost, but the exit status still says what
/// happened (2 for bad input), with no abort.
#[test]
fn an_error_with_a_full_stderr_keeps_its_exit_status() {
    let t = TempDir::new("stderr-error");
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .env("GPT2KIT_PACKED_CACHE", "off")
        .args([
            "init",
            "--preset",
            "no-such-preset",
            "--tokenizer",
            reference("hub-tied").to_str().unwrap(),
            "--out",
            &t.s("m"),
        ])
        .stderr(Stdio::from(full))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// `gpt2kit infer ... --stats 2>/dev/full`: the generated text on stdout is intact and
/// the exit status 0; the statistics are lost.
#[test]
fn infer_stats_to_a_full_stderr_keeps_the_output() {
    let model = reference("hub-tied");
    let args = [
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "3",
    ];
    let plain = gpt2kit(&args);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .env("GPT2KIT_PACKED_CACHE", "off")
        .args(args)
        .arg("--stats")
        .stderr(Stdio::from(full))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), stdout(&plain));
}

/// Python's `open(..., encoding="utf-8-sig")` reads a file that starts with a byte order
/// mark; `tokenizer train`, `train` and `eval` do too (it was "invalid JSON at line 1").
#[test]
fn jsonl_with_a_byte_order_mark_is_read() {
    let t = TempDir::new("bom");
    let [model, _] = tiny_run(&t);
    let rows = text_rows(40);
    fs::write(t.path("plain.jsonl"), &rows).unwrap();
    fs::write(t.path("bom.jsonl"), format!("\u{feff}{rows}")).unwrap();

    let o = tokenizer_train(&t.path("bom.jsonl"), &t.s("tok-bom"));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = tokenizer_train(&t.path("plain.jsonl"), &t.s("tok-plain"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        fs::read(t.path("tok-bom/tokenizer.json")).unwrap(),
        fs::read(t.path("tok-plain/tokenizer.json")).unwrap(),
        "the BOM became training text"
    );

    let eval = |data: &str| {
        let o = gpt2kit(&["eval", "--model", &model, "--data", data, "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    assert_eq!(eval(&t.s("bom.jsonl")), eval(&t.s("plain.jsonl")));

    let o = train_command(&t, &model, &t.s("bom.jsonl"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // A BOM anywhere else is still an error naming its line.
    fs::write(t.path("mid.jsonl"), format!("{rows}\u{feff}{rows}")).unwrap();
    let o = gpt2kit(&["eval", "--model", &model, "--data", &t.s("mid.jsonl")]);
    assert_clean_failure(&o, 2, &format!("{}:41: invalid JSON", t.s("mid.jsonl")));
}

/// A model folder whose tokenizer was retrained into it (what `tokenizer train --out
/// MODEL` used to do): 1000 tokens for a model of 400. Returns (model, data).
fn model_with_a_bigger_tokenizer(t: &TempDir) -> (String, String) {
    let [model, _] = tiny_run(t);
    // Random words, so that 1000 tokens are learnt.
    let mut x = 7u64;
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        (x >> 33) as usize
    };
    let words: Vec<String> = (0..3000)
        .map(|_| {
            (0..2 + next() % 6)
                .map(|_| (b'a' + (next() % 26) as u8) as char)
                .collect()
        })
        .collect();
    let rows: String = (0..3000)
        .map(|_| {
            let text: Vec<&str> = (0..30)
                .map(|_| words[next() % words.len()].as_str())
                .collect();
            format!("{}\n", serde_json::json!({ "text": text.join(" ") }))
        })
        .collect();
    fs::write(t.path("words.jsonl"), rows).unwrap();
    let o = gpt2kit(&[
        "tokenizer",
        "train",
        "--data",
        &t.s("words.jsonl"),
        "--vocab-size",
        "1000",
        "--out",
        &t.s("tok"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    fs::copy(
        t.path("tok/tokenizer.json"),
        Path::new(&model).join("tokenizer.json"),
    )
    .unwrap();
    (model, t.s("words.jsonl"))
}

/// A tokenizer retrained into a model folder, with more tokens than the model's
/// `vocab_size`, is refused before any data is read, where the embedding lookup
/// panicked ("index out of range in self").
#[test]
fn eval_refuses_a_tokenizer_past_the_models_vocabulary() {
    let t = TempDir::new("vocab-eval");
    let (model, data) = model_with_a_bigger_tokenizer(&t);
    let o = gpt2kit(&["eval", "--model", &model, "--data", &data]);
    assert_clean_failure(&o, 2, "config.json has vocab_size 400 but the tokenizer");
}

#[test]
fn train_refuses_a_tokenizer_past_the_models_vocabulary() {
    let t = TempDir::new("vocab-train");
    let (model, data) = model_with_a_bigger_tokenizer(&t);
    let o = train_command(&t, &model, &data).output().unwrap();
    assert_clean_failure(&o, 2, "config.json has vocab_size 400 but the tokenizer");
    assert!(!t.path("run/final").exists());
}
