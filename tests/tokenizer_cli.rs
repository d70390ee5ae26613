//! `gpt2kit tokenizer train` end to end: the folder it writes loads in `infer::Tokenizer`
//! (both file formats) and in transformers (tests/reference/check_tokenizer.py), with
//! identical ids; decode(encode(s)) == s for arbitrary UTF-8; the same data gives the
//! same bytes; bad input fails with exit 2 naming file:line or the flag.
mod common;

use common::{gpt2kit, python, stderr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use infer::Tokenizer;
use serde_json::{json, Value};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gpt2kit-tokenizer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small deterministic generator (SplitMix64), so the texts are the same every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Training texts: sentences over a word list with ASCII, Latin-1, CJK and emoji words,
/// numbers, punctuation and code-like lines, so merges span multi-byte characters.
fn corpus(rows: usize) -> Vec<String> {
    let words = [
        "the",
        "a",
        "statement",
        "function",
        "returns",
        "value",
        "if",
        "else",
        "for",
        "while",
        "list",
        "object",
        "is",
        "of",
        "to",
        "and",
        "in",
        "café",
        "naïve",
        "über",
        "日本語",
        "東京",
        "🚀",
        "données",
        "Straße",
        "λ",
        "print(x)",
        "x = 1",
        "def f():",
        "None",
    ];
    let mut rng = Rng(7);
    (0..rows)
        .map(|_| {
            let mut s = String::new();
            for _ in 0..(5 + rng.below(30)) {
                if !s.is_empty() {
                    s.push_str([" ", " ", " ", "  ", "\n", ", ", ". "][rng.below(7)]);
                }
                s.push_str(words[rng.below(words.len())]);
                if rng.below(8) == 0 {
                    s.push_str(&rng.below(1000).to_string());
                }
            }
            s
        })
        .collect()
}

fn write_rows(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn train(data: &[&Path], vocab: usize, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["tokenizer", "train"];
    for d in data {
        args.extend(["--data", d.to_str().unwrap()]);
    }
    let vocab = vocab.to_string();
    args.extend(["--vocab-size", &vocab, "--out", out.to_str().unwrap()]);
    args.extend(extra);
    gpt2kit(&args)
}

fn assert_trained(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

/// Strings of arbitrary code points: ASCII with control characters and whitespace runs,
/// Latin-1, combining marks, CJK, emoji, private use and the top of Unicode.
fn arbitrary_strings(n: usize) -> Vec<String> {
    let ranges: [(u32, u32); 8] = [
        (0x00, 0x7f),
        (0x20, 0x7e),
        (0x80, 0x2ff),
        (0x300, 0x36f),
        (0x3040, 0x9fff),
        (0x1f300, 0x1faff),
        (0xe000, 0xf8ff),
        (0x10000, 0x10ffff),
    ];
    let mut rng = Rng(2024);
    let mut out: Vec<String> = [
        "",
        "\0",
        " ",
        "   ",
        "\r\n\t",
        "Hello world",
        " Hello  world ",
        "<|endoftext|>",
        "a<|endoftext|>b <|endoftext|>",
        "def f():\n    return x  # café 🚀",
        "日本語のテキスト",
        "ﬁ e\u{301} 👩‍👩‍👧",
    ]
    .map(String::from)
    .to_vec();
    for _ in 0..n {
        let len = rng.below(40);
        let s: String = (0..len)
            .filter_map(|_| {
                let (lo, hi) = ranges[rng.below(ranges.len())];
                char::from_u32(lo + rng.below((hi - lo + 1) as usize) as u32)
            })
            .collect();
        out.push(s);
    }
    out.push("the statement returns a value. ".repeat(300));
    out
}

#[test]
fn trained_tokenizer_matches_transformers_and_round_trips() {
    let dir = scratch("reference");
    let data = dir.join("train.jsonl");
    let rows: Vec<Value> = corpus(400)
        .into_iter()
        .map(|t| json!({ "text": t }))
        .collect();
    write_rows(&data, &rows);
    let out = dir.join("tok");
    let o = train(&[&data], 600, &out, &[]);
    assert_trained(&o);
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains("vocab_size 600"), "{report}");

    // Both file formats load in the engine and agree; <|endoftext|> is the last id.
    let json = Tokenizer::from_dir(&out).unwrap();
    let pair =
        Tokenizer::from_vocab_merges(&out.join("vocab.json"), &out.join("merges.txt")).unwrap();
    assert_eq!(json.vocab_size(), 600);
    assert!(json.same_vocabulary(&pair));
    assert_eq!(json.token_to_id("<|endoftext|>"), Some(599));
    // The byte symbols take GPT-2's ids: "!" is 0, "Ġ" (the space byte) 220.
    assert_eq!(json.token_to_id("!"), Some(0));
    assert_eq!(json.token_to_id("Ġ"), Some(220));

    let texts = arbitrary_strings(200);
    let mut ours = Vec::new();
    for s in &texts {
        let ids = json.encode(s).unwrap();
        assert_eq!(pair.encode(s).unwrap(), ids, "{s:?}");
        assert_eq!(&json.decode(&ids).unwrap(), s, "decode(encode(s)) != s");
        ours.push(ids);
    }
    // Merges were learnt and used: the corpus' words take fewer tokens than bytes.
    let sentence = "the statement returns a value";
    assert!(json.encode(sentence).unwrap().len() < sentence.len() / 2);

    // transformers: AutoTokenizer on the folder, GPT2Tokenizer on vocab.json + merges.txt.
    let texts_file = dir.join("texts.json");
    std::fs::write(&texts_file, serde_json::to_string(&texts).unwrap()).unwrap();
    let result = dir.join("transformers.json");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/check_tokenizer.py"
    );
    let py = Command::new(python())
        .args([script, "--dir"])
        .arg(&out)
        .arg("--texts")
        .arg(&texts_file)
        .arg("--out")
        .arg(&result)
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", stderr(&py));
    let hf: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    for view in ["auto", "vocab_merges"] {
        let v = &hf[view];
        assert_eq!(v["vocab_size"], 600, "{view}");
        assert_eq!(v["eos_token"], "<|endoftext|>", "{view}");
        assert_eq!(v["eos_token_id"], 599, "{view}");
        assert_eq!(v["bos_token_id"], 599, "{view}");
        for (i, s) in texts.iter().enumerate() {
            let ids: Vec<i64> = serde_json::from_value(v["ids"][i].clone()).unwrap();
            assert_eq!(ids, ours[i], "{view}: ids of {s:?}");
            assert_eq!(v["decoded"][i], s.as_str(), "{view}: decoded {s:?}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn same_data_gives_same_bytes_whatever_the_row_format() {
    let dir = scratch("determinism");
    let texts = corpus(300);
    let text_rows: Vec<Value> = texts.iter().map(|t| json!({ "text": t })).collect();
    let (a, b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    write_rows(&a, &text_rows[..150]);
    write_rows(&b, &text_rows[150..]);
    // The same texts as a renamed field, and as prompt/completion pairs (both used).
    let body = dir.join("body.jsonl");
    let rows: Vec<Value> = texts
        .iter()
        .map(|t| json!({ "body": t, "id": 1 }))
        .collect();
    write_rows(&body, &rows);
    let pairs = dir.join("pairs.jsonl");
    let rows: Vec<Value> = texts
        .chunks(2)
        .map(|c| json!({ "prompt": c[0], "completion": c[1] }))
        .collect();
    write_rows(&pairs, &rows);

    let runs = [
        (vec![a.as_path(), b.as_path()], vec![]),
        (vec![a.as_path(), b.as_path()], vec![]),
        (vec![body.as_path()], vec!["--text-field", "body"]),
        (vec![pairs.as_path()], vec![]),
    ];
    let mut outputs = Vec::new();
    for (i, (data, extra)) in runs.iter().enumerate() {
        let out = dir.join(format!("tok{i}"));
        assert_trained(&train(data, 700, &out, extra));
        let files: Vec<Vec<u8>> = [
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
        ]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
        outputs.push(files);
    }
    for (i, o) in outputs.iter().enumerate().skip(1) {
        assert!(o == &outputs[0], "run {i} wrote different bytes from run 0");
    }
    // Other data, another tokenizer: the comparison above can fail.
    let out = dir.join("other");
    assert_trained(&train(&[a.as_path()], 700, &out, &[]));
    assert_ne!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        outputs[0][0]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn min_frequency_stops_the_merges() {
    let dir = scratch("min-frequency");
    let data = dir.join("d.jsonl");
    write_rows(&data, &[json!({ "text": "abab abab cd" })]);
    let out = dir.join("tok");
    // "ab" occurs 4 times: merged with --min-frequency 4, not with 5.
    let o = train(&[&data], 1000, &out, &["--min-frequency", "5"]);
    assert_trained(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("below --vocab-size 1000"));
    let tok = Tokenizer::from_dir(&out).unwrap();
    assert_eq!(tok.vocab_size(), 257);
    assert_eq!(tok.encode("abab").unwrap().len(), 4);
    // A new folder: `--out` is never overwritten.
    let out = dir.join("tok4");
    assert_trained(&train(&[&data], 1000, &out, &["--min-frequency", "4"]));
    let tok = Tokenizer::from_dir(&out).unwrap();
    assert!(tok.vocab_size() > 257);
    assert_eq!(tok.encode("abab").unwrap().len(), 2);
    assert_eq!(
        tok.token_to_id("<|endoftext|>"),
        Some(tok.vocab_size() as i64 - 1)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_exits_2_naming_file_line_or_flag() {
    let dir = scratch("bad-input");
    let out = dir.join("tok");
    let good = r#"{"text": "fine"}"#;
    let cases = [
        (
            "json",
            format!("{good}\n\n{{\"text\": \"unterminated\n"),
            ":3: invalid JSON",
        ),
        (
            "array",
            format!("{good}\n[1, 2]\n"),
            ":2: not a JSON object",
        ),
        (
            "missing",
            format!("{good}\n{{\"body\": \"x\"}}\n"),
            ":2: no `text` field",
        ),
        (
            "number",
            "{\"text\": 3}\n".to_string(),
            ":1: `text` is not a string",
        ),
        (
            "half-pair",
            "{\"prompt\": \"p\"}\n".to_string(),
            ":1: no `text` field",
        ),
        (
            "bad-completion",
            "{\"prompt\": \"p\", \"completion\": null}\n".to_string(),
            ":1: `completion` is not a string",
        ),
        ("empty", String::new(), "no training text"),
        (
            "blank",
            "\n  \n{\"text\": \"\"}\n".to_string(),
            "no training text",
        ),
    ];
    for (name, content, needle) in cases {
        let path = dir.join(format!("{name}.jsonl"));
        std::fs::write(&path, content).unwrap();
        let o = train(&[&path], 300, &out, &[]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        let expected = if needle.starts_with(':') {
            format!("{}{needle}", path.display())
        } else {
            needle.to_string()
        };
        assert!(
            err.contains(&expected),
            "{name}: stderr lacks {expected:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // A line that is not UTF-8 is named too.
    let path = dir.join("latin1.jsonl");
    std::fs::write(&path, b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
    let o = train(&[&path], 300, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("{}:2", path.display())),
        "{}",
        stderr(&o)
    );
    let data = dir.join("ok.jsonl");
    std::fs::write(&data, format!("{good}\n")).unwrap();
    let o = train(&[&data], 256, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--vocab-size 256"), "{}", stderr(&o));
    // A file that is not there is not a usage error, but is named.
    let missing = dir.join("absent.jsonl");
    let o = train(&[&missing], 300, &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("absent.jsonl"), "{}", stderr(&o));
    assert!(!out.exists(), "a failed run wrote {}", out.display());
    std::fs::remove_dir_all(&dir).unwrap();
}
