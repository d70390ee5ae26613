//! Ensembles: mean-prob and mean-logprob greedy decoding of two different reference
//! models against the Python reference (tests/reference/make_reference.py), two copies
//! of one model against that model alone, and the rerank and vote selections.
//!
//! Tolerance: combined log-probabilities within 1e-4 (fp32 logits of each model agree
//! with transformers' to ~1e-6); tokens identical (the reference drops near-ties).
mod common;

use common::*;
use infer::ensemble::{select_candidates, Ensemble, EnsembleMode};
use infer::generate::{generate, generate_ensemble, GenerationConfig};
use infer::Gpt2;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

#[derive(Deserialize)]
struct Case {
    mode: String,
    weights: Vec<f64>,
    prompt: Vec<i64>,
    tokens: Vec<i64>,
    first_logprobs: Vec<f64>,
}

#[derive(Deserialize)]
struct Reference {
    models: Vec<String>,
    max_new_tokens: usize,
    cases: Vec<Case>,
}

fn load(name: &str) -> Gpt2 {
    Gpt2::load(&model_dir(name), Some(Kind::Float), Device::Cpu).unwrap()
}

#[test]
fn two_different_models_match_the_reference_ensemble() {
    tch::no_grad(|| {
        let path = reference_dir().join("ensemble.json");
        let r: Reference = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let models: Vec<Gpt2> = r.models.iter().map(|n| load(n)).collect();
        assert!(r.cases.len() >= 6);
        for case in &r.cases {
            let mode = if case.mode == "mean-prob" {
                EnsembleMode::MeanProb
            } else {
                EnsembleMode::MeanLogprob
            };
            let ens =
                Ensemble::new(models.iter().collect(), Some(case.weights.clone()), mode).unwrap();
            // The combined distribution of the first step.
            let hidden: Vec<Tensor> = models
                .iter()
                .map(|m| {
                    let n = case.prompt.len() as i64;
                    let mut cache = m.new_cache(1, n);
                    m.forward_hidden(&Tensor::from_slice(&case.prompt).view([1, n]), &mut cache)
                        .select(1, -1)
                })
                .collect();
            let got = ens.scores(&hidden).squeeze_dim(0);
            let want = Tensor::from_slice(&case.first_logprobs);
            let d = f64::try_from((got - want).abs().max()).unwrap();
            assert!(
                d <= 1e-4,
                "{} {:?}: first-step log-probs differ by {d:e}",
                case.mode,
                case.weights
            );
            let cfg = GenerationConfig {
                max_new_tokens: r.max_new_tokens,
                ..GenerationConfig::default()
            };
            let out = generate_ensemble(
                &ens,
                std::slice::from_ref(&case.prompt),
                &cfg,
                &|_| false,
                |_, _| {},
            )
            .unwrap();
            assert_eq!(
                out.sequences[0][0].tokens, case.tokens,
                "{} {:?}",
                case.mode, case.weights
            );
        }
    })
}

#[test]
fn two_copies_of_one_model_equal_the_model() {
    tch::no_grad(|| {
        let model = load("hub-tied");
        let prompts = expected("hub-tied").ids;
        let twice = Ensemble::new(
            vec![&model, &model],
            Some(vec![0.3, 0.7]),
            EnsembleMode::MeanProb,
        )
        .unwrap();
        let mut sampled = GenerationConfig {
            max_new_tokens: 10,
            seed: Some(3),
            ..GenerationConfig::default()
        };
        sampled.processing.do_sample = true;
        sampled.processing.top_p = 0.9;
        let beams = GenerationConfig {
            max_new_tokens: 10,
            num_beams: 3,
            num_return_sequences: 2,
            ..GenerationConfig::default()
        };
        for cfg in [
            GenerationConfig {
                max_new_tokens: 10,
                ..GenerationConfig::default()
            },
            sampled,
            beams,
        ] {
            let one = generate(&model, &prompts, &cfg, &|_| false, |_, _| {})
                .unwrap()
                .sequences;
            let two = generate_ensemble(&twice, &prompts, &cfg, &|_| false, |_, _| {})
                .unwrap()
                .sequences;
            for (a, b) in one.iter().flatten().zip(two.iter().flatten()) {
                assert_eq!(a.tokens, b.tokens);
                assert!(
                    (a.score - b.score).abs() < 1e-4,
                    "{} vs {}",
                    a.score,
                    b.score
                );
            }
        }
    })
}

#[test]
fn rerank_and_vote_pick_from_the_pooled_candidates() {
    tch::no_grad(|| {
        let (a, b) = (load("sharded-f16"), load("bf16-quickgelu"));
        let ens = Ensemble::new(vec![&a, &b], None, EnsembleMode::MeanProb).unwrap();
        let prompts = expected("sharded-f16").ids[..2].to_vec();
        let cfg = GenerationConfig {
            max_new_tokens: 6,
            num_beams: 3,
            num_return_sequences: 3,
            ..GenerationConfig::default()
        };
        let runs: Vec<_> = [&a, &b]
            .iter()
            .map(|m| {
                generate(m, &prompts, &cfg, &|_| false, |_, _| {})
                    .unwrap()
                    .sequences
            })
            .collect();
        let pool: Vec<Vec<Vec<i64>>> = (0..prompts.len())
            .map(|i| {
                runs.iter()
                    .flat_map(|r| r[i].iter().map(|g| g.tokens.clone()))
                    .collect()
            })
            .collect();
        for vote in [false, true] {
            let picked = select_candidates(&ens, &prompts, runs.clone(), vote, 2);
            for (i, seqs) in picked.iter().enumerate() {
                assert_eq!(seqs.len(), 2);
                assert!(seqs[0].score >= seqs[1].score);
                for g in seqs {
                    assert!(
                        pool[i].contains(&g.tokens),
                        "a picked sequence was not a candidate"
                    );
                }
                if !vote {
                    // The rerank score is the weighted mean of each model's mean token log-prob.
                    let p = &prompts[i];
                    let seq: Vec<i64> = p.iter().chain(&seqs[0].tokens).copied().collect();
                    let n = seqs[0].tokens.len() as f64;
                    let want = 0.5 * infer::ensemble::sequence_logprob(&a, &seq, p.len()) / n
                        + 0.5 * infer::ensemble::sequence_logprob(&b, &seq, p.len()) / n;
                    assert!((seqs[0].score - want).abs() < 1e-9);
                }
            }
        }
    })
}

#[test]
fn ensembles_refuse_mismatched_models_and_weights() {
    let (a, b) = (load("hub-tied"), load("prefixed-untied"));
    let e = Ensemble::new(vec![&a, &b], None, EnsembleMode::MeanProb)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("vocab_size"), "{e}");
    for w in [vec![1.0], vec![1.0, -1.0], vec![f64::NAN, 1.0]] {
        assert!(Ensemble::new(vec![&a, &a], Some(w), EnsembleMode::MeanProb).is_err());
    }
}

#[test]
fn sequence_logprob_sums_transformers_log_probabilities() {
    tch::no_grad(|| {
        let model = load("hub-tied");
        let ids = &expected("hub-tied").ids[1];
        let logits = &expected_tensors("hub-tied")["single.1"]; // (T, V) from transformers
        let logp = logits.log_softmax(-1, Kind::Float);
        let start = 3;
        let want: f64 = (start..ids.len())
            .map(|t| logp.double_value(&[t as i64 - 1, ids[t]]))
            .sum();
        let got = infer::ensemble::sequence_logprob(&model, ids, start);
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    })
}
