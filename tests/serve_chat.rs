//! `gpt2kit serve`'s chat endpoint: the model folder's template rendered as Hugging Face
//! renders it.
mod common;
mod serving;

use common::reference;
use serde_json::{json, Value};
use serving::*;

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
    let chunks = r.chunks();
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
    // Streamed, each chunk carries its own tokens' entries; together they are the plain
    // answer's.
    lbody["stream"] = json!(true);
    let chunks = server.post("/v1/chat/completions", &lbody).chunks();
    let per_chunk: Vec<&Vec<Value>> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .collect();
    assert!(per_chunk.len() > 1, "{chunks:?}");
    let streamed: Vec<Value> = per_chunk.into_iter().flatten().cloned().collect();
    assert_eq!(&streamed, content);

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

/// The official `openai` Python client (pinned in tests/reference/peers.txt) against the
/// server, as users call it: completions plain, streamed, `n` > 1 with vLLM's extra fields,
/// logprobs, echo, stop, chat plain and streamed, the model list, and refusals by status.
/// What it gets must be what `infer` and raw HTTP get for the same requests.
#[test]
fn the_openai_client_gets_what_raw_http_and_infer_get() {
    let tmp = common::TempDir::new("serve-openai");
    let model = chat_model(&tmp);
    let server = Server::start(
        &model,
        &["--served-model-name", "gpt2-test", "--api-key", "k3y"],
        &[],
    );
    let out = tmp.path("client.json");
    let o = std::process::Command::new(common::python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/reference/openai_client.py"
        ))
        .args([&format!("http://{}/v1", server.addr), "k3y", "gpt2-test"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let got: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let raw = |path: &str, body: Value| {
        let r = server.call(
            "POST",
            path,
            &[("Authorization", "Bearer k3y")],
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };

    let plain = &got["plain"];
    let text = plain["text"].as_str().unwrap();
    assert_eq!(
        text,
        infer_text(&model, "Hello", 8),
        "greedy text against infer"
    );
    assert_eq!(plain["object"], "text_completion");
    assert_eq!(plain["model"], "gpt2-test");
    let usage: Vec<u64> = serde_json::from_value(plain["usage"].clone()).unwrap();
    assert!(usage[1] >= 1 && usage[1] <= 8, "{usage:?}");
    assert_eq!(usage[0] + usage[1], usage[2]);
    assert_eq!(
        got["streamed"]["text"], plain["text"],
        "streamed against plain"
    );
    assert_eq!(got["streamed"]["finish_reason"], plain["finish_reason"]);
    assert_eq!(got["streamed"]["usage"], json!(usage[..2]), "include_usage");

    let n_body = json!({"model": "gpt2-test", "prompt": ["The", "A"], "max_tokens": 5, "n": 2,
                        "seed": 7, "temperature": 0.9, "top_k": 20, "repetition_penalty": 1.1});
    let mut n_raw: Vec<(u64, String)> = raw("/v1/completions", n_body)["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["index"].as_u64().unwrap(),
                c["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    n_raw.sort();
    assert_eq!(
        got["n"],
        json!(n_raw),
        "seeded n = 2 over two prompts: client against raw HTTP"
    );

    // Greedy with logprobs: each chosen token is the raw distribution's most likely one, so
    // its log-probability is the largest of its top 2 (equal: the same float, copied).
    let lp = &got["logprobs"];
    let tokens: Vec<String> = serde_json::from_value(lp["tokens"].clone()).unwrap();
    if tokens.iter().all(|t| !t.starts_with("bytes:")) {
        // Tokens that end inside a UTF-8 character are named by their bytes instead.
        assert_eq!(tokens.concat(), text);
    }
    let chosen: Vec<f64> = serde_json::from_value(lp["token_logprobs"].clone()).unwrap();
    let tops = lp["top_logprobs"].as_array().unwrap();
    assert_eq!((chosen.len(), tops.len()), (tokens.len(), tokens.len()));
    for (i, (c, top)) in chosen.iter().zip(tops).enumerate() {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 2, "token {i}: {top:?}");
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            *c <= 0.0 && *c == best,
            "token {i}: chosen {c}, top {top:?}"
        );
    }
    let lp_raw = raw(
        "/v1/completions",
        json!({"model": "gpt2-test", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(
        lp_raw["choices"][0]["logprobs"]["token_logprobs"],
        lp["token_logprobs"]
    );
    assert_eq!(
        lp_raw["choices"][0]["logprobs"]["text_offset"],
        lp["text_offset"]
    );

    assert_eq!(got["echo"], json!(format!("Hello{text}")));
    let before_space = text.split(' ').next().unwrap();
    let stopped = if text.contains(' ') { "stop" } else { "length" };
    assert_eq!(got["stop"], json!([before_space, stopped]));

    let chat_body = json!({"model": "gpt2-test", "messages": [{"role": "user", "content": "Hello there"}],
                           "max_tokens": 6, "temperature": 0});
    let chat_raw = raw("/v1/chat/completions", chat_body);
    assert_eq!(
        got["chat"]["content"],
        chat_raw["choices"][0]["message"]["content"]
    );
    assert_eq!(got["chat"]["role"], "assistant");
    assert_eq!(got["chat_streamed"], got["chat"]["content"]);
    assert_eq!(got["models"], json!(["gpt2-test"]));

    let errors = &got["errors"];
    assert_eq!(errors["max_tokens"][0], 400, "{errors}");
    assert!(
        errors["max_tokens"][1]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "{errors}"
    );
    assert_eq!(errors["unknown_field"][0], 400, "{errors}");
    assert!(
        errors["unknown_field"][1]
            .as_str()
            .unwrap()
            .contains("frobnicate"),
        "{errors}"
    );
    assert_eq!(errors["wrong_key"][0], 401, "{errors}");
    assert_eq!(
        got["after"], plain["text"],
        "the server answers after the refusals"
    );
}
