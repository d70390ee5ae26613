//! `gpt2kit serve` end to end: the real binary on a free loopback port (`--port 0`, the
//! port read from its first line), spoken to over raw HTTP/1.1 from std's TcpStream.
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{gpt2kit, reference, stdout};
use serde_json::{json, Value};

/// A running server, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(model: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpt2kit"));
        c.args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(args)
            .env_remove("GPT2KIT_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in the server's first line {line:?}"))
            .to_string();
        Self { child, addr }
    }

    fn connect(&self) -> TcpStream {
        TcpStream::connect(&self.addr).unwrap()
    }

    /// Sends a request; the stream, ready to read the answer.
    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> TcpStream {
        let mut s = self.connect();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        s
    }

    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        read_reply(self.send(method, path, headers, body))
    }

    fn post(&self, path: &str, body: &Value) -> Reply {
        self.call("POST", path, &[], body.to_string().as_bytes())
    }

    fn get(&self, path: &str) -> Reply {
        self.call("GET", path, &[], b"")
    }

    /// A metric's value from /metrics.
    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").body;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("gpt2kit:{name} ")))
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
            .parse()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an event stream.
    fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(String::from)
            .collect()
    }
}

fn read_reply(s: TcpStream) -> Reply {
    read_rest(s, Vec::new())
}

/// The answer on `s`, of which `raw` was read already.
fn read_rest(mut s: TcpStream, mut raw: Vec<u8>) -> Reply {
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Reply {
        status,
        head: head.to_string(),
        body,
    }
}

/// The payload of a chunked transfer encoding.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// Reads a streamed answer until its first `data:` event; returns what it read.
fn await_first_event(s: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended before any event");
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// `gpt2kit infer`'s greedy text for `prompt`, EOS text left out.
fn infer_text(model: &Path, prompt: &str, n: usize) -> String {
    let o = gpt2kit(&[
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        &n.to_string(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    v["text"]
        .as_str()
        .unwrap()
        .trim_end_matches("<|endoftext|>")
        .to_string()
}

fn greedy(prompt: Value, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

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
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
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
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0].as_u64() <= w[1].as_u64()));
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
    // Streamed: the pieces' tokens and values add up to the plain answer's.
    body["logprobs"] = json!(3);
    body["stream"] = json!(true);
    let r = server.post("/v1/completions", &body);
    let (mut text, mut s_tokens, mut s_values) = (String::new(), Vec::new(), Vec::new());
    for e in r.events().iter().filter(|e| *e != "[DONE]") {
        let c = &serde_json::from_str::<Value>(e).unwrap()["choices"][0];
        text.push_str(c["text"].as_str().unwrap());
        if !c["logprobs"].is_null() {
            let (t, v, _) = check_logprobs(c, 3);
            s_tokens.extend(t);
            s_values.extend(v);
        }
    }
    assert_eq!(text, plain_text);
    assert_eq!((s_tokens, s_values), (tokens.clone(), values.clone()));
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
}

/// A copy of the reference model whose tokenizer_config.json has a chat template.
fn chat_model(tmp: &common::TempDir) -> std::path::PathBuf {
    let from = reference("hub-tied");
    let out = tmp.path("chat");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(&from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    let cfg = out.join("tokenizer_config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["chat_template"] = json!(
        "{% for message in messages %}\n\
         {% if message['role'] not in ['system', 'user', 'assistant'] %}\
         {{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}\n\
         {{ bos_token + message['role'] + ': ' + message['content'].strip() + '\n' }}\
         {% endfor %}\n\
         {% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    );
    std::fs::write(&cfg, v.to_string()).unwrap();
    out
}

#[test]
fn chat_completions_render_the_template() {
    let tmp = common::TempDir::new("serve-chat");
    let model = chat_model(&tmp);
    let server = Server::start(&model, &[], &[]);
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": " Hello "}]},
    ]);
    // The prompt Hugging Face renders: trim_blocks drops the newline after each tag.
    let prompt = "<|endoftext|>system: Be brief.\n<|endoftext|>user: Hello\nassistant:";
    let body = json!({"messages": messages, "max_tokens": 8, "temperature": 0});
    let r = server.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let want = server
        .post("/v1/completions", &greedy(json!(prompt), 8))
        .json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], want["choices"][0]["text"]);
    assert_eq!(choice["finish_reason"], want["choices"][0]["finish_reason"]);
    assert_eq!(v["usage"], want["usage"]);

    // Streamed: the role first, then the content's pieces, the finish reason, usage.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let r = server.post("/v1/chat/completions", &sbody);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let (last, pieces) = chunks.split_last().unwrap();
    assert_eq!(last["usage"], v["usage"]);
    let content: String = pieces
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, choice["message"]["content"].as_str().unwrap());
    let finish = &pieces.last().unwrap()["choices"][0]["finish_reason"];
    assert_eq!(finish, &choice["finish_reason"]);

    // Log-probabilities in Chat's shape: one entry per token, `top_logprobs` of each.
    let mut lbody = body.clone();
    lbody["logprobs"] = json!(true);
    lbody["top_logprobs"] = json!(2);
    let l = server.post("/v1/chat/completions", &lbody).json();
    let content = l["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        Some(content.len() as u64),
        v["usage"]["completion_tokens"].as_u64()
    );
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{t}");
        // Greedy: the chosen token is the most likely.
        assert_eq!(top[0]["token"], t["token"], "{t}");
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
    }

    // The template's raise_exception, and other bad bodies: 400 naming the field.
    let cases = [
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "Unknown role: tool",
            "messages",
        ),
        (json!({"messages": []}), "empty", "messages"),
        (json!({"messages": [{"content": "x"}]}), "role", "messages"),
        (json!({"max_tokens": 3}), "required", "messages"),
        (
            json!({"messages": messages, "top_logprobs": 2}),
            "logprobs",
            "top_logprobs",
        ),
        (json!({"messages": messages, "echo": true}), "echo", "echo"),
        (
            json!({"messages": messages, "max_completion_tokens": 0}),
            "between",
            "max_completion_tokens",
        ),
    ];
    for (body, needle, param) in cases {
        let r = server.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let e = &r.json()["error"];
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{body}: {e}"
        );
        assert_eq!(e["param"], param, "{body}");
    }

    // A model folder without a template: 400 that says so.
    let plain = Server::start(&reference("hub-tied"), &[], &[]);
    let r = plain.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 400, "{}", r.body);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("no chat template"), "{msg}");
}

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

#[test]
fn concurrent_requests_answer_as_they_would_alone() {
    let model = reference("hub-tied");
    let server = Server::start(&model, &["--max-num-seqs", "4"], &[]);
    // Greedy, seeded sampling with penalties, and seeded n = 2, with different lengths.
    let bodies: Vec<Value> = (0..12)
        .map(|i| match i % 3 {
            0 => greedy(json!(format!("Hello {i}")), 4 + i),
            1 => json!({"prompt": "The", "max_tokens": 6 + i, "seed": i, "top_k": 20,
                        "presence_penalty": 0.5, "repetition_penalty": 1.2}),
            _ => json!({"prompt": [5, 6, 7], "max_tokens": 5, "n": 2, "seed": i, "min_p": 0.05}),
        })
        .collect();
    let alone: Vec<Value> = bodies
        .iter()
        .map(|b| server.post("/v1/completions", b).json()["choices"].clone())
        .collect();
    let addr = server.addr.clone();
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| {
                let addr = addr.clone();
                s.spawn(move || {
                    let mut c = TcpStream::connect(&addr).unwrap();
                    let body = b.to_string();
                    write!(
                        c,
                        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .unwrap();
                    read_reply(c).json()["choices"].clone()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i}: {}", bodies[i]);
    }
    assert_eq!(server.metric("num_requests_running"), 0.0);
    assert_eq!(server.metric("num_requests_waiting"), 0.0);
}
