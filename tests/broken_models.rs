//! Broken model folders against every subcommand: NaN weights, a config that disagrees
//! with its weights or its tokenizer, a missing tokenizer, integer weights, FIFOs where
//! files should be, a truncated safetensors file, devices this build lacks. Each run
//! must end (a deadline kills a hang), exit with the code of the convention in
//! src/main.rs (2 for bad input, 1 for a bad model folder), name the file, key or
//! tensor at fault, and print no panic and no C++ backtrace.
mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_clean_failure, reference, stderr, stdout};
use tch::{Device, Kind, Tensor};

/// Longest any one run may take; the tiny reference models need a second or two.
const DEADLINE: Duration = Duration::from_secs(120);

/// Runs the binary with a deadline: a run still going at the deadline is killed and
/// the test fails, so that a loader blocked on a FIFO cannot block CI.
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .env("GPT2KIT_PACKED_CACHE", "off")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`gpt2kit {}` still running after {DEADLINE:?}: killed",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A fresh scratch folder for one test.
fn scratch(test: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("broken-{test}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of a reference model folder (model files only).
fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, &path).unwrap();
}

fn tensor<'a>(tensors: &'a mut [(String, Tensor)], name: &str) -> &'a mut Tensor {
    &mut tensors.iter_mut().find(|(n, _)| n == name).unwrap().1
}

/// Sets one element of `name` to `value` (NaN, inf).
fn poison(dir: &Path, name: &str, value: f64) {
    edit_tensors(dir, |t| {
        let w = tensor(t, name);
        let _ = w.view([-1]).get(3).fill_(value);
    });
}

fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let st = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success(), "mkfifo {}", path.display());
}

fn jsonl(path: &Path, field: &str) {
    let mut text = String::new();
    for i in 0..40 {
        let row = format!("the quick brown fox {i} jumps over the lazy dog again and again");
        text.push_str(&serde_json::json!({ field: row }).to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// The command lines of every subcommand that reads a model folder.
struct Commands {
    scratch: PathBuf,
    data: PathBuf,
}

impl Commands {
    fn new(test: &str) -> Self {
        let scratch = scratch(test);
        let data = scratch.join("data.jsonl");
        jsonl(&data, "text");
        Self { scratch, data }
    }

    fn out(&self, what: &str) -> PathBuf {
        let p = self.scratch.join(format!("out-{what}"));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    /// `(subcommand, output)` for every subcommand on `model`.
    fn all(&self, model: &Path) -> Vec<(&'static str, Output)> {
        self.some(model, &["inspect", "infer", "eval", "quantize", "train"])
    }

    /// `(subcommand, output)` for the subcommands `subs` on `model`.
    fn some(&self, model: &Path, subs: &[&'static str]) -> Vec<(&'static str, Output)> {
        let m = s(model);
        let d = s(&self.data);
        let (q, t) = (self.out("quantize"), self.out("train"));
        let args = |sub: &str| -> Vec<&str> {
            match sub {
                "inspect" => vec!["inspect", "--model", m],
                "infer" => vec![
                    "infer",
                    "--model",
                    m,
                    "--prompt",
                    "the quick brown fox",
                    "--max-new-tokens",
                    "4",
                ],
                "eval" => vec!["eval", "--model", m, "--data", d],
                "quantize" => vec![
                    "quantize",
                    "--model",
                    m,
                    "--out",
                    s(&q),
                    "--method",
                    "int8-weight",
                    "--eval",
                    d,
                    "--decode-tokens",
                    "2",
                ],
                "train" => vec![
                    "train",
                    "--model",
                    m,
                    "--data",
                    d,
                    "--output",
                    s(&t),
                    "--max-steps",
                    "1",
                ],
                other => panic!("no command line for {other}"),
            }
        };
        subs.iter().map(|&sub| (sub, run(&args(sub)))).collect()
    }
}

/// Every subcommand fails on `model` with `code` and a message holding every needle.
fn assert_all_fail(c: &Commands, model: &Path, code: i32, needles: &[&str]) {
    assert_all_fail_but(c, model, code, needles, &[]);
}

/// As `assert_all_fail`, with other needles for some subcommands.
fn assert_all_fail_but(
    c: &Commands,
    model: &Path,
    code: i32,
    needles: &[&str],
    except: &[(&str, &[&str])],
) {
    assert_fail(c.all(model), model, code, needles, except);
}

fn assert_fail(
    runs: Vec<(&str, Output)>,
    model: &Path,
    code: i32,
    needles: &[&str],
    except: &[(&str, &[&str])],
) {
    for (sub, o) in runs {
        eprintln!("{sub} on {}", model.display());
        let needles = except
            .iter()
            .find(|(s, _)| *s == sub)
            .map_or(needles, |(_, n)| n);
        for needle in needles {
            assert_clean_failure(&o, code, needle);
        }
        let err = stderr(&o);
        assert!(
            !err.contains("Exception raised from") && !err.contains("frame #"),
            "{sub}: C++ backtrace: {err}"
        );
        assert!(
            err.trim_end().lines().count() <= 3,
            "{sub}: a long message:\n{err}"
        );
    }
}

/// The cases start from a copy that every subcommand runs on: a broken copy that
/// fails proves the check, not the copying.
#[test]
fn an_unbroken_copy_runs_everywhere() {
    let c = Commands::new("control");
    let dir = c.scratch.join("model");
    copy_model(&reference("hub-tied"), &dir);
    for (sub, o) in c.all(&dir) {
        assert!(
            o.status.success(),
            "{sub}: exit {:?}: {}",
            o.status.code(),
            stderr(&o)
        );
    }
}

#[test]
fn nan_and_infinite_weights_are_refused_by_name() {
    let c = Commands::new("nan");
    let dir = c.scratch.join("model");
    copy_model(&reference("hub-tied"), &dir);
    poison(&dir, "h.1.mlp.c_fc.weight", f64::NAN);
    poison(&dir, "h.0.ln_2.bias", f64::INFINITY);
    // inspect names every non-finite tensor; the loaders name the first they read.
    let o = run(&["inspect", "--model", s(&dir)]);
    assert_clean_failure(&o, 1, "`h.1.mlp.c_fc.weight`");
    assert_clean_failure(&o, 1, "`h.0.ln_2.bias`");
    assert_clean_failure(&o, 1, "NaN or infinite");
    assert_all_fail(&c, &dir, 1, &["NaN or infinite", "model.safetensors"]);
    // quantize names the input's tensor, not a temporary folder gone by then.
    let o = run(&[
        "quantize",
        "--model",
        s(&dir),
        "--out",
        s(&c.out("q")),
        "--method",
        "int8-dynamic",
    ]);
    assert_clean_failure(&o, 1, "h.0.ln_2.bias");
    assert!(!stderr(&o).contains(".tmp-"), "{}", stderr(&o));
}

/// Config and wte agree on 200 rows; the tokenizer has 400 tokens.
fn undersized_vocab(c: &Commands) -> PathBuf {
    let dir = c.scratch.join("model");
    copy_model(&reference("hub-tied"), &dir);
    edit_config(&dir, |c| c["vocab_size"] = 200.into());
    edit_tensors(&dir, |t| {
        let w = tensor(t, "wte.weight");
        *w = w.narrow(0, 0, 200).contiguous();
    });
    dir
}

#[test]
fn a_vocab_size_below_the_tokenizer_is_refused() {
    let c = Commands::new("vocab");
    let dir = undersized_vocab(&c);
    // train is the next test.
    assert_fail(
        c.some(&dir, &["inspect", "infer", "eval", "quantize"]),
        &dir,
        2,
        &["vocab_size 200", "400 tokens", s(&dir)],
        &[],
    );

    // Config smaller than the weights: the header check names key and tensor.
    let dir = c.scratch.join("model-wte");
    copy_model(&reference("hub-tied"), &dir);
    edit_config(&dir, |c| c["vocab_size"] = 200.into());
    assert_fail(
        c.some(&dir, &["inspect", "eval", "quantize", "train"]),
        &dir,
        1,
        &[
            "config.json",
            "vocab_size is 200",
            "`wte.weight` has shape [400, 64]",
        ],
        &[],
    );
    // infer checks the prompt's ids against the config before it loads the weights.
    assert_fail(c.some(&dir, &["infer"]), &dir, 2, &["vocab_size 200"], &[]);
}

#[test]
fn train_refuses_a_vocab_size_below_the_tokenizer() {
    let c = Commands::new("vocab-train");
    let dir = undersized_vocab(&c);
    assert_fail(
        c.some(&dir, &["train"]),
        &dir,
        2,
        &["vocab_size 200", "400 tokens", s(&dir)],
        &[],
    );
}

#[test]
fn config_sizes_are_checked_against_the_weights_before_allocating() {
    let c = Commands::new("sizes");
    let cases: &[(&str, serde_json::Value, &[&str])] = &[
        (
            "n_layer",
            serde_json::json!(1_000_000_000_000i64),
            &["n_layer is 1000000000000", "`h.2.ln_1.weight` is missing"],
        ),
        (
            "n_positions",
            serde_json::json!(1i64 << 40),
            &["n_positions is 1099511627776", "`wpe.weight`"],
        ),
        (
            "n_embd",
            serde_json::json!(1i64 << 20),
            &["n_embd is 1048576", "`ln_f.weight`"],
        ),
        (
            "n_embd",
            serde_json::json!(1i64 << 40),
            &["more parameters than fit in 64 bits"],
        ),
        (
            "n_inner",
            serde_json::json!(1i64 << 40),
            &["n_inner is 1099511627776", "`h.0.mlp.c_fc.bias`"],
        ),
        (
            "n_head",
            serde_json::json!(1i64 << 40),
            &["n_embd (64) must be divisible by n_head (1099511627776)"],
        ),
        ("n_head", serde_json::json!(3), &["n_head (3)"]),
        (
            "n_layer",
            serde_json::json!(0),
            &["n_layer must be positive"],
        ),
        (
            "n_embd",
            serde_json::json!(-64),
            &["n_embd must be positive"],
        ),
        (
            "n_layer",
            serde_json::json!(1_000_000_000_000_000i64),
            &["more parameters than fit in 64 bits"],
        ),
    ];
    for (i, (key, value, needles)) in cases.iter().enumerate() {
        let dir = c.scratch.join(format!("model-{i}"));
        copy_model(&reference("hub-tied"), &dir);
        edit_config(&dir, |c| c[key] = value.clone());
        let mut all = vec!["config.json"];
        all.extend_from_slice(needles);
        assert_all_fail(&c, &dir, 1, &all);
    }
}

#[test]
fn weights_past_n_layer_are_refused_by_name() {
    let c = Commands::new("layers");
    let dir = c.scratch.join("model");
    copy_model(&reference("hub-tied"), &dir);
    edit_config(&dir, |c| c["n_layer"] = 1.into());
    assert_all_fail(
        &c,
        &dir,
        1,
        &[
            "n_layer is 1",
            "`h.1.attn.c_attn.weight`",
            "would be unused",
        ],
    );
    // A stray tensor outside the blocks is refused too.
    let dir = c.scratch.join("model-stray");
    copy_model(&reference("hub-tied"), &dir);
    edit_tensors(&dir, |t| {
        t.push((
            "score.weight".into(),
            Tensor::zeros([2, 64], (Kind::Float, Device::Cpu)),
        ))
    });
    assert_all_fail(&c, &dir, 1, &["`score.weight`", "not used"]);
    // A layer number at i64's end is counted without overflow (it once wrapped to a
    // negative count and named a missing tensor `h.-9223372036854775808…`).
    let dir = c.scratch.join("model-far");
    copy_model(&reference("hub-tied"), &dir);
    edit_tensors(&dir, |t| {
        t.push((
            "h.9223372036854775807.ln_1.weight".into(),
            Tensor::zeros([64], (Kind::Float, Device::Cpu)),
        ))
    });
    assert_all_fail(
        &c,
        &dir,
        1,
        &["would be unused", "`h.9223372036854775807.ln_1.weight`"],
    );
}

#[test]
fn a_missing_tokenizer_is_named() {
    let c = Commands::new("no-tokenizer");
    let dir = c.scratch.join("model");
    copy_model(&reference("hub-tied"), &dir);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    for (sub, o) in c.all(&dir) {
        if sub == "inspect" {
            assert!(o.status.success(), "{}", stderr(&o));
            assert!(stdout(&o).contains("none found"), "{}", stdout(&o));
        } else {
            assert_clean_failure(&o, 1, "tokenizer");
            assert_clean_failure(&o, 1, s(&dir));
        }
    }
}

#[test]
fn integer_weights_are_refused_by_name() {
    let c = Commands::new("int32");
    let dir = c.scratch.join("model");
    copy_model(&reference("hub-tied"), &dir);
    edit_tensors(&dir, |t| {
        let w = tensor(t, "h.0.attn.c_attn.weight");
        *w = w.to_kind(Kind::Int);
    });
    assert_all_fail(&c, &dir, 1, &["`h.0.attn.c_attn.weight`", "I32"]);
}

#[test]
fn fifos_are_refused_not_read() {
    let c = Commands::new("fifo");
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        let dir = c.scratch.join(format!("model-{file}"));
        copy_model(&reference("hub-tied"), &dir);
        mkfifo(&dir.join(file));
        assert_all_fail(&c, &dir, 1, &[file, "not a regular file (a FIFO)"]);
    }
    // A --generation-config FIFO blocked infer until killed.
    let fifo = c.scratch.join("generation_config.json");
    mkfifo(&fifo);
    let model = reference("hub-tied");
    let o = run(&[
        "infer",
        "--model",
        s(&model),
        "--prompt",
        "hello",
        "--generation-config",
        s(&fifo),
    ]);
    assert_clean_failure(&o, 1, "not a regular file (a FIFO)");
}

#[test]
fn a_truncated_safetensors_file_is_named_once() {
    let c = Commands::new("truncated");
    let dir = c.scratch.join("model");
    copy_model(&reference("hub-tied"), &dir);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert_all_fail(&c, &dir, 1, &["model.safetensors", "malformed safetensors"]);
    // The reason is printed once, not formatted into the message and chained as well.
    let o = run(&["inspect", "--model", s(&dir)]);
    let err = stderr(&o);
    assert_eq!(err.matches("not fully covered").count(), 1, "{err}");
}

#[test]
fn broken_int8_artifacts_fail_cleanly() {
    let c = Commands::new("artifact");
    let art = c.scratch.join("artifact");
    let o = run(&[
        "quantize",
        "--model",
        s(&reference("hub-tied")),
        "--out",
        s(&art),
        "--method",
        "int8-dynamic",
        "--decode-tokens",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let scale = "h.0.mlp.c_fc.weight_scale";
    let names: Vec<String> = Tensor::read_safetensors(art.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let scale = names
        .iter()
        .find(|n| n.contains("h.0.mlp.c_fc") && n.contains("scale"))
        .unwrap_or_else(|| panic!("no {scale}-like tensor in {names:?}"))
        .clone();
    poison(&art, &scale, f64::NAN);
    let o = run(&["inspect", "--model", s(&art)]);
    assert_clean_failure(&o, 1, &format!("`{scale}`"));
    let o = run(&["infer", "--model", s(&art), "--prompt", "the quick"]);
    assert_clean_failure(&o, 1, &format!("`{scale}`"));
    let o = run(&["dequantize", "--model", s(&art), "--out", s(&c.out("deq"))]);
    assert_clean_failure(&o, 1, &format!("`{scale}`"));

    let path = art.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let o = run(&["dequantize", "--model", s(&art), "--out", s(&c.out("deq"))]);
    assert_clean_failure(&o, 1, "malformed safetensors");
}

#[test]
fn devices_this_build_lacks_exit_2_naming_the_flag() {
    let c = Commands::new("device");
    let m = reference("hub-tied");
    let (m, d) = (s(&m), s(&c.data));
    let mut devices = vec!["cuda:7"];
    if !tch::utils::has_mps() {
        devices.push("mps");
    }
    if !tch::Cuda::is_available() {
        devices.push("cuda");
    }
    for device in devices {
        let t = c.out("train");
        for args in [
            vec!["infer", "--model", m, "--prompt", "x", "--device", device],
            vec!["eval", "--model", m, "--data", d, "--device", device],
            vec![
                "train",
                "--model",
                m,
                "--data",
                d,
                "--output",
                s(&t),
                "--max-steps",
                "1",
                "--device",
                device,
            ],
        ] {
            let o = run(&args);
            assert_clean_failure(&o, 2, "--device");
            assert_eq!(
                stderr(&o).trim_end().lines().count(),
                1,
                "{args:?}: {}",
                stderr(&o)
            );
        }
    }
}

#[test]
fn inspect_shows_the_quantization_method() {
    let c = Commands::new("inspect-int8");
    let art = c.scratch.join("artifact");
    let o = run(&[
        "quantize",
        "--model",
        s(&reference("hub-tied")),
        "--out",
        s(&art),
        "--method",
        "int8-dynamic",
        "--keep-embeddings-float",
        "--decode-tokens",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["inspect", "--model", s(&art)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let row = text
        .lines()
        .find(|l| l.starts_with("quantized"))
        .unwrap_or_else(|| panic!("no quantized row: {text}"));
    assert!(row.contains("int8-dynamic"), "{row}");
    assert!(row.contains("embeddings float"), "{row}");
    let o = run(&["inspect", "--model", s(&art), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["quantization"]["method"], "int8-dynamic");
    assert_eq!(v["quantization"]["quantize_embeddings"], false);
    // A float folder says so.
    let o = run(&["inspect", "--model", s(&reference("hub-tied")), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["quantization"].is_null(), "{v}");
}

#[test]
fn eval_and_quantize_read_the_text_field_flag() {
    let c = Commands::new("text-field");
    let m = reference("hub-tied");
    let m = s(&m);
    let body = c.scratch.join("body.jsonl");
    jsonl(&body, "body");
    let b = s(&body);
    let o = run(&["eval", "--model", m, "--data", b]);
    assert_clean_failure(&o, 2, "field \"text\" is missing");
    let o = run(&["eval", "--model", m, "--data", b, "--text-field", "body"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same rows under "text" give the same loss.
    let o2 = run(&["eval", "--model", m, "--data", s(&c.data)]);
    let loss = |o: &Output| stdout(o).split(" · ").next().unwrap().to_string();
    assert_eq!(loss(&o), loss(&o2));
    let q = |extra: &[&str]| {
        let mut args = vec![
            "quantize",
            "--model",
            m,
            "--method",
            "int8-dynamic",
            "--calibration",
            b,
            "--smooth-alpha",
            "0.5",
            "--eval",
            b,
            "--decode-tokens",
            "0",
        ];
        let out = c.out("q");
        args.extend_from_slice(&["--out", s(&out)]);
        args.extend_from_slice(extra);
        let o = run(&args);
        let _ = std::fs::remove_dir_all(&out);
        o
    };
    assert_clean_failure(&q(&[]), 2, "field \"text\" is missing");
    let o = q(&["--text-field", "body"]);
    assert!(o.status.success(), "{}", stderr(&o));
}
