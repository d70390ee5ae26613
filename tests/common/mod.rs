//! Helpers shared by the command-line test files (each declares `mod common;`): the
//! reference models, running the binary, clean-failure checks, the reference Python.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where `make reference` wrote the reference models (`GPT2KIT_REFERENCE_DIR`, which
/// `make test` sets, else target/reference).
pub fn reference_dir() -> PathBuf {
    std::env::var_os("GPT2KIT_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/reference"))
}

/// A reference model folder, checked to exist.
pub fn reference(name: &str) -> PathBuf {
    let model = reference_dir().join(name);
    assert!(
        model.join("config.json").exists(),
        "reference model {} missing: run `make reference` (`make test` does)",
        model.display()
    );
    model
}

pub fn gpt2kit(args: &[&str]) -> Output {
    gpt2kit_env(args, &[])
}

pub fn gpt2kit_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpt2kit"));
    c.args(args);
    // No packed files beside the shared reference models (tests of them set it).
    c.env("GPT2KIT_PACKED_CACHE", "off");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exit `code`, a message containing `needle`, and no panic or backtrace.
pub fn assert_clean_failure(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

/// The reference environment's python (transformers, tensorboard): `GPT2KIT_PYTHON`
/// (`make test` sets it), else the venv whose torch the build links (`LIBTORCH` is
/// `<venv>/lib/python3.X/site-packages/torch`).
/// Runs `tests/reference/SCRIPT` with the reference python; its stdout (a failure shows
/// its stderr).
pub fn reference_script(script: &str, args: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(script);
    let o = Command::new(python())
        .arg(path)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{script} {args:?}: {}", stderr(&o));
    stdout(&o)
}

/// `gpt2kit eval --json`'s perplexity of `model` on `data` in blocks of 32, with `extra`
/// flags.
pub fn perplexity(model: &str, data: &str, extra: &[&str]) -> f64 {
    let mut args = vec![
        "eval",
        "--model",
        model,
        "--data",
        data,
        "--block-size",
        "32",
        "--json",
    ];
    args.extend(extra);
    let o = gpt2kit(&args);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    v["perplexity"].as_f64().unwrap()
}

pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("GPT2KIT_PYTHON") {
        return p.into();
    }
    let libtorch = std::env::var("LIBTORCH")
        .ok()
        .or(option_env!("LIBTORCH").map(String::from))
        .expect("set GPT2KIT_PYTHON to the reference venv's python (`make setup` makes one)");
    let python = Path::new(&libtorch)
        .ancestors()
        .nth(4)
        .expect("LIBTORCH lies inside a venv")
        .join("bin/python");
    assert!(
        python.exists(),
        "{} missing: run `make setup`",
        python.display()
    );
    python
}

/// A command that succeeded without a panic.
/// `gpt2kit quantize --method METHOD` of `model` into `out` (no decode check), with
/// `extra` flags.
#[allow(dead_code)]
pub fn quantize_int8(model: &Path, out: &Path, method: &str, extra: &[&str]) {
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec![
        "quantize",
        "--model",
        m,
        "--out",
        o,
        "--method",
        method,
        "--decode-tokens",
        "0",
    ];
    args.extend_from_slice(extra);
    assert_ok(&gpt2kit(&args));
}

pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "stderr: {}", stderr(o));
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
}

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("gpt2kit-train-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const WORDS: &[&str] = &[
    "the", "model", "reads", "every", "weight", "once", "per", "token", "so", "decode", "speed",
    "is", "set", "by", "memory", "a", "cache", "holds", "keys", "and", "values", "quick", "brown",
    "fox", "jumps", "over", "lazy", "dog", "tensor", "layer", "loss",
];

/// `rows` deterministic JSONL text rows (a fixed linear congruential sequence).
pub fn corpus(rows: usize, seed: u64) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as usize
    };
    let mut out = String::new();
    for _ in 0..rows {
        let n = 4 + next() % 20;
        let words: Vec<&str> = (0..n).map(|_| WORDS[next() % WORDS.len()]).collect();
        out += &serde_json::json!({ "text": words.join(" ") }).to_string();
        out.push('\n');
    }
    out
}

/// `gpt2kit` with arguments that need not be UTF-8.
pub fn gpt2kit_os(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .args(args)
        .env("GPT2KIT_PACKED_CACHE", "off")
        .output()
        .unwrap()
}

/// Truncates `file` in place to a third of its length (as a writer that reuses the file
/// would, under a model mapped from it).
pub fn truncate_to_a_third(file: &Path) {
    let len = std::fs::metadata(file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
}

/// Copies the files (not subfolders) of `from` into `to`, made if missing.
pub fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        // A packed file belongs to its folder's weights (a copy would be rebuilt).
        let packed = p.extension().is_some_and(|e| e == "gpt2kit");
        if p.is_file() && !packed {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// Logits of a 3-token prompt, then of 3 decode steps (the prefill and decode paths), as
/// f32.
pub fn prompt_and_step_logits(model: &infer::Gpt2) -> tch::Tensor {
    use tch::{Kind, Tensor};
    tch::no_grad(|| {
        let mut cache = model.new_cache(1, 8);
        let prompt = Tensor::from_slice(&[5i64, 17, 99]).view([1, 3]);
        let mut out = vec![model.forward(&prompt, &mut cache)];
        for t in [3i64, 250, 42] {
            out.push(model.forward(&Tensor::from_slice(&[t]).view([1, 1]), &mut cache));
        }
        Tensor::cat(&out, 1).to_kind(Kind::Float)
    })
}

/// Final weights of a data-parallel run against one process's with the global batch,
/// after a few AdamW steps. AdamW's update m/(sqrt(v)+eps) is scale free: an entry whose
/// gradient is near the fp32 rounding of its summands (a near cancellation) can step
/// differently by up to ~lr, so the largest |diff| is an outlier statistic. Measured over
/// 13 corpora (6 steps at lr 3e-3, one process against 2 ranks): the 99.99th percentile
/// 1.5e-6..3.2e-6, the max 2.4e-6..5.0e-5, 0..2 of 127744 entries above 1e-5. So: at
/// most 0.01% of the entries above 1e-5, and none above 2.5e-4 (5x the worst measured,
/// a twelfth of one lr step). Returns the largest |diff| and the count above 1e-5.
#[allow(dead_code)]
pub fn assert_data_parallel_weights(one: &Path, many: &Path) -> (f64, i64) {
    const BULK: f64 = 1e-5;
    const BULK_FRACTION: f64 = 1e-4;
    const MAX: f64 = 2.5e-4;
    let read = |p: &Path| {
        let mut w = tch::Tensor::read_safetensors(p).unwrap();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        w
    };
    let (a, b) = (read(one), read(many));
    assert_eq!(
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        b.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    let (mut worst, mut above, mut total) = (0f64, 0i64, 0i64);
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x.size(), y.size(), "{name}");
        let diff = (x - y).abs();
        let max = diff.max().double_value(&[]);
        assert!(max < MAX, "{name}: max |diff| {max:e} (tolerance {MAX:e})");
        worst = worst.max(max);
        above += diff.gt(BULK).sum(tch::Kind::Int64).int64_value(&[]);
        total += diff.numel() as i64;
    }
    assert!(
        above as f64 <= BULK_FRACTION * total as f64,
        "{above} of {total} weights differ by more than {BULK:e}"
    );
    (worst, above)
}

/// For data-parallel tests: `t/model`, a 2-layer model with dropout off (dropout masks
/// are drawn per rank, so with it on a data-parallel step differs from one process's,
/// as in PyTorch's DDP), and `t/data.jsonl`, 37 rows: 30 train and 7 eval examples with
/// `--eval-split 0.2`, so global batches of 4·2 and 3·3 leave a short last batch in each
/// epoch (and ranks with nothing to do in it).
#[allow(dead_code)]
pub fn data_parallel_model(t: &TempDir) -> PathBuf {
    let dir = t.path("model");
    let tok = reference("hub-tied");
    assert_ok(&gpt2kit(&[
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--n-layer",
        "2",
        "--n-embd",
        "64",
        "--n-positions",
        "32",
        "--seed",
        "3",
    ]));
    let path = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for k in ["resid_pdrop", "embd_pdrop", "attn_pdrop"] {
        c[k] = 0.0.into();
    }
    std::fs::write(&path, c.to_string()).unwrap();
    std::fs::write(t.path("data.jsonl"), corpus(37, 11)).unwrap();
    dir
}
