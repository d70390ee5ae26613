//! `gpt2kit serve`: an HTTP server with OpenAI's Completions API (and vLLM's extras:
//! `/tokenize`, `/detokenize`, its sampling fields) over the engine's continuous
//! batching. One scheduler thread owns the model and the engine (`scheduler`); the HTTP
//! side (tokio + axum) checks requests, queues one job per choice and relays tokens as
//! they come. SIGTERM or Ctrl-C stop accepting, let running requests finish (bounded by
//! the shutdown timeout) and return.
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use infer::generate::GenerationConfig;
use infer::{EngineOptions, Gpt2, Gpt2Config, Tokenizer};

mod body;
mod chat;
mod completions;
mod error;
mod logprobs;
mod metrics;
mod params;
mod routes;
mod scheduler;
mod settings;
mod text;

pub use error::{ApiError, Error};
use metrics::Metrics;
use scheduler::{Job, Msg, Pool};

/// Request bodies read and checked as the handlers check them, without a model or a
/// server: what the fuzz targets run.
pub mod request {
    pub use crate::chat::{request as chat, Template};
    pub use crate::completions::Shape;
    pub use crate::params::{completion, Completion, Prompt, MAX_CHOICES};
    pub use crate::settings::{choice_config, defaults, prompt_ids, token_limit};
}

/// Everything `gpt2kit serve` is told.
#[derive(Debug, Clone)]
pub struct Options {
    pub model: PathBuf,
    pub host: String,
    /// 0: any free port (the one taken is printed).
    pub port: u16,
    pub kind: Option<tch::Kind>,
    /// One device per tensor-parallel shard (one device: no split).
    pub devices: Vec<tch::Device>,
    /// The name clients send as `model` [default: the folder's name].
    pub served_model_name: Option<String>,
    pub max_num_seqs: usize,
    pub max_queue: usize,
    /// Positions per sequence, prompt included [default: the model's n_positions].
    pub max_model_len: Option<usize>,
    pub api_key: Option<String>,
    pub shutdown_timeout: Duration,
    /// Bytes of prompts' keys and values kept for reuse (0: no prefix cache).
    pub prefix_cache_bytes: usize,
    /// Bytes the decoding sequences' KV caches may take [default: on the CPU, what the
    /// system's available memory leaves after loading; see `kv_slots`].
    pub kv_cache_bytes: Option<usize>,
    pub engine: EngineOptions,
    /// LoRA adapters (peft's folders) held beside the model, by the name a request's
    /// `model` field chooses them with.
    pub adapters: Vec<(String, PathBuf)>,
}

/// What the handlers share.
pub(crate) struct App {
    tokenizer: Tokenizer,
    config: Gpt2Config,
    chat: chat::Template,
    defaults: GenerationConfig,
    name: String,
    /// The adapters' names and folders, by index (`Gpt2::add_adapter`).
    adapters: Vec<(String, PathBuf)>,
    max_model_len: usize,
    api_key: Option<String>,
    jobs: Mutex<Sender<Msg>>,
    metrics: Arc<Metrics>,
    max_queue: usize,
    requests: AtomicU64,
    started: u64,
}

impl App {
    /// A request's `model`, if given, must be the served one or one of its adapters
    /// (404 otherwise, as OpenAI): the adapter it names, if any.
    fn check_model(&self, model: Option<&str>) -> Result<Option<usize>, ApiError> {
        let Some(m) = model.filter(|m| *m != self.name) else {
            return Ok(None);
        };
        if let Some(i) = self.adapters.iter().position(|(n, _)| n == m) {
            return Ok(Some(i));
        }
        let mut names = format!("`{}`", self.name);
        for (n, _) in &self.adapters {
            names.push_str(&format!(", `{n}`"));
        }
        Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!("the model `{m}` does not exist; this server serves {names}"),
            )
        })
    }

    /// The name a response carries for `adapter`: the adapter's or the model's.
    fn model_name(&self, adapter: Option<usize>) -> String {
        adapter.map_or_else(|| self.name.clone(), |a| self.adapters[a].0.clone())
    }

    fn next_request(&self) -> u64 {
        self.requests.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues a request's jobs, or 503 when the queue cannot take them all.
    fn submit(&self, jobs: Vec<Job>) -> Result<(), ApiError> {
        let n = jobs.len();
        let waiting = &self.metrics.waiting;
        let room = waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            (w + n <= self.max_queue).then_some(w + n)
        });
        if room.is_err() {
            self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the server is busy: its queue holds {} sequences (--max-queue); retry later",
                        self.max_queue
                    ),
                )
            });
        }
        let sent = self
            .jobs
            .lock()
            .map_err(|_| ())
            .and_then(|tx| tx.send(Msg::Jobs(jobs)).map_err(|_| ()));
        sent.map_err(|()| {
            waiting.fetch_sub(n, Ordering::AcqRel);
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            )
        })
    }
}

pub(crate) fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Loads the model and serves until SIGTERM or Ctrl-C.
pub fn run(opts: Options) -> Result<(), Error> {
    let dir = &opts.model;
    infer::model::check_model_dir(dir)?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let config = Gpt2Config::of_model(dir)?;
    infer::check_vocab(&config, &tokenizer, dir)?;
    let positions = config.n_positions as usize;
    let max_model_len = opts.max_model_len.unwrap_or(positions);
    if max_model_len < 2 || max_model_len > positions {
        return Err(infer::Error::Input(format!(
            "--max-model-len {max_model_len}: must be between 2 and the model's n_positions \
             ({positions})"
        ))
        .into());
    }
    if opts.max_num_seqs == 0 {
        return Err(infer::Error::Input("--max-num-seqs must be at least 1".into()).into());
    }
    let defaults = settings::defaults(dir, &config)?;
    let name = opts.served_model_name.clone().unwrap_or_else(|| {
        dir.canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string())
    });
    let model = load(&opts, &config, &name)?;
    let metrics = Arc::new(Metrics::default());
    let per_seq = kv_bytes_per_seq(&config, model.kind(), max_model_len);
    let slots = kv_slots(&opts, &model, per_seq, max_model_len)?;
    metrics.num_seqs_max.store(slots, Ordering::Relaxed);
    metrics
        .kv_cache_bytes
        .store(slots.saturating_mul(per_seq), Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::channel();
    let pool = Pool {
        slots,
        capacity: max_model_len,
        prefix_cache_bytes: opts.prefix_cache_bytes,
    };
    let m = metrics.clone();
    let base = defaults.clone();
    let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || scheduler::run(model, rx, m, pool, base, ready_tx))?;
    // Listening (and so `/health`) waits for the engine's KV caches.
    ready
        .recv()
        .unwrap_or_else(|_| Err("it ended before its KV caches were ready".into()))
        .map_err(Error::Scheduler)?;
    let app = Arc::new(App {
        tokenizer,
        config,
        chat: chat::Template::load(dir),
        defaults,
        name,
        adapters: opts.adapters.clone(),
        max_model_len,
        api_key: opts.api_key.clone(),
        jobs: Mutex::new(tx),
        metrics,
        max_queue: opts.max_queue,
        requests: AtomicU64::new(0),
        started: unix_time(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(listen(&opts, app))
}

/// The model with its adapters, loaded on the calling thread (the scheduler takes it
/// over). Adapter names must be distinct and not the model's own (`name`).
/// Bytes one sequence's KV cache of `capacity` positions takes: keys and values of every
/// layer in the model's dtype, and its mask and positions (`KvCache`).
fn kv_bytes_per_seq(config: &Gpt2Config, kind: tch::Kind, capacity: usize) -> usize {
    let per_position = 2 * config.n_layer as usize * config.n_embd as usize;
    capacity * (per_position * kind.elt_size_in_bytes() + 1 + 8)
}

/// Sequences whose KV caches fit the memory left for them, at most `--max-num-seqs`.
/// The engine allocates (and zeroes) every sequence's cache at start, so a budget that
/// memory cannot hold would be taken from the model's own pages, or end in the kernel's
/// out-of-memory killer under load. The budget: `--kv-cache-memory-mb`; else, on the CPU,
/// 90% of the memory the system has available after loading (the kernel's
/// `MemAvailable`, or the cgroup's limit less its use when lower), less the weights the
/// model reads in place from mapped files (page cache, which the kernel counts as
/// available) and the prefix cache's budget; on other devices, `--max-num-seqs` as asked.
/// Fewer sequences than asked is a note on stderr; none is an error naming the flags.
fn kv_slots(opts: &Options, model: &Gpt2, per_seq: usize, capacity: usize) -> Result<usize, Error> {
    let asked = opts.max_num_seqs;
    let mib = |b: usize| b as f64 / f64::from(1 << 20);
    let (budget, from) = match opts.kv_cache_bytes {
        Some(b) => (b, "--kv-cache-memory-mb".to_string()),
        None if opts.devices.iter().all(|d| *d == tch::Device::Cpu) => {
            let Some(available) = available_memory() else {
                return Ok(asked);
            };
            let mapped = model.mapped_weight_bytes();
            let left = (available / 10 * 9)
                .saturating_sub(mapped)
                .saturating_sub(opts.prefix_cache_bytes);
            let why = format!(
                "90% of the {:.0} MiB available after loading, less {:.0} MiB of weights read \
                 in place from mapped files and {:.0} MiB of --prefix-cache-mb",
                mib(available),
                mib(mapped),
                mib(opts.prefix_cache_bytes)
            );
            (left, why)
        }
        None => return Ok(asked),
    };
    let fit = budget / per_seq.max(1);
    if fit == 0 {
        return Err(infer::Error::Input(format!(
            "the KV cache of one sequence of --max-model-len {capacity} positions takes \
             {:.1} MiB, and {:.1} MiB is left for KV caches ({from}): lower --max-model-len, \
             or free memory",
            mib(per_seq),
            mib(budget)
        ))
        .into());
    }
    if fit < asked {
        eprintln!(
            "gpt2kit serve: KV caches for --max-num-seqs {asked} sequences of {capacity} \
             positions take {:.0} MiB, and {:.0} MiB is left for them ({from}): {fit} \
             sequences decode at once, the others wait",
            mib(asked.saturating_mul(per_seq)),
            mib(budget)
        );
    }
    Ok(fit.min(asked))
}

/// Bytes of memory the system can give this process without swapping: the kernel's
/// `MemAvailable`, or its cgroup's (v2) `memory.max` less `memory.current` when lower.
/// None where neither can be read.
fn available_memory() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        rest.trim().strip_suffix("kB")?.trim().parse::<usize>().ok()
    })?;
    let mut available = kib.saturating_mul(1024);
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if let Some(path) = cgroup.lines().find_map(|l| l.strip_prefix("0::")) {
        let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        let number = |s: Option<String>| s.and_then(|s| s.trim().parse::<usize>().ok());
        if let (Some(max), Some(current)) =
            (number(read("memory.max")), number(read("memory.current")))
        {
            available = available.min(max.saturating_sub(current));
        }
    }
    Some(available)
}

fn load(opts: &Options, config: &Gpt2Config, name: &str) -> Result<Gpt2, Error> {
    for (i, (a, dir)) in opts.adapters.iter().enumerate() {
        let flag = format!("--adapter {a}={}", dir.display());
        if a == name || opts.adapters[..i].iter().any(|(b, _)| a == b) {
            return Err(infer::Error::Input(format!(
                "{flag}: the name `{a}` is already taken (by the model or another adapter)"
            ))
            .into());
        }
    }
    let mut model = Gpt2::load_with(&opts.model, opts.kind, &opts.devices, &opts.engine)?;
    for (a, dir) in &opts.adapters {
        let flag = format!("--adapter {a}={}", dir.display());
        let at = |e: infer::Error| infer::Error::Input(format!("{flag}: {e}"));
        let lora = infer::adapter::Lora::read(dir, config, tch::Device::Cpu).map_err(at)?;
        model.add_adapter(&lora).map_err(at)?;
    }
    Ok(model)
}

async fn listen(opts: &Options, app: Arc<App>) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
        .await
        .map_err(|source| Error::Bind {
            host: opts.host.clone(),
            port: opts.port,
            source,
        })?;
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "gpt2kit serve: `{}` on http://{addr} (OpenAI API at /v1)",
        app.name
    );
    let _ = out.flush();
    let stop = Arc::new(tokio::sync::Notify::new());
    let signalled = stop.clone();
    let server = axum::serve(listener, routes::router(app)).with_graceful_shutdown(async move {
        shutdown_signal().await;
        signalled.notify_one();
    });
    let timeout = opts.shutdown_timeout;
    let deadline = async move {
        stop.notified().await;
        tokio::time::sleep(timeout).await;
    };
    tokio::select! {
        r = server => r?,
        () = deadline => {
            let _ = writeln!(
                std::io::stderr(),
                "gpt2kit serve: --shutdown-timeout {timeout:?} passed; closing the requests still running"
            );
        }
    }
    Ok(())
}

/// SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    let _ = writeln!(
        std::io::stderr(),
        "gpt2kit serve: shutting down: no new requests; finishing the running ones"
    );
}
