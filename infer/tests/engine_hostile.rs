//! The engine under hostile use, at the library level: edge-case requests and schedules
//! are refused with a message or decoded as alone, and a sequence's tokens and
//! log-probabilities on the fused CPU path do not depend on what else is decoded beside
//! it (the engine's claim), however many rows are live and however the prompts group.
//!
//! (More than 128 live rows at once: tests/engine_hostile.rs, on a wider model than the
//! reference ones.)
mod common;

use std::time::Duration;

use common::*;
use infer::ensemble::Ensemble;
use infer::generate::{
    generate_requests, FinishReason, Generated, GenerationConfig, Output, Request, Schedule,
};
use infer::{EngineOptions, Gpt2};
use tch::{Device, Kind};

/// The fused CPU path (the engine's bit-identical one).
fn fused(name: &str) -> Gpt2 {
    let m = Gpt2::load_with(
        &model_dir(name),
        Some(Kind::Float),
        &[Device::Cpu],
        &EngineOptions::default(),
    )
    .unwrap();
    assert!(m.fuses_decode(), "{name}: fused decode expected");
    m
}

fn try_run(
    model: &Gpt2,
    requests: Vec<Request>,
    cfg: &GenerationConfig,
    schedule: Schedule,
) -> infer::Result<Output> {
    let ens = Ensemble::single(model);
    tch::no_grad(|| generate_requests(&ens, requests, cfg, schedule, &|_| false, |_, _| {}))
}

fn run(model: &Gpt2, requests: Vec<Request>, cfg: &GenerationConfig, s: Schedule) -> Output {
    try_run(model, requests, cfg, s).unwrap()
}

/// A deterministic prompt of `len` token ids in `1..vocab`, varied by `salt`.
fn prompt(len: usize, salt: u64, vocab: i64) -> Vec<i64> {
    let mut x = salt
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1 + ((x >> 33) as i64) % (vocab - 1)
        })
        .collect()
}

/// Greedy with the model's EOS. `max_new_tokens` is 1: every request brings its own
/// limit, and `generate_requests` checks the prompts against the settings' limit too
/// (see `request_limit_replaces_the_settings_limit`).
fn greedy(model: &Gpt2) -> GenerationConfig {
    GenerationConfig {
        eos_token_ids: model.config.eos_ids(),
        max_new_tokens: 1,
        ..GenerationConfig::default()
    }
}

/// Each request decoded alone (default schedule) equals its sequence in `together`,
/// tokens, log-probabilities and score bit for bit.
fn assert_each_as_alone(model: &Gpt2, reqs: &[Request], cfg: &GenerationConfig, together: &Output) {
    assert_eq!(together.sequences.len(), reqs.len());
    let mut differ = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let alone = run(model, vec![r.clone()], cfg, Schedule::default());
        let (a, t): (&Generated, &Generated) = (&alone.sequences[0][0], &together.sequences[i][0]);
        if a != t {
            differ.push(format!(
                "request {i} (prompt of {} tokens): tokens {:?} vs {:?} alone, logprobs {:?} vs {:?}",
                r.prompt.len(),
                t.tokens,
                a.tokens,
                t.logprobs,
                a.logprobs
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "{} of {} sequences differ from their lone runs; first: {}",
        differ.len(),
        reqs.len(),
        differ[0]
    );
}

/// Prompts of one length that join together share one prefill pass; when that pass has
/// more than 128 tokens its products leave the decode kernels, and the prompts' hidden
/// states differ from a lone prefill in the last bits.
#[test]
fn same_length_prompts_prefilled_together_as_alone() {
    let model = fused("hub-tied");
    let v = model.config.vocab_size;
    let reqs: Vec<Request> = (0..17)
        .map(|i| Request {
            prompt: prompt(8, 1000 + i, v),
            max_new_tokens: 4,
            settings: None,
            adapter: None,
        })
        .collect();
    let cfg = greedy(&model);
    let together = run(&model, reqs.clone(), &cfg, Schedule::default());
    assert_each_as_alone(&model, &reqs, &cfg, &together);
}

/// Below both thresholds (≤ 128 live rows, ≤ 128 prefill tokens per pass) many
/// requests through one slot, a few slots, static batches, or all at once are each
/// their lone run, bit for bit.
#[test]
fn many_requests_any_schedule_as_alone() {
    let model = fused("prefixed-untied");
    let v = model.config.vocab_size;
    let reqs: Vec<Request> = (0..40u64)
        .map(|i| Request {
            prompt: prompt(1 + (i as usize * 7) % 50, i, v),
            max_new_tokens: 1 + (i as usize * 5) % 13,
            settings: None,
            adapter: None,
        })
        .collect();
    let mut cfg = greedy(&model);
    cfg.eos_token_ids = vec![model.config.eos_ids()[0], 17, 99];
    let schedules = [
        Schedule::default(),
        Schedule {
            max_num_seqs: Some(1),
            static_batches: false,
        },
        Schedule {
            max_num_seqs: Some(3),
            static_batches: false,
        },
        Schedule {
            max_num_seqs: Some(7),
            static_batches: true,
        },
    ];
    let first = run(&model, reqs.clone(), &cfg, schedules[0]);
    assert_each_as_alone(&model, &reqs, &cfg, &first);
    for s in &schedules[1..] {
        let o = run(&model, reqs.clone(), &cfg, *s);
        assert_eq!(o.sequences, first.sequences, "{s:?}");
    }
}

/// With one slot, every step runs one sequence: the steps are the sum of the tokens.
#[test]
fn one_slot_steps_count_every_token() {
    let model = fused("hub-tied");
    let v = model.config.vocab_size;
    let reqs: Vec<Request> = (0..5u64)
        .map(|i| Request {
            prompt: prompt(3 + i as usize, i, v),
            max_new_tokens: 2 + i as usize,
            settings: None,
            adapter: None,
        })
        .collect();
    let mut cfg = greedy(&model);
    cfg.eos_token_ids.clear();
    let o = run(
        &model,
        reqs.clone(),
        &cfg,
        Schedule {
            max_num_seqs: Some(1),
            static_batches: false,
        },
    );
    let tokens: usize = o.sequences.iter().flatten().map(|g| g.tokens.len()).sum();
    assert_eq!(tokens, (2..7).sum::<usize>());
    assert_eq!(o.steps, tokens);
    // All at once: as many steps as the longest.
    let o = run(&model, reqs, &cfg, Schedule::default());
    assert_eq!(o.steps, 6);
}

/// `max_num_seqs: Some(0)` (the CLI refuses it, the library takes it) and a bound below
/// the beams both still decode: at least one unit is admitted.
#[test]
fn zero_or_too_small_max_num_seqs_still_decodes() {
    let model = fused("hub-tied");
    let v = model.config.vocab_size;
    let reqs: Vec<Request> = (0..3u64)
        .map(|i| Request {
            prompt: prompt(4, i, v),
            max_new_tokens: 5,
            settings: None,
            adapter: None,
        })
        .collect();
    let cfg = greedy(&model);
    let all = run(&model, reqs.clone(), &cfg, Schedule::default());
    let zero = Schedule {
        max_num_seqs: Some(0),
        static_batches: false,
    };
    assert_eq!(
        run(&model, reqs.clone(), &cfg, zero).sequences,
        all.sequences
    );
    let static_zero = Schedule {
        max_num_seqs: Some(0),
        static_batches: true,
    };
    assert_eq!(
        run(&model, reqs.clone(), &cfg, static_zero).sequences,
        all.sequences
    );

    let beams = GenerationConfig {
        num_beams: 4,
        num_return_sequences: 2,
        ..cfg
    };
    let all = run(&model, reqs.clone(), &beams, Schedule::default());
    for m in [0, 1, 3, 5] {
        let s = Schedule {
            max_num_seqs: Some(m),
            static_batches: false,
        };
        assert_eq!(
            run(&model, reqs.clone(), &beams, s).sequences,
            all.sequences,
            "{m}"
        );
    }
}

fn input_error(r: infer::Result<Output>) -> String {
    match r {
        Err(infer::Error::Input(msg)) => msg,
        Err(e) => panic!("expected an input error, got {e}"),
        Ok(_) => panic!("expected an input error, got output"),
    }
}

/// Degenerate requests are refused with a message naming the request, never a panic.
#[test]
fn degenerate_requests_are_refused_by_name() {
    let model = fused("hub-tied");
    let v = model.config.vocab_size;
    let cfg = greedy(&model);
    let s = Schedule::default();
    let ok = Request {
        prompt: prompt(3, 1, v),
        max_new_tokens: 2,
        settings: None,
        adapter: None,
    };

    let msg = input_error(try_run(&model, vec![], &cfg, s));
    assert!(msg.contains("no prompt"), "{msg}");

    let empty = Request {
        prompt: vec![],
        max_new_tokens: 2,
        settings: None,
        adapter: None,
    };
    let msg = input_error(try_run(&model, vec![ok.clone(), empty], &cfg, s));
    assert!(msg.contains("prompt 1") && msg.contains("empty"), "{msg}");

    for bad in [v, -1, i64::MAX] {
        let oov = Request {
            prompt: vec![5, bad],
            max_new_tokens: 2,
            settings: None,
            adapter: None,
        };
        let r = try_run(&model, vec![ok.clone(), oov], &cfg, s);
        assert!(r.is_err(), "token {bad} accepted");
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains(&bad.to_string()), "{msg}");
    }

    for (limit, needle) in [
        (0, "at least 1"),
        (usize::MAX, "n_positions"),
        (62, "n_positions"),
    ] {
        let r = Request {
            prompt: prompt(3, 2, v),
            max_new_tokens: limit,
            settings: None,
            adapter: None,
        };
        let msg = input_error(try_run(&model, vec![ok.clone(), r], &cfg, s));
        assert!(
            msg.contains("prompt 1") && msg.contains(needle),
            "{limit}: {msg}"
        );
    }
}

/// A request's own limit replaces the settings' (`max_new_tokens`, `max_length`): a
/// prompt that fits the context with its own limit is decoded, whatever the settings'
/// limit would have needed.
#[test]
fn request_limit_replaces_the_settings_limit() {
    let model = fused("hub-tied");
    let v = model.config.vocab_size;
    let n = model.config.n_positions as usize;
    let cfg = GenerationConfig {
        max_new_tokens: 20,
        ..greedy(&model)
    };
    // n - 3 tokens + 3 fit the context; + the settings' 20 would not.
    let long = Request {
        prompt: prompt(n - 3, 7, v),
        max_new_tokens: 3,
        settings: None,
        adapter: None,
    };
    let out = try_run(&model, vec![long], &cfg, Schedule::default());
    assert!(out.is_ok(), "{}", out.unwrap_err());
    // max_length 10 would leave a 12-token prompt nothing; its own limit is 3.
    let cfg = GenerationConfig {
        max_length: Some(10),
        ..greedy(&model)
    };
    let req = Request {
        prompt: prompt(12, 8, v),
        max_new_tokens: 3,
        settings: None,
        adapter: None,
    };
    let out = try_run(&model, vec![req], &cfg, Schedule::default());
    assert!(out.is_ok(), "{}", out.unwrap_err());
}

/// Requests still waiting when the time limit passes are not started (no prefill, no
/// token): each is returned empty with finish_reason `time`, and the run takes the one
/// step during which the time passed. A 1 ns limit has always passed by the first step.
#[test]
fn max_time_does_not_start_queued_requests() {
    let model = fused("hub-tied");
    let v = model.config.vocab_size;
    let reqs: Vec<Request> = (0..6u64)
        .map(|i| Request {
            prompt: prompt(4, i, v),
            max_new_tokens: 10,
            settings: None,
            adapter: None,
        })
        .collect();
    let cfg = GenerationConfig {
        max_time: Some(Duration::from_nanos(1)),
        ..greedy(&model)
    };
    let s = Schedule {
        max_num_seqs: Some(2),
        static_batches: false,
    };
    let o = run(&model, reqs, &cfg, s);
    assert_eq!(o.sequences.len(), 6, "every request is reported");
    for (i, seqs) in o.sequences.iter().enumerate() {
        assert_eq!(seqs.len(), 1, "request {i}");
        assert_eq!(seqs[0].finish_reason, FinishReason::Time, "request {i}");
        let want = if i < 2 { 1 } else { 0 };
        assert_eq!(
            seqs[0].tokens.len(),
            want,
            "request {i}: {:?}",
            seqs[0].tokens
        );
    }
    assert_eq!(o.steps, 1);
}

/// What the engine does today when time runs out with a queue: every request is still
/// reported (none dropped), each with finish_reason `time`.
#[test]
fn max_time_reports_every_queued_request() {
    let model = fused("hub-tied");
    let v = model.config.vocab_size;
    let reqs: Vec<Request> = (0..6u64)
        .map(|i| Request {
            prompt: prompt(4, i, v),
            max_new_tokens: 10,
            settings: None,
            adapter: None,
        })
        .collect();
    let cfg = GenerationConfig {
        max_time: Some(Duration::from_nanos(1)),
        ..greedy(&model)
    };
    for s in [
        Schedule {
            max_num_seqs: Some(2),
            static_batches: false,
        },
        Schedule {
            max_num_seqs: Some(2),
            static_batches: true,
        },
    ] {
        let o = run(&model, reqs.clone(), &cfg, s);
        assert_eq!(o.sequences.len(), 6);
        for seqs in &o.sequences {
            assert_eq!(seqs.len(), 1);
            assert_eq!(seqs[0].finish_reason, FinishReason::Time);
            assert!(seqs[0].tokens.len() <= 1);
        }
    }
}

/// Beam sampling: prompt i's group draws from the generator seeded seed + i ×
/// num_return_sequences (its first output row, as README's `--seed` and
/// `generate`'s docs say), so prompt i alone with that seed gives its sequences.
#[test]
fn beam_sampling_group_seeded_from_its_first_row() {
    let model = fused("hub-tied");
    let v = model.config.vocab_size;
    let reqs: Vec<Request> = (0..3u64)
        .map(|i| Request {
            prompt: prompt(5, 50 + i, v),
            max_new_tokens: 6,
            settings: None,
            adapter: None,
        })
        .collect();
    let mut cfg = GenerationConfig {
        num_beams: 3,
        num_return_sequences: 2,
        seed: Some(5),
        ..greedy(&model)
    };
    cfg.processing.do_sample = true;
    cfg.processing.top_k = 20;
    let together = run(&model, reqs.clone(), &cfg, Schedule::default());
    for (i, r) in reqs.iter().enumerate() {
        let alone_cfg = GenerationConfig {
            seed: Some(5 + (i * cfg.num_return_sequences) as u64),
            ..cfg.clone()
        };
        let alone = run(&model, vec![r.clone()], &alone_cfg, Schedule::default());
        assert_eq!(together.sequences[i], alone.sequences[0], "prompt {i}");
    }
}

/// Seeded sampling, several sequences a prompt, through one slot: sequence k (prompt i's
/// j-th, k = i × n + j) is its lone run seeded seed + k.
#[test]
fn seeded_samples_through_one_slot_as_alone() {
    let model = fused("prefixed-untied");
    let v = model.config.vocab_size;
    let reqs: Vec<Request> = (0..4u64)
        .map(|i| Request {
            prompt: prompt(2 + 3 * i as usize, 70 + i, v),
            max_new_tokens: 3 + i as usize,
            settings: None,
            adapter: None,
        })
        .collect();
    let mut cfg = GenerationConfig {
        num_return_sequences: 3,
        seed: Some(5),
        ..greedy(&model)
    };
    cfg.processing.do_sample = true;
    let s = Schedule {
        max_num_seqs: Some(1),
        static_batches: false,
    };
    let together = run(&model, reqs.clone(), &cfg, s);
    for (i, r) in reqs.iter().enumerate() {
        for j in 0..3 {
            let alone_cfg = GenerationConfig {
                num_return_sequences: 1,
                seed: Some(5 + (i * 3 + j) as u64),
                ..cfg.clone()
            };
            let alone = run(&model, vec![r.clone()], &alone_cfg, Schedule::default());
            assert_eq!(
                together.sequences[i][j], alone.sequences[0][0],
                "prompt {i}, seq {j}"
            );
        }
    }
}
