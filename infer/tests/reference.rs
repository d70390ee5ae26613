//! The model against Hugging Face transformers on the reference models: full-forward
//! logits, a left-padded batch, greedy tokens, the tokenizer, and KV-cached decoding
//! against a full recompute.
//!
//! Tolerance: fp32 logits within 1e-4 of transformers' (the bound; summation
//! order differs between our ops and transformers' eager attention, which moves fp32
//! logits of these models by ~1e-6). Greedy tokens must be identical: the reference
//! script rejects any step whose top-two logit gap is under 1e-3, far above that error.
mod common;

use common::*;
use infer::generate::{generate, GenerationConfig};
use infer::{Gpt2, Tokenizer};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn load(name: &str) -> Gpt2 {
    Gpt2::load(&model_dir(name), Some(Kind::Float), Device::Cpu).unwrap()
}

/// The model as loaded, and with its decode steps on the fixed-shape step CUDA graphs
/// capture (`--cuda-graphs on`, uncaptured on the CPU).
fn both_steps(name: &str) -> [(&'static str, Gpt2); 2] {
    let mut fixed = load(name);
    fixed.set_cuda_graphs(true);
    [("", load(name)), (" (fixed-shape step)", fixed)]
}

fn ids_tensor(ids: &[i64]) -> Tensor {
    Tensor::from_slice(ids).view([1, ids.len() as i64])
}

fn full_logits(model: &Gpt2, ids: &[i64]) -> Tensor {
    let mut cache = model.new_cache(1, ids.len() as i64);
    model.forward(&ids_tensor(ids), &mut cache).squeeze_dim(0) // (T, V)
}

#[test]
fn tokenizer_matches_transformers() {
    for name in MODELS {
        let tok = Tokenizer::from_dir(&model_dir(name)).unwrap();
        let exp = expected(name);
        for (prompt, ids) in exp.prompts.iter().zip(&exp.ids) {
            assert_eq!(&tok.encode(prompt).unwrap(), ids, "{name}: {prompt:?}");
            assert_eq!(&tok.decode(ids).unwrap(), prompt, "{name}");
        }
        for case in &exp.tokenizer_cases {
            assert_eq!(
                tok.encode(&case.text).unwrap(),
                case.ids,
                "{name}: {:?}",
                case.text
            );
            assert_eq!(tok.decode(&case.ids).unwrap(), case.text, "{name}");
        }
    }
}

#[test]
fn full_forward_matches_transformers() {
    tch::no_grad(|| {
        for name in MODELS {
            let model = load(name);
            let exp = expected(name);
            let want = expected_tensors(name);
            for (i, ids) in exp.ids.iter().enumerate() {
                let got = full_logits(&model, ids);
                let d = max_abs_diff(&got, &want[&format!("single.{i}")]);
                assert!(d <= TOL, "{name} prompt {i}: max |Δlogit| {d:e} > {TOL:e}");
            }
        }
    })
}

#[test]
fn left_padded_batch_matches_transformers() {
    tch::no_grad(|| {
        for name in MODELS {
            let model = load(name);
            let want = expected_tensors(name);
            let mask = &want["batch_mask"]; // (B, T)
            let (b, t) = mask.size2().unwrap();
            // The padding id does not matter: padded slots are never attended to.
            let ids: Vec<Vec<i64>> = expected(name).ids;
            let mut flat = Vec::new();
            for row in &ids {
                flat.extend(
                    std::iter::repeat_n(0, t as usize - row.len()).chain(row.iter().copied()),
                );
            }
            let mut cache = model.new_cache(b, t);
            cache.set_attention_mask(mask);
            let got = model.forward(&Tensor::from_slice(&flat).view([b, t]), &mut cache);
            let keep = mask.to_kind(Kind::Bool).unsqueeze(-1); // (B, T, 1)
            let diff = (got - &want["batch"])
                .abs()
                .masked_fill(&keep.logical_not(), 0.0);
            let d = f64::try_from(diff.max()).unwrap();
            assert!(d <= TOL, "{name}: padded batch max |Δlogit| {d:e}");
        }
    })
}

#[test]
fn cached_decoding_equals_full_recompute_at_every_step() {
    tch::no_grad(|| {
        for (name, (path, model)) in MODELS.iter().flat_map(|&n| both_steps(n).map(|m| (n, m))) {
            let exp = expected(name);
            for (i, prompt) in exp.ids.iter().enumerate() {
                // The prompt followed by transformers' greedy tokens, fed one by one
                // after a prefill of the first two tokens.
                let seq: Vec<i64> = prompt.iter().chain(&exp.greedy[i]).copied().collect();
                let n0 = 2.min(seq.len());
                let mut cache = model.new_cache(1, seq.len() as i64);
                let mut last = model
                    .forward(&ids_tensor(&seq[..n0]), &mut cache)
                    .get(0)
                    .get(-1);
                for step in n0..=seq.len() {
                    let full = full_logits(&model, &seq[..step]).get(-1);
                    let d = max_abs_diff(&last, &full);
                    assert!(
                        d <= TOL,
                        "{name}{path} prompt {i} length {step}: cached vs full {d:e}"
                    );
                    if step < seq.len() {
                        last = model
                            .forward(&ids_tensor(&seq[step..step + 1]), &mut cache)
                            .get(0)
                            .get(-1);
                    }
                }
                assert_eq!(cache.len(), seq.len() as i64);
            }
        }
    })
}

#[test]
fn padded_cached_decoding_equals_each_row_alone() {
    tch::no_grad(|| {
        let name = "hub-tied";
        for (path, model) in both_steps(name) {
            let exp = expected(name);
            let rows: Vec<Vec<i64>> = exp
                .ids
                .iter()
                .zip(&exp.greedy)
                .map(|(p, g)| p.iter().chain(g).copied().collect())
                .collect();
            let t0 = exp.ids.iter().map(Vec::len).max().unwrap();
            let b = rows.len() as i64;
            let steps = exp.max_new_tokens as usize;
            let mut ids = Vec::new();
            let mut mask = Vec::new();
            for p in &exp.ids {
                ids.extend(std::iter::repeat_n(7, t0 - p.len()).chain(p.iter().copied()));
                mask.extend(
                    std::iter::repeat_n(0i64, t0 - p.len()).chain(std::iter::repeat_n(1, p.len())),
                );
            }
            // Room past the longest row: the fixed-shape step attends over a width (64) short
            // of the capacity.
            let mut cache = model.new_cache(b, (t0 + steps + 100) as i64);
            cache.set_attention_mask(&Tensor::from_slice(&mask).view([b, t0 as i64]));
            let mut last = model
                .forward(&Tensor::from_slice(&ids).view([b, t0 as i64]), &mut cache)
                .select(1, -1);
            for step in 0..steps {
                for (r, row) in rows.iter().enumerate() {
                    let n = exp.ids[r].len() + step;
                    let alone = full_logits(&model, &row[..n]).get(-1);
                    let d = max_abs_diff(&last.get(r as i64), &alone);
                    assert!(
                        d <= TOL,
                        "row {r} step {step}{path}: batched vs alone {d:e}"
                    );
                }
                let next: Vec<i64> = rows
                    .iter()
                    .zip(&exp.ids)
                    .map(|(row, p)| row[p.len() + step])
                    .collect();
                last = model
                    .forward(&Tensor::from_slice(&next).view([b, 1]), &mut cache)
                    .select(1, -1);
            }
        }
    })
}

fn greedy_config(model: &Gpt2, n: i64) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: n as usize,
        eos_token_ids: model.config.eos_ids(),
        ..GenerationConfig::default()
    }
}

#[test]
fn greedy_tokens_equal_transformers_generate() {
    tch::no_grad(|| {
        for name in MODELS {
            let model = load(name);
            let exp = expected(name);
            let cfg = greedy_config(&model, exp.max_new_tokens);
            for (i, ids) in exp.ids.iter().enumerate() {
                let got = generate(
                    &model,
                    std::slice::from_ref(ids),
                    &cfg,
                    &|_| false,
                    |_, _| {},
                )
                .unwrap();
                assert_eq!(
                    got.sequences[0][0].tokens, exp.greedy[i],
                    "{name} prompt {i}"
                );
            }
            let mut streamed = vec![Vec::new(); exp.ids.len()];
            let got = generate(&model, &exp.ids, &cfg, &|_| false, |row, tok| {
                streamed[row].push(tok)
            })
            .unwrap();
            for (i, g) in got.sequences.iter().map(|s| &s[0]).enumerate() {
                assert_eq!(g.tokens, exp.greedy_batch[i], "{name} batch row {i}");
                assert_eq!(streamed[i], g.tokens, "{name}: streamed tokens");
                let eos = model.config.eos_ids().contains(g.tokens.last().unwrap());
                let reason = if eos { "eos" } else { "length" };
                assert_eq!(g.finish_reason.as_str(), reason, "{name} row {i}");
            }
        }
    })
}

#[test]
fn half_precision_files_and_dtypes() {
    tch::no_grad(|| {
        // dtype auto keeps the file's dtype.
        let f16 = Gpt2::load(&model_dir("sharded-f16"), None, Device::Cpu).unwrap();
        assert_eq!(f16.kind(), Kind::Half);
        let bf16 = Gpt2::load(&model_dir("bf16-quickgelu"), None, Device::Cpu).unwrap();
        assert_eq!(bf16.kind(), Kind::BFloat16);
        // Running in bf16: its 8-bit mantissa gives ~0.4% relative error per op, so
        // logits are held to 5% of their range, not to the fp32 bound.
        for name in ["hub-tied", "prefixed-untied", "bf16-quickgelu"] {
            let model = Gpt2::load(&model_dir(name), Some(Kind::BFloat16), Device::Cpu).unwrap();
            let exp = expected(name);
            let want = &expected_tensors(name)["single.0"];
            let got = full_logits(&model, &exp.ids[0]);
            let range = f64::try_from(want.abs().max()).unwrap();
            let d = max_abs_diff(&got, want);
            assert!(d <= 0.05 * range, "{name} in bf16: {d} vs range {range}");
        }
    })
}
