//! Every fuzz target run on its seeds, on the corpus `make fuzz` grew (fuzz/corpus, when
//! present) and on every input kept in fuzz/regressions (crashes found and fixed): none
//! may panic. Runs without a fuzzer, in `make test`.
use std::path::Path;

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn every_target_survives_its_seeds_corpus_and_regression_inputs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let seeds = fuzz_entry::seeds::seeds();
    for (name, target) in fuzz_entry::TARGETS {
        let mut n = 0;
        for (_, bytes) in seeds.iter().filter(|(t, _)| t == name) {
            target(bytes);
            n += 1;
        }
        assert!(n > 0, "target {name} has no seed");
        let mut kept = 0;
        for sub in ["corpus", "regressions"] {
            for f in files(&root.join(sub).join(name)) {
                // A fuzzer running meanwhile replaces corpus inputs by smaller ones.
                let Ok(bytes) = std::fs::read(&f) else {
                    continue;
                };
                target(&bytes);
                kept += 1;
            }
        }
        println!("{name}: {n} seeds and {kept} kept inputs replayed");
    }
}

#[test]
fn the_model_seed_loads() {
    // The seeds reach the loaders' far end: a fuzzer starting from inputs that fail at
    // the first check would explore little.
    let dir = std::env::temp_dir().join(format!("gpt2kit-fuzz-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), fuzz_entry::TINY_CONFIG).unwrap();
    std::fs::write(
        dir.join("model.safetensors"),
        fuzz_entry::seeds::tiny_weights(),
    )
    .unwrap();
    let config = infer::Gpt2Config::from_file(&dir.join("config.json")).unwrap();
    let files = infer::checkpoint::WeightFiles::open_dir(&dir).unwrap();
    let model = infer::Gpt2::from_weights(config, &files, tch::Kind::Float, &[tch::Device::Cpu]);
    assert!(model.is_ok(), "{:?}", model.err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_gguf_seed_loads() {
    // As for the model seed: the GGUF seed reaches the end of the loader.
    let dir = std::env::temp_dir().join(format!("gpt2kit-fuzz-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, fuzz_entry::seeds::tiny_gguf()).unwrap();
    let (config, tensors) = infer::gguf::load::read(&path).unwrap();
    assert_eq!((config.n_layer, tensors.len()), (1, 16));
    let t = infer::Tokenizer::from_dir(&path).unwrap();
    assert_eq!(t.encode("ab").unwrap(), [15]);
    assert_eq!(t.encode("ba").unwrap(), [2, 1]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_request_seeds_pass_every_check() {
    // As for the model seed: the prompts files and request bodies are accepted whole, so
    // the fuzzers start past the last check.
    let path = std::path::Path::new("prompts.jsonl");
    for (target, bytes) in fuzz_entry::seeds::seeds() {
        let text = String::from_utf8_lossy(&bytes);
        match target {
            "prompts" => {
                let ok = [None, Some("body")]
                    .iter()
                    .any(|f| infer::prompts::parse_prompts(&bytes, path, *f).is_ok());
                assert!(ok, "{text}");
            }
            "completions" | "chat_completions" => {
                let Some(r) = fuzz_entry::http::check_body(target == "chat_completions", &bytes)
                else {
                    return; // no reference model
                };
                assert!(r.is_ok(), "{text}: {r:?}");
            }
            _ => {}
        }
    }
}

#[test]
fn prompts_errors_name_the_file_and_line() {
    let path = std::path::Path::new("p.jsonl");
    let read = |b: &[u8]| infer::prompts::parse_prompts(b, path, None);
    let p = read(b"\n{\"prompt\": \"a\", \"max_new_tokens\": 2}\r\n{\"text\": \"b\"}").unwrap();
    assert_eq!(
        p.iter()
            .map(|p| (p.text.as_str(), p.max_new_tokens, p.line))
            .collect::<Vec<_>>(),
        [("a", Some(2), 2), ("b", None, 3)]
    );
    let err = |b: &[u8]| read(b).unwrap_err().to_string();
    assert_eq!(
        err(b"{\"prompt\": \"a\"}\n\xff"),
        "p.jsonl:2: not valid UTF-8"
    );
    assert_eq!(
        err(b"{\"prompt\": \"a\", \"max_new_tokens\": 0}"),
        "p.jsonl:1: \"max_new_tokens\" must be an integer \u{2265} 1, got 0"
    );
    assert_eq!(err(b"\n \n"), "p.jsonl: no prompts in the file");
}
