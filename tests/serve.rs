//! `gpt2kit serve` end to end: completions plain and streamed against `infer`, stop strings,
//! logprobs, and many requests at once.
mod common;
mod serving;

use common::reference;
use serde_json::{json, Value};
use serving::*;

#[test]
fn completions_plain_streamed_and_equal_to_infer() {
    let model = reference("hub-tied");
    let server = Server::start(&model, &["--served-model-name", "tiny"], &[]);
    assert_eq!(server.get("/health").status, 200);
    let models = server.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], "tiny");

    let want = infer_text(&model, "Hello", 12);
    let r = server.post("/v1/completions", &greedy(json!("Hello"), 12));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "tiny");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );

    // The same prompt as token ids (from /tokenize) gives the same text; /detokenize
    // gives the prompt back.
    let ids = server.post("/tokenize", &json!({"prompt": "Hello"})).json()["tokens"].clone();
    let back = server.post("/detokenize", &json!({"tokens": ids})).json();
    assert_eq!(back["prompt"], "Hello");
    let by_ids = server
        .post("/v1/completions", &greedy(ids.clone(), 12))
        .json();
    assert_eq!(by_ids["choices"][0]["text"], want.as_str());

    // Streamed: the pieces add up to the same text, the last choice chunk says why it
    // ended, the usage chunk comes last, then [DONE].
    let mut body = greedy(json!("Hello"), 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = server.post("/v1/completions", &body);
    assert_eq!(r.status, 200);
    assert!(r.head.contains("text/event-stream"), "{}", r.head);
    let chunks = r.chunks();
    let (last, pieces) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], v["usage"]);
    let text: String = pieces
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, want);
    let finish = &pieces.last().unwrap()["choices"][0]["finish_reason"];
    assert_eq!(finish, &v["choices"][0]["finish_reason"]);

    // Two prompts, n = 2, seeded: four choices in prompt-major order; the same seed
    // gives the same texts again.
    let body = json!({"prompt": ["Hello", "The"], "n": 2, "max_tokens": 8, "seed": 3});
    let a = server.post("/v1/completions", &body).json();
    let b = server.post("/v1/completions", &body).json();
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                assert_eq!(c["index"], i);
                c["text"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert_eq!(texts(&a).len(), 4);
    assert_eq!(texts(&a), texts(&b));
    assert!(server.metric("generation_tokens_total") > 0.0);
    assert_eq!(server.metric("num_requests_running"), 0.0);
}

#[test]
fn stop_strings_end_the_text_before_them() {
    let model = reference("hub-tied");
    let server = Server::start(&model, &[], &[]);
    let full = server
        .post("/v1/completions", &greedy(json!("Hello"), 30))
        .json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    // A stop string from the middle of the greedy text: the answer is the text before
    // its first occurrence.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 8, "greedy text too short to cut: {full:?}");
    let stop: String = chars[4..6].iter().collect();
    let want = &full[..full.find(&stop).unwrap()];
    let mut body = greedy(json!("Hello"), 30);
    body["stop"] = json!(["never in this text \u{1F600}", stop]);
    let v = server.post("/v1/completions", &body).json();
    assert_eq!(v["choices"][0]["text"], want, "stop {stop:?} in {full:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let r = server.post("/v1/completions", &body);
    let text: String = r
        .events()
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text, want);
}

/// A choice's logprobs checked for shape and internal consistency: one entry per token,
/// each value ≤ 0, the chosen token's value among its top ones; returns
/// (tokens, token_logprobs, top_logprobs sorted most likely first).
fn check_logprobs(choice: &Value, top: usize) -> (Vec<String>, Vec<f64>, Vec<Vec<(String, f64)>>) {
    let lp = &choice["logprobs"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("not a list: {v}"))
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    let tokens = strings(&lp["tokens"]);
    let values: Vec<f64> = lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let tops: Vec<Vec<(String, f64)>> = lp["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let mut v: Vec<(String, f64)> = m
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, x)| (k.clone(), x.as_f64().unwrap()))
                .collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            v
        })
        .collect();
    let offsets = lp["text_offset"].as_array().unwrap();
    assert!(!tokens.is_empty());
    assert_eq!(values.len(), tokens.len());
    assert_eq!(tops.len(), tokens.len());
    assert_eq!(offsets.len(), tokens.len());
    assert!(offsets.windows(2).all(|w| w[0].as_u64() <= w[1].as_u64()));
    // Each whole token's text stands at its offset in the choice's text (in characters),
    // where the text holds all of it (a stop string may cut the text short).
    let text: Vec<char> = choice["text"].as_str().unwrap().chars().collect();
    for (t, o) in tokens.iter().zip(offsets) {
        let (o, t): (usize, Vec<char>) = (o.as_u64().unwrap() as usize, t.chars().collect());
        if !t.starts_with(&['b', 'y', 't', 'e', 's', ':']) && o + t.len() <= text.len() {
            assert_eq!(
                text[o..o + t.len()],
                t[..],
                "token {t:?} at {o} of {text:?}"
            );
        }
    }
    for ((t, &v), top_i) in tokens.iter().zip(&values).zip(&tops) {
        assert!(v <= 0.0, "{v}");
        // The top n (distinct texts may be fewer) plus the chosen token when outside them.
        assert!(top_i.len() <= top + 1 && !top_i.is_empty(), "{top_i:?}");
        assert!(
            top_i.iter().any(|(k, x)| k == t && *x == v),
            "{t:?} {v} {top_i:?}"
        );
    }
    (tokens, values, tops)
}

#[test]
fn logprobs_are_the_models_own_plain_and_streamed() {
    let model = reference("hub-tied");
    let server = Server::start(&model, &[], &[]);
    let mut body = greedy(json!("Hello"), 10);
    body["logprobs"] = json!(3);
    let r = server.post("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let plain_text = infer_text(&model, "Hello", 10);
    assert_eq!(v["choices"][0]["text"], plain_text.as_str());
    let (tokens, values, tops) = check_logprobs(&v["choices"][0], 3);
    assert_eq!(v["choices"][0]["logprobs"]["text_offset"][0], 0);
    // Greedy: each chosen token is the most likely one.
    for (i, top) in tops.iter().enumerate() {
        assert_eq!(top[0].1, values[i], "token {i}: {top:?}");
        assert_eq!(top.len(), 3, "{top:?}");
    }
    // The same request again: the same values.
    let again = server.post("/v1/completions", &body).json();
    assert_eq!(again["choices"][0]["logprobs"], v["choices"][0]["logprobs"]);
    // Raw log-probabilities: a sampled request with temperature and top_k sees the same
    // values for the tokens both chose (its first token's distribution is the same).
    let mut sampled = body.clone();
    sampled["temperature"] = json!(0.5);
    sampled["top_k"] = json!(2);
    sampled["seed"] = json!(1);
    let s = server.post("/v1/completions", &sampled).json();
    let (s_tokens, s_values, s_tops) = check_logprobs(&s["choices"][0], 3);
    assert_eq!(s_tops[0], tops[0]);
    let common = tokens
        .iter()
        .zip(&s_tokens)
        .take_while(|(a, b)| a == b)
        .count();
    assert_eq!(s_values[..common], values[..common]);
    // logprobs 0: each token's own value only.
    body["logprobs"] = json!(0);
    let zero = server.post("/v1/completions", &body).json();
    let (_, zero_values, zero_tops) = check_logprobs(&zero["choices"][0], 0);
    assert_eq!(zero_values, values);
    assert!(zero_tops.iter().all(|t| t.len() == 1));
    // Streamed: each chunk carries its own tokens' log-probabilities as it goes out, and
    // the chunks add up to the plain answer's (offsets included).
    body["logprobs"] = json!(3);
    body["stream"] = json!(true);
    let plain_offsets = &v["choices"][0]["logprobs"]["text_offset"];
    let (text, chunks) = streamed_logprobs(&server, &body);
    assert_eq!(text, plain_text);
    let joined = |k: &str| -> Vec<Value> {
        chunks
            .iter()
            .flat_map(|lp| lp[k].as_array().unwrap().clone())
            .collect()
    };
    let s_values: Vec<f64> = joined("token_logprobs")
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let s_tokens: Vec<Value> = joined("tokens");
    assert_eq!(
        s_tokens,
        v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .clone()
    );
    assert_eq!(s_values, values);
    assert_eq!(Value::Array(joined("text_offset")), *plain_offsets);
    // Not all at the end: one chunk per token whose text went out at once.
    assert!(
        chunks.len() * 2 > tokens.len(),
        "{} chunks with log-probabilities for {} tokens",
        chunks.len(),
        tokens.len()
    );
    // With a stop string the tokens run up to the one that completes it.
    let chars: Vec<char> = plain_text.chars().collect();
    assert!(
        chars.len() >= 8,
        "greedy text too short to cut: {plain_text:?}"
    );
    let stop: String = chars[4..6].iter().collect();
    let mut body = greedy(json!("Hello"), 10);
    body["logprobs"] = json!(1);
    body["stop"] = json!(stop);
    let v = server.post("/v1/completions", &body).json();
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["text"], &plain_text[..plain_text.find(&stop).unwrap()]);
    let (_, cut, _) = check_logprobs(c, 1);
    assert!(cut.len() < values.len(), "{}", c["logprobs"]);
    assert_eq!(cut, values[..cut.len()]);
    // Streamed with the stop string: the text held back while it could begin the stop
    // string goes out later with its tokens; the same tokens and values in the end.
    body["stream"] = json!(true);
    let (text, chunks) = streamed_logprobs(&server, &body);
    assert_eq!(text, c["text"].as_str().unwrap());
    let streamed: Vec<f64> = chunks
        .iter()
        .flat_map(|lp| lp["token_logprobs"].as_array().unwrap().clone())
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(streamed, cut);
}

/// A streamed request's text and the `logprobs` of each chunk that has them.
fn streamed_logprobs(server: &Server, body: &Value) -> (String, Vec<Value>) {
    let r = server.post("/v1/completions", body);
    assert_eq!(r.status, 200, "{}", r.body);
    let (mut text, mut chunks) = (String::new(), Vec::new());
    for e in r.events().iter().filter(|e| *e != "[DONE]") {
        let c = &serde_json::from_str::<Value>(e).unwrap()["choices"][0];
        text.push_str(c["text"].as_str().unwrap());
        if !c["logprobs"].is_null() {
            check_logprobs(c, body["logprobs"].as_u64().unwrap() as usize);
            chunks.push(c["logprobs"].clone());
        }
    }
    (text, chunks)
}

/// A copy of the reference model whose tokenizer_config.json has a chat template.

/// 64 requests with mixed settings and lengths, sent at once over 16 keep-alive connections
/// (4 each, one after another) while the engine runs at most 8 sequences: every request gets
/// one complete answer, and it is the answer the same request gets alone (greedy ones) or
/// repeated (seeded ones: each sequence draws from its own generator).
#[test]
fn sixty_four_requests_from_sixteen_connections_answer_as_alone() {
    sixty_four_requests(&[]);
}

/// The same through the fixed-shape decode step CUDA graphs capture (uncaptured here):
/// rows joining and leaving its every-row step answer as alone, the same text and
/// tokens; log-probabilities within 1e-4, since the step attends over a width that
/// follows the longest row in the batch (64, 128, ... slots), and another width is
/// another split of libtorch's attention kernel (the same sum in another order).
#[test]
fn sixty_four_requests_answer_as_alone_on_the_fixed_shape_step() {
    sixty_four_requests(&["--cuda-graphs", "on"]);
}

/// `a` and `b` equal, numbers within `tol` of each other.
fn same_within(a: &Value, b: &Value, tol: f64) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= tol
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_within(p, q, tol))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_within(v, w, tol)))
        }
        _ => a == b,
    }
}

fn sixty_four_requests(extra: &[&str]) {
    let model = reference("hub-tied");
    let mut flags = vec!["--max-num-seqs", "8"];
    flags.extend(extra);
    let server = Server::start(&model, &flags, &[]);
    let bodies: Vec<Value> = (0..64)
        .map(|i| match i % 4 {
            0 => greedy(json!(format!("Hello {i}")), 2 + i % 13),
            1 => json!({"prompt": "The", "max_tokens": 3 + i % 11, "seed": i, "top_k": 20,
                        "presence_penalty": 0.5, "repetition_penalty": 1.2}),
            2 => json!({"prompt": [5, 6, 7], "max_tokens": 4, "n": 2, "seed": i, "min_p": 0.05}),
            _ => json!({"prompt": ["A", "B b"], "max_tokens": 1 + i % 9, "temperature": 0,
                        "logprobs": 1, "stop": ["e"]}),
        })
        .collect();
    let mut one = Conn::open(&server.addr);
    let alone: Vec<Value> = bodies
        .iter()
        .map(|b| one.post("/v1/completions", b).1["choices"].clone())
        .collect();
    let addr = server.addr.clone();
    let together: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|c| {
                let (addr, bodies) = (addr.clone(), &bodies);
                s.spawn(move || {
                    let mut conn = Conn::open(&addr);
                    (0..4)
                        .map(|k| conn.post("/v1/completions", &bodies[c * 4 + k]))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(together.len(), 64);
    for (i, ((status, answer), b)) in together.iter().zip(&bodies).enumerate() {
        assert_eq!(*status, 200, "request {i}: {answer}");
        let choices = answer["choices"].as_array().unwrap();
        let want = b["n"].as_u64().unwrap_or(1) as usize
            * b["prompt"]
                .as_array()
                .map_or(1, |p| if p[0].is_string() { p.len() } else { 1 });
        assert_eq!(choices.len(), want, "request {i}: {answer}");
        assert!(
            choices.iter().all(|c| c["finish_reason"].is_string()),
            "request {i}: {answer}"
        );
        match extra.is_empty() {
            // The fused decode step computes each row the same beside any others.
            true => assert_eq!(answer["choices"], alone[i], "request {i}: {b}"),
            false => assert!(
                same_within(&answer["choices"], &alone[i], 1e-4),
                "request {i}: {b}: {} against {} alone",
                answer["choices"],
                alone[i]
            ),
        }
    }
    assert_eq!(server.metric("num_requests_running"), 0.0);
    assert_eq!(server.metric("num_requests_waiting"), 0.0);
}

/// With `--prefix-cache-mb`, a prompt sharing a prefix with an earlier one prefills only
/// the rest: /metrics counts the reused tokens, and the answers are those of a server
/// without the cache (greedy and seeded; each prompt's rest is prefilled on its own, and
/// this model's choices are not near-ties, so rounding differences do not show).
#[test]
fn prefix_cache_reuses_a_shared_prefix_and_answers_the_same() {
    let model = reference("hub-tied");
    let cached = Server::start(&model, &["--prefix-cache-mb", "16"], &[]);
    let plain = Server::start(&model, &[], &[]);
    let preamble: Vec<i64> = (0..40).map(|i| (i * 37 + 11) % 250 + 3).collect();
    let with = |tail: &[i64]| {
        let mut p = preamble.clone();
        p.extend_from_slice(tail);
        json!(p)
    };
    let bodies = [
        greedy(with(&[7, 8, 9]), 6),
        greedy(with(&[60, 61]), 6),
        json!({"prompt": with(&[5]), "max_tokens": 6, "seed": 3, "top_k": 10}),
        greedy(with(&[7, 8, 9]), 6),
    ];
    for (i, b) in bodies.iter().enumerate() {
        let want = plain.post("/v1/completions", b).json()["choices"].clone();
        let got = cached.post("/v1/completions", b).json()["choices"].clone();
        assert_eq!(got, want, "request {i}");
    }
    // Request 1 and 2 reuse the 40-token preamble; request 3 all but the last token of
    // request 0's 43 (the last is fed to get the first new token's logits).
    assert_eq!(
        cached.metric("prefix_cache_hits_total"),
        (40 + 40 + 42) as f64
    );
    assert_eq!(
        cached.metric("prefix_cache_queries_total"),
        (43 + 42 + 41 + 43) as f64
    );
    assert!(cached.metric("prefix_cache_bytes") > 0.0);
    assert_eq!(plain.metric("prefix_cache_hits_total"), 0.0);
}

/// `--tp 2 --devices cpu,cpu` serves the model split in two (exact on the CPU, as `infer
/// --tp` is): the greedy answers are `infer`'s; a `--tp` that disagrees with `--devices`
/// is refused before anything listens.
#[test]
fn tensor_parallel_serving_answers_as_infer() {
    let model = reference("hub-tied");
    let server = Server::start(&model, &["--tp", "2", "--devices", "cpu,cpu"], &[]);
    for prompt in ["Hello", "The quick brown"] {
        let r = server
            .post("/v1/completions", &greedy(json!(prompt), 8))
            .json();
        assert_eq!(
            r["choices"][0]["text"].as_str().unwrap(),
            infer_text(&model, prompt, 8),
            "{prompt:?}"
        );
    }
    let o = common::gpt2kit(&[
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--port",
        "0",
        "--tp",
        "3",
        "--devices",
        "cpu,cpu",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("--tp 3 needs 3 --devices"),
        "{}",
        common::stderr(&o)
    );
}
