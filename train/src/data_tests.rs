//! Tests of `data`: rows, packing, the byte order mark, progress lines, and encoding
//! long texts in pieces (`pieces`).
use super::*;
use crate::pieces::{encode_in_pieces, splits_like_gpt2};
use crate::tokenizer_train;
use std::cell::RefCell;
use std::rc::Rc;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gpt2kit-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic pseudo-random numbers (SplitMix64).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

/// Texts of words, digits, punctuation, contractions, every kind of whitespace run
/// (ASCII and not), CJK, emoji and the special token.
fn texts(n: usize, seed: u64) -> Vec<String> {
    let parts = [
        "the",
        "model",
        "café",
        "日本語",
        "🚀",
        "42",
        "7",
        "x=1;",
        "!!",
        "'s",
        "'ll",
        "don't",
        " ",
        " ",
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "\r\n",
        " \n ",
        "\u{b}",
        "\u{a0}",
        "\u{3000}",
        "<|endoftext|>",
        "(",
        ")",
        ".",
        ",",
        "-",
    ];
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            (0..rng.below(200))
                .map(|_| parts[rng.below(parts.len())])
                .collect()
        })
        .collect()
}

/// A GPT-2 style tokenizer trained on `texts`, saved as `tokenizer.json`.
fn trained_tokenizer(dir: &Path) -> Tokenizer {
    let tok = tokenizer_train::train(&texts(300, 1), 400, 2).unwrap();
    tokenizer_train::save(&tok, dir).unwrap();
    Tokenizer::from_dir(dir).unwrap()
}

#[test]
fn encoding_in_pieces_gives_the_ids_of_the_whole_text() {
    let dir = scratch("pieces");
    let json = trained_tokenizer(&dir.join("tok"));
    let pair =
        Tokenizer::from_vocab_merges(&dir.join("tok/vocab.json"), &dir.join("tok/merges.txt"))
            .unwrap();
    assert!(splits_like_gpt2(&json) && splits_like_gpt2(&pair));
    let mut cuts = 0;
    for (i, text) in texts(400, 2).iter().enumerate() {
        let whole = json.encode(text).unwrap();
        let piece = 1 + i % 13;
        let mut calls = 0usize;
        let ids = encode_in_pieces(&json, text, true, piece, &mut |_, _| calls += 1).unwrap();
        assert_eq!(ids, whole, "{text:?} in pieces of {piece}");
        // One call before the first piece, one after each.
        cuts += calls.saturating_sub(2);
        let ids = encode_in_pieces(&pair, text, true, piece, &mut |_, _| {}).unwrap();
        assert_eq!(ids, whole, "{text:?} in pieces of {piece} (vocab.json)");
    }
    assert!(cuts > 1000, "only {cuts} cuts");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn only_tokenizers_that_split_like_gpt2_are_cut() {
    let dir = scratch("splits");
    trained_tokenizer(&dir.join("tok"));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tok/tokenizer.json")).unwrap()).unwrap();
    let edits: [(&str, fn(&mut serde_json::Value)); 6] = [
        ("prefix space", |j| {
            j["pre_tokenizer"]["add_prefix_space"] = true.into()
        }),
        ("no regex", |j| {
            j["pre_tokenizer"]["use_regex"] = false.into()
        }),
        ("normalizer", |j| {
            j["normalizer"] = serde_json::json!({"type": "Lowercase"})
        }),
        ("truncation", |j| {
            j["truncation"] = serde_json::json!({"direction": "Right", "max_length": 8,
                "strategy": "LongestFirst", "stride": 0})
        }),
        ("rstrip", |j| j["added_tokens"][0]["rstrip"] = true.into()),
        ("whitespace pre-tokenizer", |j| {
            j["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"})
        }),
    ];
    for (what, edit) in edits {
        let mut j = json.clone();
        edit(&mut j);
        let d = dir.join(what.replace(' ', "-"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("tokenizer.json"), j.to_string()).unwrap();
        let tok = Tokenizer::from_dir(&d).unwrap();
        assert!(!splits_like_gpt2(&tok), "{what}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_byte_order_mark_starts_a_file_and_nothing_else() {
    let dir = scratch("bom");
    let tok = trained_tokenizer(&dir.join("tok"));
    let rows = "{\"text\": \"the model\"}\n{\"prompt\": \"x\", \"completion\": \"café\"}\n";
    std::fs::write(dir.join("plain.jsonl"), rows).unwrap();
    std::fs::write(dir.join("bom.jsonl"), format!("\u{feff}{rows}")).unwrap();
    std::fs::write(dir.join("mid.jsonl"), format!("{rows}\u{feff}{rows}")).unwrap();
    let opts = DataOptions::new(16);
    let load = |name: &str| load_jsonl(&[dir.join(name)], &tok, 399, &opts);
    let (plain, _) = load("plain.jsonl").unwrap();
    let (bom, _) = load("bom.jsonl").unwrap();
    assert_eq!(bom, plain);
    let err = format!("{:#}", load("mid.jsonl").unwrap_err());
    assert!(err.contains("mid.jsonl:3: invalid JSON"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_slow_load_reports_lines_rows_and_tokens() {
    let dir = scratch("progress");
    let tok = trained_tokenizer(&dir.join("tok"));
    let text = texts(50, 3).join(" ");
    let rows: String = (0..3)
        .map(|_| format!("{}\n", serde_json::json!({ "text": text })))
        .collect();
    let data = dir.join("data.jsonl");
    std::fs::write(&data, rows).unwrap();
    let lines = Rc::new(RefCell::new(Vec::<String>::new()));
    let sink = lines.clone();
    // Every tick reports, as a load past the first delay would.
    let progress = Progress::new(
        Duration::ZERO,
        Duration::ZERO,
        Box::new(move |l| sink.borrow_mut().push(l.to_string())),
    );
    let (samples, _) = load(&[data.clone()], &tok, 399, &DataOptions::new(16), progress).unwrap();
    let lines = lines.borrow();
    let name = data.display().to_string();
    assert!(
        lines.contains(&format!("reading {name}: 3 lines")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("tokenizing: row 3/3 ({name}:3, "))),
        "{lines:?}"
    );
    // The packed stream: each row's tokens and an end-of-text id.
    let tokens = samples.iter().map(|s| s.ids.len()).sum::<usize>() - 3;
    assert_eq!(tokens, 3 * tok.encode(&text).unwrap().len());
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with(&format!("tokenized 3 rows: {tokens} tokens")),
        "{lines:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
