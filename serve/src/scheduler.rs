//! The scheduler: one thread owns the model and the engine. Handlers send it jobs (one
//! per choice) over a channel; each step it takes new jobs, admits waiting ones into free
//! slots, runs one engine step, sends each job's token to its request's channel, retires
//! finished jobs and drops those nobody listens to any more (client gone, stop string).
//!
//! Until the engine takes each request's own settings, jobs run in epochs: one engine
//! per run of consecutive jobs with equal settings (a seeded request's jobs alone, so
//! that choice `j` draws from `seed + j` whatever else is queued); a job with other
//! settings waits until the running ones finish.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use infer::ensemble::Ensemble;
use infer::generate::{Engine, FinishReason, GenerationConfig, Request, Schedule};
use infer::Gpt2;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;

/// What a job's request hears about it: (choice index, event).
#[derive(Debug)]
pub enum Event {
    Token(i64),
    Done(FinishReason),
    Failed(String),
}

pub type Events = UnboundedSender<(usize, Event)>;

/// One sequence to generate: one choice of one request.
pub struct Job {
    pub prompt: Vec<i64>,
    pub max_new_tokens: usize,
    pub settings: Arc<GenerationConfig>,
    /// The request's number: a seeded request's jobs run in an epoch of their own.
    pub group: u64,
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
    /// Nobody wants its tokens any more.
    fn gone(&self) -> bool {
        self.events.is_closed() || self.stopped.load(Ordering::Relaxed)
    }

    fn send(&self, e: Event) {
        let _ = self.events.send((self.index, e));
    }

    /// Whether it may join an engine running `cfg` for `group`.
    fn fits(&self, cfg: &GenerationConfig, group: u64) -> bool {
        if self.settings.seed.is_some() || cfg.seed.is_some() {
            return self.group == group;
        }
        let key = |c: &GenerationConfig| format!("{:?}{:?}", c.processing, c.eos_token_ids);
        key(&self.settings) == key(cfg)
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
}

/// The scheduler thread's body: serves jobs until every sender is gone.
pub fn run(model: Gpt2, rx: Receiver<Msg>, metrics: Arc<Metrics>, pool: Pool) {
    let _no_grad = tch::no_grad_guard();
    let ensemble = Ensemble::single(&model);
    let mut pending = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(Msg::Jobs(jobs)) => pending.extend(jobs),
                Err(_) => return,
            }
        }
        let Some(first) = pending.front() else {
            continue;
        };
        let (cfg, group) = ((*first.settings).clone(), first.group);
        let schedule = Schedule {
            max_num_seqs: Some(pool.slots),
            static_batches: false,
        };
        let engine = Engine::with_pool(&ensemble, &cfg, schedule, pool.slots, pool.capacity);
        let mut epoch = Epoch {
            engine,
            live: HashMap::new(),
            cfg: &cfg,
            group,
            slots: pool.slots,
            metrics: &metrics,
        };
        epoch.run(&rx, &mut pending);
    }
}

/// One engine and the jobs it runs.
struct Epoch<'a> {
    engine: Engine<'a>,
    /// Engine request id → its job; `None` once nobody listens (its slot is held until
    /// the engine can cancel it).
    live: HashMap<usize, Option<Job>>,
    cfg: &'a GenerationConfig,
    group: u64,
    slots: usize,
    metrics: &'a Metrics,
}

impl Epoch<'_> {
    /// Steps until no admitted job is left; returns to start another epoch.
    fn run(&mut self, rx: &Receiver<Msg>, pending: &mut VecDeque<Job>) {
        loop {
            loop {
                match rx.try_recv() {
                    Ok(Msg::Jobs(jobs)) => pending.extend(jobs),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.drop_gone(pending);
            self.admit(pending);
            if self.live.is_empty() {
                return;
            }
            if let Err(e) = self.step() {
                self.fail(&e.to_string());
                return;
            }
        }
    }

    /// Forgets queued jobs nobody waits for, and stops sending to running ones.
    fn drop_gone(&mut self, pending: &mut VecDeque<Job>) {
        let before = pending.len();
        pending.retain(|j| !j.gone());
        let dropped = before - pending.len();
        let m = self.metrics;
        m.waiting.fetch_sub(dropped, Ordering::Relaxed);
        m.cancelled.fetch_add(dropped as u64, Ordering::Relaxed);
        for slot in self.live.values_mut() {
            if slot.as_ref().is_some_and(Job::gone) {
                *slot = None;
                m.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queued jobs that fit this engine, in order, while slots are free.
    fn admit(&mut self, pending: &mut VecDeque<Job>) {
        while self.live.len() < self.slots {
            let Some(job) = pending.front() else { break };
            if !job.fits(self.cfg, self.group) {
                break;
            }
            let job = pending.pop_front().expect("a front job");
            self.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
            let request = Request {
                prompt: job.prompt.clone(),
                max_new_tokens: job.max_new_tokens,
            };
            match self.engine.add(request) {
                Ok(id) => {
                    let m = self.metrics;
                    m.running.fetch_add(1, Ordering::Relaxed);
                    m.prompt_tokens
                        .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
                    self.live.insert(id, Some(job));
                }
                Err(e) => {
                    self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                    job.send(Event::Failed(e.to_string()));
                }
            }
        }
    }

    /// One engine step; tokens out, finished jobs retired.
    fn step(&mut self) -> infer::Result<()> {
        let live = &mut self.live;
        let m = self.metrics;
        let never = |_: &[i64]| false;
        self.engine.step(&never, &mut |row, token| {
            if let Some(Some(job)) = live.get_mut(&row) {
                if !job.started {
                    job.started = true;
                    m.first_token(job.arrived.elapsed().as_secs_f64());
                }
                m.generated_tokens.fetch_add(1, Ordering::Relaxed);
                job.send(Event::Token(token));
            }
        })?;
        m.steps.fetch_add(1, Ordering::Relaxed);
        for (id, seqs) in self.engine.take_finished() {
            let Some(slot) = self.live.remove(&id) else {
                continue;
            };
            m.running.fetch_sub(1, Ordering::Relaxed);
            if let (Some(job), Some(g)) = (slot, seqs.first()) {
                m.finished.fetch_add(1, Ordering::Relaxed);
                m.end_to_end(job.arrived.elapsed().as_secs_f64());
                job.send(Event::Done(g.finish_reason));
            }
        }
        Ok(())
    }

    /// A step failed: every running job hears why; the engine is dropped.
    fn fail(&mut self, why: &str) {
        let m = self.metrics;
        for (_, slot) in self.live.drain() {
            m.running.fetch_sub(1, Ordering::Relaxed);
            if let Some(job) = slot {
                m.failed.fetch_add(1, Ordering::Relaxed);
                job.send(Event::Failed(why.to_string()));
            }
        }
    }
}
