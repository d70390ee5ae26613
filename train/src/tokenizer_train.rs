//! Training a byte-level BPE tokenizer like GPT-2's (Radford et al. 2019, §2.2) with the
//! `tokenizers` crate: the ByteLevel pre-tokenizer (GPT-2's split regex, no prefix
//! space), the 256 byte symbols as the initial alphabet, BPE merges learnt from JSONL
//! text, and `<|endoftext|>` as the last id, where GPT-2 keeps it (50256 of 50257), so a
//! model's `bos_token_id` = `eos_token_id` = `vocab_size - 1` as in GPT-2's config.
//!
//! The folder written holds `tokenizer.json` (what `infer::Tokenizer` and transformers'
//! `AutoTokenizer` load), `tokenizer_config.json`, and GPT-2's original pair
//! `vocab.json` + `merges.txt`.
use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use infer::folder::TempFolder;
use infer::Error;
use serde_json::Value;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, TokenizerImpl};

use crate::pieces::{gpt2_pieces, PIECE_BYTES};

pub const ENDOFTEXT: &str = "<|endoftext|>";
/// The byte symbols plus `<|endoftext|>`: the smallest vocabulary there is.
pub const MIN_VOCAB_SIZE: usize = 256 + 1;
/// The largest vocabulary `train` accepts (2^20).
pub const MAX_VOCAB_SIZE: usize = 1 << 20;

/// The training texts of JSONL files: each row's `text_field`, or else both its
/// `prompt` and its `completion`. Blank lines are skipped; any other line that is not
/// such an object is an `Error::Input` naming `file:line`. A UTF-8 byte order mark at the
/// start of a file is skipped.
pub fn read_texts(paths: &[PathBuf], text_field: &str) -> Result<Vec<String>, Error> {
    let mut texts = Vec::new();
    for path in paths {
        let file = fs::File::open(path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let at = || format!("{}:{}", path.display(), i + 1);
            let line = line.map_err(|e| Error::Input(format!("{}: {e}", at())))?;
            // A byte order mark opens some UTF-8 files (Python reads them as utf-8-sig).
            let line = match line.strip_prefix('\u{feff}') {
                Some(rest) if i == 0 => rest.to_string(),
                _ => line,
            };
            if line.trim().is_empty() {
                continue;
            }
            let row: Value = serde_json::from_str(&line)
                .map_err(|e| Error::Input(format!("{}: invalid JSON: {e}", at())))?;
            let Value::Object(row) = row else {
                return Err(Error::Input(format!("{}: not a JSON object", at())));
            };
            let field = |name: &str| match row.get(name) {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(Error::Input(format!("{}: `{name}` is not a string", at()))),
                None => Ok(None),
            };
            if let Some(text) = field(text_field)? {
                texts.push(text);
            } else if let (Some(p), Some(c)) = (field("prompt")?, field("completion")?) {
                texts.push(p);
                texts.push(c);
            } else {
                return Err(Error::Input(format!(
                    "{}: no `{text_field}` field, nor `prompt` and `completion`",
                    at()
                )));
            }
        }
    }
    if texts.iter().all(String::is_empty) {
        let names: Vec<_> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::Input(format!(
            "no training text in {}",
            names.join(", ")
        )));
    }
    Ok(texts)
}

/// Learns the merges of `texts` until the vocabulary (`<|endoftext|>` included) has
/// `vocab_size` entries or no pair occurs `min_frequency` times. Deterministic: the
/// trainer breaks count ties by the pair's ids, and the byte symbols take ids 0–255 in
/// GPT-2's order (its printable bytes first: the byte-level characters' code points).
/// The texts are fed in `gpt2_pieces`, which pre-tokenize to the same words, so that a
/// long text does not hold the trainer's per-byte bookkeeping all at once.
pub fn train(
    texts: &[String],
    vocab_size: usize,
    min_frequency: u64,
) -> Result<tokenizers::Tokenizer, Error> {
    train_in_pieces(texts, vocab_size, min_frequency, PIECE_BYTES)
}

fn train_in_pieces(
    texts: &[String],
    vocab_size: usize,
    min_frequency: u64,
    piece: usize,
) -> Result<tokenizers::Tokenizer, Error> {
    if vocab_size < MIN_VOCAB_SIZE {
        return Err(Error::Input(format!(
            "vocab size {vocab_size} is below {MIN_VOCAB_SIZE} (256 bytes + {ENDOFTEXT})"
        )));
    }
    let failed = |e: &dyn std::fmt::Display| Error::Tokenizer {
        path: "(BPE training)".into(),
        reason: e.to_string(),
    };
    let mut trainer = BpeTrainer::builder()
        .vocab_size(vocab_size - 1)
        .min_frequency(min_frequency)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<_>>())
        .show_progress(false)
        .build();
    let mut learner: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(BPE::default());
    learner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    learner
        .train(
            &mut trainer,
            texts.iter().flat_map(|t| gpt2_pieces(t, piece)),
        )
        .map_err(|e| failed(&e))?;

    // Rebuild the model with `<|endoftext|>` in its vocabulary too, as GPT-2's
    // `vocab.json` has it, so both file formats carry the same ids. The serialised form
    // is the only public view of the learnt merges.
    let mut model = serde_json::to_value(learner.get_model()).map_err(|e| failed(&e))?;
    let vocab = model["vocab"]
        .as_object_mut()
        .ok_or_else(|| failed(&"the model has no vocabulary"))?;
    let eos = vocab.len();
    vocab.insert(ENDOFTEXT.into(), eos.into());
    let bpe: BPE = serde_json::from_str(&model.to_string()).map_err(|e| failed(&e))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    // transformers' GPT-2 conversion: byte-level pre-tokenizer, decoder and
    // post-processor (the latter only adjusts offsets).
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .with_post_processor(Some(ByteLevel::new(true, false, true)));
    tokenizer.add_special_tokens(&[AddedToken::from(ENDOFTEXT, true)]);
    Ok(tokenizer)
}

/// Refuses an output folder that exists and is not empty (or is not a folder), so that
/// training never replaces a model's tokenizer; `save` checks again before it writes.
pub fn check_new_folder(dir: &Path) -> Result<(), Error> {
    if dir.as_os_str().is_empty() {
        return Err(Error::Input("the output folder's path is empty".into()));
    }
    if !dir.exists() {
        // The nearest existing folder above must be a folder, or nothing can be made.
        return match dir.ancestors().skip(1).find(|a| a.exists()) {
            Some(above) if !above.as_os_str().is_empty() && !above.is_dir() => Err(Error::Input(
                format!("{}: {} is not a folder", dir.display(), above.display()),
            )),
            _ => Ok(()),
        };
    }
    match fs::read_dir(dir).map(|mut entries| entries.next().is_none()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::Input(format!(
            "{}: already exists and is not empty; choose a new folder",
            dir.display()
        ))),
        Err(_) => Err(Error::Input(format!(
            "{}: already exists and is not a folder; choose a new folder",
            dir.display()
        ))),
    }
}

/// Writes `tokenizer.json`, `tokenizer_config.json`, `vocab.json` and `merges.txt` into
/// `dir`, which must not exist or be empty. Atomic: the files go into a temporary
/// folder beside `dir` that is renamed into place when complete, so a failure or a kill
/// leaves no partial tokenizer (rename also refuses a folder that gained files since).
pub fn save(tokenizer: &tokenizers::Tokenizer, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    check_new_folder(dir)?;
    let files = tokenizer_files(tokenizer, dir)?;
    if dir.file_name().is_none() {
        return Err(Error::Input(format!(
            "{}: not a folder name",
            dir.display()
        )));
    }
    let tmp = TempFolder::beside(dir)?;
    for (file, text) in &files {
        tmp.write(file, text.as_bytes())?;
    }
    tmp.commit(dir)?;
    Ok(files.iter().map(|(file, _)| dir.join(file)).collect())
}

/// The four files' names and contents (`dir` names errors only).
fn tokenizer_files(
    tokenizer: &tokenizers::Tokenizer,
    dir: &Path,
) -> Result<[(&'static str, String); 4], Error> {
    let eos = tokenizer
        .token_to_id(ENDOFTEXT)
        .ok_or_else(|| Error::Tokenizer {
            path: dir.into(),
            reason: format!("{ENDOFTEXT} is missing"),
        })?;
    let json = tokenizer.to_string(true).map_err(|e| Error::Tokenizer {
        path: dir.into(),
        reason: e.to_string(),
    })?;
    let model: Value = serde_json::from_str::<Value>(&json).map_err(|e| Error::Tokenizer {
        path: dir.into(),
        reason: e.to_string(),
    })?["model"]
        .take();

    // GPT-2's `vocab.json` lists tokens in id order; its `merges.txt` has a version line.
    let mut vocab: Vec<(&String, u64)> = model["vocab"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k, v.as_u64().unwrap_or(0)))
        .collect();
    vocab.sort_by_key(|&(_, id)| id);
    let entries: Vec<String> = vocab
        .iter()
        .map(|(k, id)| format!("{}: {id}", Value::String((*k).clone())))
        .collect();
    let vocab_json = format!("{{{}}}\n", entries.join(", "));
    let mut merges_txt = String::from("#version: 0.2\n");
    for m in model["merges"].as_array().into_iter().flatten() {
        if let (Some(a), Some(b)) = (m[0].as_str(), m[1].as_str()) {
            merges_txt.push_str(&format!("{a} {b}\n"));
        }
    }
    // transformers' GPT-2 tokenizer settings; `<|endoftext|>` is bos, eos and unk.
    let config = serde_json::json!({
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "add_prefix_space": false,
        "add_bos_token": false,
        "clean_up_tokenization_spaces": false,
        "errors": "replace",
        "added_tokens_decoder": {
            eos.to_string(): {
                "content": ENDOFTEXT, "lstrip": false, "normalized": false,
                "rstrip": false, "single_word": false, "special": true
            }
        },
    });
    let config = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    Ok([
        ("tokenizer.json", json + "\n"),
        ("tokenizer_config.json", config),
        ("vocab.json", vocab_json),
        ("merges.txt", merges_txt),
    ])
}

/// Tokens of `texts` under `tokenizer` (no special tokens added), for bytes per token.
/// `tokenizer` splits like GPT-2's (one that `train` made): the texts are encoded in
/// `gpt2_pieces`, a batch of about `PIECE_BYTES` at a time, to bound the memory.
pub fn count_tokens(tokenizer: &tokenizers::Tokenizer, texts: &[String]) -> Result<usize, Error> {
    count_in_pieces(tokenizer, texts, PIECE_BYTES)
}

fn count_in_pieces(
    tokenizer: &tokenizers::Tokenizer,
    texts: &[String],
    piece: usize,
) -> Result<usize, Error> {
    let mut count = 0;
    let mut batch: Vec<&str> = Vec::new();
    let mut batch_bytes = 0;
    let mut pieces = texts.iter().flat_map(|t| gpt2_pieces(t, piece)).peekable();
    while let Some(p) = pieces.next() {
        batch.push(p);
        batch_bytes += p.len();
        if batch_bytes >= piece || pieces.peek().is_none() {
            let encodings = tokenizer
                .encode_batch_fast(std::mem::take(&mut batch), false)
                .map_err(|e| Error::Input(format!("encoding the training text: {e}")))?;
            count += encodings.iter().map(|e| e.get_ids().len()).sum::<usize>();
            batch_bytes = 0;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long texts of words, numbers, punctuation and whitespace runs of every kind.
    fn long_texts() -> Vec<String> {
        let parts = [
            "the",
            "model",
            "café",
            "日本語",
            "🚀",
            "42",
            "x=1;",
            "!!",
            "'s",
            "don't",
            " ",
            " ",
            " ",
            "  ",
            "\n",
            "\n\n",
            "\t",
            "\r\n",
            "\u{a0}",
            "\u{3000}",
            "(",
            ".",
            ",",
        ];
        let mut x = 11u64;
        (0..6)
            .map(|_| {
                (0..3000)
                    .map(|_| {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        parts[(x >> 33) as usize % parts.len()]
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn training_and_counting_in_pieces_changes_nothing() {
        let texts = long_texts();
        let whole = train_in_pieces(&texts, 500, 2, usize::MAX).unwrap();
        let cut = train_in_pieces(&texts, 500, 2, 7).unwrap();
        assert_eq!(
            cut.to_string(false).unwrap(),
            whole.to_string(false).unwrap()
        );
        let n = count_in_pieces(&whole, &texts, usize::MAX).unwrap();
        let encoded: usize = texts
            .iter()
            .map(|t| {
                whole
                    .encode_fast(t.as_str(), false)
                    .unwrap()
                    .get_ids()
                    .len()
            })
            .sum();
        assert_eq!(n, encoded);
        assert_eq!(count_in_pieces(&whole, &texts, 7).unwrap(), n);
        assert_eq!(count_in_pieces(&whole, &texts, 1000).unwrap(), n);
    }
}
