//! Dataset building: packing with end-of-text between documents, completion-only labels,
//! truncation that keeps the completion, the loss shift, and the seeded eval split.
use std::path::PathBuf;

use infer::Tokenizer;
use tch::{Kind, Tensor};
use train::data::{self, DataOptions, IGNORE};

fn tokenizer() -> Tokenizer {
    let dir = std::env::var_os("GPT2KIT_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/reference"));
    Tokenizer::from_dir(&dir.join("hub-tied")).expect("run `make reference`")
}

fn write(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("gpt2kit-data-{name}-{}.jsonl", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn text_rows_pack_with_eos_and_pairs_label_completions_only() {
    let tok = tokenizer();
    let eos = 0;
    let (a, b) = ("the quick brown fox", "a cache holds keys");
    let (p, c) = ("hello", " world tensor");
    let path = write(
        "pack",
        &format!(
            "{}\n{}\n{}\n",
            serde_json::json!({ "text": a }),
            serde_json::json!({ "prompt": p, "completion": c }),
            serde_json::json!({ "body": b }),
        ),
    );
    let mut opts = DataOptions::new(5);
    opts.text_field = "body".into();
    // `text` is not the text field now, so row 1 is missing its field.
    let err = format!(
        "{:#}",
        data::load_jsonl(std::slice::from_ref(&path), &tok, eos, &opts).unwrap_err()
    );
    assert!(err.contains(":1: field \"body\" is missing"), "{err}");
    opts.text_field = "text".into();
    let err = format!(
        "{:#}",
        data::load_jsonl(std::slice::from_ref(&path), &tok, eos, &opts).unwrap_err()
    );
    assert!(err.contains(":3: field \"text\" is missing"), "{err}");
    opts.skip_invalid = true;
    opts.truncation = true;
    let (samples, report) =
        data::load_jsonl(std::slice::from_ref(&path), &tok, eos, &opts).unwrap();
    assert_eq!(
        (report.text_rows, report.pair_rows, report.skipped),
        (1, 1, 1)
    );
    // The pair: prompt tokens ignored, completion and EOS learnt; cut to 5 tokens by
    // dropping the prompt's start first.
    let (pi, ci) = (tok.encode(p).unwrap(), tok.encode(c).unwrap());
    let mut ids = [pi.clone(), ci.clone(), vec![eos]].concat();
    let mut labels = [vec![IGNORE; pi.len()], ci.clone(), vec![eos]].concat();
    let cut = ids.len().saturating_sub(5).min(pi.len());
    ids.drain(..cut);
    labels.drain(..cut);
    ids.truncate(5);
    labels.truncate(5);
    assert_eq!(samples[0].ids, ids);
    assert_eq!(samples[0].labels, labels);
    // The text row: its tokens then EOS, in blocks of 5 (the last one shorter).
    let stream = [tok.encode(a).unwrap(), vec![eos]].concat();
    let blocks: Vec<Vec<i64>> = stream
        .chunks(5)
        .filter(|c| c.len() >= 2)
        .map(<[i64]>::to_vec)
        .collect();
    let packed: Vec<Vec<i64>> = samples[1..].iter().map(|s| s.ids.clone()).collect();
    assert_eq!(packed, blocks);
    assert!(samples[1..].iter().all(|s| s.labels == s.ids));
    std::fs::remove_file(path).unwrap();
}

#[test]
fn loss_shifts_labels_and_ignores_padding() {
    tch::manual_seed(0);
    let logits = Tensor::randn([2, 4, 7], (Kind::Float, tch::Device::Cpu));
    let a = data::Sample {
        ids: vec![1, 2, 3, 4],
        labels: vec![IGNORE, 2, 3, 4],
    };
    let b = data::Sample {
        ids: vec![5, 6],
        labels: vec![5, 6],
    };
    let (_, labels) = data::collate(&[&a, &b], 0, tch::Device::Cpu);
    let got = data::lm_loss_sum(&logits, &labels).double_value(&[]);
    // By hand: position t predicts label t+1.
    let lsm = logits.log_softmax(-1, Kind::Float);
    let nll = |r: i64, t: i64, y: i64| -lsm.double_value(&[r, t, y]);
    let want = nll(0, 0, 2) + nll(0, 1, 3) + nll(0, 2, 4) + nll(1, 0, 6);
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    assert_eq!(a.target_tokens() + b.target_tokens(), 4);
}

#[test]
fn eval_split_is_seeded_and_disjoint() {
    let samples: Vec<data::Sample> = (0..40)
        .map(|i| data::Sample {
            ids: vec![i, i + 1],
            labels: vec![i, i + 1],
        })
        .collect();
    let (t1, e1) = data::split(samples.clone(), 0.1, 3).unwrap();
    let (t2, e2) = data::split(samples.clone(), 0.1, 3).unwrap();
    assert_eq!(t1, t2);
    let (_, e3) = data::split(samples.clone(), 0.1, 4).unwrap();
    assert_eq!((t1.len(), e1.len()), (36, 4));
    assert_eq!(e1, e2);
    assert_ne!(e1, e3);
    assert!(e1.iter().all(|e| !t1.contains(e)));
    assert!(data::split(samples, 1.0, 3).is_err());
}
