//! LoRA adapters held beside the base (`Gpt2::add_adapter`), chosen per request: rows
//! running different adapters (and the base) decode together in one engine, and each
//! gets the tokens it gets alone; on the fused step, in f32 and bf16, bit for bit.
//!
//! Tolerances as in `continuous.rs`: the fused step computes each row on its own (the
//! decode kernels and the adapter term alike), so its tokens and log-probabilities are
//! identical; libtorch alone may block rows differently by batch size (~1 ulp), so
//! there tokens are the same up to the first step whose alone top-two gap lies within
//! 1e-4.
mod common;

use common::*;
use infer::adapter::{Lora, LoraOptions};
use infer::ensemble::Ensemble;
use infer::generate::{generate_requests, GenerationConfig, Request, Schedule};
use infer::{EngineOptions, Gpt2};
use tch::{Device, Kind, Tensor};

/// A LoRA adapter on every linear of `model`'s blocks, r 4, with A and B drawn from
/// `seed` (B non-zero, so that it changes the tokens).
fn adapter(model: &Gpt2, seed: i64) -> Lora {
    let options = LoraOptions {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["c_attn".into(), "c_proj".into(), "c_fc".into()],
    };
    let mut lora = Lora::init(&options, &model.config, seed as u64, Device::Cpu).unwrap();
    tch::manual_seed(seed);
    for (name, t) in &mut lora.tensors {
        if name.contains("lora_B") {
            *t = Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.2;
        }
    }
    lora
}

fn load(kind: Kind, options: EngineOptions) -> Gpt2 {
    let dir = model_dir("prefixed-untied");
    let mut model = Gpt2::load_with(&dir, Some(kind), &[Device::Cpu], &options).unwrap();
    for seed in [3, 5] {
        let lora = adapter(&model, seed);
        model.add_adapter(&lora).unwrap();
    }
    model
}

/// Per request: greedy tokens and log-probabilities.
fn run(model: &Gpt2, requests: Vec<Request>) -> Vec<(Vec<i64>, Vec<f64>)> {
    let cfg = GenerationConfig::default();
    let ens = Ensemble::single(model);
    let out = tch::no_grad(|| {
        let never = &|_: &[i64]| false;
        generate_requests(&ens, requests, &cfg, Schedule::default(), never, |_, _| {})
    })
    .unwrap();
    out.sequences
        .into_iter()
        .map(|mut s| {
            let g = s.remove(0);
            (g.tokens, g.logprobs)
        })
        .collect()
}

/// The gap between the two largest next-token logits after `tokens` under `adapter`.
fn top_two_gap(model: &Gpt2, adapter: Option<usize>, tokens: &[i64]) -> f64 {
    tch::no_grad(|| {
        let mut cache = model.new_cache(1, tokens.len() as i64);
        cache.set_adapter(0, adapter);
        let ids = Tensor::from_slice(tokens).view([1, -1]);
        let logits = model.forward(&ids, &mut cache).select(1, -1);
        let (top, _) = logits.to_kind(Kind::Double).topk(2, -1, true, true);
        top.double_value(&[0, 0]) - top.double_value(&[0, 1])
    })
}

#[test]
fn rows_with_different_adapters_decode_together_as_each_alone() {
    let prompts = expected("prefixed-untied").ids;
    let fused = EngineOptions::default();
    let libtorch = EngineOptions {
        kernels: false,
        ..fused.clone()
    };
    let cases = [
        ("f32 fused", Kind::Float, fused.clone(), true),
        ("bf16 fused", Kind::BFloat16, fused, true),
        ("f32 libtorch", Kind::Float, libtorch, false),
    ];
    for (what, kind, options, exact) in cases {
        let model = load(kind, options);
        assert_eq!(model.fuses_decode(), exact, "{what}");
        // Every prompt under the base and each adapter, all in one engine.
        let requests: Vec<Request> = [None, Some(0), Some(1)]
            .into_iter()
            .flat_map(|adapter| {
                prompts.iter().enumerate().map(move |(i, p)| Request {
                    prompt: p.clone(),
                    max_new_tokens: 6 + 3 * (i % 3),
                    settings: None,
                    adapter,
                })
            })
            .collect();
        let together = run(&model, requests.clone());
        let n = prompts.len();
        // Each adapter changes what some prompt decodes to: the test can fail.
        for a in 1..3 {
            let differ = (0..n).any(|i| together[i].0 != together[a * n + i].0);
            assert!(differ, "{what}: adapter {} changes no tokens", a - 1);
        }
        for (r, got) in requests.iter().zip(&together) {
            let alone = run(&model, vec![r.clone()]).remove(0);
            let who = format!("{what}: adapter {:?}, prompt {:?}", r.adapter, r.prompt);
            if exact {
                assert_eq!(got, &alone, "{who}");
                continue;
            }
            if let Some(s) = got.0.iter().zip(&alone.0).position(|(a, b)| a != b) {
                let history: Vec<i64> = r.prompt.iter().chain(&alone.0[..s]).copied().collect();
                let gap = top_two_gap(&model, r.adapter, &history);
                assert!(gap < 1e-4, "{who}: token {s} differs, top-two gap {gap}");
            }
        }
    }
}

#[test]
fn requests_naming_an_adapter_the_model_lacks_are_refused() {
    let model = load(Kind::Float, EngineOptions::default());
    let cfg = GenerationConfig::default();
    let ens = Ensemble::single(&model);
    let mut engine = infer::generate::Engine::with_pool(&ens, &cfg, Schedule::default(), 2, 32);
    let err = engine
        .add(Request {
            prompt: vec![1, 2, 3],
            max_new_tokens: 2,
            settings: None,
            adapter: Some(2),
        })
        .unwrap_err();
    assert!(err.to_string().contains("adapter 2"), "{err}");
}
