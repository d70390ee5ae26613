//! Decoding against transformers' `generate` on the reference models: greedy, beam
//! search (every early_stopping mode, length penalties, several return sequences, EOS
//! in the middle, a padded batch), the penalties and constraints, seeded sampling, and
//! each warper's processed distribution. Cases and expected outputs are written by
//! tests/reference/make_generation_reference.py.
//!
//! Tolerances: tokens must be identical; beam scores and per-token log-probabilities
//! within 1e-4 (fp32 logits agree to ~1e-6, see reference.rs, and scores are sums of a
//! few dozen log-probabilities); processed distributions within 1e-5, with exactly the
//! same tokens removed.
mod common;

use common::*;
use infer::generate::{generate, GenerationConfig};
use infer::processors::{process, Row};
use infer::{genconfig, Gpt2};
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

#[derive(Deserialize)]
struct Case {
    name: String,
    prompts: Vec<Vec<i64>>,
    settings: Value,
    sequences: Vec<Vec<i64>>,
    sequences_scores: Option<Vec<f64>>,
    transition_logprobs: Option<Vec<Vec<f64>>>,
}

#[derive(Deserialize)]
struct WarpCase {
    index: usize,
    settings: Value,
}

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
    #[serde(default)]
    warp_cases: Vec<WarpCase>,
}

const GENERATION_MODELS: [&str; 3] = ["hub-tied", "prefixed-untied", "sharded-f16"];

fn reference(name: &str) -> Reference {
    let path = model_dir(name).join("generation.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make reference`)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn config_for(model: &Gpt2, settings: &Value) -> GenerationConfig {
    let mut cfg = GenerationConfig {
        eos_token_ids: model.config.eos_ids(),
        ..GenerationConfig::default()
    };
    genconfig::apply_json(&mut cfg, settings).unwrap();
    cfg.seed = settings.get("seed").and_then(Value::as_u64);
    cfg
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn every_case_matches_transformers_generate() {
    let mut checked = 0;
    for name in GENERATION_MODELS {
        let reference = reference(name);
        let model = Gpt2::load(&model_dir(name), Some(Kind::Float), Device::Cpu).unwrap();
        let mut failures = Vec::new();
        for case in &reference.cases {
            let cfg = config_for(&model, &case.settings);
            let out = tch::no_grad(|| generate(&model, &case.prompts, &cfg, &|_| false, |_, _| {}))
                .unwrap();
            let got: Vec<&infer::generate::Generated> = out.sequences.iter().flatten().collect();
            let tokens: Vec<Vec<i64>> = got.iter().map(|g| g.tokens.clone()).collect();
            if tokens != case.sequences {
                failures.push(format!(
                    "{name}/{}: tokens\n  got  {tokens:?}\n  want {:?}",
                    case.name, case.sequences
                ));
                continue;
            }
            if let Some(want) = &case.sequences_scores {
                let scores: Vec<f64> = got.iter().map(|g| g.score).collect();
                if !close(&scores, want, 1e-4) {
                    failures.push(format!(
                        "{name}/{}: scores {scores:?} vs {want:?}",
                        case.name
                    ));
                }
            }
            if let Some(want) = &case.transition_logprobs {
                for (g, w) in got.iter().zip(want) {
                    if !close(&g.logprobs, w, 1e-4) {
                        failures.push(format!(
                            "{name}/{}: logprobs {:?} vs {w:?}",
                            case.name, g.logprobs
                        ));
                    }
                }
            }
            checked += 1;
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases differ:\n{}",
            failures.len(),
            reference.cases.len(),
            failures.join("\n")
        );
    }
    assert!(
        checked > 0,
        "no generation.json found: run `make reference`"
    );
    eprintln!("{checked} generation cases match transformers");
}

#[test]
fn warpers_give_transformers_distributions() {
    let mut checked = 0;
    for name in GENERATION_MODELS {
        let reference = reference(name);
        let path = model_dir(name).join("warp.safetensors");
        let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        let raw = tensors["raw"].unsqueeze(0); // (1, V)
        let ids: Vec<i64> = Vec::try_from(&tensors["ids"]).unwrap();
        let model_cfg = infer::Gpt2Config::from_file(&model_dir(name).join("config.json")).unwrap();
        for case in &reference.warp_cases {
            let mut cfg = GenerationConfig::default();
            genconfig::apply_json(&mut cfg, &case.settings).unwrap();
            cfg.processing.do_sample = true;
            let rows = [Row {
                tokens: &ids,
                prompt_len: ids.len(),
                limit: usize::MAX,
            }];
            let got = process(&cfg.processing, &raw, &rows, &model_cfg.eos_ids())
                .log_softmax(-1, Kind::Float)
                .squeeze_dim(0);
            let want = &tensors[&format!("warp.{}", case.index)];
            let (gk, wk) = (got.isfinite(), want.isfinite());
            assert!(
                gk.equal(&wk),
                "{name} warp {} {:?}: different tokens kept ({} vs {})",
                case.index,
                case.settings,
                i64::try_from(gk.sum(Kind::Int64)).unwrap(),
                i64::try_from(wk.sum(Kind::Int64)).unwrap()
            );
            let d = f64::try_from(
                (got.masked_select(&gk) - want.masked_select(&wk))
                    .abs()
                    .max(),
            )
            .unwrap();
            assert!(
                d <= 1e-5,
                "{name} warp {} {:?}: max |Δlogp| {d:e}",
                case.index,
                case.settings
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no warp cases found: run `make reference`");
    eprintln!("{checked} warp cases match transformers");
}

#[test]
fn seeded_sampling_repeats_and_stays_inside_the_distribution() {
    tch::no_grad(|| {
        let model = Gpt2::load(&model_dir("hub-tied"), Some(Kind::Float), Device::Cpu).unwrap();
        let prompts = expected("hub-tied").ids;
        let mut cfg = GenerationConfig {
            max_new_tokens: 12,
            num_return_sequences: 3,
            seed: Some(7),
            ..GenerationConfig::default()
        };
        cfg.processing.do_sample = true;
        cfg.processing.top_k = 5;
        let run = |cfg: &GenerationConfig| {
            generate(&model, &prompts, cfg, &|_| false, |_, _| {})
                .unwrap()
                .sequences
        };
        let a = run(&cfg);
        assert_eq!(a, run(&cfg), "same seed, different tokens");
        cfg.seed = Some(8);
        assert_ne!(a, run(&cfg), "different seeds gave identical samples");
        // Every sampled token lies inside its step's processed distribution: a token
        // that top-k removed has processed log-probability -inf.
        for g in a.iter().flatten() {
            assert!(
                g.logprobs.iter().all(|lp| lp.is_finite() && *lp <= 0.0),
                "{:?}",
                g.logprobs
            );
        }
    })
}

#[test]
fn each_prompt_of_a_padded_batch_decodes_as_alone() {
    // Padding is not history: with a repetition penalty, min_length and an n-gram ban,
    // greedy and beam results of a batch equal each prompt run alone.
    tch::no_grad(|| {
        let model = Gpt2::load(
            &model_dir("prefixed-untied"),
            Some(Kind::Float),
            Device::Cpu,
        )
        .unwrap();
        let prompts = expected("prefixed-untied").ids;
        for beams in [1, 3] {
            let mut cfg = GenerationConfig {
                max_new_tokens: 10,
                num_beams: beams,
                ..GenerationConfig::default()
            };
            cfg.eos_token_ids = model.config.eos_ids();
            cfg.processing.repetition_penalty = 1.3;
            cfg.processing.min_length = 14;
            cfg.processing.no_repeat_ngram_size = 2;
            let batch = generate(&model, &prompts, &cfg, &|_| false, |_, _| {})
                .unwrap()
                .sequences;
            for (i, p) in prompts.iter().enumerate() {
                let alone = generate(&model, std::slice::from_ref(p), &cfg, &|_| false, |_, _| {})
                    .unwrap()
                    .sequences;
                assert_eq!(
                    batch[i][0].tokens, alone[0][0].tokens,
                    "beams {beams}, prompt {i}"
                );
                assert!((batch[i][0].score - alone[0][0].score).abs() < 1e-4);
            }
        }
    })
}
