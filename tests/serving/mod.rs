//! A running `gpt2kit serve` for the serve tests: the real binary on a free loopback port
//! (`--port 0`, the port read from its first line), spoken to over raw HTTP/1.1 from std's
//! TcpStream.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::common::{self, gpt2kit, stdout};
use serde_json::{json, Value};

/// A running server, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    pub fn start(model: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpt2kit"));
        c.args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(args)
            .env_remove("GPT2KIT_API_KEY")
            .env("GPT2KIT_PACKED_CACHE", "off")
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

    pub fn connect(&self) -> TcpStream {
        TcpStream::connect(&self.addr).unwrap()
    }

    /// Sends a request; the stream, ready to read the answer.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> TcpStream {
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

    pub fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        read_reply(self.send(method, path, headers, body))
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.call("POST", path, &[], body.to_string().as_bytes())
    }

    pub fn get(&self, path: &str) -> Reply {
        self.call("GET", path, &[], b"")
    }

    /// A metric's value from /metrics.
    pub fn metric(&self, name: &str) -> f64 {
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

pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The JSON chunks of an event stream, which must end with `data: [DONE]`.
    pub fn chunks(&self) -> Vec<Value> {
        let events = self.events();
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "{}",
            self.body
        );
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    }

    /// The `data:` payloads of an event stream.
    pub fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(String::from)
            .collect()
    }
}

pub fn read_reply(s: TcpStream) -> Reply {
    read_rest(s, Vec::new())
}

/// The answer on `s`, of which `raw` was read already.
pub fn read_rest(mut s: TcpStream, mut raw: Vec<u8>) -> Reply {
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
pub fn dechunk(mut s: &str) -> String {
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
pub fn await_first_event(s: &mut TcpStream) -> Vec<u8> {
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
pub fn infer_text(model: &Path, prompt: &str, n: usize) -> String {
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

pub fn greedy(prompt: Value, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// One keep-alive HTTP/1.1 connection that sends JSON requests one after another.
pub struct Conn(BufReader<TcpStream>);

impl Conn {
    pub fn open(addr: &str) -> Self {
        Conn(BufReader::new(TcpStream::connect(addr).unwrap()))
    }

    /// POSTs `body` to `path`; the status and the JSON answer (read by its Content-Length).
    pub fn post(&mut self, path: &str, body: &Value) -> (u16, Value) {
        let body = body.to_string();
        write!(
            self.0.get_mut(),
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut status = String::new();
        self.0.read_line(&mut status).unwrap();
        let status = status
            .split(' ')
            .nth(1)
            .expect("a status line")
            .parse()
            .unwrap();
        let mut length = None;
        loop {
            let mut line = String::new();
            self.0.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = Some(v.trim().parse::<usize>().unwrap());
                }
            }
        }
        let mut buf = vec![0; length.expect("a Content-Length on a JSON answer")];
        self.0.read_exact(&mut buf).unwrap();
        (status, serde_json::from_slice(&buf).unwrap())
    }
}
