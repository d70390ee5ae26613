//! `gpt2kit serve --adapter NAME=DIR ...`: several LoRA adapters (made by peft, through
//! GPT2KIT_PYTHON) on one served base, chosen per request by `model`. Requests to each
//! adapter and to the base, all in flight together, get exactly `infer --adapter`'s
//! greedy tokens for theirs; the prefix cache never lends one adapter's keys and values
//! to another; an unknown name gets OpenAI's 404.
mod common;
mod serving;

use std::path::Path;
use std::process::Command;

use common::{assert_clean_failure, gpt2kit, python, reference, stderr, stdout, TempDir};
use serde_json::{json, Value};
use serving::*;

/// A peft adapter (r, alpha, targets) with B drawn non-zero (tests/reference/lora_reference.py).
fn peft_make(base: &Path, out: &Path, r: &str, alpha: &str, targets: &str, seed: &str) {
    let o = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/reference/lora_reference.py"
        ))
        .args(["make", "--base", base.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap(), "--r", r, "--alpha", alpha])
        .args(["--targets", targets, "--seed", seed])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `infer`'s greedy text and per-token log-probabilities for `prompt` (token ids), with
/// `adapter` if given.
fn infer_greedy(model: &Path, adapter: Option<&Path>, prompt: &str, n: usize) -> (String, Value) {
    let n = n.to_string();
    let mut args = vec!["infer", "--model", model.to_str().unwrap()];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    args.extend(["--prompt", prompt, "--max-new-tokens", &n, "--json"]);
    let o = gpt2kit(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    let text = v["text"].as_str().unwrap();
    (text.to_string(), v["logprobs"].clone())
}

/// Equal texts, and log-probabilities equal within 1e-5 at every step: the same tokens
/// (the model is random, so its texts are mostly U+FFFD; the log-probabilities tell its
/// tokens apart). 1e-5: both print f32 values of the same computation; only their JSON
/// round trip (f32 → f64 → text) may differ.
fn assert_same(got: &Value, want: &(String, Value), what: &str) {
    let choice = &got["choices"][0];
    assert_eq!(choice["text"], want.0.as_str(), "{what}: text");
    let lp = choice["logprobs"]["token_logprobs"].as_array().unwrap();
    let want_lp = want.1.as_array().unwrap();
    assert_eq!(lp.len(), want_lp.len(), "{what}: tokens");
    for (i, (a, b)) in lp.iter().zip(want_lp).enumerate() {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!(
            (a - b).abs() < 1e-5,
            "{what}: token {i}: logprob {a} vs {b}"
        );
    }
}

#[test]
fn two_adapters_and_the_base_answer_together_each_with_its_own_tokens() {
    let t = TempDir::new("serve-adapters");
    let base = reference("hub-tied");
    let (one, two) = (t.path("one"), t.path("two"));
    peft_make(&base, &one, "4", "8", "c_attn,attn.c_proj,mlp.c_fc", "3");
    peft_make(&base, &two, "8", "16", "c_attn,c_proj,c_fc", "5");
    let long = "the model reads a long prompt, and more";
    let prompts = ["Hello", "the model reads", long];
    let n = 16;
    let names: [(&str, Option<&Path>); 3] =
        [("tiny", None), ("one", Some(&one)), ("two", Some(&two))];
    let want: Vec<Vec<(String, Value)>> = names
        .iter()
        .map(|(_, a)| {
            prompts
                .iter()
                .map(|p| infer_greedy(&base, *a, p, n))
                .collect()
        })
        .collect();
    // Each adapter changes the answers, and not as the other does: the test can fail.
    for (i, p) in prompts.iter().enumerate() {
        assert_ne!(want[0][i].1, want[1][i].1, "adapter one on {p:?}");
        assert_ne!(want[0][i].1, want[2][i].1, "adapter two on {p:?}");
        assert_ne!(want[1][i].1, want[2][i].1, "the adapters on {p:?}");
    }

    let args = [
        "--served-model-name",
        "tiny",
        "--adapter",
        &format!("one={}", one.display()),
        "--adapter",
        &format!("two={}", two.display()),
        "--prefix-cache-mb",
        "8",
    ];
    let server = Server::start(&base, &args, &[]);
    let models = server.get("/v1/models").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "one", "two"]);
    assert_eq!(models["data"][1]["parent"], "tiny");
    assert_eq!(models["data"][2]["root"], two.display().to_string());

    let body = |model: &str, prompt: &str| {
        json!({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
               "logprobs": 0})
    };
    // The long prompt under the base first, alone: its keys and values are cached, and
    // the adapters' requests for the same tokens must not take them.
    let (status, first) = Conn::open(&server.addr).post("/v1/completions", &body("tiny", long));
    assert_eq!(status, 200, "{first}");
    assert_same(&first, &want[0][2], "tiny, the long prompt alone");

    // Every other (model, prompt) at once, each on its own connection.
    let jobs: Vec<(usize, usize)> = (0..3)
        .flat_map(|m| (0..3).map(move |p| (m, p)))
        .filter(|&(m, p)| (m, p) != (0, 2))
        .collect();
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|&(m, p)| {
                let (addr, b) = (server.addr.clone(), body(names[m].0, prompts[p]));
                s.spawn(move || Conn::open(&addr).post("/v1/completions", &b))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (&(m, p), (status, answer)) in jobs.iter().zip(&answers) {
        let what = format!("{} on {:?}", names[m].0, prompts[p]);
        assert_eq!(*status, 200, "{what}: {answer}");
        assert_eq!(answer["model"], names[m].0, "{what}");
        assert_same(answer, &want[m][p], &what);
    }
    assert_eq!(
        server.metric("prefix_cache_hits_total"),
        0.0,
        "no request shared its adapter and prompt with an earlier one"
    );

    // An unknown name: OpenAI's 404, naming the field; the server answers on.
    let r = server.post("/v1/completions", &body("three", "Hello"));
    assert_eq!(r.status, 404, "{}", r.body);
    let e = &r.json()["error"];
    assert_eq!(e["param"], "model");
    assert!(e["type"].is_string() && e["message"].as_str().unwrap().contains("`three`"));
    assert!(e["message"].as_str().unwrap().contains("`one`"), "{e}");
    let r = server.post("/tokenize", &json!({"model": "two", "prompt": "Hello"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = server.post("/v1/completions", &body("one", "Hello"));
    assert_same(&r.json(), &want[1][0], "one after the 404");
}

#[test]
fn bad_adapter_flags_are_refused_by_name() {
    let t = TempDir::new("serve-adapters-bad");
    let base = reference("hub-tied");
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--model", base.to_str().unwrap(), "--port", "0"];
        args.extend(extra);
        gpt2kit(&args)
    };
    assert_clean_failure(&serve(&["--adapter", "nodir"]), 2, "NAME=DIR");
    let missing = t.path("missing");
    let flag = format!("one={}", missing.display());
    assert_clean_failure(&serve(&["--adapter", &flag]), 2, "--adapter one=");
    let one = t.path("one");
    peft_make(&base, &one, "4", "8", "c_attn", "3");
    let flag = format!("x={}", one.display());
    let twice = serve(&["--adapter", &flag, "--adapter", &flag]);
    assert_clean_failure(&twice, 2, "`x` is already taken");
}
