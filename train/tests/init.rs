//! GPT-2's initialisation: each tensor's distribution matches transformers'
//! `_init_weights` (statistics over many draws), the seed fixes the weights, and the
//! folder `init` writes loads back into the engine unchanged.
use std::path::PathBuf;

use infer::{Gpt2, Gpt2Config};
use train::init::{init_model, init_tensors, preset, InitOptions, INITIALIZER_RANGE};

fn reference(name: &str) -> PathBuf {
    let dir = std::env::var_os("GPT2KIT_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/reference"));
    let model = dir.join(name);
    assert!(model.join("config.json").exists(), "run `make reference`");
    model
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gpt2kit-init-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn tensors_follow_gpt2_init() {
    let mut config = preset("tiny").unwrap();
    config.vocab_size = 1000;
    let tensors = init_tensors(&config, INITIALIZER_RANGE, 1);
    let proj = INITIALIZER_RANGE / (2.0 * config.n_layer as f64).sqrt();
    for (name, t) in &tensors {
        let (mean, std) = (
            t.mean(tch::Kind::Double).double_value(&[]),
            t.std(true).double_value(&[]),
        );
        let n = t.numel() as f64;
        if name.contains("ln_") && name.ends_with(".weight") {
            assert_eq!((mean, std), (1.0, 0.0), "{name}");
        } else if name.ends_with(".bias") {
            assert_eq!((mean, std), (0.0, 0.0), "{name}");
        } else {
            let want = if name.ends_with("c_proj.weight") {
                proj
            } else {
                INITIALIZER_RANGE
            };
            // Sample std of n normal draws: relative standard error 1/sqrt(2n); 6 of them.
            assert!(
                (std / want - 1.0).abs() < 6.0 / (2.0 * n).sqrt(),
                "{name}: std {std} vs {want}"
            );
            // Sample mean: standard error want/sqrt(n); 6 of them.
            assert!(mean.abs() < 6.0 * want / n.sqrt(), "{name}: mean {mean}");
        }
    }
    assert_eq!(tensors.len(), 2 + 12 * config.n_layer as usize + 2);
    // The seed fixes every weight; another seed changes them.
    let again = init_tensors(&config, INITIALIZER_RANGE, 1);
    let other = init_tensors(&config, INITIALIZER_RANGE, 2);
    assert!(tensors[0].1.equal(&again[0].1));
    assert!(!tensors[0].1.equal(&other[0].1));
}

#[test]
fn init_writes_a_folder_the_engine_loads() {
    let out = temp("folder");
    let tok = reference("hub-tied");
    let config = init_model(&InitOptions {
        preset: "tiny",
        tokenizer_dir: &tok,
        out: &out,
        seed: 7,
        n_layer: Some(2),
        n_head: None,
        n_embd: Some(64),
        n_positions: Some(32),
    })
    .unwrap();
    assert_eq!(
        (config.n_layer, config.n_embd, config.n_positions),
        (2, 64, 32)
    );
    assert_eq!(
        config.vocab_size,
        infer::Tokenizer::from_dir(&tok).unwrap().vocab_size() as i64
    );
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let back = Gpt2Config::from_file(&out.join("config.json")).unwrap();
    assert_eq!(back.num_parameters(), config.num_parameters());
    let model = Gpt2::load(&out, None, tch::Device::Cpu).unwrap();
    let want = init_tensors(&config, INITIALIZER_RANGE, 7);
    for ((n, a), (m, b)) in model.named_tensors().unwrap().iter().zip(&want) {
        assert_eq!(n, m);
        assert!(a.equal(b), "{n} differs after save and load");
    }
    // A second init into the same non-empty folder is refused as bad input.
    let again = init_model(&InitOptions {
        preset: "tiny",
        tokenizer_dir: &tok,
        out: &out,
        seed: 7,
        n_layer: None,
        n_head: None,
        n_embd: None,
        n_positions: None,
    });
    let err = format!("{:#}", again.unwrap_err());
    assert!(err.contains("already exists"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}
