//! `POST /v1/completions`: a request becomes one job per choice (prompts × `n`); the
//! answer is one JSON object, or with `stream` server-sent events, one `data:` chunk
//! per piece of text, each choice's last with its `finish_reason`, then the usage chunk
//! (`stream_options.include_usage`) and `data: [DONE]`, as OpenAI's API sends them.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use infer::generate::{FinishReason, Logprobs};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::error::ApiError;
use crate::params::{self, Completion};
use crate::scheduler::{Event, Job};
use crate::settings::{choice_config, prompt_ids, token_limit};
use crate::text::ChoiceText;
use crate::App;

pub async fn handle(State(app): State<Arc<App>>, req: Request) -> Response {
    let answer = async {
        let body = crate::body::read_body(req).await?;
        let c = params::completion(&body)?;
        start(&app, c, Shape::Text).await
    };
    match answer.await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Which API answers: Completions (`text`) or Chat (`message`, `delta`), with the number
/// of top log-probabilities Chat shows.
#[derive(Clone, Copy, PartialEq)]
pub enum Shape {
    Text,
    Chat { top: usize },
}

/// What a response says of itself in every chunk.
struct Head {
    id: String,
    created: u64,
    model: String,
    shape: Shape,
    stream: bool,
}

impl Head {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        let object = match (self.shape, self.stream) {
            (Shape::Text, _) => "text_completion",
            (Shape::Chat { .. }, false) => "chat.completion",
            (Shape::Chat { .. }, true) => "chat.completion.chunk",
        };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created,
            "model": self.model, "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    /// One choice (or, streamed, a piece of one) in the API's shape.
    fn choice(&self, i: usize, text: String, logprobs: Value, finish: Option<&str>) -> Value {
        let mut v = json!({"index": i, "logprobs": logprobs, "finish_reason": finish});
        match (self.shape, self.stream) {
            (Shape::Text, _) => v["text"] = text.into(),
            (Shape::Chat { .. }, false) => {
                v["message"] = json!({"role": "assistant", "content": text});
            }
            (Shape::Chat { .. }, true) if text.is_empty() && finish.is_some() => {
                v["delta"] = json!({});
            }
            (Shape::Chat { .. }, true) => v["delta"] = json!({"content": text}),
        }
        v
    }
}

/// The choices of one response as their events arrive.
struct Choices {
    texts: Vec<ChoiceText>,
    /// Per choice: set to tell the scheduler it is over (stop string found).
    stopped: Vec<Arc<AtomicBool>>,
    finish: Vec<Option<&'static str>>,
    /// Per choice: whether its last event (`Done`, `Failed`) came.
    closed: Vec<bool>,
    /// Per choice: its tokens' raw log-probabilities so far (with `logprobs`), one per
    /// token of its `all`.
    raw: Vec<Vec<Logprobs>>,
    /// Per choice, streamed: how many of its tokens' log-probabilities went out, and where
    /// the next one's text starts. Each chunk carries those of the tokens that arrived since
    /// the last one (a token whose text is held back goes with the next piece).
    streamed: Vec<(usize, crate::logprobs::Offsets)>,
    /// Whether log-probabilities were asked for.
    logprobs: bool,
    open: usize,
    prompt_tokens: usize,
    app: Arc<App>,
}

/// What an event turned into.
enum Piece {
    Text(usize, String, Option<&'static str>),
    Failed(ApiError),
    Nothing,
}

fn finish_reason(why: FinishReason) -> &'static str {
    match why {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Time | FinishReason::Cancelled => "length",
        FinishReason::Error => "error",
    }
}

impl Choices {
    fn on(&mut self, i: usize, event: Event) -> Piece {
        if self.closed[i] {
            return Piece::Nothing;
        }
        let tok = &self.app.tokenizer;
        let text = &mut self.texts[i];
        match event {
            Event::Token(t, raw) => {
                if self.finish[i].is_some() {
                    return Piece::Nothing;
                }
                let piece = text.push(tok, t);
                self.raw[i].extend(raw);
                let end = text.stopped.then_some("stop");
                if end.is_some() {
                    self.stopped[i].store(true, Ordering::Relaxed);
                    self.finish[i] = end;
                }
                if piece.is_empty() && end.is_none() {
                    Piece::Nothing
                } else {
                    Piece::Text(i, piece, end)
                }
            }
            Event::Done(why) => {
                self.closed[i] = true;
                self.open -= 1;
                let stopped = self.finish[i].is_some();
                let end = *self.finish[i].get_or_insert(finish_reason(why));
                let rest = text.finish();
                if stopped {
                    Piece::Nothing
                } else {
                    Piece::Text(i, rest, Some(end))
                }
            }
            Event::Failed(msg) => {
                self.closed[i] = true;
                self.finish[i] = Some("error");
                self.open -= 1;
                Piece::Failed(msg)
            }
        }
    }

    /// Choice `i`'s `logprobs` (null when not asked for).
    fn logprobs_of(&self, i: usize, shape: Shape) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let (t, raw, tok) = (&self.texts[i], &self.raw[i], &self.app.tokenizer);
        match shape {
            Shape::Text => {
                let mut offsets = crate::logprobs::Offsets::default();
                crate::logprobs::completion(tok, &t.all, raw, &t.enders, &mut offsets)
            }
            Shape::Chat { top } => crate::logprobs::chat(tok, &t.all, raw, top),
        }
    }

    /// Streamed, choice `i`'s `logprobs` for its tokens not sent yet (null when there
    /// are none, or they were not asked for).
    fn unsent_logprobs(&mut self, i: usize, shape: Shape) -> Value {
        let (t, raw, tok) = (&self.texts[i], &self.raw[i], &self.app.tokenizer);
        let (from, offsets) = &mut self.streamed[i];
        let upto = raw.len().min(t.all.len());
        if !self.logprobs || upto <= *from {
            return Value::Null;
        }
        let (ids, raw) = (&t.all[*from..upto], &raw[*from..upto]);
        *from = upto;
        match shape {
            Shape::Text => crate::logprobs::completion(tok, ids, raw, &t.enders, offsets),
            Shape::Chat { top } => crate::logprobs::chat(tok, ids, raw, top),
        }
    }

    fn usage(&self) -> Value {
        let completion: usize = self.texts.iter().map(|t| t.generated).sum();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }
}

/// Checks the request, queues its jobs and answers.
pub async fn start(app: &Arc<App>, c: Completion, shape: Shape) -> Result<Response, ApiError> {
    let adapter = app.check_model(c.model.as_deref())?;
    let prompts = prompt_ids(&app.tokenizer, &c.prompts)?;
    let limits = prompts
        .iter()
        .map(|p| {
            let room = app.max_model_len.saturating_sub(p.len());
            let max = c
                .max_tokens
                .or((c.fill_context && room > 0).then_some(room));
            token_limit(max, p.len(), app.max_model_len)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let configs = (0..c.n)
        .map(|j| choice_config(&app.defaults, &c, &app.tokenizer, &app.config, j).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let (tx, rx) = unbounded_channel();
    let number = app.next_request();
    let arrived = Instant::now();
    let mut jobs = Vec::new();
    let mut choices = Choices {
        texts: Vec::new(),
        stopped: Vec::new(),
        finish: Vec::new(),
        closed: Vec::new(),
        raw: Vec::new(),
        streamed: Vec::new(),
        logprobs: c.logprobs.is_some(),
        open: 0,
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        app: app.clone(),
    };
    for (prompt, &limit) in prompts.iter().zip(&limits) {
        for cfg in &configs {
            let index = jobs.len();
            let stopped = Arc::new(AtomicBool::new(false));
            choices.texts.push(ChoiceText::new(
                cfg.stop_strings.clone(),
                cfg.eos_token_ids.clone(),
            ));
            choices.stopped.push(stopped.clone());
            choices.finish.push(None);
            choices.closed.push(false);
            choices.raw.push(Vec::new());
            choices
                .streamed
                .push((0, crate::logprobs::Offsets::default()));
            choices.open += 1;
            jobs.push(Job {
                prompt: prompt.clone(),
                max_new_tokens: limit,
                settings: cfg.clone(),
                adapter,
                index,
                events: tx.clone(),
                stopped,
                arrived,
                started: false,
            });
        }
    }
    drop(tx);
    app.submit(jobs)?;
    let prefix = match shape {
        Shape::Text => "cmpl",
        Shape::Chat { .. } => "chatcmpl",
    };
    let head = Head {
        id: format!("{prefix}-{:x}{number:06x}", app.started),
        created: crate::unix_time(),
        model: app.model_name(adapter),
        shape,
        stream: c.stream,
    };
    let echoes = echoes(app, &c, &prompts);
    if c.stream {
        Ok(stream(head, choices, rx, echoes, c.include_usage))
    } else {
        collect(head, choices, rx, echoes).await
    }
}

/// With `echo`, each choice's prompt text (decoded, for token-id prompts).
fn echoes(app: &App, c: &Completion, prompts: &[Vec<i64>]) -> Vec<String> {
    if !c.echo {
        return Vec::new();
    }
    prompts
        .iter()
        .flat_map(|p| {
            let text = app.tokenizer.decode(p).unwrap_or_default();
            std::iter::repeat_n(text, c.n)
        })
        .collect()
}

/// Waits for every choice; one JSON answer.
async fn collect(
    head: Head,
    mut choices: Choices,
    mut rx: UnboundedReceiver<(usize, Event)>,
    echoes: Vec<String>,
) -> Result<Response, ApiError> {
    let n = choices.texts.len();
    let mut texts: Vec<String> = (0..n)
        .map(|i| echoes.get(i).cloned().unwrap_or_default())
        .collect();
    while choices.open > 0 {
        let Some((i, event)) = rx.recv().await else {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the scheduler stopped before the answer was complete",
            ));
        };
        match choices.on(i, event) {
            Piece::Text(i, piece, _) => texts[i].push_str(&piece),
            Piece::Failed(e) => return Err(e),
            Piece::Nothing => {}
        }
    }
    let list: Vec<Value> = texts
        .into_iter()
        .enumerate()
        .map(|(i, text)| {
            let logprobs = choices.logprobs_of(i, head.shape);
            head.choice(i, text, logprobs, choices.finish[i])
        })
        .collect();
    let body = head.chunk(Value::Array(list), Some(choices.usage()));
    Ok(axum::Json(body).into_response())
}

/// The state of a streamed answer.
struct Streaming {
    head: Head,
    choices: Choices,
    rx: UnboundedReceiver<(usize, Event)>,
    include_usage: bool,
    /// Events ready to send.
    queue: VecDeque<String>,
    done: bool,
}

impl Streaming {
    fn data(&mut self, v: &Value) {
        self.queue.push_back(format!("data: {v}\n\n"));
    }

    fn piece(&mut self, i: usize, text: String, finish: Option<&str>) {
        let logprobs = self.choices.unsent_logprobs(i, self.head.shape);
        let choice = json!([self.head.choice(i, text, logprobs, finish)]);
        let usage = self.include_usage.then_some(Value::Null);
        let chunk = self.head.chunk(choice, usage);
        self.data(&chunk);
    }

    /// Waits for the next event and turns it into chunks.
    async fn next(&mut self) {
        let event = self.rx.recv().await;
        match event {
            Some((i, event)) => match self.choices.on(i, event) {
                Piece::Text(i, text, finish) => self.piece(i, text, finish),
                Piece::Failed(e) => self.data(&e.body()),
                Piece::Nothing => {}
            },
            None if self.choices.open > 0 => {
                let e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the scheduler stopped");
                self.data(&e.body());
                self.choices.open = 0;
            }
            None => {}
        }
        if self.choices.open == 0 {
            if self.include_usage {
                let last = self.head.chunk(json!([]), Some(self.choices.usage()));
                self.data(&last);
            }
            self.queue.push_back("data: [DONE]\n\n".into());
            self.done = true;
        }
    }
}

fn stream(
    head: Head,
    choices: Choices,
    rx: UnboundedReceiver<(usize, Event)>,
    echoes: Vec<String>,
    include_usage: bool,
) -> Response {
    let mut s = Streaming {
        head,
        choices,
        rx,
        include_usage,
        queue: VecDeque::new(),
        done: false,
    };
    if s.head.shape != Shape::Text {
        // Chat's first chunk of each choice names the speaker.
        for i in 0..s.choices.texts.len() {
            let mut choice = s.head.choice(i, String::new(), Value::Null, None);
            choice["delta"] = json!({"role": "assistant", "content": ""});
            let chunk = s
                .head
                .chunk(json!([choice]), s.include_usage.then_some(Value::Null));
            s.data(&chunk);
        }
    }
    for (i, text) in echoes.into_iter().enumerate() {
        s.piece(i, text, None);
    }
    let body = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(event) = s.queue.pop_front() {
                return Some((Ok::<_, Infallible>(Bytes::from(event)), s));
            }
            if s.done {
                return None;
            }
            s.next().await;
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
