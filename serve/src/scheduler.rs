//! The scheduler: one thread owns the model and the engine. Handlers send it jobs (one
//! per choice, each with its own settings) over a channel; each step it takes new jobs,
//! cancels those nobody listens to any more (client gone, stop string found), admits
//! waiting ones into free slots, runs one engine step, sends each token to its
//! request's channel and retires finished jobs.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use infer::ensemble::Ensemble;
use infer::generate::{Engine, FinishReason, GenerationConfig, Logprobs, Request, Schedule};
use infer::prefix::PrefixCache;
use infer::Gpt2;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::ApiError;
use crate::metrics::Metrics;
use axum::http::StatusCode;

/// What a job's request hears about it: (choice index, event).
#[derive(Debug)]
pub enum Event {
    /// A token, with its raw log-probabilities where its settings asked for them.
    Token(i64, Option<Logprobs>),
    /// The sequence ended.
    Done(FinishReason),
    /// The sequence failed: a 400 where its own settings left it no token to pick (all
    /// banned, scores not finite), else a 500.
    Failed(ApiError),
}

/// A failure that is not the request's fault.
fn internal(why: String) -> Event {
    Event::Failed(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("generation failed: {why}"),
    ))
}

pub type Events = UnboundedSender<(usize, Event)>;

/// One sequence to generate: one choice of one request.
pub struct Job {
    pub prompt: Vec<i64>,
    pub max_new_tokens: usize,
    pub settings: Arc<GenerationConfig>,
    /// The LoRA adapter it runs with (`None`: the base).
    pub adapter: Option<usize>,
    /// The choice's index in its response.
    pub index: usize,
    pub events: Events,
    /// Set by the request's handler once it wants no more tokens (a stop string).
    pub stopped: Arc<AtomicBool>,
    pub arrived: Instant,
    /// Whether a token was sent yet (time to first token).
    pub started: bool,
}

impl Job {
    /// Nobody listens any more (the client is gone).
    fn deaf(&self) -> bool {
        self.events.is_closed()
    }

    /// Nobody wants its tokens any more.
    fn gone(&self) -> bool {
        self.events.is_closed() || self.stopped.load(Ordering::Relaxed)
    }

    fn send(&self, e: Event) {
        let _ = self.events.send((self.index, e));
    }
}

pub enum Msg {
    Jobs(Vec<Job>),
}

/// The engine's shape.
pub struct Pool {
    /// Sequences decoding at once (`--max-num-seqs`).
    pub slots: usize,
    /// Positions per sequence (`--max-model-len`).
    pub capacity: usize,
    /// The prefix cache's budget (`--prefix-cache-mb`); 0: none.
    pub prefix_cache_bytes: usize,
}

/// Requests an engine takes before it is replaced by a fresh one once idle (it keeps a
/// small record of every request it was given).
const RENEW_AFTER: usize = 4096;

/// The scheduler thread's body: serves jobs until every sender is gone. `base`: the
/// engine's own settings (each job brings its own).
pub fn run(
    model: Gpt2,
    rx: Receiver<Msg>,
    metrics: Arc<Metrics>,
    pool: Pool,
    base: GenerationConfig,
    ready: std::sync::mpsc::SyncSender<Result<(), String>>,
) {
    let _no_grad = tch::no_grad_guard();
    let ensemble = Ensemble::single(&model);
    let mut base = base;
    base.max_time = None;
    base.num_beams = 1;
    base.num_return_sequences = 1;
    let schedule = Schedule {
        max_num_seqs: Some(pool.slots),
        static_batches: false,
    };
    // The prefix cache outlives the engines: a fresh engine keeps the prompts seen.
    let prefix = (pool.prefix_cache_bytes > 0)
        .then(|| Arc::new(Mutex::new(PrefixCache::new(pool.prefix_cache_bytes))));
    let new_engine = || {
        let e = Engine::with_pool(&ensemble, &base, schedule, pool.slots, pool.capacity);
        match &prefix {
            Some(p) => e.with_prefix_cache(p.clone()),
            None => e,
        }
    };
    // The KV caches are allocated and zeroed (seconds for a large model): only then
    // does the server listen, and `/health` answer. One the allocator refuses is the
    // server's error at start.
    let engine = match infer::panics::caught(new_engine) {
        Ok(e) => e,
        Err(why) => {
            let _ = ready.send(Err(format!("allocating the KV caches: {why}")));
            return;
        }
    };
    let mut s = Scheduler {
        model: &model,
        engine,
        added: 0,
        live: HashMap::new(),
        pending: VecDeque::new(),
        slots: pool.slots,
        metrics: &metrics,
    };
    let _ = ready.send(Ok(()));
    drop(ready);
    loop {
        if s.live.is_empty() && s.pending.is_empty() {
            match rx.recv() {
                Ok(Msg::Jobs(jobs)) => s.pending.extend(jobs),
                Err(_) => return,
            }
            if s.added >= RENEW_AFTER {
                s.engine = new_engine();
                s.added = 0;
            }
        }
        while let Ok(Msg::Jobs(jobs)) = rx.try_recv() {
            s.pending.extend(jobs);
        }
        s.drop_gone();
        s.admit();
        if s.live.is_empty() {
            continue;
        }
        if let Err(e) = s.step() {
            // Not a request's own fault (those end alone): the engine may be half-way
            // through a step, so every running job fails and a fresh engine takes over.
            s.fail(&e.to_string());
            s.engine = new_engine();
            s.added = 0;
        }
        if let Some(p) = &prefix {
            metrics.prefix_cache(&p.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
}

/// The engine and the jobs it runs or will run.
struct Scheduler<'a> {
    /// The model the engine runs, whose weight files each step checks.
    model: &'a Gpt2,
    engine: Engine<'a>,
    /// Requests given to this engine.
    added: usize,
    /// Engine request id → its job.
    live: HashMap<usize, Job>,
    pending: VecDeque<Job>,
    slots: usize,
    metrics: &'a Metrics,
}

impl Scheduler<'_> {
    /// Forgets queued jobs nobody waits for, and cancels running ones (their slots free
    /// at once).
    fn drop_gone(&mut self) {
        let before = self.pending.len();
        self.pending.retain(|j| !j.gone());
        let dropped = before - self.pending.len();
        let m = self.metrics;
        m.waiting.fetch_sub(dropped, Ordering::Relaxed);
        m.cancelled.fetch_add(dropped as u64, Ordering::Relaxed);
        let gone: Vec<usize> = self
            .live
            .iter()
            .filter(|(_, j)| j.gone())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.engine.cancel(id);
            // A job still listened to (a stop string ended it) hears how it ended from
            // `retire`.
            if self.live.get(&id).is_some_and(Job::deaf) {
                self.live.remove(&id);
                m.running.fetch_sub(1, Ordering::Relaxed);
                m.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.retire();
    }

    /// Queued jobs, in order, while slots are free.
    fn admit(&mut self) {
        while self.live.len() < self.slots {
            let Some(job) = self.pending.pop_front() else {
                break;
            };
            let m = self.metrics;
            m.waiting.fetch_sub(1, Ordering::Relaxed);
            if let Some(why) = m.broken() {
                m.failed.fetch_add(1, Ordering::Relaxed);
                job.send(internal(why));
                continue;
            }
            let request = Request {
                prompt: job.prompt.clone(),
                max_new_tokens: job.max_new_tokens,
                settings: Some(job.settings.clone()),
                adapter: job.adapter,
            };
            self.added += 1;
            match self.engine.add(request) {
                Ok(id) => {
                    m.running.fetch_add(1, Ordering::Relaxed);
                    m.prompt_tokens
                        .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
                    self.live.insert(id, job);
                }
                Err(e) => {
                    m.failed.fetch_add(1, Ordering::Relaxed);
                    job.send(internal(e.to_string()));
                }
            }
        }
    }

    /// One engine step; tokens out, finished jobs retired.
    fn step(&mut self) -> infer::Result<()> {
        let live = &mut self.live;
        let m = self.metrics;
        let never = |_: &[i64]| false;
        self.engine
            .step_with_logprobs(&never, &mut |row, token, raw| {
                if let Some(job) = live.get_mut(&row) {
                    if !job.started {
                        job.started = true;
                        m.first_token(job.arrived.elapsed().as_secs_f64());
                    }
                    m.generated_tokens.fetch_add(1, Ordering::Relaxed);
                    job.send(Event::Token(token, raw.cloned()));
                }
            })?;
        m.steps.fetch_add(1, Ordering::Relaxed);
        // A weight file truncated or rewritten under the model (its mapped pages read as
        // zeros or as other weights) fails every request from this step on, before any
        // finishes on such weights; `/health` reports it.
        if let Err(e) = self.model.check_files() {
            m.set_broken(&e.to_string());
            return Err(e);
        }
        self.retire();
        Ok(())
    }

    /// The engine's finished requests leave; their jobs hear how they ended.
    fn retire(&mut self) {
        let m = self.metrics;
        for (id, seqs) in self.engine.take_finished() {
            let Some(job) = self.live.remove(&id) else {
                continue;
            };
            m.running.fetch_sub(1, Ordering::Relaxed);
            let why = seqs
                .into_iter()
                .next()
                .map_or(FinishReason::Error, |g| g.finish_reason);
            match why {
                FinishReason::Error => {
                    m.failed.fetch_add(1, Ordering::Relaxed);
                    let event = match self.engine.take_error(id) {
                        Some(msg) => Event::Failed(ApiError::new(
                            StatusCode::BAD_REQUEST,
                            format!("this request's settings left no token to pick: {msg}"),
                        )),
                        None => internal("the engine gave no reason".into()),
                    };
                    job.send(event);
                    continue;
                }
                FinishReason::Cancelled => m.cancelled.fetch_add(1, Ordering::Relaxed),
                _ => m.finished.fetch_add(1, Ordering::Relaxed),
            };
            m.end_to_end(job.arrived.elapsed().as_secs_f64());
            job.send(Event::Done(why));
        }
    }

    /// A step failed: every running job hears why.
    fn fail(&mut self, why: &str) {
        let m = self.metrics;
        for (_, job) in self.live.drain() {
            m.running.fetch_sub(1, Ordering::Relaxed);
            m.failed.fetch_add(1, Ordering::Relaxed);
            job.send(internal(why.to_string()));
        }
    }
}
