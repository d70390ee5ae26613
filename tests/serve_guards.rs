//! `gpt2kit serve` under hostile clients: the API key, bad inputs, a full queue, disconnects
//! and SIGTERM.
mod common;
mod serving;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::{gpt2kit, reference};
use serde_json::{json, Value};
use serving::*;

#[test]
fn api_key_guards_every_endpoint_but_health() {
    let model = reference("hub-tied");
    let server = Server::start(&model, &[], &[("GPT2KIT_API_KEY", "s3cret")]);
    assert_eq!(server.get("/health").status, 200);
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cre"),
        Some("s3cret"),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let r = server.call("GET", "/v1/models", &headers, b"");
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.json()["error"]["type"], "authentication_error");
        let body = greedy(json!("Hi"), 2).to_string();
        let r = server.call("POST", "/v1/completions", &headers, body.as_bytes());
        assert_eq!(r.status, 401, "{auth:?}");
    }
    let ok = [("Authorization", "Bearer s3cret")];
    assert_eq!(server.call("GET", "/v1/models", &ok, b"").status, 200);
    let body = greedy(json!("Hi"), 2).to_string();
    assert_eq!(
        server
            .call("POST", "/v1/completions", &ok, body.as_bytes())
            .status,
        200
    );
}

#[test]
fn bad_inputs_get_4xx_naming_the_field_and_the_server_goes_on() {
    let model = reference("hub-tied");
    let server = Server::start(&model, &[], &[]);
    let long: Vec<i64> = vec![1; 70];
    // (body, status, text the message must hold, param)
    let cases: Vec<(Vec<u8>, u16, &str, Value)> = vec![
        (
            b"{\"prompt\": ".to_vec(),
            400,
            "not valid JSON",
            Value::Null,
        ),
        (b"[1, 2]".to_vec(), 400, "JSON object", Value::Null),
        (
            b"{\"prompt\": \"a\xff\"}".to_vec(),
            400,
            "not valid JSON",
            Value::Null,
        ),
        (
            json!({"prompt": "a", "frobnicate": 1})
                .to_string()
                .into_bytes(),
            400,
            "frobnicate",
            json!("frobnicate"),
        ),
        (
            json!({"prompt": "a", "temperature": "hot"})
                .to_string()
                .into_bytes(),
            400,
            "a number",
            json!("temperature"),
        ),
        (
            json!({"prompt": "a", "temperature": -1})
                .to_string()
                .into_bytes(),
            400,
            "≥ 0",
            json!("temperature"),
        ),
        (
            json!({"prompt": "a", "top_p": 1.5})
                .to_string()
                .into_bytes(),
            400,
            "(0, 1]",
            json!("top_p"),
        ),
        (
            json!({"prompt": "a", "n": 0}).to_string().into_bytes(),
            400,
            "between",
            json!("n"),
        ),
        (
            json!({"prompt": "a", "n": 1000}).to_string().into_bytes(),
            400,
            "between",
            json!("n"),
        ),
        (
            json!({"prompt": "a", "max_tokens": 0})
                .to_string()
                .into_bytes(),
            400,
            "between",
            json!("max_tokens"),
        ),
        (
            json!({"prompt": "a", "max_tokens": 2.5})
                .to_string()
                .into_bytes(),
            400,
            "integer",
            json!("max_tokens"),
        ),
        (
            json!({"prompt": "a", "max_tokens": 64})
                .to_string()
                .into_bytes(),
            400,
            "maximum context length is 64",
            json!("max_tokens"),
        ),
        (
            json!({"prompt": long}).to_string().into_bytes(),
            400,
            "the prompt has 70",
            json!("prompt"),
        ),
        (
            json!({"prompt": ""}).to_string().into_bytes(),
            400,
            "empty",
            json!("prompt"),
        ),
        (
            json!({"prompt": []}).to_string().into_bytes(),
            400,
            "empty",
            json!("prompt"),
        ),
        (
            json!({"prompt": [[1, 2], []]}).to_string().into_bytes(),
            400,
            "empty",
            json!("prompt"),
        ),
        (
            json!({"prompt": [1, 100000]}).to_string().into_bytes(),
            400,
            "100000",
            json!("prompt"),
        ),
        (
            json!({"max_tokens": 3}).to_string().into_bytes(),
            400,
            "required",
            json!("prompt"),
        ),
        (
            json!({"prompt": "a", "logprobs": 21})
                .to_string()
                .into_bytes(),
            400,
            "between 0 and 20",
            json!("logprobs"),
        ),
        (
            json!({"prompt": "a", "logprobs": 2, "echo": true})
                .to_string()
                .into_bytes(),
            400,
            "`echo` with `logprobs`",
            json!("logprobs"),
        ),
        // Found by a fuzz pass: settings that leave the scores non-finite are the
        // request's fault (400), not the server's.
        (
            json!({"prompt": "0", "repetition_penalty": 5e-324})
                .to_string()
                .into_bytes(),
            400,
            "settings left no token to pick",
            Value::Null,
        ),
        (
            json!({"prompt": "Hello", "temperature": 1e-300})
                .to_string()
                .into_bytes(),
            400,
            "settings left no token to pick",
            Value::Null,
        ),
        (
            json!({"prompt": "a", "logit_bias": {"9999": 1}})
                .to_string()
                .into_bytes(),
            400,
            "9999",
            json!("logit_bias"),
        ),
        (
            json!({"prompt": "a", "stop": [1]}).to_string().into_bytes(),
            400,
            "strings",
            json!("stop"),
        ),
        (
            json!({"prompt": "a", "stream_options": {"include_usage": true}})
                .to_string()
                .into_bytes(),
            400,
            "stream",
            json!("stream_options"),
        ),
        (
            json!({"prompt": "a", "model": "gpt-4"})
                .to_string()
                .into_bytes(),
            404,
            "gpt-4",
            json!("model"),
        ),
    ];
    for (body, status, needle, param) in cases {
        let r = server.call("POST", "/v1/completions", &[], &body);
        let shown = String::from_utf8_lossy(&body);
        assert_eq!(r.status, status, "{shown}: {}", r.body);
        let e = &r.json()["error"];
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{shown}: {msg:?} lacks {needle:?}");
        assert_eq!(e["param"], param, "{shown}");
        assert_eq!(e["code"], status, "{shown}");
    }
    // Too large: refused from its Content-Length, before the body is read.
    let mut s = server.connect();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 104857600\r\n\r\n"
    )
    .unwrap();
    let r = read_reply(s);
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(server.get("/nowhere").status, 404);
    let r = server.post("/tokenize", &json!({"text": "a"}));
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("text"))
    );
    // Every endpoint the OpenAPI description lists is served (an empty object as the
    // body of a POST: 400, never 404, 405 or 5xx).
    let doc = server.get("/openapi.json").json();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.contains_key("/v1/chat/completions"), "{doc}");
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let body: &[u8] = if method == "post" { b"{}" } else { b"" };
            let r = server.call(&method.to_uppercase(), path, &[], body);
            assert!(
                r.status < 500 && r.status != 404 && r.status != 405,
                "{method} {path}: {} {}",
                r.status,
                r.body
            );
        }
    }
    // Still answering.
    let r = server.post("/v1/completions", &greedy(json!("Hello"), 4));
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A model slow enough (6 × 512 wide, 512 positions) that a long request is still
/// running while the test sends others.

fn slow_model(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("small");
    let o = gpt2kit(&[
        "init",
        "--preset",
        "small",
        "--tokenizer",
        reference("hub-tied").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    out
}

#[test]
fn full_queue_503_disconnect_cancels_and_sigterm_drains() {
    let tmp = std::env::temp_dir().join(format!("gpt2kit-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let model = slow_model(&tmp);
    let server = Server::start(&model, &["--max-num-seqs", "1", "--max-queue", "1"], &[]);
    let long = json!({"prompt": "Hello", "max_tokens": 500, "temperature": 0, "ignore_eos": true, "stream": true});
    let body = long.to_string();
    // A occupies the only slot, B waits, C finds the queue full.
    let mut a = server.send("POST", "/v1/completions", &[], body.as_bytes());
    let _ = await_first_event(&mut a);
    let b_body = greedy(json!("Hi"), 4).to_string();
    let b = server.send("POST", "/v1/completions", &[], b_body.as_bytes());
    let b = std::thread::spawn(move || read_reply(b));
    while server.metric("num_requests_waiting") < 1.0 {
        assert_eq!(
            server.metric("num_requests_running"),
            1.0,
            "A ended before B queued"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let c = server.post("/v1/completions", &greedy(json!("Hi"), 4));
    assert_eq!(c.status, 503, "{}", c.body);
    assert!(
        c.head.to_ascii_lowercase().contains("retry-after: 1"),
        "{}",
        c.head
    );
    assert_eq!(server.metric("request_rejected_total"), 1.0);
    // A's client goes away: its sequence is cancelled, B gets its turn.
    drop(a);
    let b = b.join().unwrap();
    assert_eq!(b.status, 200, "{}", b.body);
    assert_eq!(server.metric("request_cancelled_total"), 1.0);

    // SIGTERM with D in flight: D still completes, then the server exits 0.
    let mut d = server.send(
        "POST",
        "/v1/completions",
        &[],
        body.replace("500", "300").as_bytes(),
    );
    let seen = await_first_event(&mut d);
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let d = read_rest(d, seen);
    let events = d.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A weight file truncated under the running server: every request from then on is an
/// error naming the file (never text from zeroed weights), `/health` says why with a 503,
/// and the server itself goes on answering. Both a mapped folder and a GGUF file.
#[test]
fn a_weight_file_truncated_under_the_server_fails_requests_and_health() {
    let tmp = common::TempDir::new("serve-truncated");
    let folder = tmp.path("hub-tied");
    common::copy_files(&reference("hub-tied"), &folder);
    let gguf = tmp.path("hub-tied-q4_0.gguf");
    common::assert_ok(&gpt2kit(&[
        "quantize",
        "--model",
        folder.to_str().unwrap(),
        "--out",
        gguf.to_str().unwrap(),
        "--method",
        "q4_0",
    ]));
    for (model, file) in [
        (folder.clone(), folder.join("model.safetensors")),
        (gguf.clone(), gguf.clone()),
    ] {
        let server = Server::start(&model, &[], &[]);
        let r = server.post("/v1/completions", &greedy(json!("Hello there"), 4));
        assert_eq!(r.status, 200, "{}", r.body);
        common::truncate_to_a_third(&file);
        let name = file.file_name().unwrap().to_str().unwrap();
        for _ in 0..2 {
            let r = server.post("/v1/completions", &greedy(json!("Hello there"), 4));
            assert_eq!(r.status, 500, "{}", r.body);
            let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(msg.contains(name) && msg.contains("trunc"), "{msg}");
        }
        let h = server.get("/health");
        assert_eq!(h.status, 503, "{}", h.body);
        assert!(h.json()["message"].as_str().unwrap().contains(name));
        assert_eq!(server.get("/v1/models").status, 200);
    }
    // A SIGBUS sent by `kill` (not a fault in a mapped file) still ends the process, as
    // SIGBUS's default action does.
    let mut server = Server::start(&reference("hub-tied"), &[], &[]);
    assert_eq!(server.get("/health").status, 200);
    // SAFETY: a plain kill(2) of the child's pid.
    assert_eq!(
        unsafe { libc::kill(server.child.id() as i32, libc::SIGBUS) },
        0
    );
    let status = server.child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
}

#[test]
fn kv_caches_take_the_memory_they_are_given() {
    let model = reference("hub-tied");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let dim = |k: &str| config[k].as_u64().unwrap() as f64;
    // One sequence's cache: f32 keys and values of every layer at every position, and
    // its mask (1 byte) and position (8 bytes) per position.
    let per_seq = dim("n_positions") * (2.0 * dim("n_layer") * dim("n_embd") * 4.0 + 9.0);
    let fit = (f64::from(1 << 20) / per_seq).floor();
    assert!((1.0..64.0).contains(&fit), "{fit}: pick another budget");
    let server = Server::start(
        &model,
        &["--kv-cache-memory-mb", "1", "--max-num-seqs", "64"],
        &[],
    );
    assert_eq!(server.metric("num_seqs_max"), fit);
    assert_eq!(server.metric("kv_cache_bytes"), fit * per_seq);
    let r = server.post("/v1/completions", &greedy(json!("Hi"), 2));
    assert_eq!(r.status, 200, "{}", r.body);
    drop(server);
    // Where memory holds them, as many as asked.
    let server = Server::start(&model, &["--max-num-seqs", "3"], &[]);
    assert_eq!(server.metric("num_seqs_max"), 3.0);
    drop(server);
    // Not even one: refused at start, naming the flags.
    let m = model.to_str().unwrap();
    let o = gpt2kit(&[
        "serve",
        "--model",
        m,
        "--port",
        "0",
        "--kv-cache-memory-mb",
        "0",
    ]);
    common::assert_clean_failure(&o, 2, "--max-model-len");
    assert!(
        common::stderr(&o).contains("--kv-cache-memory-mb"),
        "{}",
        common::stderr(&o)
    );
}
