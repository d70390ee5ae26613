//! The engine's unit is one sequence: sequences of different prompt lengths decoded
//! together, sequences that join a running batch mid-way (a freed slot refilled) and
//! sequences that leave it early give each exactly the tokens it gives alone: greedy,
//! seeded sampling (each sequence its own generator, seeded `seed + k` for row k) and
//! beam search, on the fused CPU decode step, on libtorch between the kernels, on
//! libtorch alone, and on the fixed-shape step CUDA graphs capture (run uncaptured here),
//! which also gives libtorch's tokens.
//!
//! Tolerances: the decode kernels compute each row the same whatever the rows beside it
//! (one accumulator per row, in input order), and the fused step's other ops are per row,
//! so on the fused path tokens and log-probabilities are bit-identical. libtorch's
//! matrix products may block rows differently by batch size (~1 ulp of f32), so on the
//! libtorch paths greedy and beam tokens are the same except where the alone run's top
//! two logits lie within 1e-4 of each other (from that step on the sequences may differ;
//! checked by margin, as the tensor-parallel tests do), log-probabilities and scores
//! within 1e-4 while the tokens agree; sampled tokens (seeded, each sequence its own
//! generator) are the same.
mod common;

use common::*;
use infer::ensemble::Ensemble;
use infer::generate::{generate_requests, GenerationConfig, Request, Schedule};
use infer::{EngineOptions, Gpt2};
use tch::{Device, Kind, Tensor};

/// The three paths: fused decode, libtorch between the kernels, libtorch alone.
fn models(name: &str) -> Vec<(&'static str, Gpt2)> {
    let load = |o: EngineOptions| {
        Gpt2::load_with(&model_dir(name), Some(Kind::Float), &[Device::Cpu], &o).unwrap()
    };
    let fused = load(EngineOptions::default());
    assert!(fused.fuses_decode(), "{name}: fused decode expected");
    vec![
        ("fused", fused),
        (
            "libtorch between kernels",
            load(EngineOptions {
                fused_decode: false,
                ..EngineOptions::default()
            }),
        ),
        (
            "libtorch",
            load(EngineOptions {
                kernels: false,
                ..EngineOptions::default()
            }),
        ),
        (
            "fixed-shape step",
            load(EngineOptions {
                kernels: false,
                cuda_graphs: true,
                ..EngineOptions::default()
            }),
        ),
    ]
}

/// Prompts of different lengths (the reference prompts and longer ones made of their
/// tokens), each with its own token limit, so that sequences leave at different steps.
fn requests(name: &str) -> Vec<Request> {
    let base = expected(name).ids;
    let mut prompts = base.clone();
    let all: Vec<i64> = base.iter().flatten().copied().collect();
    for n in [1usize, 9, 17] {
        prompts.push(all.iter().cycle().skip(n).take(n + 2).copied().collect());
    }
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| Request {
            prompt,
            max_new_tokens: [3, 11, 6, 14, 2, 9, 5][i % 7],
            settings: None,
            adapter: None,
        })
        .collect()
}

/// Per request, per returned sequence: tokens, log-probabilities and score.
type Seqs = Vec<Vec<(Vec<i64>, Vec<f64>, f64)>>;

fn run(model: &Gpt2, requests: Vec<Request>, cfg: &GenerationConfig, schedule: Schedule) -> Seqs {
    let ens = Ensemble::single(model);
    let out = tch::no_grad(|| {
        generate_requests(&ens, requests, cfg, schedule, &|_| false, |_, _| {}).unwrap()
    });
    out.sequences
        .into_iter()
        .map(|seqs| {
            seqs.into_iter()
                .map(|g| (g.tokens, g.logprobs, g.score))
                .collect()
        })
        .collect()
}

/// The gap between the two largest next-token logits after `tokens`, computed afresh.
fn top_two_gap(model: &Gpt2, tokens: &[i64]) -> f64 {
    tch::no_grad(|| {
        let mut cache = model.new_cache(1, tokens.len() as i64);
        let logits = model
            .forward(&Tensor::from_slice(tokens).view([1, -1]), &mut cache)
            .select(1, -1)
            .to_kind(Kind::Double);
        let (top, _) = logits.topk(2, -1, true, true);
        let top = Vec::<f64>::try_from(top.reshape([-1])).unwrap();
        top[0] - top[1]
    })
}

/// `got` (decoded beside others) against `alone`: identical when `exact`; otherwise
/// identical up to the first step whose alone top-two gap is within 1e-4.
fn compare(model: &Gpt2, prompt: &[i64], got: &[i64], alone: &[i64], exact: bool, what: &str) {
    if exact {
        assert_eq!(got, alone, "{what}");
        return;
    }
    if let Some(s) = got.iter().zip(alone).position(|(a, b)| a != b) {
        let history: Vec<i64> = prompt.iter().chain(&alone[..s]).copied().collect();
        let gap = top_two_gap(model, &history);
        assert!(
            gap < 1e-4,
            "{what}: token {s} differs ({} vs {} alone) with a top-two gap of {gap}",
            got[s],
            alone[s]
        );
    } else {
        assert_eq!(got.len(), alone.len(), "{what}: lengths");
    }
}

/// Runs `requests` together under `schedule` and each alone, and compares.
fn check(name: &str, cfg: &GenerationConfig, schedule: Schedule) {
    let reqs = requests(name);
    for (path, model) in models(name) {
        let mut cfg = cfg.clone();
        cfg.eos_token_ids = model.config.eos_ids();
        let together = run(&model, reqs.clone(), &cfg, schedule);
        let per = cfg.num_return_sequences;
        for (i, req) in reqs.iter().enumerate() {
            assert_eq!(together[i].len(), per, "{path}: request {i}: sequences");
            for (j, seq) in together[i].iter().enumerate() {
                // Alone, row k of the batch is row 0: seeded with seed + k.
                let mut alone_cfg = cfg.clone();
                if cfg.num_beams == 1 {
                    alone_cfg.num_return_sequences = 1;
                    alone_cfg.seed = cfg.seed.map(|s| s + (i * per + j) as u64);
                }
                let alone = run(&model, vec![req.clone()], &alone_cfg, Schedule::default());
                let alone = &alone[0][if cfg.num_beams == 1 { 0 } else { j }];
                let what = format!("{path}: {name}, request {i}, sequence {j}, {schedule:?}");
                let exact = cfg.processing.do_sample || path == "fused";
                compare(&model, &req.prompt, &seq.0, &alone.0, exact, &what);
                if path == "fused" {
                    assert_eq!(seq, alone, "{what}: bit-identical on the fused path");
                } else if seq.0 == alone.0 {
                    let close = seq
                        .1
                        .iter()
                        .zip(&alone.1)
                        .all(|(a, b)| (a - b).abs() < 1e-4);
                    assert!(close, "{what}: log-probabilities");
                    assert!((seq.2 - alone.2).abs() < 1e-4, "{what}: score");
                }
            }
        }
    }
}

/// At most 3 live sequences of 7: the short ones leave early, the waiting ones join a
/// running batch in the freed slots.
const REFILL: Schedule = Schedule {
    max_num_seqs: Some(3),
    static_batches: false,
};

#[test]
fn greedy_sequences_decode_alone_or_together_the_same() {
    let cfg = GenerationConfig::default();
    for name in ["prefixed-untied", "hub-tied"] {
        check(name, &cfg, Schedule::default());
        check(name, &cfg, REFILL);
    }
}

#[test]
fn seeded_sampled_sequences_draw_their_own_streams() {
    let mut cfg = GenerationConfig {
        seed: Some(11),
        num_return_sequences: 2,
        ..GenerationConfig::default()
    };
    cfg.processing.do_sample = true;
    cfg.processing.top_k = 20;
    cfg.processing.temperature = 0.9;
    check("prefixed-untied", &cfg, REFILL);
    check("prefixed-untied", &cfg, Schedule::default());
}

#[test]
fn beam_groups_join_and_leave_like_sequences() {
    let cfg = GenerationConfig {
        num_beams: 3,
        num_return_sequences: 2,
        ..GenerationConfig::default()
    };
    // 6 rows: two groups at a time, a third joins when one finishes.
    let schedule = Schedule {
        max_num_seqs: Some(6),
        static_batches: false,
    };
    check("prefixed-untied", &cfg, schedule);
}

#[test]
fn static_batches_give_the_refilled_tokens() {
    let cfg = GenerationConfig::default();
    for path_model in models("prefixed-untied").into_iter().take(1) {
        let (_, model) = path_model;
        let mut cfg = cfg.clone();
        cfg.eos_token_ids = model.config.eos_ids();
        let reqs = requests("prefixed-untied");
        let refill = run(&model, reqs.clone(), &cfg, REFILL);
        let fixed = run(
            &model,
            reqs,
            &cfg,
            Schedule {
                static_batches: true,
                ..REFILL
            },
        );
        // The fused path computes each row the same beside any others.
        assert_eq!(refill, fixed);
    }
}

/// A long-running engine (a server's shape): requests added while others decode, their
/// results taken as each finishes, each the tokens it gives alone (fused path: exact).
#[test]
fn requests_added_while_running_decode_as_alone() {
    use infer::generate::Engine;
    let (_, model) = models("prefixed-untied").into_iter().next().unwrap();
    let mut cfg = GenerationConfig::default();
    cfg.eos_token_ids = model.config.eos_ids();
    let reqs = requests("prefixed-untied");
    let ens = Ensemble::single(&model);
    let capacity = reqs
        .iter()
        .map(|r| r.prompt.len() + r.max_new_tokens)
        .max()
        .unwrap();
    let schedule = Schedule {
        max_num_seqs: Some(2),
        static_batches: false,
    };
    let mut got = vec![None; reqs.len()];
    tch::no_grad(|| {
        let mut engine = Engine::with_pool(&ens, &cfg, schedule, 2, capacity);
        let too_long = Request {
            prompt: vec![1; capacity],
            max_new_tokens: 1,
            settings: None,
            adapter: None,
        };
        assert!(
            engine.add(too_long).is_err(),
            "a request past the rows' capacity"
        );
        let (first, later) = reqs.split_at(3);
        for r in first {
            engine.add(r.clone()).unwrap();
        }
        let mut steps = 0;
        while !engine.is_idle() || steps < 3 {
            engine.step(&|_| false, &mut |_, _| {}).unwrap();
            steps += 1;
            if steps == 3 {
                for r in later {
                    engine.add(r.clone()).unwrap();
                }
            }
            for (id, seqs) in engine.take_finished() {
                assert!(got[id].is_none(), "request {id} taken twice");
                got[id] = Some(seqs);
            }
        }
    });
    for (i, req) in reqs.iter().enumerate() {
        let seqs = got[i]
            .take()
            .unwrap_or_else(|| panic!("request {i} never finished"));
        let alone = run(&model, vec![req.clone()], &cfg, Schedule::default());
        let seq = (
            seqs[0].tokens.clone(),
            seqs[0].logprobs.clone(),
            seqs[0].score,
        );
        assert_eq!(seq, alone[0][0], "request {i}");
    }
}

/// The fixed-shape step (what `--cuda-graphs on` captures on CUDA; uncaptured here)
/// against libtorch's decode path, sequences joining and leaving: the same tokens, up to
/// near ties (its attention runs over a fixed width of slots with the unfilled ones
/// masked, another libtorch kernel than the unmasked one over the filled slots: the
/// same math, summed in another order), log-probabilities within 1e-4 where the tokens
/// agree.
#[test]
fn fixed_shape_step_gives_the_libtorch_tokens() {
    let all = models("prefixed-untied");
    let by = |p: &str| &all.iter().find(|(n, _)| *n == p).unwrap().1;
    let (eager, fixed) = (by("libtorch"), by("fixed-shape step"));
    let reqs = requests("prefixed-untied");
    for beams in [1, 3] {
        let mut cfg = GenerationConfig {
            num_beams: beams,
            ..GenerationConfig::default()
        };
        cfg.eos_token_ids = eager.config.eos_ids();
        let schedule = Schedule {
            max_num_seqs: Some(3 * beams),
            static_batches: false,
        };
        let a = run(eager, reqs.clone(), &cfg, schedule);
        let b = run(fixed, reqs.clone(), &cfg, schedule);
        let mut differs = 0;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            for (s, t) in x.iter().zip(y) {
                let what = format!("beams {beams}, request {i}");
                compare(eager, &reqs[i].prompt, &t.0, &s.0, false, &what);
                if s.0 == t.0 {
                    let close = s.1.iter().zip(&t.1).all(|(p, q)| (p - q).abs() < 1e-4);
                    assert!(close, "{what}: log-probabilities");
                    differs += usize::from(s.1 != t.1);
                }
            }
        }
        // Both paths ran: the fixed one is another computation, seen in the last bits.
        assert!(
            differs > 0,
            "beams {beams}: the fixed-shape step did not run"
        );
    }
}
