//! A long-running engine's requests each with their own settings (sampling, processors,
//! seed), and cancelled requests: what a server needs.
//!
//! On the fused CPU decode step every row is computed the same whatever the rows beside
//! it (see `continuous.rs`), so a request's tokens beside others are compared for
//! equality with the same request run alone.
mod common;

use std::sync::Arc;

use common::*;
use infer::ensemble::Ensemble;
use infer::generate::{
    generate, Engine, FinishReason, Generated, GenerationConfig, Request, Schedule,
};
use infer::Gpt2;
use tch::{Device, Kind};

fn model() -> Gpt2 {
    let m = Gpt2::load(
        &model_dir("prefixed-untied"),
        Some(Kind::Float),
        Device::Cpu,
    )
    .unwrap();
    assert!(m.fuses_decode(), "fused decode expected");
    m
}

fn prompts() -> Vec<Vec<i64>> {
    let base = expected("prefixed-untied").ids;
    let all: Vec<i64> = base.iter().flatten().copied().collect();
    let mut prompts = base;
    for n in [2usize, 7, 13] {
        prompts.push(all.iter().cycle().skip(n).take(n + 1).copied().collect());
    }
    prompts
}

/// Settings `k` of a few different kinds: greedy, seeded sampling with warpers and
/// penalties, each with a different seed.
fn settings(model: &Gpt2, k: usize) -> GenerationConfig {
    let mut cfg = GenerationConfig::default();
    cfg.eos_token_ids = model.config.eos_ids();
    let p = &mut cfg.processing;
    match k % 4 {
        0 => {}
        1 => {
            p.do_sample = true;
            p.temperature = 0.7;
            p.top_k = 20;
        }
        2 => {
            p.do_sample = true;
            p.top_p = 0.9;
            p.repetition_penalty = 1.3;
        }
        _ => {
            p.do_sample = true;
            p.temperature = 1.3;
            p.no_repeat_ngram_size = 2;
        }
    }
    cfg.seed = Some(1000 + 17 * k as u64);
    cfg
}

/// Runs `requests` through one engine with at most `slots` rows, adding the second
/// half after two steps; returns each request's sequence by id.
fn serve(model: &Gpt2, requests: Vec<Request>, slots: usize) -> Vec<Generated> {
    let ens = Ensemble::single(model);
    let base = GenerationConfig::default();
    let capacity = requests
        .iter()
        .map(|r| r.prompt.len() + r.max_new_tokens)
        .max()
        .unwrap();
    let schedule = Schedule {
        max_num_seqs: Some(slots),
        static_batches: false,
    };
    let n = requests.len();
    let mut got: Vec<Option<Generated>> = vec![None; n];
    tch::no_grad(|| {
        let mut engine = Engine::with_pool(&ens, &base, schedule, slots, capacity);
        let mut requests = requests.into_iter();
        for r in requests.by_ref().take(n / 2) {
            engine.add(r).unwrap();
        }
        let mut steps = 0;
        while !engine.is_idle() || steps < 2 {
            engine.step(&|_| false, &mut |_, _| {}).unwrap();
            steps += 1;
            if steps == 2 {
                for r in requests.by_ref() {
                    engine.add(r).unwrap();
                }
            }
            for (id, mut seqs) in engine.take_finished() {
                assert_eq!(seqs.len(), 1, "request {id}: one sequence");
                assert!(got[id].is_none(), "request {id} taken twice");
                got[id] = seqs.pop();
            }
        }
    });
    got.into_iter()
        .enumerate()
        .map(|(i, g)| g.unwrap_or_else(|| panic!("request {i} never finished")))
        .collect()
}

/// Each request under its own settings, beside requests under others, gives the tokens
/// `generate` gives for it alone under those settings (its seed as `--seed`).
#[test]
fn each_request_keeps_its_own_settings_and_seed() {
    let model = model();
    let prompts = prompts();
    let cfgs: Vec<Arc<GenerationConfig>> = (0..prompts.len())
        .map(|k| Arc::new(settings(&model, k)))
        .collect();
    let requests: Vec<Request> = prompts
        .iter()
        .zip(&cfgs)
        .enumerate()
        .map(|(i, (p, c))| Request {
            prompt: p.clone(),
            max_new_tokens: 4 + 3 * (i % 4),
            settings: Some(c.clone()),
            adapter: None,
        })
        .collect();
    let got = serve(&model, requests.clone(), 3);
    let mut sampled = 0;
    for (i, (r, g)) in requests.iter().zip(&got).enumerate() {
        let mut cfg = (*cfgs[i]).clone();
        cfg.max_new_tokens = r.max_new_tokens;
        let alone = tch::no_grad(|| {
            generate(&model, &[r.prompt.clone()], &cfg, &|_| false, |_, _| {}).unwrap()
        });
        let alone = &alone.sequences[0][0];
        assert_eq!(g.tokens, alone.tokens, "request {i} (settings {})", i % 4);
        assert_eq!(g.logprobs, alone.logprobs, "request {i}");
        sampled += usize::from(cfg.processing.do_sample);
    }
    assert!(sampled >= 3, "the check covers sampled requests");
}

/// One request, one seed: the same tokens whichever other requests run beside it and
/// in whatever order they arrive.
#[test]
fn a_seeded_request_does_not_depend_on_its_neighbours() {
    let model = model();
    let prompts = prompts();
    let cfg = Arc::new(settings(&model, 1));
    let make = |order: &[usize]| -> Vec<Request> {
        order
            .iter()
            .map(|&i| Request {
                prompt: prompts[i].clone(),
                max_new_tokens: 8,
                settings: Some(cfg.clone()),
                adapter: None,
            })
            .collect()
    };
    let n = prompts.len();
    let forward: Vec<usize> = (0..n).collect();
    let backward: Vec<usize> = (0..n).rev().collect();
    let a = serve(&model, make(&forward), 4);
    let b = serve(&model, make(&backward), 2);
    for i in 0..n {
        assert_eq!(a[i].tokens, b[n - 1 - i].tokens, "prompt {i}");
    }
}

/// Cancelling: a waiting request never starts, a running one stops at once with the
/// tokens it had (a prefix of its tokens alone) and frees its slot for the next; both
/// end `Cancelled`; a finished or unknown request cannot be cancelled.
#[test]
fn cancelled_requests_free_their_slots() {
    let model = model();
    let prompts = prompts();
    let mut cfg = GenerationConfig::default();
    cfg.eos_token_ids = vec![];
    let ens = Ensemble::single(&model);
    let req = |i: usize, n: usize| Request {
        prompt: prompts[i].clone(),
        max_new_tokens: n,
        settings: None,
        adapter: None,
    };
    let alone = |i: usize, n: usize| {
        let mut cfg = cfg.clone();
        cfg.max_new_tokens = n;
        tch::no_grad(|| generate(&model, &[prompts[i].clone()], &cfg, &|_| false, |_, _| {}))
            .unwrap()
            .sequences[0][0]
            .tokens
            .clone()
    };
    let schedule = Schedule {
        max_num_seqs: Some(1),
        static_batches: false,
    };
    tch::no_grad(|| {
        let mut engine = Engine::with_pool(&ens, &cfg, schedule, 1, 128);
        let running = engine.add(req(0, 30)).unwrap();
        let waiting = engine.add(req(1, 30)).unwrap();
        let next = engine.add(req(2, 5)).unwrap();
        for _ in 0..3 {
            engine.step(&|_| false, &mut |_, _| {}).unwrap();
        }
        assert!(engine.cancel(waiting), "a waiting request");
        assert!(engine.cancel(running), "a running request");
        assert!(!engine.cancel(running), "cancelled twice");
        assert!(!engine.cancel(99), "an unknown request");
        let mut done = engine.take_finished();
        done.sort_by_key(|(id, _)| *id);
        assert_eq!(done.len(), 2, "both cancelled requests are finished");
        let (ran, never) = (&done[0].1[0], &done[1].1[0]);
        assert_eq!(ran.finish_reason, FinishReason::Cancelled);
        assert_eq!(never.finish_reason, FinishReason::Cancelled);
        assert!(never.tokens.is_empty(), "a waiting request never starts");
        assert_eq!(ran.tokens.len(), 3, "three steps, three tokens");
        assert_eq!(ran.tokens[..], alone(0, 30)[..3]);
        // The one slot is free again: the next request runs and finishes as alone.
        while !engine.is_idle() {
            engine.step(&|_| false, &mut |_, _| {}).unwrap();
        }
        let done = engine.take_finished();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0, next);
        assert_eq!(done[0].1[0].tokens, alone(2, 5));
        assert_eq!(done[0].1[0].finish_reason, FinishReason::Length);
        assert!(!engine.cancel(next), "a finished request");
    });
}

/// A request's own settings are checked when it is added, and an engine of beams or
/// several return sequences refuses them.
#[test]
fn own_settings_are_checked_on_add() {
    let model = model();
    let ens = Ensemble::single(&model);
    let prompt = prompts()[0].clone();
    let with = |f: &dyn Fn(&mut GenerationConfig)| {
        let mut c = GenerationConfig::default();
        f(&mut c);
        Request {
            prompt: prompt.clone(),
            max_new_tokens: 3,
            settings: Some(Arc::new(c)),
            adapter: None,
        }
    };
    let base = GenerationConfig::default();
    let mut engine = Engine::with_pool(&ens, &base, Schedule::default(), 2, 32);
    let e = engine
        .add(with(&|c| c.processing.top_p = 1.5))
        .unwrap_err()
        .to_string();
    assert!(e.contains("top-p") || e.contains("top_p"), "{e}");
    let e = engine
        .add(with(&|c| c.num_beams = 2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_beams"), "{e}");
    assert!(engine.add(with(&|_| {})).is_ok());
    let mut beams = GenerationConfig::default();
    beams.num_beams = 2;
    let mut engine = Engine::with_pool(&ens, &beams, Schedule::default(), 2, 32);
    let e = engine.add(with(&|_| {})).unwrap_err().to_string();
    assert!(e.contains("one sequence a request"), "{e}");
}

/// A request whose own settings leave it no token (every token suppressed) ends with
/// `FinishReason::Error` and a message saying so; the requests beside it go on and give
/// their tokens alone.
#[test]
fn a_request_with_no_token_to_pick_fails_alone() {
    let model = model();
    let prompts = prompts();
    let ens = Ensemble::single(&model);
    let mut banned = settings(&model, 0);
    banned.processing.suppress_tokens = (0..model.config.vocab_size).collect();
    let base = settings(&model, 0);
    let alone = |i: usize| {
        let mut cfg = base.clone();
        cfg.max_new_tokens = 6;
        tch::no_grad(|| generate(&model, &[prompts[i].clone()], &cfg, &|_| false, |_, _| {}))
            .unwrap()
            .sequences[0][0]
            .tokens
            .clone()
    };
    let mut got = Vec::new();
    let mut error = None;
    tch::no_grad(|| {
        let mut engine = Engine::with_pool(&ens, &base, Schedule::default(), 3, 64);
        let ok_a = engine.add(Request {
            prompt: prompts[0].clone(),
            max_new_tokens: 6,
            settings: None,
            adapter: None,
        });
        let bad = engine
            .add(Request {
                prompt: prompts[1].clone(),
                max_new_tokens: 6,
                settings: Some(Arc::new(banned)),
                adapter: None,
            })
            .unwrap();
        let ok_b = engine.add(Request {
            prompt: prompts[2].clone(),
            max_new_tokens: 6,
            settings: Some(Arc::new(base.clone())),
            adapter: None,
        });
        while !engine.is_idle() {
            engine.step(&|_| false, &mut |_, _| {}).unwrap();
        }
        for (id, seqs) in engine.take_finished() {
            if id == bad {
                assert_eq!(seqs[0].finish_reason, FinishReason::Error);
                assert!(seqs[0].tokens.is_empty());
                error = engine.take_error(id);
            } else {
                got.push((id, seqs[0].tokens.clone()));
            }
        }
        assert_eq!(engine.take_error(bad), None, "an error is taken once");
        assert_eq!(got.len(), 2, "{ok_a:?} {ok_b:?}");
    });
    let error = error.expect("the failed request's error");
    assert!(error.contains("banned"), "{error}");
    got.sort();
    assert_eq!(got[0].1, alone(0));
    assert_eq!(got[1].1, alone(2));
}

/// `logprobs`: per token, its log-probability under the model's own distribution (not
/// the processed one it was sampled from) and the most likely tokens'. Checked against a
/// fresh forward pass over the sequence so far; tolerance 1e-4: the engine's fused
/// decode step and libtorch's whole-sequence forward sum in different orders (f32).
#[test]
fn raw_logprobs_are_the_models_own() {
    let model = model();
    let prompt = prompts()[1].clone();
    let mut cfg = settings(&model, 1); // sampled at temperature 0.7, top-k 20
    cfg.logprobs = Some(3);
    cfg.max_new_tokens = 6;
    let out =
        tch::no_grad(|| generate(&model, &[prompt.clone()], &cfg, &|_| false, |_, _| {})).unwrap();
    let g = &out.sequences[0][0];
    assert_eq!(g.raw_logprobs.len(), g.tokens.len());
    let mut differs = false;
    for (t, lp) in g.raw_logprobs.iter().enumerate() {
        let history: Vec<i64> = prompt.iter().chain(&g.tokens[..t]).copied().collect();
        let fresh = tch::no_grad(|| {
            let mut cache = model.new_cache(1, history.len() as i64);
            model
                .forward(&tch::Tensor::from_slice(&history).view([1, -1]), &mut cache)
                .select(1, -1)
                .select(0, 0)
                .to_kind(Kind::Double)
                .log_softmax(-1, Kind::Double)
        });
        let want = fresh.double_value(&[g.tokens[t]]);
        assert!(
            (lp.logprob - want).abs() < 1e-4,
            "token {t}: {} vs {want}",
            lp.logprob
        );
        assert_eq!(lp.top.len(), 3);
        let (best, _) = fresh.topk(3, -1, true, true);
        for (k, &(id, v)) in lp.top.iter().enumerate() {
            assert!(
                (v - best.double_value(&[k as i64])).abs() < 1e-4,
                "token {t}, top {k}"
            );
            assert!(
                (fresh.double_value(&[id]) - v).abs() < 1e-4,
                "token {t}, id {id}"
            );
        }
        differs |= (lp.logprob - g.logprobs[t]).abs() > 1e-3;
    }
    // The processed log-probabilities (temperature 0.7, top-k) are not the raw ones.
    assert!(differs, "raw and processed log-probabilities coincide");
    // Not asked: not computed.
    cfg.logprobs = None;
    let out =
        tch::no_grad(|| generate(&model, &[prompt.clone()], &cfg, &|_| false, |_, _| {})).unwrap();
    assert!(out.sequences[0][0].raw_logprobs.is_empty());
}
